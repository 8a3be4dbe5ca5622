"""`--workers 2`: two predictor processes behind one port under a supervisor. Requests over many
independent connections reach both workers; repository calls and statistics cover every worker; the
supervisor announces once, merges the workers' metrics, and on SIGTERM drains them and exits 0.

SO_REUSEPORT spreads connections, not calls, over the workers: each channel here has distinct
arguments so that it opens its own TCP connection."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess
from tests.integration import (
    CLIENT_OPTIONS,
    Reference,
    assert_matches_reference,
    decode_outputs,
    infer_request,
    write_slow_model,
)

pytestmark = pytest.mark.integration

INFER = "/inference.GRPCInferenceService/ModelInfer"
# Independent connections: with two workers, the chance that all of them land on one is 2**-15.
CONNECTIONS = 16


class Supervisor(ServiceProcess):
    """`python -m predictor --workers N`, started like any service (its announce line carries N)."""


def workers_args(root: Path, *extra: str) -> list[str]:
    return ["--model-repository", str(root), "--port", "0", "--workers", "2", "--log-format", "text", *extra]


# The repository API loads and unloads only in explicit mode; '*' loads every model at start.
EXPLICIT = ("--model-control-mode", "explicit", "--load-model", "*")


def channels(address: str, count: int = CONNECTIONS) -> list[aio.Channel]:
    """Channels that do not share a connection."""
    return [aio.insecure_channel(address, options=[*CLIENT_OPTIONS, ("fresco.test.channel", i)]) for i in range(count)]


async def model_ready(stub: pb_grpc.GRPCInferenceServiceAsyncStub, name: str) -> bool | grpc.StatusCode:
    """ModelReady's answer, or the code it failed with."""
    try:
        return bool((await stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10)).ready)
    except aio.AioRpcError as err:
        return err.code()


async def all_ready(stubs: list[pb_grpc.GRPCInferenceServiceAsyncStub], name: str, timeout_s: float = 60) -> None:
    """Wait until every connection (so every worker) says `name` is ready."""
    deadline = time.monotonic() + timeout_s
    while [await model_ready(stub, name) for stub in stubs] != [True] * len(stubs):
        assert time.monotonic() < deadline, f"{name} not ready on every worker within {timeout_s}s"
        await asyncio.sleep(0.1)


def metric_samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def infer_ok(samples: list[tuple[str, dict[str, str], float]]) -> float:
    """ModelInfer calls answered OK, summed over the workers."""
    return sum(
        value
        for name, labels, value in samples
        if name == "fresco_rpc_requests_total" and labels.get("method") == INFER and labels.get("code") == "OK"
    )


def pids_of(samples: list[tuple[str, dict[str, str], float]], name: str, **wanted: str) -> set[str]:
    """The worker pids that reported a per-process (gauge) sample."""
    return {
        labels["pid"]
        for sample, labels, _ in samples
        if sample == name and "pid" in labels and all(labels.get(k) == v for k, v in wanted.items())
    }


@pytest.fixture(scope="module")
def supervisor(repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Supervisor, Path]]:
    root = tmp_path_factory.mktemp("workers") / "models"
    shutil.copytree(repository.root / "demo", root / "demo")
    service = Supervisor("predictor", workers_args(root, *EXPLICIT), log_path=root.parent / "predictor.log")
    try:
        service.start()
        service.wait_healthy()
        yield service, root
    finally:
        service.stop()


@pytest.fixture(scope="module")
async def stubs(supervisor) -> AsyncIterator[list[pb_grpc.GRPCInferenceServiceAsyncStub]]:
    """One stub per independent connection, once demo is ready on every worker."""
    opened = channels(supervisor[0].address)
    try:
        made = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        await all_ready(made, "demo")
        yield made
    finally:
        for channel in opened:
            await channel.close()


