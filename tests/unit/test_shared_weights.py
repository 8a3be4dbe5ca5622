"""Shared weights: a session over the shared cache entry answers bit for bit as a session over the
model's bytes, maps its weights from the entry instead of copying them, and an entry is written once
(whatever the number of processes loading it) and never rewritten."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from chassis.errors import InvalidArgument
from fresco.training import ExportedModel
from predictor.backends.base import BackendOptions
from predictor.backends.onnx import OnnxRuntimeBackend, OnnxSession
from predictor.config import ModelConfig
from predictor.models import ModelStore, State
from predictor.repository import ModelRepository
from predictor.shared_weights import MODEL_FILE, REFUSED_FILE, WEIGHTS_FILE, SharedWeights

REPO_ROOT = Path(__file__).resolve().parents[2]


def mlp(widths: tuple[int, ...] = (32, 384, 384, 1), seed: int = 5) -> bytes:
    """X FP32 [N, widths[0]] → (MatMul, Add, Relu)… → Y: the matrix products ONNX Runtime pre-packs."""
    rng = np.random.default_rng(seed)
    nodes, weights, previous = [], [], "X"
    for layer, (rows, cols) in enumerate(itertools.pairwise(widths)):
        weight = (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)
        weights += [
            numpy_helper.from_array(weight, f"w{layer}"),
            numpy_helper.from_array(rng.standard_normal(cols).astype(np.float32), f"b{layer}"),
        ]
        nodes += [
            helper.make_node("MatMul", [previous, f"w{layer}"], [f"m{layer}"]),
            helper.make_node("Add", [f"m{layer}", f"b{layer}"], [f"a{layer}"]),
        ]
        previous = f"a{layer}"
        if layer < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [previous], [f"r{layer}"]))
            previous = f"r{layer}"
    nodes.append(helper.make_node("Identity", [previous], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", widths[0]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", widths[-1]])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def cnn(seed: int = 6) -> bytes:
    """X FP32 [N, 3, 16, 16] → Conv → Relu → Conv → GlobalAveragePool → Flatten → Gemm → Y [N, 10]."""
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["X", "k1", "c1"], ["h1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h1"], ["r1"]),
            helper.make_node("Conv", ["r1", "k2", "c2"], ["h2"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("GlobalAveragePool", ["h2"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "g", "gb"], ["Y"], transB=1),
        ],
        "cnn",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 10])],
        [
            tensor("k1", 32, 3, 3, 3),
            tensor("c1", 32),
            tensor("k2", 64, 32, 3, 3),
            tensor("c2", 64),
            tensor("g", 10, 64),
            tensor("gb", 10),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def shared_backend(root: Path) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(shared=SharedWeights(root), shared_min_bytes=1)


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def assert_same_answers(shared: OnnxSession, plain: OnnxSession, inputs: dict[str, np.ndarray]) -> None:
    ours, theirs = shared.run(inputs, ()), plain.run(inputs, ())
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype
        np.testing.assert_array_equal(ours[name], theirs[name], strict=True)


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_mlp_answers_bit_for_bit_as_the_plain_session(tmp_path: Path, batch: int) -> None:
    model = mlp()
    shared = shared_backend(tmp_path).load(model, ModelConfig())
    plain = OnnxRuntimeBackend().load(model, ModelConfig())
    assert shared.shared_from is not None
    assert plain.shared_from is None
    x = np.random.default_rng(batch).standard_normal((batch, 32)).astype(np.float32)
    assert_same_answers(shared, plain, {"X": x})
    assert [(s.name, s.datatype, s.shape) for s in shared.inputs] == [("X", "FP32", (-1, 32))]
    assert [(s.name, s.datatype, s.shape) for s in shared.outputs] == [("Y", "FP32", (-1, 1))]
    assert shared.memory_bytes() == plain.memory_bytes() == len(model)


def test_cnn_answers_bit_for_bit_as_the_plain_session(tmp_path: Path) -> None:
    model = cnn()
    shared = shared_backend(tmp_path).load(model, ModelConfig())
    plain = OnnxRuntimeBackend().load(model, ModelConfig())
    assert shared.shared_from is not None
    x = np.random.default_rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32)
    assert_same_answers(shared, plain, {"X": x})


def test_trained_pipeline_answers_bit_for_bit_as_the_plain_session(
    tmp_path: Path, trained_model: ExportedModel
) -> None:
    """A scikit-learn pipeline exported with skl2onnx: ai.onnx.ml operators, an INT64 label output."""
    model = trained_model.path.read_bytes()
    shared = shared_backend(tmp_path).load(model, ModelConfig())
    plain = OnnxRuntimeBackend().load(model, ModelConfig())
    assert shared.shared_from is not None
    assert_same_answers(shared, plain, {"X": trained_model.sample[:50]})


def test_weights_are_mapped_from_the_entry_not_copied(tmp_path: Path) -> None:
    model = mlp((64, 1024, 1024, 1))
    session = shared_backend(tmp_path).load(model, ModelConfig())
    assert session.shared_from is not None
    weights = session.shared_from.with_name(WEIGHTS_FILE)
    session.run({"X": np.ones((2, 64), np.float32)}, ())
    mapped_kb = 0
    in_weights = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            in_weights = fields[-1] == str(weights)
        elif in_weights and fields[0] == "Rss:":
            mapped_kb += int(fields[1])
    # The 1024 × 1024 FP32 product alone is 4 MiB: it is read from the mapped file.
    assert mapped_kb * 1024 >= 4 << 20


def test_an_entry_is_written_once_and_reused(tmp_path: Path) -> None:
    model = mlp()
    first = shared_backend(tmp_path).load(model, ModelConfig())
    assert first.shared_from is not None
    written = {p.name: p.stat().st_mtime_ns for p in first.shared_from.parent.iterdir()}
    assert set(written) == {MODEL_FILE, WEIGHTS_FILE}
    second = shared_backend(tmp_path).load(model, ModelConfig())
    assert second.shared_from == first.shared_from
    assert {p.name: p.stat().st_mtime_ns for p in first.shared_from.parent.iterdir()} == written
    assert entries(tmp_path) == [first.shared_from.parent]


def test_processes_loading_at_once_write_one_entry(tmp_path: Path) -> None:
    """Four processes (as the workers of --workers 4 at start) load the same model concurrently:
    one writes the entry while the others wait for it, and all answer alike."""
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(mlp((32, 512, 512, 1)))
    cache = tmp_path / "cache"
    script = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from predictor.backends.onnx import OnnxRuntimeBackend\n"
        "from predictor.config import ModelConfig\n"
        "from predictor.shared_weights import SharedWeights\n"
        "backend = OnnxRuntimeBackend(shared=SharedWeights(Path(sys.argv[2])), shared_min_bytes=1)\n"
        "session = backend.load(Path(sys.argv[1]).read_bytes(), ModelConfig())\n"
        "x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)\n"
        "print(session.shared_from)\n"
        "print(session.run({'X': x}, ())['Y'].tobytes().hex())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(model_file), str(cache)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=120)[0].split() for process in processes]
    assert [process.returncode for process in processes] == [0] * 4
    (entry,) = entries(cache)
    assert {out[0] for out in outputs} == {str(entry / MODEL_FILE)}
    plain = OnnxRuntimeBackend().load(model_file.read_bytes(), ModelConfig())
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    assert {out[1] for out in outputs} == {plain.run({"X": x}, ())["Y"].tobytes().hex()}


def test_a_loaded_session_keeps_its_weights_when_the_entry_goes(tmp_path: Path) -> None:
    """A pruned cache (or a new model version) never changes what a loaded session answers: the
    mapping holds the file it was made from."""
    old_model, new_model = mlp(seed=1), mlp(seed=2)
    backend = shared_backend(tmp_path)
    old = backend.load(old_model, ModelConfig())
    x = np.random.default_rng(3).standard_normal((7, 32)).astype(np.float32)
    before = old.run({"X": x}, ())["Y"]
    new = backend.load(new_model, ModelConfig())
    assert old.shared_from is not None
    assert new.shared_from is not None
    assert new.shared_from.parent != old.shared_from.parent
    assert not np.array_equal(new.run({"X": x}, ())["Y"], before)
    for path in old.shared_from.parent.iterdir():
        path.unlink()
    old.shared_from.parent.rmdir()
    np.testing.assert_array_equal(old.run({"X": x}, ())["Y"], before, strict=True)


def test_writing_an_entry_removes_those_unused_for_a_week(tmp_path: Path) -> None:
    backend = shared_backend(tmp_path)
    old = backend.load(mlp(seed=1), ModelConfig()).shared_from
    recent = backend.load(mlp(seed=2), ModelConfig()).shared_from
    assert old is not None
    assert recent is not None
    week_ago = time.time() - 7 * 24 * 3600 - 60
    os.utime(old.parent, (week_ago, week_ago))
    os.utime(recent.parent, (week_ago + 120, week_ago + 120))  # used a little less than a week ago
    abandoned = tmp_path / ".abandoned-staging"
    abandoned.mkdir()
    os.utime(abandoned, (week_ago, week_ago))
    newest = backend.load(mlp(seed=3), ModelConfig()).shared_from
    assert newest is not None
    assert entries(tmp_path) == sorted([recent.parent, newest.parent])
    assert not abandoned.exists()
    # Loading from an entry counts as using it: it is not pruned while in use.
    again = backend.load(mlp(seed=2), ModelConfig()).shared_from
    assert again == recent
    assert recent.parent.stat().st_mtime > time.time() - 60


def test_below_the_threshold_or_turned_off_a_session_holds_its_own_weights(tmp_path: Path) -> None:
    model = mlp()
    assert (
        OnnxRuntimeBackend(shared=SharedWeights(tmp_path), shared_min_bytes=len(model) + 1)
        .load(model, ModelConfig())
        .shared_from
        is None
    )
    assert (
        OnnxRuntimeBackend(shared=SharedWeights(tmp_path), shared_min_bytes=0).load(model, ModelConfig()).shared_from
        is None
    )
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_falls_back_to_private_weights(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    model = mlp()
    session = shared_backend(blocker / "cache").load(model, ModelConfig())
    assert session.shared_from is None
    plain = OnnxRuntimeBackend().load(model, ModelConfig())
    assert_same_answers(session, plain, {"X": np.ones((2, 32), np.float32)})


def test_a_broken_model_is_refused_as_without_sharing(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"^model file could not be loaded by ONNX Runtime: "):
        shared_backend(tmp_path).load(b"not an onnx model", ModelConfig())
    assert entries(tmp_path) == []


async def test_the_store_serves_new_versions_from_new_entries(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    """Version updates through the model store: each version file gets its own entry, and a reload
    after the file was replaced serves the new weights."""
    root, cache = tmp_path / "models", tmp_path / "cache"
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "config.yaml").write_text(yaml.safe_dump({"version_policy": {"all": True}}))
    (root / "m" / "1" / "model.onnx").write_bytes(mlp(seed=1))
    options = BackendOptions(shared_weights_min_bytes=1, shared_weights_dir=cache)
    store = ModelStore(ModelRepository(root), executor, options)
    x = np.random.default_rng(4).standard_normal((3, 32)).astype(np.float32)
    try:
        model = await store.load("m")
        assert model.state is State.READY, model.reason
        first = (await store.infer(store.get("m", "1"), {"X": x}, []))["Y"]
        (root / "m" / "2").mkdir()
        (root / "m" / "2" / "model.onnx").write_bytes(mlp(seed=2))
        model = await store.load("m")
        assert model.state is State.READY, model.reason
        assert len(entries(cache)) == 2
        np.testing.assert_array_equal((await store.infer(store.get("m", "1"), {"X": x}, []))["Y"], first, strict=True)
        replaced = tmp_path / "new.onnx"  # replaced as deployments do: a new file renamed over the old
        replaced.write_bytes(mlp(seed=3))
        replaced.rename(root / "m" / "1" / "model.onnx")
        model = await store.load("m")
        assert model.state is State.READY, model.reason
        expected = OnnxRuntimeBackend().load(mlp(seed=3), ModelConfig()).run({"X": x}, ())["Y"]
        got = (await store.infer(store.get("m", "1"), {"X": x}, []))["Y"]
        np.testing.assert_array_equal(got, expected, strict=True)
        assert len(entries(cache)) == 3
        for number in (1, 2):
            session = store.get("m", str(number)).session
            assert isinstance(session, OnnxSession)
            assert session.shared_from is not None
    finally:
        await store.close()


def qoperator_cnn(tmp_path: Path) -> bytes:
    """cnn() statically quantised in QOperator format (QLinearConv): ONNX Runtime saves its optimised copy with
    a weights file shorter than the copy's graph says."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from model_manager.quantize import CalibrationRows

    rows = np.random.default_rng(7).standard_normal((6, 3, 16, 16)).astype(np.float32)
    tmp_path.mkdir(parents=True, exist_ok=True)
    source, quantised = tmp_path / "cnn.onnx", tmp_path / "cnn.int8.onnx"
    source.write_bytes(cnn())
    quantize_static(str(source), str(quantised), CalibrationRows("X", rows, 2), quant_format=QuantFormat.QOperator)
    return quantised.read_bytes()


