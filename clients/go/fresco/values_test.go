package fresco

import (
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	commonv1 "github.com/fresco-ml/fresco/clients/go/gen/fresco/common/v1"
)

func TestValueOfEachKind(t *testing.T) {
	cases := []struct {
		in   any
		want *commonv1.Value
	}{
		{nil, &commonv1.Value{}},
		{true, &commonv1.Value{Kind: &commonv1.Value_BoolValue{BoolValue: true}}},
		{42, &commonv1.Value{Kind: &commonv1.Value_Int64Value{Int64Value: 42}}},
		{int32(-7), &commonv1.Value{Kind: &commonv1.Value_Int64Value{Int64Value: -7}}},
		{uint32(4294967295), &commonv1.Value{Kind: &commonv1.Value_Int64Value{Int64Value: 4294967295}}},
		{0.25, &commonv1.Value{Kind: &commonv1.Value_DoubleValue{DoubleValue: 0.25}}},
		{float32(1.5), &commonv1.Value{Kind: &commonv1.Value_DoubleValue{DoubleValue: 1.5}}},
		{"fr", &commonv1.Value{Kind: &commonv1.Value_StringValue{StringValue: "fr"}}},
		{[]byte{0, 1}, &commonv1.Value{Kind: &commonv1.Value_BytesValue{BytesValue: []byte{0, 1}}}},
		{[]float32{0.5, 2}, &commonv1.Value{Kind: &commonv1.Value_DoubleList{DoubleList: &commonv1.DoubleList{Values: []float64{0.5, 2}}}}},
		{[]int{1, 2}, &commonv1.Value{Kind: &commonv1.Value_Int64List{Int64List: &commonv1.Int64List{Values: []int64{1, 2}}}}},
		{[]string{"a"}, &commonv1.Value{Kind: &commonv1.Value_StringList{StringList: &commonv1.StringList{Values: []string{"a"}}}}},
	}
	for _, c := range cases {
		got, err := ValueOf(c.in)
		if err != nil {
			t.Fatalf("ValueOf(%#v): %v", c.in, err)
		}
		if !proto.Equal(got, c.want) {
			t.Errorf("ValueOf(%#v) = %v, want %v", c.in, got, c.want)
		}
	}
}

func TestUnsupportedValuesNameTheEntry(t *testing.T) {
	_, err := NewPredictRequest("demo", map[string]any{"f0": 1.0, "f1": map[string]int{}})
	if err == nil || !strings.HasPrefix(err.Error(), "features.f1: unsupported type map[string]int") {
		t.Errorf("got %v, want an error naming features.f1 and its type", err)
	}
	_, err = EntityKey(map[string]any{"user_id": uint64(1)})
	if err == nil || !strings.HasPrefix(err.Error(), "join_keys.user_id: unsupported type uint64") {
		t.Errorf("got %v, want an error naming join_keys.user_id and its type", err)
	}
}

func TestTensorsDecodeByDatatypeAndShape(t *testing.T) {
	probabilities := &commonv1.Tensor{Datatype: "FP32", Shape: []int64{2}, DoubleValues: []float64{0.25, 0.75}}
	if got, err := Float64s(probabilities); err != nil || len(got) != 2 || got[1] != 0.75 {
		t.Errorf("Float64s = %v, %v", got, err)
	}
	label := &commonv1.Tensor{Datatype: "INT64", Shape: []int64{}, Int64Values: []int64{1}}
	if got, err := Int64s(label); err != nil || len(got) != 1 || got[0] != 1 {
		t.Errorf("Int64s = %v, %v", got, err)
	}
	if _, err := Float64s(label); err == nil || !strings.HasPrefix(err.Error(), "datatype:") {
		t.Errorf("Float64s of an INT64 tensor: %v, want a datatype error", err)
	}
	if _, err := Int64s(probabilities); err == nil || !strings.HasPrefix(err.Error(), "datatype:") {
		t.Errorf("Int64s of an FP32 tensor: %v, want a datatype error", err)
	}
	short := &commonv1.Tensor{Datatype: "FP64", Shape: []int64{2, 2}, DoubleValues: []float64{1, 2, 3}}
	if _, err := Float64s(short); err == nil || !strings.HasPrefix(err.Error(), "shape:") {
		t.Errorf("Float64s of a tensor short of its shape: %v, want a shape error", err)
	}
}
