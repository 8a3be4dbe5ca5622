"""Model lifecycle in real predictor processes: explicit and poll control modes, loading and
unloading under traffic without a failed request, a corrupt model beside good ones, the ModelConfig
rpc, and the statistics and metrics that show batches being formed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from fresco.api.inference import grpc_service_pb2 as pb
from fresco.api.inference import grpc_service_pb2_grpc as pb_grpc
from fresco.api.inference import model_config_pb2 as mc
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


def copy_model(repository, root: Path, name: str, **config: object) -> Path:
    """The session's demo model (config and version 1) as model `name` of `root`, with `config`
    merged into its config.yaml."""
    target = root / name
    shutil.copytree(repository.root / "demo", target)
    if config:
        path = target / "config.yaml"
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **config}))
    return target


def start_predictor(root: Path, log: Path, *args: str) -> ServiceProcess:
    service = ServiceProcess("predictor", ["--model-repository", str(root), "--port", "0", *args], log_path=log).start()
    try:
        service.wait_healthy()
    except BaseException:
        service.stop()
        raise
    return service


async def failure_code(call) -> grpc.StatusCode:
    """The status code an rpc that must fail failed with."""
    with pytest.raises(aio.AioRpcError) as failure:
        await call
    return failure.value.code()


async def ready_models(stub: pb_grpc.GRPCInferenceServiceAsyncStub) -> list[tuple[str, str]]:
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    return [(m.name, m.version) for m in index.models]


async def index_entry(stub: pb_grpc.GRPCInferenceServiceAsyncStub, name: str) -> list[tuple[str, str, str]]:
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
    return [(m.version, m.state, m.reason) for m in index.models if m.name == name]


async def eventually(condition, timeout_s: float = 15.0, what: str = "condition") -> None:
    """Await `condition()` until it returns true."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s}s"
        await asyncio.sleep(0.05)


# -- explicit mode -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def explicit(repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A predictor in explicit mode told to load demo and third, over a repository holding two more
    models."""
    root = tmp_path_factory.mktemp("explicit") / "models"
    for name in ("demo", "second", "third"):
        copy_model(repository, root, name)
    copy_model(repository, root, "unbatched", batching={"enabled": False})
    service = start_predictor(
        root,
        root.parent / "predictor.log",
        *("--model-control-mode", "explicit", "--load-model", "demo", "--load-model", "third"),
    )
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
async def explicit_stub(explicit: ServiceProcess) -> AsyncIterator[pb_grpc.GRPCInferenceServiceAsyncStub]:
    async with aio.insecure_channel(explicit.address, options=CLIENT_OPTIONS) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


async def test_explicit_mode_loads_only_what_it_is_told(
    explicit_stub, sample: np.ndarray, reference: Reference
) -> None:
    stub = explicit_stub
    assert await ready_models(stub) == [("demo", "1"), ("third", "1")]
    assert await index_entry(stub, "second") == [("", "UNAVAILABLE", "not loaded")]
    assert await failure_code(stub.ModelInfer(infer_request(sample[:2], model="second"))) == grpc.StatusCode.NOT_FOUND
    # As Triton: a model that is not loaded is not ready, rather than an error.
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="second"))).ready is False

    await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="second"))
    assert await ready_models(stub) == [("demo", "1"), ("second", "1"), ("third", "1")]
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="second"))).ready is True
    response = await stub.ModelInfer(infer_request(sample[:5], model="second"))
    assert (response.model_name, response.model_version) == ("second", "1")
    assert_matches_reference(decode_outputs(response), reference.predict(sample[:5]))

    await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="second"))
    assert await failure_code(stub.ModelInfer(infer_request(sample[:2], model="second"))) == grpc.StatusCode.NOT_FOUND
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="second"))).ready is False
    assert await ready_models(stub) == [("demo", "1"), ("third", "1")]
    response = await stub.ModelInfer(infer_request(sample[:3]))
    assert_matches_reference(decode_outputs(response), reference.predict(sample[:3]))


async def test_model_config_of_a_model_that_does_not_batch(explicit_stub) -> None:
    """A model whose config turns batching off has no dynamic batcher, so its ModelConfig must not
    announce one (Triton's tools read `dynamic_batching` as "the server batches requests")."""
    stub = explicit_stub
    await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="unbatched"))
    try:
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name="unbatched"))).config
        assert [(i.name, list(i.dims)) for i in config.input] == [("X", [8])]
        assert not config.HasField("dynamic_batching"), config.dynamic_batching
    finally:
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="unbatched"))


