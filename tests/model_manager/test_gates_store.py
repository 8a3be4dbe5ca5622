"""What promotions persist, on SQLite and on a real PostgreSQL: operations, and gate results written with the
stage change they decided (its audit record carrying the promotion's details)."""

from __future__ import annotations

import pytest

from chassis.errors import InvalidArgument, NotFound
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.gate_results import check
from model_manager.lifecycle import Stage
from model_manager.operations import OperationStore, touch
from model_manager.registry import Registry
from tests.model_manager.registry_support import (
    artifact,
    database_url,
    model_spec,
    postgres_server,
    registry,
    version_spec,
)

__all__ = ["database_url", "postgres_server", "registry"]


def test_gate_results_are_stored_with_the_stage_change_and_audited(registry: Registry) -> None:
    registry.create_model(model_spec("churn"), "ana")
    content = b"onnx bytes"
    registry.register_version(version_spec("churn", content), artifact(content), "ana")
    assert registry.get_version("churn", 1).gate_results == ()
    registry.set_stage("churn", 1, Stage.VALIDATING, "ana", "nightly", {"operation_id": "op1"})
    results = [
        check("schema.artifact", rpb.GATE_TYPE_SCHEMA, True, "loads"),
        check("backtest.auc.min_value", rpb.GATE_TYPE_BACKTEST, False, "auc 0.61 < min_value 0.8", 0.61, 0.8),
    ]
    details = {"operation_id": "op1", "failed_gates": "backtest.auc.min_value", "forced": "true"}
    moved = registry.set_stage("churn", 1, Stage.CANDIDATE, "ana", "accepted risk", details, results)
    assert list(moved.gate_results) == results
    assert list(registry.get_version("churn", 1).gate_results) == results
    latest = registry.list_audit("churn").items[0]
    assert (latest.identity, latest.reason) == ("ana", "accepted risk")
    assert latest.details == {**details, "from": "validating", "to": "candidate"}
    # A later stage change without results keeps the ones the gates wrote.
    registry.set_stage("churn", 1, Stage.PRODUCTION, "ana")
    assert [r.name for r in registry.get_version("churn", 1).gate_results] == [r.name for r in results]


def test_operations_are_stored_updated_and_listed_while_unfinished(registry: Registry) -> None:
    store = OperationStore(registry.engine)
    operation = rpb.Operation(operation_id="a" * 32, kind="promote", model_name="churn", version=3)
    operation.state = rpb.OPERATION_STATE_RUNNING
    touch(operation)
    operation.created_at.CopyFrom(operation.updated_at)
    store.insert(operation)
    assert store.get("a" * 32) == operation
    assert [o.operation_id for o in store.unfinished()] == ["a" * 32]
    operation.done = True
    operation.state = rpb.OPERATION_STATE_SUCCEEDED
    operation.gate_results.add(name="latency.p99", passed=True, measured_value=4.2)
    store.update(operation)
    assert store.get("a" * 32) == operation
    assert store.unfinished() == []
    with pytest.raises(NotFound, match="operation_id: no operation 'b'"):
        store.get("b")
    with pytest.raises(InvalidArgument, match="operation_id: expected an operation id"):
        store.get("")
