"""The gateway's tensor assembly: named features into model inputs, outputs back per request."""

from __future__ import annotations

import numpy as np
import pytest

from chassis.errors import InvalidArgument
from fresco.api.common.v1 import values_pb2
from fresco.api.inference import grpc_service_pb2 as pb
from gateway.assembly import InputSpec, ModelSignature, Row, build_inputs, from_proto, split_rows, to_tensor
from gateway.limits import Limits

VECTOR = ModelSignature(
    "risk", (InputSpec("X", "FP32", (-1, 3), ("income", "age", "tenure")),), ("label", "probabilities")
)
NAMED = ModelSignature(
    "ranker",
    (
        InputSpec("age", "INT64", (-1, 1)),
        InputSpec("city", "BYTES", (-1,)),
        InputSpec("score", "FP64", (-1,)),
    ),
    ("rank",),
)


def _error(signature: ModelSignature, rows: list[dict[str, object]], labels: list[str] | None = None) -> str:
    labels = labels or [f"requests[{i}]" for i in range(len(rows))]
    with pytest.raises(InvalidArgument) as caught:
        build_inputs(signature, rows, labels)  # type: ignore[arg-type]
    return str(caught.value)


def test_feature_vector_follows_feature_names_order() -> None:
    rows = [
        {"age": 30, "tenure": 2.5, "income": 1000.0},
        {"tenure": 0, "income": 5.5, "age": 41, "unused": "ignored"},
    ]
    arrays = build_inputs(VECTOR, rows, ["requests[0]", "requests[1]"])
    assert list(arrays) == ["X"]
    assert arrays["X"].dtype == np.float32
    np.testing.assert_array_equal(arrays["X"], np.array([[1000.0, 30, 2.5], [5.5, 41, 0]], dtype=np.float32))


def test_per_input_named_features() -> None:
    rows = [{"age": 30, "city": "Oslo", "score": 0.25}, {"age": 41.0, "city": b"Rome", "score": True}]
    arrays = build_inputs(NAMED, rows, ["a", "b"])
    assert arrays["age"].dtype == np.int64
    assert arrays["age"].shape == (2, 1)  # widened to the input's rank
    assert arrays["age"].tolist() == [[30], [41]]
    assert arrays["city"].dtype == object
    assert arrays["city"].tolist() == ["Oslo", b"Rome"]
    assert arrays["score"].dtype == np.float64
    assert arrays["score"].tolist() == [0.25, 1.0]


def test_list_feature_fills_a_vector_input() -> None:
    signature = ModelSignature("emb", (InputSpec("embedding", "FP32", (-1, 3)),), ("y",))
    arrays = build_inputs(signature, [{"embedding": [0.1, 0.2, 0.3]}, {"embedding": [1, 2, 3]}], ["a", "b"])
    assert arrays["embedding"].shape == (2, 3)
    np.testing.assert_allclose(arrays["embedding"][1], [1, 2, 3])
    assert "needs shape [-1, 3]; the features give [1, 2]" in _error(signature, [{"embedding": [1.0, 2.0]}])


def test_missing_feature_names_request_and_feature() -> None:
    message = _error(VECTOR, [{"income": 1.0, "age": 2.0, "tenure": 3.0}, {"income": 1.0, "tenure": 3.0}])
    assert message == "requests[1]: missing feature 'age', which the model needs"
    assert (
        _error(NAMED, [{"age": 1, "score": 1.0}], ["batch[7]"])
        == "batch[7]: missing feature 'city', which the model needs"
    )


def test_null_feature() -> None:
    message = _error(VECTOR, [{"income": 1.0, "age": None, "tenure": 3.0}])
    assert message == "requests[0]: feature 'age' is null; the model needs a value"


@pytest.mark.parametrize("value", ["42", b"42"])
def test_string_for_a_number(value: object) -> None:
    message = _error(VECTOR, [{"income": 1.0, "age": value, "tenure": 3.0}])
    assert message == f"requests[0]: feature 'age': expected a number for a FP32 input, got {type(value).__name__}"


