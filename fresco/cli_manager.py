"""How the CLI reaches the model manager: the --service and --token-file options, a channel with TLS and the
bearer token as the environment says, and a gRPC error turned into one red line and exit code 1."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.markup import escape

from chassis.server import channel_options
from chassis.settings import DEFAULT_MAX_MESSAGE_BYTES
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.credentials import ClientSecurity

TIMEOUT_S = 60.0
ServiceOption = Annotated[
    str, typer.Option(envvar="FRESCO_MODEL_MANAGER", help="host:port of the model manager.", show_default=False)
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        help="File holding a bearer token (deployer or admin for changes; `fresco up` prints one). Default: "
        "FRESCO_TOKEN_FILE, or the token itself in FRESCO_TOKEN. FRESCO_TLS_CA_FILE, FRESCO_TLS_CERT_FILE and "
        "FRESCO_TLS_KEY_FILE turn on TLS and mTLS.",
        show_default=False,
    ),
]
errors = Console(stderr=True)
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Manager:
    """A blocking stub of the model manager and the per-call metadata carrying the token."""

    stub: pb_grpc.ModelManagerServiceStub
    metadata: Metadata


def security(token_file: Path | None) -> ClientSecurity:
    """The client's TLS files and token from --token-file and the environment; a bad file is a usage error."""
    try:
        return ClientSecurity.from_env(token_file)
    except (OSError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="--token-file") from None


@contextmanager
def open_channel(address: str, token_file: Path | None, what: str) -> Iterator[tuple[grpc.Channel, Metadata]]:
    """A channel to any Fresco service and the per-call metadata for the body of the block; a gRPC error in it
    is printed as `<what> failed: CODE: details` and exits 1."""
    client = security(token_file)
    channel = client.channel(address, channel_options(DEFAULT_MAX_MESSAGE_BYTES))
    try:
        yield channel, client.metadata()
    except grpc.RpcError as err:
        fail(what, err)
    finally:
        channel.close()


@contextmanager
def connect(address: str, token_file: Path | None, what: str) -> Iterator[Manager]:
    """A manager for the body of the block; a gRPC error in it is printed as `<what> failed: CODE: details`
    and exits 1."""
    with open_channel(address, token_file, what) as (channel, metadata):
        yield Manager(pb_grpc.ModelManagerServiceStub(channel), metadata)


def fail(what: str, err: grpc.RpcError) -> None:
    """Print a gRPC error as one red line and exit 1."""
    code = err.code().name if isinstance(err, grpc.Call) else "UNKNOWN"
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    errors.print(f"[red]{what} failed:[/red] {code}: {escape(str(details))}")
    raise typer.Exit(1) from None
