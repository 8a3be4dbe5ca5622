"""The feature benchmark's figures and printed report: per case and system p50/p99 and rows/s, the ratios,
and the targets with PASS / MISS (SKIP when a figure is missing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.goals import Goal, verdict

BUSY_LOAD_AVERAGE = 1.0


@dataclass(frozen=True)
class Case:
    """One read pattern: how many entities per call, and which keys."""

    key: str
    label: str
    entities: int
    kind: str  # warm: a small pool read again and again; cold: every key once, L1 off; unknown: never written
    iterations: int


@dataclass
class Measured:
    """One system on one case."""

    system: str
    served_by: str = ""
    iterations: int = 0
    entities: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    rows_per_s: float = 0.0
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.iterations > 0


def summarize(system: str, entities: int, latencies_ms: Sequence[float], seconds: float) -> Measured:
    """Percentiles of the latencies; rows/s = entities answered per second of the timed loop (concurrency 1)."""
    values = np.asarray(latencies_ms, dtype=np.float64)
    if values.size == 0:
        return Measured(system, error="no calls timed")
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return Measured(
        system,
        iterations=int(values.size),
        entities=entities,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        max_ms=float(values.max()),
        mean_ms=float(values.mean()),
        rows_per_s=entities * values.size / seconds if seconds > 0 else 0.0,
        seconds=seconds,
    )


@dataclass
class CaseResult:
    case: Case
    fresco: Measured
    feast: Measured
    raw: Measured | None = None  # the raw redis-py pipeline, on the cases read from Redis

    def systems(self) -> list[Measured]:
        return [self.fresco, self.feast] + ([self.raw] if self.raw is not None else [])


@dataclass(frozen=True)
class Target:
    name: str
    status: str  # PASS, MISS or SKIP
    detail: str


def _find(results: Sequence[CaseResult], key: str) -> CaseResult | None:
    return next((r for r in results if r.case.key == key), None)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def targets(results: Sequence[CaseResult]) -> list[Target]:
    """The issue's targets: at 100 entities × 40 features, Fresco's p99 from Redis with L1 cold ≥ 5× better
    than Feast's, and for unknown entities ≥ 10× better."""
    found = []
    for key, name, factor in (
        ("100-cold", "100 entities from Redis, L1 cold: Fresco p99 ≥ 5× better than Feast's", 5.0),
        ("100-unknown", "100 unknown entities: Fresco p99 ≥ 10× better than Feast's", 10.0),
    ):
        result = _find(results, key)
        if result is None or not result.fresco.ok or not result.feast.ok:
            why = "not measured" if result is None else (result.fresco.error or result.feast.error or "not measured")
            found.append(Target(name, "SKIP", why.splitlines()[0]))
            continue
        ratio = _ratio(result.feast.p99_ms, result.fresco.p99_ms) or 0.0
        found.append(
            Target(
                name,
                "PASS" if ratio >= factor else "MISS",
                f"Feast {result.feast.p99_ms:.2f} ms / Fresco {result.fresco.p99_ms:.2f} ms = {ratio:.1f}× "
                f"(p50: {result.feast.p50_ms:.2f} / {result.fresco.p50_ms:.2f} = "
                f"{_ratio(result.feast.p50_ms, result.fresco.p50_ms) or 0.0:.1f}×)",
            )
        )
    return found


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}×"


