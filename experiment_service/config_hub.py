"""The assignment configuration gateways watch: a `chassis.revision_hub.RevisionHub` of AssignmentConfig, and the
WatchExperiments messages that carry it (a snapshot, or an update from a base revision)."""

from __future__ import annotations

from chassis.revision_hub import RevisionHub
from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.api.experiments.v1 import experiment_service_pb2 as pb


class ConfigError(ValueError):
    """A configuration published out of order (a bug, not a caller's mistake)."""


class ConfigHub(RevisionHub[apb.AssignmentConfig]):
    """Publishes assignment configurations to watching gateways and tracks their acknowledgements."""

    error = ConfigError

    def __init__(self) -> None:
        super().__init__(apb.AssignmentConfig(revision=0))


def snapshot(config: apb.AssignmentConfig) -> pb.WatchExperimentsResponse:
    """The whole configuration: it replaces what the gateway holds."""
    return pb.WatchExperimentsResponse(snapshot=config)


def update(base: apb.AssignmentConfig, config: apb.AssignmentConfig) -> pb.WatchExperimentsResponse:
    """What turns `base` into `config`: the experiments added or changed, whole, and the keys gone."""
    before = {e.key: e for e in base.experiments}
    after = {e.key: e for e in config.experiments}
    message = apb.ExperimentConfigUpdate(
        revision=config.revision,
        base_revision=base.revision,
        upserted=[e for key, e in after.items() if before.get(key) != e],
        removed_keys=sorted(set(before) - set(after)),
    )
    return pb.WatchExperimentsResponse(update=message)
