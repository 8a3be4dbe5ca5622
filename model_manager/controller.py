"""The rollout controller: one asyncio task that carries out what each live rollout's `poll()` asks.

It loads versions on the fleet, publishes route tables through the route hub (and the xDS server), waits
for the gateways' acknowledgements, analyses the reported windows and unloads what is no longer served.
It wakes on timers, acks, fleet changes, new windows and verbs, never by polling. Every change is stored
(with its audit records) before it is shown, so a restarted manager resumes from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from chassis.errors import FrescoError
from fresco.api.models.v1 import model_manager_service_pb2 as mpb
from fresco.api.models.v1 import registry_pb2 as regpb
from model_manager import route_codec, route_hub
from model_manager.actions import FINISHED, Action, Do, State
from model_manager.drift_monitor import VersionBasis
from model_manager.holds import HoldStore
from model_manager.model_serving import static_answer
from model_manager.ports import FleetPort, RouteHubPort
from model_manager.promotions import Promotions
from model_manager.reconcile import run_analysis
from model_manager.registry import Registry
from model_manager.rollout import Clock, Rollout
from model_manager.rollout_messages import stored_gate_result
from model_manager.rollout_registry import promote_in_registry, restore_baseline, score_bins, score_reference
from model_manager.rollout_store import AuditRow, RolloutStore, StoredRollout
from model_manager.route_builder import Desired, ModelServing, build_table, wanted
from model_manager.routes import MetricsConfig, RouteError, RouteTable
from model_manager.windows import Histogram, MetricWindow, WindowLedger
from model_manager.xds import AdsService

log = logging.getLogger(__name__)
SYSTEM_IDENTITY = "system:rollout-controller"
# Windows older than this are forgotten: no step is judged on data this old.
WINDOW_RETENTION_S = 6 * 3600.0
# Even with no timer due the loop looks again this often, in case a callback was missed.
IDLE_RECHECK_S = 30.0
# Where the stored rollout keeps its event marks, beside the rollout's own fields.
EVENT_MARKS = "event_marks"
ERROR_BACKOFF_S = 1.0
LOAD_RETRY_S = 5.0
_STEPS_PER_TICK = 64


@dataclass
class Entry:
    """A rollout the controller holds, with what was last stored of it."""

    rollout: Rollout
    revision: int
    initiated_by: str
    reason: str
    labels: dict[str, str]
    saved: dict[str, Any] = field(default_factory=dict)
    saved_events: int = 0
    # (status revision, event count stored at it), one per save that added events: a watch resumes from them.
    marks: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def of(cls, stored: StoredRollout, clock: Clock) -> Entry:
        data = dict(stored.data)
        marks = [(int(rev), int(count)) for rev, count in data.pop(EVENT_MARKS, [])]
        rollout = Rollout.from_dict(data, clock)
        # `saved` is the rollout's own dict, not the JSON read back (lists for tuples), so it compares equal.
        return cls(
            rollout, stored.revision, stored.initiated_by, stored.reason, dict(stored.labels),
            rollout.to_dict(), len(rollout.events), marks,
        )  # fmt: skip

    def snapshot(self, clock: Clock) -> Entry:
        """The rollout as last stored: what readers see (the controller may be midway through a change)."""
        data = {**self.saved, EVENT_MARKS: list(self.marks)}
        stored = StoredRollout(data, self.revision, self.initiated_by, self.reason, self.labels)
        return Entry.of(stored, clock)

    def events_at(self, revision: int) -> int:
        """How many of the rollout's events were stored at status revision `revision`."""
        count = 0
        for rev, n in self.marks:
            if rev > revision:
                break
            count = n
        return count

    @property
    def live(self) -> bool:
        """Still driven: not finished, or with versions left to unload."""
        r = self.rollout
        return r.state not in FINISHED or bool(r.to_dict()["to_unload"])


