"""Service settings: defaults, per-service env prefixes, kebab-case flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from chassis.settings import DEFAULT_MAX_MESSAGE_BYTES, ServiceSettings, parse_settings
from predictor.settings import PredictorSettings


class DemoSettings(ServiceSettings):
    """A service of the tests' own, with its own prefix."""

    model_config = SettingsConfigDict(env_prefix="FRESCO_UNITDEMO_")

    queue_depth: int = 16
    """How many requests may wait."""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith(("FRESCO_UNITDEMO_", "FRESCO_PREDICTOR_")):
            monkeypatch.delenv(key)


def test_max_message_size_default_is_64_mib() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    assert DemoSettings().max_message_bytes == 64 * 1024 * 1024


def test_defaults() -> None:
    settings = parse_settings(DemoSettings, [])
    assert settings.host == "127.0.0.1"
    assert settings.port == 0
    assert settings.grace_period_s == 10.0
    assert settings.metrics_port == 0
    assert settings.tracing_exporter == "none"
    assert settings.otlp_endpoint == "127.0.0.1:4317"
    assert settings.log_level == "INFO"
    assert settings.log_format == "json"
    assert settings.queue_depth == 16


def test_subclass_reads_its_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESCO_UNITDEMO_PORT", "7001")
    monkeypatch.setenv("FRESCO_UNITDEMO_QUEUE_DEPTH", "3")
    monkeypatch.setenv("FRESCO_UNITDEMO_MAX_MESSAGE_BYTES", "1024")
    monkeypatch.setenv("FRESCO_PREDICTOR_PORT", "9999")  # another service's variable is not ours
    monkeypatch.setenv("PORT", "8888")  # nor is an unprefixed one
    settings = parse_settings(DemoSettings, [])
    assert (settings.port, settings.queue_depth, settings.max_message_bytes) == (7001, 3, 1024)


def test_predictor_settings_use_the_predictor_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FRESCO_PREDICTOR_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("FRESCO_PREDICTOR_INFERENCE_THREADS", "5")
    settings = parse_settings(PredictorSettings, [])
    assert settings.model_repository == tmp_path
    assert settings.inference_threads == 5
    assert settings.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES


def test_kebab_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESCO_UNITDEMO_MAX_MESSAGE_BYTES", "1024")
    monkeypatch.setenv("FRESCO_UNITDEMO_GRACE_PERIOD_S", "3")
    monkeypatch.setenv("FRESCO_UNITDEMO_QUEUE_DEPTH", "3")
    settings = parse_settings(
        DemoSettings, ["--max-message-bytes", "2048", "--grace-period-s", "0.5", "--tracing-exporter", "console"]
    )
    assert settings.max_message_bytes == 2048
    assert settings.grace_period_s == 0.5
    assert settings.tracing_exporter == "console"
    assert settings.queue_depth == 3  # no flag: the env var still applies


def test_bad_flag_value_is_rejected() -> None:
    with pytest.raises(ValidationError, match="tracing_exporter"):
        parse_settings(DemoSettings, ["--tracing-exporter", "jaeger"])
