"""The benchmark's printed report: the table per server and concurrency, the ratios, the ceiling, the
load times, and the targets with PASS / MISS (SKIP when a figure was not measured)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.predictor.__main__ import ServerRun
    from bench.predictor.ceiling import CeilingResult
    from bench.predictor.load import LoadResult
    from bench.predictor.loadtime import LoadTimes

MICHELANGELO_LOAD_S = 2.5
BUSY_LOAD_AVERAGE = 1.0


@dataclass(frozen=True)
class Target:
    """One goal, whether this run met it, and the figures behind the verdict."""

    name: str
    status: str  # PASS, MISS or SKIP
    detail: str


def _find(servers: Sequence[ServerRun], key: str) -> ServerRun | None:
    return next((s for s in servers if s.key == key), None)


def mlserver_best(servers: Sequence[ServerRun], concurrency: int) -> tuple[ServerRun, LoadResult] | None:
    """The faster MLServer configuration at `concurrency` (by infer/s), with its run."""
    candidates = [(s, r) for s in servers if s.key.startswith("mlserver") and (r := s.at(concurrency)) is not None]
    return max(candidates, key=lambda pair: pair[1].infer_per_s) if candidates else None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def targets(servers: Sequence[ServerRun], load_times: LoadTimes | None) -> list[Target]:
    """Every target of the predictor issue, judged on this run."""
    found: list[Target] = []
    fresco = _find(servers, "fresco")
    floor = _find(servers, "floor")
    f16 = fresco.at(16) if fresco else None
    best16 = mlserver_best(servers, 16)

    name = "c16 throughput: fresco ≥ 3× MLServer's best"
    if f16 is None or best16 is None:
        why = "fresco c16 not measured" if f16 is None else "MLServer c16 not measured"
        found.append(Target(name, "SKIP", why))
    else:
        want = 3 * best16[1].infer_per_s
        found.append(
            Target(
                name,
                _verdict(f16.infer_per_s >= want),
                f"{f16.infer_per_s:,.0f} vs 3 × {best16[1].infer_per_s:,.0f} = {want:,.0f} infer/s "
                f"({f16.infer_per_s / best16[1].infer_per_s:.2f}×)",
            )
        )
    name = "c16 p99: fresco ≤ ⅓ of MLServer's best"
    if f16 is None or best16 is None:
        found.append(Target(name, "SKIP", "c16 not measured for both"))
    else:
        want = best16[1].p99_ms / 3
        found.append(
            Target(
                name,
                _verdict(f16.p99_ms <= want),
                f"{f16.p99_ms:.2f} ms vs {best16[1].p99_ms:.2f} / 3 = {want:.2f} ms",
            )
        )
    concurrencies = sorted({r.concurrency for s in servers for r in s.results})
    for concurrency in concurrencies:
        name = f"c{concurrency} throughput: fresco ≥ 80% of the floor"
        mine = fresco.at(concurrency) if fresco else None
        theirs = floor.at(concurrency) if floor else None
        if mine is None or theirs is None:
            found.append(Target(name, "SKIP", "not measured for both"))
            continue
        share = mine.infer_per_s / theirs.infer_per_s
        found.append(
            Target(
                name,
                _verdict(share >= 0.8),
                f"{mine.infer_per_s:,.0f} vs {theirs.infer_per_s:,.0f} infer/s ({share:.0%})",
            )
        )
    name = "scaling: fresco rows/s at c64 ≥ 10× c1"
    f1, f64 = (fresco.at(1), fresco.at(64)) if fresco else (None, None)
    if f1 is None or f64 is None:
        found.append(Target(name, "SKIP", "c1 and c64 not both measured"))
    else:
        ratio = f64.infer_per_s / f1.infer_per_s
        found.append(
            Target(name, _verdict(ratio >= 10), f"{f64.infer_per_s:,.0f} / {f1.infer_per_s:,.0f} = {ratio:.2f}×")
        )
    name = "load time: median RepositoryModelLoad of the ~10 MB model < 1 s"
    median = load_times.median_s if load_times else None
    if median is None:
        found.append(Target(name, "SKIP", load_times.error if load_times else "not measured"))
    else:
        assert load_times is not None
        found.append(
            Target(
                name,
                _verdict(median < 1.0),
                f"median {median:.3f} s of {', '.join(f'{s:.3f}' for s in load_times.seconds)} "
                f"(Michelangelo: {MICHELANGELO_LOAD_S} s)",
            )
        )
    return found


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "—"
    return f"{numerator / denominator:.2f}×"


def render(
    servers: Sequence[ServerRun],
    concurrencies: Sequence[int],
    ceiling: Sequence[CeilingResult],
    load_times: LoadTimes | None,
    found: Sequence[Target],
    meta: dict[str, Any],
) -> str:
    """The whole report as text."""
    options = meta.get("options", {})
    window = options.get("window", {})
    lines = [
        f"Fresco predictor benchmark — {meta['machine']['cores']} cores, {meta['started']}, git {meta['git']}, "
        f"{meta.get('seconds', 0):.0f} s{' (--quick)' if options.get('quick') else ''}",
        "Model: MLP 32→256→256→1 (scikit-learn MLPRegressor; ONNX for Fresco, joblib for MLServer), batch-1 requests.",
        f"Load: {meta['versions']['perf_analyzer']} over gRPC, -p {window.get('measurement_ms')} "
        f"-s {window.get('stability_pct')} -r {window.get('max_trials')}, random FP32 input, "
        "one connection per in-flight request.",
        f"Machine load average before the run: {meta.get('load_average_at_start', 0):.2f}"
        + (
            f" — WARNING: other work was running on these {meta['machine']['cores']} cores; every figure is lowered."
            if meta.get("load_average_at_start", 0) > BUSY_LOAD_AVERAGE
            else " (quiet)."
        ),
        "",
        f"{'server':<34}{'conc':>5}{'infer/s':>11}{'p50 ms':>9}{'p99 ms':>9}",
    ]
    for server in servers:
        for index, concurrency in enumerate(concurrencies):
            result = next((r for r in server.results if r.concurrency == concurrency), None)
            label = server.label if index == 0 else ""
            if result is None:  # a server loaded at some concurrencies only
                lines.append(f"{label:<34}{concurrency:>5}{'not run':>11}{'—':>9}{'—':>9}")
                continue
            if result is not None and result.ok:
                lines.append(
                    f"{label:<34}{concurrency:>5}{result.infer_per_s:>11,.0f}{result.p50_ms:>9.2f}{result.p99_ms:>9.2f}"
                    + (" *" if result.note else "")
                )
            else:
                lines.append(f"{label:<34}{concurrency:>5}{'failed':>11}{'—':>9}{'—':>9}")
        if server.answers != "not checked":
            lines.append(f"{'':<4}answers: {server.answers}")
    if any(r.note for s in servers for r in s.results if r.ok):
        lines.append("* no stable window at the asked deviation; measured on a retry accepting twice as much")
    lines += [
        "",
        "Ratios (MLServer's best: the faster of its two configurations at each concurrency)",
        f"{'conc':>4}{'fresco/mlserver':>17}{'p99 fresco/mls':>16}{'fresco/floor':>14}   mlserver best",
    ]
    fresco = _find(servers, "fresco")
    floor = _find(servers, "floor")
    for concurrency in concurrencies:
        mine = fresco.at(concurrency) if fresco else None
        theirs = floor.at(concurrency) if floor else None
        best = mlserver_best(servers, concurrency)
        best_run = best[1] if best else None
        lines.append(
            f"{concurrency:>4}"
            f"{_ratio(mine.infer_per_s if mine else None, best_run.infer_per_s if best_run else None):>17}"
            f"{_ratio(mine.p99_ms if mine else None, best_run.p99_ms if best_run else None):>16}"
            f"{_ratio(mine.infer_per_s if mine else None, theirs.infer_per_s if theirs else None):>14}"
            f"   {best[0].label if best else '—'}"
        )
    if fresco is not None:
        first, last = min(concurrencies), max(concurrencies)
        low, high = fresco.at(first), fresco.at(last)
        if low is not None and high is not None and first != last:
            lines += [
                "",
                f"Fresco rows/s at c{last} vs c{first}: {high.infer_per_s:,.0f} / {low.infer_per_s:,.0f} = "
                f"{high.infer_per_s / low.infer_per_s:.2f}×",
            ]
    lines += ["", "In-process ceiling: ONNX Runtime session.run in a loop, 1 thread, 1 intra-op thread, same model"]
    lines.append(f"{'batch':>6}{'rows/s':>12}{'µs/call':>10}")
    for row in ceiling:
        lines.append(f"{row.batch_size:>6}{row.rows_per_s:>12,.0f}{row.us_per_call:>10.1f}")
    lines.append("")
    if load_times is not None and load_times.seconds:
        median = load_times.median_s or 0.0
        lines.append(
            f"Load time of a {load_times.model_bytes / 1e6:.1f} MB ONNX model (RepositoryModelLoad = load + warm-up): "
            f"{', '.join(f'{s:.3f}' for s in load_times.seconds)} s; median {median:.3f} s "
            f"(target < 1 s; Michelangelo {MICHELANGELO_LOAD_S} s)"
        )
    if load_times is not None and load_times.error:
        lines.append(f"Load time: FAILED: {load_times.error.splitlines()[0] if load_times.error else ''}")
    lines += ["", "Targets"]
    lines += [f"  {t.status:<5} {t.name}: {t.detail}" for t in found]
    failed = [f"{s.label} c{r.concurrency}" for s in servers for r in s.results if not r.ok]
    if failed:
        lines += ["", f"Failed runs: {', '.join(failed)} (errors in the JSON and above)"]
    return "\n".join(lines)
