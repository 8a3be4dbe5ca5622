"""A real Prometheus server (Debian's prometheus) on a free loopback port, scraping given targets, its TSDB in a
temp dir; and a copy of a rule file whose alerts wait seconds instead of minutes, for tests."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fresco.servers._process import ServerProcess, free_port, require_binary

_INSTALL_HINT = "apt-get install -y prometheus"


def scrape_target(metrics_url: str) -> str:
    """The host:port Prometheus scrapes, from a service's metrics URL (http://host:port/metrics)."""
    return urllib.parse.urlsplit(metrics_url).netloc


def fast_rules(source: Path, target: Path, for_s: float = 3.0, interval_s: float = 1.0) -> Path:
    """`source`'s rules with every `for:` set to `for_s`, `keep_firing_for` dropped and each group evaluated every
    `interval_s`; the expressions stay as they are."""
    document = yaml.safe_load(source.read_text())
    for group in document["groups"]:
        group["interval"] = f"{interval_s:g}s"
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = f"{for_s:g}s"
                rule.pop("keep_firing_for", None)
    target.write_text(yaml.safe_dump(document, sort_keys=False))
    return target


class PrometheusServer(ServerProcess):
    """prometheus as a child process scraping `targets` (job name -> host:port list) every `scrape_interval_s`."""

    name = "prometheus"
    start_timeout_s = 30.0
    stop_timeout_s = 10.0

    def __init__(
        self,
        targets: Mapping[str, Sequence[str]],
        rule_files: Sequence[Path] = (),
        data_dir: Path | None = None,
        port: int | None = None,
        scrape_interval_s: float = 1.0,
        evaluation_interval_s: float = 1.0,
    ) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="fresco-prometheus-")) if data_dir is None else data_dir
        self.port = free_port() if port is None else port
        self.targets = {job: list(addresses) for job, addresses in targets.items()}
        self.rule_files = list(rule_files)
        self.scrape_interval_s = scrape_interval_s
        self.evaluation_interval_s = evaluation_interval_s
        self._binary = ""
        super().__init__(self.data_dir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "prometheus.yml"

    def _prepare(self) -> None:
        self._binary = require_binary("prometheus", _INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {
                "scrape_interval": f"{self.scrape_interval_s:g}s",
                "scrape_timeout": f"{self.scrape_interval_s:g}s",
                "evaluation_interval": f"{self.evaluation_interval_s:g}s",
            },
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": addresses}]} for job, addresses in self.targets.items()
            ],
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def _command(self) -> list[str]:
        return [
            self._binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.exited():
                raise self._failure(f"exited with code {self.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise self._failure(f"not ready on port {self.port} in time")

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """One HTTP API call (GET /api/v1/<path>), its JSON answer; an error answer (HTTP 400, 422) is returned too."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10.0) as response:
                answer: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as err:
            answer = json.load(err)
        return answer

    def query(self, expr: str) -> dict[str, Any]:
        """An instant query at the current time: {"status": ..., "data": {"result": [...]}} or the error."""
        return self.api("query", query=expr)

    def alerts(self) -> list[dict[str, Any]]:
        """The pending and firing alerts, each with its labels, state and activeAt."""
        alerts: list[dict[str, Any]] = self.api("alerts")["data"]["alerts"]
        return alerts

    def close(self) -> None:
        """Stop the server and remove its data dir if this object made it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
