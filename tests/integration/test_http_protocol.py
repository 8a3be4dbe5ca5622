"""The predictor's REST form of the Open Inference Protocol (KServe v2 over HTTP): Triton's own HTTP
client through health, metadata, configuration, JSON and binary inference, statistics and the
repository extension; the README's curl example; the gRPC path's error mapping, auth, size limit,
metrics and trace context; a fuzzer of malformed bodies that never gets a 500. Answers are compared
with ONNX Runtime run in this process, bit for bit."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fresco.suite import ServiceProcess, issue_local_tokens
from tests.certs import make_pki
from tests.integration import Reference
from tests.integration.rest import Http, exact, exact_json, infer_body
from tests.integration.test_workers import metric_samples

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("triton_http_probe.py")
README = Path(__file__).parents[2] / "README.md"
TEXTS = ["", "héllo", "a longer string with spaces"]
INLINE_CONFIG = json.dumps({"max_batch_size": 8, "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [8]}]})
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def rows(sample: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(sample[60:72])


@pytest.fixture(scope="module")
def http(predictor: ServiceProcess) -> Iterator[Http]:
    assert predictor.http_url.startswith("http://127.0.0.1:"), predictor.lines[-5:]
    client = Http(predictor.http_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def guarded(repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Any]]:
    """A predictor in explicit mode with auth on and a 1 MiB body limit: `demo` loaded, `second` on disk."""
    root = tmp_path_factory.mktemp("http-guarded")
    for name in ("demo", "second"):
        shutil.copytree(repository.root / "demo", root / "models" / name)
    auth = issue_local_tokens(root / "auth")
    service = ServiceProcess(
        "predictor",
        [
            "--model-repository", str(root / "models"), "--port", "0", "--model-control-mode", "explicit",
            "--load-model", "demo", "--http-max-request-bytes", str(MIB), *auth.service_args(),
        ],
        log_path=root / "predictor.log",
    )  # fmt: skip
    try:
        service.start()
        service.wait_healthy()
        yield service, auth
    finally:
        service.stop()


@pytest.fixture(scope="module")
def probe(repository, predictor: ServiceProcess, guarded, rows: np.ndarray) -> dict[str, Any]:
    """What each tritonclient.http call gave, against the shared predictor and the guarded one."""
    service, auth = guarded
    address = predictor.http_url.removeprefix("http://")
    explicit = service.http_url.removeprefix("http://")
    done = subprocess.run(
        [sys.executable, str(PROBE), address, explicit, auth.admin_token_file.read_text().strip()],
        input=json.dumps(
            {"rows": rows.tolist(), "texts": TEXTS, "model_path": str(repository.demo.path), "config": INLINE_CONFIG}
        ),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def value(report: dict[str, Any], call: str) -> Any:
    outcome = report[call]
    assert outcome["ok"], f"tritonclient.http {call} failed: {outcome}"
    return outcome["value"]


def failure(report: dict[str, Any], call: str) -> tuple[str, str]:
    """The HTTP status and error message of a call that must have failed."""
    outcome = report[call]
    assert not outcome["ok"], f"tritonclient.http {call} should have failed, gave {outcome}"
    return outcome["status"], outcome["error"]


# -- Triton's HTTP client ------------------------------------------------------------------------------


def test_health_and_readiness(probe: dict[str, Any]) -> None:
    assert value(probe, "is_server_live") is True
    assert value(probe, "is_server_ready") is True
    assert value(probe, "is_model_ready") is True
    assert value(probe, "is_model_ready_v1") is True
    assert value(probe, "is_model_ready_unknown") is False


def test_metadata_and_config(probe: dict[str, Any]) -> None:
    server = value(probe, "get_server_metadata")
    assert server["name"] == "fresco-predictor"
    assert {"model_repository", "statistics", "binary_tensor_data"} <= set(server["extensions"])
    model = value(probe, "get_model_metadata")
    assert value(probe, "get_model_metadata_v1") == model
    assert (model["name"], model["versions"], model["platform"]) == ("demo", ["1"], "onnxruntime_onnx")
    # The REST form's shapes are JSON numbers (the gRPC JSON mapping would make them strings).
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [("X", "FP32", [-1, 8])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["outputs"]] == [
        ("label", "INT64", [-1]),
        ("probabilities", "FP32", [-1, 2]),
    ]
    config = value(probe, "get_model_config")
    assert (config["name"], config["max_batch_size"], config["backend"]) == ("demo", 64, "onnxruntime")
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [("X", "TYPE_FP32", [8])]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


@pytest.mark.parametrize("call", ["infer_json", "infer_binary", "infer_mixed", "infer_gzip"])
def test_infer_matches_onnxruntime_bit_for_bit(
    probe: dict[str, Any], call: str, rows: np.ndarray, reference: Reference
) -> None:
    answer = value(probe, call)
    expected = reference.predict(rows)
    assert set(answer["outputs"]) == {"label", "probabilities"}
    assert answer["model_version"] == "1"
    for name, output in answer["outputs"].items():
        assert output["datatype"] == {"label": "INT64", "probabilities": "FP32"}[name]
        exact(output, expected[name])
    assert value(probe, "infer_json")["id"] == "json-1"
    assert value(probe, "infer_binary")["id"] == "bin-1"


def test_bytes_tensors_in_json_and_binary(probe: dict[str, Any]) -> None:
    for call in ("infer_echo_json", "infer_echo_binary"):
        echo = value(probe, call)["outputs"]["echo"]
        assert (echo["datatype"], echo["shape"], echo["data"]) == ("BYTES", [len(TEXTS)], TEXTS)


def test_errors_carry_the_grpc_paths_mapping(probe: dict[str, Any]) -> None:
    status, error = failure(probe, "infer_unknown_model")
    assert status == "404"
    assert error.startswith("Request for unknown model: 'no-such-model' is not found"), error
    status, error = failure(probe, "infer_bad_shape")
    assert status == "400"
    assert "input 'X': shape [12, 7] does not match the model's [-1, 8]" in error
    status, error = failure(probe, "infer_unknown_output")
    assert (status, "requested output 'nope'" in error) == ("400", True)
    status, error = failure(probe, "load_not_explicit")
    assert status == "400"
    assert error.startswith("explicit model load / unload is not allowed if polling is enabled"), error


def test_statistics_and_repository_index(probe: dict[str, Any]) -> None:
    stats = value(probe, "get_inference_statistics")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("demo", "1")]
    assert stats[0]["inference_stats"]["success"]["count"] >= 4  # the probe's demo inferences, at least
    assert stats[0]["inference_count"] >= 4 * 12
    names = {s["name"] for s in value(probe, "get_inference_statistics_all")["model_stats"]}
    assert names == {"demo", "echo"}
    index = value(probe, "get_model_repository_index")
    entries = sorted((m["name"], m["version"], m["state"]) for m in index)
    assert entries == [("demo", "1", "READY"), ("echo", "1", "READY")]


def test_repository_load_and_unload(probe: dict[str, Any], rows: np.ndarray, reference: Reference) -> None:
    steps = probe["lifecycle"]
    status, error = failure(steps, "load_without_token")
    assert (status, "needs a bearer token with role deployer" in error) == ("401", True)
    assert value(steps, "ready_before") is False
    value(steps, "load")
    assert value(steps, "ready_after_load") is True
    expected = reference.predict(rows)
    for call in ("infer_second", "infer_inline"):
        for name, output in value(steps, call)["outputs"].items():
            exact(output, expected[name])
    assert ("second", "1", "READY") in {(m["name"], m["version"], m["state"]) for m in value(steps, "index")}
    value(steps, "unload")
    assert value(steps, "ready_after_unload") is False
    value(steps, "load_inline")  # files sent in base64, as tritonclient.http sends them
    value(steps, "unload_inline")
    status, error = failure(steps, "load_bad_config")
    assert status == "400"
    assert "parameters['config']: max_batch_size: expected an integer, got 'many'" in error


# -- curl ----------------------------------------------------------------------------------------------


def readme_curl(url: str) -> list[str]:
    """The README's curl example, aimed at `url`."""
    text = README.read_text()
    section = text[text.index("## The inference protocol over HTTP") :]
    block = re.search(r"```sh\n(curl .*?)\n```", section, re.DOTALL)
    assert block is not None, "the README's HTTP section has no curl example"
    command = block[1].replace("\\\n", " ").replace("http://127.0.0.1:8000", url)
    return shlex.split(command)


