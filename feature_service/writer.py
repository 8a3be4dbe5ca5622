"""PushFeatures: every pushed row checked against its view's schema (the same fresco.features.policy
checks training data gets), accepted rows written durably before the answer, rejected rows explained."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from feature_service import convert
from feature_service.metrics import FeatureMetrics
from feature_service.reader import Catalog, Store, ViewEntry
from feature_service.records import Record, arrival_time, entity_key
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.features.policy import Code as PolicyCode
from fresco.features.policy import check_row

# Timestamp's valid range: 0001-01-01 to 9999-12-31.
MIN_TIMESTAMP_S = -62_135_596_800
MAX_TIMESTAMP_S = 253_402_300_799


class Violation(enum.IntEnum):
    """Why a row was rejected (the wire values of fresco.features.v1.ViolationCode)."""

    UNKNOWN_FEATURE_VIEW = fpb.VIOLATION_CODE_UNKNOWN_FEATURE_VIEW
    UNKNOWN_FEATURE = fpb.VIOLATION_CODE_UNKNOWN_FEATURE
    MISSING_JOIN_KEY = fpb.VIOLATION_CODE_MISSING_JOIN_KEY
    TYPE_MISMATCH = fpb.VIOLATION_CODE_TYPE_MISMATCH
    OUT_OF_RANGE = fpb.VIOLATION_CODE_OUT_OF_RANGE
    UNKNOWN_CATEGORY = fpb.VIOLATION_CODE_UNKNOWN_CATEGORY
    NULL_REJECTED = fpb.VIOLATION_CODE_NULL_REJECTED
    MISSING_EVENT_TIMESTAMP = fpb.VIOLATION_CODE_MISSING_EVENT_TIMESTAMP
    EVENT_TIMESTAMP_OUT_OF_RANGE = fpb.VIOLATION_CODE_EVENT_TIMESTAMP_OUT_OF_RANGE
    UNPARSEABLE = fpb.VIOLATION_CODE_UNPARSEABLE


_FROM_POLICY = {
    PolicyCode.UNKNOWN_FEATURE: Violation.UNKNOWN_FEATURE,
    PolicyCode.TYPE_MISMATCH: Violation.TYPE_MISMATCH,
    PolicyCode.OUT_OF_RANGE: Violation.OUT_OF_RANGE,
    PolicyCode.UNKNOWN_CATEGORY: Violation.UNKNOWN_CATEGORY,
    PolicyCode.NULL_REJECTED: Violation.NULL_REJECTED,
}


@dataclass(frozen=True)
class Problem:
    """One reason a row was rejected."""

    feature: str
    code: Violation
    expected: str
    actual: str


@dataclass(frozen=True)
class Rejection:
    """A rejected row: its index in the stream or source file, its view and every reason."""

    row_index: int
    view: str
    problems: Sequence[Problem]


@dataclass
class Rejections:
    """Rejected rows: an exact count and the first `limit` described."""

    limit: int
    count: int = 0
    rows: list[Rejection] = field(default_factory=list)

    def add(self, rejection: Rejection) -> None:
        self.count += 1
        if len(self.rows) < self.limit:
            self.rows.append(rejection)


def check_features(entry: ViewEntry, features: Mapping[str, Any]) -> list[Problem]:
    """Schema problems of a row's features (every feature of the view; missing ones count as null)."""
    full = {name: features.get(name) for name in entry.features}
    full.update(features)  # unknown features too, so they are reported
    return [Problem(v.feature, _FROM_POLICY[v.code], v.expected, v.actual) for v in check_row(entry.view, full)]


def check_event_time(entry: ViewEntry, event_ts: float, now: float, max_future_s: float, ttl: bool) -> Problem | None:
    """A problem with an event time: too far in the future, or (for pushes, `ttl`) already expired."""
    if event_ts > now + max_future_s:
        return Problem(
            "",
            Violation.EVENT_TIMESTAMP_OUT_OF_RANGE,
            f"at most {max_future_s:g}s after the server time {convert.utc(now)}",
            _when(event_ts),
        )
    if ttl and entry.view.ttl_seconds and now - event_ts > entry.view.ttl_seconds:
        return Problem(
            "",
            Violation.EVENT_TIMESTAMP_OUT_OF_RANGE,
            f"within the view's TTL of {entry.view.ttl_seconds:g}s before {convert.utc(now)}",
            _when(event_ts),
        )
    return None


def _when(seconds: float) -> str:
    """An event time for a message: ISO-8601 UTC, or seconds since the epoch beyond what dates can say (a file's
    epoch-seconds column may hold any number)."""
    if MIN_TIMESTAMP_S <= seconds <= MAX_TIMESTAMP_S:
        return convert.utc(seconds)
    return f"{seconds:g} seconds since the epoch"


def _timestamp(ts: Timestamp) -> float | Problem:
    if not (MIN_TIMESTAMP_S <= ts.seconds <= MAX_TIMESTAMP_S and 0 <= ts.nanos < 1_000_000_000):
        return Problem(
            "", Violation.EVENT_TIMESTAMP_OUT_OF_RANGE, "a valid Timestamp", f"seconds={ts.seconds} nanos={ts.nanos}"
        )
    return convert.seconds_of(ts)


@dataclass
class PushOutcome:
    """What a whole push stream did."""

    accepted: int
    rejections: Rejections
    omitted: dict[tuple[str, str], int] = field(default_factory=dict)  # (view, feature) → rows stored with it null


