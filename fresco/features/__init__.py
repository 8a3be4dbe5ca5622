"""Feature definitions and the null/imputation policy, shared by the feature service and training.

A data scientist resolves a training frame with `resolve_rows(view, rows, baselines)` and gets the
values the feature service would serve for the same rows."""

from fresco.features.definitions import Definitions, Feature, FeatureView, load_definitions, parse_definitions
from fresco.features.policy import Baseline, Status, Violation, check_row, check_value, resolve, resolve_rows

__all__ = [
    "Baseline",
    "Definitions",
    "Feature",
    "FeatureView",
    "Status",
    "Violation",
    "check_row",
    "check_value",
    "load_definitions",
    "parse_definitions",
    "resolve",
    "resolve_rows",
]