def test_the_readme_curl_example(predictor: ServiceProcess, reference: Reference) -> None:
    command = readme_curl(predictor.http_url)
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    answer = json.loads(done.stdout)
    body = json.loads(command[command.index("-d") + 1])
    rows = np.array(body["inputs"][0]["data"], dtype=np.float32)
    expected = reference.predict(rows)
    outputs = {output["name"]: output for output in answer["outputs"]}
    for name in ("label", "probabilities"):
        exact_json(outputs[name], expected[name])


def test_curl_error_names_the_field(predictor: ServiceProcess) -> None:
    body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 8], "data": [1.0, "two"]}]})
    done = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "-X", "POST", f"{predictor.http_url}/v2/models/demo/infer",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    text, status = done.stdout.rsplit("\n", 1)
    assert status == "400"
    assert json.loads(text) == {"error": "inputs[0].data: holds 2 elements, shape [1, 8] needs 8"}


# -- Plain HTTP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "status", "message"),
    [
        ({"inputs": [{"name": "X", "datatype": "FP64", "shape": [1, 8], "data": [0.0] * 8}]}, 400,
         "input 'X': datatype FP64 but the model expects FP32"),
        ({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 8], "data": [True] * 8}]}, 400,
         "inputs[0].data: FP32 elements are numbers, got true"),
        ({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 8], "data": [1e39] * 8}]}, 400,
         "inputs[0].data: a value is outside FP32's range"),
        ({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, -8], "data": []}]}, 400,
         "inputs[0].shape: expected a non-negative integer, got -8"),
        ({"inputs": [{"name": "X", "shape": [1, 8], "data": [0] * 8}]}, 400,
         "inputs[0].datatype: expected a string, got null"),
        ({"input": []}, 400, "request body: unknown fields ['input']"),
        ({"inputs": []}, 400, "model 'demo' needs inputs ['X'], which the request lacks"),
        ({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 8], "parameters": {"binary_data_size": 32}}]},
         400, "inputs[0].parameters.binary_data_size: 32 bytes, but 0 bytes of binary data remain"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_field(http: Http, document: dict[str, Any], status: int, message: str) -> None:
    got, answer = http.json("POST", "/v2/models/demo/infer", document)
    assert (got, message in answer["error"]) == (status, True), answer


