"""The schema gate: the artifact loads and matches its signature, every feature ref exists in the feature
service with a compatible type, and the outputs stay compatible with the production version."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc import aio

from chassis.tensors import ONNX_TYPE
from fresco.api.features.v1 import feature_service_pb2 as fpb
from fresco.api.features.v1 import feature_service_pb2_grpc as fpb_grpc
from fresco.api.features.v1 import feature_view_pb2 as vpb
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.backtest import BacktestError, load_session
from model_manager.gate_results import check, error

SCHEMA = rpb.GATE_TYPE_SCHEMA
_NUMERIC = frozenset({vpb.VALUE_TYPE_DOUBLE, vpb.VALUE_TYPE_FLOAT, vpb.VALUE_TYPE_INT64, vpb.VALUE_TYPE_INT32})
_INTEGER = frozenset({vpb.VALUE_TYPE_INT64, vpb.VALUE_TYPE_INT32, vpb.VALUE_TYPE_BOOL})
# The feature value types a model input of each datatype can take, once assembled into its feature tensor.
COMPATIBLE: dict[str, frozenset[int]] = {
    **{t: _NUMERIC | {vpb.VALUE_TYPE_BOOL} for t in ("FP16", "BF16", "FP32", "FP64")},
    **{t: _INTEGER for t in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")},
    "BOOL": frozenset({vpb.VALUE_TYPE_BOOL}),
    "BYTES": frozenset({vpb.VALUE_TYPE_STRING, vpb.VALUE_TYPE_BYTES}),
}


def _shape_problem(declared: Sequence[int], actual: Sequence[Any]) -> str:
    if len(declared) != len(actual):
        return f"rank {len(declared)} declared, the graph has rank {len(actual)}"
    for axis, (want, have) in enumerate(zip(declared, actual, strict=True)):
        if want >= 0 and isinstance(have, int) and want != have:
            return f"dimension {axis} declared {want}, the graph has {have}"
    return ""


def _tensor_problems(kind: str, declared: Sequence[rpb.TensorSpec], graph: Sequence[Any]) -> list[str]:
    found = {arg.name: arg for arg in graph}
    problems = []
    for spec in declared:
        arg = found.get(spec.name)
        if arg is None:
            problems.append(f"{kind} {spec.name!r} is not in the graph (it has {sorted(found)})")
            continue
        datatype = ONNX_TYPE.get(arg.type, arg.type)
        if datatype != spec.datatype:
            problems.append(f"{kind} {spec.name!r} declared {spec.datatype}, the graph has {datatype}")
        shape = _shape_problem(list(spec.shape), list(arg.shape))
        if shape:
            problems.append(f"{kind} {spec.name!r}: {shape}")
    if kind == "input":
        undeclared = sorted(set(found) - {spec.name for spec in declared})
        if undeclared:
            problems.append(f"graph inputs {undeclared} are not in the signature, so nothing would feed them")
    return problems


def check_artifact(artifact: bytes, model_format: str, signature: rpb.ModelSignature) -> rpb.GateResult:
    """The artifact loads in ONNX Runtime and its inputs and outputs are the signature's (blocking)."""
    name = "schema.artifact"
    if model_format != "onnx":
        return error(name, SCHEMA, f"format {model_format} cannot be loaded in process; only onnx is checked")
    try:
        session = load_session(artifact)
    except BacktestError as err:
        return check(name, SCHEMA, False, str(err))
    problems = _tensor_problems("input", signature.inputs, session.get_inputs())
    problems += _tensor_problems("output", signature.outputs, session.get_outputs())
    if signature.feature_refs:
        spec = next((t for t in signature.inputs if t.name == signature.feature_input), None)
        if spec is None:
            problems.append(f"feature_input {signature.feature_input!r} names no input")
        elif spec.shape and spec.shape[-1] >= 0 and spec.shape[-1] != len(signature.feature_refs):
            problems.append(
                f"input {spec.name!r} takes {spec.shape[-1]} features, the signature lists "
                f"{len(signature.feature_refs)} feature_refs"
            )
    if problems:
        return check(name, SCHEMA, False, "; ".join(problems))
    detail = f"loads; {len(signature.inputs)} inputs and {len(signature.outputs)} outputs match the signature"
    return check(name, SCHEMA, True, detail)


