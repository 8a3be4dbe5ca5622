"""The gateway's side of WatchExperiments (a `StreamWatcher`): the slim assignment configuration kept
current from the experiment service as an immutable `Evaluator`, acked per revision (an update at
another base revision is rejected, and the service answers with a snapshot), and kept in the state
directory, so a restarted gateway assigns before the service answers and while it is down."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

from grpc import aio

from chassis.errors import InvalidArgument
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc
from fresco.experiments.assignment import BUCKETS, arm_bounds
from fresco.experiments.evaluator import Evaluator
from fresco.experiments.targeting import problems as targeting_problems
from gateway.watch_stream import Resync, StreamWatcher, read_saved, save_atomically

log = logging.getLogger(__name__)
STATE_FILE: Final = "experiments.pb"


def config_problems(config: apb.AssignmentConfig, field: str = "snapshot") -> list[str]:
    """What makes a configuration unusable for assigning, one message per problem naming the field."""
    found: list[str] = []
    seen: set[str] = set()
    for index, experiment in enumerate(config.experiments):
        where = f"{field}.experiments[{experiment.key or index}]"
        if not experiment.key:
            found.append(f"{where}.key: expected the experiment key, got an empty string")
        elif experiment.key in seen:
            found.append(f"{where}.key: the experiment is listed twice")
        seen.add(experiment.key)
        if not experiment.unit_type:
            found.append(f"{where}.unit_type: expected the unit type hashed, got an empty string")
        if not experiment.salt:
            found.append(f"{where}.salt: expected a non-empty salt, got an empty string")
        if not 0.0 <= experiment.coverage <= 1.0:
            found.append(f"{where}.coverage: expected a fraction in [0, 1], got {experiment.coverage}")
        names = [arm.name for arm in experiment.arms]
        if any(not name for name in names) or len(set(names)) != len(names):
            found.append(f"{where}.arms: expected distinct non-empty arm names, got {names}")
        try:
            arm_bounds([arm.weight for arm in experiment.arms])
        except ValueError as err:
            found.append(f"{where}.arms.{err}")
        namespace = experiment.namespace
        if experiment.HasField("namespace") and namespace.id and not 0 <= namespace.start < namespace.end <= BUCKETS:
            found.append(
                f"{where}.namespace: expected 0 <= start < end <= {BUCKETS}, got [{namespace.start}, {namespace.end})"
            )
        found.extend(targeting_problems(experiment.targeting, f"{where}.targeting"))
    return found


def evaluator_of(config: apb.AssignmentConfig, field: str = "snapshot") -> Evaluator:
    """An evaluator over a checked configuration; InvalidArgument naming every problem otherwise."""
    found = config_problems(config, field)
    if found:
        raise InvalidArgument("; ".join(found))
    return Evaluator(config)


def apply(evaluator: Evaluator | None, response: pb.WatchExperimentsResponse) -> Evaluator:
    """The evaluator after one stream message; InvalidArgument says why it is refused."""
    kind = response.WhichOneof("kind")
    if kind == "snapshot":
        snapshot = response.snapshot
        if evaluator is not None and snapshot.revision < evaluator.revision:
            raise InvalidArgument(
                f"snapshot.revision: expected at least the held revision {evaluator.revision}, got {snapshot.revision}"
            )
        return evaluator_of(snapshot)
    if kind == "update":
        update = response.update
        if evaluator is None or update.base_revision != evaluator.revision:
            held = f"the held revision {evaluator.revision}" if evaluator is not None else "a held configuration"
            raise Resync(f"update.base_revision: expected {held}, got {update.base_revision}")
        if update.revision == update.base_revision and not update.upserted and not update.removed_keys:
            return evaluator  # the revision held is current (a resumed stream with nothing new)
        if update.revision <= update.base_revision:
            raise InvalidArgument(
                f"update.revision: expected more than the base revision {update.base_revision}, got {update.revision}"
            )
        experiments = {e.key: e for e in evaluator.config.experiments}
        for key in update.removed_keys:
            if experiments.pop(key, None) is None:
                raise InvalidArgument(f"update.removed_keys: experiment {key!r} is not in the held configuration")
        for experiment in update.upserted:
            experiments[experiment.key] = experiment
        config = apb.AssignmentConfig(
            revision=update.revision, experiments=[experiments[key] for key in sorted(experiments)]
        )
        config.generated_at.CopyFrom(evaluator.config.generated_at)
        return evaluator_of(config, "update")
    raise InvalidArgument("kind: expected a snapshot or an update, got an empty message")


def save_config(state_dir: Path, evaluator: Evaluator) -> None:
    """Keep the configuration in the state directory, atomically."""
    save_atomically(state_dir, STATE_FILE, evaluator.config.SerializeToString())


def load_config(state_dir: Path) -> tuple[Evaluator, float] | None:
    """The configuration kept in the state directory and when it was saved, if any is readable and valid."""
    saved = read_saved(state_dir, STATE_FILE)
    if saved is None:
        return None
    data, saved_at = saved
    try:
        return evaluator_of(apb.AssignmentConfig.FromString(data), str(state_dir / STATE_FILE)), saved_at
    except Exception as err:  # noqa: BLE001 (a damaged file must not stop the gateway: the service sends a snapshot)
        log.warning("ignoring unreadable experiment configuration %s: %s", state_dir / STATE_FILE, err)
        return None


class ExperimentWatcher(StreamWatcher[Evaluator]):
    """Keeps `evaluator` current from the experiment service's configuration stream."""

    kind = "experiment_config"

    @property
    def evaluator(self) -> Evaluator | None:
        """The evaluator in use; None before any configuration."""
        return self.current

    def revision_of(self, state: Evaluator) -> int:
        return state.revision

    def apply(self, state: Evaluator | None, response: Any) -> Evaluator:
        return apply(state, response)

    def open(self, channel: aio.Channel) -> Any:
        stub: pb_grpc.ExperimentServiceAsyncStub = pb_grpc.ExperimentServiceStub(channel)
        return stub.WatchExperiments()

    def subscribe(self, revision: int) -> pb.WatchExperimentsRequest:
        subscription = apb.ConfigSubscription(gateway_id=self.gateway_id, resume_from_revision=revision)
        return pb.WatchExperimentsRequest(subscribe=subscription)

    def ack(self, revision: int, accepted: bool, error: str = "") -> pb.WatchExperimentsRequest:
        return pb.WatchExperimentsRequest(ack=apb.ConfigAck(revision=revision, accepted=accepted, error=error))

    def save(self, state_dir: Path, state: Evaluator) -> None:
        save_config(state_dir, state)

    def load(self, state_dir: Path) -> tuple[Evaluator, float] | None:
        return load_config(state_dir)