async def test_a_failed_load_names_the_reason(explicit_stub, explicit: ServiceProcess) -> None:
    root = Path(explicit.args[explicit.args.index("--model-repository") + 1])
    corrupt = root / "corrupt"
    shutil.copytree(root / "demo", corrupt)
    (corrupt / "1" / "model.onnx").write_bytes(np.random.default_rng(5).bytes(4096))
    with pytest.raises(aio.AioRpcError) as failure:
        await explicit_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="corrupt"))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = failure.value.details() or ""
    assert "'corrupt' failed to load" in details
    ((version, state, reason),) = await index_entry(explicit_stub, "corrupt")
    assert (version, state) == ("1", "UNAVAILABLE")
    assert reason in details


async def test_a_load_whose_caller_gives_up_still_finishes(explicit_stub, explicit: ServiceProcess, repository) -> None:
    """The model file is a named pipe, so the load waits until the test writes the model into it;
    the caller's deadline passes first. The load must still finish (it used to stop half-way, leaving
    the model LOADING for good)."""
    root = Path(explicit.args[explicit.args.index("--model-repository") + 1])
    (root / "patient" / "1").mkdir(parents=True)
    fifo = root / "patient" / "1" / "model.onnx"
    os.mkfifo(fifo)
    with pytest.raises(aio.AioRpcError) as failure:
        await explicit_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="patient"), timeout=0.5)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await index_entry(explicit_stub, "patient") == [("", "LOADING", "")]
    await asyncio.to_thread(fifo.write_bytes, repository.demo.path.read_bytes())  # the load is reading it

    async def ready() -> bool:
        return bool((await explicit_stub.ModelReady(pb.ModelReadyRequest(name="patient"))).ready)

    await eventually(ready, what="the abandoned load finished")
    assert await index_entry(explicit_stub, "patient") == [("1", "READY", "")]
    await explicit_stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="patient"))


def load_parameters(**values: str | bytes) -> dict[str, pb.ModelRepositoryParameter]:
    """Parameters as tritonclient's load_model sends them: `config` a string, `file:` keys bytes."""
    return {
        key.replace("__", ":").replace("_slash_", "/").replace("_onnx", ".onnx"): (
            pb.ModelRepositoryParameter(bytes_param=value)
            if isinstance(value, bytes)
            else pb.ModelRepositoryParameter(string_param=value)
        )
        for key, value in values.items()
    }


async def test_load_honours_a_config_and_inline_files(
    explicit_stub, repository, sample: np.ndarray, reference: Reference
) -> None:
    """RepositoryModelLoad's `config` overrides the repository's configuration, and `file:` sends a
    model the repository does not hold; both used to be ignored."""
    stub = explicit_stub
    config = {
        "max_batch_size": 4,
        "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [8]}],
        "dynamic_batching": {"preferred_batch_size": [2]},
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
    }
    await stub.RepositoryModelLoad(
        pb.RepositoryModelLoadRequest(model_name="third", parameters=load_parameters(config=json.dumps(config)))
    )
    served = (await stub.ModelConfig(pb.ModelConfigRequest(name="third"))).config
    assert (served.max_batch_size, list(served.dynamic_batching.preferred_batch_size)) == (4, [2])
    assert [g.count for g in served.instance_group] == [2]

    onnx = repository.demo.path.read_bytes()
    inline = load_parameters(config=json.dumps({"max_batch_size": 8}), file__1_slash_model_onnx=onnx)
    await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="sent-inline", parameters=inline))
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="sent-inline"))).ready is True
    response = await stub.ModelInfer(infer_request(sample[:3], model="sent-inline"))
    assert_matches_reference(decode_outputs(response), reference.predict(sample[:3]))
    await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="sent-inline"))
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="sent-inline"))).ready is False

    escaping = load_parameters(config="{}", file__1_slash_model_onnx=onnx)
    escaping["file:../../escaped.onnx"] = pb.ModelRepositoryParameter(bytes_param=b"x")
    with pytest.raises(aio.AioRpcError) as failure:
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="sneaky", parameters=escaping))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "without '..'" in (failure.value.details() or "")
    with pytest.raises(aio.AioRpcError) as failure:
        await stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(
                model_name="third", parameters=load_parameters(config='{"ensemble_scheduling": {}}')
            )
        )
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsupported fields ['ensemble_scheduling']" in (failure.value.details() or "")
    # A refused load changes nothing.
    assert (await stub.ModelConfig(pb.ModelConfigRequest(name="third"))).config.max_batch_size == 4


# -- loading and unloading under traffic -------------------------------------------------------


