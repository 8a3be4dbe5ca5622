"""`fresco models labels NAME FILE`: late labels from a CSV or Parquet file, streamed through LogLabels in batches."""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import monitoring_pb2 as mpb
from fresco.cli_manager import TIMEOUT_S, Manager, ServiceOption, TokenFileOption, connect

console = Console()
EXAMPLES = 3


@dataclass
class Tally:
    """What the manager answered for a file's labels."""

    accepted: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    # A few refusals per reason, as (row number in the file, detail).
    examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def add(self, response: pb.LogLabelsResponse, first_row: int) -> None:
        self.accepted += response.accepted
        for r in response.rejected:
            reason = mpb.LabelRejection.Name(r.reason).removeprefix("LABEL_REJECTION_").lower()
            self.rejected[reason] += 1
            kept = self.examples.setdefault(reason, [])
            if len(kept) < EXAMPLES:
                kept.append((first_row + r.index, r.detail))


def read_labels(path: Path, id_column: str, label_column: str) -> tuple[list[str], list[float]]:
    """The request ids (missing ones empty) and labels (missing ones NaN) of a CSV or Parquet file."""
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.compute as pc  # type: ignore[import-untyped]
    import pyarrow.csv as pcsv  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    suffixes = [s.lower() for s in path.suffixes]
    try:
        if suffixes[-1:] in ([".parquet"], [".pq"]):
            table = pq.read_table(path)
        elif ".csv" in suffixes:
            options = pcsv.ConvertOptions(column_types={id_column: pa.string()})
            table = pcsv.read_csv(path, convert_options=options)
        else:
            raise typer.BadParameter("expected a .csv (or .csv.gz) or .parquet file", param_hint="FILE")
    except (pa.ArrowInvalid, OSError) as err:
        raise typer.BadParameter(f"cannot read {path}: {err}", param_hint="FILE") from None
    for option, column in (("--request-id-column", id_column), ("--label-column", label_column)):
        if column not in table.column_names:
            found = ", ".join(table.column_names)
            raise typer.BadParameter(f"no column {column!r} in {path.name} (it has {found})", param_hint=option)
    try:
        values = pc.cast(table[label_column], pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise typer.BadParameter(f"column {label_column!r}: expected numbers", param_hint="--label-column") from None
    ids = pc.cast(table[id_column], pa.string()).to_pylist()
    labels = values.to_pylist()
    return ["" if i is None else i for i in ids], [float("nan") if v is None else float(v) for v in labels]


def batches(name: str, tag: str, ids: Sequence[str], values: Sequence[float], size: int) -> list[pb.LogLabelsRequest]:
    """The file's labels as LogLabels batches, each with an id naming its first row."""
    out = []
    for start in range(0, len(ids), size):
        labels = [
            mpb.Label(request_id=i, value=v)
            for i, v in zip(ids[start : start + size], values[start : start + size], strict=True)
        ]
        out.append(pb.LogLabelsRequest(labels=labels, batch_id=f"{tag}:{start}", model_name=name))
    return out


def send(manager: Manager, requests: list[pb.LogLabelsRequest]) -> Tally:
    """Stream the batches and add up the answers. A failed stream fails the command: running it again is safe, since
    a label sent twice is counted once."""
    tally = Tally()
    first_rows = {r.batch_id: int(r.batch_id.rsplit(":", 1)[1]) + 1 for r in requests}
    # A deadline that grows with the file: a manager that stops answering does not hang the command.
    deadline = TIMEOUT_S + len(requests)
    stream: Iterator[pb.LogLabelsResponse] = manager.stub.LogLabels(
        iter(requests), timeout=deadline, metadata=manager.metadata
    )
    for response in stream:
        tally.add(response, first_rows[response.batch_id])
    return tally


def labels(
    name: Annotated[str, typer.Argument(help="Model name.")],
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="CSV or Parquet file with a request id and a label per row."),
    ],
    service: ServiceOption,
    token_file: TokenFileOption = None,
    request_id_column: Annotated[str, typer.Option(help="Column holding the prediction's request id.")] = "request_id",
    label_column: Annotated[str, typer.Option(help="Column holding the observed outcome.")] = "label",
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Labels per LogLabels batch.")] = 1000,
) -> None:
    """Send late labels from a file, joined to NAME's predictions by request id; prints how many were accepted and
    why the others were refused. Sending a file again counts its labels once."""
    ids, values = read_labels(file, request_id_column, label_column)
    requests = batches(name, file.name, ids, values, batch_size)
    with connect(service, token_file, "labels") as m:
        tally = send(m, requests)
    rejected = sum(tally.rejected.values())
    console.print(f"labels of {escape(name)} from {escape(file.name)}: {tally.accepted} accepted, {rejected} rejected")
    for reason, count in tally.rejected.most_common():
        console.print(f"  {reason}: {count}")
        for row, detail in tally.examples[reason]:
            console.print(f"    row {row}: {escape(detail)}")
