"""GetFeatures: many entities × many "view:feature" refs in one store read, resolved by the same null
policy training uses, answered column by column. Also the catalog of views and their statistics."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chassis.errors import InvalidArgument, NotFound
from feature_service import convert
from feature_service.metrics import FeatureMetrics
from feature_service.records import DurableTier, Record, entity_key
from feature_service.store import BLOOM, ReadResult
from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.features.definitions import Definitions, Feature, FeatureView, JoinKey
from fresco.features.policy import Baseline, Status, impute

log = logging.getLogger(__name__)
MAX_PARSED_REF_LISTS = 1024
"""Lists of refs the catalog keeps parsed (all of them dropped when full: the common ones come back at once)."""


class Served(enum.IntEnum):
    """The status of one served value (the wire values of fresco.features.v1.FeatureStatus)."""

    PRESENT = fpb.FEATURE_STATUS_PRESENT
    IMPUTED = fpb.FEATURE_STATUS_IMPUTED
    NULL = fpb.FEATURE_STATUS_NULL
    EXPIRED = fpb.FEATURE_STATUS_EXPIRED
    NOT_FOUND = fpb.FEATURE_STATUS_NOT_FOUND
    REJECTED = fpb.FEATURE_STATUS_REJECTED
    UNAVAILABLE = fpb.FEATURE_STATUS_UNAVAILABLE


_FROM_POLICY = {Status.PRESENT: Served.PRESENT, Status.IMPUTED: Served.IMPUTED, Status.NULL: Served.NULL}
_FROM_POLICY[Status.REJECTED] = Served.REJECTED


class Store(Protocol):
    """The tiered store, as the reader, writer and materializer use it."""

    async def read(self, keys_by_view: Mapping[str, Sequence[str]]) -> ReadResult: ...
    async def write(self, view: str, rows: Sequence[tuple[str, Record]], *, warm: bool = True) -> None: ...


# --- the catalog ------------------------------------------------------------------------------------


@dataclass
class ViewEntry:
    """One feature view with what serving it needs: its join keys, features and latest statistics."""

    view: FeatureView
    join_keys: tuple[JoinKey, ...]
    features: dict[str, Feature]
    statistics: spb.FeatureViewStatistics | None = None
    baselines: dict[str, Baseline] = field(default_factory=dict)
    stored: bytes | None = None  # the statistics as stored, to notice another process replacing them


class Catalog:
    """The feature views of the definitions file and the latest statistics of each."""

    def __init__(self, definitions: Definitions, updated_at: float | None = None) -> None:
        self.definitions = definitions
        self.updated_at = updated_at
        self.views = {
            view.name: ViewEntry(view, definitions.join_keys(view), {f.name: f for f in view.features})
            for view in definitions.feature_views
        }
        # Callers repeat their lists of refs: each is parsed once.
        self._parsed: dict[tuple[str, ...], tuple[list[Ref], dict[str, ViewEntry]]] = {}

    def refs(self, texts: Sequence[str]) -> tuple[list[Ref], dict[str, ViewEntry]]:
        """The refs of a request's feature_refs (see parse_ref for the errors, naming the field), and the views
        they read in order of first mention."""
        key = tuple(texts)
        found = self._parsed.get(key)
        if found is None:
            refs = [parse_ref(self, text, f"feature_refs[{i}]") for i, text in enumerate(key)]
            found = refs, {r.view.view.name: r.view for r in refs}
            if len(self._parsed) >= MAX_PARSED_REF_LISTS:
                self._parsed.clear()
            self._parsed[key] = found
        return found

    def entry(self, name: str, field_name: str = "feature_view") -> ViewEntry:
        """A view by name, or NotFound naming it and the known ones."""
        entry = self.views.get(name)
        if entry is None:
            known = ", ".join(sorted(self.views)) or "none"
            raise NotFound(f"{field_name}: unknown feature view {name!r} (known: {known})")
        return entry

    def set_statistics(self, name: str, stored: bytes) -> None:
        """Adopt a view's statistics as stored by materialisation."""
        entry = self.views[name]
        entry.statistics, entry.baselines = convert.decode_statistics(stored)
        entry.stored = stored

    async def refresh(self, durable: DurableTier) -> list[str]:
        """Load every view's stored statistics; the names of views whose statistics changed."""
        changed = []
        for name, entry in self.views.items():
            stored = await durable.load_statistics(name)
            if stored is not None and stored != entry.stored:
                try:
                    self.set_statistics(name, stored)
                except Exception:  # a corrupt blob must not keep the other views from loading
                    log.exception("statistics of view %s cannot be decoded; keeping the previous ones", name)
                    continue
                changed.append(name)
        return changed


