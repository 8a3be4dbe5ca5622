"""Fuzzed CreateExperiment and UpdateExperiment requests against the running service: every answer is OK or a
caller's error with a message, never INTERNAL or UNKNOWN, and the service stays healthy."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from tests.experiment_service.service_support import create_and_start, experiment, running
from tests.rpc import outcome

pytestmark = pytest.mark.integration

CALLER_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
}
texts = st.text(max_size=20)
keys = st.one_of(st.sampled_from(["fuzz-a", "fuzz-running", "", "A", "a b", "x" * 200, "é", "a\x00b"]), texts)
floats = st.floats(allow_nan=True, allow_infinity=True)
int64 = st.integers(-(2**63), 2**63 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
enums = st.integers(-2, 6)
durations = st.builds(Duration, seconds=st.integers(-(10**6), 10**6))
values = st.one_of(
    st.builds(values_pb2.Value),
    st.builds(values_pb2.Value, string_value=texts),
    st.builds(values_pb2.Value, double_value=floats),
    st.builds(values_pb2.Value, int64_value=int64),
)


def often(value: object, strategy: st.SearchStrategy) -> st.SearchStrategy:
    """`value` about half the time, so that the checks behind a field are reached too."""
    return st.one_of(st.just(value), strategy)


arms = st.builds(
    xpb.Arm,
    name=often("a", texts),
    weight=often(0.5, floats),
    model_version=often(1, int64),
    parameters=st.dictionaries(texts, texts, max_size=2),
)
metrics = st.builds(
    xpb.MetricSpec,
    name=often("m", texts),
    role=enums,
    kind=enums,
    direction=enums,
    event=texts,
    denominator_event=texts,
    minimum_detectable_effect=floats,
    non_inferiority_margin=floats,
    cap=floats,
    cuped=often(None, st.builds(xpb.Cuped, covariate_event=texts, pre_exposure_window=durations)),
)
experiments = st.builds(
    xpb.Experiment,
    key=keys,
    hypothesis=texts,
    owner=texts,
    type=often(xpb.EXPERIMENT_TYPE_AB_TEST, enums),
    model_name=often("m", texts),
    arms=st.lists(arms, max_size=4),
    control_arm=often("", texts),
    unit_type=often("user_id", texts),
    coverage=often(1.0, floats),
    salt=texts,
    targeting=st.lists(
        st.builds(
            xpb.TargetingCondition, attribute=texts, operator=st.integers(-1, 12), values=st.lists(values, max_size=2)
        ),
        max_size=2,
    ),
    namespace=often(None, st.builds(xpb.Namespace, id=texts, start=int32, end=int32)),
    metrics=st.lists(metrics, max_size=3),
    min_units_per_arm=int64,
    max_duration=durations,
    decision_rule=st.builds(
        xpb.DecisionRule,
        criteria=st.lists(st.builds(xpb.Criterion, kind=enums, metric=texts, threshold=floats), max_size=2),
    ),
    statistics=st.builds(xpb.StatisticsSettings, alpha=floats, power=floats, srm_p_value=floats),
    bandit=st.builds(
        xpb.BanditSettings,
        reward_metric=texts,
        min_arm_share=floats,
        min_units_per_arm=int64,
        update_interval=durations,
    ),
    labels=st.dictionaries(texts, texts, max_size=2),
    status=enums,
    version=int64,
)
FIELDS = ["hypothesis", "arms", "coverage", "salt", "metrics", "bandit", "status", "key", "labels", "nope", "bandit.x"]


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.ExperimentServiceStub]:
    with running(tmp_path_factory.mktemp("fuzz")) as process, grpc.insecure_channel(process.address) as channel:
        stub = pb_grpc.ExperimentServiceStub(channel)
        stub.CreateExperiment(pb.CreateExperimentRequest(experiment=experiment("fuzz-a")))
        create_and_start(stub, experiment("fuzz-running"))
        yield stub
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(e=experiments)
def test_create_never_fails_internally(stub: pb_grpc.ExperimentServiceStub, e: xpb.Experiment) -> None:
    request = pb.CreateExperimentRequest(experiment=e)
    assert outcome(lambda: stub.CreateExperiment(request, timeout=30)) in CALLER_ERRORS


@FUZZ
@given(
    e=experiments,
    key=st.sampled_from(["fuzz-a", "fuzz-running", "nope"]),
    paths=st.lists(st.sampled_from(FIELDS), max_size=3),
    version=st.one_of(st.integers(0, 3), int64),
)
def test_update_never_fails_internally(
    stub: pb_grpc.ExperimentServiceStub, e: xpb.Experiment, key: str, paths: list[str], version: int
) -> None:
    e.key = key
    current = stub.GetExperiment(pb.GetExperimentRequest(key=key), timeout=30).experiment if key != "nope" else None
    request = pb.UpdateExperimentRequest(
        experiment=e, update_mask=FieldMask(paths=paths), expected_version=current.version if current else version
    )
    assert outcome(lambda: stub.UpdateExperiment(request, timeout=30)) in CALLER_ERRORS
