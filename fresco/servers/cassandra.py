"""A real single-node Cassandra 5.0 from Maven Central's cassandra-all jars on Java 17: no tarball, no Docker."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import string
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from fresco.servers._process import ServerError, ServerProcess, free_ports, port_open, require_binary, tail

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "local" / "cassandra"
_JAVA_HOMES = ("/usr/lib/jvm/java-17-openjdk-amd64", "/usr/lib/jvm/java-17-openjdk-arm64")
_JAVA_HINT = "apt-get install -y openjdk-17-jre-headless (or set FRESCO_CASSANDRA_JAVA to a Java 11/17 binary)"


def cassandra_version() -> str:
    """The Cassandra version pinned in deploy/local/cassandra/pom.xml, the one place it is set."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(DEPLOY_DIR / "pom.xml").find("m:properties/m:cassandra.version", ns)
    if node is None or not node.text:
        raise ServerError(f"no <cassandra.version> property in {DEPLOY_DIR / 'pom.xml'}")
    return node.text.strip()


def default_lib_dir() -> Path:
    """$FRESCO_CASSANDRA_LIB_DIR, else ~/.cache/fresco/cassandra/<version>/lib."""
    if override := os.environ.get("FRESCO_CASSANDRA_LIB_DIR"):
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fresco" / "cassandra" / cassandra_version() / "lib"


