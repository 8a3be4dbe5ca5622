package fresco

import (
	"fmt"
	"slices"

	commonv1 "github.com/fresco-ml/fresco/clients/go/gen/fresco/common/v1"
)

// ValueOf is a Go value as a fresco.common.v1.Value: nil is null; bool, integers, floats, string and
// []byte are scalars; []float64, []float32, []int64, []int and []string are lists. A *commonv1.Value
// passes through. Anything else is an error naming its type.
func ValueOf(v any) (*commonv1.Value, error) {
	switch x := v.(type) {
	case nil:
		return &commonv1.Value{}, nil
	case *commonv1.Value:
		return x, nil
	case bool:
		return &commonv1.Value{Kind: &commonv1.Value_BoolValue{BoolValue: x}}, nil
	case int:
		return int64Value(int64(x)), nil
	case int8:
		return int64Value(int64(x)), nil
	case int16:
		return int64Value(int64(x)), nil
	case int32:
		return int64Value(int64(x)), nil
	case int64:
		return int64Value(x), nil
	case uint8:
		return int64Value(int64(x)), nil
	case uint16:
		return int64Value(int64(x)), nil
	case uint32:
		return int64Value(int64(x)), nil
	case float32:
		return doubleValue(float64(x)), nil
	case float64:
		return doubleValue(x), nil
	case string:
		return &commonv1.Value{Kind: &commonv1.Value_StringValue{StringValue: x}}, nil
	case []byte:
		return &commonv1.Value{Kind: &commonv1.Value_BytesValue{BytesValue: x}}, nil
	case []float64:
		return &commonv1.Value{Kind: &commonv1.Value_DoubleList{DoubleList: &commonv1.DoubleList{Values: x}}}, nil
	case []float32:
		values := make([]float64, len(x))
		for i, f := range x {
			values[i] = float64(f)
		}
		return &commonv1.Value{Kind: &commonv1.Value_DoubleList{DoubleList: &commonv1.DoubleList{Values: values}}}, nil
	case []int64:
		return &commonv1.Value{Kind: &commonv1.Value_Int64List{Int64List: &commonv1.Int64List{Values: x}}}, nil
	case []int:
		values := make([]int64, len(x))
		for i, n := range x {
			values[i] = int64(n)
		}
		return &commonv1.Value{Kind: &commonv1.Value_Int64List{Int64List: &commonv1.Int64List{Values: values}}}, nil
	case []string:
		return &commonv1.Value{Kind: &commonv1.Value_StringList{StringList: &commonv1.StringList{Values: x}}}, nil
	default:
		return nil, fmt.Errorf("unsupported type %T: expected nil, bool, an integer, a float, string, []byte, "+
			"or a list of float64, float32, int64, int or string", v)
	}
}

func int64Value(n int64) *commonv1.Value {
	return &commonv1.Value{Kind: &commonv1.Value_Int64Value{Int64Value: n}}
}

func doubleValue(f float64) *commonv1.Value {
	return &commonv1.Value{Kind: &commonv1.Value_DoubleValue{DoubleValue: f}}
}

// Values converts named Go values with ValueOf; what the error names is the entry that failed.
func Values(named map[string]any) (map[string]*commonv1.Value, error) {
	out := make(map[string]*commonv1.Value, len(named))
	for name, v := range named {
		value, err := ValueOf(v)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out[name] = value
	}
	return out, nil
}

// EntityKey identifies one entity by its join keys, e.g. EntityKey(map[string]any{"user_id": 42}).
func EntityKey(joinKeys map[string]any) (*commonv1.EntityKey, error) {
	values, err := Values(joinKeys)
	if err != nil {
		return nil, fmt.Errorf("join_keys.%w", err)
	}
	return &commonv1.EntityKey{JoinKeys: values}, nil
}

// Datatypes a Tensor carries in int64_values; the other numeric ones (FP16 to FP64) travel as doubles.
var int64Carried = map[string]bool{
	"INT8": true, "INT16": true, "INT32": true, "INT64": true, "UINT8": true, "UINT16": true, "UINT32": true,
}

// Float64s are the elements of a floating-point tensor (FP16, BF16, FP32, FP64) in row-major order.
func Float64s(t *commonv1.Tensor) ([]float64, error) {
	if int64Carried[t.GetDatatype()] || slices.Contains([]string{"UINT64", "BOOL", "BYTES"}, t.GetDatatype()) {
		return nil, fmt.Errorf("datatype: expected a floating-point tensor, got %s", t.GetDatatype())
	}
	return t.GetDoubleValues(), checkSize(t, len(t.GetDoubleValues()))
}

// Int64s are the elements of an integer tensor (INT8 to INT64, UINT8 to UINT32) in row-major order.
func Int64s(t *commonv1.Tensor) ([]int64, error) {
	if !int64Carried[t.GetDatatype()] {
		return nil, fmt.Errorf("datatype: expected an integer tensor (INT8 to INT64, UINT8 to UINT32), got %s",
			t.GetDatatype())
	}
	return t.GetInt64Values(), checkSize(t, len(t.GetInt64Values()))
}

// checkSize says whether a tensor holds as many elements as its shape has.
func checkSize(t *commonv1.Tensor, got int) error {
	want := int64(1)
	for _, d := range t.GetShape() {
		want *= d
	}
	if int64(got) != want {
		return fmt.Errorf("shape: %v holds %d elements, the tensor carries %d", t.GetShape(), want, got)
	}
	return nil
}