def test_unknown_routes_and_methods_answer_json(http: Http) -> None:
    status, answer = http.json("GET", "/v2/nothing/here")
    assert (status, answer["error"]) == (404, "GET /v2/nothing/here: Not Found")
    status, headers, body = http.call("GET", "/v2/models/demo/infer")
    assert (status, headers.get("Allow")) == (405, "POST")
    assert "error" in json.loads(body)


def test_binary_body_with_a_wrong_header_length(http: Http, rows: np.ndarray) -> None:
    header = json.dumps(
        {"inputs": [{"name": "X", "datatype": "FP32", "shape": [12, 8], "parameters": {"binary_data_size": 384}}]}
    ).encode()
    data = rows.astype("<f4").tobytes()
    status, headers, body = http.call(
        "POST", "/v2/models/demo/infer", header + data, {"Inference-Header-Content-Length": str(len(header))}
    )
    assert status == 200, body
    assert "Inference-Header-Content-Length" not in headers  # all outputs in JSON: none asked for binary
    for bad in ("-1", "x", str(len(header) + len(data) + 1)):
        status, _, body = http.call(
            "POST", "/v2/models/demo/infer", header + data, {"Inference-Header-Content-Length": bad}
        )
        assert status == 400
        assert json.loads(body)["error"].startswith("Inference-Header-Content-Length header: expected"), body


