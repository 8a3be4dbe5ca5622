"""Triton's own Python client works unchanged against the predictor. The client runs in a
subprocess (see triton_probe.py for why); its answers are checked here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fresco.api.inference import grpc_service_pb2 as pb
from fresco.suite import ServiceProcess
from tests.integration import Reference

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("triton_probe.py")


@pytest.fixture(scope="module")
def rows(sample: np.ndarray) -> np.ndarray:
    return sample[40:52]


@pytest.fixture(scope="module")
def probe(predictor: ServiceProcess, rows: np.ndarray) -> dict[str, Any]:
    """What each tritonclient call gave, run once against the shared predictor."""
    done = subprocess.run(
        [sys.executable, str(PROBE), predictor.address],
        input=json.dumps(rows.tolist()),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def value(probe: dict[str, Any], call: str) -> Any:
    outcome = probe[call]
    assert outcome["ok"], f"tritonclient {call} failed: {outcome}"
    return outcome["value"]


def test_tritonclient_liveness_and_readiness(probe: dict[str, Any]) -> None:
    assert value(probe, "is_server_live") is True
    assert value(probe, "is_server_ready") is True
    assert value(probe, "is_model_ready") is True
    assert value(probe, "is_model_ready_v1") is True


def test_tritonclient_metadata(probe: dict[str, Any]) -> None:
    server = value(probe, "get_server_metadata")
    assert server["name"] == "fresco-predictor"
    assert "model_repository" in server["extensions"]
    model = value(probe, "get_model_metadata")
    assert (model["name"], model["versions"], model["platform"]) == ("demo", ["1"], "onnxruntime_onnx")
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [("X", "FP32", ["-1", "8"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["outputs"]] == [
        ("label", "INT64", ["-1"]),
        ("probabilities", "FP32", ["-1", "2"]),
    ]


def test_tritonclient_infer_matches_onnxruntime(probe: dict[str, Any], rows: np.ndarray, reference: Reference) -> None:
    answer = value(probe, "infer")
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("demo", "1", "triton-1")
    expected = reference.predict(rows)
    np.testing.assert_array_equal(np.array(answer["label"]), expected["label"])
    np.testing.assert_allclose(np.array(answer["probabilities"]), expected["probabilities"], rtol=1e-5, atol=1e-6)


def test_tritonclient_sees_not_found(probe: dict[str, Any]) -> None:
    outcome = probe["infer_unknown_model"]
    assert outcome["ok"] is False
    assert outcome["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in outcome["error"]


def test_tritonclient_bytes_round_trip(probe: dict[str, Any]) -> None:
    assert value(probe, "infer_bytes") == ["hello", "", "a b"]


def test_tritonclient_repository_index_and_statistics(probe: dict[str, Any], rows: np.ndarray) -> None:
    index = value(probe, "get_model_repository_index")
    assert {(m["name"], m["version"], m["state"]) for m in index["models"]} == {
        ("demo", "1", "READY"),
        ("echo", "1", "READY"),
    }
    (stats,) = value(probe, "get_inference_statistics")["model_stats"]
    assert (stats["name"], stats["version"]) == ("demo", "1")
    # The probe's inference is among those counted (int64 values come as JSON strings).
    assert int(stats["inference_count"]) >= len(rows)
    assert int(stats["execution_count"]) >= 1
    assert int(stats["inference_stats"]["success"]["count"]) >= 1


def test_tritonclient_model_config_fails_cleanly(probe: dict[str, Any], predictor_stub) -> None:
    """The predictor does not implement Triton's ModelConfig RPC (it is not part of the Open
    Inference Protocol); a client asking for it gets a clean UNIMPLEMENTED, and the server is fine."""
    outcome = probe["get_model_config"]
    if not outcome["ok"]:
        assert outcome["status"] == "StatusCode.UNIMPLEMENTED", outcome
    else:
        assert outcome["value"]["config"]["name"] == "demo"
    assert predictor_stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready is True
