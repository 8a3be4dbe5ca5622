"""A test clock and a controller that does what a rollout asks, for the rollout tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from model_manager.actions import Action, Do
from model_manager.analysis import Analysis, Check, Decision, Verdict
from model_manager.plans import RolloutSpec
from model_manager.rollout import Rollout

MIN_SAMPLES = 100


@dataclass
class FakeClock:
    """Time that moves only when a test moves it."""

    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def verdict_analysis(verdict: Verdict, at: float, samples: int | None = None) -> Analysis:
    """An analysis with this verdict and a consistent sample guard: enough samples unless INCONCLUSIVE."""
    n = samples if samples is not None else (37 if verdict is Verdict.INCONCLUSIVE else 500)
    guard_verdict = Verdict.PASSED if n >= MIN_SAMPLES else Verdict.INCONCLUSIVE
    guard = Decision(
        Check.SAMPLES,
        guard_verdict,
        float(n),
        float(MIN_SAMPLES),
        n,
        MIN_SAMPLES,
        at - 30,
        at,
        detail=f"{n}/100 samples",
    )
    rest: tuple[Decision, ...] = ()
    if verdict in (Verdict.FAILED, Verdict.ERROR):
        rest = (
            Decision(Check.ERROR_RATE, verdict, 0.2, 0.01, n, MIN_SAMPLES, at - 30, at, detail="error rate 0.2000"),
        )
    return Analysis(verdict, (guard, *rest), at)


@dataclass
class Controller:
    """Carries out a rollout's actions the way the service will: loads, publishes, acks, analyses."""

    rollout: Rollout
    clock: FakeClock
    revision: int = 0
    verdict: Verdict = Verdict.PASSED
    published: list[tuple[int, dict[int, float], dict[int, float]]] = field(default_factory=list)
    done: list[Action] = field(default_factory=list)

    def step(self, *, ack: bool = True) -> Action:
        """Does the next action once; returns it."""
        r = self.rollout
        a = r.poll()
        self.done.append(a)
        if a.do is Do.LOAD:
            assert a.version is not None
            r.loaded_version(a.version)
        elif a.do is Do.PUBLISH:
            assert a.route is not None
            self.revision += 1
            self.published.append((self.revision, dict(a.route.weights), dict(a.route.mirror)))
            r.published(a.serial, self.revision)
        elif a.do is Do.AWAIT_ACK and ack:
            assert a.revision is not None
            r.acknowledged(a.revision)
        elif a.do is Do.ANALYSE:
            r.observe(a.phase, verdict_analysis(self.verdict, self.clock.now))
        elif a.do is Do.UNLOAD:
            assert a.version is not None
            r.unloaded(a.version)
        elif a.do is Do.WAIT:
            assert a.until is not None
            self.clock.now = max(self.clock.now, a.until)
        return a

    def run(self, limit: int = 200, *, until: Do | None = None) -> Action:
        """Steps until the rollout needs a person or has nothing left, or until an action of kind `until`."""
        for _ in range(limit):
            a = self.step()
            if a.do in (Do.PAUSED, Do.NOTHING) or a.do is until:
                return a
        raise AssertionError("rollout did not settle")


def started(spec: RolloutSpec, clock: FakeClock, generation: int = 3) -> Controller:
    return Controller(Rollout.start("r-1", spec, generation, clock), clock)
