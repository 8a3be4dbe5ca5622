"""The one null/imputation policy and the schema checks, applied identically by the feature
service to every value it serves or accepts and by training code to its frames (`resolve_rows`)."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fresco.features.definitions import Feature, FeatureView

INT32_RANGE = (-(2**31), 2**31 - 1)
INT64_RANGE = (-(2**63), 2**63 - 1)


class Status(enum.Enum):
    """What happened to one value on its way out."""

    PRESENT = "present"
    IMPUTED = "imputed"
    NULL = "null"
    REJECTED = "rejected"


class Code(enum.Enum):
    """Why a value was refused."""

    UNKNOWN_FEATURE = "unknown_feature"
    TYPE_MISMATCH = "type_mismatch"
    OUT_OF_RANGE = "out_of_range"
    UNKNOWN_CATEGORY = "unknown_category"
    NULL_REJECTED = "null_rejected"


@dataclass(frozen=True)
class Violation:
    """One value that breaks its feature's schema."""

    feature: str
    code: Code
    expected: str
    actual: str


@dataclass(frozen=True)
class Baseline:
    """A feature's statistics that mean, median and most-frequent imputation draw on."""

    mean: float | None = None
    median: float | None = None
    most_frequent: Any = None


def _type_ok(kind: str, value: Any) -> bool:
    if kind in ("double", "float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in ("int64", "int32"):
        low, high = INT32_RANGE if kind == "int32" else INT64_RANGE
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if kind == "string":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "bytes":
        return isinstance(value, bytes)
    item = kind.removesuffix("_list")
    return isinstance(value, (list, tuple)) and all(_type_ok(item, v) for v in value)


def check_value(feature: Feature, value: Any) -> Violation | None:
    """The schema violation of one value of a feature, if any: type, range, category, rejected null."""
    if value is None:
        if feature.null_policy.strategy == "reject":
            return Violation(feature.name, Code.NULL_REJECTED, "a value (this feature rejects nulls)", "null")
        return None
    if not _type_ok(feature.type, value):
        return Violation(feature.name, Code.TYPE_MISMATCH, feature.type, _describe(value))
    if feature.range is not None:
        low, high = feature.range.min, feature.range.max
        if (
            (isinstance(value, float) and math.isnan(value))
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            return Violation(feature.name, Code.OUT_OF_RANGE, f"a value in {bounds}", repr(value))
    if feature.categories is not None and value not in feature.categories:
        shown = ", ".join(feature.categories[:10]) + (", ..." if len(feature.categories) > 10 else "")
        return Violation(feature.name, Code.UNKNOWN_CATEGORY, f"one of {shown}", repr(value))
    return None


def check_row(view: FeatureView, features: Mapping[str, Any]) -> list[Violation]:
    """Every violation of one row written to a view (unknown features included)."""
    problems = []
    for name, value in features.items():
        feature = view.feature(name)
        if feature is None:
            known = ", ".join(f.name for f in view.features)
            problems.append(Violation(name, Code.UNKNOWN_FEATURE, f"a feature of view {view.name} ({known})", name))
            continue
        if (problem := check_value(feature, value)) is not None:
            problems.append(problem)
    return problems


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def impute(feature: Feature, baseline: Baseline | None) -> tuple[Any, Status]:
    """What a missing value of `feature` becomes under its null policy."""
    policy = feature.null_policy
    strategy = policy.strategy
    if strategy == "keep_null":
        return None, Status.NULL
    if strategy == "reject":
        return None, Status.REJECTED
    if strategy == "default_value":
        return policy.default, Status.IMPUTED
    source = None
    if baseline is not None:
        source = {"mean": baseline.mean, "median": baseline.median, "most_frequent": baseline.most_frequent}[strategy]
    if source is None:  # no statistics yet: nothing honest to impute with
        return None, Status.NULL
    if feature.type in ("int64", "int32") and isinstance(source, float):
        source = round(source)  # an integer feature stays an integer
    return source, Status.IMPUTED


def resolve(feature: Feature, value: Any, baseline: Baseline | None) -> tuple[Any, Status]:
    """A stored value as served: present as is, or imputed by policy when null."""
    if value is not None:
        return value, Status.PRESENT
    return impute(feature, baseline)


def resolve_rows(
    view: FeatureView, rows: Iterable[Mapping[str, Any]], baselines: Mapping[str, Baseline] | None = None
) -> list[dict[str, Any]]:
    """Training rows as the feature service would serve them: each feature of the view resolved by
    the same policy (missing keys count as null). Use the view's materialisation statistics as
    `baselines` (see `fresco.features.statistics.baselines`)."""
    baselines = baselines or {}
    resolved = []
    for row in rows:
        out: dict[str, Any] = {}
        for feature in view.features:
            out[feature.name], _ = resolve(feature, row.get(feature.name), baselines.get(feature.name))
        resolved.append(out)
    return resolved
