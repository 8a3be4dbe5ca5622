"""Gateway requests parsed from wire bytes: the same messages protobuf parses, with the batch
counted and over-long string lists refused before they are parsed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chassis.errors import InvalidArgument
from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2 as pb
from gateway.limits import Limits
from gateway.wire import parse_batch, parse_request

LIMITS = Limits(max_batch_requests=100, max_bytes_elements=1000)

_values = st.one_of(
    st.builds(values_pb2.Value, double_value=st.floats(allow_nan=False)),
    st.builds(values_pb2.Value, int64_value=st.integers(-(2**63), 2**63 - 1)),
    st.builds(values_pb2.Value, string_value=st.text(max_size=5)),
    st.builds(
        lambda items: values_pb2.Value(string_list=values_pb2.StringList(values=items)),
        st.lists(st.text(max_size=3), max_size=30),
    ),
    st.just(values_pb2.Value()),
)
_requests = st.builds(
    pb.PredictRequest,
    model=st.text(min_size=1, max_size=5),
    version=st.sampled_from(["", "1", "12"]),
    features=st.dictionaries(st.text(max_size=4), _values, max_size=4),
    outputs=st.lists(st.text(max_size=3), max_size=2),
    request_id=st.text(max_size=4),
)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.lists(_requests, max_size=8))
def test_batch_parses_as_protobuf_does(requests: list[pb.PredictRequest]) -> None:
    data = pb.PredictBatchRequest(requests=requests).SerializeToString()
    assert parse_batch(data, LIMITS) == list(pb.PredictBatchRequest.FromString(data).requests)
    for request in requests:
        assert parse_request(request.SerializeToString(), LIMITS) == request


def test_over_long_list_is_refused_even_when_a_later_map_entry_replaces_it() -> None:
    first = pb.PredictRequest(model="m")
    first.features["x"].string_list.values.extend(["a"] * 2000)  # over the limit, but replaced below
    second = pb.PredictRequest()
    second.features["x"].string_value = "kept"
    data = first.SerializeToString() + second.SerializeToString()
    with pytest.raises(InvalidArgument, match=r"features\['x'\]: more than 1000 string elements"):
        parse_request(data, LIMITS)  # any over-long list is refused, even one a later entry replaces
    assert pb.PredictRequest.FromString(data).features["x"].string_value == "kept"


def test_batch_over_the_limit_is_refused_before_parsing() -> None:
    data = pb.PredictBatchRequest(requests=[pb.PredictRequest(model="m")] * 101).SerializeToString()
    with pytest.raises(InvalidArgument, match=r"101 predictions in one PredictBatch, at most 100"):
        parse_batch(data, LIMITS)


def test_over_long_string_list_is_refused_after_counting_past_the_limit_only() -> None:
    request = pb.PredictRequest(model="m")
    request.features["text"].string_list.values.extend([""] * 1_000_000)
    request.features["ok"].string_list.values.extend(["a"] * 1000)
    with pytest.raises(InvalidArgument, match=r"request.features\['text'\]: more than 1000 string elements"):
        parse_request(request.SerializeToString(), LIMITS)
    batch = pb.PredictBatchRequest(requests=[pb.PredictRequest(model="m"), request])
    with pytest.raises(InvalidArgument, match=r"requests\[1\].features\['text'\]: more than 1000"):
        parse_batch(batch.SerializeToString(), LIMITS)
    del request.features["text"]
    assert parse_request(request.SerializeToString(), LIMITS) == request


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x05ab", b"\x0a", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0b"],
    ids=["length_past_end", "missing_length", "varint_too_long", "group_wire_type"],
)
def test_malformed_bytes_are_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        parse_batch(data, LIMITS)