async def send_everywhere(stubs, sample: np.ndarray, reference: Reference, per_connection: int) -> int:
    """`per_connection` checked ModelInfer calls on each connection at once; how many were sent."""

    async def connection(index: int, stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> None:
        for turn in range(per_connection):
            start = (index * per_connection + turn) % (len(sample) - 3)
            rows = sample[start : start + 1 + turn % 3]
            response = await stub.ModelInfer(infer_request(rows), timeout=30)
            assert_matches_reference(decode_outputs(response), reference.predict(rows))

    await asyncio.gather(*(connection(i, stub) for i, stub in enumerate(stubs)))
    return len(stubs) * per_connection


async def test_the_suite_starts_a_predictor_with_workers(repository, tmp_path: Path) -> None:
    """`fresco.suite.ServiceProcess` (what `fresco up` and these tests start services with) must
    read the supervisor's announce line, which ends in ` workers=2`."""
    root = tmp_path / "models"
    shutil.copytree(repository.root / "demo", root / "demo")
    service = ServiceProcess("predictor", workers_args(root), log_path=tmp_path / "predictor.log")
    try:
        service.start(timeout_s=12)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", service.address), service.address
        assert service.metrics_url.endswith("/metrics")
        service.wait_healthy()
        assert service.stop() == 0, service.output()
    finally:
        service.stop()


async def test_one_announce_line_and_every_worker_serves(
    supervisor, stubs, sample: np.ndarray, reference: Reference
) -> None:
    service, _ = supervisor
    assert service.workers == 2
    announced = [line for line in service.lines if " listening on " in line]
    assert len(announced) == 1, announced
    before = await asyncio.to_thread(metric_samples, service.metrics_url)
    sent = await send_everywhere(stubs, sample, reference, per_connection=6)
    after = await asyncio.to_thread(metric_samples, service.metrics_url)
    # The supervisor's endpoint sums the workers' counters...
    assert infer_ok(after) - infer_ok(before) == sent
    # ...and keeps per-process gauges apart: two workers loaded demo, and both handled ModelInfer.
    loaded = pids_of(after, "fresco_model_loaded", model="demo", version="1")
    assert len(loaded) == 2, loaded
    served = pids_of(after, "fresco_rpc_in_flight", method=INFER)
    assert served == loaded, f"ModelInfer handled by workers {served} of {loaded}"


def test_the_supervisor_holds_neither_pydantic_nor_grpc_nor_onnxruntime(supervisor) -> None:
    """It re-executes itself after parsing its flags: only its workers load the serving stack."""
    service, _ = supervisor
    assert service.process is not None
    maps = Path(f"/proc/{service.process.pid}/maps").read_text()
    for library in ("_pydantic_core", "cygrpc", "onnxruntime_pybind11_state"):
        assert library not in maps, f"the supervisor has {library} mapped"
    assert "--supervise" in Path(f"/proc/{service.process.pid}/cmdline").read_text()
    workers = [pid for child in children_of(service.process.pid) for pid in children_of(child)]
    assert len(workers) == 2, workers
    for pid in workers:  # the library names above are the right ones: the workers have them all
        worker_maps = Path(f"/proc/{pid}/maps").read_text()
        assert all(name in worker_maps for name in ("_pydantic_core", "cygrpc", "onnxruntime_pybind11_state"))


async def test_statistics_cover_every_worker(stubs, sample: np.ndarray, reference: Reference) -> None:
    """ModelStatistics on any connection counts the requests every worker served."""

    async def counts() -> list[tuple[int, int]]:
        answers = [await stub.ModelStatistics(pb.ModelStatisticsRequest(name="demo", version="1")) for stub in stubs]
        return [(a.model_stats[0].inference_stats.success.count, a.model_stats[0].inference_count) for a in answers]

    before = await counts()
    assert len(set(before)) == 1, f"connections disagree on the totals: {before}"
    sent = await send_everywhere(stubs, sample, reference, per_connection=3)
    rows = sum(1 + turn % 3 for turn in range(3)) * len(stubs)
    after = await counts()
    grew = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]
    assert grew == [(sent, rows)] * len(stubs)


