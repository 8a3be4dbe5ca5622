"""`python -m bench.gateway [--quick] [--profile DIR]`: what the gateway adds to a prediction. The platform runs as
real processes (bench/gateway/platform.py: manager, predictor, experiment service, gateway; v1 serving, v2
shadowed at 5%, one running experiment, value sketches on). Alternating windows at concurrency 16 load the
predictor alone (ModelInfer, the request the gateway itself would send for the same rows) and the gateway
(Predict, one row of 8 named features, a user id each). CPU per request comes from /proc for each server process;
throughput and p99 from the load process. See README.md beside this file."""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.gateway.platform import Platform, running_platform
from bench.goals import Goal, record, verdict
from bench.measure import CACHE, tree_cpu_seconds
from fresco.api.gateway.v1 import gateway_pb2 as gpb
from fresco.api.inference import grpc_service_pb2 as ipb
from fresco.api.inference import grpc_service_pb2_grpc as ipb_grpc
from fresco.client import predict_request
from fresco.demo import row_features
from gateway.assembly import ModelSignature, build_inputs
from gateway.predictors import Pinned, infer_request, version_of

PREDICT = "/fresco.gateway.v1.GatewayService/Predict"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVERS = ("gateway", "predictor", "experiment_service", "model_manager")
REQUESTS = 512  # distinct rows and users cycled by the load
CHECKED_ROWS = 128  # answers checked before the load
RESULTS_FILE = CACHE / "gateway-results.json"


@dataclass
class Window:
    """One measured window: the load's figures and each server's CPU seconds over it."""

    side: str  # "alone" (predictor, ModelInfer) or "gateway" (Predict end to end)
    answered: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    cpu_s: dict[str, float] = field(default_factory=dict)
    merged: dict[str, float] = field(default_factory=dict)  # the gateway's merged calls and requests

    def cpu_us(self, server: str) -> float:
        """The server's CPU per answered request, µs."""
        return self.cpu_s.get(server, 0.0) / max(self.answered, 1) * 1e6


def gateway_requests(platform: Platform) -> list[bytes]:
    rows, names = platform.rows, platform.served.feature_names
    return [
        predict_request(
            platform.model, row_features(names, rows[i % len(rows)]), unit_ids={"user_id": f"u{i}"}
        ).SerializeToString()
        for i in range(REQUESTS)
    ]


def predictor_requests(platform: Platform) -> list[bytes]:
    """The ModelInfer requests the gateway sends for the same rows, built by the gateway's own code."""
    address, name = platform.address("predictor"), platform.predictor_model
    with grpc.insecure_channel(address) as channel:
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(ipb.ModelMetadataRequest(name=name), metadata=platform.metadata, timeout=10)
    pinned = Pinned(version_of(metadata, ""), ModelSignature.from_metadata(metadata))
    rows, names = platform.rows, platform.served.feature_names
    built = []
    for i in range(REQUESTS):
        inputs = build_inputs(pinned.signature, [row_features(names, rows[i % len(rows)])], ["request"])
        built.append(infer_request(pinned, inputs, ()).SerializeToString())
    return built


def measure(
    platform: Platform, side: str, requests: list[bytes], duration_s: float, profile: Path | None = None
) -> Window:
    """One window of load on `side`, each server's CPU read at its start and end (and py-spy on the gateway)."""
    target, method = (
        (platform.address("predictor"), MODEL_INFER) if side == "alone" else (platform.address("gateway"), PREDICT)
    )
    command = [
        sys.executable, "-m", "bench.gateway.load", "--target", target, "--method", method, "--concurrency", "16",
        "--duration-s", str(duration_s),
        *(arg for key, value in platform.metadata for arg in ("--metadata", f"{key}={value}")),
    ]  # fmt: skip
    load = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert load.stdin is not None
    assert load.stdout is not None
    load.stdin.write("\n".join(base64.b64encode(r).decode() for r in requests))
    load.stdin.close()
    if load.stdout.readline().strip() != "started":
        raise RuntimeError(f"load on {side} did not start: {load.stdout.read()}")
    pids = {server: platform.pid(server) for server in SERVERS}
    merged_before = merged_counters(platform)
    before = {server: tree_cpu_seconds(pid) for server, pid in pids.items()}
    spy = None
    if profile is not None:
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pids["gateway"]), "--duration",
             str(int(duration_s) - 1), "--format", "raw", "--output", str(profile), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    line = load.stdout.readline().strip()
    after = {server: tree_cpu_seconds(pid) for server, pid in pids.items()}
    merged_after = merged_counters(platform)
    if line != "stopped":
        raise RuntimeError(f"load on {side} failed: {line} {load.stdout.read()}")
    result = json.loads(load.stdout.readline())
    load.wait(30)
    if spy is not None:
        spy.wait(60)
    window = Window(side, result["answered"], result["rps"], result["p50_ms"], result["p99_ms"], result["errors"])
    window.cpu_s = {server: after[server] - before[server] for server in SERVERS}
    window.merged = {name: merged_after[name] - merged_before[name] for name in merged_after}
    return window


