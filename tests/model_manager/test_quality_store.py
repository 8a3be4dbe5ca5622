"""The prediction store and late labels, on SQLite and on a real PostgreSQL: the first prediction of an id is kept,
labels are refused per label with their reason, a repeat counts once, a conflicting label keeps the first, old
predictions are forgotten after the retention, and fuzzed batches agree with a plain reference."""

from __future__ import annotations

import asyncio
import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chassis.errors import InvalidArgument, NotFound
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.prediction_store import PredictionStore
from model_manager.quality_store import QualityStore
from model_manager.registry import Registry
from tests.model_manager.quality_support import batch, check_binary, reasons, window
from tests.model_manager.registry_support import (
    artifact,
    database_url,
    model_spec,
    postgres_server,
    registry,
    version_spec,
)

__all__ = ["database_url", "postgres_server", "registry"]

NOW_US = 1_800_000_000_000_000
MINUTE_US = 60_000_000
DAY_US = 1440 * MINUTE_US


class Clock:
    def __init__(self) -> None:
        self.us = NOW_US

    def __call__(self) -> int:
        return self.us


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def quality(registry: Registry, clock: Clock) -> QualityStore:
    registry.create_model(model_spec("churn"), "ana")
    return QualityStore(PredictionStore(registry.engine), registry, retention_s=7 * 86400, clock=clock)


async def test_a_reported_prediction_is_kept_once_and_the_first_score_wins(quality: QualityStore) -> None:
    first = window("churn", 1, [("r1", NOW_US - MINUTE_US, 0.9), ("r1", NOW_US, 0.1), ("r2", NOW_US, 0.2)], NOW_US)
    await quality.add_windows([first])
    await quality.add_windows([first])  # a retried report
    await quality.add_windows([window("churn", 1, [("r2", NOW_US, 0.7)], NOW_US)])
    # Shadow windows carry no records that count, and records without an id or a finite score are ignored.
    await quality.add_windows([window("churn", 1, [("r3", NOW_US, 0.5)], NOW_US, shadow=True)])
    await quality.add_windows([window("churn", 1, [("", NOW_US, 0.5), ("r4", NOW_US, math.nan)], NOW_US)])
    answer = quality.answer("churn", [])
    assert [v.version for v in answer.versions] == [1]
    assert [(w.window, w.predictions, w.labelled) for w in answer.versions[0].windows] == [
        ("5m", 2, 0), ("1h", 2, 0), ("1d", 2, 0), ("all", 2, 0),
    ]  # fmt: skip
    assert (await quality.log_labels(batch([("r1", 1), ("r2", 0), ("r3", 1), ("r4", 1)]))).accepted == 2
    rows = quality.store.labelled("churn", 1)
    assert sorted(zip(rows.score.tolist(), rows.time_us.tolist(), rows.label.tolist(), strict=True)) == [
        (0.2, NOW_US, 0.0),
        (0.9, NOW_US - MINUTE_US, 1.0),
    ]


async def test_each_refused_label_says_why_and_a_repeat_counts_once(quality: QualityStore) -> None:
    await quality.add_windows([window("churn", 1, [(f"r{i}", NOW_US, 0.25 * i) for i in range(4)], NOW_US)])
    sent = batch([("r0", 0), ("", 1), ("nope", 1), ("r1", math.nan), ("r2", math.inf), ("r1", 1), ("r1", 1), ("r1", 0)])
    answer = await quality.log_labels(sent)
    assert answer.accepted == 3
    assert reasons(answer) == {
        1: "missing_field", 2: "unknown_request", 3: "invalid_value", 4: "invalid_value", 7: "conflicting_value",
    }  # fmt: skip
    details = {r.index: r.detail for r in answer.rejected}
    assert details[1].startswith("request_id:")
    assert details[3].startswith("value:")
    assert "first label" in details[7]
    # The same batch again: the labels are known, identical ones accepted, nothing counted twice.
    again = await quality.log_labels(sent)
    assert again.accepted == 3
    assert reasons(again) == reasons(answer)
    conflicting = await quality.log_labels(batch([("r0", 1)]))
    assert reasons(conflicting) == {0: "conflicting_value"}
    all_time = quality.answer("churn", [1]).versions[0].windows[-1]
    assert (all_time.predictions, all_time.labelled) == (4, 2)
    rows = quality.store.labelled("churn", 1)
    assert sorted(zip(rows.score.tolist(), rows.label.tolist(), strict=True)) == [(0.0, 0.0), (0.25, 1.0)]