async def test_load_and_unload_reach_every_worker(
    supervisor, stubs, repository, sample: np.ndarray, reference: Reference
) -> None:
    _, root = supervisor
    assert set(await asyncio.gather(*(model_ready(stub, "fresh") for stub in stubs))) == {False}
    with pytest.raises(aio.AioRpcError) as failure:
        await stubs[0].RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="fresh"), timeout=60)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND  # not written yet
    shutil.copytree(repository.root / "demo", root / "fresh")
    await stubs[0].RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="fresh"), timeout=60)
    assert [await model_ready(stub, "fresh") for stub in stubs] == [True] * len(stubs)
    for stub in stubs:
        response = await stub.ModelInfer(infer_request(sample[:2], model="fresh"), timeout=30)
        assert_matches_reference(decode_outputs(response), reference.predict(sample[:2]))

    await stubs[5].RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="fresh"), timeout=60)
    assert [await model_ready(stub, "fresh") for stub in stubs] == [False] * len(stubs)
    for stub in stubs:
        with pytest.raises(aio.AioRpcError) as failure:
            await stub.ModelInfer(infer_request(sample[:2], model="fresh"), timeout=30)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert [await model_ready(stub, "demo") for stub in stubs] == [True] * len(stubs)


async def test_a_load_with_config_and_files_reaches_every_worker(
    stubs, repository, sample: np.ndarray, reference: Reference
) -> None:
    """Every worker writes the files sent with the load and serves the model with the config sent."""
    config = json.dumps({"max_batch_size": 8, "dynamic_batching": {"preferred_batch_size": [4]}})
    request = pb.RepositoryModelLoadRequest(model_name="sent")
    request.parameters["config"].string_param = config
    request.parameters["file:1/model.onnx"].bytes_param = repository.demo.path.read_bytes()
    await stubs[2].RepositoryModelLoad(request, timeout=60)
    for stub in stubs:
        served = (await stub.ModelConfig(pb.ModelConfigRequest(name="sent"), timeout=10)).config
        assert (served.max_batch_size, list(served.dynamic_batching.preferred_batch_size)) == (8, [4])
        response = await stub.ModelInfer(infer_request(sample[:3], model="sent"), timeout=30)
        assert_matches_reference(decode_outputs(response), reference.predict(sample[:3]))
    await stubs[4].RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="sent"), timeout=60)
    assert [await model_ready(stub, "sent") for stub in stubs] == [False] * len(stubs)


class OneGoodRead:
    """A model file that is a named pipe: the first worker to read it gets the model, the next gets
    bytes no runtime loads, as when a repository is rewritten while the workers read it."""

    def __init__(self, path: Path, model: bytes) -> None:
        os.mkfifo(path)
        self.path = path
        self.payloads = [model, b"not an onnx model"]
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        for payload in self.payloads:
            with self.path.open("wb") as pipe:  # blocks until a worker opens the file
                pipe.write(payload)
            self._wait_until_closed()

    def _wait_until_closed(self) -> None:
        """Until no process holds the pipe open (/proc shows open files, not opens still waiting
        for a writer): the next worker to open it is then a different reader than the first."""
        target = str(self.path)
        while any(target == link for link in _open_files()):
            time.sleep(0.005)

    def consumed(self) -> bool:
        self.thread.join(timeout=60)
        return not self.thread.is_alive()


def _open_files() -> Iterator[str]:
    """What every file descriptor of every process points to."""
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            yield os.readlink(fd)
        except OSError:  # the process or descriptor went away meanwhile
            continue


async def states(stubs: list[pb_grpc.GRPCInferenceServiceAsyncStub], name: str) -> set[tuple[str, str]]:
    """The (version, state) entries of `name` every connection's worker reports."""
    found = set()
    for stub in stubs:
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        found |= {(m.version, m.state) for m in index.models if m.name == name}
    return found


