"""Declared deployments (`fresco apply`): idempotent, guarded by a generation, every change listed.

The same spec applied again never restarts a rollout: after a rollback it reports "rolled back at generation N",
and only RetryRollout starts it again.

Gates on apply: a deployment that declares `gates` for a version that has not passed them (registered) starts
the promotion operation (as PromoteModelVersion does) and a rollout that loads nothing until they pass; one
already validating waits for the running operation. A failed gate fails the rollout with the gate results and
nothing is served. A rejected version is never gated again by apply (no silent retry): apply refuses it with
FAILED_PRECONDITION until PromoteModelVersion with force and a reason (audited) overrides the gates, and the
same spec applied again reports the failure; RetryRollout restarts it once the version was forced through.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from google.protobuf import text_format
from google.protobuf.message import Message

from chassis.errors import FailedPrecondition, InvalidArgument, NotFound
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from model_manager import messages, schema
from model_manager.actions import ACTIVE
from model_manager.controller import Entry
from model_manager.lifecycle import Stage
from model_manager.promotions import PromoteRequest
from model_manager.reconcile import Outcome, apply
from model_manager.rollout_messages import rollout_spec
from model_manager.rollout_store import StoredDeployment, now_us
from model_manager.rollout_verbs import RolloutVerbs

# Fields the server sets; whatever a caller writes in them is ignored.
SERVER_FIELDS = ("generation", "updated_at", "updated_by", "rollout_id")


# Stages of a version that has not passed its promotion gates.
GATED = frozenset({Stage.REGISTERED, Stage.VALIDATING, Stage.REJECTED})
FORCE_HINT = "PromoteModelVersion with force and a reason overrides its gates (audited), then RetryRollout"


class GenerationMismatch(Exception):
    """expected_generation is not the deployment's current generation (gRPC ABORTED)."""


@dataclass(frozen=True)
class ApplyResult:
    """What applying did: the deployment after it, the outcome, one line, the changes and the model's rollout."""

    deployment: pb.Deployment
    outcome: pb.ApplyOutcome.ValueType
    message: str
    changes: tuple[str, ...]
    rollout: Entry | None


