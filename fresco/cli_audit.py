"""`fresco audit`: the registry's audit log, newest first: who changed what, when and why."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.cli_manager import TIMEOUT_S, Manager, ServiceOption, TokenFileOption, connect
from fresco.rollout_view import audit_table

console = Console()
# The most records one page asks for; `--limit` above it takes several pages.
PAGE_SIZE = 100


def records(m: Manager, model: str, limit: int) -> list[rpb.AuditRecord]:
    """Up to `limit` records (of `model`, or of all models), newest first, page by page."""
    found: list[rpb.AuditRecord] = []
    token = ""
    while len(found) < limit:
        request = pb.ListAuditRecordsRequest(
            model_name=model, page_size=min(PAGE_SIZE, limit - len(found)), page_token=token
        )
        page = m.stub.ListAuditRecords(request, timeout=TIMEOUT_S, metadata=m.metadata)
        found.extend(page.records)
        token = page.next_page_token
        if not token:
            break
    return found[:limit]


def audit(
    service: ServiceOption,
    token_file: TokenFileOption = None,
    model: Annotated[str, typer.Option(help="Only records about this model.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="The most records to show.")] = 50,
) -> None:
    """The audit log, newest first: id, time, the authenticated identity, the action, model, version, reason."""
    with connect(service, token_file, "audit") as m:
        found = records(m, model, limit)
    console.print(audit_table(found))
