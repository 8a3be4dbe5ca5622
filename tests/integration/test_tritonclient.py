"""Triton's own Python client works unchanged against the predictor, through every rpc of the
inference service. The client runs in a subprocess (see triton_probe.py for why); its answers are
checked here. Load and unload go to a predictor of their own, in explicit model-control mode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fresco.api.inference import grpc_service_pb2 as pb
from fresco.suite import ServiceProcess
from tests.integration import Reference

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("triton_probe.py")
# Rows of each request the probe sends on one stream, and the request a malformed one follows.
STREAM_SIZES = (1, 2, 3, 4, 2)
STREAM_BAD_AFTER = 1

# Which probe call exercised each rpc of inference.GRPCInferenceService (a "lifecycle." prefix: on the
# explicit-mode predictor). A new rpc in the proto fails test_every_rpc_is_covered until added here.
RPC_CALLS = {
    "ServerLive": "is_server_live",
    "ServerReady": "is_server_ready",
    "ModelReady": "is_model_ready",
    "ServerMetadata": "get_server_metadata",
    "ModelMetadata": "get_model_metadata",
    "ModelInfer": "infer",
    "ModelStreamInfer": "stream",
    "ModelConfig": "get_model_config",
    "ModelStatistics": "statistics_after",
    "RepositoryIndex": "get_model_repository_index",
    "RepositoryModelLoad": "lifecycle.load",
    "RepositoryModelUnload": "lifecycle.unload",
}


@pytest.fixture(scope="module")
def rows(sample: np.ndarray) -> np.ndarray:
    return sample[40:52]


@pytest.fixture(scope="module")
def explicit(repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A predictor in explicit mode over `demo` (loaded at start) and `second` (a copy, not loaded)."""
    root = tmp_path_factory.mktemp("triton-explicit") / "models"
    for name in ("demo", "second"):
        shutil.copytree(repository.root / "demo", root / name)
    service = ServiceProcess(
        "predictor",
        ["--model-repository", str(root), "--port", "0", "--model-control-mode", "explicit", "--load-model", "demo"],
        log_path=root.parent / "predictor.log",
    )
    try:
        service.start()
        service.wait_healthy()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def probe(repository, predictor: ServiceProcess, explicit: ServiceProcess, rows: np.ndarray) -> dict[str, Any]:
    """What each tritonclient call gave, run once against the shared predictor and the explicit one."""
    done = subprocess.run(
        [sys.executable, str(PROBE), predictor.address, explicit.address],
        input=json.dumps(
            {
                "rows": rows.tolist(),
                "stream": STREAM_SIZES,
                "stream_bad_after": STREAM_BAD_AFTER,
                "model_path": str(repository.demo.path),
            }
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.fixture(scope="module")
def lifecycle(probe: dict[str, Any]) -> dict[str, Any]:
    steps: dict[str, Any] = probe["lifecycle"]
    return steps


def value(probe: dict[str, Any], call: str) -> Any:
    outcome = probe[call]
    assert outcome["ok"], f"tritonclient {call} failed: {outcome}"
    return outcome["value"]


def failure(probe: dict[str, Any], call: str) -> tuple[str, str]:
    """The status and message of a call that must have failed."""
    outcome = probe[call]
    assert not outcome["ok"], f"tritonclient {call} should have failed, gave {outcome}"
    return outcome["status"], outcome["error"]


def count(figures: dict[str, Any], key: str) -> int:
    """An int64 of a statistics message as tritonclient's JSON gives it: a string, absent when 0."""
    return int(figures.get(key, 0))


def assert_answers(answer: dict[str, Any], rows: np.ndarray, reference: Reference) -> None:
    expected = reference.predict(rows)
    np.testing.assert_array_equal(np.array(answer["label"]), expected["label"])
    np.testing.assert_allclose(np.array(answer["probabilities"]), expected["probabilities"], rtol=1e-5, atol=1e-6)


def test_every_rpc_is_covered(probe: dict[str, Any]) -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert sorted(method.name for method in service.methods) == sorted(RPC_CALLS)
    for rpc, call in RPC_CALLS.items():
        outcome = probe["lifecycle"][call.removeprefix("lifecycle.")] if call.startswith("lifecycle.") else probe[call]
        assert outcome["ok"], f"{rpc} through tritonclient ({call}) failed: {outcome}"


def test_tritonclient_liveness_and_readiness(probe: dict[str, Any]) -> None:
    assert value(probe, "is_server_live") is True
    assert value(probe, "is_server_ready") is True
    assert value(probe, "is_model_ready") is True
    assert value(probe, "is_model_ready_v1") is True
    # As Triton: ready=false for a model it does not know (it used to raise NOT_FOUND).
    assert value(probe, "is_model_ready_unknown") is False


def test_tritonclient_metadata(probe: dict[str, Any]) -> None:
    server = value(probe, "get_server_metadata")
    assert server["name"] == "fresco-predictor"
    assert "model_repository" in server["extensions"]
    model = value(probe, "get_model_metadata")
    assert value(probe, "get_model_metadata_v1") == model
    assert (model["name"], model["versions"], model["platform"]) == ("demo", ["1"], "onnxruntime_onnx")
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [("X", "FP32", ["-1", "8"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["outputs"]] == [
        ("label", "INT64", ["-1"]),
        ("probabilities", "FP32", ["-1", "2"]),
    ]


def test_tritonclient_model_config(probe: dict[str, Any]) -> None:
    """ModelConfig in Triton's form, parsed by tritonclient with Triton's own model_config.proto."""
    config = value(probe, "get_model_config")["config"]
    assert (config["name"], config["platform"], config["backend"]) == ("demo", "onnxruntime_onnx", "onnxruntime")
    assert config["max_batch_size"] == 64
    # With max_batch_size > 0, dims leave the batch dimension out (int64 dims come as JSON strings).
    assert [(t["name"], t["data_type"], t.get("dims", [])) for t in config["input"]] == [("X", "TYPE_FP32", ["8"])]
    assert [(t["name"], t["data_type"], t.get("dims", [])) for t in config["output"]] == [
        ("label", "TYPE_INT64", []),
        ("probabilities", "TYPE_FP32", ["2"]),
    ]
    assert "dynamic_batching" in config
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1024
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert [(g["count"], g["kind"]) for g in config["instance_group"]] == [(1, "KIND_CPU")]
    echo = value(probe, "get_model_config_echo")["config"]
    assert [(t["name"], t["data_type"]) for t in echo["input"]] == [("text", "TYPE_STRING")]
    assert [(t["name"], t["data_type"]) for t in echo["output"]] == [("echo", "TYPE_STRING")]
    status, error = failure(probe, "get_model_config_unknown")
    assert status == "StatusCode.NOT_FOUND"
    assert error.startswith("Request for unknown model: 'no-such-model' is not found"), error


def test_tritonclient_infer_matches_onnxruntime(probe: dict[str, Any], rows: np.ndarray, reference: Reference) -> None:
    answer = value(probe, "infer")
    # The id is read from result.get_response().id: the request id echoed.
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("demo", "1", "triton-1")
    assert answer["outputs"] == ["label", "probabilities"]
    assert_answers(answer, rows, reference)
    # Asking for no output in particular returns them all.
    everything = value(probe, "infer_all_outputs")
    assert (everything["id"], everything["outputs"]) == ("", ["label", "probabilities"])
    assert_answers(everything, rows[:3], reference)


def test_tritonclient_requested_outputs_subset(probe: dict[str, Any], rows: np.ndarray, reference: Reference) -> None:
    answer = value(probe, "infer_subset")
    assert (answer["id"], answer["outputs"]) == ("triton-subset", ["probabilities"])
    assert "label" not in answer
    expected = reference.predict(rows[3:5])["probabilities"]
    np.testing.assert_allclose(np.array(answer["probabilities"]), expected, rtol=1e-5, atol=1e-6)


def test_tritonclient_streaming(probe: dict[str, Any], rows: np.ndarray, reference: Reference) -> None:
    """Requests on one stream come back matched by id and in the order sent (the predictor keeps a
    window of them in flight, yet answers in order); a malformed one fails alone."""
    stream = value(probe, "stream")
    ids = [f"s-{index}" for index in range(len(STREAM_SIZES))]
    assert sorted(stream["answers"]) == ids
    assert stream["order"] == ids
    start = 0
    for request_id, size in zip(ids, STREAM_SIZES, strict=True):
        answer = stream["answers"][request_id]
        assert (answer["model_name"], answer["model_version"]) == ("demo", "1")
        assert_answers(answer, rows[start : start + size], reference)
        start += size
    (error,) = stream["errors"]
    assert "shape [1, 3]" in error, error


def test_tritonclient_sees_not_found(probe: dict[str, Any]) -> None:
    status, error = failure(probe, "infer_unknown_model")
    assert status == "StatusCode.NOT_FOUND"
    # Triton's wording, which Triton's own client tests match on.
    assert error.startswith("Request for unknown model: 'no-such-model' is not found"), error


def test_tritonclient_bytes_round_trip(probe: dict[str, Any]) -> None:
    assert value(probe, "infer_bytes") == ["hello", "", "a b"]


def test_tritonclient_repository_index(probe: dict[str, Any]) -> None:
    index = value(probe, "get_model_repository_index")
    assert {(m["name"], m["version"], m["state"]) for m in index["models"]} == {
        ("demo", "1", "READY"),
        ("echo", "1", "READY"),
    }


def test_tritonclient_statistics_grow(probe: dict[str, Any]) -> None:
    """Between the two readings the probe sent demo 3 infers and a stream of 5 good requests and a bad
    one, and nothing else reached the shared predictor (the tests run one at a time)."""
    (before,) = value(probe, "statistics_before")["model_stats"]
    (after,) = value(probe, "statistics_after")["model_stats"]
    assert (after["name"], after["version"]) == ("demo", "1")
    rows = 12 + 3 + 2 + sum(STREAM_SIZES)
    assert count(after, "inference_count") - count(before, "inference_count") == rows
    executions = count(after, "execution_count") - count(before, "execution_count")
    assert 1 <= executions <= 3 + len(STREAM_SIZES)
    success = count(after["inference_stats"]["success"], "count") - count(before["inference_stats"]["success"], "count")
    fail = count(after["inference_stats"]["fail"], "count") - count(before["inference_stats"]["fail"], "count")
    assert (success, fail) == (3 + len(STREAM_SIZES), 1)
    assert count(after, "last_inference") > 0
    assert 12 in {count(b, "batch_size") for b in after["batch_stats"]}
    everything = value(probe, "statistics_all")["model_stats"]
    assert [(s["name"], s["version"]) for s in everything] == [("demo", "1"), ("echo", "1")]


def test_tritonclient_load_and_unload(lifecycle: dict[str, Any], rows: np.ndarray, reference: Reference) -> None:
    def states(step: str) -> dict[str, tuple[str, str]]:
        return {m["name"]: (m.get("version", ""), m["state"]) for m in value(lifecycle, step)["models"]}

    # Before: on disk, not loaded.
    assert states("index_before") == {"demo": ("1", "READY"), "second": ("", "UNAVAILABLE")}
    assert value(lifecycle, "ready_before") is False
    assert failure(lifecycle, "infer_before")[0] == "StatusCode.NOT_FOUND"
    # load_model returns once the model is READY.
    assert value(lifecycle, "load") is None
    assert value(lifecycle, "ready_loaded") is True
    assert states("index_loaded") == {"demo": ("1", "READY"), "second": ("1", "READY")}
    config = value(lifecycle, "config_loaded")["config"]
    assert (config["name"], config["max_batch_size"]) == ("second", 64)
    answer = value(lifecycle, "infer_loaded")
    assert (answer["model_name"], answer["id"]) == ("second", "loaded")
    assert_answers(answer, rows, reference)
    (stats,) = value(lifecycle, "statistics_loaded")["model_stats"]
    assert (stats["name"], count(stats, "inference_count")) == ("second", len(rows))
    # Unloaded: gone from serving, back to on-disk in the index; demo untouched.
    assert value(lifecycle, "unload") is None
    assert value(lifecycle, "ready_unloaded") is False
    assert states("index_unloaded") == {"demo": ("1", "READY"), "second": ("", "UNAVAILABLE")}
    assert failure(lifecycle, "infer_unloaded")[0] == "StatusCode.NOT_FOUND"
    assert value(lifecycle, "demo_ready") is True
    status, error = failure(lifecycle, "load_unknown")
    assert status == "StatusCode.NOT_FOUND"
    assert "no-such-model" in error
    # And it loads again.
    assert value(lifecycle, "reload") is None
    assert value(lifecycle, "ready_reloaded") is True


def test_tritonclient_load_with_config_and_files(
    lifecycle: dict[str, Any], rows: np.ndarray, reference: Reference
) -> None:
    """load_model's `config` overrides the repository's configuration and `files` sends a model
    inline; both used to be ignored."""
    assert value(lifecycle, "load_config") is None
    config = value(lifecycle, "config_overridden")["config"]
    assert config["max_batch_size"] == 4
    assert config["dynamic_batching"]["preferred_batch_size"] == [2]
    assert value(lifecycle, "load_files") is None
    assert value(lifecycle, "ready_inline") is True
    answer = value(lifecycle, "infer_inline")
    assert (answer["model_name"], answer["id"]) == ("inline", "inline")
    assert_answers(answer, rows, reference)
    status, error = failure(lifecycle, "files_without_config")
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "files given without 'config'" in error
    status, error = failure(lifecycle, "files_escaping")
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "parameters['file:../../x.onnx']" in error


def test_tritonclient_load_is_refused_unless_explicit(probe: dict[str, Any]) -> None:
    """The shared predictor runs with --model-control-mode none: as Triton, it refuses."""
    for call in ("load_refused", "unload_refused"):
        status, error = failure(probe, call)
        assert status == "StatusCode.FAILED_PRECONDITION"
        assert error.startswith("explicit model load / unload is not allowed if polling is enabled"), error