def fetch_jars(lib_dir: Path | None = None) -> Path:
    """Copy cassandra-all and its runtime dependencies into lib_dir with Maven, unless they are there already."""
    lib = lib_dir or default_lib_dir()
    version = cassandra_version()
    if (lib / f"cassandra-all-{version}.jar").exists():
        return lib
    mvn = require_binary("mvn", "apt-get install -y maven")
    # Fetch into a sibling and rename, so a half-done or concurrent fetch never leaves a partial lib/.
    lib.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{lib.name}.partial-", dir=lib.parent))
    command = [mvn, "-q", "-B", "-f", str(DEPLOY_DIR / "pom.xml"), "dependency:copy-dependencies",
               f"-DoutputDirectory={partial}", "-DincludeScope=runtime"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not (partial / f"cassandra-all-{version}.jar").exists():
        shutil.rmtree(partial, ignore_errors=True)
        raise ServerError(
            f"mvn could not fetch cassandra-all {version}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
        )
    try:
        partial.rename(lib)
    except OSError:  # another process won the race; its lib/ is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    return lib


def find_java() -> str:
    """$FRESCO_CASSANDRA_JAVA, else Debian's OpenJDK 17: Cassandra 5.0 runs on Java 11 or 17, not 21."""
    if chosen := os.environ.get("FRESCO_CASSANDRA_JAVA"):
        if not os.access(chosen, os.X_OK):
            raise ServerError(f"FRESCO_CASSANDRA_JAVA={chosen} is not an executable")
        return chosen
    for candidate in (f"{home}/bin/java" for home in _JAVA_HOMES):
        if os.access(candidate, os.X_OK):
            return candidate
    raise ServerError(f"no Java 17 found at {', '.join(_JAVA_HOMES)}; install it with: {_JAVA_HINT}")


def jvm_options() -> list[str]:
    """The flags in deploy/local/cassandra/jvm17.options, comments and blank lines dropped."""
    lines = (DEPLOY_DIR / "jvm17.options").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class CassandraNode(ServerProcess):
    """One Cassandra node on 127.0.0.1; `restart()` keeps ports and data, so the commitlog replays what was written."""

    name = "cassandra"
    start_timeout_s = 180.0
    stop_timeout_s = 60.0

    def __init__(self, base_dir: Path | None = None, lib_dir: Path | None = None, quick_jit: bool = True) -> None:
        """quick_jit: C1 only, which starts a node in about half the time on two cores; benchmarks pass False for C2."""
        self._owns_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="fresco-cassandra-")) if base_dir is None else base_dir.resolve()
        self.lib_dir = lib_dir
        self.quick_jit = quick_jit
        self.release_version = ""
        self._java = ""
        # A dir that held a node before keeps its ports and cluster name: Cassandra refuses a renamed cluster.
        saved = self.base_dir / "node.json"
        state = json.loads(saved.read_text()) if saved.exists() else {}
        self.cluster_name: str = state.get("cluster_name") or f"fresco-{uuid.uuid4().hex[:8]}"
        fresh = free_ports(3)
        self.port: int = state.get("native_port") or fresh[0]
        self.storage_port: int = state.get("storage_port") or fresh[1]
        self.jmx_port: int = state.get("jmx_port") or fresh[2]
        super().__init__(self.base_dir / "logs" / "output.log")

    @property
    def contact_point(self) -> str:
        return "127.0.0.1"

    @property
    def system_log(self) -> Path:
        return self.base_dir / "logs" / "system.log"

    def _prepare(self) -> None:
        self._java = find_java()
        self.lib_dir = fetch_jars(self.lib_dir)
        conf = self.base_dir / "conf"
        (conf / "triggers").mkdir(parents=True, exist_ok=True)  # Cassandra warns on every schema change without it
        template = string.Template((DEPLOY_DIR / "cassandra.yaml.template").read_text())
        fields = {"cluster_name": self.cluster_name, "storage_port": self.storage_port, "native_port": self.port}
        (conf / "cassandra.yaml").write_text(template.substitute(fields))
        state = {**fields, "jmx_port": self.jmx_port}
        (self.base_dir / "node.json").write_text(json.dumps(state, indent=2) + "\n")

    def _command(self) -> list[str]:
        assert self.lib_dir is not None  # set by _prepare()
        logs = self.base_dir / "logs"
        agent = sorted(self.lib_dir.glob("jamm-*.jar"))
        return [
            self._java,
            *jvm_options(),
            *(["-XX:TieredStopAtLevel=1"] if self.quick_jit else []),
            *[f"-javaagent:{jar}" for jar in agent[-1:]],
            f"-XX:ErrorFile={logs}/hs_err_pid%p.log",
            f"-Dcassandra.config=file://{self.base_dir}/conf/cassandra.yaml",
            f"-Dcassandra.storagedir={self.base_dir}/data",
            f"-Dcassandra.logdir={logs}",
            f"-Dlogback.configurationFile=file://{DEPLOY_DIR}/logback.xml",
            f"-Dcassandra.jmx.local.port={self.jmx_port}",
            f"-Dcassandra.triggers_dir={self.base_dir}/conf/triggers",
            "-cp", f"{self.base_dir}/conf:{self.lib_dir}/*",
            "org.apache.cassandra.service.CassandraDaemon",
        ]  # fmt: skip

    def _wait_ready(self, deadline: float) -> None:
        last_error = "the CQL port never opened"
        while time.monotonic() < deadline:
            if self.exited():
                raise self._failure_with_system_log(f"exited during start-up with code {self.returncode}")
            # The CQL port opens right after "Starting listening for CQL clients": then prove it with a query.
            if port_open(self.port, self.contact_point):
                try:
                    self.release_version = self._query_release_version()
                    return
                except Exception as exc:  # noqa: BLE001 - any driver error means "not yet"; the last one is reported
                    last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.25)
        raise self._failure_with_system_log(f"was not ready on port {self.port} in time ({last_error})")

    def _query_release_version(self) -> str:
        """SELECT release_version over a real CQL connection; without cassandra-driver the open port must do."""
        try:
            importlib.import_module("cassandra.cluster")
        except ImportError:
            return "unknown (cassandra-driver not installed)"
        cluster = self.cluster(connect_timeout=2.0, control_connection_timeout=2.0)
        try:
            row = cluster.connect().execute("SELECT release_version FROM system.local").one()
            return str(row[0])
        finally:
            cluster.shutdown()

    def _failure_with_system_log(self, why: str) -> ServerError:
        error = self._failure(why)
        return ServerError(f"{error}\n--- last lines of {self.system_log}:\n{tail(self.system_log)}")

    def cluster(self, **options: Any) -> Any:
        """A cassandra-driver Cluster for this node: token-aware over its one DC, tuples for rows."""
        # Imported on use: fetching jars and running a node need no driver, and the driver ships no types anyway.
        driver = importlib.import_module("cassandra.cluster")
        policies = importlib.import_module("cassandra.policies")
        query = importlib.import_module("cassandra.query")
        profile = driver.ExecutionProfile(
            load_balancing_policy=policies.TokenAwarePolicy(policies.DCAwareRoundRobinPolicy(local_dc="datacenter1")),
            row_factory=query.tuple_factory,
        )
        return driver.Cluster(
            [self.contact_point],
            port=self.port,
            execution_profiles={driver.EXEC_PROFILE_DEFAULT: profile},
            protocol_version=5,
            **options,
        )

    def close(self) -> None:
        """Stop the node and remove its dir if this object made it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