async def test_a_load_that_fails_on_one_worker_changes_no_worker(
    supervisor, stubs, repository, sample: np.ndarray, reference: Reference
) -> None:
    """Version 2 of a served model reaches one worker intact and the other corrupt: every worker
    keeps serving version 1 (it used to switch the one that loaded it), and the load's error names
    the worker that failed. A new model that fails the same way is UNAVAILABLE on every worker."""
    _, root = supervisor
    shutil.copytree(repository.root / "demo", root / "steady")
    await stubs[0].RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="steady"), timeout=60)
    assert await states(stubs, "steady") == {("1", "READY")}

    (root / "steady" / "2").mkdir()
    pipe = OneGoodRead(root / "steady" / "2" / "model.onnx", repository.demo.path.read_bytes())
    with pytest.raises(aio.AioRpcError) as failure:
        await stubs[3].RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="steady"), timeout=60)
    assert pipe.consumed(), "both workers should have read version 2"
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = failure.value.details() or ""
    assert "'steady' failed to load" in details
    assert re.search(r"worker-\d: .*version 2: model file could not be loaded by ONNX Runtime", details), details
    assert await states(stubs, "steady") == {("1", "READY")}
    for stub in stubs:
        response = await stub.ModelInfer(infer_request(sample[:2], model="steady"), timeout=30)
        assert response.model_version == "1"
        assert_matches_reference(decode_outputs(response), reference.predict(sample[:2]))

    (root / "torn" / "1").mkdir(parents=True)
    pipe = OneGoodRead(root / "torn" / "1" / "model.onnx", repository.demo.path.read_bytes())
    with pytest.raises(aio.AioRpcError) as failure:
        await stubs[5].RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="torn"), timeout=60)
    assert pipe.consumed()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [await model_ready(stub, "torn") for stub in stubs] == [False] * len(stubs)
    assert await states(stubs, "torn") == {("", "UNAVAILABLE")}
    for stub in stubs:
        with pytest.raises(aio.AioRpcError) as refused:
            await stub.ModelInfer(infer_request(sample[:2], model="torn"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def slow_request(rows: np.ndarray, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow", id=request_id)
    request.inputs.add(name="X", datatype="FP32", shape=rows.shape)
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request


async def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_slow_model(root, depth=32)  # about a quarter of a second per call on one core
    service = Supervisor("predictor", workers_args(root), log_path=tmp_path / "predictor.log")
    rows = np.random.default_rng(9).normal(size=(256, 1024)).astype(np.float32)
    expected = rows.mean(axis=1)
    opened = channels(service.start().address, count=4)
    try:
        service.wait_healthy()
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        await all_ready(stubs, "slow")
        # Two calls per connection: each worker has more than it computes at once, so calls stay in
        # flight well past the moment the last one arrives (a scrape may come after the first answer).
        calls = [
            asyncio.ensure_future(stub.ModelInfer(slow_request(rows, f"call-{i}"), timeout=60))
            for i, stub in enumerate(stubs * 2)
        ]
        deadline = time.monotonic() + 20
        while True:  # every call has reached a worker, and some are still being handled there
            answered = sum(call.done() for call in calls)  # before the scrape: none of these is in flight in it
            handled = await asyncio.to_thread(in_flight, service.metrics_url)
            if handled and handled + answered == len(calls):
                break
            assert answered < len(calls), f"every call was answered before SIGTERM: {service.output()}"
            assert time.monotonic() < deadline, "the calls never all reached the workers"
            await asyncio.sleep(0.01)
        assert service.process is not None
        service.process.send_signal(signal.SIGTERM)
        responses = await asyncio.gather(*calls)
        for i, response in enumerate(responses):
            assert response.id == f"call-{i}"
            np.testing.assert_allclose(decode_outputs(response)["mean"], expected, rtol=1e-4, atol=1e-5)
        exit_code = await asyncio.to_thread(service.process.wait, 30)
        assert exit_code == 0, service.output()
        assert service.output().count("stopping: draining in-flight calls") == 2, service.output()
    finally:
        for channel in opened:
            await channel.close()
        service.stop()


def in_flight(metrics_url: str, method: str = INFER) -> float:
    """Calls of `method` (gRPC ModelInfer by default) being handled now, summed over the workers."""
    return sum(
        value
        for name, labels, value in metric_samples(metrics_url)
        if name == "fresco_rpc_in_flight" and labels.get("method") == method
    )


def parent_of(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


@pytest.fixture(scope="module")
async def restarted(repository, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, object]]:
    """Workers serving demo and spare; spare is unloaded through the repository API, then worker 0
    is killed and the supervisor restarts it. Yields the supervisor, the killed pid and stubs over
    connections opened after the restart."""
    root = tmp_path_factory.mktemp("restart") / "models"
    shutil.copytree(repository.root / "demo", root / "demo")
    shutil.copytree(repository.root / "demo", root / "spare")
    service = Supervisor("predictor", workers_args(root, *EXPLICIT), log_path=root.parent / "predictor.log")
    opened: list[aio.Channel] = []
    try:
        service.start()
        service.wait_healthy()
        assert service.process is not None
        first = channels(service.address)
        opened += first
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in first]
        await all_ready(stubs, "demo")
        await stubs[0].RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="spare"), timeout=60)
        samples = await asyncio.to_thread(metric_samples, service.metrics_url)
        workers = pids_of(samples, "fresco_model_loaded", model="demo", version="1")
        assert len(workers) == 2, workers
        victim = min(int(pid) for pid in workers)
        # One of our own workers, forked from the zygote the supervisor started.
        assert parent_of(parent_of(victim)) == service.process.pid
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not pids_of(samples, "fresco_model_loaded", model="demo", version="1") - workers:
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            await asyncio.sleep(0.1)
            samples = await asyncio.to_thread(metric_samples, service.metrics_url)
        after = channels(service.address)  # connections made after the restart reach both workers
        opened += after
        fresh = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in after]
        await all_ready(fresh, "demo")
        yield {"service": service, "victim": str(victim), "stubs": fresh}
    finally:
        for channel in opened:
            await channel.close()
        service.stop()


