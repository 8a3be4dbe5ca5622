"""The prediction quality domain: predictions from gateways' metric windows, late labels joined by request id, and
the quality of each version over its windows (GetPredictionQuality's answer, and the gauges')."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from chassis.errors import InvalidArgument, NotFound
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import routing_pb2 as rtpb
from model_manager import messages, quality
from model_manager.prediction_store import Labelling, Match, Prediction, PredictionStore, storable_id
from model_manager.quality_metrics import QualityMetrics
from model_manager.registry import Registry

log = logging.getLogger(__name__)
R = mpb.LabelRejection
# The outcome label of fresco_labels_received_total for each refusal.
OUTCOMES = {
    R.LABEL_REJECTION_UNKNOWN_REQUEST: "unknown_request",
    R.LABEL_REJECTION_INVALID_VALUE: "invalid_value",
    R.LABEL_REJECTION_MISSING_FIELD: "missing_field",
    R.LABEL_REJECTION_CONFLICTING_VALUE: "conflicting_value",
}
DAY_US = 86_400 * 1_000_000
MIN_SECONDS, MAX_SECONDS = -62_135_596_800, 253_402_300_799
ALL_WINDOWS = tuple(name for name, _ in quality.WINDOWS)
# The gauges show the sliding windows only: "all" would rescan the whole retention every refresh.
GAUGE_WINDOWS = ("5m", "1h", "1d")


def now_us() -> int:
    """Microseconds since the epoch."""
    return time.time_ns() // 1000


def predictions_of(windows: Sequence[rtpb.MetricsWindow]) -> tuple[list[Prediction], int]:
    """The prediction records of live windows, and how many were unusable (a request id that cannot be a key, a
    score that is not a finite number, or a time out of range); a record without a time takes its window's end."""
    kept: list[Prediction] = []
    unusable = 0
    for window in windows:
        if window.shadow:
            continue
        end_us = window.window_end.ToMicroseconds() if _valid(window.window_end) else None
        records = [
            r
            for r in window.prediction_records
            if storable_id(r.request_id)
            and math.isfinite(r.score)
            and (_valid(r.time) if r.HasField("time") else end_us is not None)
        ]
        unusable += len(window.prediction_records) - len(records)
        entropy = quality.entropies(np.array([r.score for r in records], dtype=np.float64))
        for record, h in zip(records, entropy.tolist(), strict=True):
            at = record.time.ToMicroseconds() if record.HasField("time") else cast(int, end_us)
            kept.append(
                Prediction(
                    window.model_name, window.version, record.request_id, at, record.score, h, _unit(record.unit_id)
                )
            )
    return kept, unusable


def _valid(stamp: Timestamp) -> bool:
    # Years 1 to 9999, as google.protobuf.Timestamp allows: microseconds since the epoch then fit a BigInteger.
    return MIN_SECONDS <= stamp.seconds <= MAX_SECONDS and 0 <= stamp.nanos < 1_000_000_000


def _unit(unit_id: str) -> str:
    # Informational only: cut to the column's width, NULs dropped (PostgreSQL text cannot hold them).
    return unit_id.replace("\x00", "")[:256]


@dataclass
class _Batch:
    """The verdicts of one label batch as they are decided."""

    response: pb.LogLabelsResponse
    writes: list[Labelling] = field(default_factory=list)
    # Values given in this batch so far, so that a later label of the same id is judged against them.
    pending: dict[str, float] = field(default_factory=dict)

    def refuse(self, index: int, reason: int, detail: str) -> None:
        self.response.rejected.add(index=index, reason=reason, detail=detail)


