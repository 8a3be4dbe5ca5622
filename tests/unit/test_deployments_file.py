"""deployments.yaml: a full file maps onto the contract's messages; unknown or misspelled fields and wrong types
are reported with their YAML path, all of them at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import rollout_pb2 as ro
from fresco.deployments_file import DeploymentsFileError, load

FULL = """
reason: weekly retrain
models:
  - name: churn
    owner: risk
    description: who leaves
    labels: {team: risk, tier: 1}
    versions:
      - version: 1
        artifact: v1.onnx
      - version: 2
        artifact: models/v2.onnx
        format: onnx
        framework: sklearn 1.5
        metrics: {auc: 0.91, logloss: 0.3}
        code_commit: abc123
        dataset_uri: s3://data/train.parquet
        dataset_sha256: "00ff"
        parent_version: 1
        backend: onnxruntime
        expected_memory_bytes: 1048576
        labels: {run: "42"}
    aliases: {champion: 2, previous: 1}
    serve: 2
    strategy:
      canary:
        steps:
          - {weight: 10, dwell: 30s, min_samples: 200}
          - {weight: 50, dwell: 2m, mirror: 10, pause: true}
        analysis_interval: 10s
        analysis:
          max_error_rate: 0.05
          max_error_ratio: 2
          max_latency_p99_ms: 50
          min_samples: 100
          inconclusive_limit: 30m
          score_output: probabilities
    auto_rollback: {consecutive_failures: 2, on_unhealthy: true, unhealthy_grace: 45s}
    gates:
      schema: {check_feature_refs: true}
      backtest:
        dataset: holdout.parquet
        dataset_sha256: "ab"
        label_column: label
        metric: auc
        min_value: 0.8
        max_optimization_loss: 0.002
        thresholds:
          - {metric: logloss, max_value: 0.5, max_relative_regression: 0.05}
      latency: {p99_budget_ms: 20, sample_requests: 200}
    replicas: 2
    max_replicas: 4
    fallback_version: 1
    expected_generation: 3
  - name: fraud
    serve: 7
    strategy:
      blue_green: {warmup: 500ms, keep_previous_for: 5m}
