"""The Kubernetes manifests, validated offline (there is no cluster here): each overlay rendered with
kustomize's own Go API and every object decoded strictly into k8s.io/api's types, then checked by
deploy/kubernetes/validate: Services select pods, probes name served ports, every container is
non-root with a read-only root filesystem, NetworkPolicies admit exactly deploy/kubernetes/callgraph.yaml,
FRESCO_* variables are real settings, and the Dockerfile is pinned, constrained and non-root.
Each negative case breaks one thing in a copy of deploy/ and expects the validator to name it."""

from __future__ import annotations

import base64
import os
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml

from chassis.settings import ServiceSettings, parse_settings
from experiment_service.settings import ExperimentServiceSettings
from feature_service.settings import FeatureServiceSettings
from fresco.features.definitions import load_definitions
from gateway.settings import GatewaySettings
from predictor.settings import PredictorSettings
from tests.deploy.rendering import DEPLOY, ROOT, SETTINGS, container_env, fresco_containers, validate


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_overlay_renders_decodes_strictly_and_passes_every_check(
    validator: Path, settings_file: Path, overlay: str, tmp_path: Path
) -> None:
    code, output = validate(validator, settings_file, DEPLOY, overlay, out=tmp_path)
    assert code == 0, output
    assert f"ok {DEPLOY}/kubernetes/overlays/{overlay}: " in output
    rendered = (tmp_path / f"{overlay}.yaml").read_text()
    # The five services and Envoy, the backing services, in the overlay's namespace.
    namespace = {"dev": "fresco-dev", "production": "fresco"}[overlay]
    for name in (
        "fresco-gateway",
        "fresco-predictor",
        "fresco-feature-service",
        "fresco-model-manager",
        "fresco-experiment-service",
        "fresco-envoy",
        "fresco-redis",
        "fresco-redis-cluster",
        "fresco-cassandra",
        "fresco-postgres",
        "fresco-otel-collector",
    ):
        assert f"name: {name}\n  namespace: {namespace}\n" in rendered, name
    if overlay == "production":
        assert "FRESCO_GATEWAY_TLS_CERT_FILE" in rendered
        assert "FRESCO_PREDICTOR_HEALTH_PORT" in rendered
        assert "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext" in rendered
    else:
        assert "TLS_CERT_FILE" not in rendered


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_each_service_parses_the_settings_its_manifest_gives_it(
    validator: Path, settings_file: Path, overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, output = validate(validator, settings_file, DEPLOY, overlay, out=tmp_path)
    assert code == 0, output
    seen: dict[str, ServiceSettings] = {}
    for component, container in fresco_containers(tmp_path / f"{overlay}.yaml"):
        env = container_env(container, tmp_path / component)
        with monkeypatch.context() as patched:
            for name in [n for n in os.environ if n.startswith("FRESCO_")]:
                patched.delenv(name)
            for name, value in env.items():
                patched.setenv(name, value)
            # As `python -m <service>` reads them: no flags, the variables, then defaults.
            settings = parse_settings(SETTINGS[component], [])
        seen[component] = settings
        assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", 50051, 9464), component
        assert settings.auth_enabled, component
        assert settings.tracing_exporter == "otlp", component
        if overlay == "production":
            assert settings.tls_cert_file is not None, component
            assert settings.peer_tls_server_name == "fresco.internal", component
            assert settings.health_port == 50052, component
        else:
            assert settings.tls_cert_file is None, component
            assert settings.health_port == -1, component
        if isinstance(settings, PredictorSettings):
            assert settings.predictor_id == "fresco-pod-0"
            assert settings.advertise_address == "10.1.2.3:50051"
            assert settings.memory_capacity_bytes == 4 << 30
            assert settings.http_port == -1  # its default, 0, would listen on a random port
        if isinstance(settings, FeatureServiceSettings):
            assert settings.cassandra_contact_points == ["fresco-cassandra"]
            assert settings.backend == "redis+cassandra"
            assert settings.redis_cluster
            assert settings.redis_url == "redis://fresco-redis-cluster:6379/0"
    assert set(seen) == set(SETTINGS)
    # Bandit units keep one first arm whether the gateway or the experiment service assigned them.
    gateway, experiments = seen["gateway"], seen["experiment-service"]
    assert isinstance(gateway, GatewaySettings)
    assert isinstance(experiments, ExperimentServiceSettings)
    assert gateway.sticky_redis_url == experiments.redis_url


def test_feature_definitions_shipped_in_the_base_load() -> None:
    definitions = load_definitions(DEPLOY / "kubernetes" / "base" / "features.yaml")
    assert definitions is not None


GATEWAY_PEER = "{podSelector: {matchLabels: {app.kubernetes.io/part-of: fresco, app.kubernetes.io/component: gateway}}}"
MANAGER_PEER = GATEWAY_PEER.replace("gateway", "model-manager")
# (file under deploy/, text replaced once, replacement, what the validator must say)
BREAKAGES = [
    pytest.param(
        "kubernetes/base/gateway.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFileSystem: true",
        'unknown field "spec.template.spec.containers[0].securityContext.readOnlyRootFileSystem"',
        id="misspelled-field",
    ),
    pytest.param(
        "kubernetes/base/predictor.yaml",
        "readinessProbe: {grpc: {port: 50051}",
        "readinessProbe: {grpc: {port: 50061}",
        "readiness probe names port 50061, which the container does not serve",
        id="probe-on-unserved-port",
    ),
    pytest.param(
        "kubernetes/base/feature-service.yaml",
        "selector: {app.kubernetes.io/part-of: fresco, app.kubernetes.io/component: feature-service}",
        "selector: {app.kubernetes.io/part-of: fresco, app.kubernetes.io/component: feature-servce}",
        "Service fresco-dev/fresco-feature-service selects no pods",
        id="service-selects-nothing",
    ),
    pytest.param(
        "kubernetes/base/experiment-service.yaml",
        "allowPrivilegeEscalation: false",
        "allowPrivilegeEscalation: true",
        "container experiment-service: allowPrivilegeEscalation is not false",
        id="privilege-escalation",
    ),
    pytest.param(
        "kubernetes/components/backing/redis.yaml",
        "runAsUser: 999,",
        "runAsUser: 0,",
        "container redis: runAsUser (pod or container) is not a non-root uid",
        id="root-user",
    ),
    pytest.param(
        "kubernetes/base/network-policies.yaml",
        f"{GATEWAY_PEER}, {MANAGER_PEER}]",
        f"{GATEWAY_PEER}]",
        "NetworkPolicies refuse the call model-manager -> predictor:grpc/TCP",
        id="policy-refuses-a-call",
    ),
    pytest.param(
        "kubernetes/components/backing/postgres.yaml",
        "      ports: [{port: postgres}]",
        "    - {}",
        "NetworkPolicies admit clients -> postgres:postgres/TCP, which is not in the call graph",
        id="policy-admits-too-much",
    ),
    pytest.param(
        "kubernetes/base/network-policies.yaml",
        "ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]",
        "ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]\n    - {}",
        "NetworkPolicies let gateway reach the internet",
        id="egress-open-to-all",
    ),
    pytest.param(
        "kubernetes/base/gateway.yaml",
        "FRESCO_GATEWAY_STICKY_REDIS_URL",
        "FRESCO_GATEWAY_STICKY_REDIS_URI",
        "env FRESCO_GATEWAY_STICKY_REDIS_URI is not a setting of gateway",
        id="not-a-setting",
    ),
    pytest.param(
        "kubernetes/base/model-manager.yaml",
        "secretKeyRef: {name: fresco-postgres,",
        "secretKeyRef: {name: fresco-postgress,",
        "reads Secret fresco-postgress, which is neither rendered nor provided outside",
        id="missing-secret",
    ),
    pytest.param(
        "docker/Dockerfile",
        "USER 10001:10001",
        "USER fresco",
        'the final stage\'s USER is "fresco": expected a numeric non-root uid',
        id="dockerfile-named-user",
    ),
    pytest.param(
        "docker/Dockerfile",
        "pip install -c constraints.txt '.[server,xds]'",
        "pip install '.[server,xds]'",
        "pip install without -c constraints.txt",
        id="dockerfile-unconstrained-pip",
    ),
]


@pytest.mark.parametrize(("relative", "old", "new", "expected"), BREAKAGES)
def test_a_broken_copy_fails_naming_what_broke(
    validator: Path, settings_file: Path, tmp_path: Path, relative: str, old: str, new: str, expected: str
) -> None:
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("validate"))
    path = copy / relative
    text = path.read_text()
    assert old in text, f"{relative} no longer holds {old!r}: update this case"
    path.write_text(text.replace(old, new, 1))
    code, output = validate(validator, settings_file, copy, "dev")
    assert code == 1, output
    assert expected in output, output