class QualityStore:
    """Kept predictions and labels, and the quality computed from them."""

    def __init__(
        self,
        store: PredictionStore,
        registry: Registry,
        *,
        retention_s: float,
        metrics: QualityMetrics | None = None,
        clock: Callable[[], int] = now_us,
    ) -> None:
        self.store = store
        self.registry = registry
        self.retention_us = int(retention_s * 1e6)
        self.metrics = metrics
        self.clock = clock
        # Labels are judged against what is stored, then written: one batch at a time, so two batches carrying
        # different labels for one prediction cannot both be accepted.
        self.label_lock = asyncio.Lock()
        self.stopping = asyncio.Event()

    # --- predictions ----------------------------------------------------------------------------------------

    async def add_windows(self, windows: Sequence[rtpb.MetricsWindow]) -> int:
        """Keep the prediction records of reported windows (a prediction already kept is left as it is)."""
        kept, unusable = predictions_of(windows)
        if unusable:
            log.warning("ignored %d prediction records without a usable request id or score", unusable)
        await asyncio.to_thread(self.store.add, kept)
        return len(kept)

    # --- labels -------------------------------------------------------------------------------------------

    async def log_labels(self, batch: pb.LogLabelsRequest) -> pb.LogLabelsResponse:
        """Join one batch of labels to their predictions; answered once the accepted labels are durable."""
        if batch.model_name:
            await asyncio.to_thread(self.registry.get_model, batch.model_name)  # NOT_FOUND for an unknown model
        async with self.label_lock:
            decided = await asyncio.to_thread(self._decide, batch)
            await asyncio.to_thread(self.store.write_labels, decided.writes, self.clock())
        response = decided.response
        if self.metrics is not None:
            self.metrics.received("accepted", response.accepted)
            for rejected in response.rejected:
                self.metrics.received(OUTCOMES[rejected.reason], 1)
        return response

    def _decide(self, request: pb.LogLabelsRequest) -> _Batch:
        batch = _Batch(pb.LogLabelsResponse(batch_id=request.batch_id))
        ids = [label.request_id for label in request.labels if storable_id(label.request_id)]
        found = self.store.matches(ids, request.model_name)
        tasks: dict[tuple[str, int], int] = {}
        now = self.clock()
        for index, label in enumerate(request.labels):
            rid, value = label.request_id, label.value
            if not rid:
                batch.refuse(index, R.LABEL_REJECTION_MISSING_FIELD, "request_id: expected the prediction's request id")
                continue
            if not math.isfinite(value):
                batch.refuse(index, R.LABEL_REJECTION_INVALID_VALUE, f"value: expected a finite number, got {value}")
                continue
            if label.HasField("observed_at") and not _valid(label.observed_at):
                detail = "observed_at: expected a time between the years 1 and 9999, or none"
                batch.refuse(index, R.LABEL_REJECTION_INVALID_VALUE, detail)
                continue
            matched = found.get(rid, [])
            if not matched:
                where = f" of {request.model_name}" if request.model_name else ""
                detail = f"request_id: no prediction{where} is kept with id {rid[:80]!r} (never served, or expired)"
                batch.refuse(index, R.LABEL_REJECTION_UNKNOWN_REQUEST, detail)
                continue
            binary = [m for m in matched if self._task(tasks, m) == quality.BINARY]
            if binary and value not in (0.0, 1.0):
                m = binary[0]
                detail = f"value: expected 0 or 1 for binary classifier {m.model} v{m.version}, got {value}"
                batch.refuse(index, R.LABEL_REJECTION_INVALID_VALUE, detail)
                continue
            known = {m.label for m in matched if m.label is not None}
            if rid in batch.pending:
                known.add(batch.pending[rid])
            if known - {value}:
                first = sorted(known - {value})[0]
                detail = f"value: request {rid[:80]!r} already has the label {first}; the first label is kept"
                batch.refuse(index, R.LABEL_REJECTION_CONFLICTING_VALUE, detail)
                continue
            batch.response.accepted += 1
            if rid in batch.pending or all(m.label is not None for m in matched):
                continue  # an identical repeat: accepted, counted once
            batch.pending[rid] = value
            observed = label.observed_at.ToMicroseconds() if label.HasField("observed_at") else now
            batch.writes.append(Labelling(rid, request.model_name, value, observed))
        return batch

    def _task(self, cache: dict[tuple[str, int], int], match: Match) -> int:
        key = (match.model, match.version)
        if key not in cache:
            cache[key] = self.declared_task(*key)
        return cache[key]

    def declared_task(self, model: str, version: int) -> int:
        """The task the version's drift policy declares; unspecified (inferred) when none, or not registered."""
        try:
            record = self.registry.get_version(model, version)
        except (NotFound, InvalidArgument):
            return rpb.MODEL_TASK_UNSPECIFIED
        return int(messages.version_message(record).drift_policy.task)

    # --- quality ------------------------------------------------------------------------------------------

    def version_quality(
        self, model: str, version: int, now: int, names: Sequence[str] = ALL_WINDOWS
    ) -> mpb.VersionQuality:
        """One version's quality over the named windows ending at `now` (blocking)."""
        starts = quality.starts(now, names)
        summary = self.store.summary(model, version, starts)
        widest = None if None in starts else min(s for s in starts if s is not None)
        labelled = self.store.labelled(model, version, widest)
        task = quality.infer_task(self.declared_task(model, version), summary)
        return quality.quality(version, task, names, summary, labelled, now)

    def answer(self, model: str, versions: Sequence[int]) -> pb.GetPredictionQualityResponse:
        """GetPredictionQuality's answer (blocking): NOT_FOUND for an unknown model."""
        self.registry.get_model(model)
        for i, v in enumerate(versions):
            if v < 1:
                raise InvalidArgument(f"versions[{i}]: expected a version number of 1 or more, got {v}")
        wanted = sorted(set(versions), reverse=True) if versions else self.store.versions(model)
        now = self.clock()
        return pb.GetPredictionQualityResponse(versions=[self.version_quality(model, v, now) for v in wanted])

    # --- upkeep -------------------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Forget predictions older than the retention, then recompute the gauges of the versions that served in the
        last day (blocking); how many predictions were forgotten."""
        now = self.clock()
        pruned = self.store.prune(now - self.retention_us)
        if self.metrics is not None:
            published = {}
            for model, version in self.store.recent(now - DAY_US):
                published[(model, version)] = self.version_quality(model, version, now, GAUGE_WINDOWS)
            self.metrics.publish(published)
        return pruned

    async def run(self, every_s: float) -> None:
        """Refresh every `every_s` seconds until cancelled; a failed refresh is logged and tried again."""
        while True:
            try:
                pruned = await asyncio.to_thread(self.refresh)
                if pruned:
                    log.info("forgot %d predictions older than the retention", pruned)
            except Exception:  # the next round tries again; the gauges keep their last values meanwhile
                log.exception("refreshing the prediction quality failed")
            await asyncio.sleep(every_s)
