"""Late labels end to end on a real model manager process: predictions reported in metric windows, labels through
LogLabels and `fresco models labels`, and GetPredictionQuality (and the Prometheus gauges) matching scikit-learn on
the same rows; refusals per reason over the wire, and labels kept across a restart."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from typer.testing import CliRunner

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import routing_pb2 as rtpb
from fresco.cli_models import app
from fresco.suite import ServiceProcess
from tests.model_manager.quality_support import batch, check_binary, check_regression, reasons, window
from tests.model_manager.registry_support import signature

pytestmark = pytest.mark.integration

MINUTE_US = 60_000_000


def start(data_dir: Path) -> ServiceProcess:
    args = ["--data-dir", str(data_dir), "--port", "0", "--metrics-port", "0", "--quality-refresh-s", "0.3"]
    process = ServiceProcess("model_manager", args).start()
    process.wait_healthy(60)
    return process


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = start(tmp_path_factory.mktemp("quality"))
    try:
        yield process
    finally:
        assert process.stop() == 0


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[pb_grpc.ModelManagerServiceStub]:
    with grpc.insecure_channel(service.address) as channel:
        yield pb_grpc.ModelManagerServiceStub(channel)


def create(stub: pb_grpc.ModelManagerServiceStub) -> str:
    name = f"m-{uuid.uuid4().hex[:10]}"
    stub.CreateModel(pb.CreateModelRequest(model=rpb.Model(name=name, owner="risk", signature=signature())))
    return name


def report(stub: pb_grpc.ModelManagerServiceStub, windows: list[rtpb.MetricsWindow]) -> None:
    answer = stub.ReportMetrics(pb.ReportMetricsRequest(gateway_id="gw-test", windows=windows))
    assert answer.accepted_windows == len(windows), answer.rejected


def log(stub: pb_grpc.ModelManagerServiceStub, batches: list[pb.LogLabelsRequest]) -> list[pb.LogLabelsResponse]:
    return list(stub.LogLabels(iter(batches), timeout=60))


def labels_cli(service: ServiceProcess, *args: str) -> str:
    result = CliRunner().invoke(app, ["labels", *args, "--service", service.address], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return result.output


def metric(service: ServiceProcess, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(service.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match[1] for k, v in labels.items()):
            return float(match[2])
    return None


def test_late_labels_give_the_figures_an_offline_computation_gives(
    service: ServiceProcess, stub: pb_grpc.ModelManagerServiceStub, tmp_path: Path
) -> None:
    name = create(stub)
    rng = np.random.default_rng(20261202)
    now = time.time_ns() // 1000
    # A classifier (v1): 900 predictions 1 minute, 30 minutes and 5 hours old; scores rounded to make ties and land
    # on the calibration bins' edges. A regression (v2): 200 predictions with any real scores.
    n = 900
    ages = np.repeat([1, 30, 300], n // 3) * MINUTE_US
    times = now - ages + rng.integers(0, 20_000_000, n)
    scores = np.round(rng.uniform(0.01, 0.99, n), 2)
    truth = (rng.uniform(size=n) < scores).astype(float)
    ids = [f"c-{i}" for i in range(n)]
    records = list(zip(ids, times.tolist(), scores.tolist(), strict=True))
    report(stub, [window(name, 1, records[i : i + 300], now) for i in range(0, n, 300)])
    reg_ids = [f"r-{i}" for i in range(200)]
    reg_scores = rng.normal(10, 3, 200)
    reg_truth = reg_scores + rng.normal(0, 1, 200)
    report(stub, [window(name, 2, list(zip(reg_ids, [now] * 200, reg_scores.tolist(), strict=True)), now)])

    # Labels arrive for 4 in 5 classifier predictions: half through the stream, half from a Parquet file.
    labelled = rng.permutation(n)[: n * 4 // 5]
    streamed, filed = labelled[: len(labelled) // 2], labelled[len(labelled) // 2 :]
    pairs = [(ids[i], float(truth[i])) for i in streamed]
    answers = log(stub, [batch(pairs[i : i + 100], name, f"b{i}") for i in range(0, len(pairs), 100)])
    assert sum(a.accepted for a in answers) == len(streamed)
    assert not any(a.rejected for a in answers)
    table = pa.table({"rid": [ids[i] for i in filed], "outcome": truth[filed]})
    pq.write_table(table, tmp_path / "labels.parquet")
    output = labels_cli(service, name, str(tmp_path / "labels.parquet"), "--request-id-column", "rid",
                        "--label-column", "outcome", "--batch-size", "128")  # fmt: skip
    assert f"{len(filed)} accepted, 0 rejected" in output
    again = labels_cli(service, name, str(tmp_path / "labels.parquet"), "--request-id-column", "rid",
                       "--label-column", "outcome")  # fmt: skip
    assert f"{len(filed)} accepted, 0 rejected" in again, "a file sent again is accepted (and counted once)"
    (tmp_path / "reg.csv").write_text(
        "request_id,label\n" + "".join(f"{r},{v!r}\n" for r, v in zip(reg_ids, reg_truth.tolist(), strict=True))
    )
    assert "200 accepted, 0 rejected" in labels_cli(service, name, str(tmp_path / "reg.csv"))

    answer = stub.GetPredictionQuality(pb.GetPredictionQualityRequest(model_name=name))
    assert [v.version for v in answer.versions] == [2, 1]
    has_label = np.zeros(n, dtype=bool)
    has_label[labelled] = True
    classifier = answer.versions[1]
    assert [w.window for w in classifier.windows] == ["5m", "1h", "1d", "all"]
    for w in classifier.windows:
        assert w.task == rpb.MODEL_TASK_BINARY_CLASSIFICATION
        inside = times >= w.window_start.ToMicroseconds()
        check_binary(w, truth[inside & has_label], scores[inside & has_label], scores[inside])
    assert [w.predictions for w in classifier.windows] == [300, 600, 900, 900]
    regression = answer.versions[0].windows[-1]
    assert regression.task == rpb.MODEL_TASK_REGRESSION
    check_regression(regression, reg_truth, reg_scores)

    # The gauges show the same figures, refreshed off the request path.
    day = classifier.windows[2]
    deadline = time.monotonic() + 30
    # Wait for a refresh that saw every label (labelled_predictions is the last gauge a refresh sets).
    while [metric(service, "fresco_model_labelled_predictions", model=name, version=v, window="1d") for v in "12"] != [
        day.labelled,
        regression.labelled,
    ]:
        assert time.monotonic() < deadline, "the quality gauges never showed every label"
        time.sleep(0.1)
    shown = {
        "accuracy": day.metrics["accuracy"],
        "auc": day.metrics["auc"],
        "logloss": day.metrics["logloss"],
        "calibration_error": day.calibration.expected_calibration_error,
        "mean_entropy": day.mean_entropy,
        "labelled_predictions": day.labelled,
    }
    for gauge, value in shown.items():
        got = metric(service, f"fresco_model_{gauge}", model=name, version="1", window="1d")
        assert got == pytest.approx(value, rel=1e-12), gauge
    got_mae = metric(service, "fresco_model_mae", model=name, version="2", window="1d")
    assert got_mae == pytest.approx(regression.metrics["mae"], rel=1e-12)


def test_refusals_come_back_per_label_and_bad_requests_name_the_field(
    service: ServiceProcess, stub: pb_grpc.ModelManagerServiceStub, tmp_path: Path
) -> None:
    name = create(stub)
    now = time.time_ns() // 1000
    report(stub, [window(name, 1, [("a", now, 0.9), ("b", now, 0.2)], now)])
    before = metric(service, "fresco_labels_received_total", outcome="conflicting_value") or 0.0
    (answer,) = log(stub, [batch([("a", 1), ("a", 1), ("a", 0), ("", 1), ("zzz", 1), ("b", float("nan"))], name)])
    assert answer.accepted == 2
    assert reasons(answer) == {2: "conflicting_value", 3: "missing_field", 4: "unknown_request", 5: "invalid_value"}
    assert metric(service, "fresco_labels_received_total", outcome="conflicting_value") == before + 1

    (tmp_path / "bad.csv").write_text("request_id,label\na,0\nb,1\nnope,1\n,1\n")
    output = labels_cli(service, name, str(tmp_path / "bad.csv"))
    assert "1 accepted, 3 rejected" in output
    assert "conflicting_value: 1" in output
    assert "row 1: value: request 'a' already has the label 1.0" in output
    assert "unknown_request: 1" in output
    missing = CliRunner().invoke(app, ["labels", name, str(tmp_path / "bad.csv"), "--label-column", "y",
                                       "--service", service.address])  # fmt: skip
    assert missing.exit_code == 2
    assert "no column 'y'" in missing.output

    with pytest.raises(grpc.RpcError) as unknown:
        log(stub, [batch([("a", 1)], "ghost-model")])
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as absent:
        stub.GetPredictionQuality(pb.GetPredictionQualityRequest(model_name="ghost-model"))
    assert absent.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad:
        stub.GetPredictionQuality(pb.GetPredictionQualityRequest(model_name=name, versions=[-2]))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "versions[0]" in (bad.value.details() or "")
    too_many = [mpb.Label(request_id="a", value=1)] * 10_001
    with pytest.raises(grpc.RpcError) as big:
        log(stub, [pb.LogLabelsRequest(labels=too_many)])
    assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_labels_are_kept_across_a_restart(tmp_path: Path) -> None:
    process = start(tmp_path)
    try:
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.ModelManagerServiceStub(channel)
            name = create(stub)
            now = time.time_ns() // 1000
            report(stub, [window(name, 1, [("a", now, 0.9), ("b", now, 0.4), ("c", now, 0.7)], now)])
            # A stream left open after its batch: the stop ends it (UNAVAILABLE, resend what was not answered)
            # rather than waiting for the client.
            idle = threading.Event()

            def batches() -> Iterator[pb.LogLabelsRequest]:
                yield batch([("a", 1), ("b", 1)], name)
                idle.wait(60)

            stream = stub.LogLabels(batches(), timeout=60)
            try:
                assert next(stream).accepted == 2
                assert process.stop() == 0
                with pytest.raises(grpc.RpcError) as ended:
                    next(stream)
            finally:
                idle.set()
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "resend" in (ended.value.details() or "")
    finally:
        assert process.stop() == 0
    process = start(tmp_path)
    try:
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.ModelManagerServiceStub(channel)
            all_time = (
                stub.GetPredictionQuality(pb.GetPredictionQualityRequest(model_name=name)).versions[0].windows[-1]
            )
            assert (all_time.predictions, all_time.labelled) == (3, 2)
            assert all_time.metrics["accuracy"] == 0.5
            (answer,) = log(stub, [batch([("a", 1), ("b", 0), ("c", 0)], name)])
            assert answer.accepted == 2
            assert reasons(answer) == {1: "conflicting_value"}
    finally:
        assert process.stop() == 0