async def test_a_label_batch_for_another_model_joins_nothing(quality: QualityStore, registry: Registry) -> None:
    registry.create_model(model_spec("fraud"), "ana")
    await quality.add_windows([window("churn", 1, [("r1", NOW_US, 0.5)], NOW_US)])
    answer = await quality.log_labels(batch([("r1", 1)], model="fraud"))
    assert reasons(answer) == {0: "unknown_request"}
    assert "of fraud" in answer.rejected[0].detail
    with pytest.raises(NotFound):
        await quality.log_labels(batch([("r1", 1)], model="ghost"))
    assert (await quality.log_labels(batch([("r1", 1)], model="churn"))).accepted == 1


async def test_quality_names_unknown_models_and_bad_versions(quality: QualityStore) -> None:
    with pytest.raises(NotFound):
        quality.answer("ghost", [])
    with pytest.raises(InvalidArgument, match=r"versions\[1\]"):
        quality.answer("churn", [1, 0])
    with pytest.raises(InvalidArgument, match="name"):
        quality.answer("", [])
    empty = quality.answer("churn", [3]).versions[0]
    assert empty.version == 3
    assert all(w.predictions == 0 and not w.metrics for w in empty.windows)


async def test_windows_count_predictions_by_their_time(quality: QualityStore, clock: Clock) -> None:
    ages = {"a": 1, "b": 30, "c": 600, "d": 3 * 1440}  # minutes
    records = [(rid, NOW_US - age * MINUTE_US, 0.8) for rid, age in ages.items()]
    await quality.add_windows([window("churn", 2, records, NOW_US)])
    await quality.log_labels(batch([(rid, 1) for rid in ages]))
    windows = quality.answer("churn", []).versions[0].windows
    assert [(w.window, w.labelled) for w in windows] == [("5m", 1), ("1h", 2), ("1d", 3), ("all", 4)]
    assert windows[1].window_start.ToMicroseconds() == NOW_US - 60 * MINUTE_US
    assert windows[3].window_start.ToMicroseconds() == NOW_US - 3 * DAY_US
    assert all(w.metrics["accuracy"] == 1.0 and "auc" not in w.metrics for w in windows)  # one label value: no AUC


async def test_the_task_is_inferred_from_the_scores_and_labels(quality: QualityStore) -> None:
    await quality.add_windows([
        window("churn", 1, [("a", NOW_US, 0.2), ("b", NOW_US, 0.8)], NOW_US),
        window("churn", 2, [("c", NOW_US, 1.5), ("d", NOW_US, 0.5)], NOW_US),  # a score outside [0, 1]
        window("churn", 3, [("e", NOW_US, 0.5), ("f", NOW_US, 0.5)], NOW_US),  # a label other than 0 and 1
    ])  # fmt: skip
    assert (await quality.log_labels(batch([("a", 0), ("b", 1), ("c", 1), ("d", 0), ("e", 2.5)]))).accepted == 5
    answer = {v.version: v.windows[-1] for v in quality.answer("churn", []).versions}
    assert {v: w.task for v, w in answer.items()} == {
        1: rpb.MODEL_TASK_BINARY_CLASSIFICATION, 2: rpb.MODEL_TASK_REGRESSION, 3: rpb.MODEL_TASK_REGRESSION,
    }  # fmt: skip
    assert answer[1].metrics["accuracy"] == 1.0
    assert answer[1].HasField("mean_entropy")
    assert dict(answer[2].metrics) == {"mae": 0.5, "rmse": 0.5}
    assert not answer[3].HasField("mean_entropy")
    assert (answer[3].predictions, answer[3].labelled) == (2, 1)


async def test_a_declared_task_judges_labels_and_predictions(quality: QualityStore, registry: Registry) -> None:
    for version, task in ((1, rpb.MODEL_TASK_BINARY_CLASSIFICATION), (2, rpb.MODEL_TASK_REGRESSION)):
        content = f"churn v{version}".encode()
        spec = version_spec("churn", content, version=version, drift_policy=rpb.DriftPolicy(task=task))
        registry.register_version(spec, artifact(content), "ana")
    await quality.add_windows([
        window("churn", 1, [("a", NOW_US, 0.2), ("b", NOW_US, 0.9)], NOW_US),
        window("churn", 2, [("c", NOW_US, 0.2), ("d", NOW_US, 0.9)], NOW_US),
    ])  # fmt: skip
    answer = await quality.log_labels(batch([("a", 0.5), ("a", 0), ("b", 1), ("c", 0), ("d", 0)]))
    assert reasons(answer) == {0: "invalid_value"}  # a binary classifier's label is 0 or 1
    assert "binary classifier churn v1" in answer.rejected[0].detail
    judged = {v.version: v.windows[-1] for v in quality.answer("churn", []).versions}
    assert judged[1].task == rpb.MODEL_TASK_BINARY_CLASSIFICATION
    assert judged[1].metrics["accuracy"] == 1.0
    # Scores in [0, 1] and 0/1 labels would be inferred binary; the declared task says regression.
    assert judged[2].task == rpb.MODEL_TASK_REGRESSION
    assert dict(judged[2].metrics) == pytest.approx({"mae": 0.55, "rmse": np.sqrt((0.04 + 0.81) / 2)})


