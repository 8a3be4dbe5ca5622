"""A row's score (the last element of its score output) read straight off the tensor, as its values give it."""

from __future__ import annotations

import pytest

from fresco.api.common.v1 import values_pb2
from gateway.shadow import score_of, tensor_values


@pytest.mark.parametrize(
    "tensor",
    [
        values_pb2.Tensor(datatype="FP32", shape=[2], double_values=[0.25, 0.1 + 0.2]),
        values_pb2.Tensor(datatype="INT64", shape=[2], int64_values=[3, 2**53 + 1]),
        values_pb2.Tensor(datatype="UINT64", shape=[1], uint64_values=[2**64 - 1]),
        values_pb2.Tensor(datatype="BOOL", shape=[2], bool_values=[False, True]),
    ],
)
def test_the_score_is_the_last_value_as_float64(tensor: values_pb2.Tensor) -> None:
    score = score_of({"p": tensor}, "p")
    assert score == float(tensor_values(tensor)[-1])
    assert type(score) is float


def test_no_score_without_the_output_or_without_numbers() -> None:
    assert score_of({}, "p") is None
    assert score_of({"p": values_pb2.Tensor(datatype="BYTES", shape=[1], bytes_values=[b"x"])}, "p") is None
    assert score_of({"first": values_pb2.Tensor(datatype="FP64", shape=[1], double_values=[0.5])}, "") == 0.5