def test_bodies_over_4_mib_are_taken(http: Http, sample: np.ndarray, reference: Reference) -> None:
    """No 4 MiB (gRPC) or 1 MiB (aiohttp) default stands in the way: the limit is the setting's, 64 MiB."""
    rows = np.resize(sample, (200_000, 8))
    header = json.dumps(
        {
            "inputs": [{"name": "X", "datatype": "FP32", "shape": [200_000, 8],
                        "parameters": {"binary_data_size": rows.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()  # fmt: skip
    status, headers, body = http.call(
        "POST", "/v2/models/demo/infer", header + rows.tobytes(), {"Inference-Header-Content-Length": str(len(header))}
    )
    assert status == 200, body[:200]
    length = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:length])
    expected = reference.predict(rows)
    offset = length
    for output in answer["outputs"]:
        size = output["parameters"]["binary_data_size"]
        array = np.frombuffer(body[offset : offset + size], dtype=expected[output["name"]].dtype)
        assert array.tobytes() == expected[output["name"]].tobytes()
        offset += size
    assert offset == len(body)


def test_the_body_limit_is_a_setting(guarded) -> None:
    service, _ = guarded
    client = Http(service.http_url)
    try:
        status, _, body = client.call("POST", "/v2/models/demo/infer", b"[" * (MIB + 1))
    finally:
        client.close()
    assert status == 413
    assert "http_max_request_bytes" in json.loads(body)["error"]


def test_roles_are_those_of_the_grpc_methods(guarded) -> None:
    service, auth = guarded
    client = Http(service.http_url)
    stranger = issue_local_tokens(auth.tokens_file.parent / "other").admin_token_file  # not in this service's file
    try:
        status, answer = client.json("POST", "/v2/repository/models/second/unload", {})
        assert status == 401
        status, headers, _ = client.call("POST", "/v2/repository/models/second/unload", b"")
        assert headers.get("WWW-Authenticate") == "Bearer"
        gateway = f"Bearer {auth.gateway_token_file.read_text().strip()}"  # role viewer
        status, answer = client.json("POST", "/v2/repository/models/second/unload", {}, Authorization=gateway)
        assert (status, "needs role deployer or higher" in answer["error"]) == (403, True)
        unknown = f"Bearer {stranger.read_text().strip()}"
        status, answer = client.json("POST", "/v2/repository/index", {}, Authorization=unknown)
        assert (status, answer["error"]) == (401, "bearer token: not a token this service knows")
        status, answer = client.json("POST", "/v2/repository/index", {"ready": True})  # reads stay open
        assert (status, [m["name"] for m in answer]) == (200, ["demo"])
    finally:
        client.close()


def test_metrics_count_http_calls_by_route_and_code(http: Http, predictor: ServiceProcess, rows: np.ndarray) -> None:
    def count(code: str) -> float:
        return sum(
            value
            for name, labels, value in metric_samples(predictor.metrics_url)
            if name == "fresco_rpc_requests_total"
            and labels.get("method") == "POST /v2/models/{name}/infer"
            and labels.get("code") == code
        )

    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    assert http.json("POST", "/v2/models/demo/infer", infer_body(rows))[0] == 200
    assert http.json("POST", "/v2/models/demo/infer", {"inputs": 1})[0] == 400
    assert (count("OK"), count("INVALID_ARGUMENT")) == (ok + 1, bad + 1)


def test_a_failure_is_logged_in_the_callers_trace(http: Http, predictor: ServiceProcess) -> None:
    trace_id = "5b8efff798038103d269b633813fc60c"
    status, _ = http.json(
        "POST", "/v2/models/demo/infer", {"inputs": 1}, traceparent=f"00-{trace_id}-eee19b7ec3c1b174-01"
    )
    assert status == 400
    logged = [line for line in predictor.lines if trace_id in line]
    assert any("POST /v2/models/{name}/infer failed: INVALID_ARGUMENT" in line for line in logged), logged


# -- Fuzzing -------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
DATATYPES = st.sampled_from(["FP32", "FP16", "BF16", "INT8", "UINT64", "BOOL", "BYTES", "FP64", "NOPE"])


@st.composite
def tensors(draw: st.DrawFn) -> Any:
    """An input tensor, well formed or broken in one of its fields."""
    shape = draw(st.lists(st.integers(-2, 9), max_size=3) | JSON_VALUES)
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["X", "text", "Y"]) | JSON_VALUES),
        "datatype": draw(DATATYPES | JSON_VALUES),
        "shape": shape,
    }
    if draw(st.booleans()):
        tensor["data"] = draw(st.lists(st.floats(allow_nan=False, width=32), max_size=20) | JSON_VALUES)
    else:
        tensor["parameters"] = {"binary_data_size": draw(st.integers(-1, 64) | JSON_VALUES)}
    if draw(st.integers(0, 5)) == 0:
        del tensor[draw(st.sampled_from(sorted(tensor)))]
    return tensor


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """A path, a body and headers: JSON that is malformed, or well-formed but wrong, or binary data."""
    path = draw(st.sampled_from(["/v2/models/demo/infer", "/v2/models/echo/infer", "/v2/models/demo/versions/1/infer"]))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return path, draw(st.binary(max_size=64)), {}
    if kind == 1:
        return path, json.dumps(draw(JSON_VALUES)).encode(), {}
    document: dict[str, Any] = {"inputs": draw(st.lists(tensors(), max_size=2))}
    if draw(st.booleans()):
        document["outputs"] = draw(st.lists(st.fixed_dictionaries({"name": JSON_VALUES}), max_size=2) | JSON_VALUES)
    if draw(st.booleans()):
        document["parameters"] = draw(JSON_VALUES)
    header = json.dumps(document).encode()
    if kind == 2:
        return path, header, {}
    tail = draw(st.binary(max_size=64))
    length = draw(st.sampled_from([str(len(header)), str(len(header) + 1), "-3", "0", "abc"]))
    return path, header + tail, {"Inference-Header-Content-Length": length}


