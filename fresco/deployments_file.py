"""deployments.yaml, the desired state `fresco apply` declares: per model its fields, the versions to register,
aliases, the served version, the rollout strategy, gates and replicas. Parsed strictly: an unknown field or a
wrong type is reported with its YAML path before any call is made."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import duration_pb2

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.yaml_reader import Reader, mapping_of, num

FORMATS = ("onnx", "torchscript", "tensorflow_saved_model", "xgboost", "lightgbm")


class DeploymentsFileError(ValueError):
    """The file is not a valid deployments file; `problems` lists every one, each starting with its YAML path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class VersionDeclaration:
    """A version to register unless the registry holds it already (same number and sha256)."""

    version: int
    artifact: Path
    metadata: pb.UploadModelVersionMetadata  # everything but the digest, which is computed from the file


@dataclass(frozen=True)
class ModelDeclaration:
    """One entry of `models`: the model to create if missing, its versions and its deployment."""

    model: rpb.Model
    versions: tuple[VersionDeclaration, ...]
    deployment: pb.Deployment
    expected_generation: int

    @property
    def name(self) -> str:
        """The model's name."""
        return self.model.name


@dataclass(frozen=True)
class DeploymentsFile:
    """A parsed deployments file."""

    models: tuple[ModelDeclaration, ...]
    reason: str


MODEL_FIELDS = (
    "name", "owner", "description", "labels", "versions", "aliases", "serve", "strategy", "auto_rollback",
    "gates", "replicas", "max_replicas", "fallback_version", "expected_generation",
)  # fmt: skip
VERSION_FIELDS = (
    "version", "artifact", "format", "framework", "description", "labels", "metrics", "code_commit", "dataset_uri",
    "dataset_sha256", "parent_version", "source_run", "backend", "expected_memory_bytes", "reason",
)  # fmt: skip
STRATEGIES = ("blue_green", "canary", "shadow")
BLUE_GREEN_FIELDS = ("warmup", "warmup_requests", "manual_switch", "keep_previous_for", "analysis")
CANARY_FIELDS = ("steps", "analysis", "analysis_interval")
STEP_FIELDS = ("weight", "dwell", "min_samples", "mirror", "pause")
SHADOW_FIELDS = ("mirror", "duration", "min_samples", "comparison")
RATIO_LIMITS = ("max_error_ratio", "max_latency_p99_ratio")
ANALYSIS_LIMITS = (
    "max_error_rate", "max_latency_p99_ms", "max_prediction_psi", "max_score_mean_shift", "max_mean_abs_score_diff",
    "max_shadow_disagreement", *RATIO_LIMITS,
)  # fmt: skip
ANALYSIS_FIELDS = (*ANALYSIS_LIMITS, "score_output", "min_samples", "inconclusive_limit", "alpha")
ROLLBACK_FIELDS = ("enabled", "consecutive_failures", "on_unhealthy", "unhealthy_grace")
GATE_FIELDS = ("schema", "backtest", "latency")
SCHEMA_GATE_FIELDS = ("check_feature_refs", "require_output_compatibility")
LIMITS = ("min_value", "max_value", "max_regression")
BACKTEST_FIELDS = (
    "dataset", "dataset_sha256", "label_column", "metric", "lower_is_better", *LIMITS, "thresholds", "slice_column",
    "min_slice_rows", "score_output", "max_optimization_loss",
)  # fmt: skip
THRESHOLD_FIELDS = ("metric", *LIMITS, "max_relative_regression")
LATENCY_GATE_FIELDS = ("p99_budget_ms", "sample_requests", "batch_size", "warmup_requests")
_FRACTIONS = ("max_error_rate", "max_shadow_disagreement")