def test_an_optimised_copy_that_does_not_load_is_refused_once_for_every_process(tmp_path: Path) -> None:
    model = qoperator_cnn(tmp_path / "model")
    cache = tmp_path / "cache"
    shared = shared_backend(cache).load(model, ModelConfig())
    plain = OnnxRuntimeBackend().load(model, ModelConfig())
    assert shared.shared_from is None, "its own weights: the copy cannot stand in for the model"
    assert_same_answers(shared, plain, {"X": np.random.default_rng(2).standard_normal((3, 3, 16, 16), np.float32)})
    (entry,) = entries(cache)
    assert sorted(p.name for p in entry.iterdir()) == [REFUSED_FILE]
    assert "does not load" in (entry / REFUSED_FILE).read_text()
    refused_at = (entry / REFUSED_FILE).stat().st_mtime_ns
    again = shared_backend(cache).load(model, ModelConfig())
    assert again.shared_from is None
    assert entries(cache) == [entry]
    assert (entry / REFUSED_FILE).stat().st_mtime_ns == refused_at, "not written again"


class DamagingWeights(SharedWeights):
    """Saves an optimised copy whose weights file is zeroed afterwards (same size): it loads, and answers wrong."""

    def _save(self, model_bytes: bytes, saving: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
        session = super()._save(model_bytes, saving, providers)
        weights = Path(saving.optimized_model_filepath).with_name(WEIGHTS_FILE)
        weights.write_bytes(bytes(weights.stat().st_size))
        return session


def test_an_optimised_copy_that_answers_differently_is_never_used(tmp_path: Path) -> None:
    model = mlp()
    shared = OnnxRuntimeBackend(shared=DamagingWeights(tmp_path), shared_min_bytes=1).load(model, ModelConfig())
    plain = OnnxRuntimeBackend().load(model, ModelConfig())
    assert shared.shared_from is None
    assert_same_answers(shared, plain, {"X": np.random.default_rng(5).standard_normal((4, 32)).astype(np.float32)})
    (entry,) = entries(tmp_path)
    assert "answers a probe differently" in (entry / REFUSED_FILE).read_text()
    # Every process after it, whatever it would write, holds its own weights without trying the entry.
    later = shared_backend(tmp_path).load(model, ModelConfig())
    assert later.shared_from is None
    assert_same_answers(later, plain, {"X": np.ones((2, 32), np.float32)})
