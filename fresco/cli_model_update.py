"""`fresco models update`: change a model's description, owner, labels, fallback version or static answer."""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer
from google.protobuf import field_mask_pb2
from rich.console import Console
from rich.markup import escape

from fresco.api.common.v1 import values_pb2
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.cli_manager import TIMEOUT_S, ServiceOption, TokenFileOption, connect

console = Console()

STATIC_OPTION = "--static-answer"


def _pairs(option: str, items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        if key in out:
            raise typer.BadParameter(f"{key!r} given twice", param_hint=option)
        out[key] = value
    return out


def static_value(output: str, text: str) -> values_pb2.Value:
    """One static answer value: JSON (a number, true/false, a quoted string, a flat list of numbers or of
    strings), else the text itself as a string. A null, an object or a mixed list is a usage error."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return values_pb2.Value(string_value=text)
    where = f"{STATIC_OPTION} {output}"
    # bool before int: a JSON true is a Python bool, which is an int.
    if isinstance(parsed, bool):
        return values_pb2.Value(bool_value=parsed)
    if isinstance(parsed, int):
        return values_pb2.Value(int64_value=parsed)
    if isinstance(parsed, float) and math.isfinite(parsed):
        return values_pb2.Value(double_value=parsed)
    if isinstance(parsed, str):
        return values_pb2.Value(string_value=parsed)
    if isinstance(parsed, list) and parsed:
        if all(isinstance(v, str) for v in parsed):
            return values_pb2.Value(string_list=values_pb2.StringList(values=parsed))
        if all(isinstance(v, int) and not isinstance(v, bool) for v in parsed):
            return values_pb2.Value(int64_list=values_pb2.Int64List(values=parsed))
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in parsed)
        if numbers:
            return values_pb2.Value(double_list=values_pb2.DoubleList(values=[float(v) for v in parsed]))
    raise typer.BadParameter(
        f"expected a number, true/false, a string, or a non-empty list of numbers or of strings, got {text!r}",
        param_hint=where,
    )


def update_request(
    name: str,
    *,
    description: str | None = None,
    owner: str | None = None,
    labels: list[str] | None = None,
    fallback_version: int | None = None,
    static_answer: list[str] | None = None,
    clear_static_answer: bool = False,
    reason: str = "",
) -> pb.UpdateModelRequest:
    """The UpdateModel request for the options given: each one given is named in the update mask."""
    if static_answer and clear_static_answer:
        raise typer.BadParameter("give --static-answer or --clear-static-answer, not both", param_hint=STATIC_OPTION)
    model = rpb.Model(name=name)
    paths: list[str] = []
    if description is not None:
        model.description = description
        paths.append("description")
    if owner is not None:
        model.owner = owner
        paths.append("owner")
    if labels is not None:
        model.labels.update(_pairs("--label", labels))
        paths.append("labels")
    if fallback_version is not None:
        model.fallback_version = fallback_version
        paths.append("fallback_version")
    if static_answer:
        for output, text in _pairs(STATIC_OPTION, static_answer).items():
            model.static_fallback.outputs[output].CopyFrom(static_value(output, text))
        paths.append("static_fallback")
    elif clear_static_answer:
        paths.append("static_fallback")  # named with no outputs: the static answer is removed
    if not paths:
        raise typer.BadParameter(
            "nothing to update: give --description, --owner, --label, --fallback-version, --static-answer or "
            "--clear-static-answer"
        )
    return pb.UpdateModelRequest(model=model, update_mask=field_mask_pb2.FieldMask(paths=paths), reason=reason)


def update(
    name: Annotated[str, typer.Argument(help="Model name.")],
    service: ServiceOption,
    token_file: TokenFileOption = None,
    description: Annotated[str | None, typer.Option(help="New description.")] = None,
    owner: Annotated[str | None, typer.Option(help="New owner.")] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE; repeat. The model's labels become exactly those given.")
    ] = None,
    fallback_version: Annotated[
        int | None, typer.Option(min=0, help="Version served when the production version fails; 0 for none.")
    ] = None,
    static_answer: Annotated[
        list[str] | None,
        typer.Option(
            help="OUTPUT=VALUE answered when no version can serve; repeat, one per output. VALUE is JSON "
            '(0.5, true, [0.5, 0.5], "text") or plain text. Replaces the whole static answer.'
        ),
    ] = None,
    clear_static_answer: Annotated[
        bool, typer.Option("--clear-static-answer", help="Remove the static answer: failed calls get errors.")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
) -> None:
    """Change a model's description, owner, labels, fallback version or static answer (audited); prints the
    model's fields after the change."""
    request = update_request(
        name,
        description=description,
        owner=owner,
        labels=label,
        fallback_version=fallback_version,
        static_answer=static_answer,
        clear_static_answer=clear_static_answer,
        reason=reason,
    )
    with connect(service, token_file, "update") as m:
        model = m.stub.UpdateModel(request, timeout=TIMEOUT_S, metadata=m.metadata).model
    changed = ", ".join(request.update_mask.paths)
    console.print(f"updated [bold]{escape(model.name)}[/bold]: {escape(changed)}")
    labels = ", ".join(f"{k}={v}" for k, v in sorted(model.labels.items())) or "-"
    console.print(f"owner {escape(model.owner or '-')}; labels {escape(labels)}")
    console.print(f"description {escape(model.description or '-')}")
    console.print(f"fallback version {model.fallback_version or '-'}")
    outputs = model.static_fallback.outputs
    shown = ", ".join(f"{o}={_shown(outputs[o])}" for o in sorted(outputs)) or "-"
    console.print(f"static answer {escape(shown)}")


def _shown(value: values_pb2.Value) -> str:
    """A static answer value as compact JSON (bytes as hex)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return "null"
    raw = getattr(value, kind)
    if kind.endswith("_list"):
        return json.dumps(list(raw.values))
    if isinstance(raw, bytes):
        return f"bytes {raw.hex()}"
    return json.dumps(raw)