"""


def write(tmp_path: Path, text: str, artifacts: tuple[str, ...] = ("v1.onnx", "models/v2.onnx")) -> Path:
    for name in artifacts:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    path = tmp_path / "deployments.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(DeploymentsFileError) as caught:
        load(write(tmp_path, text))
    return caught.value.problems


def test_a_full_file_maps_onto_the_contract(tmp_path: Path) -> None:
    parsed = load(write(tmp_path, FULL))
    assert parsed.reason == "weekly retrain"
    churn, fraud = parsed.models
    assert (churn.name, churn.model.owner, dict(churn.model.labels)) == ("churn", "risk", {"team": "risk", "tier": "1"})
    assert [(v.version, v.artifact) for v in churn.versions] == [
        (1, tmp_path / "v1.onnx"),
        (2, tmp_path / "models" / "v2.onnx"),  # relative to the file's directory
    ]
    second = churn.versions[1].metadata
    assert (second.model_name, second.version, second.format) == ("churn", 2, rpb.MODEL_FORMAT_ONNX)
    assert dict(second.report.metrics) == {"auc": 0.91, "logloss": 0.3}
    assert (second.lineage.parent_version, second.lineage.training_dataset_sha256) == (1, "00ff")
    assert second.backend_hints == rpb.BackendHints(preferred_backend="onnxruntime", expected_memory_bytes=1 << 20)
    assert churn.expected_generation == 3

    deployment = churn.deployment
    assert (deployment.model_name, deployment.version, dict(deployment.aliases)) == (
        "churn",
        2,
        {"champion": 2, "previous": 1},
    )
    assert (deployment.replicas, deployment.max_replicas, deployment.fallback_version) == (2, 4, 1)
    canary = deployment.strategy.canary
    assert [
        (s.traffic_percent, s.duration.seconds, s.min_samples, s.mirror_percent, s.pause) for s in canary.steps
    ] == [
        (10, 30, 200, 0, False),
        (50, 120, 0, 10, True),
    ]
    assert canary.analysis_interval.seconds == 10
    analysis = canary.analysis
    assert (analysis.max_error_rate, analysis.max_error_ratio, analysis.max_latency_p99_ms) == (0.05, 2, 50)
    assert not analysis.HasField("max_prediction_psi")  # an unset limit is not checked
    assert (analysis.min_samples, analysis.inconclusive_limit.seconds, analysis.score_output) == (
        100,
        1800,
        "probabilities",
    )
    assert deployment.auto_rollback == ro.AutoRollbackPolicy(
        enabled=True, consecutive_failures=2, on_unhealthy=True, unhealthy_grace=duration_pb2.Duration(seconds=45)
    )
    gates = deployment.gates
    assert gates.schema.check_feature_refs
    assert (gates.backtest.dataset_uri, gates.backtest.metric, gates.backtest.min_value) == (
        "holdout.parquet",
        "auc",
        0.8,
    )
    assert not gates.backtest.HasField("max_value")
    assert gates.backtest.max_optimization_loss == 0.002
    (threshold,) = gates.backtest.thresholds
    assert (threshold.metric, threshold.max_value, threshold.max_relative_regression) == ("logloss", 0.5, 0.05)
    assert not threshold.HasField("min_value")
    assert (gates.latency.p99_budget_ms, gates.latency.sample_requests) == (20, 200)

    assert fraud.versions == ()
    blue_green = fraud.deployment.strategy.blue_green
    assert (blue_green.warmup.nanos, blue_green.keep_previous_for.seconds) == (500_000_000, 300)
    assert not fraud.deployment.HasField("auto_rollback")  # unset: the server's default policy
    assert not fraud.deployment.HasField("gates")


def test_a_misspelled_field_is_named_by_its_path_with_the_fields_expected(tmp_path: Path) -> None:
    text = FULL.replace("- {weight: 50, dwell: 2m,", "- {wieght: 50, dwell: 2m,")
    found = problems(tmp_path, text)
    assert found[0] == (
        "models[0].strategy.canary.steps[1].wieght: unknown field (did you mean weight?); "
        "expected one of dwell, min_samples, mirror, pause, weight"
    )
    assert "models[0].strategy.canary.steps[1].weight: required; expected a number in [0, 100]" in found


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("    owner: risk", "    ownr: risk", "models[0].ownr: unknown field (did you mean owner?); expected one of"),
        (
            "reason: weekly",
            "reasons: weekly",
            "reasons: unknown field (did you mean reason?); expected one of models, reason",
        ),
        ("        code_commit: abc123", "        commit: abc123", "models[0].versions[1].commit: unknown field"),
        (
            "          max_error_rate: 0.05",
            "          max_eror_rate: 0.05",
            "models[0].strategy.canary.analysis.max_eror_rate",
        ),
        (
            "      latency: {p99_budget_ms: 20,",
            "      latency: {p99: 20,",
            "models[0].gates.latency.p99: unknown field",
        ),
        (
            "          - {metric: logloss,",
            "          - {metrc: logloss,",
            "models[0].gates.backtest.thresholds[0].metrc",
        ),
        (
            "blue_green: {warmup",
            "bluegreen: {warmup",
            "models[1].strategy.bluegreen: unknown field (did you mean blue_green?)",
        ),
    ],
)
def test_unknown_fields_at_every_depth(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in FULL
    found = problems(tmp_path, FULL.replace(old, new))
    assert any(problem.startswith(expected) for problem in found), found


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("    serve: 2", '    serve: "2"', "models[0].serve: expected an integer >= 1, got '2'"),
        ("    serve: 2", "    serve: true", "models[0].serve: expected an integer >= 1, got True"),
        ("    replicas: 2", "    replicas: -1", "models[0].replicas: expected an integer >= 0, got -1"),
        (
            "{weight: 10, dwell: 30s",
            "{weight: 110, dwell: 30s",
            "models[0].strategy.canary.steps[0].weight: expected a number in [0, 100], got 110",
        ),
        ("dwell: 30s", "dwell: 30 seconds", "models[0].strategy.canary.steps[0].dwell: expected a duration such as"),
        (
            "          max_error_rate: 0.05",
            "          max_error_rate: 5",
            "models[0].strategy.canary.analysis.max_error_rate: expected a number in [0, 1], got 5",
        ),
        (
            "        max_optimization_loss: 0.002",
            "        max_optimization_loss: -0.1",
            "models[0].gates.backtest.max_optimization_loss: expected a number >= 0, got -0.1",
        ),
        (
            "          max_error_ratio: 2",
            "          max_error_ratio: 0.5",
            "models[0].strategy.canary.analysis.max_error_ratio: expected a number >= 1, got 0.5",
        ),
        (
            "    labels: {team: risk, tier: 1}",
            "    labels: [risk]",
            "models[0].labels: expected a mapping of names to strings, got a list",
        ),
        (
            "        metrics: {auc: 0.91, logloss: 0.3}",
            "        metrics: {auc: high}",
            "models[0].versions[1].metrics: expected a mapping of names to finite numbers",
        ),
        (
            "    aliases: {champion: 2, previous: 1}",
            "    aliases: {champion: two}",
            "models[0].aliases: expected a mapping of alias names to version numbers >= 1",
        ),
        (
            "        format: onnx",
            "        format: pickle",
            "models[0].versions[1].format: expected one of onnx, torchscript",
        ),
        (
            "      schema: {check_feature_refs: true}",
            "      schema: {check_feature_refs: yes please}",
            "models[0].gates.schema.check_feature_refs: expected true or false, got 'yes please'",
        ),
        (
            "        artifact: v1.onnx",
            "        artifact: missing.onnx",
            "models[0].versions[0].artifact: no such file: ",
        ),
        ("    max_replicas: 4", "    max_replicas: 1", "models[0].max_replicas: expected at least replicas (2)"),
        ("    steps:", "    stepz:", "models[0].strategy.canary.stepz: unknown field"),
    ],
)
def test_type_errors_name_the_path_and_what_was_expected(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in FULL
    found = problems(tmp_path, FULL.replace(old, new, 1))
    assert any(problem.startswith(expected) for problem in found), found


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """
models:
  - name: churn
    versions:
      - {version: 0, artifact: v1.onnx}
      - {version: 1, artifact: v1.onnx}
      - {version: 1, artifact: v1.onnx}
    strategy:
      canary: {steps: [{weight: 50}, {weight: 10}]}
      shadow: {mirror: 20}
  - name: churn
    serve: 1
    strategy: {shadow: {mirror: 20, duration: 5m, comparison: {max_mean_abs_score_diff: 0.1}}}
