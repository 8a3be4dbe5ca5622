"""What the controller feeds back to a rollout: loads, gates, health, publications, acknowledgements, analyses."""

from __future__ import annotations

from typing import Any

from model_manager.actions import ACTIVE, FINISHED, Pause, State
from model_manager.analysis import Analysis, Verdict
from model_manager.rollout_core import RolloutCore, fmt_minutes


class RolloutEvents(RolloutCore):
    """Events from the controller; stale or repeated ones are ignored."""

    def loaded_version(self, version: int) -> None:
        """A version is loaded and warm on the predictors."""
        d = self._d
        if version not in d.loaded:
            d.loaded.append(version)
        if version != self.spec.version:
            return
        if d.warm_at is None:
            d.warm_at = self._clock()
        if d.state in (State.ROLLED_BACK, State.FAILED, State.ABORTED) and version not in d.to_unload:
            d.to_unload.append(version)  # a load that finished after the rollout ended
        elif d.state is State.PENDING:
            self._set(State.PROGRESSING)
            self._event("loaded", f"version {version} loaded and warm")
        elif d.state is State.PAUSED and d.paused_from is State.PENDING:
            d.paused_from = State.PROGRESSING
            self._event("loaded", f"version {version} loaded and warm")

    def await_gates(self, operation: str) -> None:
        """The version's promotion gates run as `operation`: nothing is loaded or served before they pass."""
        self._require(ACTIVE, "await_gates")
        self._start_gates(operation)

    def gates_done(self, passed: bool, message: str, results: list[dict[str, Any]]) -> bool:
        """The promotion gates finished: passed (or forced), the rollout goes on to load; failed, it fails with
        the results and nothing is served. Stale or repeated calls are ignored."""
        d = self._d
        if d.gates != "running":
            return False
        d.gate_results = [dict(r) for r in results]
        if passed:
            d.gates = "passed"
            self._event("gates_passed", message)
            if d.state in ACTIVE:
                d.message = message
            return True
        d.gates = "failed"
        if d.state in ACTIVE:
            self._finish(State.FAILED, "gates_failed", f"failed at generation {d.generation}: {message}")
        else:
            self._event("gates_failed", message)
        return True

    def health(self, healthy: bool) -> bool:
        """Whether the new version has a healthy endpoint now; with `on_unhealthy`, none for longer than the
        grace period rolls back (or pauses, with no baseline or automatic rollback off). True if anything changed."""
        d, spec = self._d, self.spec
        watched = (
            spec.on_unhealthy
            and d.state in (State.PROGRESSING, State.PAUSED)
            and d.ever_applied
            and spec.version in self.route().versions()
        )
        if healthy or not watched:
            changed = d.unhealthy_since is not None
            d.unhealthy_since = None
            return changed
        now = self._clock()
        if d.unhealthy_since is None:
            d.unhealthy_since = now
            return True
        if now < d.unhealthy_since + spec.unhealthy_grace:
            return False
        reason = (
            f"version {spec.version} has had no healthy endpoint for {fmt_minutes(now - d.unhealthy_since)} "
            f"(grace {fmt_minutes(spec.unhealthy_grace)})"
        )
        d.unhealthy_since = None
        if d.state is State.PAUSED:
            return False  # already held for a person; the route stays as it is
        self._event("unhealthy", reason)
        if spec.baseline is None or not spec.auto_rollback:
            why = "no baseline to roll back to" if spec.baseline is None else "automatic rollback is off"
            self._pause(Pause.FAILED_HELD, f"{why}: {reason}")
        else:
            self._rollback(reason, "")
        return True

    def load_failed(self, version: int, reason: str) -> None:
        """A version could not be loaded: before any traffic the rollout fails, after it rolls back."""
        d = self._d
        if d.state is State.ROLLING_BACK and version == self.spec.baseline:
            self._event("load_failed", f"baseline version {version}: {reason}")
            return  # the next poll asks for the load again; a rollback never gives up
        if d.state not in ACTIVE or version != self.spec.version:
            return
        if d.ever_applied and self.spec.baseline is not None:
            self._rollback(f"version {version} failed to load: {reason}", "")
        elif d.ever_applied:
            self._pause(Pause.LOAD_FAILED, f"version {version} failed to load: {reason}")
        else:
            self._finish(State.FAILED, "load_failed", f"version {version} failed to load: {reason}")

    def published(self, serial: int, revision: int) -> bool:
        """The route of PUBLISH action `serial` went out as route revision `revision`; stale serials are ignored."""
        d = self._d
        if serial != d.serial or d.revision is not None or d.state in FINISHED:
            return False
        d.revision, d.published_at = revision, self._clock()
        d.applied_revision = None
        self._event("published", f"route revision {revision}: {self._route_text()}")
        return True

    def acknowledged(self, revision: int) -> bool:
        """The gateways acknowledged route revision `revision` (a later one carries the same route)."""
        d = self._d
        if d.revision is None or revision < d.revision or d.applied_revision is not None:
            return False
        now = self._clock()
        d.applied_revision, d.applied_at = d.revision, now
        if d.state is State.ROLLING_BACK:
            d.to_unload = [v for v in d.loaded if v == self.spec.version]
            self._finish(State.ROLLED_BACK, "rolled_back", f"rolled back at generation {d.generation}: {d.message}")
            return True
        d.ever_applied = True
        d.next_analysis_at, d.hold_from, d.failures = now, None, 0
        if self.phases[d.phase].analysed:  # an unanalysed last phase (stop mirroring) keeps the verdict that led to it
            d.last_analysis = None
        self._event("applied", f"{self.phases[d.phase].name} acknowledged at route revision {d.revision}")
        return True

    def observe(self, phase: int, analysis: Analysis) -> bool:
        """Takes the analysis of `phase`; one for another phase, or arriving late, is ignored."""
        d = self._d
        if d.state is not State.PROGRESSING or phase != d.phase or d.applied_at is None:
            return False
        d.last_analysis = analysis
        dwell_end = d.applied_at + self.phases[d.phase].dwell
        now = self._clock()
        nxt = now + self.spec.analysis_interval
        # The analysis that may complete a step is taken right when its dwell ends.
        d.next_analysis_at = min(nxt, dwell_end) if now < dwell_end else nxt
        verdict = analysis.verdict
        if verdict is Verdict.FAILED:
            d.failures += 1
            self._event("analysis_failed", analysis.reason, decisions=analysis.decisions)
            if d.failures >= self.spec.failure_limit:
                if self.spec.baseline is None:
                    self._pause(
                        Pause.FAILED_HELD,
                        f"no baseline to roll back to: {analysis.reason}",
                        decisions=analysis.decisions,
                    )
                elif not self.spec.auto_rollback:
                    self._pause(
                        Pause.FAILED_HELD,
                        f"automatic rollback is off: {analysis.reason}",
                        decisions=analysis.decisions,
                    )
                else:
                    self._rollback(analysis.reason, "", analysis.decisions)
            return True
        if verdict is Verdict.ERROR:
            self._pause(Pause.ANALYSIS_ERROR, analysis.reason, decisions=analysis.decisions)
            return True
        if verdict is Verdict.PASSED:
            d.failures = 0
        d.message = f"{self.phases[d.phase].name}: {analysis.reason}"
        d.updated_at = now
        return True

    def unloaded(self, version: int) -> None:
        """A version was unloaded from the predictors."""
        d = self._d
        if version in d.loaded:
            d.loaded.remove(version)
        if version in d.to_unload:
            d.to_unload.remove(version)
        if version == self.spec.version:
            d.warm_at = None
        if d.state not in FINISHED and version in self.route().versions():
            d.serial += 1  # the route needs it again: reload, then publish afresh
            d.revision = d.applied_revision = None