async def test_predictions_older_than_the_retention_are_forgotten(quality: QualityStore, clock: Clock) -> None:
    old, recent = NOW_US - 8 * DAY_US, NOW_US - 6 * DAY_US
    await quality.add_windows([window("churn", 1, [("old", old, 0.3), ("recent", recent, 0.6)], NOW_US)])
    await quality.log_labels(batch([("old", 0), ("recent", 1)]))
    assert quality.refresh() == 1
    answer = await quality.log_labels(batch([("old", 0), ("recent", 1)]))
    assert reasons(answer) == {0: "unknown_request"}
    assert answer.accepted == 1
    clock.us += 2 * DAY_US
    assert quality.refresh() == 1
    assert quality.answer("churn", []).versions == []


async def test_a_few_rows_match_scikit_learn(quality: QualityStore) -> None:
    rng = np.random.default_rng(7)
    scores = np.round(rng.uniform(0.01, 0.99, 300), 2)  # rounded: ties, and scores on the bin edges
    labels = (rng.uniform(size=300) < scores).astype(float)
    ids = [f"s{i}" for i in range(300)]
    await quality.add_windows(
        [window("churn", 1, list(zip(ids, [NOW_US] * 300, scores.tolist(), strict=True)), NOW_US)]
    )
    await quality.log_labels(batch(list(zip(ids[:200], labels[:200].tolist(), strict=True))))
    for w in quality.answer("churn", []).versions[0].windows:
        check_binary(w, labels[:200], scores[:200], scores)


KNOWN = [f"k{i}" for i in range(6)]
labels_strategy = st.lists(
    st.tuples(
        st.sampled_from([*KNOWN, "unknown", ""]),
        st.sampled_from([0.0, 1.0, 2.5, -1.0, math.nan, math.inf, -math.inf]),
    ),
    max_size=12,
)
runs = itertools.count()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(labels_strategy, min_size=1, max_size=4))
def test_fuzzed_label_batches_agree_with_a_reference(
    quality: QualityStore, batches: list[list[tuple[str, float]]]
) -> None:
    # Each example has predictions of its own (ids prefixed by the run), on the same database.
    run = f"x{next(runs)}-"
    store = QualityStore(quality.store, quality.registry, retention_s=86400, clock=quality.clock)
    asyncio.run(store.add_windows([window("churn", 1, [(run + k, NOW_US, 0.5) for k in KNOWN], NOW_US)]))
    reference: dict[str, float] = {}
    for pairs in batches:
        sent = [(run + rid if rid else "", value) for rid, value in pairs]
        answer = asyncio.run(store.log_labels(batch(sent)))
        expected: dict[int, str] = {}
        for i, (rid, value) in enumerate(pairs):
            if not rid:
                expected[i] = "missing_field"
            elif not math.isfinite(value):
                expected[i] = "invalid_value"
            elif rid == "unknown":
                expected[i] = "unknown_request"
            elif reference.setdefault(rid, value) != value:
                expected[i] = "conflicting_value"
        assert reasons(answer) == expected
        assert answer.accepted == len(pairs) - len(expected)
        assert all(r.detail for r in answer.rejected)
    kept = {rid: store.store.matches([run + rid])[run + rid][0].label for rid in KNOWN}
    assert kept == {rid: reference.get(rid) for rid in KNOWN}


text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)  # any valid UTF-8: NUL, long, empty
seconds = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records=st.lists(st.tuples(text, st.floats(), text, seconds), max_size=8),
    labels=st.lists(st.tuples(text, st.floats(), seconds), max_size=8),
    end=seconds,
)
def test_any_text_or_time_is_kept_or_refused_never_an_error(
    quality: QualityStore, records: list[tuple[str, float, str, int]], labels: list[tuple[str, float, int]], end: int
) -> None:
    store = QualityStore(quality.store, quality.registry, retention_s=86400, clock=quality.clock)
    reported = window("churn", 9, [(rid, NOW_US, score) for rid, score, _, _ in records], NOW_US)
    reported.window_end.seconds = end
    for i, (record, (_, _, unit, at)) in enumerate(zip(reported.prediction_records, records, strict=True)):
        record.unit_id = unit
        if i % 2:
            record.time.seconds = at
        else:  # no time: the window's end
            record.ClearField("time")
    asyncio.run(store.add_windows([reported]))
    sent = batch([(rid, value) for rid, value, _ in labels])
    for label, (_, _, at) in zip(sent.labels, labels, strict=True):
        label.observed_at.seconds = at
    answer = asyncio.run(store.log_labels(sent))
    assert answer.accepted + len(answer.rejected) == len(labels)
    store.answer("churn", [9])