def merged_counters(platform: Platform) -> dict[str, float]:
    """The gateway's merged ModelInfer calls and the requests they carried, from its /metrics."""
    found = {"calls": 0.0, "requests": 0.0}
    url = platform.suite.service("gateway").metrics_url
    if not url:
        return found
    with urllib.request.urlopen(url, timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            for name in found:
                if line.startswith(f"fresco_gateway_merged_{name}_total "):
                    found[name] = float(line.split()[-1])
    return found


def check_answers(platform: Platform) -> str:
    """The gateway's answer for a row equals the predictor's own, and carries the experiment's arm."""
    rows, names = platform.rows, platform.served.feature_names
    metadata = platform.metadata
    with (
        grpc.insecure_channel(platform.address("gateway")) as g,
        grpc.insecure_channel(platform.address("predictor")) as p,
    ):
        predict: grpc.UnaryUnaryMultiCallable[bytes, gpb.PredictResponse] = g.unary_unary(
            PREDICT, response_deserializer=gpb.PredictResponse.FromString
        )
        infer: grpc.UnaryUnaryMultiCallable[bytes, ipb.ModelInferResponse] = p.unary_unary(
            MODEL_INFER, response_deserializer=ipb.ModelInferResponse.FromString
        )
        direct = predictor_requests(platform)
        count = CHECKED_ROWS
        requests = [
            predict_request(platform.model, row_features(names, rows[i % len(rows)]), unit_ids={"user_id": f"u{i}"})
            for i in range(count)
        ]
        # All at once, so that the gateway merges them into shared predictor calls; each row alone to the predictor.
        pending = [predict.future(r.SerializeToString(), metadata=metadata, timeout=30) for r in requests]
        answers = [future.result() for future in pending]
        for i, answer in enumerate(answers):
            own = infer(direct[i], metadata=metadata, timeout=10)
            index = [t.name for t in own.outputs].index("probabilities")
            expected = list(memoryview(own.raw_output_contents[index]).cast("f"))
            got = list(answer.outputs["probabilities"].double_values)
            if got != [float(v) for v in expected] or answer.model_version != "1" or not answer.experiments:
                return f"MISMATCH at row {i}: gateway {got} v{answer.model_version}, predictor {expected}"
    return (
        f"gateway answers to {count} concurrent Predicts equal the predictor's to each row alone, bit for bit, "
        "each with its experiment arm"
    )


def wait_ready(platform: Platform) -> None:
    """Until the gateway routes the model with its shadow and assigns the experiment."""
    rows, names = platform.rows, platform.served.feature_names
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(platform.address("gateway")) as channel:
        predict: grpc.UnaryUnaryMultiCallable[bytes, gpb.PredictResponse] = channel.unary_unary(
            PREDICT, response_deserializer=gpb.PredictResponse.FromString
        )
        while True:
            request = predict_request(platform.model, row_features(names, rows[0]), unit_ids={"user_id": "u0"})
            try:
                answer = predict(request.SerializeToString(), metadata=platform.metadata, timeout=10)
                if answer.experiments and answer.model_version == "1":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not route the model with its experiment within 60 s")
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of short windows (under ~90 s)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, quick 1)")
    parser.add_argument("--window-s", type=float, default=None, help="seconds per window (default 15, quick 8)")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy raw profile of the gateway to this file")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    window_s = args.window_s or (8.0 if args.quick else 15.0)
    windows: list[Window] = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp, running_platform(Path(tmp)) as platform:
        wait_ready(platform)
        answers = check_answers(platform)
        print(f"answers: {answers}")
        direct, through = predictor_requests(platform), gateway_requests(platform)
        for index in range(rounds):
            for side, requests in (("alone", direct), ("gateway", through)):
                profile = args.profile if side == "gateway" and index == 0 else None
                window = measure(platform, side, requests, window_s, profile)
                windows.append(window)
                print(
                    f"round {index + 1} {side:>7}: {window.rps:7.0f} req/s  p50 {window.p50_ms:6.2f} ms  "
                    f"p99 {window.p99_ms:6.2f} ms  CPU/request µs: "
                    + "  ".join(f"{s} {window.cpu_us(s):.0f}" for s in SERVERS)
                    + (f"  errors {window.errors}" if window.errors else "")
                    + (
                        f"  merged: {window.merged['requests'] / max(window.answered, 1):.0%} of requests, "
                        f"{window.merged['requests'] / max(window.merged['calls'], 1):.1f} per merged call"
                        if side == "gateway"
                        else ""
                    )
                )
    report(windows, answers, args.quick, window_s)


def _median(windows: list[Window], side: str, read: Callable[[Window], float]) -> float:
    return float(statistics.median(read(w) for w in windows if w.side == side))


