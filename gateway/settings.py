"""Gateway settings: flags of `python -m gateway`, or `FRESCO_GATEWAY_*` variables."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from chassis.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    """Settings of the gateway."""

    model_config = SettingsConfigDict(env_prefix="FRESCO_GATEWAY_", cli_prog_name="python -m gateway")

    predictor: str | None = None
    """host:port of the predictor serving every model without a route of its own."""
    feature_service: str | None = None
    """host:port of the feature service, for predictions that name entity keys instead of features."""
    feature_timeout_s: float = 2.0
    """Deadline of a call to the feature service when the caller set none."""
    routes_file: Path | None = None
    """YAML file of static routes: a list of {model, predictors: [host:port, ...]}."""
    predictor_timeout_s: float = 5.0
    """Deadline of a call to a predictor when the caller set none."""
    metadata_ttl_s: float = 30.0
    """How long a model's metadata (tensor names, shapes, feature order) is cached."""
