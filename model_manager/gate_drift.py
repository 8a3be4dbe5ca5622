"""The drift gate: the model's live inputs (merged over every version serving the same feature names) and the
candidate's own scores, when it served, against the candidate's training statistics and drift policy.

A breach fails the gate with the names and values; too little data passes with a note, unless the gate requires
live data. `force` with a reason promotes over it (audited by the promotion)."""

from __future__ import annotations

from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.monitoring.drift import JS, KS, NULL_RATE, OUT_OF_RANGE, PSI, Drift
from model_manager.drift_monitor import POLICY_WINDOW, VersionBasis
from model_manager.gate_results import check, error
from model_manager.monitor_store import WINDOWS
from model_manager.monitors import ModelMonitors
from model_manager.window_sketches import FEATURE, SCORE

DRIFT = rpb.GATE_TYPE_DRIFT
NAME = "drift"
_LABELS = {PSI: "PSI", KS: "KS", JS: "JS", NULL_RATE: "null-rate rise", OUT_OF_RANGE: "out-of-range share"}


def window_of(gate: rpb.DriftGate, field: str = "gates.drift") -> str:
    """The gate's window name; ValueError naming the field when it is not one of the windows kept."""
    window = gate.window or POLICY_WINDOW
    if window not in WINDOWS:
        raise ValueError(f"{field}.window: expected one of {', '.join(WINDOWS)} (empty means 1h), got {window!r}")
    return window


def _breach(drift: Drift, basis: VersionBasis) -> str:
    limits = basis.limits(drift.name)
    values = drift.values()
    parts = [f"{_LABELS[s]} {values[s]:.3f} > {limits.of(s):g}" for s in drift.breached]
    return f"{drift.name} ({', '.join(parts)}; {drift.count} values)"


def drift_gate(gate: rpb.DriftGate, basis: VersionBasis, monitors: ModelMonitors | None) -> rpb.GateResult:
    """Blocking: the gate's one check over its window, now."""
    if monitors is None:
        return error(NAME, DRIFT, "this manager keeps no live sketches to judge drift with")
    window = window_of(gate)
    length = WINDOWS[window]
    store = monitors.store
    inputs = store.across_versions(basis.model, FEATURE, basis.inputs, length)
    scores = {name: s for (kind, name), s in store.window(basis.model, basis.version, length).items() if kind == SCORE}
    drifts = [basis.judge(sketch) for sketch in [*inputs.values(), *scores.values()]]
    judged = [d for d in drifts if d.judged]
    breached = [d for d in judged if d.breached]
    scope = f"{window} window, {len(inputs)} live inputs of {basis.model}"
    scope += f" and {len(scores)} scores of v{basis.version}" if scores else ""
    if breached:
        worst = max((d.psi or 0.0 for d in breached), default=0.0)
        detail = f"drift over the limits in the {scope}: " + "; ".join(_breach(d, basis) for d in breached)
        return check(NAME, DRIFT, False, detail, worst, basis.limits(breached[0].name).max_psi)
    unjudged = [d for d in drifts if not d.judged]
    note = ""
    if unjudged:
        shown = ", ".join(f"{d.name} ({d.count} values)" for d in unjudged[:5])
        more = f" and {len(unjudged) - 5} more" if len(unjudged) > 5 else ""
        note = f"; not judged, fewer than {basis.min_rows()} values or no training statistics: {shown}{more}"
    if not judged:
        why = "too little live data" if basis.training else f"no training statistics of v{basis.version}"
        text = f"{why} in the {scope} to judge drift{note}"
        if gate.require_live_data:
            return check(NAME, DRIFT, False, text + "; the gate requires live data", 0.0, float(basis.min_rows()))
        return check(NAME, DRIFT, True, text, 0.0, float(basis.min_rows()))
    worst = max((d.psi or 0.0 for d in judged), default=0.0)
    return check(NAME, DRIFT, True, f"no drift over the limits in the {scope}{note}", worst)