def test_number_for_a_string_input() -> None:
    message = _error(NAMED, [{"age": 1, "city": 7, "score": 1.0}])
    assert message == "requests[0]: feature 'city': expected a string or bytes value, got int"


@pytest.mark.parametrize("value", [1.5, float("nan"), float("inf")])
def test_non_integer_float_for_an_int_input(value: float) -> None:
    message = _error(NAMED, [{"age": value, "city": "Oslo", "score": 1.0}])
    assert message == f"requests[0]: feature 'age': expected an integer for a INT64 input, got {value}"


def test_shape_mismatch_names_model_and_input() -> None:
    signature = ModelSignature("risk", (InputSpec("X", "FP32", (-1, 4), ("a", "b", "c")),), ("y",))
    message = _error(signature, [{"a": 1.0, "b": 2.0, "c": 3.0}])
    assert message == "model 'risk' input 'X' needs shape [-1, 4]; the features give [1, 3]"


def test_unknown_datatype_in_metadata() -> None:
    signature = ModelSignature("odd", (InputSpec("X", "COMPLEX64", (-1,)),), ("y",))
    assert _error(signature, [{"X": 1.0}]) == "model 'odd' input 'X' has unknown datatype COMPLEX64"


def test_integer_out_of_range_for_the_input_type() -> None:
    """A caller's value too big for an INT32 input is the caller's mistake, but numpy's OverflowError
    escapes build_inputs and reaches the caller as INTERNAL."""
    signature = ModelSignature("small", (InputSpec("count", "INT32", (-1,)),), ("y",))
    message = _error(signature, [{"count": 2**40}])
    assert "requests[0]" in message
    assert "'count'" in message


def test_list_where_a_vector_needs_one_number() -> None:
    """A list in one position of a feature vector makes a ragged table: numpy's ValueError escapes
    build_inputs (an INTERNAL to the caller) instead of an InvalidArgument naming the feature."""
    message = _error(VECTOR, [{"income": 1.0, "age": [1.0, 2.0], "tenure": 3.0}])
    assert "requests[0]" in message
    assert "'age'" in message


def test_signature_from_metadata() -> None:
    metadata = pb.ModelMetadataResponse(name="risk", versions=["1"], platform="onnxruntime_onnx")
    x = metadata.inputs.add(name="X", datatype="FP32", shape=[-1, 3])
    x.parameters["feature_names"].string_param = "income,age,tenure"
    metadata.inputs.add(name="city", datatype="BYTES", shape=[-1])
    metadata.outputs.add(name="label", datatype="INT64", shape=[-1])
    metadata.outputs.add(name="probabilities", datatype="FP32", shape=[-1, 2])
    signature = ModelSignature.from_metadata(metadata)
    assert signature == ModelSignature(
        "risk",
        (InputSpec("X", "FP32", (-1, 3), ("income", "age", "tenure")), InputSpec("city", "BYTES", (-1,), ())),
        ("label", "probabilities"),
    )


def test_from_proto_every_kind() -> None:
    value = values_pb2.Value
    assert from_proto(value()) is None
    assert from_proto(value(double_value=1.5)) == 1.5
    assert from_proto(value(int64_value=-(2**62))) == -(2**62)
    assert from_proto(value(string_value="Oslo")) == "Oslo"
    assert from_proto(value(bool_value=False)) is False
    assert from_proto(value(bytes_value=b"\x00")) == b"\x00"
    assert from_proto(value(double_list=values_pb2.DoubleList(values=[1.0, 2.0]))) == [1.0, 2.0]
    assert from_proto(value(int64_list=values_pb2.Int64List(values=[3]))) == [3]
    assert from_proto(value(string_list=values_pb2.StringList(values=["a", "b"]))) == ["a", "b"]
    empty = from_proto(value(double_list=values_pb2.DoubleList()))
    assert empty == []  # an empty list is a value, not null


