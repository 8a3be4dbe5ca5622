"""Reading a model family's safety evidence: versions from the registry, production entries from the audit log,
mirrored traffic from the stored rollouts, live monitors from the drift monitor store and the loaded alert rules.
Blocking (SQLAlchemy): the servicer calls it from a worker thread."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any, Protocol

import sqlalchemy as sa

from fresco.api.models.v1 import monitoring_pb2 as mpb
from model_manager import safety
from model_manager.alert_rules import AlertRule
from model_manager.plans import RolloutSpec, plan
from model_manager.records import VersionRecord
from model_manager.registry import Registry, database_errors
from model_manager.rollout_store import RolloutStore
from model_manager.tables import audit


class LiveMonitors(Protocol):
    """The drift monitor store, as the safety score reads it."""

    def live_names(self, model: str, since_s: float) -> dict[int, set[str]]:
        """The feature and score names with sketches per version since `since_s` (seconds since the epoch)."""
        ...


class SafetySources:
    """Everything the safety score of a family is computed from, read at the time of asking."""

    def __init__(
        self,
        registry: Registry,
        rollouts: RolloutStore,
        monitors: LiveMonitors | None = None,
        rules: Sequence[AlertRule] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.rollouts = rollouts
        self.monitors = monitors
        self.rules = list(rules)
        self._clock = clock

    def evidence(self, model_name: str) -> safety.FamilyEvidence:
        """The family's evidence; NOT_FOUND for an unknown model."""
        versions = self._versions(model_name)  # first: an unknown model is NOT_FOUND naming model_name
        live: Mapping[int, Set[str]] = {}
        if self.monitors is not None:
            live = self.monitors.live_names(model_name, self._clock() - safety.LIVE_WINDOW_S)
        return safety.FamilyEvidence(
            model_name=model_name,
            versions=versions,
            production_since_us=self._production_since(model_name),
            mirrored_since_s=self._mirrored_since(model_name),
            live_names=live,
            drift_rules=safety.drift_rules(self.rules),
        )

    def score(self, model_name: str) -> mpb.SafetyScore:
        """The family's safety score with its parts, stamped now."""
        value, parts = safety.score(self.evidence(model_name))
        answer = mpb.SafetyScore(model_name=model_name, score=value, parts=[p.to_proto() for p in parts])
        answer.computed_at.FromNanoseconds(int(self._clock() * 1e9))
        return answer

    def _versions(self, model_name: str) -> list[VersionRecord]:
        found: list[VersionRecord] = []
        token = ""
        while True:
            page = self.registry.list_versions(model_name, page_size=1000, page_token=token)
            found.extend(page.items)
            token = page.next_page_token
            if not token:
                return found

    @database_errors
    def _production_since(self, model_name: str) -> dict[int, int]:
        # Every move into production goes through Registry.set_stage, which audits it with details "to": "production".
        query = (
            sa.select(audit.c.version, audit.c.at_us, audit.c.details)
            .where(audit.c.model_name == model_name, audit.c.action == "version.stage")
            .order_by(audit.c.id)
        )
        since: dict[int, int] = {}
        with self.registry.engine.connect() as conn:
            for row in conn.execute(query):
                if row.details.get("to") == "production":
                    since.setdefault(int(row.version), int(row.at_us))
        return since

    def _mirrored_since(self, model_name: str) -> dict[int, float]:
        since: dict[int, float] = {}
        token = ""
        while True:
            page = self.rollouts.page(model_name=model_name, page_size=500, page_token=token)
            for stored in page.items:
                for version, at in mirrored(stored.data):
                    since[version] = min(at, since.get(version, at))
            token = page.next_page_token
            if not token:
                return since


def mirrored(data: Mapping[str, Any]) -> list[tuple[int, float]]:
    """(version, time) of each acknowledged route of a stored rollout (`Rollout.to_dict`) that mirrored traffic to
    its version: the "applied" events of phases with a mirror share."""
    spec = RolloutSpec.from_dict(data["spec"])
    phases = plan(spec)
    return [
        (spec.version, float(event["at"]))
        for event in data.get("events", ())
        if event.get("kind") == "applied" and 0 <= event.get("phase", -1) < len(phases)
        and phases[event["phase"]].mirror > 0
    ]  # fmt: skip
