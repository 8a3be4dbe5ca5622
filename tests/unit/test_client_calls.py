"""The client's per-call options and request builders, in process: the W3C trace context checked before it is
sent, deadlines that must be positive, the token and trace metadata of a call, and the requests built from
Python values (entity keys, output names, staleness, units), with values converted both ways."""

from __future__ import annotations

import pytest

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.calls import Client, trace_metadata
from fresco.client import (
    assign_request,
    assignment_unit,
    features_request,
    from_value,
    predict_request,
    to_value,
)
from fresco.credentials import ClientSecurity

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_trace_context_becomes_metadata_in_a_fixed_order() -> None:
    assert trace_metadata(None) == ()
    assert trace_metadata({}) == ()
    carrier = {"baggage": "k=v", "tracestate": "a=1", "traceparent": TRACEPARENT}
    assert trace_metadata(carrier) == (("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("baggage", "k=v"))
    assert trace_metadata({"traceparent": TRACEPARENT, "tracestate": ""}) == (("traceparent", TRACEPARENT),)


@pytest.mark.parametrize(
    "traceparent",
    [
        "",
        "garbage",
        TRACEPARENT.upper(),  # W3C ids are lowercase hex
        "ff" + TRACEPARENT[2:],  # version ff is invalid
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # an all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",  # an all-zero parent id
        TRACEPARENT + "-",
    ],
)
def test_a_malformed_traceparent_is_refused_naming_it(traceparent: str) -> None:
    with pytest.raises(ValueError, match=r"trace\['traceparent'\]: expected W3C"):
        trace_metadata({"traceparent": traceparent})


def test_a_misspelled_trace_key_is_refused() -> None:
    with pytest.raises(ValueError, match=r"trace: unexpected keys \['traceparnet'\]"):
        trace_metadata({"traceparnet": TRACEPARENT})


def test_a_call_carries_its_deadline_token_and_trace_context() -> None:
    with Client("localhost:1", timeout_s=2.5, security=ClientSecurity(token="t0k")) as client:
        default = client.call(None, None)
        assert (default.timeout, default.metadata) == (2.5, (("authorization", "Bearer t0k"),))
        traced = client.call(0.25, {"traceparent": TRACEPARENT})
        assert traced.timeout == 0.25
        assert traced.metadata == (("authorization", "Bearer t0k"), ("traceparent", TRACEPARENT))
        for bad in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="timeout_s: expected a positive number of seconds"):
                client.call(bad, None)
    with pytest.raises(ValueError, match="timeout_s"):
        Client("localhost:1", timeout_s=0)


def test_predict_request_carries_entity_keys_and_output_names() -> None:
    request = predict_request(
        "m", {"f0": 1.5}, unit_ids={"user_id": "7"}, entity_keys=[{"user_id": 42}], output_names=["probabilities"]
    )
    assert [dict(k.join_keys) for k in request.entity_keys] == [{"user_id": values_pb2.Value(int64_value=42)}]
    assert (list(request.outputs), dict(request.unit_ids)) == (["probabilities"], {"user_id": "7"})


def test_features_request_converts_staleness_and_refuses_a_negative_one() -> None:
    request = features_request([{"user_id": 1}, {"user_id": "a"}], ["v:f"], max_staleness_s=1.5)
    assert request.max_staleness.ToNanoseconds() == 1_500_000_000
    assert [from_value(k.join_keys["user_id"]) for k in request.entity_keys] == [1, "a"]
    assert not features_request([{"user_id": 1}], ["v:f"]).HasField("max_staleness")
    with pytest.raises(ValueError, match="max_staleness_s"):
        features_request([{"user_id": 1}], ["v:f"], max_staleness_s=-1.0)


def test_assign_request_takes_mappings_and_units() -> None:
    unit = assignment_unit({"user_id": "1"}, {"country": "fr"})
    request = assign_request([{"user_id": "2"}, unit], ["exp"], "model")
    assert [dict(u.unit_ids) for u in request.units] == [{"user_id": "2"}, {"user_id": "1"}]
    assert request.units[1].attributes["country"].string_value == "fr"
    assert isinstance(request.units[0], apb.AssignmentUnit)
    assert (list(request.experiment_keys), request.model_name) == (["exp"], "model")


@pytest.mark.parametrize("value", [None, 1.5, -3, True, "text", b"\x00\xff", [1.0, 2.5], [1, 2], ["a", "b"]])
def test_values_convert_both_ways(value: object) -> None:
    assert from_value(to_value(value)) == value  # type: ignore[arg-type]
