"""`python -m bench.int8`: `fresco models optimize --int8` on a real scikit-learn model (a wide MLP classifier on the
breast cancer dataset), through a real model manager: dynamic and static INT8 against the FP32 parent, their size,
time per row, session memory and backtest AUC/accuracy. Prints a table and the goals, and writes every raw figure to
`.cache/bench/int8-results.json`. See README.md beside this file."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from google.protobuf import json_format

from bench.goals import Goal, record, verdict
from bench.int8.model import BenchModel, build
from bench.measure import CACHE, REPO_ROOT, machine_load
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.cli_models import sha256_of, upload_requests
from fresco.suite import ServiceProcess
from model_manager.backtest import feature_matrix
from model_manager.optimization import time_rows

WORK = CACHE / "int8"
RESULTS_FILE = CACHE / "int8-results.json"
MODEL = "breast_cancer_mlp"
BUDGET_AUC = 0.005
"""The spec's budget: the INT8 version's AUC on the backtest rows may be at most this much below the parent's."""
SIZE_TARGET = 0.30
LATENCY_TARGET = 1.0
METHODS = {
    "dynamic": pb.OPTIMIZATION_METHOD_INT8_DYNAMIC,
    "static": pb.OPTIMIZATION_METHOD_INT8_STATIC,
}


@dataclass(frozen=True)
class Result:
    """One optimised version: the manager's report, and what the benchmark measured again itself."""

    method: str
    version: int
    report: dict[str, object]
    size_ratio: float
    manager_latency_ratio: float
    bench_parent_us: float
    bench_us: float
    bench_parent_cpu_us: float
    bench_cpu_us: float
    parent_session_rss: int
    session_rss: int

    @property
    def latency_ratio(self) -> float:
        return self.bench_us / self.bench_parent_us

    @property
    def cpu_ratio(self) -> float:
        return self.bench_cpu_us / self.bench_parent_cpu_us

    @property
    def memory_ratio(self) -> float:
        return self.session_rss / self.parent_session_rss


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.int8", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller MLP and fewer timed rounds (under 90 s)")
    return parser.parse_args(argv)


def start_manager(model: BenchModel) -> ServiceProcess:
    """A model manager whose default gates hold the backtest (and the budget) every optimisation is judged by."""
    gate = rpb.BacktestGate(
        dataset_uri=model.backtest.as_uri(),
        dataset_sha256=model.backtest_sha256,
        label_column="label",
        score_output="probabilities",
        metric="auc",
        max_optimization_loss=BUDGET_AUC,
    )
    gates = json.dumps(json_format.MessageToDict(rpb.PromotionGates(backtest=gate)))
    data = WORK / "manager"
    shutil.rmtree(data, ignore_errors=True)
    args = ["--data-dir", str(data), "--port", "0", "--metrics-port", "-1", "--default-gates-json", gates]
    process = ServiceProcess("model_manager", args).start()
    process.wait_healthy(60)
    return process


def register_parent(stub: pb_grpc.ModelManagerServiceStub, model: BenchModel) -> pb.UploadModelVersionResponse:
    path = WORK / "parent.onnx"
    path.write_bytes(model.artifact)
    digest, size = sha256_of(path)
    stub.CreateModel(pb.CreateModelRequest(model=rpb.Model(name=MODEL, owner="bench")))
    meta = pb.UploadModelVersionMetadata(
        model_name=MODEL,
        format=rpb.MODEL_FORMAT_ONNX,
        framework="scikit-learn MLPClassifier",
        expected_sha256=digest,
        expected_size_bytes=size,
        signature=model.signature,
    )
    return stub.UploadModelVersion(upload_requests(meta, path), timeout=120)