async def test_load_unload_and_reload_under_traffic_fail_no_request(
    repository, tmp_path: Path, sample: np.ndarray, reference: Reference
) -> None:
    """Eight clients keep calling model A while model B is loaded and unloaded again and again and
    A is reloaded to version 2: not one call fails, and the answers switch from version 1 to 2."""
    root = tmp_path / "models"
    alpha = copy_model(repository, root, "alpha")
    copy_model(repository, root, "beta")
    service = start_predictor(
        root, tmp_path / "predictor.log", "--model-control-mode", "explicit", "--load-model", "alpha"
    )
    rows = [sample[i : i + 1 + i % 3] for i in range(16)]
    expected = [reference.predict(r) for r in rows]
    answered: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()
    try:
        async with aio.insecure_channel(service.address, options=CLIENT_OPTIONS) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def client(index: int) -> None:
                turn = index
                while not stop.is_set():
                    which = turn % len(rows)
                    turn += 1
                    try:
                        response = await stub.ModelInfer(infer_request(rows[which], model="alpha"), timeout=20)
                        assert_matches_reference(decode_outputs(response), expected[which])
                        answered.append(response.model_version)
                    except (aio.AioRpcError, AssertionError) as err:
                        failures.append(f"{type(err).__name__}: {err}")

            clients = [asyncio.ensure_future(client(i)) for i in range(8)]
            start = time.monotonic()
            cycles = 0
            reloaded_at = 0
            while time.monotonic() - start < 3.0 or not reloaded_at:
                await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="beta"))
                beta = await stub.ModelInfer(infer_request(sample[:2], model="beta"), timeout=20)
                assert_matches_reference(decode_outputs(beta), reference.predict(sample[:2]))
                await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="beta"))
                cycles += 1
                if not reloaded_at and time.monotonic() - start > 1.0:
                    assert set(answered) == {"1"}
                    shutil.copytree(alpha / "1", alpha / "2")
                    await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="alpha"))
                    reloaded_at = len(answered)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*clients)
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="beta"))).ready is False
            assert await ready_models(stub) == [("alpha", "2")]
        assert failures == []
        assert cycles >= 3
        assert set(answered) == {"1", "2"}
        assert answered[-50:] == ["2"] * 50, "calls after the reload are still answered by version 1"
        assert answered[:reloaded_at].count("1") > 0
    finally:
        stop.set()
        service.stop()


# -- a corrupt model, and poll mode ------------------------------------------------------------


@pytest.fixture(scope="module")
def polling(repository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Path]]:
    """A predictor polling its repository every 0.3 s; the repository holds demo and a model whose
    file is random bytes."""
    root = tmp_path_factory.mktemp("polling") / "models"
    copy_model(repository, root, "demo")
    corrupt = copy_model(repository, root, "corrupt")
    (corrupt / "1" / "model.onnx").write_bytes(np.random.default_rng(5).bytes(4096))
    service = start_predictor(
        root, root.parent / "predictor.log", "--model-control-mode", "poll", "--repository-poll-s", "0.3"
    )
    try:
        yield service, root
    finally:
        service.stop()


@pytest.fixture(scope="module")
async def polling_stub(polling) -> AsyncIterator[pb_grpc.GRPCInferenceServiceAsyncStub]:
    async with aio.insecure_channel(polling[0].address, options=CLIENT_OPTIONS) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


async def test_a_corrupt_model_is_unavailable_with_its_reason_and_the_others_serve(
    polling_stub, sample: np.ndarray, reference: Reference
) -> None:
    stub = polling_stub
    ((version, state, reason),) = await index_entry(stub, "corrupt")
    assert (version, state) == ("1", "UNAVAILABLE")
    assert reason, "an UNAVAILABLE model must say why"
    assert await index_entry(stub, "demo") == [("1", "READY", "")]
    assert ("corrupt", "1") not in await ready_models(stub)
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready is False
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="corrupt"))).ready is False
    code = await failure_code(stub.ModelInfer(infer_request(sample[:2], model="corrupt")))
    assert code == grpc.StatusCode.UNAVAILABLE

    response = await stub.ModelInfer(infer_request(sample[:4]))
    assert_matches_reference(decode_outputs(response), reference.predict(sample[:4]))

    response = await stub.ModelInfer(infer_request(sample[:4]))
    assert_matches_reference(decode_outputs(response), reference.predict(sample[:4]))


async def test_load_and_unload_are_refused_unless_explicit(polling_stub, predictor_aio) -> None:
    """As Triton: with the repository followed (poll) or fixed at start (none), the repository API
    must not load or unload; it used to, behind the poller's back."""
    for stub, mode in ((polling_stub, "poll"), (predictor_aio, "none")):
        for call in (
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="demo")),
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="demo")),
        ):
            with pytest.raises(aio.AioRpcError) as failure:
                await call
            assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            details = failure.value.details() or ""
            assert details.startswith("explicit model load / unload is not allowed if polling is enabled"), details
            assert f"--model-control-mode {mode}" in details
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="demo"))).ready is True


