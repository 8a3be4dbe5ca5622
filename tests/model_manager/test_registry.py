"""The registry domain on SQLite and on a real PostgreSQL: models, immutable versions, pagination, concurrency."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import pytest

from chassis.errors import AlreadyExists, FrescoError, InvalidArgument, NotFound, Unavailable
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.servers import PostgresServer
from fresco.servers._process import free_port
from model_manager import pages
from model_manager.lifecycle import Stage
from model_manager.records import Lineage
from model_manager.registry import Registry
from tests.model_manager.registry_support import (
    artifact,
    database_url,
    model_spec,
    postgres_server,
    registry,
    report,
    signature,
    statistics,
    version_spec,
)

__all__ = ["database_url", "postgres_server", "registry"]
T = TypeVar("T")


def test_created_model_reads_back_with_its_creator(registry: Registry) -> None:
    created = registry.create_model(model_spec("churn"), identity="alice", reason="new use case")
    assert created == registry.get_model("churn")
    assert (created.owner, created.description, dict(created.labels)) == (
        "risk-team",
        "who leaves next month",
        {"team": "risk"},
    )
    assert created.signature == signature()
    assert (created.latest_version, created.production_version, dict(created.aliases)) == (0, 0, {})
    assert created.created_by == "alice"


def test_a_taken_model_name_is_already_exists(registry: Registry) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    with pytest.raises(AlreadyExists, match=r"model.name: a model named 'churn' exists already"):
        registry.create_model(model_spec("churn", owner="someone else"), identity="bob")
    assert registry.get_model("churn").owner == "risk-team"


@pytest.mark.parametrize(
    ("spec_overrides", "field"),
    [
        ({"name": ""}, "model.name"),
        ({"name": "has space"}, "model.name"),
        ({"name": "x" * 129}, "model.name"),
        ({"owner": "o" * 257}, "model.owner"),
        ({"labels": {"bad key!": "v"}}, "model.labels"),
        ({"signature": rpb.ModelSignature(inputs=[rpb.TensorSpec(name="x", datatype="FLOAT")])}, "datatype"),
        ({"signature": rpb.ModelSignature(feature_input="nope")}, "model.signature.feature_input"),
    ],
)
def test_an_invalid_model_is_refused_naming_the_field(
    registry: Registry, spec_overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument, match=field):
        registry.create_model(model_spec(**spec_overrides), identity="alice")
    assert registry.list_models().items == []


def test_an_unknown_model_is_not_found(registry: Registry) -> None:
    with pytest.raises(NotFound, match=r"no model named 'ghost'"):
        registry.get_model("ghost")


def test_models_page_by_name_with_owner_and_label_filters(registry: Registry) -> None:
    for i in range(7):
        labels = {"tier": "gold" if i % 2 else "silver"}
        registry.create_model(model_spec(f"m{i}", owner="a" if i < 5 else "b", labels=labels), identity="alice")
    names, token, pages = [], "", 0
    while True:
        page = registry.list_models(page_size=3, page_token=token)
        names += [m.name for m in page.items]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert (names, pages) == ([f"m{i}" for i in range(7)], 3)
    assert [m.name for m in registry.list_models(owner="b").items] == ["m5", "m6"]
    gold, token = [], ""
    while True:  # the label filter keeps pages full and complete across the unfiltered rows it skips
        page = registry.list_models(page_size=1, page_token=token, labels={"tier": "gold"})
        gold += [m.name for m in page.items]
        token = page.next_page_token
        if not token:
            break
    assert gold == ["m1", "m3", "m5"]


@pytest.mark.parametrize("token", ["garbage", "dj0x", "bTo="])
def test_a_foreign_page_token_is_invalid_argument(registry: Registry, token: str) -> None:
    with pytest.raises(InvalidArgument, match=r"page_token"):
        registry.list_models(page_token=token)
    registry.create_model(model_spec("churn"), identity="alice")
    with pytest.raises(InvalidArgument, match=r"page_token"):
        registry.list_versions("churn", page_token=token)


def test_a_negative_page_size_is_invalid_argument(registry: Registry) -> None:
    with pytest.raises(InvalidArgument, match=r"page_size: expected 0"):
        registry.list_models(page_size=-1)


def test_a_version_keeps_its_lineage_statistics_report_and_hints(registry: Registry) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    content = b"onnx bytes v1"
    spec = version_spec("churn", content, description="first", source_run="run-7")
    first = registry.register_version(spec, artifact(content), identity="ci-bot", reason="nightly")
    assert (first.version, first.stage, first.created_by) == (1, Stage.REGISTERED, "ci-bot")
    assert (first.sha256, first.size_bytes, first.format) == (artifact(content).sha256, len(content), "onnx")
    assert first.lineage == Lineage("abc123", "file:///data/train.parquet", "a" * 64, 0)
    assert first.training_statistics == statistics()
    assert first.report == report()
    assert first.backend_hints.expected_memory_bytes == 64 << 20
    assert first.signature == signature()
    assert (first.description, first.source_run, dict(first.labels)) == ("first", "run-7", {"run": "nightly"})
    assert registry.get_version("churn", 1) == first
    second = registry.register_version(
        version_spec("churn", b"v2", lineage=Lineage(parent_version=1)), artifact(b"v2"), identity="ci-bot"
    )
    assert (second.version, second.lineage.parent_version) == (2, 1)
    assert registry.get_version("churn") == second  # latest
    assert registry.get_model("churn").latest_version == 2


def test_versions_list_newest_first_in_pages_and_by_stage(registry: Registry) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    for i in range(5):
        registry.register_version(version_spec("churn", bytes([i])), artifact(bytes([i])), identity="ci")
    registry.set_stage("churn", 2, Stage.REJECTED, identity="gate")
    seen, token = [], ""
    while True:
        page = registry.list_versions("churn", page_size=2, page_token=token)
        seen += [v.version for v in page.items]
        token = page.next_page_token
        if not token:
            break
    assert seen == [5, 4, 3, 2, 1]
    assert [v.version for v in registry.list_versions("churn", stages=[Stage.REJECTED]).items] == [2]
    assert registry.get_version("churn", stage=Stage.REJECTED).version == 2
    with pytest.raises(NotFound, match=r"no version in stage production"):
        registry.get_version("churn", stage=Stage.PRODUCTION)


def test_a_taken_version_number_is_already_exists_and_a_missing_parent_invalid(registry: Registry) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    registry.register_version(version_spec("churn", b"a", version=3), artifact(b"a"), identity="ci")
    assert registry.get_model("churn").latest_version == 3
    with pytest.raises(AlreadyExists, match=r"metadata.version: version 3 of churn exists already"):
        registry.check_can_register(version_spec("churn", b"b", version=3))
    with pytest.raises(AlreadyExists, match=r"version 3 of churn exists already"):
        registry.register_version(version_spec("churn", b"b", version=3), artifact(b"b"), identity="ci")
    with pytest.raises(InvalidArgument, match=r"metadata.lineage.parent_version: churn has no version 2"):
        registry.check_can_register(version_spec("churn", b"b", lineage=Lineage(parent_version=2)))
    assert registry.register_version(version_spec("churn", b"c"), artifact(b"c"), identity="ci").version == 4
    with pytest.raises(NotFound, match=r"metadata.model_name: no model named 'ghost'"):
        registry.check_can_register(version_spec("ghost", b"c"))


def test_the_artifact_must_be_the_one_declared(registry: Registry) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    with pytest.raises(InvalidArgument, match=r"metadata.expected_sha256"):
        registry.register_version(version_spec("churn", b"declared"), artifact(b"other"), identity="ci")
    assert registry.list_versions("churn").items == []


def _race(workers: int, job: Callable[[int], T]) -> list[T | FrescoError]:
    """Run `job(i)` in `workers` threads released together; each result or domain error, by worker."""
    barrier = threading.Barrier(workers)
    results: list[T | FrescoError | None] = [None] * workers

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = job(i)
        except FrescoError as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results  # type: ignore[return-value]


def test_concurrent_registrations_of_one_version_number_let_exactly_one_win(registry: Registry) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    outcomes = _race(
        6,
        lambda i: registry.register_version(
            version_spec("churn", bytes([i]), version=7), artifact(bytes([i])), identity=f"w{i}"
        ),
    )
    winners = [o for o in outcomes if not isinstance(o, FrescoError)]
    losers = [o for o in outcomes if isinstance(o, FrescoError)]
    assert len(winners) == 1
    assert all(isinstance(o, AlreadyExists) for o in losers), losers
    assert [v.sha256 for v in registry.list_versions("churn").items] == [winners[0].sha256]
    assert len([e for e in registry.list_audit("churn").items if e.action == "version.register"]) == 1


def test_concurrent_registrations_of_the_next_version_all_get_distinct_numbers(registry: Registry) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    outcomes = _race(
        6, lambda i: registry.register_version(version_spec("churn", bytes([i])), artifact(bytes([i])), identity="ci")
    )
    assert not [o for o in outcomes if isinstance(o, FrescoError)], outcomes
    assert sorted(o.version for o in outcomes if not isinstance(o, FrescoError)) == [1, 2, 3, 4, 5, 6]
    assert registry.get_model("churn").latest_version == 6


def test_the_registry_survives_reopening(database_url: str) -> None:
    first = Registry.open(database_url)
    first.create_model(model_spec("churn"), identity="alice")
    first.register_version(version_spec("churn", b"a"), artifact(b"a"), identity="ci")
    first.close()
    again = Registry.open(database_url)  # create_all on existing tables is a no-op
    try:
        assert again.get_version("churn", 1).sha256 == artifact(b"a").sha256
        assert len(again.list_audit().items) == 2
    finally:
        again.close()


def test_references_count_versions_sharing_an_artifact(registry: Registry) -> None:
    registry.create_model(model_spec("a"), identity="alice")
    registry.create_model(model_spec("b"), identity="alice")
    assert registry.references(artifact(b"same").sha256) == 0
    registry.register_version(version_spec("a", b"same"), artifact(b"same"), identity="ci")
    registry.register_version(version_spec("b", b"same"), artifact(b"same"), identity="ci")
    assert registry.references(artifact(b"same").sha256) == 2


def test_invalid_version_metadata_is_refused_naming_the_field(registry: Registry) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    spec = version_spec("churn", b"x")
    bad_stats = list(statistics())
    bad_stats[0] = replace_stats_null_rate(bad_stats[0], 1.5)
    cases = [
        (replace(spec, format="pickle"), "metadata.format: expected one of onnx"),
        (replace(spec, expected_sha256="abc"), "metadata.expected_sha256: expected 64 hexadecimal digits"),
        (replace(spec, lineage=Lineage(dataset_sha256="zz")), "metadata.lineage.training_dataset_sha256"),
        (replace(spec, training_statistics=tuple(bad_stats)), r"metadata.training_statistics\[0\].null_rate"),
        (
            replace(spec, report=rpb.TrainingReport(metrics={"auc": float("nan")})),
            r"metadata.report.metrics\[auc\]: expected a finite number",
        ),
        (
            replace(spec, backend_hints=rpb.BackendHints(expected_memory_bytes=-1)),
            "metadata.backend_hints.expected_memory_bytes",
        ),
        (replace(spec, version=2, lineage=Lineage(parent_version=2)), "metadata.lineage.parent_version"),
    ]
    for bad, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            registry.register_version(bad, artifact(b"x"), identity="ci")
    assert registry.list_versions("churn").items == []


def replace_stats_null_rate(stats: spb.FeatureStatistics, rate: float) -> spb.FeatureStatistics:
    copy = spb.FeatureStatistics()
    copy.CopyFrom(stats)
    copy.null_rate = rate
    return copy


def test_a_database_that_goes_away_is_unavailable_then_comes_back() -> None:
    server = PostgresServer().start()
    try:
        registry = Registry.open(server.create_database("comes_back"))
        registry.create_model(model_spec("churn"), identity="alice")
        server.stop()
        with pytest.raises(Unavailable, match="registry database unavailable"):
            registry.get_model("churn")
        server.start()  # same port, same cluster
        assert registry.get_model("churn").created_by == "alice"
        registry.close()
    finally:
        server.close()


def test_an_unreachable_database_is_unavailable_at_open() -> None:
    with pytest.raises(Unavailable, match="registry database not reachable"):
        Registry.open(f"postgresql+psycopg://fresco@127.0.0.1:{free_port()}/none?connect_timeout=2")


def test_text_postgresql_cannot_store_is_refused_on_both(registry: Registry) -> None:
    with pytest.raises(InvalidArgument, match="reason: expected text without NUL"):
        registry.create_model(model_spec("churn"), identity="alice", reason="a\x00b")
    assert registry.list_models().items == []
    with pytest.raises(InvalidArgument, match="owner: expected text without NUL"):
        registry.list_models(owner="\x00")
    with pytest.raises(InvalidArgument, match="page_token"):
        registry.list_models(page_token=pages.token("m", "a\x00"))
    with pytest.raises(InvalidArgument, match="page_token"):
        registry.list_audit(page_token=pages.token("a", str(2**63)))
