"""What the feature drift check of a rollout step measures: the PSI of each input and score the candidate's windows
in the step sketched, against its training statistics. A name is judged only with at least the drift policy's
min_rows non-null values, so too little data is never a reason to roll back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fresco.monitoring.sketches import ColumnSketch
from model_manager.drift_monitor import VersionBasis
from model_manager.window_sketches import SketchKey


@dataclass(frozen=True)
class FeaturePsi:
    """The PSI of each judged name, highest first, and what the others lacked."""

    judged: tuple[tuple[float, str, int], ...]  # (psi, name, values)
    most_values: int  # the most non-null values any compared name had
    min_rows: int
    missing: str = ""  # why nothing could be compared, when nothing could


def feature_psi(sketches: Mapping[SketchKey, ColumnSketch], basis: VersionBasis | None) -> FeaturePsi:
    """The PSI of every sketched name that has training statistics."""
    if basis is None or not basis.training:
        return FeaturePsi((), 0, 0, "no training statistics to compare with")
    compared = {key: s for key, s in sketches.items() if key[1] in basis.training}
    need = basis.min_rows()
    judged: list[tuple[float, str, int]] = []
    most = 0
    for (_, name), sketch in compared.items():
        values = sketch.count - sketch.null_count
        most = max(most, values)
        drift = basis.judge(sketch)
        if drift.distribution_judged and drift.psi is not None:  # min_rows finite values of the compared kind
            judged.append((drift.psi, name, values))
    return FeaturePsi(tuple(sorted(judged, reverse=True)), most, need)
