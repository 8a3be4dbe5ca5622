"""Builders the drift tests share: sketches of seeded values, metric windows carrying them (as the store's
MetricWindow and as the gateway's MetricsWindow message), and training statistics of the same features."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.api.models.v1 import routing_pb2 as rtpb
from fresco.monitoring.sketches import ColumnSketch
from fresco.monitoring.training import feature_statistics
from model_manager.lifecycle import Stage
from model_manager.records import ModelSpec, VersionSpec
from model_manager.registry import Registry
from model_manager.window_sketches import WindowSketch
from model_manager.windows import LATENCY_BOUNDS_MS, Histogram, MetricWindow
from tests.model_manager.registry_support import artifact

FEATURE = mpb.VALUE_SKETCH_KIND_FEATURE
SCORE = mpb.VALUE_SKETCH_KIND_SCORE
REFS = ("users:age", "users:spend", "users:visits")


def sketch(name: str, values: Sequence[object] | np.ndarray, kind: int = FEATURE) -> mpb.ValueSketch:
    """The ValueSketch of these values, as a gateway ships it."""
    s = ColumnSketch(name, kind)
    if isinstance(values, np.ndarray):
        s.add_numbers(values.astype(np.float64))
    else:
        s.add(list(values))
    return s.to_proto()


def window(
    model: str,
    version: int,
    sketches: Sequence[mpb.ValueSketch],
    *,
    start: float,
    length_s: float = 10.0,
    wid: str = "",
    mirrored: bool = False,
    requests: int = 1,
) -> MetricWindow:
    """A store-side window carrying these sketches."""
    return MetricWindow(
        window_id=wid or uuid.uuid4().hex,
        gateway_id="gw-1",
        model=model,
        version=version,
        route_revision=1,
        start=start,
        end=start + length_s,
        status_counts={"OK": requests},
        latency_ms=Histogram.empty(LATENCY_BOUNDS_MS),
        mirrored=mirrored,
        sketches=tuple(WindowSketch.of(s) for s in sketches),
    )


def message(
    model: str,
    version: int,
    sketches: Sequence[mpb.ValueSketch],
    *,
    end: float,
    revision: int = 1,
    requests: int = 1000,
    wid: str = "",
) -> rtpb.MetricsWindow:
    """A gateway's ten-second MetricsWindow ending at `end`, its requests all OK in the 5 ms bucket."""
    hist = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    hist[LATENCY_BOUNDS_MS.index(5.0)] = requests
    w = rtpb.MetricsWindow(
        model_name=model,
        version=version,
        window_id=wid or uuid.uuid4().hex,
        route_revision=revision,
        status_counts={"OK": requests},
        latency=rtpb.LatencySummary(histogram=spb.Histogram(bucket_bounds=LATENCY_BOUNDS_MS, bucket_counts=hist)),
        value_sketches=sketches,
    )
    w.window_start.FromNanoseconds(int((end - 10) * 1e9))
    w.window_end.FromNanoseconds(int(end * 1e9))
    return w


def traffic(seed: int, rows: int, shift: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Seeded rows of the three features, standard normal, with some features shifted by that many sd."""
    rng = np.random.default_rng(seed)
    return {ref: rng.normal(loc=(shift or {}).get(ref, 0.0), size=rows) for ref in REFS}


def training(seed: int = 1, rows: int = 20_000) -> tuple[spb.FeatureStatistics, ...]:
    """Training statistics of the three features (standard normal)."""
    return tuple(feature_statistics(ref, values) for ref, values in traffic(seed, rows).items())


def sketches_of(columns: Mapping[str, np.ndarray]) -> list[mpb.ValueSketch]:
    """One feature sketch per column."""
    return [sketch(name, values) for name, values in columns.items()]


def monitored_signature() -> rpb.ModelSignature:
    """Three features into one input, a probability out."""
    return rpb.ModelSignature(
        inputs=[rpb.TensorSpec(name="features", datatype="FP32", shape=[-1, len(REFS)])],
        outputs=[rpb.TensorSpec(name="probability", datatype="FP32", shape=[-1, 1])],
        feature_refs=list(REFS),
        feature_input="features",
    )


def scores(seed: int, rows: int) -> np.ndarray:
    """Seeded scores in [0, 1]."""
    return np.random.default_rng(seed).beta(2.0, 5.0, size=rows)


def register(
    registry: Registry, versions: Sequence[int] = (1,), *, production: int | None = 1, stage: Stage = Stage.CANDIDATE
) -> str:
    """A model whose versions were trained on standard normal features and Beta(2, 5) scores."""
    name = f"m-{uuid.uuid4().hex[:8]}"
    registry.create_model(ModelSpec(name=name, owner="risk", signature=monitored_signature()), "tester")
    stats = (*training(), feature_statistics("probability", scores(2, 20_000)))
    for v in versions:
        content = f"{name}-{v}".encode()
        spec = VersionSpec(
            model_name=name,
            version=v,
            format="onnx",
            expected_sha256=artifact(content).sha256,
            signature=monitored_signature(),
            training_statistics=stats,
        )
        registry.register_version(spec, artifact(content), "tester")
        if stage is not Stage.REGISTERED or v == production:
            for s in (Stage.VALIDATING, Stage.CANDIDATE):
                registry.set_stage(name, v, s, "tester")
    if production is not None:
        registry.set_stage(name, production, Stage.PRODUCTION, "tester")
    return name
