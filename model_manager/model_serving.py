"""How a model is served when its versions cannot: its configured fallback version and static answer.

The registry stores both per model (CreateModel, UpdateModel); the route builder turns them into each route's
fallback and static answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chassis.errors import InvalidArgument
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.route_codec import static_value
from model_manager.routes import StaticValue, _static_answer

# The model fields UpdateModel may change, by their names in fresco.models.v1.Model.
UPDATABLE = ("description", "owner", "labels", "fallback_version", "static_fallback")


@dataclass(frozen=True)
class ModelUpdate:
    """New values of a model's fields; only those named in `paths` change."""

    paths: frozenset[str]
    description: str = ""
    owner: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    fallback_version: int = 0
    static_fallback: rpb.StaticFallback = field(default_factory=rpb.StaticFallback)


def static_answer(where: str, fallback: rpb.StaticFallback) -> tuple[tuple[str, StaticValue], ...]:
    """A StaticFallback as the route's static answer; INVALID_ARGUMENT names the output that cannot be one."""
    outputs = fallback.outputs
    values = [(name, static_value(f"{where}.outputs[{name}]", outputs[name])) for name in sorted(outputs)]
    return _static_answer(f"{where}.outputs", values)


def check_static_fallback(where: str, fallback: rpb.StaticFallback, signature: rpb.ModelSignature) -> None:
    """Refuse a static answer with a null or mixed value, or an output the model's signature does not list."""
    static_answer(where, fallback)
    known = {o.name for o in signature.outputs}
    unknown = sorted(set(fallback.outputs) - known) if known else []
    if unknown:
        raise InvalidArgument(f"{where}.outputs[{unknown[0]}]: expected one of the signature's outputs {sorted(known)}")