async def test_poll_mode_follows_the_repository(
    repository, polling, polling_stub, sample: np.ndarray, reference: Reference
) -> None:
    _, root = polling
    stub = polling_stub

    async def ready() -> bool:
        try:
            return bool((await stub.ModelReady(pb.ModelReadyRequest(name="polled"))).ready)
        except aio.AioRpcError:
            return False

    async def gone() -> bool:
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        return "polled" not in {m.name for m in index.models}

    assert await gone()
    copy_model(repository, root, "polled")
    await eventually(ready, what="the copied model READY")
    response = await stub.ModelInfer(infer_request(sample[:3], model="polled"))
    assert_matches_reference(decode_outputs(response), reference.predict(sample[:3]))

    shutil.rmtree(root / "polled")
    await eventually(gone, what="the deleted model unloaded")
    assert [m.name for m in (await stub.RepositoryIndex(pb.RepositoryIndexRequest())).models] == ["corrupt", "demo"]


# -- ModelConfig, statistics and metrics on the shared predictor -------------------------------


async def test_model_config_in_triton_form(predictor_aio) -> None:
    config = (await predictor_aio.ModelConfig(pb.ModelConfigRequest(name="demo"))).config
    assert (config.name, config.platform, config.backend) == ("demo", "onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == 64
    # With max_batch_size > 0, dims leave the batch dimension out.
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("X", mc.TYPE_FP32, [8])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("label", mc.TYPE_INT64, []),
        ("probabilities", mc.TYPE_FP32, [2]),
    ]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024
    assert config.version_policy.latest.num_versions == 1
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, mc.ModelInstanceGroup.KIND_CPU)]
    with pytest.raises(aio.AioRpcError) as failure:
        await predictor_aio.ModelConfig(pb.ModelConfigRequest(name="no-such-model"))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def model_samples(url: str, model: str) -> dict[str, float]:
    """The /metrics samples of one model's version 1, by sample name."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == model and sample.labels.get("version") == "1":
                if sample.name.endswith("_bucket"):
                    continue
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


async def model_statistics(stub: pb_grpc.GRPCInferenceServiceAsyncStub, name: str) -> pb.ModelStatistics:
    response = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=name, version="1"))
    (stats,) = response.model_stats
    return stats


async def test_concurrent_traffic_forms_batches_in_statistics_and_metrics(tmp_path: Path) -> None:
    """256 one-row requests from 32 concurrent clients to a model that computes for milliseconds:
    fewer executions than inferences, and the metrics count the same batches and every request's
    queue time. A model that answers in microseconds may honestly never batch (each request is
    done before the next one is read), so this one is slow enough for requests to queue."""
    write_slow_model(tmp_path / "models", width=256, depth=16)
    predictor = start_predictor(tmp_path / "models", tmp_path / "predictor.log")
    rows = np.random.default_rng(7).normal(size=(256, 256)).astype(np.float32)
    try:
        async with aio.insecure_channel(predictor.address, options=CLIENT_OPTIONS) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            before = await model_statistics(stub, "slow")
            metrics_before = await asyncio.to_thread(model_samples, predictor.metrics_url, "slow")

            async def client(index: int) -> None:
                for turn in range(8):
                    row = index * 8 + turn
                    await stub.ModelInfer(infer_request(rows[row : row + 1], model="slow"), timeout=60)

            await asyncio.gather(*(client(i) for i in range(32)))
            after = await model_statistics(stub, "slow")
            metrics_after = await asyncio.to_thread(model_samples, predictor.metrics_url, "slow")
    finally:
        assert predictor.stop() == 0

    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == 256
    assert after.inference_stats.success.count - before.inference_stats.success.count == 256
    assert 0 < executions < inferences, "no two requests ever shared an execution"
    earlier = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    grown = {b.batch_size: b.compute_infer.count - earlier.get(b.batch_size, 0) for b in after.batch_stats}
    assert sum(grown.values()) == executions
    assert max(size for size, count in grown.items() if count) > 1

    def grew(name: str) -> float:
        return metrics_after.get(name, 0.0) - metrics_before.get(name, 0.0)

    assert grew("fresco_model_batch_size_count") == executions
    assert grew("fresco_model_batch_size_sum") == inferences
    assert grew("fresco_model_queue_seconds_count") == 256
    assert grew("fresco_model_queue_seconds_sum") >= 0
    assert grew("fresco_model_executions_total") == executions
    assert grew("fresco_model_inferences_total") == inferences