def render(results: Sequence[CaseResult], found: Sequence[Target], meta: dict[str, Any]) -> str:
    """The whole report as text."""
    options = meta.get("options", {})
    load = meta.get("load_average_at_start", 0.0)
    cores = meta.get("machine", {}).get("cores", "?")
    versions = meta.get("versions", {})
    setup = meta.get("setup", {})
    lines = [
        f"Fresco feature-store benchmark — {cores} cores, {meta.get('started', '')}, git {meta.get('git', '?')}, "
        f"{meta.get('seconds', 0):.0f} s{' (--quick)' if options.get('quick') else ''}",
        f"Data: {options.get('entities', 0):,} entities (user_id int64), 2 feature views × 20 features "
        "(user_stats: 20 double; user_activity: 10 int64 + 10 double), every call asks for all 40.",
        f"Store: one redis-server {versions.get('redis_server', '?')} (Fresco db 0, Feast db 1); "
        f"Fresco's durable tier Cassandra {versions.get('cassandra', '?')} (C2 JIT).",
        "Fresco: python -m feature_service --backend redis+cassandra, GetFeatures over gRPC from a grpc.aio "
        "client (uvloop) in the benchmark process; L1 warm = default memory tier, keys read again and again; "
        "L1 cold = --memory-max-entries 0 (memory tier off), every key once.",
        f"Feast {versions.get('feast', '?')}: FeatureStore.get_online_features in process (its usual online use), "
        "redis online store, registry cached forever; timed without to_dict().",
        f"Both: one call at a time (concurrency 1), same keys in the same order, {options.get('rounds', '?')} "
        "rounds alternating the systems, warm-up calls first, requests/entity rows built beforehand; "
        "rows/s = entities answered per second of the timed loop.",
        f"Loading: Fresco Materialize RPC {setup.get('fresco_materialize_s', 0):.0f} s "
        f"(Cassandra + Redis); Feast apply {setup.get('feast_apply_s', 0):.0f} s + materialize "
        f"{setup.get('feast_materialize_s', 0):.0f} s.",
        "Answers checked against the Parquet data before timing: "
        + "; ".join(f"{system} {verdict}" for system, verdict in meta.get("answers", {}).items())
        + ".",
        f"Machine load average before the run: {load:.2f}"
        + (
            f" — WARNING: other work was running on these {cores} cores; every figure is affected."
            if load > BUSY_LOAD_AVERAGE
            else " (quiet)."
        )
        + f" Before the measurements: {meta.get('load_average_before_measuring', 0.0):.2f}.",
        "",
        f"{'case':<34}{'system':<10}{'served by':<11}{'calls':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'rows/s':>11}",
    ]
    for result in results:
        for index, measured in enumerate(result.systems()):
            label = result.case.label if index == 0 else ""
            if measured.ok:
                lines.append(
                    f"{label:<34}{measured.system:<10}{measured.served_by:<11}{measured.iterations:>6}"
                    f"{measured.p50_ms:>9.2f}{measured.p99_ms:>9.2f}{measured.max_ms:>9.2f}{measured.rows_per_s:>11,.0f}"
                )
            else:
                lines.append(f"{label:<34}{measured.system:<10}{'failed':<11}  {measured.error.splitlines()[0][:60]}")
    lines += [
        "",
        "Ratios (Feast / Fresco for latency, Fresco / Feast for throughput)",
        f"{'case':<34}{'p50':>8}{'p99':>8}{'rows/s':>9}",
    ]
    for result in results:
        mine, theirs = result.fresco, result.feast
        if not (mine.ok and theirs.ok):
            lines.append(f"{result.case.label:<34}{'—':>8}{'—':>8}{'—':>9}")
            continue
        lines.append(
            f"{result.case.label:<34}{_times(_ratio(theirs.p50_ms, mine.p50_ms)):>8}"
            f"{_times(_ratio(theirs.p99_ms, mine.p99_ms)):>8}{_times(_ratio(mine.rows_per_s, theirs.rows_per_s)):>9}"
        )
    raws = [r for r in results if r.raw is not None]
    if raws:
        lines += ["", "Against the raw redis-py pipeline (Fresco / redis-py: 1.0× is as fast, higher is slower)"]
        lines.append(f"{'case':<34}{'p50':>8}{'p99':>8}")
        for result in raws:
            raw = result.raw
            if raw is None or not (raw.ok and result.fresco.ok):
                lines.append(f"{result.case.label:<34}{'—':>8}{'—':>8}")
                continue
            lines.append(
                f"{result.case.label:<34}{_times(_ratio(result.fresco.p50_ms, raw.p50_ms)):>8}"
                f"{_times(_ratio(result.fresco.p99_ms, raw.p99_ms)):>8}"
            )
    notes = meta.get("notes", [])
    if notes:
        lines += ["", "Notes"]
        lines += [f"  - {note}" for note in notes]
    lines += ["", "Targets"]
    lines += [f"  {t.status:<5} {t.name}: {t.detail}" for t in found]
    return "\n".join(lines)


