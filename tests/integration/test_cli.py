"""The `fresco` CLI run the way a user runs it: as a process, against real services."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from fresco.api.common.v1 import values_pb2
from fresco.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from fresco.training import train_classifier

pytestmark = pytest.mark.integration

FRESCO = [sys.executable, "-m", "fresco.cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A row of the endpoints table: service, gRPC address, metrics URL, pid (box characters in between).
TABLE_ROW = re.compile(r"(predictor|gateway)\W+(127\.0\.0\.1:\d+)\W+(http://\S+/metrics)\W+(\d+)")


def _env() -> dict[str, str]:
    # Wide and colourless so assertions see whole lines of plain text.
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}


def _plain(text: str) -> str:
    return ANSI.sub("", text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_answers_match_onnxruntime_and_reports_latency(tmp_path: Path) -> None:
    result = subprocess.run(
        [*FRESCO, "demo", "--requests", "300", "--check", "100", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    out = _plain(result.stdout + result.stderr)
    assert result.returncode == 0, out
    assert "checked 100 answers against onnxruntime in process: all match" in out
    assert re.search(r"300 requests at concurrency 8 in [\d.]+ s: 300 answered, 0 failed", out), out
    throughput = re.search(r"throughput: ([\d.]+) requests/s", out)
    assert throughput is not None, out
    assert float(throughput[1]) > 0
    latency = re.search(r"p50 ([\d.]+) ms\s+p90 ([\d.]+) ms\s+p99 ([\d.]+) ms", out)
    assert latency is not None, out
    p50, p90, p99 = (float(v) for v in latency.groups())
    assert 0 < p50 <= p90 <= p99
    assert re.search(r"trace id:\s+[0-9a-f]{32}", out), out
    assert "gateway exited with code 0" in out
    assert "predictor exited with code 0" in out
    # --workdir is the user's: the model and the service logs stay there.
    assert (tmp_path / "models" / "demo" / "1" / "model.onnx").is_file()
    assert "gateway listening on" in (tmp_path / "gateway.log").read_text()


def _read_until(lines: queue.Queue[str | None], pattern: re.Pattern[str], timeout_s: float) -> tuple[str, str]:
    """Output lines up to the first matching `pattern`; (everything read, the matching line)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(_plain(line))
        if pattern.search(seen[-1]):
            return "".join(seen), seen[-1]
    pytest.fail(f"no line matching {pattern.pattern!r} within {timeout_s}s; output:\n{''.join(seen)}")


def test_up_serves_predictions_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    model = train_classifier(tmp_path / "models")
    process = subprocess.Popen(
        [*FRESCO, "up", "--model-repository", str(tmp_path / "models"), "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    pids: list[int] = []
    try:
        startup, ready = _read_until(lines, re.compile(r"gateway ready at (\S+)"), timeout_s=120)
        rows = {m[1]: m for m in TABLE_ROW.finditer(startup)}
        assert set(rows) == {"predictor", "gateway"}, startup
        pids = [int(m[4]) for m in rows.values()]
        address = re.search(r"gateway ready at (\S+)", ready)
        assert address is not None
        assert address[1] == rows["gateway"][2]

        row = model.sample[5:6]
        request = gateway_pb2.PredictRequest(
            model=model.name,
            features={
                name: values_pb2.Value(double_value=float(v))
                for name, v in zip(model.feature_names, row[0].tolist(), strict=True)
            },
        )
        with grpc.insecure_channel(address[1]) as channel:
            answer = gateway_pb2_grpc.GatewayServiceStub(channel).Predict(request, timeout=10)
        session = ort.InferenceSession(str(model.path))
        label, probabilities = session.run(["label", "probabilities"], {model.input_name: row})
        assert answer.model == model.name
        assert answer.model_version == "1"
        assert list(answer.outputs["label"].int64_values) == label.tolist()
        got = np.asarray(answer.outputs["probabilities"].double_values)
        np.testing.assert_allclose(got, probabilities[0], rtol=1e-5, atol=1e-6)

        # The printed metrics URL is live and has counted the call just made.
        with urllib.request.urlopen(rows["gateway"][3], timeout=10) as scrape:
            assert "fresco_rpc_requests_total" in scrape.read().decode()

        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in pids:  # never leave the services behind a failed test
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        pumper.join(timeout=30)
        if process.stdout is not None:
            process.stdout.close()
    rest: list[str] = []
    while (line := lines.get_nowait()) is not None:
        rest.append(_plain(line))
    shutdown = "".join(rest)
    assert process.returncode == 0, shutdown
    assert "gateway exited with code 0" in shutdown, shutdown
    assert "predictor exited with code 0" in shutdown, shutdown
    assert len(pids) == 2
    assert [pid for pid in pids if _alive(pid)] == []
    assert "gateway listening on" in (tmp_path / "logs" / "gateway.log").read_text()


@pytest.mark.parametrize("layout", ["missing", "empty", "default-missing"])
def test_up_without_models_says_how_to_get_some_and_exits_2(tmp_path: Path, layout: str) -> None:
    repository = tmp_path / "models"
    if layout == "empty":
        repository.mkdir()
    flags = [] if layout == "default-missing" else ["--model-repository", str(repository)]
    result = subprocess.run(
        [*FRESCO, "up", *flags], capture_output=True, text=True, timeout=60, env=_env(), cwd=tmp_path
    )
    out = _plain(result.stdout + result.stderr)
    assert result.returncode == 2, out
    assert str(repository) in out
    assert ("holds no models" if layout == "empty" else "does not exist") in out
    assert "fresco demo --workdir DIR" in out
    assert "fresco up --model-repository DIR/models" in out
    assert "Traceback" not in out
