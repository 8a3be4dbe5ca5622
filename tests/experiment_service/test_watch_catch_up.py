"""A gateway holding a revision from before the service's registry (its database restored or started afresh) is
brought onto the registry's configuration: it never takes a snapshot at a revision below the one it holds, so the
service moves its revision past the gateway's."""

from __future__ import annotations

from pathlib import Path

import pytest

from fresco.api.experiments.v1 import assignment_pb2 as apb
from fresco.experiments.evaluator import Evaluator, config_of
from gateway.experiment_watch import apply
from tests.experiment_service.service_support import Gateway, create_and_start, experiment, running, stub_for

pytestmark = pytest.mark.integration


def test_a_gateway_ahead_of_a_fresh_registry_gets_a_snapshot_it_can_apply(tmp_path: Path) -> None:
    # What the gateway kept from the registry it watched before: revision 7, an experiment the new one lacks.
    gone = experiment("gone")
    gone.phases.add(number=1)
    held = Evaluator(apb.AssignmentConfig(revision=7, experiments=[config_of(gone)]))
    with running(tmp_path / "fresh") as process, stub_for(process) as stub:
        create_and_start(stub, experiment("exp-new"))  # revision 1 of the fresh registry
        gateway = Gateway(stub, "gw-old", resume=held.revision)
        try:
            response = gateway.next()
            applied = apply(held, response)  # what the gateway does with it: refused below its revision
            assert applied.keys() == ["exp-new"]
            assert applied.revision > held.revision
            gateway.ack(applied.revision)
        finally:
            gateway.close()
        later = Gateway(stub, "gw-later", resume=applied.revision)  # the revision is the registry's from now on
        try:
            update = later.next().update
            assert (update.base_revision, update.revision) == (applied.revision, applied.revision)
        finally:
            later.close()