# --- the goals for feature reads, as bench.goals records them -------------------------------------

MEMORY_P50_MS = 1.0
REDIS_P50_MS = 1.3
RAW_FACTOR = 1.5


def _latency_goal(result: CaseResult | None, name: str, tier: str, limit_ms: float) -> Goal:
    target = f"p50 ≤ {limit_ms} ms, served by {tier}"
    if result is None or not result.fresco.ok:
        return Goal(name, "SKIP", "not measured" if result is None else result.fresco.error.splitlines()[0], target)
    mine = result.fresco
    served = mine.served_by.rstrip("*")
    ok = mine.p50_ms <= limit_ms and served == tier and not mine.served_by.endswith("*")
    return Goal(name, verdict(ok), f"p50 {mine.p50_ms:.2f} ms ({mine.served_by})", target)


def _raw_goal(result: CaseResult | None, name: str, figure: str) -> Goal:
    target = f"≤ {RAW_FACTOR}×"
    if result is None or result.raw is None or not (result.fresco.ok and result.raw.ok):
        why = "not measured" if result is None or result.raw is None else (result.fresco.error or result.raw.error)
        return Goal(name, "SKIP", why.splitlines()[0], target, "raw redis-py")
    mine, theirs = getattr(result.fresco, f"{figure}_ms"), getattr(result.raw, f"{figure}_ms")
    ratio = mine / theirs if theirs > 0 else float("inf")
    ok = ratio <= RAW_FACTOR and result.fresco.served_by == "redis"
    return Goal(
        name,
        verdict(ok),
        f"{ratio:.2f}× ({mine:.2f} / {theirs:.2f} ms, Fresco {result.fresco.served_by})",
        target,
        "raw redis-py",
        ratio,
    )


def goals(results: Sequence[CaseResult], serialised_once: bool) -> list[Goal]:
    """The issue's goals for feature reads: 1 entity over gRPC at p50 ≤ 1.0 ms from memory and ≤ 1.3 ms from
    Redis; 100 entities × 40 features from Redis within 1.5× the raw redis-py pipeline's p50 and p99 (same run);
    the response serialised once."""
    return [
        _latency_goal(_find(results, "1-warm"), "1 entity over gRPC from memory", "memory", MEMORY_P50_MS),
        _latency_goal(_find(results, "1-cold"), "1 entity over gRPC from Redis", "redis", REDIS_P50_MS),
        _raw_goal(_find(results, "100-cold"), "100×40 from Redis, p50", "p50"),
        _raw_goal(_find(results, "100-cold"), "100×40 from Redis, p99", "p99"),
        Goal(
            "GetFeatures response serialised once",
            verdict(serialised_once),
            "hand-encoded bytes sent as they are" if serialised_once else "parsed and serialised again",
            "encoded once",
        ),
    ]


def goal_notes(results: Sequence[CaseResult]) -> list[str]:
    """Figures the goals table leaves out: Fresco against Feast on every case."""
    notes = []
    for result in results:
        if result.fresco.ok and result.feast.ok:
            notes.append(
                f"{result.case.label}: Fresco p50 {result.fresco.p50_ms:.2f} ms / p99 {result.fresco.p99_ms:.2f} ms, "
                f"Feast {result.feast.p50_ms:.2f} / {result.feast.p99_ms:.2f} ms"
            )
    return notes
