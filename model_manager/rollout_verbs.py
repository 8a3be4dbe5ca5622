"""What people and gateways do to rollouts: start one, pause, resume, abort, promote, retry, undo, read, report windows.

Every change happens under the controller's lock, is stored with its audit records, then wakes the controller,
which publishes what follows at once (a rollback goes out without waiting for any timer).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chassis.errors import FailedPrecondition, InvalidArgument
from fresco.api.models.v1 import routing_pb2 as rtpb
from fresco.api.models.v1.model_manager_service_pb2 import Deployment
from model_manager.actions import ACTIVE, State
from model_manager.controller import Entry, RolloutController
from model_manager.lifecycle import Stage
from model_manager.monitor_store import MonitorStore
from model_manager.plans import RolloutSpec
from model_manager.promotions import PromoteRequest
from model_manager.reconcile import Applied, Outcome, apply
from model_manager.rollout import RolloutError
from model_manager.window_codec import decode_window
from model_manager.windows import Admission, WindowError

if TYPE_CHECKING:
    from model_manager.quality_store import QualityStore

# Stages a version may be rolled out from: it passed its gates (candidate), or it served before.
DEPLOYABLE = frozenset({Stage.CANDIDATE, Stage.PRODUCTION, Stage.ARCHIVED})


@dataclass(frozen=True)
class Reported:
    """What a metrics report did."""

    accepted: int
    duplicates: int
    rejected: tuple[str, ...]


def new_rollout_id() -> str:
    """A fresh rollout id."""
    return f"ro-{uuid.uuid4().hex[:16]}"


class RolloutVerbs:
    """The rollout operations the RPCs call, over the controller that owns the rollouts."""

    def __init__(self, controller: RolloutController) -> None:
        self.controller = controller
        self.registry = controller.registry
        self.store = controller.store
        self.monitor: MonitorStore | None = None  # where accepted windows' value sketches are merged
        # Where the prediction records of reported windows are kept for late labels; None: not kept.
        self.quality: QualityStore | None = None

    # --- reading ------------------------------------------------------------------------------------------

    async def find(self, rollout_id: str = "", model: str = "") -> Entry:
        """A rollout by id, or a model's latest; NOT_FOUND if there is none."""
        c = self.controller
        if rollout_id:
            if rollout_id in c.entries:
                return c.entries[rollout_id].snapshot(c.clock)
            return Entry.of(await asyncio.to_thread(self.store.get, rollout_id), c.clock)
        if model:
            if model in c.latest:
                return c.entries[c.latest[model]].snapshot(c.clock)
            return Entry.of(await asyncio.to_thread(self.store.latest, model), c.clock)
        raise InvalidArgument("selector: expected a rollout_id or a model_name")

    # --- starting -----------------------------------------------------------------------------------------

    async def baseline(self, model: str, version: int) -> int | None:
        """The model's production version, the one a rollout of `version` starts from; checks the version."""
        record = await asyncio.to_thread(self.registry.get_version, model, version)
        if record.stage not in DEPLOYABLE:
            raise FailedPrecondition(
                f"version: version {version} of {model} is {record.stage.value}; a rollout needs a version that "
                "passed its gates (candidate) or served before"
            )
        production = (await asyncio.to_thread(self.registry.get_model, model)).production_version
        if production == version:
            raise FailedPrecondition(f"version: version {version} of {model} is already in production")
        return production or None

    async def deploy(
        self,
        spec: RolloutSpec,
        *,
        identity: str,
        reason: str,
        labels: Mapping[str, str] | None = None,
        supersede: bool = False,
        generation: int | None = None,
        gate_operation: str = "",
    ) -> tuple[Applied, Entry]:
        """Starts a rollout of `spec` (the same spec again does not restart one that was rolled back); a new one
        first waits for the promotion gates running as `gate_operation`, if given."""
        c = self._running()
        async with c.lock:
            current = c.entries.get(c.latest.get(spec.model, ""))
            busy = current is not None and current.rollout.state in ACTIVE | {State.ROLLING_BACK}
            if busy and not supersede and current is not None and current.rollout.spec != spec:
                raise FailedPrecondition(
                    f"model_name: rollout {current.rollout.rollout_id} of {spec.model} is "
                    f"{current.rollout.state.value}; set supersede_active to replace it"
                )
            gen = generation if generation is not None else (current.rollout.generation if current else 0)
            try:
                applied = apply(current.rollout if current else None, spec, gen, c.clock, rollout_id=new_rollout_id())
            except RolloutError as err:
                raise FailedPrecondition(str(err)) from None
            except ValueError as err:
                raise InvalidArgument(str(err)) from None
            if applied.outcome in (Outcome.UNCHANGED, Outcome.HELD):
                assert current is not None
                return applied, current
            if gate_operation:
                applied.rollout.await_gates(gate_operation)
            entry = Entry(applied.rollout, 0, identity, reason, dict(labels or {}))
            if current is not None and applied.superseded is not None:
                await c.save(current, identity)
            await c.save(entry, identity)  # stored before readers can find it
            c.entries[applied.rollout.rollout_id] = entry
            c.latest[spec.model] = applied.rollout.rollout_id
        c.wake()
        return applied, entry

    # --- verbs --------------------------------------------------------------------------------------------

    async def act(self, rollout_id: str, verb: str, identity: str, reason: str, *, full: bool = False) -> Entry:
        """Applies a verb (pause, resume, abort, promote, retry, undo) and stores the result."""
        if not rollout_id:
            raise InvalidArgument("rollout_id: expected a rollout id")
        c = self._running()
        async with c.lock:
            entry = c.entries.get(rollout_id)
            if entry is None:
                entry = Entry.of(await asyncio.to_thread(self.store.get, rollout_id), c.clock)
            r = entry.rollout
            latest = c.latest.get(r.spec.model)
            if verb in ("retry", "undo") and latest != rollout_id:
                raise FailedPrecondition(
                    f"rollout_id: {rollout_id} is not the latest rollout of {r.spec.model} ({latest} is); "
                    f"{verb} applies to the latest only"
                )
            operation = ""
            if verb == "retry" and r.gates == "failed" and r.state in (State.ROLLED_BACK, State.FAILED):
                operation = await self._gates_again(r.spec.model, r.spec.version, r.gate_operation, identity)
            try:
                if verb == "retry":
                    r.retry(identity, reason, gate_operation=operation)
                elif verb == "promote":
                    r.promote(identity, reason, full=full)
                elif verb == "resume" and full:
                    r.promote(identity, reason, full=True)
                else:
                    getattr(r, verb)(identity, reason)
            except RolloutError as err:
                raise FailedPrecondition(str(err)) from None
            c.entries[rollout_id] = entry
            await c.save(entry, identity)
        c.wake()
        return entry

    async def _gates_again(self, model: str, version: int, last: str, identity: str) -> str:
        """Before retrying a rollout whose gates failed: "" when the version passed since (forced), or the new
        operation running them again when the last run ended without a verdict (say, a restart)."""
        record = await asyncio.to_thread(self.registry.get_version, model, version)
        if record.stage in DEPLOYABLE:
            return ""
        if record.stage is Stage.REJECTED:
            raise FailedPrecondition(
                f"rollout_id: version {version} of {model} was rejected by its promotion gates (operation {last}); "
                "PromoteModelVersion with force and a reason overrides them (audited), then retry"
            )
        promotions = self.controller.gates
        if record.stage is not Stage.REGISTERED or promotions is None:
            raise FailedPrecondition(f"rollout_id: version {version} of {model} is {record.stage.value}; retry once "
                                     "its promotion is done")  # fmt: skip
        stored = await asyncio.to_thread(self.store.deployment, model)
        gates = Deployment.FromString(stored.spec).gates if stored is not None else None
        request = PromoteRequest(model, version, Stage.CANDIDATE, gates, reason=f"retry after operation {last}")
        return (await promotions.start(request, identity)).operation_id

    # --- metric windows -----------------------------------------------------------------------------------

    async def report(self, gateway_id: str, windows: Sequence[rtpb.MetricsWindow]) -> Reported:
        """Takes a gateway's windows: each counted once by id, stored so a restart rebuilds the ledger."""
        c = self.controller
        accepted = duplicates = 0
        rejected: list[str] = []
        keep = []
        fed = []
        reported: list[rtpb.MetricsWindow] = []
        async with c.lock:
            for i, message in enumerate(windows):
                name = message.window_id or f"windows[{i}]"
                try:
                    window = decode_window(message, gateway_id, c.ledger.latency_bounds)
                    admission = c.ledger.add(window)
                except WindowError as err:
                    rejected.append(f"{name}: {err}")
                    continue
                if admission is Admission.STALE:
                    rejected.append(f"{name}: ended before the windows kept for analysis")
                    continue
                if admission is Admission.ACCEPTED:
                    accepted += 1
                else:
                    duplicates += 1
                keep.append(window.to_dict())  # duplicates too: a retry after a failed store stores them now
                fed.append(window)
                reported.append(message)
            await asyncio.to_thread(self.store.add_windows, keep)
        if self.monitor is not None and fed:  # counted once by id there too, so a retried report feeds it now
            await asyncio.to_thread(self.monitor.add, fed)
        if accepted:
            c.wake()
        if self.quality is not None:  # duplicates too, for the same reason: a prediction kept already is left as is
            await self.quality.add_windows(reported)
        return Reported(accepted, duplicates, tuple(rejected))

    def _running(self) -> RolloutController:
        if not self.controller.runs:
            raise FailedPrecondition(
                "rollouts: this manager has no predictor fleet or route hub wired in, so nothing can be rolled out"
            )
        return self.controller
