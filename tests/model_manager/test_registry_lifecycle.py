"""Gate stages, aliases and the audit log of the registry, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import itertools

import pytest

from chassis.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from model_manager.lifecycle import TRANSITIONS, Stage, allowed, check_transition
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

HAPPY_PATH = [Stage.VALIDATING, Stage.CANDIDATE, Stage.PRODUCTION]


def _with_versions(registry: Registry, count: int) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    for i in range(count):
        registry.register_version(version_spec("churn", bytes([i])), artifact(bytes([i])), identity="ci")


@pytest.mark.parametrize(("source", "target"), list(itertools.product(Stage, Stage)))
def test_the_state_machine_allows_exactly_its_table(source: Stage, target: Stage) -> None:
    if target in TRANSITIONS[source]:
        check_transition("v1", source, target)
        assert allowed(source, target)
    else:
        with pytest.raises(FailedPrecondition, match=f"stage: v1 is {source.value}; .* not {target.value}"):
            check_transition("v1", source, target)


def test_the_gate_path_leads_to_production_and_archives_the_previous(registry: Registry) -> None:
    _with_versions(registry, 2)
    for stage in HAPPY_PATH:
        assert registry.set_stage("churn", 1, stage, identity="gatekeeper", reason="gates passed").stage is stage
    assert registry.get_model("churn").production_version == 1
    for stage in HAPPY_PATH:
        registry.set_stage("churn", 2, stage, identity="gatekeeper")
    assert registry.get_version("churn", 1).stage is Stage.ARCHIVED
    assert registry.get_version("churn", 2).stage is Stage.PRODUCTION
    assert registry.get_model("churn").production_version == 2
    superseded = [e for e in registry.list_audit("churn").items if e.version == 1 and e.details.get("superseded_by")]
    assert [(e.details["from"], e.details["to"], e.details["superseded_by"]) for e in superseded] == [
        ("production", "archived", "2")
    ]
    registry.set_stage("churn", 2, Stage.ARCHIVED, identity="ops")
    assert registry.get_model("churn").production_version == 0


def test_a_move_the_machine_forbids_is_refused_and_changes_nothing(registry: Registry) -> None:
    _with_versions(registry, 1)
    before = registry.get_version("churn", 1)
    with pytest.raises(FailedPrecondition, match=r"from registered it can move to validating or rejected or archived"):
        registry.set_stage("churn", 1, Stage.PRODUCTION, identity="mallory")
    assert registry.get_version("churn", 1) == before
    assert registry.get_model("churn").production_version == 0
    assert [e.action for e in registry.list_audit("churn").items] == ["version.register", "model.create"]
    with pytest.raises(NotFound, match=r"churn has no version 9"):
        registry.set_stage("churn", 9, Stage.VALIDATING, identity="ops")


def test_aliases_point_move_resolve_and_go(registry: Registry) -> None:
    _with_versions(registry, 2)
    model, previous = registry.set_alias("churn", "champion", 1, identity="alice", reason="best auc")
    assert (dict(model.aliases), previous) == ({"champion": 1}, 0)
    assert registry.get_version("churn", alias="champion").version == 1
    assert registry.get_version("churn", 1).aliases == ("champion",)
    model, previous = registry.set_alias("churn", "champion", 2, identity="bob")
    assert (dict(model.aliases), previous) == ({"champion": 2}, 1)
    registry.set_alias("churn", "challenger", 2, identity="bob")
    assert registry.get_version("churn", 2).aliases == ("challenger", "champion")
    assert registry.get_version("churn", 1).aliases == ()
    model, previous = registry.delete_alias("churn", "champion", identity="carol")
    assert (dict(model.aliases), previous) == ({"challenger": 2}, 2)
    with pytest.raises(NotFound, match=r"alias: churn has no alias 'champion'"):
        registry.get_version("churn", alias="champion")
    with pytest.raises(NotFound, match=r"alias: churn has no alias 'champion'"):
        registry.delete_alias("churn", "champion", identity="carol")


def test_an_alias_refuses_bad_names_unknown_and_rejected_versions(registry: Registry) -> None:
    _with_versions(registry, 1)
    for bad in ("", "Champion", "1st", "a b", "x" * 64):
        with pytest.raises(InvalidArgument, match=r"alias: expected an alias"):
            registry.set_alias("churn", bad, 1, identity="alice")
    with pytest.raises(NotFound, match=r"version: churn has no version 5"):
        registry.set_alias("churn", "champion", 5, identity="alice")
    with pytest.raises(InvalidArgument, match=r"version: expected a version number 1 or more"):
        registry.set_alias("churn", "champion", 0, identity="alice")
    registry.set_stage("churn", 1, Stage.REJECTED, identity="gate")
    with pytest.raises(FailedPrecondition, match=r"rejected by its gates"):
        registry.set_alias("churn", "champion", 1, identity="alice")
    assert dict(registry.get_model("churn").aliases) == {}


def test_every_change_is_audited_with_who_what_and_why(registry: Registry) -> None:
    _with_versions(registry, 1)
    registry.set_stage("churn", 1, Stage.VALIDATING, identity="gatekeeper", reason="gates started")
    registry.set_alias("churn", "champion", 1, identity="alice", reason="promote")
    registry.delete_alias("churn", "champion", identity="bob", reason="oops")
    entries = registry.list_audit("churn").items
    assert [(e.action, e.identity, e.version, e.reason) for e in entries] == [
        ("alias.delete", "bob", 1, "oops"),
        ("alias.set", "alice", 1, "promote"),
        ("version.stage", "gatekeeper", 1, "gates started"),
        ("version.register", "ci", 1, ""),
        ("model.create", "alice", 0, ""),
    ]
    assert dict(entries[1].details) == {"alias": "champion", "from": "0", "to": "1"}
    assert dict(entries[2].details) == {"from": "registered", "to": "validating"}
    assert entries[3].details["sha256"] == artifact(bytes([0])).sha256
    assert [e.id for e in entries] == sorted((e.id for e in entries), reverse=True)
    assert all(later.at_us >= earlier.at_us for later, earlier in itertools.pairwise(entries))


def test_the_audit_log_pages_and_filters_by_model(registry: Registry) -> None:
    registry.create_model(model_spec("a"), identity="alice")
    registry.create_model(model_spec("b"), identity="bob")
    for i in range(3):
        registry.register_version(version_spec("a", bytes([i])), artifact(bytes([i])), identity="ci")
    assert [e.identity for e in registry.list_audit("b").items] == ["bob"]
    ids, token = [], ""
    while True:
        page = registry.list_audit(page_size=2, page_token=token)
        ids += [e.id for e in page.items]
        token = page.next_page_token
        if not token:
            break
    assert len(ids) == 5
    assert ids == sorted(ids, reverse=True)


def test_a_failed_write_leaves_no_audit_record(registry: Registry) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    with pytest.raises(AlreadyExists):
        registry.create_model(model_spec("churn"), identity="mallory")
    with pytest.raises(NotFound):
        registry.set_alias("churn", "champion", 1, identity="mallory")
    assert [e.identity for e in registry.list_audit().items] == ["alice"]
