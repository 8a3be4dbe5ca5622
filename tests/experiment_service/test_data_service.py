"""Exposures and outcomes through a real experiment service process: every outcome batch acknowledged, a broken
stream resent without loss or double counting, bad rows refused with their reason while the rest are recorded,
replicas on one Redis adding up, and fuzzed rows never failing the server."""

from __future__ import annotations

import asyncio
import math
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.experiments.exposure import exposure_id
from fresco.servers import RedisServer
from fresco.servers.pytest_plugin import redis_server
from fresco.suite import ServiceProcess
from tests.experiment_service.service_support import create_and_start, experiment, running, service_args, stub_for
from tests.rpc import outcome

__all__ = ["redis_server"]
pytestmark = pytest.mark.integration
R = apb.RejectionReason
CALLER_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with running(tmp_path_factory.mktemp("data")) as process:
        yield process


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[pb_grpc.ExperimentServiceStub]:
    with stub_for(service) as opened:
        yield opened


def revenue_test(key: str) -> xpb.Experiment:
    """Two arms on versions 1 and 2 with a revenue MEAN metric (event "purchase")."""
    metric = xpb.MetricSpec(name="revenue", kind=xpb.METRIC_KIND_MEAN, event="purchase", role=xpb.METRIC_ROLE_SUCCESS)
    return experiment(key, metrics=[metric])


def exposures(e: xpb.Experiment, uids: list[str]) -> list[apb.Exposure]:
    """One exposure per unit, arms alternating, stamped by the service on arrival."""
    rows = []
    for i, uid in enumerate(uids):
        arm = e.arms[i % 2].name
        rows.append(
            apb.Exposure(
                exposure_id=exposure_id(e.key, 1, "user_id", uid, arm),
                experiment_key=e.key,
                phase=1,
                unit_type="user_id",
                unit_id=uid,
                arm_name=arm,
            )
        )
    return rows


def purchase(key: str, oid: str, uid: str, value: float, **fields: object) -> apb.Outcome:
    return apb.Outcome(
        outcome_id=oid, experiment_key=key, unit_type="user_id", unit_id=uid, event="purchase", value=value,
        **fields,  # type: ignore[arg-type]
    )  # fmt: skip


def revenue(stub: pb_grpc.ExperimentServiceStub, key: str) -> dict[str, tuple[int, float]]:
    """(units, Σx) of the revenue metric per arm, from GetResults."""
    results = stub.GetResults(pb.GetResultsRequest(key=key)).results
    return {s.arm_name: (s.units, s.sum) for s in results.metrics[0].arms}