async def test_a_dead_worker_is_restarted_and_its_gauges_go_with_it(
    restarted, sample: np.ndarray, reference: Reference
) -> None:
    service = restarted["service"]
    assert "predictor worker 0 exited with -9; restarting" in service.output()
    await send_everywhere(restarted["stubs"], sample, reference, per_connection=2)
    samples = await asyncio.to_thread(metric_samples, service.metrics_url)
    loaded = pids_of(samples, "fresco_model_loaded", model="demo", version="1")
    assert restarted["victim"] not in loaded, f"the killed worker still counts as having demo loaded: {loaded}"
    assert len(loaded) == 2, loaded


async def test_a_restarted_worker_keeps_what_the_repository_api_unloaded(restarted) -> None:
    """spare was unloaded from every worker before the crash; the restarted worker must not serve it
    again on the connections that reach it."""
    answers = [await model_ready(stub, "spare") for stub in restarted["stubs"]]
    assert answers == [False] * len(answers)
    for stub in restarted["stubs"]:
        with pytest.raises(aio.AioRpcError) as failure:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="spare"), timeout=10)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def descendants_of(pid: int) -> set[int]:
    """The live processes below `pid`: its children, theirs, and so on."""
    found = children_of(pid)
    for child in list(found):
        found |= descendants_of(child)
    return found


def children_of(pid: int) -> set[int]:
    """The live processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if parent_of(int(entry.name)) == pid:
                    found.add(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue  # exited while we looked
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_workers_stop_when_their_supervisor_is_killed_outright(repository, tmp_path: Path) -> None:
    """SIGKILL gives the supervisor no chance to stop its workers; they must not live on as orphans."""
    service = Supervisor("predictor", workers_args(repository.root), log_path=tmp_path / "predictor.log")
    service.start()
    try:
        service.wait_healthy()
        assert service.process is not None
        serving = pids_of(await asyncio.to_thread(metric_samples, service.metrics_url), "fresco_model_loaded")
        below = descendants_of(service.process.pid)  # the workers, the zygote they were forked from
        assert len(serving) == 2, serving
        assert {int(pid) for pid in serving} <= below, (serving, below)
        service.process.kill()
        service.process.wait(10)
        deadline = time.monotonic() + 60
        while any(alive(pid) for pid in below):
            assert time.monotonic() < deadline, f"processes outlived their supervisor: {below}"
            await asyncio.sleep(0.1)
    finally:
        service.stop()
