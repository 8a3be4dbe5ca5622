"""The fleet's soft state: registered predictors, their leases and the copies they hold. Nothing here is
persisted: after a manager restart predictors hear `known=false` on their next heartbeat and register again."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from model_manager import pages, schema
from model_manager.routes import Endpoint

DEFAULT_PAGE_SIZE = 100


class PredictorState(enum.Enum):
    """Where a predictor is in the fleet: READY takes copies and traffic; UNHEALTHY and LOST take neither."""

    READY = "READY"
    UNHEALTHY = "UNHEALTHY"
    LOST = "LOST"


@dataclass(frozen=True)
class Copy:
    """One model version loaded on a predictor, as the predictor reports it."""

    predictor_model_name: str
    model_name: str = ""
    version: int = 0
    ready: bool = False
    memory_bytes: int = 0
    request_rate: float = 0.0


@dataclass(frozen=True)
class Report:
    """What a predictor says of itself when it registers or heartbeats."""

    predictor_id: str
    address: str
    boot_id: str
    zone: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    healthy: bool = False
    memory_capacity_bytes: int = 0
    memory_used_bytes: int = 0
    copies: tuple[Copy, ...] = ()

    @property
    def endpoint(self) -> Endpoint:
        """Where it serves inference."""
        return Endpoint.parse(self.address, self.zone)


@dataclass
class Predictor:
    """A registered predictor: its last report, its lease, and what the manager itself just loaded or unloaded
    on it (which a heartbeat built before that may not show yet)."""

    report: Report
    state: PredictorState
    registered_at: float
    last_heartbeat_at: float
    renewed: float
    copies: dict[str, Copy] = field(default_factory=dict)
    # predictor model name -> (the copy now there, or None once unloaded; monotonic time of the change)
    expected: dict[str, tuple[Copy | None, float]] = field(default_factory=dict)
    # predictor model name -> memory held for a load in flight
    reserved: dict[str, int] = field(default_factory=dict)

    @property
    def predictor_id(self) -> str:
        return self.report.predictor_id

    @property
    def endpoint(self) -> Endpoint:
        return self.report.endpoint

    def free_bytes(self) -> int:
        """Memory left for another copy: capacity less what is loaded and what loads in flight hold."""
        reported = {c.predictor_model_name for c in self.report.copies}
        unreported = sum(c.memory_bytes for n, c in self.copies.items() if n not in reported)
        held = sum(self.reserved.values())
        return self.report.memory_capacity_bytes - self.report.memory_used_bytes - unreported - held


class Predictors:
    """Registered predictors by id, with leases. `settle_s` is how long the manager's own loads and unloads
    override heartbeats, since a heartbeat received just after a load may have been built before it."""

    def __init__(
        self,
        lease_s: float,
        settle_s: float,
        forget_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.lease_s = lease_s
        self.settle_s = settle_s
        self.forget_s = forget_s
        self.clock = clock
        self.wall = wall
        self._by_id: dict[str, Predictor] = {}

    def __iter__(self) -> Iterator[Predictor]:
        return iter(sorted(self._by_id.values(), key=lambda p: p.predictor_id))

    def get(self, predictor_id: str) -> Predictor | None:
        """A predictor by id, whatever its state."""
        return self._by_id.get(predictor_id)

    def ready(self) -> list[Predictor]:
        """Predictors that take copies and traffic now, by id."""
        return [p for p in self if p.state is PredictorState.READY]

    def register(self, report: Report) -> Predictor:
        """Add or replace a predictor. A new boot id forgets what it held: its copies are what it reports."""
        now, wall = self.clock(), self.wall()
        known = self._by_id.get(report.predictor_id)
        predictor = Predictor(report, _state(report), wall, wall, now)
        if known is not None and known.report.boot_id == report.boot_id:
            predictor.registered_at = known.registered_at
            predictor.expected, predictor.reserved = known.expected, known.reserved
        self._by_id[report.predictor_id] = predictor
        self._merge(predictor, now)
        return predictor

    def heartbeat(self, report: Report) -> bool:
        """Renew a lease and take the report; False when the predictor must register again (unknown, lost, or
        restarted with a new boot id)."""
        predictor = self._by_id.get(report.predictor_id)
        if predictor is None or predictor.state is PredictorState.LOST or predictor.report.boot_id != report.boot_id:
            return False
        now = self.clock()
        predictor.report = report
        predictor.state = _state(report)
        predictor.renewed, predictor.last_heartbeat_at = now, self.wall()
        self._merge(predictor, now)
        return True

    def expire(self) -> list[Predictor]:
        """Mark predictors whose lease ran out LOST (returned) and forget those lost for `forget_s`."""
        now = self.clock()
        lost = []
        for predictor in list(self._by_id.values()):
            silent = now - predictor.renewed
            if predictor.state is PredictorState.LOST:
                if silent > self.forget_s:
                    del self._by_id[predictor.predictor_id]
            elif silent > self.lease_s:
                predictor.state = PredictorState.LOST
                predictor.copies.clear()
                predictor.expected.clear()
                lost.append(predictor)
        return lost

    def expect_loaded(self, predictor: Predictor, copy: Copy) -> None:
        """The manager loaded `copy` on `predictor` and saw it ready."""
        predictor.expected[copy.predictor_model_name] = (copy, self.clock())
        predictor.copies[copy.predictor_model_name] = copy

    def expect_unloaded(self, predictor: Predictor, name: str) -> None:
        """The manager unloaded `name` from `predictor`."""
        predictor.expected[name] = (None, self.clock())
        predictor.copies.pop(name, None)

    def page(self, page_size: int, page_token: str) -> tuple[list[Predictor], str]:
        """Predictors by id after the token's, and the next token."""
        size = schema.page_size("page_size", page_size, DEFAULT_PAGE_SIZE)
        after = pages.last_key("page_token", "predictors", page_token) if page_token else ""
        rest = [p for p in self if p.predictor_id > after]
        chosen = rest[:size]
        token = pages.token("predictors", chosen[-1].predictor_id) if len(rest) > size else ""
        return chosen, token

    def _merge(self, predictor: Predictor, now: float) -> None:
        """The predictor's copies: its report, overridden by the manager's own changes younger than `settle_s`."""
        copies = {c.predictor_model_name: c for c in predictor.report.copies}
        for name, (copy, at) in list(predictor.expected.items()):
            if now - at > self.settle_s:
                del predictor.expected[name]
            elif copy is None:
                copies.pop(name, None)
            elif name not in copies or not copies[name].ready:
                copies[name] = copy
        predictor.copies = copies


def _state(report: Report) -> PredictorState:
    return PredictorState.READY if report.healthy else PredictorState.UNHEALTHY