def test_fuzzed_bodies_never_fail_internally(http: Http) -> None:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=bodies())
    @example(case=("/v2/models/demo/infer", b"[" * 100_000, {}))
    @example(case=("/v2/models/echo/infer", b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],'
                   b'"data":["\\ud800"]}]}', {}))  # fmt: skip
    @example(case=("/v2/models/demo/infer", b'{"inputs":[{"name":"X","datatype":"FP32","shape":[1,8],'
                   b'"data":[1e400,0,0,0,0,0,0,0]}]}', {}))  # fmt: skip
    def check(case: tuple[str, bytes, dict[str, str]]) -> None:
        path, body, headers = case
        status, _, data = http.call("POST", path, body, headers)
        assert status < 500, (status, data)
        if status != 200:
            assert isinstance(json.loads(data)["error"], str)

    check()
    status, _ = http.json("GET", "/v2/health/ready")
    assert status == 200


def live(port: int | None, context: ssl.SSLContext | None) -> int:
    """GET /v2/health/live over TLS with `context`, or in plaintext without one: the status."""
    connection = (
        HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        if context is not None
        else HTTPConnection("127.0.0.1", port, timeout=30)
    )
    try:
        connection.request("GET", "/v2/health/live")
        return connection.getresponse().status
    finally:
        connection.close()


def test_tls_and_client_certificates_as_on_the_grpc_port(repository, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    service = ServiceProcess(
        "predictor",
        [
            "--model-repository", str(repository.root), "--port", "0", "--tls-cert-file", str(pki.server.cert),
            "--tls-key-file", str(pki.server.key), "--tls-client-ca-file", str(pki.ca),
        ],
        log_path=tmp_path / "predictor.log",
    )  # fmt: skip
    try:
        service.start()
        assert service.http_url.startswith("https://127.0.0.1:"), service.lines
        port = urllib.parse.urlsplit(service.http_url).port
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        trusted.load_cert_chain(pki.client.cert, pki.client.key)
        assert live(port, trusted) == 200
        anonymous = ssl.create_default_context(cafile=str(pki.ca))  # no client certificate
        with pytest.raises((ssl.SSLError, ConnectionError)):
            live(port, anonymous)
        with pytest.raises((HTTPException, ConnectionError)):
            live(port, None)
    finally:
        service.stop()