"""
    assert problems(tmp_path, text) == [
        "models[0].versions[0].version: expected an integer >= 1, got 0",
        "models[0].versions[2].version: version 1 is declared twice",
        "models[0].serve: required; expected an integer >= 1",
        "models[0].strategy.canary.steps: expected weights that never decrease, got 50, 10",
        "models[0].strategy: expected exactly one of blue_green, canary, shadow, got 2",
        "models[1].name: 'churn' is declared twice",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "document: expected a mapping, got nothing"),
        ("- a\n- b\n", "document: expected a mapping, got a list"),
        ("models: []\n", "models: expected at least one model"),
        ("models: {name: x}\n", "models: expected a list, got a mapping"),
        ("models: [{name: x, serve: 1}]\n", "models[0].strategy: required; expected one of blue_green, canary, shadow"),
        ("models: [{name: x, serve: 1, strategy: {canary: null}}]\n", "models[0].strategy.canary: expected a mapping"),
        (
            "models: [{name: x, serve: 1, strategy: {canary: {steps: []}}}]\n",
            "models[0].strategy.canary.steps: expected at least one step",
        ),
        ("models: [{serve: 1, strategy: {blue_green: {}}}]\n", "models[0].name: required; expected a non-empty string"),
    ],
)
def test_the_shape_of_the_document(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(expected in problem for problem in found), found


def test_yaml_syntax_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DeploymentsFileError) as caught:
        load(write(tmp_path, "models: [unclosed\n"))
    assert str(caught.value).startswith(f"{tmp_path / 'deployments.yaml'}: while parsing")


def test_a_blue_green_with_defaults_is_an_empty_mapping(tmp_path: Path) -> None:
    parsed = load(write(tmp_path, "models: [{name: x, serve: 1, strategy: {blue_green: {}}}]\n"))
    assert parsed.models[0].deployment.strategy.WhichOneof("kind") == "blue_green"


def test_the_example_in_the_repository_parses(tmp_path: Path) -> None:
    example = Path(__file__).parents[2] / "examples" / "deployments" / "demo.yaml"
    artifacts = ("work/models/demo/1/model.onnx", "work/models/demo/2/model.onnx")
    parsed = load(write(tmp_path, example.read_text(), artifacts))
    (demo,) = parsed.models
    assert [v.version for v in demo.versions] == [1, 2]
    assert (demo.deployment.version, demo.deployment.strategy.WhichOneof("kind")) == (2, "canary")
