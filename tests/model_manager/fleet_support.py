"""What the fleet tests share: local tokens, predictor processes joining a manager, registered ONNX versions,
and polling for a condition."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from grpc import aio

from chassis.auth import Role, new_token, token_line
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import model_manager_service_pb2_grpc as pb_grpc
from fresco.api.models.v1 import registry_pb2 as rpb
from fresco.suite import ServiceProcess
from tests.model_manager.registry_support import signature

T = TypeVar("T")


@dataclass(frozen=True)
class Tokens:
    """A token file the services verify, and the tokens: the manager's and predictors' (deployers), an admin's."""

    file: Path
    manager: Path
    predictor: Path
    admin: str


def issue_tokens(directory: Path) -> Tokens:
    """Fresh static tokens in `directory`."""
    admin, manager, predictor = new_token(), new_token(), new_token()
    lines = [
        token_line("admin", Role.ADMIN, admin),
        token_line("model-manager", Role.DEPLOYER, manager),
        token_line("predictor", Role.DEPLOYER, predictor),
    ]
    tokens = Tokens(directory / "tokens", directory / "manager.token", directory / "predictor.token", admin)
    tokens.file.write_text("\n".join(lines) + "\n")
    tokens.manager.write_text(manager)
    tokens.predictor.write_text(predictor)
    return tokens


def start_predictor(
    repository: Path,
    manager_address: str,
    predictor_id: str,
    *,
    zone: str = "",
    capacity: int = 1 << 30,
    tokens: Tokens | None = None,
    log_dir: Path | None = None,
) -> ServiceProcess:
    """A predictor process in explicit mode that joins the manager's fleet, healthy."""
    args = [
        "--model-repository", str(repository), "--port", "0", "--metrics-port", "-1",
        "--model-control-mode", "explicit", "--model-manager-address", manager_address,
        "--predictor-id", predictor_id, "--zone", zone, "--memory-capacity-bytes", str(capacity),
        "--log-format", "text",
    ]  # fmt: skip
    if tokens is not None:
        args += ["--auth-tokens-file", str(tokens.file), "--model-manager-token-file", str(tokens.predictor)]
    log_path = log_dir / f"{predictor_id}.log" if log_dir else None
    process = ServiceProcess("predictor", args, log_path=log_path).start()
    process.wait_healthy(60)
    return process


async def register_version(
    stub: pb_grpc.ModelManagerServiceAsyncStub,
    model: str,
    content: bytes,
    metadata: Sequence[tuple[str, str]] = (),
    expected_memory_bytes: int = 0,
) -> int:
    """Register `content` (an ONNX model) as the next version of `model`, creating the model if new."""
    try:
        await stub.GetModel(pb.GetModelRequest(name=model), metadata=metadata)
    except aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        await stub.CreateModel(
            pb.CreateModelRequest(model=rpb.Model(name=model, owner="fleet-tests", signature=signature())),
            metadata=metadata,
        )
    meta = pb.UploadModelVersionMetadata(
        model_name=model,
        format=rpb.MODEL_FORMAT_ONNX,
        expected_sha256=hashlib.sha256(content).hexdigest(),
        expected_size_bytes=len(content),
        backend_hints=rpb.BackendHints(expected_memory_bytes=expected_memory_bytes),
    )

    async def chunks():  # type: ignore[no-untyped-def]
        yield pb.UploadModelVersionRequest(metadata=meta)
        yield pb.UploadModelVersionRequest(chunk=content)

    reply = await stub.UploadModelVersion(chunks(), metadata=metadata)
    return int(reply.model_version.version)


async def eventually(check: Callable[[], Awaitable[T]], timeout_s: float = 30.0, what: str = "") -> T:
    """Poll `check` until it returns something truthy (returned), failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s}s: {what or check}; last {value!r}")
        await asyncio.sleep(0.1)