class Stream:
    """A LogOutcomes call fed from a queue, so the test decides when to write, read or break it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.queue: asyncio.Queue[pb.LogOutcomesRequest | None] = asyncio.Queue()
        stub: Any = pb_grpc.ExperimentServiceStub(channel)  # an asyncio stub, which the generated stubs do not type
        self.call = stub.LogOutcomes(self._requests())

    async def _requests(self) -> AsyncIterator[pb.LogOutcomesRequest]:
        while (item := await self.queue.get()) is not None:
            yield item

    def send(self, batch: pb.LogOutcomesRequest) -> None:
        self.queue.put_nowait(batch)

    async def read(self) -> pb.LogOutcomesResponse:
        answer = await self.call.read()
        assert isinstance(answer, pb.LogOutcomesResponse), answer
        return answer


async def test_a_broken_stream_resent_from_its_acks_counts_every_row_once(
    service: ServiceProcess, stub: pb_grpc.ExperimentServiceStub
) -> None:
    key = f"stream-{uuid.uuid4().hex[:8]}"
    e = create_and_start(stub, revenue_test(key))
    uids = [f"u{i}" for i in range(20)]
    assert stub.LogExposures(pb.LogExposuresRequest(exposures=exposures(e, uids))).accepted == 20
    batches = [
        pb.LogOutcomesRequest(
            batch_id=f"b{b}", outcomes=[purchase(key, f"o{b}.{r}", uids[(b * 10 + r) % 20], b + r) for r in range(10)]
        )
        for b in range(10)
    ]
    expected = {arm.name: 0.0 for arm in e.arms}
    for batch in batches:
        for row in batch.outcomes:
            expected[e.arms[uids.index(row.unit_id) % 2].name] += row.value

    acked: dict[str, pb.LogOutcomesResponse] = {}
    async with grpc.aio.insecure_channel(service.address) as channel:
        first = Stream(channel)
        for batch in batches[:6]:
            first.send(batch)
        for _ in range(3):
            answer = await first.read()
            acked[answer.batch_id] = answer
        first.call.cancel()  # the client goes away with batches 3..5 sent and unanswered
    assert set(acked) == {"b0", "b1", "b2"}
    assert all(a.accepted == 10 and not a.rejections for a in acked.values())

    async with grpc.aio.insecure_channel(service.address) as channel:
        second = Stream(channel)
        pending = [b for b in batches if b.batch_id not in acked]
        for batch in pending:
            second.send(batch)
        for _ in pending:
            answer = await second.read()
            acked[answer.batch_id] = answer
        second.send(None)
        assert await second.call.code() == grpc.StatusCode.OK
    assert sorted(acked) == sorted(b.batch_id for b in batches)
    # Rows of the broken stream the service recorded come back as duplicates: none lost, none counted twice.
    assert sum(a.accepted + a.duplicates for a in acked.values()) == 100
    assert sum(a.accepted for a in acked.values()) <= 100
    assert revenue(stub, key) == {arm: (10, total) for arm, total in expected.items()}


def test_bad_rows_get_their_reason_and_the_rest_of_the_batch_is_recorded(stub: pb_grpc.ExperimentServiceStub) -> None:
    key = f"bad-{uuid.uuid4().hex[:8]}"
    e = create_and_start(stub, revenue_test(key))
    logged = stub.LogExposures(
        pb.LogExposuresRequest(exposures=[*exposures(e, ["u1", "u2"]), *exposures(revenue_test("nope"), ["u3"])])
    )
    assert (logged.accepted, [r.reason for r in logged.rejections]) == (2, [R.REJECTION_REASON_UNKNOWN_EXPERIMENT])
    rows = [
        purchase("nope", "o1", "u1", 1.0),
        purchase(key, "o2", "u1", 5.0, count=-1),
        purchase(key, "o3", "stranger", 5.0),
        purchase(key, "o4", "u1", 7.0),
        purchase(key, "o5", "u2", math.nan),
    ]
    second = pb.LogOutcomesRequest(batch_id="after", outcomes=[purchase(key, "o6", "u2", 3.0)])
    answers = list(stub.LogOutcomes(iter([pb.LogOutcomesRequest(batch_id="mixed", outcomes=rows), second])))
    assert [a.batch_id for a in answers] == ["mixed", "after"]
    mixed = answers[0]
    assert mixed.accepted == 1
    assert [(r.index, r.id, r.reason) for r in mixed.rejections] == [
        (0, "o1", R.REJECTION_REASON_UNKNOWN_EXPERIMENT),
        (1, "o2", R.REJECTION_REASON_NEGATIVE_COUNT),
        (2, "o3", R.REJECTION_REASON_UNIT_NOT_EXPOSED),
        (4, "o5", R.REJECTION_REASON_INVALID_VALUE),
    ]
    assert mixed.rejections[0].detail == "experiment_key: no experiment 'nope'"
    assert mixed.rejections[1].detail == "count: expected 0 (one) or more, got -1"
    assert answers[1].accepted == 1
    assert revenue(stub, key) == {"arm0": (1, 7.0), "arm1": (1, 3.0)}

    for call, request in (
        (stub.GetResults, pb.GetResultsRequest(key="nope")),
        (stub.GetResultsHistory, pb.GetResultsHistoryRequest(key="nope")),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(request)  # type: ignore[operator]
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "key: no experiment 'nope'" in (caught.value.details() or "")
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetResultsHistory(pb.GetResultsHistoryRequest(key=key, metric="ghost"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


texts = st.text(max_size=10) | st.sampled_from(["fuzz", "u1", "purchase", "arm0", ""])
outcome_rows = st.builds(
    apb.Outcome,
    outcome_id=texts,
    experiment_key=texts,
    unit_type=st.sampled_from(["user_id", ""]) | texts,
    unit_id=texts,
    event=texts,
    value=st.floats(),
    count=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    kind=st.integers(min_value=0, max_value=5),
)
exposure_rows = st.builds(
    apb.Exposure,
    exposure_id=texts,
    experiment_key=texts,
    phase=st.integers(min_value=-3, max_value=3),
    unit_type=texts,
    unit_id=texts,
    arm_name=texts,
    allocation=st.integers(min_value=-(2**31), max_value=2**31 - 1),
)


@pytest.fixture(scope="module")
def fuzz_experiment(stub: pb_grpc.ExperimentServiceStub) -> xpb.Experiment:
    return create_and_start(stub, revenue_test("fuzz"))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shown=st.lists(exposure_rows, max_size=4), batches=st.lists(st.lists(outcome_rows, max_size=5), max_size=3))
def test_fuzzed_rows_are_answered_and_never_fail_the_server(
    stub: pb_grpc.ExperimentServiceStub,
    fuzz_experiment: xpb.Experiment,
    shown: list[apb.Exposure],
    batches: list[list[apb.Outcome]],
) -> None:
    logged = stub.LogExposures(pb.LogExposuresRequest(exposures=shown))
    assert logged.accepted + logged.duplicates + len(logged.rejections) == len(shown)
    requests = [pb.LogOutcomesRequest(batch_id=str(i), outcomes=rows) for i, rows in enumerate(batches)]
    answers = list(stub.LogOutcomes(iter(requests)))
    assert [a.batch_id for a in answers] == [r.batch_id for r in requests]
    for answer, request in zip(answers, requests, strict=True):
        assert answer.accepted + answer.duplicates + len(answer.rejections) == len(request.outcomes)
        assert all(r.reason != R.REJECTION_REASON_UNSPECIFIED for r in answer.rejections)


def test_replicas_on_one_redis_add_up(tmp_path: Path, redis_server: RedisServer) -> None:
    shared = ["--database-url", f"sqlite:///{tmp_path / 'experiments.db'}", "--redis-url", redis_server.url]
    with (
        running(tmp_path / "one", *shared) as one,
        running(tmp_path / "two", *shared) as two,
        stub_for(one) as a,
        stub_for(two) as b,
    ):
        key = f"replicas-{uuid.uuid4().hex[:8]}"
        e = create_and_start(a, revenue_test(key))
        uids = [f"u{i}" for i in range(8)]
        rows = exposures(e, uids)
        assert a.LogExposures(pb.LogExposuresRequest(exposures=rows[:5])).accepted == 5
        assert b.LogExposures(pb.LogExposuresRequest(exposures=rows[3:])).accepted == 3  # 3, 4 seen by both
        outcomes = [purchase(key, f"o{i}", uids[i % 8], float(i)) for i in range(16)]
        first = list(a.LogOutcomes(iter([pb.LogOutcomesRequest(batch_id="a", outcomes=outcomes[:10])])))
        second = list(b.LogOutcomes(iter([pb.LogOutcomesRequest(batch_id="b", outcomes=outcomes[6:])])))
        assert (first[0].accepted, second[0].accepted, second[0].duplicates) == (10, 6, 4)
        expected = {"arm0": (4, float(sum(i for i in range(16) if i % 2 == 0))),
                    "arm1": (4, float(sum(i for i in range(16) if i % 2 == 1)))}  # fmt: skip
        assert revenue(a, key) == expected
        assert revenue(b, key) == expected
    assert not (tmp_path / "one" / "stats.db").exists()  # Redis held the statistics, not the state dir


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=texts,
    phase=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    metric=texts,
    action=st.integers(min_value=-3, max_value=2**31 - 1) | st.sampled_from([0, 1, 2, 3]),
    arm=texts,
    reason=texts,
    version=st.integers(min_value=-5, max_value=5),
)
def test_fuzzed_reads_and_decisions_get_a_clear_status(
    stub: pb_grpc.ExperimentServiceStub,
    fuzz_experiment: xpb.Experiment,
    key: str,
    phase: int,
    metric: str,
    action: int,
    arm: str,
    reason: str,
    version: int,
) -> None:
    calls = [
        lambda: stub.GetResults(pb.GetResultsRequest(key=key, phase=phase)),
        lambda: stub.GetResultsHistory(pb.GetResultsHistoryRequest(key=key, phase=phase, metric=metric)),
        # Drawing "fuzz" at its version with KEEP_CONTROL and a reason decides it: a valid answer too.
        lambda: stub.DecideExperiment(
            pb.DecideExperimentRequest(
                key=key,
                expected_version=version,
                action=action,
                arm=arm,
                reason=reason,  # type: ignore[arg-type]
            )
        ),
    ]
    for call in calls:
        assert outcome(call) in CALLER_ERRORS


def test_outcomes_sent_while_redis_is_down_are_refused_then_recorded_once(tmp_path: Path) -> None:
    redis = RedisServer(data_dir=tmp_path / "redis", appendonly=True).start()
    try:
        with running(tmp_path / "service", "--redis-url", redis.url) as service, stub_for(service) as stub:
            key = f"outage-{uuid.uuid4().hex[:8]}"
            e = create_and_start(stub, revenue_test(key))
            uids = ["u0", "u1", "u2", "u3"]
            assert stub.LogExposures(pb.LogExposuresRequest(exposures=exposures(e, uids))).accepted == 4
            before = pb.LogOutcomesRequest(batch_id="before", outcomes=[purchase(key, "a0", "u0", 2.0)])
            assert [a.accepted for a in stub.LogOutcomes(iter([before]))] == [1]

            redis.stop()  # a clean stop: the append-only file keeps everything acknowledged
            with socket.socket() as held:
                # Held bound, never listening, while Redis is down: connections are refused and no other process
                # can take the port; Redis binds beside it again (both SO_REUSEADDR).
                held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                held.bind((redis.host, redis.port))
                during = pb.LogOutcomesRequest(batch_id="during", outcomes=[purchase(key, "b1", "u1", 3.0)])
                with pytest.raises(grpc.RpcError) as caught:
                    list(stub.LogOutcomes(iter([during])))
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "stats redis" in (caught.value.details() or "")
                redis.start()

            answers = list(stub.LogOutcomes(iter([before, during])))  # the unanswered batch, and one answered
            assert [(a.batch_id, a.accepted, a.duplicates) for a in answers] == [("before", 0, 1), ("during", 1, 0)]
            assert revenue(stub, key) == {"arm0": (2, 2.0), "arm1": (2, 3.0)}
    finally:
        redis.close()


async def test_an_idle_outcome_stream_ends_unavailable_when_the_service_stops(tmp_path: Path) -> None:
    process = ServiceProcess("experiment_service", service_args(tmp_path)).start()
    try:
        process.wait_healthy(60)
        async with grpc.aio.insecure_channel(process.address) as channel:
            stream = Stream(channel)
            stream.send(pb.LogOutcomesRequest(batch_id="one", outcomes=[purchase("nope", "o1", "u1", 1.0)]))
            answer = await stream.read()
            assert (answer.batch_id, [r.reason for r in answer.rejections]) == (
                "one",
                [R.REJECTION_REASON_UNKNOWN_EXPERIMENT],
            )
            code = await asyncio.to_thread(process.stop)  # the client stays connected, sending nothing
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream.read()
    finally:
        process.stop()
    assert code == 0
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "experiment service is stopping: reconnect and resend" in (caught.value.details() or "")


def test_acknowledged_rows_survive_a_restart(tmp_path: Path) -> None:
    key = f"restart-{uuid.uuid4().hex[:8]}"
    with running(tmp_path) as service, stub_for(service) as stub:
        e = create_and_start(stub, revenue_test(key))
        assert stub.LogExposures(pb.LogExposuresRequest(exposures=exposures(e, ["u0", "u1"]))).accepted == 2
        batch = pb.LogOutcomesRequest(batch_id="b", outcomes=[purchase(key, "o0", "u0", 4.0)])
        assert [a.accepted for a in stub.LogOutcomes(iter([batch]))] == [1]
        before = revenue(stub, key)
    with running(tmp_path) as service, stub_for(service) as stub:
        assert revenue(stub, key) == before == {"arm0": (1, 4.0), "arm1": (1, 0.0)}
        assert [a.duplicates for a in stub.LogOutcomes(iter([batch]))] == [1]
        history = stub.GetResultsHistory(pb.GetResultsHistoryRequest(key=key)).points
        assert history == []  # one unit per arm: no lift to draw yet, but no failure either