class RolloutController:
    """Drives every live rollout; the single owner of their in-memory state (guarded by `lock`)."""

    def __init__(
        self,
        store: RolloutStore,
        registry: Registry,
        fleet: FleetPort | None,
        hub: RouteHubPort | None,
        ads: AdsService | None = None,
        clock: Clock = time.time,
        metrics: MetricsConfig | None = None,
        gates: Promotions | None = None,
        holds: HoldStore | None = None,
    ) -> None:
        self.store, self.registry, self.fleet, self.hub, self.ads = store, registry, fleet, hub, ads
        self.holds = holds  # versions held for experiment arms: kept warm and routed at weight 0
        self.gates = gates  # the promotions a gated rollout waits for
        self._gate_watches: set[str] = set()  # operation ids watched now
        self.clock = clock
        self.metrics = metrics or MetricsConfig()
        self.lock = asyncio.Lock()
        self.ledger = WindowLedger()
        self.entries: dict[str, Entry] = {}  # live rollouts and each model's latest, by id
        self.latest: dict[str, str] = {}  # model -> its latest rollout's id
        self._wake = asyncio.Event()
        self._changed: dict[str, asyncio.Event] = {}
        self._busy: set[tuple[str, str, int]] = set()  # ("load" | "unload", model, version) in flight
        self._failed: dict[tuple[str, str, int], float] = {}
        self._references: dict[
            tuple[str, int, str], Histogram | None
        ] = {}  # a failed load: not asked again before then
        self._tasks: set[asyncio.Task[None]] = set()
        self._route_revision = 0
        self._published: RouteTable | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._pruned_at = 0.0
        self._bins: dict[tuple[str, int, str], tuple[str, tuple[float, ...]]] = {}
        self._drift_bases: dict[tuple[str, int], VersionBasis] = {}
        self.wants: frozenset[tuple[str, int]] = frozenset()  # (model, version) routes and live rollouts keep loaded

    @property
    def runs(self) -> bool:
        """Whether rollouts can progress: a fleet and a route hub are wired in."""
        return self.fleet is not None and self.hub is not None

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read back rollouts, windows and the route revision, then start driving."""
        now = self.clock()
        stored = await asyncio.to_thread(self.store.live, [s.value for s in FINISHED])
        latest = await asyncio.to_thread(self.store.latest_per_model)
        for s in [*latest, *stored]:
            entry = Entry.of(s, self.clock)
            self.entries[entry.rollout.rollout_id] = entry
        for s in latest:
            self.latest[s.data["spec"]["model"]] = s.data["rollout_id"]
        for raw in await asyncio.to_thread(self.store.windows_since, now - WINDOW_RETENTION_S):
            self.ledger.add(MetricWindow.from_dict(raw))
        self._route_revision = await asyncio.to_thread(self.store.route_revision)
        if self.hub is not None:
            await self._seed_routes()
            self._route_revision = max(self._route_revision, self.hub.table.revision)
            if self.ads is not None and self.hub.table.routes:
                self.ads.update(self.hub.table)
            self.hub.on_ack(self.wake_threadsafe())
        if self.fleet is not None:
            self.fleet.on_change(self.wake_threadsafe())
        if self.runs:
            self._loop_task = asyncio.create_task(self._run(), name="rollout-controller")
        log.info("rollout controller: %d rollouts, %d windows, route revision %d", len(self.entries),
                 len(self.ledger), self._route_revision)  # fmt: skip

    async def _seed_routes(self) -> None:
        """Serves the last table published again, so gateways holding its revision resume with no snapshot."""
        assert self.hub is not None
        kept = await asyncio.to_thread(self.store.route_table)
        if kept is None or self.hub.table.revision > 0:
            return
        revision, data = kept
        try:
            table, changed_at = route_codec.read_kept_table(data)
        except RouteError as err:  # gateways then get a snapshot of the next table published
            log.warning("not serving the kept route table (revision %d) again: %s", revision, err)
            return
        self.hub.seed(table, changed_at)
        log.info("serving the kept route table again: revision %d, %d models", table.revision, len(table.routes))

    async def stop(self) -> None:
        """Stop driving; loads and unloads in flight are cancelled (they are asked for again after a restart)."""
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        """Look at the rollouts again now."""
        self._wake.set()

    def wake_threadsafe(self) -> Callable[[], None]:
        """A callback that wakes the controller from any thread."""
        loop = asyncio.get_running_loop()

        def wake() -> None:
            loop.call_soon_threadsafe(self._wake.set)

        return wake

    def changed(self, rollout_id: str) -> asyncio.Event:
        """An event set at the rollout's next stored change."""
        return self._changed.setdefault(rollout_id, asyncio.Event())

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                async with self.lock:
                    deadline = await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rollout controller: a pass failed; trying again")
                deadline = self.clock() + ERROR_BACKOFF_S
            timeout = IDLE_RECHECK_S if deadline is None else min(max(deadline - self.clock(), 0.0), IDLE_RECHECK_S)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that arrives as the event is set,
            # and then stop() would wait for this loop for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    # --- one pass -----------------------------------------------------------------------------------------

    async def _tick(self) -> float | None:
        """Carries out every action that is due; stores what changed; returns when to look again."""
        deadline: float | None = None
        for _ in range(_STEPS_PER_TICK):
            deadline, progressed, publish = None, False, []
            for entry in [e for e in self.entries.values() if e.live]:
                r = entry.rollout
                if r.gates == "running":
                    self._watch_gates(r.rollout_id, r.gate_operation)
                if r.spec.on_unhealthy:
                    assert self.fleet is not None
                    progressed |= r.health(bool(self.fleet.warm_endpoints(r.spec.model, r.spec.version)))
                    deadline = _earliest(deadline, r.unhealthy_deadline)
                action = r.poll()
                if action.do is Do.PUBLISH:
                    publish.append((entry, action))
                elif action.do is Do.AWAIT_ACK:
                    progressed |= self._check_ack(entry, action)
                    deadline = _earliest(deadline, action.until)
                elif action.do is Do.ANALYSE:
                    reference = await self._reference(action)
                    basis = await self._drift_basis(action)
                    analysis = run_analysis(action, self.ledger, self.clock(), reference, basis)
                    progressed |= entry.rollout.observe(action.phase, analysis)
                elif action.do is Do.WAIT:
                    deadline = _earliest(deadline, action.until)
                elif action.do in (Do.LOAD, Do.UNLOAD):
                    assert action.version is not None
                    self._spawn(entry.rollout.spec.model, action.do.value, action.version)
            # Stored first: a success is in the registry's production before the next table is built from it.
            await self._settle()
            progressed |= await self._sync_routes(publish)
            await self._settle()
            if not progressed:
                break
        await self._prune()
        return deadline

    async def _reference(self, action: Action) -> Histogram | None:
        """The training histogram the score PSI check compares with, read once per version."""
        spec = action.analysis
        if spec is None or spec.max_score_psi is None or action.version is None:
            return None
        key = (action.model, action.version, spec.score_output)
        if key not in self._references:
            self._references[key] = await asyncio.to_thread(score_reference, self.registry, *key)
        return self._references[key]

    async def _drift_basis(self, action: Action) -> VersionBasis | None:
        """The training statistics and drift policy the feature drift check compares with, read once per version."""
        spec = action.analysis
        if spec is None or spec.max_feature_psi is None or action.version is None:
            return None
        key = (action.model, action.version)
        if key not in self._drift_bases:
            record = await asyncio.to_thread(self.registry.get_version, *key)
            self._drift_bases[key] = VersionBasis.of(record)
        return self._drift_bases[key]

    def _check_ack(self, entry: Entry, action: Action) -> bool:
        assert self.hub is not None
        assert action.revision is not None
        applied = self.hub.applied_revision(entry.rollout.spec.model)
        return applied >= action.revision and entry.rollout.acknowledged(applied)

    def _desired(self, serving: dict[str, ModelServing]) -> list[Desired]:
        return wanted(serving, [self.entries[rid].rollout for rid in self.latest.values()])

    def uses(self, model: str, version: int) -> bool:
        """Whether a route or a live rollout keeps the version loaded (as of the last pass)."""
        return (model, version) in self.wants

    async def _scored(self, d: Desired) -> Desired:
        """The route with its score output and bins: the baseline's training histogram, else the scored version's."""
        for version in (d.baseline, d.scored):
            if version is None:
                continue
            key = (d.model, version, d.score_output)
            if key not in self._bins:
                self._bins[key] = await asyncio.to_thread(score_bins, self.registry, *key)
            name, bounds = self._bins[key]
            if bounds:
                return replace(d, score_output=name, score_bounds=bounds)
        return d

    async def _sync_routes(self, publish: list[tuple[Entry, Action]]) -> bool:
        """Publishes a new revision when the table the rollouts want differs from the last one published."""
        assert self.hub is not None
        assert self.fleet is not None
        serving = await asyncio.to_thread(self._serving)
        desired = [await self._scored(d) for d in self._desired(serving)]
        self._retain(desired)
        built = build_table(0, desired, self.fleet.warm_endpoints, self.fleet.predictor_model_name, self.metrics)
        fresh = {r.model: r for r in built.routes}
        routes = dict(fresh)
        current = self._published or self.hub.table
        served = {d.model for d in desired}
        for old in current.routes:
            # A model that still should be served keeps its last route while no replica of it is warm (a
            # restarted fleet not yet heard from): gateways go on serving it rather than losing it.
            if old.model not in routes and old.model in served:
                routes[old.model] = old
        table = RouteTable(current.revision, tuple(routes.values()), self.metrics)
        # A restarted manager serves its last table again but publishes no new one until every served model has a
        # fresh route (its fleet heard from), so the gateways keep serving the table they hold.
        holding = self._published is None and bool(served - fresh.keys())
        if not holding and (table.routes != current.routes or table.metrics != current.metrics):
            revision = max(self._route_revision, self.hub.table.revision) + 1
            table = RouteTable(revision, table.routes, self.metrics)
            kept = route_codec.kept_table(table, route_hub.changes(self.hub.table, table, self.hub.changed_at()))
            # Kept before it is published: a revision a gateway holds is never reused, and is served again after a
            # restart.
            await asyncio.to_thread(self.store.set_route_table, revision, kept)
            self.hub.publish(table)
            if self.ads is not None:
                self.ads.update(table)
            self._route_revision, self._published = revision, table
            log.info("published route revision %d: %d models", revision, len(table.routes))
        elif self._published is None and not holding:
            self._published = current
        for d in desired:  # what should serve and is warm nowhere (say, production after a restart) is loaded
            for version in d.kept():
                if not self.fleet.warm_endpoints(d.model, version):
                    self._spawn(d.model, "load", version)
        done = False
        for entry, action in publish:
            # A step is published only once the table carries it: every version of its route warm and routed.
            model, route = entry.rollout.spec.model, entry.rollout.route()
            carried = model in fresh and routes[model] == fresh[model]
            warm = all(self.fleet.warm_endpoints(model, v) for v in route.versions())
            if self._published is not None and self._published.revision and carried and warm:
                done |= entry.rollout.published(action.serial, self._published.revision)
        return done

    def _retain(self, desired: list[Desired]) -> None:
        """Tells the fleet what the routes and live rollouts keep loaded: other copies are leftovers."""
        wants = {(d.model, v) for d in desired for v in d.kept()}
        for entry in self.entries.values():
            r = entry.rollout
            if entry.live:
                wants.update((r.spec.model, v) for v in (r.spec.version, r.spec.baseline) if v is not None)
        self.wants = frozenset(wants)
        assert self.fleet is not None
        self.fleet.retain(self.wants)

    def _serving(self) -> dict[str, ModelServing]:
        """Each model's production version, configured fallback (the deployment's, else the model's), static answer
        and held versions."""
        deployed: dict[str, int] = {}
        token = ""
        while True:
            dpage = self.store.deployments_page(500, token)
            for d in dpage.items:
                deployed[d.model_name] = mpb.Deployment.FromString(d.spec).fallback_version
            token = dpage.next_page_token
            if not token:
                break
        held = self.holds.held() if self.holds is not None else {}
        out: dict[str, ModelServing] = {}
        while True:
            page = self.registry.list_models(500, token)
            for m in page.items:
                answer = static_answer(f"{m.name}.static_fallback", m.static_fallback)
                fallback = deployed.get(m.name) or m.fallback_version
                out[m.name] = ModelServing(m.production_version, fallback, answer, held.get(m.name, frozenset()))
            token = page.next_page_token
            if not token:
                return out

    async def _settle(self) -> None:
        """Stores every changed rollout; a success moves its version to production, an undo moves it back."""
        for entry in list(self.entries.values()):
            data = entry.rollout.to_dict()
            if data == entry.saved:
                continue
            was = entry.saved.get("state")
            r = entry.rollout
            if r.state is State.SUCCEEDED and was != State.SUCCEEDED.value:
                await asyncio.to_thread(promote_in_registry, self.registry, r, SYSTEM_IDENTITY)
            elif r.state is State.ROLLED_BACK and was != State.ROLLED_BACK.value:
                await asyncio.to_thread(restore_baseline, self.registry, r, SYSTEM_IDENTITY)
            await self.save(entry)

    async def save(self, entry: Entry, identity: str = "") -> None:
        """Stores a rollout and an audit record per new event, in one transaction; then tells its watchers."""
        r = entry.rollout
        data = r.to_dict()
        marks = list(entry.marks)
        if len(r.events) > entry.saved_events:  # the store's status revision grows by one per save
            marks.append((entry.revision + 1, len(r.events)))
        rows = [
            AuditRow(
                identity=e.actor or identity or SYSTEM_IDENTITY,
                action=f"rollout.{e.kind}",
                model_name=r.spec.model,
                version=r.spec.version,
                reason=e.reason,
                details={
                    "rollout_id": r.rollout_id,
                    "state": e.state.value,
                    "phase": str(e.phase),
                    "decisions": json.dumps([d.to_dict() for d in e.decisions]),
                },
            )
            for e in r.events[entry.saved_events :]
        ]
        revision = await asyncio.to_thread(
            self.store.save,
            {**data, EVENT_MARKS: marks},
            pending_unload=bool(data["to_unload"]),
            audit_rows=rows,
            initiated_by=entry.initiated_by,
            reason=entry.reason,
            labels=entry.labels,
        )
        if marks and marks[-1][0] == entry.revision + 1:
            marks[-1] = (revision, marks[-1][1])  # another writer stored in between: trust the store's number
        entry.revision, entry.marks = revision, marks
        entry.saved, entry.saved_events = data, len(r.events)
        event = self._changed.pop(r.rollout_id, None)
        if event is not None:
            event.set()

    # --- loads and unloads --------------------------------------------------------------------------------

    def _spawn(self, model: str, kind: str, version: int) -> None:
        key = (kind, model, version)
        if key in self._busy or self._failed.get(key, 0.0) > self.clock():
            return
        self._busy.add(key)
        work = self._load(model, version) if kind == "load" else self._unload(model, version)
        task = asyncio.create_task(work, name=f"rollout-{kind}-{key[1]}-{key[2]}")
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._busy.discard(key)

        task.add_done_callback(done)

    async def _load(self, model: str, version: int) -> None:
        assert self.fleet is not None
        reason = ""
        try:
            replicas, most = await self._placement(model)
            endpoints = await self.fleet.ensure_loaded(model, version, replicas=replicas, max_replicas=most)
            if not endpoints:
                reason = "no predictor has it warm after loading"
        except FrescoError as err:
            reason = str(err) or type(err).__name__
        except Exception as err:  # a fleet bug must not kill the load silently: the rollout hears of it
            log.exception("loading %s version %d raised", model, version)
            reason = f"{type(err).__name__}: {err}"
        if reason:  # asked again only after a pause, so a fleet with no room is not asked in a tight loop
            self._failed[("load", model, version)] = self.clock() + LOAD_RETRY_S
            log.warning("loading %s version %d failed: %s", model, version, reason)
        async with self.lock:
            for entry in self.entries.values():
                if entry.live and entry.rollout.spec.model == model:
                    if reason:
                        entry.rollout.load_failed(version, reason)
                    else:
                        entry.rollout.loaded_version(version)
            await self._settle()
        self.wake()

    async def _unload(self, model: str, version: int) -> None:
        assert self.fleet is not None
        serving = await asyncio.to_thread(self._serving)
        served = any(model == d.model and version in d.kept() for d in self._desired(serving))
        if not served:  # the version may serve again (a new rollout of it, or production): then it stays
            try:
                await self.fleet.release(model, version)
            except FrescoError as err:
                log.warning("unloading %s version %d failed: %s", model, version, err)
        async with self.lock:
            for entry in self.entries.values():
                if entry.rollout.spec.model == model:
                    entry.rollout.unloaded(version)
            await self._settle()
        self.wake()

    async def _placement(self, model: str) -> tuple[int, int]:
        """(replicas, max_replicas) of the model's deployment: (1, 0) without one."""
        stored = await asyncio.to_thread(self.store.deployment, model)
        if stored is None:
            return 1, 0
        deployment = mpb.Deployment.FromString(stored.spec)
        return max(deployment.replicas, 1), deployment.max_replicas

    # --- promotion gates ----------------------------------------------------------------------------------

    def _watch_gates(self, rollout_id: str, operation_id: str) -> None:
        if self.gates is None or operation_id in self._gate_watches:
            return
        self._gate_watches.add(operation_id)
        task = asyncio.create_task(self._await_gates(rollout_id, operation_id), name=f"rollout-gates-{operation_id}")
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._gate_watches.discard(operation_id)

        task.add_done_callback(done)

    async def _await_gates(self, rollout_id: str, operation_id: str) -> None:
        """Follows the promotion operation to its end, then tells the rollout whether its gates passed."""
        assert self.gates is not None
        last: regpb.Operation | None = None
        error = ""
        try:
            async for operation in self.gates.watch(operation_id):
                last = operation
        except FrescoError as err:  # e.g. the operation is gone: the rollout must not wait for ever
            error = str(err) or type(err).__name__
        passed = last is not None and not error and last.state == regpb.OPERATION_STATE_SUCCEEDED
        results = [] if last is None else [stored_gate_result(g) for g in last.gate_results]
        if passed:
            assert last is not None
            forced = " (forced over failed gates)" if last.forced else ""
            message = f"promotion gates passed{forced}, operation {operation_id}"
        else:
            why = error or (last.error if last is not None else "") or "the gates did not pass"
            message = f"promotion gates: {why} (operation {operation_id})"
        async with self.lock:
            entry = self.entries.get(rollout_id)
            if entry is not None and entry.rollout.gate_operation == operation_id:
                entry.rollout.gates_done(passed, message, results)
            await self._settle()
        self.wake()

    async def _prune(self) -> None:
        now = self.clock()
        if now - self._pruned_at < 60.0:
            return
        self._pruned_at = now
        self.ledger.prune(now - WINDOW_RETENTION_S)
        await asyncio.to_thread(self.store.prune_windows, now - WINDOW_RETENTION_S)


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