def _unknown_fields(message: Message, path: str) -> str | None:
    """The path of the first field the server's contract does not know, if any."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    unknown = UnknownFieldSet(message)
    if len(unknown):
        return f"{path}: unknown field number {unknown[0].field_number}"
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None or descriptor.message_type.GetOptions().map_entry:
            continue
        repeated = isinstance(value, list) or hasattr(value, "add")
        children = list(value) if repeated else [value]
        for i, child in enumerate(children):
            where = f"{path}.{descriptor.name}" + (f"[{i}]" if repeated else "")
            found = _unknown_fields(child, where)
            if found:
                return found
    return None


def desired_spec(deployment: pb.Deployment) -> pb.Deployment:
    """The deployment as declared: checked, server-set fields cleared. INVALID_ARGUMENT names the field."""
    found = _unknown_fields(deployment, "deployment")
    if found:
        raise InvalidArgument(f"{found}; expected only fields of fresco.models.v1.Deployment")
    spec = pb.Deployment()
    spec.CopyFrom(deployment)
    for name in SERVER_FIELDS:
        spec.ClearField(name)  # type: ignore[arg-type]
    schema.model_name("deployment.model_name", spec.model_name)
    if spec.version <= 0:
        raise InvalidArgument(f"deployment.version: expected a positive version number, got {spec.version}")
    if not spec.HasField("strategy") or spec.strategy.WhichOneof("kind") is None:
        raise InvalidArgument("deployment.strategy: expected one of blue_green, canary or shadow")
    if spec.replicas < 0 or spec.max_replicas < 0:
        raise InvalidArgument("deployment.replicas: expected replicas and max_replicas of at least 0")
    if spec.max_replicas and spec.max_replicas < spec.replicas:
        raise InvalidArgument("deployment.max_replicas: expected 0 or at least replicas")
    if spec.fallback_version:
        schema.version_number("deployment.fallback_version", spec.fallback_version, zero_ok=True)
        if spec.fallback_version == spec.version:
            raise InvalidArgument(
                f"deployment.fallback_version: expected 0 or a version other than the deployed version "
                f"{spec.version} (the fallback serves when that version fails)"
            )
    for alias, version in spec.aliases.items():
        schema.alias(f"deployment.aliases[{alias}]", alias)
        if version <= 0:
            raise InvalidArgument(f"deployment.aliases[{alias}]: expected a positive version number")
    # The strategy must make a rollout; the baseline is not known yet, so check it against a stand-in.
    rollout_spec("deployment.strategy", spec.model_name, spec.version, spec.version + 1, spec.strategy, None)
    return spec


def _text(value: object) -> str:
    if isinstance(value, Message):
        return text_format.MessageToString(value, as_one_line=True) or "{}"
    return str(value)


def changes(old: pb.Deployment | None, new: pb.Deployment) -> tuple[str, ...]:
    """One line per field that differs, as `field: old -> new`."""
    if old is None:
        return (f"create deployment of {new.model_name} at version {new.version}",)
    lines = []
    for descriptor in pb.Deployment.DESCRIPTOR.fields:
        name = descriptor.name
        if name in SERVER_FIELDS:
            continue
        a, b = getattr(old, name), getattr(new, name)
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            a, b = dict(a), dict(b)
        if a != b:
            lines.append(f"{name}: {_text(a)} -> {_text(b)}")
    return tuple(lines)


class Deployments:
    """ApplyDeployment, GetDeployment and ListDeployments over the rollout verbs and the store."""

    def __init__(self, verbs: RolloutVerbs) -> None:
        self.verbs = verbs
        self.store = verbs.store
        self.registry = verbs.registry

    def message(self, stored: StoredDeployment) -> pb.Deployment:
        """A stored deployment with its server-set fields."""
        d = pb.Deployment.FromString(stored.spec)
        d.generation, d.updated_by, d.rollout_id = stored.generation, stored.updated_by, stored.rollout_id
        d.updated_at.CopyFrom(messages.timestamp(stored.updated_us))
        return d

    async def apply(self, request: pb.ApplyDeploymentRequest, identity: str) -> ApplyResult:
        """Brings the model to the declared deployment; see the module docstring."""
        if not request.HasField("deployment"):
            raise InvalidArgument("deployment: expected the desired deployment")
        spec = desired_spec(request.deployment)
        model = spec.model_name
        await asyncio.to_thread(self.registry.get_model, model)  # NOT_FOUND names the model
        await asyncio.to_thread(self._check_fallback, spec)
        stored = await asyncio.to_thread(self.store.deployment, model)
        generation = stored.generation if stored else 0
        if request.expected_generation and request.expected_generation != generation:
            raise GenerationMismatch(
                f"expected_generation: {request.expected_generation}, but {model}'s deployment is at generation "
                f"{generation}; read it again and re-apply"
            )
        old = pb.Deployment.FromString(stored.spec) if stored else None
        current = await self._current(model)
        if stored is not None and old == spec:
            return self._unchanged(stored, current)
        lines = changes(old, spec)
        outcome = pb.APPLY_OUTCOME_CREATED if stored is None else pb.APPLY_OUTCOME_UPDATED
        if request.dry_run:
            would = pb.Deployment()
            would.CopyFrom(spec)
            would.generation = generation + 1
            return ApplyResult(would, outcome, f"would apply generation {generation + 1}", lines, current)
        rollout_id, message, entry = await self._roll(spec, generation + 1, identity, request.reason, current)
        rollout_id = rollout_id or (stored.rollout_id if stored else "")  # no new rollout: the last one stands
        for alias, version in sorted(spec.aliases.items()):
            if old is None or old.aliases.get(alias) != version:
                await asyncio.to_thread(self.registry.set_alias, model, alias, version, identity, request.reason)
        row = StoredDeployment(model, spec.SerializeToString(deterministic=True), generation + 1, rollout_id,
                               identity, now_us())  # fmt: skip
        if not await asyncio.to_thread(self.store.put_deployment, row, generation):
            raise GenerationMismatch(f"expected_generation: {model}'s deployment changed concurrently; re-apply")
        self.verbs.controller.wake()  # the route carries the deployment's fallback version
        return ApplyResult(self.message(row), outcome, message, lines, entry)

    def _check_fallback(self, spec: pb.Deployment) -> None:
        """The fallback version exists and was not rejected, as UpdateModel asks of a model's fallback; otherwise
        the controller would try to load it again and again."""
        fallback, model = spec.fallback_version, spec.model_name
        if not fallback:
            return
        try:
            record = self.registry.get_version(model, fallback)
        except NotFound:
            raise FailedPrecondition(
                f"deployment.fallback_version: expected a registered version of {model}, but it has no version "
                f"{fallback}; register it first or declare 0"
            ) from None
        if record.stage is Stage.REJECTED:
            raise FailedPrecondition(
                f"deployment.fallback_version: version {fallback} of {model} was rejected by its gates; expected "
                "a version that was not rejected, or 0"
            )

    async def _current(self, model: str) -> Entry | None:
        c = self.verbs.controller
        rid = c.latest.get(model)
        return c.entries[rid] if rid else None

    def _unchanged(self, stored: StoredDeployment, current: Entry | None) -> ApplyResult:
        deployment = self.message(stored)
        if current is None or current.rollout.rollout_id != stored.rollout_id:
            return ApplyResult(deployment, pb.APPLY_OUTCOME_UNCHANGED, f"unchanged at generation {stored.generation}",
                               (), current)  # fmt: skip
        r = current.rollout
        said = apply(r, r.spec, r.generation, self.verbs.controller.clock, rollout_id="")  # never restarts it
        outcome = pb.APPLY_OUTCOME_HELD if said.outcome is Outcome.HELD else pb.APPLY_OUTCOME_UNCHANGED
        message = said.message
        if r.gates == "failed":
            message += f" once version {r.spec.version} passes: {FORCE_HINT}"
        elif r.gates == "running":
            message = f"{message}; {r.message}"
        return ApplyResult(deployment, outcome, message, (), current)

    async def _roll(
        self, spec: pb.Deployment, generation: int, identity: str, reason: str, current: Entry | None
    ) -> tuple[str, str, Entry | None]:
        """Starts (or supersedes) the rollout the new generation asks for; (rollout id, one line, rollout)."""
        model, version = spec.model_name, spec.version
        production = (await asyncio.to_thread(self.registry.get_model, model)).production_version
        if version == production:
            if current is not None and current.rollout.state in ACTIVE:
                entry = await self.verbs.act(current.rollout.rollout_id, "abort", identity,
                                             f"generation {generation} declares version {version}")  # fmt: skip
                return (
                    entry.rollout.rollout_id,
                    f"version {version} serves; rolling back {entry.rollout.rollout_id}",
                    entry,
                )
            return "", f"version {version} already serves at generation {generation}", current
        record = await asyncio.to_thread(self.registry.get_version, model, version)
        gated = spec.HasField("gates") and record.stage in GATED
        if gated:
            baseline = production or None
        else:
            baseline = await self.verbs.baseline(model, version)  # FAILED_PRECONDITION unless it passed its gates
        auto = spec.auto_rollback if spec.HasField("auto_rollback") else None
        rspec = rollout_spec("deployment.strategy", model, version, baseline, spec.strategy, auto)
        operation = ""
        if gated and (current is None or current.rollout.spec != rspec):  # the same spec holds as it is
            operation = await self._gates(spec, record.stage, identity, reason or f"apply generation {generation}")
        applied, entry = await self.verbs.deploy(
            rspec, identity=identity, reason=reason, supersede=True, generation=generation, gate_operation=operation
        )
        message = f"generation {generation}: {applied.message}"
        if entry.rollout.gates == "running":
            message += f"; {entry.rollout.message}"
        elif entry.rollout.gates == "failed" and applied.outcome is Outcome.HELD:
            message += f" once version {version} passes: {FORCE_HINT}"
        return entry.rollout.rollout_id, message, entry

    async def _gates(self, spec: pb.Deployment, stage: Stage, identity: str, reason: str) -> str:
        """The promotion operation the version's gates run as: started now, or the one already running."""
        model, version = spec.model_name, spec.version
        if stage is Stage.REJECTED:
            raise FailedPrecondition(
                f"deployment.version: version {version} of {model} was rejected by its promotion gates and apply "
                f"does not run them again; {FORCE_HINT}"
            )
        promotions = self.verbs.controller.gates
        if promotions is None:
            raise FailedPrecondition("deployment.gates: this manager runs no promotion gates")
        if stage is Stage.VALIDATING:  # someone's promotion runs: the rollout waits for it rather than racing it
            running = await asyncio.to_thread(promotions.operations.unfinished)
            for operation in running:
                if operation.model_name == model and operation.version == version and not operation.dry_run:
                    return operation.operation_id
            raise FailedPrecondition(
                f"deployment.version: version {version} of {model} is validating with no operation running; "
                "promote it again"
            )
        gates = spec.gates if spec.gates.ByteSize() else None  # set but empty: the manager's configured gates
        request = PromoteRequest(model, version, Stage.CANDIDATE, gates, reason=reason)
        return (await promotions.start(request, identity)).operation_id
