"""Rendering the manifests for the tests of tests/deploy: the validator's command line, and the
variables a container gets as the kubelet would set them."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from chassis.settings import ServiceSettings
from experiment_service.settings import ExperimentServiceSettings
from feature_service.settings import FeatureServiceSettings
from gateway.settings import GatewaySettings
from model_manager.settings import ModelManagerSettings
from predictor.settings import PredictorSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
VALIDATOR = DEPLOY / "kubernetes" / "validate"
# Secrets production creates with its own tooling (named in overlays/production/kustomization.yaml).
PROVIDED = "fresco-auth,fresco-postgres,fresco-tls,fresco-edge-tls"
SETTINGS: dict[str, type[ServiceSettings]] = {
    "gateway": GatewaySettings,
    "predictor": PredictorSettings,
    "feature-service": FeatureServiceSettings,
    "model-manager": ModelManagerSettings,
    "experiment-service": ExperimentServiceSettings,
}


def validate(binary: Path, settings: Path, deploy: Path, overlay: str, out: Path | None = None) -> tuple[int, str]:
    args = [
        str(binary),
        "-callgraph",
        str(deploy / "kubernetes" / "callgraph.yaml"),
        "-settings",
        str(settings),
        "-dockerfile",
        str(deploy / "docker" / "Dockerfile"),
    ]
    if overlay == "production":
        args += ["-provided-secrets", PROVIDED]
    if out is not None:
        args += ["-print-to", str(out)]
    args.append(str(deploy / "kubernetes" / "overlays" / overlay))
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, done.stdout + done.stderr


# What the kubelet would put in the variables the manifests fill from elsewhere.
FROM_ELSEWHERE = {
    "fieldRef": {"metadata.name": "fresco-pod-0", "status.podIP": "10.1.2.3"},
    "resourceFieldRef": {"limits.memory": str(4 << 30)},
}


def container_env(container: dict[str, Any], files: Path) -> dict[str, str]:
    """A container's variables as the kubelet sets them; files under /etc/fresco/ made in `files`."""
    env: dict[str, str] = {}
    for variable in container["env"]:
        if "value" in variable:
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], variable["value"])
        else:
            [(kind, ref)] = variable["valueFrom"].items()
            if kind == "secretKeyRef":
                value = "postgresql+psycopg://fresco:secret@fresco-postgres:5432/fresco"
            else:
                value = FROM_ELSEWHERE[kind][ref.get("fieldPath") or ref["resource"]]
        if value.startswith("/etc/fresco/"):
            local = files / value.lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text("mounted from a Secret or ConfigMap\n")
            value = str(local)
        env[variable["name"]] = value
    return env


def fresco_containers(rendered: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(component, its container) for each of the five services in a rendered overlay."""
    for doc in yaml.safe_load_all(rendered.read_text()):
        if doc["kind"] in ("Deployment", "StatefulSet"):
            component = doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            if component in SETTINGS:
                yield component, doc["spec"]["template"]["spec"]["containers"][0]