class FeatureCatalog:
    """The feature service's views, read over gRPC (fresco.features.v1.FeatureService.GetFeatureView)."""

    def __init__(self, channel: aio.Channel, address: str, timeout_s: float = 10.0) -> None:
        self.address = address
        self._stub = fpb_grpc.FeatureServiceStub(channel)
        self._timeout_s = timeout_s

    async def view(self, name: str) -> vpb.FeatureView | None:
        """The view named `name`, or None when the feature service has none of that name."""
        try:
            reply = await self._stub.GetFeatureView(fpb.GetFeatureViewRequest(name=name), timeout=self._timeout_s)
        except aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return reply.feature_view

    async def parity(self) -> list[spb.FeatureParity]:
        """Online-offline parity counts of every feature checked so far (GetFeatureParity); gRPC errors propagate."""
        # Every ref, not the model's: one the feature service does not serve would fail the whole call (NOT_FOUND).
        reply = await self._stub.GetFeatureParity(fpb.GetFeatureParityRequest(), timeout=self._timeout_s)
        return list(reply.features)


async def check_feature_refs(signature: rpb.ModelSignature, catalog: FeatureCatalog | None) -> rpb.GateResult:
    """Every feature ref names a feature of a view the feature service has, of a type the input can take."""
    name = "schema.feature_refs"
    if catalog is None:
        return error(name, SCHEMA, "no feature service configured (feature_service_address)")
    spec = next((t for t in signature.inputs if t.name == signature.feature_input), None)
    accepted = COMPATIBLE.get(spec.datatype, frozenset()) if spec is not None else frozenset()
    views: dict[str, vpb.FeatureView | None] = {}
    problems = []
    for ref in signature.feature_refs:
        view_name, sep, feature_name = ref.partition(":")
        if not sep or not view_name or not feature_name:
            problems.append(f"{ref!r} is not a 'view:feature' ref")
            continue
        if view_name not in views:
            try:
                views[view_name] = await catalog.view(view_name)
            except aio.AioRpcError as err:
                return error(name, SCHEMA, f"feature service {catalog.address}: {err.code().name} {err.details()}")
        view = views[view_name]
        if view is None:
            problems.append(f"{ref}: the feature service has no view {view_name!r}")
            continue
        feature = next((f for f in view.features if f.name == feature_name), None)
        if feature is None:
            problems.append(f"{ref}: view {view_name!r} has no feature {feature_name!r}")
        elif feature.value_type not in accepted:
            have = vpb.ValueType.Name(feature.value_type)
            problems.append(f"{ref}: {have} does not fit input {signature.feature_input!r} of {spec and spec.datatype}")
    count = len(signature.feature_refs)
    if problems:
        return check(name, SCHEMA, False, "; ".join(problems), float(len(problems)), 0.0)
    return check(name, SCHEMA, True, f"{count} feature refs exist in the feature service with compatible types")


def check_outputs(
    signature: rpb.ModelSignature, production: rpb.ModelSignature | None, production_version: int
) -> rpb.GateResult:
    """Every output of the production version is still produced, with the same datatype (new outputs are fine)."""
    name = "schema.output_compatibility"
    if production is None:
        return check(name, SCHEMA, True, "no production version to compare with")
    ours = {t.name: t for t in signature.outputs}
    problems = []
    for theirs in production.outputs:
        mine = ours.get(theirs.name)
        if mine is None:
            problems.append(f"output {theirs.name!r} of production v{production_version} is missing")
        elif mine.datatype != theirs.datatype:
            problems.append(
                f"output {theirs.name!r} is {mine.datatype}; production v{production_version} has {theirs.datatype}"
            )
        elif len(mine.shape) != len(theirs.shape) or any(
            a >= 0 and b >= 0 and a != b for a, b in zip(mine.shape, theirs.shape, strict=False)
        ):
            problems.append(
                f"output {theirs.name!r} has shape {list(mine.shape)}; "
                f"production v{production_version} has {list(theirs.shape)}"
            )
    if problems:
        return check(name, SCHEMA, False, "; ".join(problems))
    return check(name, SCHEMA, True, f"outputs compatible with production v{production_version}")
