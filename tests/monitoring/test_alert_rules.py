"""The alert rules in deploy/prometheus: promtool checks them and runs their unit tests (a broken rule fails this,
and so CI), and the model manager's reader finds each alert's name, `for:`, severity and metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from model_manager.alert_rules import AlertRulesError, duration_s, load_rules, metric_names, parse
from model_manager.settings import ModelManagerSettings

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing although make test installs it (Debian's prometheus package)")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_checks_the_rules_and_the_example_config() -> None:
    rules = promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 6 rules found" in rules.stdout
    config = promtool("check", "config", "prometheus.yml", cwd=RULES.parent)
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("alert", "change"),
    [
        ("FrescoPredictionErrorRateHigh", ("for: 3m", "for: 2m")),
        ("FrescoModelAccuracyLow", (">= 100\n", ">= 10\n")),
        ("FrescoFeatureDrift", ("for: 1h", "for: 30m")),
        ("FrescoFeatureDrift", (">= 1000\n", ">= 100\n")),
    ],
)
def test_a_changed_rule_fails_its_unit_tests(tmp_path: Path, alert: str, change: tuple[str, str]) -> None:
    """The unit tests pin the thresholds and durations: a rule file that drifts from them fails (exit 1)."""
    text = RULES.read_text()
    assert text.count(change[0]) == 1
    (tmp_path / "tests").mkdir()
    (tmp_path / "alerts.yml").write_text(text.replace(*change))
    for test in RULE_TESTS:
        shutil.copy(test, tmp_path / "tests" / test.name)
    result = promtool("test", "rules", *(str(tmp_path / "tests" / t.name) for t in RULE_TESTS))
    assert result.returncode == 1, result.stdout
    assert alert in result.stdout + result.stderr


def test_the_manager_reads_every_alert_of_the_shipped_rules() -> None:
    rules = {rule.name: rule for rule in load_rules([RULES])}
    assert {name: (rule.for_s, rule.severity, rule.metrics) for name, rule in rules.items()} == {
        "FrescoPredictionErrorRateHigh": (180.0, "critical", frozenset({"fresco_model_requests_total"})),
        "FrescoPredictionLatencyP99High": (300.0, "critical", frozenset({"fresco_model_request_seconds_bucket"})),
        "FrescoModelAccuracyLow": (
            600.0,
            "critical",
            frozenset({"fresco_model_accuracy", "fresco_model_labelled_predictions"}),
        ),
        "FrescoFeatureDrift": (
            3600.0,
            "warning",
            frozenset({"fresco_feature_drift_psi", "fresco_feature_drift_values"}),
        ),
        "FrescoFeatureCacheHitRateLow": (900.0, "warning", frozenset({"fresco_feature_tier_keys_total"})),
        "FrescoGpuUtilisationLow": (1800.0, "warning", frozenset({"fresco_gpu_utilization_ratio"})),
    }
    assert "rate(fresco_model_requests_total" in rules["FrescoPredictionErrorRateHigh"].expr


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (model) (rate(a_total{x="by (b)"}[5m])) / on (model) group_left (c) b_total', {"a_total", "b_total"}),
        ("histogram_quantile(0.99, sum without (pod) (rate(lat_bucket[1m] offset 5m))) > 1e3", {"lat_bucket"}),
        ('{__name__="named_metric", job="x"} and bool up', {"named_metric", "up"}),
        ("max_over_time(deriv(g:recorded[10m:1m])[1h:]) unless absent(other)", {"g:recorded", "other"}),
        ("vector(1) > 0 and time() > 5", set()),
    ],
)
def test_metric_names_are_the_selected_series_only(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_durations_read_as_prometheus_writes_them() -> None:
    assert duration_s("1h30m") == 5400.0
    assert duration_s("500ms") == 0.5
    assert duration_s("2d") == 172800.0
    assert duration_s("5 minutes") is None
    assert duration_s("") is None


def test_recording_rules_are_skipped_and_for_defaults_to_zero() -> None:
    document = {
        "groups": [
            {"name": "g", "rules": [{"record": "job:x:rate5m", "expr": "rate(x[5m])"}, {"alert": "A", "expr": "x > 1"}]}
        ]
    }
    (rule,) = parse(document, "inline")
    assert (rule.name, rule.for_s, rule.severity, rule.metrics) == ("A", 0.0, "", frozenset({"x"}))


def test_a_bad_rule_file_names_the_file_and_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: g\n  rules:\n  - {alert: A, expr: up, for: soon, fo: 1}\n")
    with pytest.raises(AlertRulesError) as caught:
        load_rules([bad])
    message = str(caught.value)
    assert message.startswith(f"{bad}: ")
    assert "groups[0].rules[0].for: expected a duration" in message
    assert "groups[0].rules[0].fo: unknown field (did you mean for?)" in message
    with pytest.raises(AlertRulesError, match="No such file"):
        load_rules([tmp_path / "missing.yml"])


def test_the_manager_flag_repeats_and_refuses_a_bad_file_at_start(tmp_path: Path) -> None:
    other = tmp_path / "other.yml"
    other.write_text("groups:\n  - name: g\n    rules:\n      - alert: Mine\n        expr: up == 0\n        for: 1m\n")
    settings = ModelManagerSettings(_cli_parse_args=["--alert-rules", str(RULES), "--alert-rules", str(other)])
    assert settings.alert_rules == [RULES, other]
    assert [r.name for r in load_rules(settings.alert_rules)][-1] == "Mine"
    broken = tmp_path / "broken.yml"
    broken.write_text("groups: [{name: g, rules: [{alert: A}]}]\n")
    with pytest.raises(ValueError, match=r"groups\[0\]\.rules\[0\]\.expr: required"):
        ModelManagerSettings(_cli_parse_args=["--alert-rules", str(broken)])