class FeatureWriter:
    """Validates pushed rows and writes the accepted ones of each stream message in one store batch."""

    def __init__(
        self,
        catalog: Catalog,
        store: Store,
        metrics: FeatureMetrics | None = None,
        *,
        max_future_s: float = 300.0,
        require_event_timestamp: bool = False,
        max_rejections: int = 100,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.metrics = metrics
        self.max_future_s = max_future_s
        self.require_event_timestamp = require_event_timestamp
        self.max_rejections = max_rejections

    async def push(self, messages: AsyncIterable[fpb.PushFeaturesRequest]) -> PushOutcome:
        """Validate and write a stream; a store failure raises (Unavailable) rather than dropping rows."""
        outcome = PushOutcome(0, Rejections(self.max_rejections))
        index = 0
        async for message in messages:
            rows = self.validate(message, index, outcome.rejections, outcome.omitted)
            index += len(message.rows)
            if rows:
                # Written before the next message is read and before the answer: an acknowledged row is durable.
                await self.store.write(message.feature_view, rows)
                outcome.accepted += len(rows)
                if self.metrics is not None:
                    self.metrics.rows.labels(message.feature_view, "push", "accepted").inc(len(rows))
        return outcome

    def validate(
        self,
        message: fpb.PushFeaturesRequest,
        first_index: int,
        rejections: Rejections,
        omitted: dict[tuple[str, str], int] | None = None,
    ) -> list[tuple[str, Record]]:
        """The accepted rows of one message as store rows (one per entity, the latest); rejections recorded, and
        features the accepted rows left out (stored as null) counted in `omitted`."""
        view_name = message.feature_view
        entry = self.catalog.views.get(view_name)
        if entry is None:
            known = ", ".join(sorted(self.catalog.views)) or "none"
            problem = Problem("", Violation.UNKNOWN_FEATURE_VIEW, f"a feature view ({known})", repr(view_name))
            for offset in range(len(message.rows)):
                rejections.add(Rejection(first_index + offset, view_name, [problem]))
            self._count_rejected("(unknown)", len(message.rows))  # never a caller's string as a metric label
            return []
        now = arrival_time()  # the rows' arrival: it orders writes of equal event times
        latest: dict[str, tuple[str, Record]] = {}
        rejected = 0
        for offset, row in enumerate(message.rows):
            problems, accepted = self._check(entry, row, now)
            if accepted is None:
                rejections.add(Rejection(first_index + offset, view_name, problems))
                rejected += 1
                continue
            if omitted is not None:
                for name in entry.features:
                    if name not in row.features:
                        omitted[(view_name, name)] = omitted.get((view_name, name), 0) + 1
            kept = latest.get(accepted[0])
            if kept is None or kept[1].event_ts <= accepted[1].event_ts:  # equal: the later row in the message
                latest[accepted[0]] = accepted
        self._count_rejected(view_name, rejected)
        return list(latest.values())

    def _check(
        self, entry: ViewEntry, row: fpb.FeatureRow, now: float
    ) -> tuple[list[Problem], tuple[str, Record] | None]:
        """A row's problems, or its storage key and record."""
        problems = []
        given = row.entity_key.join_keys
        key_values = []
        for key in entry.join_keys:
            value = convert.key_value(key, given.get(key.name))
            if isinstance(value, convert.KeyProblem):
                code = Violation.MISSING_JOIN_KEY if value.missing else Violation.TYPE_MISMATCH
                problems.append(Problem(key.name, code, value.expected, value.actual))
            else:
                key_values.append(value)
        features = {name: convert.from_value(value) for name, value in row.features.items()}
        problems += check_features(entry, features)
        self._count_values(entry, features, problems)
        event_ts = now  # none given: the receive time, as the contract says
        if row.HasField("event_timestamp"):
            parsed = _timestamp(row.event_timestamp)
            late = (
                parsed if isinstance(parsed, Problem) else check_event_time(entry, parsed, now, self.max_future_s, True)
            )
            if late is not None:
                problems.append(late)
            elif not isinstance(parsed, Problem):
                event_ts = parsed
        elif self.require_event_timestamp:
            problems.append(Problem("", Violation.MISSING_EVENT_TIMESTAMP, "an event_timestamp", "none"))
        if problems:
            return problems, None
        stored = {name: convert.normalize(feature.type, features.get(name)) for name, feature in entry.features.items()}
        return [], (entity_key(key_values), Record(stored, event_ts, now))

    def _count_values(self, entry: ViewEntry, features: Mapping[str, Any], problems: Sequence[Problem]) -> None:
        if self.metrics is None:
            return
        view = entry.view.name
        for name, value in features.items():
            if value is not None and name in entry.features:
                self.metrics.values_pushed.labels(view, name).inc()
        for problem in problems:
            if problem.code in (Violation.OUT_OF_RANGE, Violation.UNKNOWN_CATEGORY):
                self.metrics.values_out_of_range.labels(view, problem.feature).inc()

    def _count_rejected(self, view: str, count: int) -> None:
        if self.metrics is not None and count:
            self.metrics.rows.labels(view, "push", "rejected").inc(count)


def rejection_to_proto(rejection: Rejection) -> fpb.RowRejection:
    """A rejection as the API reports it."""
    return fpb.RowRejection(
        row_index=rejection.row_index,
        feature_view=rejection.view,
        violations=[
            fpb.FeatureViolation(
                feature=p.feature, code=fpb.ViolationCode.ValueType(p.code), expected=p.expected, actual=p.actual
            )
            for p in rejection.problems
        ],
    )