# --- the request --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """One requested column."""

    ref: str
    view: ViewEntry
    feature: Feature


@dataclass(frozen=True)
class FeatureQuery:
    """A validated GetFeatures request: columns, the storage keys of each entity per view, options."""

    refs: list[Ref]
    keys_by_view: dict[str, list[str]]
    entity_count: int
    include_event_timestamps: bool = False
    max_staleness_s: float | None = None
    impute: bool = True
    views: Mapping[str, ViewEntry] = field(default_factory=dict)  # the views of the refs, in order of first mention

    @staticmethod
    def from_proto(request: fpb.GetFeaturesRequest, catalog: Catalog, max_values: int) -> FeatureQuery:
        """Validate a request; errors name the field and what was expected."""
        if not request.feature_refs:
            raise InvalidArgument('feature_refs: expected at least one "view:feature" ref')
        refs, views = catalog.refs(request.feature_refs)
        entities = request.entity_keys
        if len(entities) * len(refs) > max_values:
            raise InvalidArgument(
                f"entity_keys × feature_refs: {len(entities)} × {len(refs)} = {len(entities) * len(refs)} values, "
                f"expected at most {max_values} per call (the feature service's max_values_per_get setting, "
                "--max-values-per-get or FRESCO_FEATURE_SERVICE_MAX_VALUES_PER_GET); split the call"
            )
        keys_by_view: dict[str, list[str]] = {}
        by_join_keys: dict[tuple[JoinKey, ...], list[str]] = {}  # views of the same entities share their keys
        for entry in views.values():
            keys = by_join_keys.get(entry.join_keys)
            if keys is None:
                keys = by_join_keys[entry.join_keys] = _storage_keys(entry, entities)
            keys_by_view[entry.view.name] = keys
        staleness = None
        if request.HasField("max_staleness"):
            ms = request.max_staleness
            if ms.seconds < 0 or ms.nanos < 0 or ms.nanos >= 1_000_000_000:
                raise InvalidArgument(
                    f"max_staleness: expected a non-negative duration, got {ms.seconds}s {ms.nanos}ns"
                )
            # Like a view's ttl_seconds, zero means values never expire.
            staleness = (ms.seconds + ms.nanos / 1e9) or None
        return FeatureQuery(
            refs,
            keys_by_view,
            len(entities),
            request.include_event_timestamps,
            staleness,
            not request.disable_imputation,
            views,
        )


def parse_ref(catalog: Catalog, text: str, field_name: str) -> Ref:
    """A "view:feature" ref of the catalog: InvalidArgument if malformed, NotFound if unknown, naming the field."""
    view_name, sep, feature_name = text.partition(":")
    if not sep or not view_name or not feature_name or ":" in feature_name:
        raise InvalidArgument(f'{field_name}: expected "view:feature", got {text!r}')
    entry = catalog.entry(view_name, field_name)
    feature = entry.features.get(feature_name)
    if feature is None:
        known = ", ".join(entry.features)
        raise NotFound(f"{field_name}: view {view_name!r} has no feature {feature_name!r} (has: {known})")
    return Ref(text, entry, feature)


def _storage_keys(entry: ViewEntry, entities: Sequence[vpb.EntityKey]) -> list[str]:
    keys = []
    for i, entity in enumerate(entities):
        values = convert.entity_values(entry.join_keys, entity)
        if isinstance(values, convert.KeyProblem):
            what = "missing" if values.missing else "of the wrong type"
            raise InvalidArgument(
                f"entity_keys[{i}].join_keys[{values.key}]: {what}; view {entry.view.name} expects "
                f"{values.expected}, got {values.actual}"
            )
        keys.append(entity_key(values))
    return keys