def test_split_rows() -> None:
    outputs = {
        "label": ("INT64", np.array([1, 0, 1], dtype=np.int64)),
        "probabilities": ("FP32", np.array([[0.1, 0.9], [0.8, 0.2], [0.25, 0.75]], dtype=np.float32)),
        "classes": ("BYTES", np.array([b"no", "yes"], dtype=object)),  # no batch dimension: whole to each
        "flags": ("BOOL", np.array([[True], [False], [True]])),
        "big": ("UINT64", np.array([2**64 - 1, 0, 1], dtype=np.uint64)),
        "scalar": ("FP64", np.array(0.5)),
    }
    rows = split_rows(outputs, 3)
    assert len(rows) == 3
    for row in rows:
        assert set(row) == set(outputs)
    assert [list(r["label"].int64_values) for r in rows] == [[1], [0], [1]]
    assert [list(r["label"].shape) for r in rows] == [[], [], []]
    assert rows[2]["probabilities"].datatype == "FP32"
    assert list(rows[2]["probabilities"].shape) == [2]
    assert list(rows[2]["probabilities"].double_values) == [0.25, 0.75]
    for row in rows:
        assert list(row["classes"].bytes_values) == [b"no", b"yes"]
        assert list(row["classes"].shape) == [2]
        assert list(row["scalar"].double_values) == [0.5]
        assert list(row["scalar"].shape) == []
    assert [list(r["flags"].bool_values) for r in rows] == [[True], [False], [True]]
    assert list(rows[0]["big"].uint64_values) == [2**64 - 1]
    assert split_rows(outputs, 0) == []


@pytest.mark.parametrize(
    ("datatype", "array", "field", "values"),
    [
        ("INT8", np.array([-3], dtype=np.int8), "int64_values", [-3]),
        ("UINT32", np.array([2**32 - 1], dtype=np.uint32), "int64_values", [2**32 - 1]),
        ("FP16", np.array([0.5], dtype=np.float16), "double_values", [0.5]),
        ("FP32", np.array([0.1], dtype=np.float32), "double_values", [float(np.float32(0.1))]),
        # BF16 travels as raw 2-byte words (0x3F80 is 1.0); Tensor carries BF16 in double_values.
        ("BF16", np.array([0x3F80, 0xC000], dtype=np.uint16), "double_values", [1.0, -2.0]),
    ],
)
def test_to_tensor_puts_each_datatype_in_its_field(
    datatype: str, array: np.ndarray, field: str, values: list[object]
) -> None:
    tensor = to_tensor(array, datatype)
    assert tensor.datatype == datatype
    assert list(getattr(tensor, field)) == values
    others = {"double_values", "int64_values", "uint64_values", "bool_values", "bytes_values"} - {field}
    assert all(len(getattr(tensor, other)) == 0 for other in others)


def test_split_rows_of_a_batched_bytes_output() -> None:
    """Row i of a BYTES output is a one-element string tensor, as for any other datatype."""
    outputs = {"echo": ("BYTES", np.array([b"a", b"", "c"], dtype=object))}
    rows = split_rows(outputs, 3)
    assert [list(r["echo"].bytes_values) for r in rows] == [[b"a"], [b""], [b"c"]]
    assert [list(r["echo"].shape) for r in rows] == [[], [], []]


def test_bytes_input_over_the_element_limit_is_refused_before_it_is_built() -> None:
    limits = Limits(max_bytes_elements=4)
    rows: list[Row] = [{"age": 1, "city": "x", "score": 0.5}] * 4
    arrays = build_inputs(NAMED, rows, [f"r{i}" for i in range(4)], limits)
    assert arrays["city"].tolist() == ["x"] * 4
    with pytest.raises(InvalidArgument, match=r"input 'city': 5 string elements, at most 4"):
        build_inputs(NAMED, [*rows, *rows[:1]], [f"r{i}" for i in range(5)], limits)
    listed: list[Row] = [{"age": 1, "city": ["a", "b", "c"], "score": 0.5}] * 2
    with pytest.raises(InvalidArgument, match=r"input 'city': 6 string elements"):
        build_inputs(NAMED, listed, ["r0", "r1"], limits)
