"""A model's fallback version and static answer in the registry, on SQLite and on PostgreSQL: stored, changed
through `update_model` with an audit record, and refused with the field named."""

from __future__ import annotations

import pytest

from chassis.errors import FailedPrecondition, InvalidArgument, NotFound
from fresco.api.common.v1 import values_pb2
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.lifecycle import Stage
from model_manager.model_serving import ModelUpdate
from model_manager.records import ModelSpec, VersionSpec
from model_manager.registry import Registry
from tests.model_manager.registry_support import (
    artifact,
    database_url,
    postgres_server,
    registry,
    signature,
)

__all__ = ["database_url", "postgres_server", "registry"]

STATIC = rpb.StaticFallback(
    outputs={"probability": values_pb2.Value(double_list=values_pb2.DoubleList(values=[0.9, 0.1]))}
)


def with_versions(registry: Registry, name: str, count: int) -> None:
    registry.create_model(ModelSpec(name=name, owner="risk", signature=signature(), static_fallback=STATIC), "alice")
    for v in range(1, count + 1):
        content = f"{name}-{v}".encode()
        spec = VersionSpec(model_name=name, format="onnx", expected_sha256=artifact(content).sha256)
        registry.register_version(spec, artifact(content), "alice")


def test_the_static_answer_and_fallback_version_are_stored_and_audited(registry: Registry) -> None:
    with_versions(registry, "churn", 2)
    assert registry.get_model("churn").static_fallback == STATIC
    assert registry.get_model("churn").fallback_version == 0
    changed = registry.update_model(
        "churn", ModelUpdate(frozenset({"fallback_version"}), fallback_version=2), "bob", "v2 as the safety net"
    )
    assert changed.fallback_version == 2
    assert changed.static_fallback == STATIC, "not in the mask: kept"
    listed = registry.list_models(10, "").items
    assert [(m.name, m.fallback_version, m.static_fallback) for m in listed] == [("churn", 2, STATIC)]
    cleared = registry.update_model("churn", ModelUpdate(frozenset({"static_fallback"})), "bob")
    assert cleared.static_fallback == rpb.StaticFallback()
    assert cleared.fallback_version == 2
    updates = [a for a in registry.list_audit("churn").items if a.action == "model.update"]
    assert [(a.identity, a.details) for a in reversed(updates)] == [
        ("bob", {"fallback_version": "2"}),
        ("bob", {"static_fallback": "none"}),
    ]
    assert updates[-1].reason == "v2 as the safety net"


def test_bad_fallbacks_are_refused_and_change_nothing(registry: Registry) -> None:
    with_versions(registry, "fraud", 1)
    for stage in (Stage.VALIDATING, Stage.REJECTED):
        registry.set_stage("fraud", 1, stage, "alice")
    with pytest.raises(FailedPrecondition, match=r"model.fallback_version: version 1 of fraud was rejected"):
        registry.update_model("fraud", ModelUpdate(frozenset({"fallback_version"}), fallback_version=1), "bob")
    with pytest.raises(NotFound, match=r"model.fallback_version"):
        registry.update_model("fraud", ModelUpdate(frozenset({"fallback_version"}), fallback_version=7), "bob")
    with pytest.raises(NotFound, match=r"model.name"):
        registry.update_model("nobody", ModelUpdate(frozenset({"owner"}), owner="x"), "bob")
    with pytest.raises(InvalidArgument, match=r"update_mask"):
        registry.update_model("fraud", ModelUpdate(frozenset({"signature"})), "bob")
    mixed = rpb.StaticFallback(outputs={"probability": values_pb2.Value()})
    with pytest.raises(InvalidArgument, match=r"model.static_fallback.outputs\[probability\]"):
        registry.update_model("fraud", ModelUpdate(frozenset({"static_fallback"}), static_fallback=mixed), "bob")
    model = registry.get_model("fraud")
    assert (model.fallback_version, model.static_fallback) == (0, STATIC)
