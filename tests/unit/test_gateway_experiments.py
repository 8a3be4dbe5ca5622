"""The gateway's experiment configuration (snapshots, updates at their base revision, refusals naming the
field, the copy kept in the state directory) and its exposure log (once per exposure id, a bounded queue
whose drops are counted, nothing lost while the experiment service is down)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from grpc import aio
from prometheus_client import CollectorRegistry

from chassis.errors import InvalidArgument
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_pb2 as xpb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.experiments.evaluator import Assigned, Evaluator
from fresco.experiments.exposure import exposure_id
from gateway.experiment_arms import ExperimentArms
from gateway.experiment_watch import STATE_FILE, apply, evaluator_of, load_config, save_config
from gateway.exposures import PENDING_FILE, ExposureLog
from gateway.watch_stream import Resync
from model_manager.routes import Endpoint, ModelRoute, RouteTable, VersionRoute


def experiment(key: str, *versions: int, salt: str = "") -> apb.ExperimentConfig:
    arms = [xpb.Arm(name=f"arm{v}", weight=1.0, model_version=v) for v in versions or (1, 2)]
    return apb.ExperimentConfig(
        key=key, version=1, phase=1, model_name="m", unit_type="user_id", salt=salt or key, coverage=1.0, arms=arms
    )


def snapshot(revision: int, *experiments: apb.ExperimentConfig) -> pb.WatchExperimentsResponse:
    return pb.WatchExperimentsResponse(snapshot=apb.AssignmentConfig(revision=revision, experiments=experiments))


def update(
    revision: int, base: int, *upserted: apb.ExperimentConfig, removed: tuple[str, ...] = ()
) -> pb.WatchExperimentsResponse:
    message = apb.ExperimentConfigUpdate(revision=revision, base_revision=base, upserted=upserted, removed_keys=removed)
    return pb.WatchExperimentsResponse(update=message)


def test_a_snapshot_replaces_and_updates_apply_at_their_base_revision() -> None:
    held = apply(None, snapshot(3, experiment("a"), experiment("b")))
    assert (held.revision, held.keys()) == (3, ["a", "b"])
    held = apply(held, update(4, 3, experiment("c", 5, 6), removed=("a",)))
    assert (held.revision, held.keys()) == (4, ["b", "c"])
    arm = held.arm("c", "arm6")
    assert arm is not None
    assert arm.model_version == 6
    replaced = apply(held, update(5, 4, experiment("b", 7)))
    assert [a.name for a in replaced.config.experiments[0].arms] == ["arm7"]
    assert apply(replaced, update(5, 5)) is replaced, "a resumed stream with nothing new: the held revision is current"
    assert apply(replaced, snapshot(9, experiment("z"))).keys() == ["z"]


def test_an_update_at_another_base_revision_is_refused_for_a_resubscription() -> None:
    held = apply(None, snapshot(3, experiment("a")))
    with pytest.raises(Resync, match=r"update.base_revision: expected the held revision 3, got 2"):
        apply(held, update(4, 2, experiment("b")))
    with pytest.raises(Resync, match=r"update.base_revision: expected a held configuration, got 0"):
        apply(None, update(1, 0, experiment("b")))


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (snapshot(2, experiment("a")), r"snapshot.revision: expected at least the held revision 3, got 2"),
        (update(4, 3, removed=("nope",)), r"update.removed_keys: experiment 'nope' is not in the held configuration"),
        (update(3, 3, experiment("b")), r"update.revision: expected more than the base revision 3, got 3"),
        (snapshot(5, apb.ExperimentConfig(key="x", unit_type="user_id", salt="x", coverage=1.0)),
         r"snapshot.experiments\[x\].arms.weights: expected at least one arm"),
        (snapshot(5, experiment("a"), experiment("a")),
         r"snapshot.experiments\[a\].key: the experiment is listed twice"),
        (update(4, 3, apb.ExperimentConfig(key="y", salt="y", coverage=1.5, arms=[xpb.Arm(name="a", weight=1)])),
         r"update.experiments\[y\].unit_type: .*; update.experiments\[y\].coverage: expected a fraction in \[0, 1\], "
         r"got 1.5"),
        (pb.WatchExperimentsResponse(), r"kind: expected a snapshot or an update"),
    ],
)  # fmt: skip
def test_a_bad_message_is_refused_naming_the_field(message: pb.WatchExperimentsResponse, error: str) -> None:
    held = apply(None, snapshot(3, experiment("a")))
    with pytest.raises(InvalidArgument, match=error) as refused:
        apply(held, message)
    assert not isinstance(refused.value, Resync), "a bad message is refused, not resynchronised"


def test_the_configuration_kept_in_the_state_dir_is_read_back(tmp_path: Path) -> None:
    assert load_config(tmp_path) is None
    held = evaluator_of(apb.AssignmentConfig(revision=8, experiments=[experiment("a")]))
    save_config(tmp_path, held)
    loaded = load_config(tmp_path)
    assert loaded is not None
    assert loaded[0].revision == 8
    assert loaded[0].config == held.config
    (tmp_path / STATE_FILE).write_bytes(b"\xff not a configuration")
    assert load_config(tmp_path) is None, "a damaged file is ignored: the service sends a snapshot"


def assigned(unit: str, arm: str = "arm1", key: str = "a") -> Assigned:
    return Assigned(key, 1, 2, apb.ASSIGNMENT_REASON_ASSIGNED, "user_id", unit, arm, model_version=1, allocation=1)


def closed_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_each_exposure_is_queued_once_and_a_full_queue_drops_and_counts() -> None:
    registry = CollectorRegistry()
    log = ExposureLog(aio.insecure_channel, closed_address(), "gw-1", registry, queue_size=3)
    assert log.offer(assigned("u1"), at_ns=5_000_000_000)
    assert not log.offer(assigned("u1")), "the same (experiment, phase, unit, arm) is queued once"
    assert log.offer(assigned("u1", arm="arm2"))
    assert log.offer(assigned("u2"))
    assert not log.offer(assigned("u3"))
    assert not log.offer(assigned("u4"))
    assert (log.queued(), log.dropped_total) == (3, 2)
    assert registry.get_sample_value("fresco_gateway_exposures_dropped_total", {"reason": "queue_full"}) == 2
    assert registry.get_sample_value("fresco_gateway_exposures_queued") == 3
    # A dropped exposure is not remembered: the unit's next answered request offers it again.
    assert not log.offer(assigned("u3"))
    assert log.dropped_total == 3
    first = log._queue[0]
    assert first.exposure_id == exposure_id("a", 2, "user_id", "u1", "arm1")
    assert (first.source, first.exposed_at.ToNanoseconds(), first.allocation) == ("gw-1", 5_000_000_000, 1)


async def test_exposures_stay_queued_while_the_service_is_down() -> None:
    registry = CollectorRegistry()
    log = ExposureLog(aio.insecure_channel, closed_address(), "gw-1", registry, backoff_s=(0.01, 0.05))
    for unit in ("u1", "u2", "u3"):
        log.offer(assigned(unit))
    log.start()
    try:
        # The sender tries (and fails) several times; every exposure is still there to be sent.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while log.failed_attempts < 3:
            assert loop.time() < deadline, "the sender never retried"
            await asyncio.sleep(0.02)
        assert log.queued() == 3
        assert log.dropped_total == 0
        assert log.sent_total == 0
    finally:
        await log.close()
    assert log.queued() == 3, "nothing is dropped at stop either: the last attempt failed"


async def test_exposures_unsent_at_stop_are_kept_and_queued_again_at_the_next_start(tmp_path: Path) -> None:
    address = closed_address()
    first = ExposureLog(aio.insecure_channel, address, "gw-1", CollectorRegistry(), backoff_s=(0.01, 0.05),
                        state_dir=tmp_path)  # fmt: skip
    for unit in ("u1", "u2", "u3"):
        first.offer(assigned(unit), at_ns=7_000_000_000)
    first.start()
    await first.close()  # the service is down: the last attempt fails
    assert (tmp_path / PENDING_FILE).is_file()

    registry = CollectorRegistry()
    again = ExposureLog(aio.insecure_channel, address, "gw-1", registry, queue_size=2, backoff_s=(0.01, 0.05),
                        state_dir=tmp_path)  # fmt: skip
    again.start()
    try:
        assert again.queued() == 2, "queued again, as far as the queue has room"
        assert again.dropped_total == 1
        assert registry.get_sample_value("fresco_gateway_exposures_dropped_total", {"reason": "queue_full"}) == 1
        kept = list(again._queue)
        assert [e.unit_id for e in kept] == ["u1", "u2"]
        assert {e.exposed_at.ToNanoseconds() for e in kept} == {7_000_000_000}, "stamped when they happened"
        assert kept[0].exposure_id == exposure_id("a", 2, "user_id", "u1", "arm1")
        assert not (tmp_path / PENDING_FILE).exists(), "taken back: a second start does not queue them twice"
    finally:
        await again.close()
    assert (tmp_path / PENDING_FILE).is_file(), "still unsent at this stop: kept again"


def test_an_empty_configuration_assigns_no_one() -> None:
    held = apply(None, snapshot(1))
    assert isinstance(held, Evaluator)
    assert not held.assign({"user_id": "u"}, {}, "m")


def test_an_arm_is_exposed_only_when_its_version_answered() -> None:
    registry = CollectorRegistry()
    log = ExposureLog(aio.insecure_channel, closed_address(), "gw-1", registry)
    arms = ExperimentArms(lambda: None, registry, exposures=log)
    endpoint = Endpoint("127.0.0.1", 9)
    route = ModelRoute("m", (VersionRoute("1", 100, (endpoint,)), VersionRoute("2", 0, (endpoint,))), "seed")
    table = RouteTable(1, (route,))
    versioned, parameters = assigned("u1", "arm2"), replace(assigned("u2", "p"), model_version=0)
    versioned = replace(versioned, model_version=2)
    assert arms.routed_version(table, "m", [parameters, versioned]) == "2", "the first arm with a version routes"
    assert arms.routed_version(table, "m", [replace(versioned, model_version=3)]) == "", "not in the route"
    assert arms.routed_version(None, "m", [versioned]) == "", "no managed route"

    def exposed(routed: str, answered: str, fallback: bool = False) -> list[bool]:
        return [r.exposed for r in arms.results([versioned, parameters], routed, answered, fallback)]

    assert exposed("2", "2") == [True, True]
    assert exposed("2", "1", fallback=True) == [False, False], "a fallback is not an exposure"
    assert exposed("2", "") == [False, False], "nor is the static answer"
    assert exposed("", "1") == [False, True], "an unroutable arm is not exposed; parameters are, by any answer"
    assert registry.get_sample_value("fresco_gateway_experiment_unroutable_total", {"experiment": "a"}) == 1
    assert log.queued() == 2, "each exposure queued once"
