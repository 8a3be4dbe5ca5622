"""Promotions: a version's gates run as a persisted operation, then the version moves on, is rejected, or is
forced through with a reason; every move is audited with the identity that asked for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from chassis.errors import FrescoError, InvalidArgument
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import gate_config, schema
from model_manager.gate_results import failures, summary
from model_manager.gates import GateRunner
from model_manager.lifecycle import Stage, check_transition
from model_manager.messages import stage_of, stage_value
from model_manager.operations import OperationStore, touch
from model_manager.registry import Registry

log = logging.getLogger(__name__)
KIND = "promote"
# The audit identity of changes the manager makes by itself (undoing a run a restart abandoned).
SYSTEM_IDENTITY = "system:model-manager"
RESTARTED = "manager restarted while the gates ran; promote again"
TARGETS = (Stage.CANDIDATE, Stage.PRODUCTION)
# A watcher re-reads the operation at least this often, in case a change was made by another process.
WATCH_POLL_S = 1.0
AUDIT_DETAIL_CHARS = 500


@dataclass(frozen=True)
class PromoteRequest:
    """A promotion asked for: the version, the stage it should reach and the gates on the way."""

    model_name: str
    version: int
    target: Stage = Stage.CANDIDATE
    gates: rpb.PromotionGates | None = None
    dry_run: bool = False
    reason: str = ""
    force: bool = False


class Promotions:
    """Starts promotions, runs their gates in the background and lets callers read and watch them."""

    def __init__(
        self, registry: Registry, operations: OperationStore, runner: GateRunner, defaults: rpb.PromotionGates
    ) -> None:
        self.registry = registry
        self.operations = operations
        self.runner = runner
        self.defaults = defaults
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed: dict[str, asyncio.Event] = {}

    async def start(self, request: PromoteRequest, identity: str) -> rpb.Operation:
        """Check the request, record the operation, move the version to validating and start its gates."""
        if request.target not in TARGETS:
            raise InvalidArgument(
                f"target_stage: expected MODEL_STAGE_CANDIDATE or MODEL_STAGE_PRODUCTION, got {request.target.value}"
            )
        if request.force and not request.reason.strip():
            raise InvalidArgument("reason: force promotes over failed gates and needs a reason for the audit trail")
        schema.text("reason", request.reason, schema.MAX_TEXT)
        gates = gate_config.chosen(request.gates, self.defaults)
        version = await asyncio.to_thread(self.registry.get_version, request.model_name, request.version)
        if not request.dry_run:
            check_transition(f"version {version.version} of {version.model_name}", version.stage, Stage.VALIDATING)
        operation = rpb.Operation(
            operation_id=uuid.uuid4().hex,
            kind=KIND,
            state=rpb.OPERATION_STATE_PENDING,
            model_name=version.model_name,
            version=version.version,
            target_stage=stage_value(request.target),
            previous_stage=stage_value(version.stage),
            stage=stage_value(version.stage),
            requested_by=identity,
            reason=request.reason,
            dry_run=request.dry_run,
        )
        operation.created_at.FromNanoseconds(time.time_ns())
        operation.updated_at.CopyFrom(operation.created_at)
        # Shielded: a caller that hangs up halfway must not leave an operation recorded and never run.
        return await asyncio.shield(self._begin(operation, gates, request, identity))

    async def _begin(
        self, operation: rpb.Operation, gates: rpb.PromotionGates, request: PromoteRequest, identity: str
    ) -> rpb.Operation:
        await asyncio.to_thread(self.operations.insert, operation)
        if not request.dry_run:
            try:
                moved = await asyncio.to_thread(
                    self.registry.set_stage,
                    operation.model_name,
                    operation.version,
                    Stage.VALIDATING,
                    identity,
                    request.reason,
                    {"operation_id": operation.operation_id},
                )
            except FrescoError as err:  # lost a race with another change of the version
                await self._finish(operation, rpb.OPERATION_STATE_FAILED, str(err))
                raise
            operation.stage = stage_value(moved.stage)
            await self._save(operation)  # readers see it validating from now on
        name = f"promote-{operation.model_name}-v{operation.version}"
        task = asyncio.create_task(self._run(operation, gates, request, identity), name=name)
        self._tasks[operation.operation_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(operation.operation_id, None))
        return rpb.Operation.FromString(operation.SerializeToString())

    async def get(self, operation_id: str) -> rpb.Operation:
        """One operation as last stored."""
        return await asyncio.to_thread(self.operations.get, operation_id)

    async def watch(self, operation_id: str) -> AsyncIterator[rpb.Operation]:
        """The operation now, then after every change, ending with the first one that is done."""
        last = b""
        while True:
            changed = self._changed.setdefault(operation_id, asyncio.Event())
            try:
                operation = await self.get(operation_id)
            except FrescoError:
                self._changed.pop(operation_id, None)  # e.g. no such operation: keep no event for it
                raise
            body = operation.SerializeToString(deterministic=True)
            if body != last:
                last = body
                yield operation
            if operation.done:
                # Done for good: a watcher still waiting on this event re-reads within WATCH_POLL_S and stops too.
                self._changed.pop(operation_id, None)
                return
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the cancel of a closing stream.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_POLL_S):
                    await changed.wait()

    async def recover(self) -> int:
        """At start: fail the operations a stopped or crashed manager left running and put their versions back."""
        left = await asyncio.to_thread(self.operations.unfinished)
        for operation in left:
            if not operation.dry_run:
                await self._restore(operation, "gates abandoned: the manager restarted")
            await self._finish(operation, rpb.OPERATION_STATE_FAILED, RESTARTED)
        return len(left)

    async def close(self) -> None:
        """Cancel running gates; their operations are failed at the next start, as after a crash."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _save(self, operation: rpb.Operation) -> None:
        touch(operation)
        await asyncio.to_thread(self.operations.update, operation)
        changed = self._changed.pop(operation.operation_id, None)
        if changed is not None:
            changed.set()

    async def _finish(self, operation: rpb.Operation, state: rpb.OperationState.ValueType, error: str = "") -> None:
        operation.state = state
        operation.done = True
        operation.error = error
        await self._save(operation)

    async def _restore(self, operation: rpb.Operation, why: str) -> None:
        """Move a version left validating back to the stage it had before the run (an error is not a verdict)."""
        try:
            version = await asyncio.to_thread(self.registry.get_version, operation.model_name, operation.version)
            if version.stage is Stage.VALIDATING:
                previous = stage_of("previous_stage", operation.previous_stage)
                details = {"operation_id": operation.operation_id}
                version = await asyncio.to_thread(
                    self.registry.set_stage,
                    operation.model_name,
                    operation.version,
                    previous,
                    SYSTEM_IDENTITY,
                    why,
                    details,
                )
            operation.stage = stage_value(version.stage)
        except FrescoError as err:
            log.warning("could not restore the stage of %s v%d: %s", operation.model_name, operation.version, err)

    async def _run(
        self, operation: rpb.Operation, gates: rpb.PromotionGates, request: PromoteRequest, identity: str
    ) -> None:
        try:
            operation.state = rpb.OPERATION_STATE_RUNNING
            await self._save(operation)
            version = await asyncio.to_thread(self.registry.get_version, operation.model_name, operation.version)

            async def progress(results: list[rpb.GateResult]) -> None:
                del operation.gate_results[:]
                operation.gate_results.extend(results)
                await self._save(operation)

            results = await self.runner.run(version, gates, progress)
            await self._decide(operation, results, request, identity)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a gate that cannot run is not a verdict: say why and put the version back
            log.exception("promotion %s could not run its gates", operation.operation_id)
            await self.runner.release_measured(operation.model_name, operation.version)
            if not operation.dry_run:
                await self._restore(operation, f"gates could not run: {err}")
            await self._finish(operation, rpb.OPERATION_STATE_FAILED, f"gates could not run: {err}")

    async def _decide(
        self, operation: rpb.Operation, results: list[rpb.GateResult], request: PromoteRequest, identity: str
    ) -> None:
        failed = failures(results)
        del operation.gate_results[:]
        operation.gate_results.extend(results)
        operation.passed = not failed
        if operation.dry_run:
            await self.runner.release_measured(operation.model_name, operation.version)
            await self._finish(operation, rpb.OPERATION_STATE_SUCCEEDED)
            return
        details = {"operation_id": operation.operation_id, "gates": "failed" if failed else "passed"}
        if failed:
            details["failed_gates"] = ", ".join(r.name for r in failed)
        # Each check with its verdict and what was measured, so the audit shows why without the version at hand.
        for result in results:
            verdict = "passed" if result.passed else "failed"
            details[f"gate.{result.name}"] = f"{verdict}: {result.detail}"[:AUDIT_DETAIL_CHARS]
        name, number = operation.model_name, operation.version
        if failed and not request.force:
            record = await asyncio.to_thread(
                self.registry.set_stage, name, number, Stage.REJECTED, identity, request.reason, details, results
            )
            operation.stage = stage_value(record.stage)
            await self.runner.release_measured(name, number)
            await self._finish(operation, rpb.OPERATION_STATE_FAILED, f"gates failed: {summary(results)}")
            return
        if failed:
            details["forced"] = "true"
            operation.forced = True
        record = await asyncio.to_thread(
            self.registry.set_stage, name, number, Stage.CANDIDATE, identity, request.reason, details, results
        )
        if request.target is Stage.PRODUCTION:
            record = await asyncio.to_thread(
                self.registry.set_stage, name, number, Stage.PRODUCTION, identity, request.reason, details
            )
        operation.stage = stage_value(record.stage)
        await self._finish(operation, rpb.OPERATION_STATE_SUCCEEDED)