def test_the_image_holds_every_package_and_the_extras_it_installs_exist() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {name.rstrip("*") for name in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+) \1$", dockerfile, flags=re.MULTILINE))
    assert copied == packages
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {f"!{name}/" for name in packages} <= set(ignore)
    [extras] = re.findall(r"'\.\[([\w,]+)\]'", dockerfile)
    assert set(extras.split(",")) <= set(project["project"]["optional-dependencies"])


def test_every_address_a_service_is_given_is_a_call_of_the_graph(
    validator: Path, settings_file: Path, tmp_path: Path
) -> None:
    """Each host:port a container's variables (or the Secrets they read) name is a Service of the
    namespace, and (caller, callee, port) is in callgraph.yaml: a new address needs its policy."""
    code, output = validate(validator, settings_file, DEPLOY, "dev", out=tmp_path)
    assert code == 0, output
    docs = list(yaml.safe_load_all((tmp_path / "dev.yaml").read_text()))
    secrets = {
        (d["metadata"]["name"], key): base64.b64decode(value).decode()
        for d in docs
        if d["kind"] == "Secret"
        for key, value in d.get("data", {}).items()
    }
    # Service name -> (callee component, {service port: the container port's name it targets}).
    services = {
        d["metadata"]["name"]: (
            d["spec"]["selector"]["app.kubernetes.io/component"],
            {p["port"]: p["targetPort"] for p in d["spec"]["ports"]},
        )
        for d in docs
        if d["kind"] == "Service"
    }
    graph = yaml.safe_load((DEPLOY / "kubernetes" / "callgraph.yaml").read_text())
    calls = {(c["from"], c["to"], c["port"]) for c in graph["calls"]}
    made = set()
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        caller = doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                value = secrets[(ref["name"], ref["key"])] if ref else variable.get("value", "")
                for host, port in re.findall(r"(?:^|[/@\"'])(fresco-[a-z-]+?)(?:-\d+\.[a-z-]+)?:(\d+)", value):
                    assert host in services, f"{caller} {variable['name']} names {host}, which is no Service"
                    callee, ports = services[host]
                    made.add((caller, callee, ports[int(port)]))
                for host in re.findall(r"\[\"(fresco-[a-z-]+)\"\]", value):  # a list of contact points
                    made.add((caller, services[host][0], "cql"))
    assert made, "no addresses found: the pattern above no longer matches the manifests"
    assert made <= calls, sorted(made - calls)
    # And each call the graph lists from one of the five services comes from some setting.
    frescos = {"gateway", "predictor", "feature-service", "model-manager", "experiment-service"}
    listed = {
        c for c in calls if c[0] in frescos and c[1] in frescos | {"redis", "redis-cluster", "cassandra", "postgres"}
    }
    # The model manager dials predictors at the addresses they register with, not at a Service.
    assert listed - made == {("model-manager", "predictor", "grpc")}, sorted(made)