def report(windows: list[Window], answers: str, quick: bool, window_s: float) -> None:
    alone = [w for w in windows if w.side == "alone"]
    pred_alone = _median(windows, "alone", lambda w: w.cpu_us("predictor"))
    gw_own = _median(windows, "gateway", lambda w: w.cpu_us("gateway"))
    pred_e2e = _median(windows, "gateway", lambda w: w.cpu_us("predictor"))
    end_to_end = _median(windows, "gateway", lambda w: w.cpu_us("gateway") + w.cpu_us("predictor"))
    others = _median(windows, "gateway", lambda w: w.cpu_us("experiment_service") + w.cpu_us("model_manager"))
    rps_alone, rps_e2e = _median(windows, "alone", lambda w: w.rps), _median(windows, "gateway", lambda w: w.rps)
    p99_alone, p99_e2e = _median(windows, "alone", lambda w: w.p99_ms), _median(windows, "gateway", lambda w: w.p99_ms)
    p50_alone, p50_e2e = _median(windows, "alone", lambda w: w.p50_ms), _median(windows, "gateway", lambda w: w.p50_ms)
    errors = sum(sum(w.errors.values()) for w in windows)
    print()
    print(f"gateway benchmark: c16, {len(alone)} round(s) of {window_s:.0f} s windows, medians")
    print(f"  {'':34} {'predictor alone':>16} {'through gateway':>16} {'ratio':>7}")
    print(f"  {'requests/s':34} {rps_alone:16.0f} {rps_e2e:16.0f} {rps_e2e / rps_alone:7.2f}")
    print(f"  {'p50 ms':34} {p50_alone:16.2f} {p50_e2e:16.2f} {p50_e2e / p50_alone:7.2f}")
    print(f"  {'p99 ms':34} {p99_alone:16.2f} {p99_e2e:16.2f} {p99_e2e / p99_alone:7.2f}")
    print(f"  {'predictor CPU µs/request':34} {pred_alone:16.0f} {pred_e2e:16.0f} {pred_e2e / pred_alone:7.2f}")
    print(f"  {'gateway CPU µs/Predict':34} {'':16} {gw_own:16.0f} {gw_own / pred_alone:7.2f}")
    print(f"  {'gateway + predictor CPU µs':34} {pred_alone:16.0f} {end_to_end:16.0f} {end_to_end / pred_alone:7.2f}")
    print(f"  {'experiment service + manager µs':34} {'':16} {others:16.0f}")
    share = _median(windows, "gateway", lambda w: w.merged.get("requests", 0.0) / max(w.answered, 1))
    per_call = _median(
        windows, "gateway", lambda w: w.merged.get("requests", 0.0) / max(w.merged.get("calls", 0.0), 1.0)
    )
    print(f"  merged predictor calls: {share:.0%} of Predicts went in a shared call, {per_call:.1f} per shared call")
    print(f"  errors during load: {errors}")
    goals = [
        Goal(
            "gateway CPU per Predict ≤ predictor's per ModelInfer", verdict(gw_own <= pred_alone),
            f"{gw_own:.0f} µs vs {pred_alone:.0f} µs ({gw_own / pred_alone:.2f}×)", "≤ 1.00×", "predictor alone",
            gw_own / pred_alone,
        ),
        Goal(
            "end to end CPU ≤ 2× predictor alone", verdict(end_to_end <= 2 * pred_alone),
            f"{end_to_end:.0f} µs vs {pred_alone:.0f} µs ({end_to_end / pred_alone:.2f}×)", "≤ 2.00×",
            "predictor alone", end_to_end / pred_alone,
        ),
        Goal(
            "throughput at c16 ≥ 60% of predictor alone", verdict(rps_e2e >= 0.6 * rps_alone),
            f"{rps_e2e:.0f} vs {rps_alone:.0f} req/s ({rps_e2e / rps_alone:.0%})", "≥ 60%", "predictor alone",
            rps_e2e / rps_alone,
        ),
        Goal(
            "p99 at c16 ≤ 2× predictor alone", verdict(p99_e2e <= 2 * p99_alone),
            f"{p99_e2e:.1f} vs {p99_alone:.1f} ms ({p99_e2e / p99_alone:.2f}×)", "≤ 2.00×", "predictor alone",
            p99_e2e / p99_alone,
        ),
    ]  # fmt: skip
    if errors or answers.startswith("MISMATCH"):
        goals = [
            Goal(g.name, "MISS", f"{g.measured}; {answers}; {errors} errors", g.target, g.peer, g.ratio) for g in goals
        ]
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps([w.__dict__ for w in windows], indent=2))
    record(
        "gateway",
        goals,
        quick=quick,
        notes=[
            "routes from the model manager, v2 shadowed at 5%, one running experiment, value sketches on",
            "CPU per request from /proc over each window; load from a separate process (not counted)",
            answers,
        ],
    )


if __name__ == "__main__":
    main()