# --- the answer ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Column:
    """The served values of one ref for every entity, in request order."""

    ref: str
    value_type: str
    values: list[Any]
    statuses: list[int]
    event_ts: list[float | None] | None
    served_tier: str


@dataclass
class FeatureAnswer:
    """Every column of a GetFeatures call and how the store served them."""

    columns: list[Column]
    degraded: bool = False
    served_tiers: list[str] = field(default_factory=list)
    failed_tiers: list[str] = field(default_factory=list)


# Per-entity state of a view's record, before any feature is looked at.
_LIVE, _NOT_FOUND, _EXPIRED, _UNAVAILABLE = range(4)
_LIVE_ONLY = frozenset((_LIVE,))


class ServedObserver(Protocol):
    """Sees every answer as served (the parity sampler): must be quick and never raise."""

    def offer(self, query: FeatureQuery, served: ServedViews, columns: Sequence[Column], now: float) -> None: ...


@dataclass(frozen=True)
class ServedView:
    """How one view's records were served to a query: per entity the record read (a Record, None when no
    record was found, or the store's failure), and the age past which a record was served as expired."""

    records: Sequence[object]
    ttl: float | None


ServedViews = Mapping[str, ServedView]


class FeatureReader:
    """Reads a query's records in one store call and resolves every value by its feature's policy."""

    def __init__(
        self, store: Store, metrics: FeatureMetrics | None = None, observer: ServedObserver | None = None
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.observer = observer

    async def read(self, query: FeatureQuery) -> FeatureAnswer:
        """The columns of a query, with a status per value."""
        unique = {view: list(dict.fromkeys(keys)) for view, keys in query.keys_by_view.items()}
        result = await self.store.read(unique)
        now = time.time()
        per_view = {}
        served: dict[str, ServedView] = {}
        for name, entry in (query.views or {r.view.view.name: r.view for r in query.refs}).items():
            ttl = query.max_staleness_s if query.max_staleness_s is not None else entry.view.ttl_seconds or None
            by_key = dict(zip(unique[name], result.records[name], strict=True))
            records = [by_key[k] for k in query.keys_by_view[name]]
            per_view[name] = _entity_states(records, ttl, now)
            served[name] = ServedView(records, ttl)
        tiers = {view: served_tier(result, view) for view in per_view}
        columns = []
        served_values = None if self.metrics is None else self.metrics.served
        imputing, with_stamps = query.impute, query.include_event_timestamps
        for ref in query.refs:
            view = ref.view.view.name
            rows, states, event_ts = per_view[view]
            values, statuses = _resolve_column(ref, rows, states, imputing)
            columns.append(
                Column(ref.ref, ref.feature.type, values, statuses, event_ts if with_stamps else None, tiers[view])
            )
            if served_values is not None:
                served_values(view, ref.feature.name, statuses)
        if self.metrics is not None:
            self.metrics.read_failures(result.failed_tiers)
        if self.observer is not None:
            self.observer.offer(query, served, columns, now)
        return FeatureAnswer(columns, result.degraded, list(result.served_tiers), list(result.failed_tiers))


def served_tier(result: ReadResult, view: str) -> str:
    """The tier a view's columns are attributed to: the deepest one that looked up any of its keys (where
    the slowest and oldest answers come from), "bloom" if the filter alone answered, "" if no tier did."""
    sources = set(result.sources.get(view, ()))
    depth = {tier: i for i, tier in enumerate(result.served_tiers) if tier != BLOOM}
    served = [tier for tier in sources if tier in depth]
    if served:
        return max(served, key=depth.__getitem__)
    return BLOOM if BLOOM in sources else ""


def _entity_states(
    records: Sequence[object], ttl: float | None, now: float
) -> tuple[list[Mapping[str, Any] | None], list[int] | None, list[float | None]]:
    """Per entity its record's features, state and event time; the states are None when every record is live."""
    rows: list[Mapping[str, Any] | None] = []
    states = []
    event_ts: list[float | None] = []
    for record in records:
        if isinstance(record, Record):
            rows.append(record.features)
            event_ts.append(record.event_ts)
            states.append(_EXPIRED if ttl is not None and now - record.event_ts > ttl else _LIVE)
        else:
            rows.append(None)
            event_ts.append(None)
            states.append(_NOT_FOUND if record is None else _UNAVAILABLE)
    return rows, None if _LIVE_ONLY.issuperset(states) else states, event_ts


_PRESENT = int(Served.PRESENT)


def _resolve_column(
    ref: Ref, rows: Sequence[Mapping[str, Any] | None], states: Sequence[int] | None, imputing: bool
) -> tuple[list[Any], list[int]]:
    """Values and statuses of one feature, by fresco.features.policy: what training's resolve_rows does.
    states None: every record is live."""
    name = ref.feature.name
    if states is None:  # the common case: every record live, every value present
        values = [row.get(name) for row in rows]  # type: ignore[union-attr]  # live rows are records' features
        if None not in values:
            return values, [_PRESENT] * len(values)
        states = [_LIVE] * len(rows)
    return _resolve_slowly(ref.feature, rows, states, ref.view.baselines.get(name), imputing)


def _resolve_slowly(
    feature: Feature,
    rows: Sequence[Mapping[str, Any] | None],
    states: Sequence[int],
    baseline: Baseline | None,
    imputing: bool,
) -> tuple[list[Any], list[int]]:
    unavailable = (None, int(Served.UNAVAILABLE))
    if imputing:
        fill, policy_status = impute(feature, baseline)
        on_null = (fill, int(_FROM_POLICY[policy_status]))
        # A missing or expired record imputes like a null; when the policy keeps nulls, the status says why.
        keeps_null = policy_status == Status.NULL
        on_missing = (None, int(Served.NOT_FOUND)) if keeps_null else on_null
        on_expired = (None, int(Served.EXPIRED)) if keeps_null else on_null
    else:
        on_null, on_missing, on_expired = (
            (None, int(Served.NULL)),
            (None, int(Served.NOT_FOUND)),
            (None, int(Served.EXPIRED)),
        )
    outcome = {_NOT_FOUND: on_missing, _EXPIRED: on_expired, _UNAVAILABLE: unavailable}
    name = feature.name
    present = int(Served.PRESENT)
    values: list[Any] = []
    statuses: list[int] = []
    for row, state in zip(rows, states, strict=True):
        if state == _LIVE and row is not None:
            value = row.get(name)
            if value is not None:
                values.append(value)
                statuses.append(present)
                continue
            value, status = on_null
        else:
            value, status = outcome[state]
        values.append(value)
        statuses.append(status)
    return values, statuses


def answer_to_proto(answer: FeatureAnswer) -> fpb.GetFeaturesResponse:
    """The GetFeaturesResponse of an answer as a message (for callers in process; the service sends
    answer_to_wire's bytes as they are)."""
    return fpb.GetFeaturesResponse.FromString(answer_to_wire(answer))


def answer_to_wire(answer: FeatureAnswer) -> bytes:
    """The GetFeaturesResponse of an answer in its wire form, columns encoded by convert's fast path."""
    metadata = convert.encode_metadata(
        tuple([c.ref for c in answer.columns]), answer.degraded, answer.served_tiers, answer.failed_tiers
    )
    timestamps: dict[int, bytes] = {}  # columns of one view share their timestamps: encode them once
    encoded = []
    for column in answer.columns:
        stamps = b""
        if column.event_ts is not None:
            stamps = timestamps.get(id(column.event_ts), b"")
            if not stamps and column.event_ts:
                stamps = timestamps[id(column.event_ts)] = convert.encode_timestamps(column.event_ts)
        encoded.append(
            convert.encode_column(
                column.ref,
                convert.encode_values(column.value_type, column.values),
                column.statuses,
                stamps,
                column.served_tier,
            )
        )
    return convert.encode_response(metadata, encoded)