def session_rss(path: Path) -> int:
    """Resident bytes an ONNX Runtime session of the model adds to a fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.int8.session_memory", str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    return int(json.loads(done.stdout.strip().splitlines()[-1])["rss_bytes"])


def rows_of(model: BenchModel) -> np.ndarray:
    return np.asarray(feature_matrix(pq.read_table(model.backtest), model.signature))


def optimise(
    stub: pb_grpc.ModelManagerServiceStub, model: BenchModel, parent: int, method: str, rounds: int, runs: int
) -> Result:
    request = pb.OptimizeModelVersionRequest(
        model_name=MODEL, version=parent, method=METHODS[method], reason=f"bench {method}"
    )
    if method == "static":
        request.calibration_uri = str(model.calibration)
    response = stub.OptimizeModelVersion(request, timeout=600)
    report, version = response.report, response.model_version
    artifact_path = Path(version.artifact_uri.removeprefix("file://"))
    artifact = artifact_path.read_bytes()
    rows = rows_of(model)
    timings = [time_rows(model.artifact, artifact, model.signature.feature_input, rows, runs) for _ in range(rounds)]
    parent_path = WORK / "parent.onnx"
    return Result(
        method=method,
        version=version.version,
        report=json_format.MessageToDict(report, preserving_proto_field_name=True),
        size_ratio=report.size_bytes / report.parent_size_bytes,
        manager_latency_ratio=report.latency_us / report.parent_latency_us,
        bench_parent_us=statistics.median(t.parent_wall_us for t in timings),
        bench_us=statistics.median(t.wall_us for t in timings),
        bench_parent_cpu_us=statistics.median(t.parent_cpu_us for t in timings),
        bench_cpu_us=statistics.median(t.cpu_us for t in timings),
        parent_session_rss=session_rss(parent_path),
        session_rss=session_rss(artifact_path),
    )


def table(results: list[Result], reports: dict[str, pb.OptimizationReport]) -> str:
    header = (
        "method",
        "version",
        "size bytes",
        "size ratio",
        "session RSS",
        "RSS ratio",
        "µs/row (bench)",
        "latency ratio",
        "CPU ratio",
        "manager latency ratio",
        "AUC parent → int8",
        "AUC loss",
        "accuracy parent → int8",
        "max |Δscore|",
    )
    lines = [header]
    for r in results:
        rep = reports[r.method]
        lines.append(
            (
                r.method,
                f"v{r.version}",
                f"{rep.parent_size_bytes:,} → {rep.size_bytes:,}",
                f"{r.size_ratio:.3f}",
                f"{r.parent_session_rss / 1e6:.1f} → {r.session_rss / 1e6:.1f} MB",
                f"{r.memory_ratio:.3f}",
                f"{r.bench_parent_us:.1f} → {r.bench_us:.1f}",
                f"{r.latency_ratio:.3f}",
                f"{r.cpu_ratio:.3f}",
                f"{r.manager_latency_ratio:.3f}",
                f"{rep.parent_metrics['auc']:.5f} → {rep.metrics['auc']:.5f}",
                f"{rep.accuracy_loss:+.5f}",
                f"{rep.parent_metrics['accuracy']:.4f} → {rep.metrics['accuracy']:.4f}",
                f"{rep.max_abs_score_diff:.2g}",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    for index, row in enumerate(lines):
        out.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(out)


def goals(results: list[Result], reports: dict[str, pb.OptimizationReport]) -> list[Goal]:
    found = []
    for r in results:
        rep = reports[r.method]
        accuracy_delta = rep.metrics["accuracy"] - rep.parent_metrics["accuracy"]
        found += [
            Goal(
                f"size ratio, {r.method} INT8",
                verdict(r.size_ratio <= SIZE_TARGET),
                f"{r.size_ratio:.3f}× ({rep.size_bytes:,} of {rep.parent_size_bytes:,} bytes)",
                f"≤ {SIZE_TARGET:.2f}×",
                "FP32 parent",
                r.size_ratio,
            ),
            Goal(
                f"accuracy loss, {r.method} INT8",
                verdict(rep.accuracy_loss <= BUDGET_AUC and r.version > 0),
                f"AUC {rep.accuracy_loss:+.5f}, accuracy {accuracy_delta:+.4f} on {rep.rows} rows; "
                f"registered v{r.version}",
                f"AUC loss ≤ {BUDGET_AUC} (spec budget)",
                "FP32 parent",
                rep.accuracy_loss,
            ),
            Goal(
                f"latency ratio, {r.method} INT8",
                verdict(r.latency_ratio <= LATENCY_TARGET),
                f"{r.latency_ratio:.3f}× ({r.bench_us:.1f} vs {r.bench_parent_us:.1f} µs/row; CPU {r.cpu_ratio:.3f}×)",
                f"≤ {LATENCY_TARGET:.1f}×",
                "FP32 parent",
                r.latency_ratio,
            ),
        ]
    return found


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hidden = (512, 512) if args.quick else (1024, 1024)
    rounds, runs = (3, 400) if args.quick else (5, 1000)
    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"bench.int8: {machine_load().describe()}")
    model = build(WORK / "data", hidden)
    print(
        f"model: StandardScaler + MLPClassifier{hidden} on scikit-learn's breast cancer dataset "
        f"({model.train_rows} training rows, {model.test_rows} backtest rows, 30 features), {len(model.artifact):,} "
        "bytes of ONNX"
    )
    manager = start_manager(model)
    results: list[Result] = []
    reports: dict[str, pb.OptimizationReport] = {}
    try:
        with grpc.insecure_channel(manager.address) as channel:
            stub = pb_grpc.ModelManagerServiceStub(channel)
            parent = register_parent(stub, model).model_version.version
            for method in METHODS:
                result = optimise(stub, model, parent, method, rounds, runs)
                results.append(result)
                reports[method] = json_format.ParseDict(result.report, pb.OptimizationReport())
    finally:
        code = manager.stop()
        if code != 0:
            print(manager.output()[-4000:])
    print()
    print(
        f"INT8 versions of v{parent} (time per row: median of {rounds} rounds of {runs} one-row runs per model, "
        "interleaved, one intra-op thread; session RSS: a fresh process per model)"
    )
    print(table(results, reports))
    raw = {"hidden": hidden, "rounds": rounds, "runs": runs, "results": [asdict(r) for r in results]}
    RESULTS_FILE.write_text(json.dumps(raw, indent=2))
    record(
        "int8",
        goals(results, reports),
        quick=args.quick,
        notes=[
            f"the model manager quantised, measured and registered each version (OptimizeModelVersion); the spec's "
            f"budget is backtest.max_optimization_loss = {BUDGET_AUC} AUC",
            "latency ratio: the benchmark's own interleaved timing of the registered artifacts; the manager's "
            "single measurement is in the table",
            f"run took {time.monotonic() - started:.0f} s; raw figures in {RESULTS_FILE.relative_to(REPO_ROOT)}",
        ],
    )


if __name__ == "__main__":
    main()
