"""What a valid model, version, alias and page request look like; each refusal names the field and what was expected."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace

from chassis.errors import InvalidArgument
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.monitoring.kll_bytes import kll_problem
from fresco.monitoring.sketches import KLL_K
from model_manager.records import ModelSpec, VersionSpec

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,62}")
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,62}")
SHA256 = re.compile(r"[0-9a-f]{64}")
FORMATS = ("onnx", "torchscript", "tensorflow_saved_model", "xgboost", "lightgbm")
# The Open Inference Protocol's tensor datatypes.
DATATYPES = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"}
    | {"BF16"}
)
MAX_TEXT = 4096
MAX_SHORT = 256
MAX_LABELS = 64
MAX_FEATURES = 10_000
MAX_PAGE_SIZE = 1000
# Version numbers stay exact in JSON (and in every client's doubles).
MAX_VERSION = 2**53 - 1


def text(field: str, value: str, limit: int = MAX_SHORT) -> None:
    """Text of at most `limit` characters, without NUL (which PostgreSQL cannot store)."""
    if len(value) > limit:
        raise InvalidArgument(f"{field}: expected at most {limit} characters, got {len(value)}")
    if "\x00" in value:
        raise InvalidArgument(f"{field}: expected text without NUL characters")


def model_name(field: str, name: str) -> None:
    """A model name: a letter or digit, then letters, digits, '.', '_' or '-'; at most 128 characters."""
    if not MODEL_NAME.fullmatch(name):
        raise InvalidArgument(
            f"{field}: expected a model name (a letter or digit, then letters, digits, '.', '_' or '-', "
            f"at most 128 characters), got {name[:140]!r}"
        )


def alias(field: str, name: str) -> None:
    """An alias: a lower-case letter, then lower-case letters, digits, '_' or '-'; at most 63 characters."""
    if not ALIAS.fullmatch(name):
        raise InvalidArgument(
            f"{field}: expected an alias (a lower-case letter, then lower-case letters, digits, '_' or '-', "
            f"at most 63 characters), got {name[:80]!r}"
        )


def version_number(field: str, version: int, *, zero_ok: bool = False) -> None:
    """A version number: 1 or more (or 0 where it means 'none' or 'next')."""
    if not (0 if zero_ok else 1) <= version <= MAX_VERSION:
        expected = "0 or more" if zero_ok else "1 or more"
        raise InvalidArgument(f"{field}: expected a version number {expected}, at most {MAX_VERSION}, got {version}")


def sha256(field: str, value: str, *, required: bool) -> str:
    """A hex SHA-256 digest, lower-cased; empty only when not required."""
    value = value.lower()
    if not value and not required:
        return value
    if not SHA256.fullmatch(value):
        raise InvalidArgument(f"{field}: expected 64 hexadecimal digits (a SHA-256), got {value[:80]!r}")
    return value


def labels(field: str, values: Mapping[str, str]) -> None:
    """Free-form tags: at most 64, keys like 'team' or 'app.kubernetes.io/name', values at most 256 characters."""
    if len(values) > MAX_LABELS:
        raise InvalidArgument(f"{field}: expected at most {MAX_LABELS} labels, got {len(values)}")
    for key, value in values.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                f"{field}: expected keys of letters, digits, '_', '.', '/' or '-' (at most 63), got {key[:80]!r}"
            )
        text(f"{field}[{key}]", value)


def page_size(field: str, size: int, default: int) -> int:
    """The page size to use: the default for 0, at most MAX_PAGE_SIZE."""
    if size < 0:
        raise InvalidArgument(f"{field}: expected 0 (the default, {default}) or more, got {size}")
    return min(size or default, MAX_PAGE_SIZE)


def _finite(field: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"{field}: expected a finite number, got {value}")


def _metrics(field: str, values: Mapping[str, float]) -> None:
    for name, value in values.items():
        if not name:
            raise InvalidArgument(f"{field}: expected non-empty metric names")
        text(f"{field} key", name)
        _finite(f"{field}[{name}]", value)


def signature(field: str, value: rpb.ModelSignature) -> None:
    """Tensor specs with unique non-empty names, Open Inference Protocol datatypes and dimensions of -1 or more."""
    for group, specs in (("inputs", value.inputs), ("outputs", value.outputs)):
        seen: set[str] = set()
        for i, spec in enumerate(specs):
            where = f"{field}.{group}[{i}]"
            if not spec.name or spec.name in seen:
                raise InvalidArgument(f"{where}.name: expected a non-empty name unique among {group}")
            text(f"{where}.name", spec.name)
            seen.add(spec.name)
            if spec.datatype not in DATATYPES:
                raise InvalidArgument(
                    f"{where}.datatype: expected one of {', '.join(sorted(DATATYPES))}, got {spec.datatype[:40]!r}"
                )
            if any(dim < -1 for dim in spec.shape):
                raise InvalidArgument(f"{where}.shape: expected sizes of 0 or more, or -1 for a variable dimension")
    refs = list(value.feature_refs)
    if len(set(refs)) != len(refs) or any(not ref for ref in refs):
        raise InvalidArgument(f"{field}.feature_refs: expected distinct non-empty 'view:feature' refs")
    for ref in refs:
        text(f"{field}.feature_refs", ref)
    if value.feature_input and value.feature_input not in {spec.name for spec in value.inputs}:
        raise InvalidArgument(
            f"{field}.feature_input: expected the name of one of the inputs, got {value.feature_input!r}"
        )


def _histogram(field: str, histogram: spb.Histogram) -> None:
    bounds = list(histogram.bucket_bounds)
    for bound in bounds:
        _finite(f"{field}.bucket_bounds", bound)
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise InvalidArgument(f"{field}.bucket_bounds: expected strictly ascending bounds")
    if len(histogram.bucket_counts) != len(bounds) + 1:
        raise InvalidArgument(
            f"{field}.bucket_counts: expected {len(bounds) + 1} counts (one more than bucket_bounds), "
            f"got {len(histogram.bucket_counts)}"
        )
    if any(count < 0 for count in histogram.bucket_counts):
        raise InvalidArgument(f"{field}.bucket_counts: expected counts of 0 or more")


def training_statistics(field: str, features: Iterable[spb.FeatureStatistics]) -> None:
    """Per-feature statistics: unique names, consistent counts and null rate, ordered percentiles, a sane histogram."""
    seen: set[str] = set()
    for i, stats in enumerate(features):
        where = f"{field}[{i}]"
        if i >= MAX_FEATURES:
            raise InvalidArgument(f"{field}: expected at most {MAX_FEATURES} features")
        if not stats.feature_name or stats.feature_name in seen:
            raise InvalidArgument(f"{where}.feature_name: expected a non-empty name unique among the features")
        text(f"{where}.feature_name", stats.feature_name)
        seen.add(stats.feature_name)
        if stats.count < 0 or not 0 <= stats.null_count <= stats.count:
            raise InvalidArgument(f"{where}.null_count: expected 0 <= null_count <= count, got {stats.null_count}")
        if not 0.0 <= stats.null_rate <= 1.0:  # NaN fails this too
            raise InvalidArgument(f"{where}.null_rate: expected a rate in [0, 1], got {stats.null_rate}")
        if stats.HasField("numeric"):
            numeric = stats.numeric
            for name in ("mean", "stddev", "min", "max"):
                _finite(f"{where}.numeric.{name}", getattr(numeric, name))
            if numeric.stddev < 0:
                raise InvalidArgument(f"{where}.numeric.stddev: expected 0 or more, got {numeric.stddev}")
            previous = (-1.0, -math.inf)
            for p in numeric.percentiles:
                if not 0.0 <= p.quantile <= 1.0:
                    raise InvalidArgument(
                        f"{where}.numeric.percentiles: expected quantiles in [0, 1], got {p.quantile}"
                    )
                _finite(f"{where}.numeric.percentiles", p.value)
                if p.quantile <= previous[0] or p.value < previous[1]:
                    raise InvalidArgument(
                        f"{where}.numeric.percentiles: expected ascending quantiles with non-decreasing values"
                    )
                previous = (p.quantile, p.value)
            if numeric.HasField("histogram"):
                _histogram(f"{where}.numeric.histogram", numeric.histogram)
            problem = kll_problem(numeric.kll_sketch, KLL_K) if numeric.kll_sketch else None
            if problem is not None:  # drift reads it; malformed bytes would crash the manager, not just fail
                raise InvalidArgument(f"{where}.numeric.kll_sketch: expected a kll_doubles_sketch: {problem}")
        if stats.HasField("categorical"):
            categorical = stats.categorical
            if categorical.distinct_count < 0:
                raise InvalidArgument(f"{where}.categorical.distinct_count: expected 0 or more")
            for category in categorical.top_categories:
                text(f"{where}.categorical.top_categories.value", category.value)
                if category.count < 0 or not 0.0 <= category.fraction <= 1.0:
                    raise InvalidArgument(
                        f"{where}.categorical.top_categories: expected counts of 0 or more and fractions in [0, 1]"
                    )


def report(field: str, value: rpb.TrainingReport) -> None:
    """An evaluation report: finite metrics and importances, calibration bins inside [0, 1], named slices."""
    _metrics(f"{field}.metrics", value.metrics)
    _metrics(f"{field}.feature_importance", value.feature_importance)
    for key, parameter in value.parameters.items():
        text(f"{field}.parameters key", key)
        text(f"{field}.parameters[{key[:40]}]", parameter, MAX_TEXT)
    text(f"{field}.training_data_uri", value.training_data_uri, MAX_TEXT)
    text(f"{field}.evaluation_dataset_uri", value.evaluation_dataset_uri, MAX_TEXT)
    sha256(f"{field}.evaluation_dataset_sha256", value.evaluation_dataset_sha256, required=False)
    calibration = value.calibration
    for name in ("expected_calibration_error", "brier_score"):
        _finite(f"{field}.calibration.{name}", getattr(calibration, name))
    for i, bin_ in enumerate(calibration.bins):
        where = f"{field}.calibration.bins[{i}]"
        if not 0.0 <= bin_.lower <= bin_.upper <= 1.0:
            raise InvalidArgument(f"{where}: expected 0 <= lower <= upper <= 1, got [{bin_.lower}, {bin_.upper}]")
        if not (0.0 <= bin_.mean_predicted <= 1.0 and 0.0 <= bin_.observed_rate <= 1.0) or bin_.count < 0:
            raise InvalidArgument(f"{where}: expected mean_predicted and observed_rate in [0, 1] and count >= 0")
    for i, slice_ in enumerate(value.slices):
        where = f"{field}.slices[{i}]"
        if not slice_.slice:
            raise InvalidArgument(f"{where}.slice: expected the slice's name, e.g. 'country=FR'")
        text(f"{where}.slice", slice_.slice)
        if slice_.count < 0:
            raise InvalidArgument(f"{where}.count: expected 0 or more, got {slice_.count}")
        _metrics(f"{where}.metrics", slice_.metrics)


def backend_hints(field: str, value: rpb.BackendHints) -> None:
    """Backend hints: non-negative memory and batch size, short texts."""
    if value.expected_memory_bytes < 0:
        raise InvalidArgument(f"{field}.expected_memory_bytes: expected 0 or more, got {value.expected_memory_bytes}")
    if value.max_batch_size < 0:
        raise InvalidArgument(f"{field}.max_batch_size: expected 0 or more, got {value.max_batch_size}")
    text(f"{field}.preferred_backend", value.preferred_backend)
    labels(f"{field}.options", value.options)


def model_spec(spec: ModelSpec, field: str = "model") -> None:
    """Refuse a model to create that is not valid."""
    model_name(f"{field}.name", spec.name)
    text(f"{field}.owner", spec.owner)
    text(f"{field}.description", spec.description, MAX_TEXT)
    labels(f"{field}.labels", spec.labels)
    signature(f"{field}.signature", spec.signature)


def version_spec(spec: VersionSpec, field: str = "metadata") -> VersionSpec:
    """Refuse a version to register that is not valid; the spec with its digests lower-cased."""
    model_name(f"{field}.model_name", spec.model_name)
    if spec.format not in FORMATS:
        raise InvalidArgument(f"{field}.format: expected one of {', '.join(FORMATS)}, got {spec.format or 'none'}")
    expected = sha256(f"{field}.expected_sha256", spec.expected_sha256, required=True)
    if spec.expected_size_bytes < 0:
        raise InvalidArgument(f"{field}.expected_size_bytes: expected 0 (not checked) or more")
    version_number(f"{field}.version", spec.version, zero_ok=True)
    text(f"{field}.framework", spec.framework)
    text(f"{field}.description", spec.description, MAX_TEXT)
    text(f"{field}.source_run", spec.source_run)
    labels(f"{field}.labels", spec.labels)
    lineage = spec.lineage
    text(f"{field}.lineage.code_commit", lineage.code_commit, 128)
    text(f"{field}.lineage.training_dataset_uri", lineage.dataset_uri, MAX_TEXT)
    dataset = sha256(f"{field}.lineage.training_dataset_sha256", lineage.dataset_sha256, required=False)
    version_number(f"{field}.lineage.parent_version", lineage.parent_version, zero_ok=True)
    if spec.version and lineage.parent_version >= spec.version:
        raise InvalidArgument(f"{field}.lineage.parent_version: expected a version older than {spec.version}")
    signature(f"{field}.signature", spec.signature)
    training_statistics(f"{field}.training_statistics", spec.training_statistics)
    report(f"{field}.report", spec.report)
    backend_hints(f"{field}.backend_hints", spec.backend_hints)
    if expected == spec.expected_sha256 and dataset == lineage.dataset_sha256:
        return spec
    return replace(spec, expected_sha256=expected, lineage=replace(lineage, dataset_sha256=dataset))