def load(path: Path) -> DeploymentsFile:
    """Parse and check a deployments file; artifact paths are relative to the file's directory."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DeploymentsFileError(str(path), [str(err)]) from None
    return parse(document, path.parent, str(path))


def parse(document: object, base: Path, source: str = "deployments.yaml") -> DeploymentsFile:
    """Check a loaded YAML document; DeploymentsFileError lists every problem with its YAML path."""
    problems: list[str] = []
    top = Reader(document, "", problems, ("models", "reason"))
    models = tuple(_model(Reader(item, where, problems, MODEL_FIELDS), base) for where, item in top.items("models"))
    reason = top.text("reason")
    if not models and not problems:
        problems.append("models: expected at least one model")
    seen: set[str] = set()
    for i, model in enumerate(models):
        if model.name and model.name in seen:
            problems.append(f"models[{i}].name: {model.name!r} is declared twice")
        seen.add(model.name)
    if problems:
        raise DeploymentsFileError(source, problems)
    return DeploymentsFile(models, reason)


def _model(r: Reader, base: Path) -> ModelDeclaration:
    name = r.text("name", required=True)
    model = rpb.Model(name=name, owner=r.text("owner"), description=r.text("description"), labels=r.labels("labels"))
    versions = tuple(
        _version(Reader(item, where, r.problems, VERSION_FIELDS), name, base) for where, item in r.items("versions")
    )
    numbers = [v.version for v in versions]
    for i, number in enumerate(numbers):
        if number and number in numbers[:i]:
            r.problem(f"{r.at('versions')}[{i}].version", f"version {number} is declared twice")
    deployment = pb.Deployment(
        model_name=name,
        version=r.integer("serve", minimum=1, required=True),
        aliases=_aliases(r),
        replicas=r.integer("replicas"),
        max_replicas=r.integer("max_replicas"),
        fallback_version=r.integer("fallback_version"),
    )
    if deployment.max_replicas and deployment.max_replicas < deployment.replicas:
        r.problem(r.at("max_replicas"), f"expected at least replicas ({deployment.replicas})")
    strategy = r.child("strategy", STRATEGIES)
    if strategy is None:
        r.problem(r.at("strategy"), f"required; expected one of {', '.join(STRATEGIES)}")
    else:
        deployment.strategy.CopyFrom(_strategy(strategy))
    if (rollback := r.child("auto_rollback", ROLLBACK_FIELDS)) is not None:
        deployment.auto_rollback.CopyFrom(
            ro.AutoRollbackPolicy(
                enabled=rollback.flag("enabled") if rollback.has("enabled") else True,
                consecutive_failures=rollback.integer("consecutive_failures"),
                on_unhealthy=rollback.flag("on_unhealthy"),
            )
        )
        _set_duration(deployment.auto_rollback.unhealthy_grace, rollback.duration("unhealthy_grace"))
    if (gates := r.child("gates", GATE_FIELDS)) is not None:
        deployment.gates.CopyFrom(_gates(gates))
    return ModelDeclaration(model, versions, deployment, r.integer("expected_generation"))


def _aliases(r: Reader) -> dict[str, int]:
    def number(v: object) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None

    return r.get("aliases", lambda v: mapping_of(v, number), "a mapping of alias names to version numbers >= 1", {})


def _version(r: Reader, model: str, base: Path) -> VersionDeclaration:
    number = r.integer("version", minimum=1, required=True)
    artifact = base / r.text("artifact", required=True) if r.has("artifact") else base
    if r.has("artifact") and not artifact.is_file():
        r.problem(r.at("artifact"), f"no such file: {artifact}")
    model_format = r.get("format", lambda v: v if v in FORMATS else None, f"one of {', '.join(FORMATS)}", "onnx")
    metadata = pb.UploadModelVersionMetadata(
        model_name=model,
        format=rpb.ModelFormat.Value(f"MODEL_FORMAT_{model_format.upper()}"),
        framework=r.text("framework"),
        description=r.text("description"),
        labels=r.labels("labels"),
        report=rpb.TrainingReport(metrics=r.numbers("metrics")),
        source_run=r.text("source_run"),
        lineage=rpb.Lineage(
            code_commit=r.text("code_commit"),
            training_dataset_uri=r.text("dataset_uri"),
            training_dataset_sha256=r.text("dataset_sha256"),
            parent_version=r.integer("parent_version"),
        ),
        backend_hints=rpb.BackendHints(
            preferred_backend=r.text("backend"), expected_memory_bytes=r.integer("expected_memory_bytes")
        ),
        version=number,
        reason=r.text("reason"),
    )
    return VersionDeclaration(number, artifact, metadata)


def _strategy(r: Reader) -> ro.RolloutStrategy:
    # Every strategy given is read, so that its own problems are reported along with "exactly one".
    built: list[ro.RolloutStrategy] = []
    if (blue := r.child("blue_green", BLUE_GREEN_FIELDS)) is not None:
        built.append(ro.RolloutStrategy(blue_green=_blue_green(blue)))
    if (canary := r.child("canary", CANARY_FIELDS)) is not None:
        built.append(ro.RolloutStrategy(canary=_canary(canary)))
    if (shadow := r.child("shadow", SHADOW_FIELDS)) is not None:
        built.append(ro.RolloutStrategy(shadow=_shadow(shadow)))
    given = [name for name in STRATEGIES if name in r.data]
    if len(given) != 1:
        r.problem(r.path, f"expected exactly one of {', '.join(STRATEGIES)}, got {len(given)}")
    elif not built:
        r.problem(r.at(given[0]), "expected a mapping (use {} for the defaults)")
    return built[0] if len(built) == 1 else ro.RolloutStrategy()


def _shadow(r: Reader) -> ro.ShadowStrategy:
    strategy = ro.ShadowStrategy(
        mirror_percent=_or0(r.number("mirror", 0.0, 100.0)), min_samples=r.integer("min_samples")
    )
    _set_duration(strategy.duration, r.duration("duration"))
    if (comparison := r.child("comparison", ANALYSIS_FIELDS)) is not None:
        strategy.comparison.CopyFrom(_analysis(comparison))
    return strategy


def _blue_green(r: Reader) -> ro.BlueGreenStrategy:
    strategy = ro.BlueGreenStrategy(warmup_requests=r.integer("warmup_requests"), manual_switch=r.flag("manual_switch"))
    _set_duration(strategy.warmup, r.duration("warmup"))
    _set_duration(strategy.keep_previous_for, r.duration("keep_previous_for"))
    if (analysis := r.child("analysis", ANALYSIS_FIELDS)) is not None:
        strategy.analysis.CopyFrom(_analysis(analysis))
    return strategy


def _canary(r: Reader) -> ro.CanaryStrategy:
    strategy = ro.CanaryStrategy()
    steps = r.items("steps", required=True)
    if r.has("steps") and not steps:
        r.problem(r.at("steps"), "expected at least one step")
    for where, item in steps:
        step = Reader(item, where, r.problems, STEP_FIELDS)
        canary_step = strategy.steps.add(
            traffic_percent=step.get("weight", _percent, "a number in [0, 100]", 0.0, required=True),
            min_samples=step.integer("min_samples"),
            pause=step.flag("pause"),
            mirror_percent=_or0(step.number("mirror", 0.0, 100.0)),
        )
        _set_duration(canary_step.duration, step.duration("dwell"))
    weights = [s.traffic_percent for s in strategy.steps]
    complete = all(isinstance(item, Mapping) and item.get("weight") is not None for _, item in steps)
    if complete and any(later < earlier for earlier, later in itertools.pairwise(weights)):
        r.problem(r.at("steps"), f"expected weights that never decrease, got {', '.join(num(w) for w in weights)}")
    _set_duration(strategy.analysis_interval, r.duration("analysis_interval"))
    if (analysis := r.child("analysis", ANALYSIS_FIELDS)) is not None:
        strategy.analysis.CopyFrom(_analysis(analysis))
    return strategy


def _analysis(r: Reader) -> ro.AnalysisThresholds:
    thresholds = ro.AnalysisThresholds(
        score_output=r.text("score_output"),
        min_samples=r.integer("min_samples"),
        alpha=_or0(r.number("alpha", 0.0, 1.0)),
    )
    for limit in ANALYSIS_LIMITS:
        low = 1.0 if limit in RATIO_LIMITS else 0.0
        value = r.number(limit, low, 1.0 if limit in _FRACTIONS else math.inf)
        if value is not None:
            setattr(thresholds, limit, value)
    _set_duration(thresholds.inconclusive_limit, r.duration("inconclusive_limit"))
    return thresholds


def _gates(r: Reader) -> rpb.PromotionGates:
    gates = rpb.PromotionGates()
    if (schema := r.child("schema", SCHEMA_GATE_FIELDS)) is not None:
        gates.schema.CopyFrom(
            rpb.SchemaGate(
                check_feature_refs=schema.flag("check_feature_refs"),
                require_output_compatibility=schema.flag("require_output_compatibility"),
            )
        )
    if (backtest := r.child("backtest", BACKTEST_FIELDS)) is not None:
        gate = rpb.BacktestGate(
            dataset_uri=backtest.text("dataset", required=True),
            dataset_sha256=backtest.text("dataset_sha256"),
            label_column=backtest.text("label_column", required=True),
            metric=backtest.text("metric"),
            lower_is_better=backtest.flag("lower_is_better"),
            slice_column=backtest.text("slice_column"),
            min_slice_rows=backtest.integer("min_slice_rows"),
            score_output=backtest.text("score_output"),
        )
        _limits(backtest, gate, LIMITS)
        budget = backtest.number("max_optimization_loss")  # >= 0: a loss budget, in metric units
        if budget is not None:
            gate.max_optimization_loss = budget
        for where, item in backtest.items("thresholds"):
            limit = Reader(item, where, r.problems, THRESHOLD_FIELDS)
            threshold = gate.thresholds.add(metric=limit.text("metric", required=True))
            _limits(limit, threshold, (*LIMITS, "max_relative_regression"))
        gates.backtest.CopyFrom(gate)
    if (latency := r.child("latency", LATENCY_GATE_FIELDS)) is not None:
        gates.latency.CopyFrom(
            rpb.LatencyGate(
                p99_budget_ms=_or0(latency.number("p99_budget_ms")),
                sample_requests=latency.integer("sample_requests"),
                batch_size=latency.integer("batch_size"),
                warmup_requests=latency.integer("warmup_requests"),
            )
        )
        if not latency.has("p99_budget_ms"):
            latency.problem(latency.at("p99_budget_ms"), "required; expected a number >= 0")
    return gates


def _limits(r: Reader, message: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = r.number(name, -math.inf)
        if value is not None:
            setattr(message, name, value)


def _percent(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100
    return float(value) if ok else None  # type: ignore[arg-type]


def _or0(value: float | None) -> float:
    return 0.0 if value is None else value


def _set_duration(field: duration_pb2.Duration, value: duration_pb2.Duration | None) -> None:
    if value is not None:
        field.CopyFrom(value)
