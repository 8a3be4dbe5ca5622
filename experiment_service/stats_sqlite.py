"""The default statistics store: one SQLite file in WAL mode in the state directory, one transaction per batch
(BEGIN IMMEDIATE, so two stores on the same file apply batches one after the other), fsynced before it returns.
Blocking sqlite3 calls run on a thread of their own, off the event loop."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from chassis.errors import Unavailable
from chassis.sqlite_threads import SqliteThreads, immediate_transaction
from experiment_service.stats_store import (
    Delta,
    ExposureRow,
    MetricPlan,
    OutcomeRow,
    Snapshot,
    StatsPlan,
    Verdict,
    in_window,
    next_num,
    stats_from_fields,
    to_datetime,
    to_us,
)
from experiment_service.sufficient import SufficientStats

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcome_ids (
    experiment TEXT NOT NULL, outcome_id TEXT NOT NULL, PRIMARY KEY (experiment, outcome_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS units (
    experiment TEXT NOT NULL, phase INTEGER NOT NULL, unit TEXT NOT NULL,
    arm TEXT NOT NULL, allocation INTEGER NOT NULL, exposed_us INTEGER NOT NULL,
    PRIMARY KEY (experiment, phase, unit)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unit_metrics (
    experiment TEXT NOT NULL, phase INTEGER NOT NULL, unit TEXT NOT NULL, metric TEXT NOT NULL,
    num REAL NOT NULL, y REAL NOT NULL, has_y INTEGER NOT NULL,
    PRIMARY KEY (experiment, phase, unit, metric)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS covariates (
    experiment TEXT NOT NULL, unit TEXT NOT NULL, outcome_id TEXT NOT NULL,
    event TEXT NOT NULL, at_us INTEGER NOT NULL, amount REAL NOT NULL,
    PRIMARY KEY (experiment, unit, outcome_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS arm_stats (
    experiment TEXT NOT NULL, phase INTEGER NOT NULL, arm TEXT NOT NULL, metric TEXT NOT NULL,
    n INTEGER NOT NULL, sx REAL NOT NULL, sxx REAL NOT NULL, sy REAL NOT NULL, syy REAL NOT NULL,
    sxy REAL NOT NULL, ny INTEGER NOT NULL,
    PRIMARY KEY (experiment, phase, arm, metric)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS allocations (
    experiment TEXT NOT NULL, phase INTEGER NOT NULL, arm TEXT NOT NULL, allocation INTEGER NOT NULL,
    units INTEGER NOT NULL, PRIMARY KEY (experiment, phase, arm, allocation)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshot_state (
    experiment TEXT NOT NULL, phase INTEGER NOT NULL, dirty INTEGER NOT NULL, last_us INTEGER,
    PRIMARY KEY (experiment, phase)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    experiment TEXT NOT NULL, phase INTEGER NOT NULL, at_us INTEGER NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_phase ON snapshots (experiment, phase, at_us);
"""


class SqliteStats:
    """StatsStore over one SQLite file; `snapshot_every_s` spaces the snapshots writes take."""

    def __init__(self, path: Path, *, snapshot_every_s: float = 60.0, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        self.snapshot_every_us = int(snapshot_every_s * 1_000_000)
        self.busy_timeout_s = busy_timeout_s
        self._threads = SqliteThreads(path, "stats sqlite", busy_timeout_s)

    @classmethod
    async def open(cls, path: Path, *, snapshot_every_s: float = 60.0) -> SqliteStats:
        """Open (creating the file and its tables if needed)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise Unavailable(f"stats sqlite: cannot create the directory of {path}: {err.strerror}") from err
        store = cls(path, snapshot_every_s=snapshot_every_s)
        await store._threads.write(lambda conn: conn.executescript(_SCHEMA))
        return store

    async def close(self) -> None:
        """Finish pending work and close the connections."""
        await self._threads.close()

    # --- writes --------------------------------------------------------------------------------------------

    async def record_exposures(self, plan: StatsPlan, rows: Sequence[ExposureRow], now: datetime) -> list[Verdict]:
        """Record exposures of one experiment in one transaction; one verdict per row."""

        def work(conn: sqlite3.Connection) -> list[Verdict]:
            with immediate_transaction(conn):
                batch = _Batch(conn, plan)
                verdicts = [batch.expose(row) for row in rows]
                batch.finish(to_us(now), self.snapshot_every_us)
            return verdicts

        return await self._threads.write(work) if rows else []

    async def record_outcomes(self, plan: StatsPlan, rows: Sequence[OutcomeRow], now: datetime) -> list[Verdict]:
        """Record outcome and covariate rows of one experiment in one transaction; one verdict per row."""

        def work(conn: sqlite3.Connection) -> list[Verdict]:
            with immediate_transaction(conn):
                batch = _Batch(conn, plan)
                verdicts = [batch.covariate(row) if row.covariate else batch.outcome(row) for row in rows]
                batch.finish(to_us(now), self.snapshot_every_us)
            return verdicts

        return await self._threads.write(work) if rows else []

    async def snapshot(self, key: str, phase: int, now: datetime) -> bool:
        """Snapshot the phase now if it changed since its last snapshot."""

        def work(conn: sqlite3.Connection) -> bool:
            with immediate_transaction(conn):
                return _maybe_snapshot(conn, key, phase, to_us(now), 0)

        return await self._threads.write(work)

    # --- reads ---------------------------------------------------------------------------------------------

    async def arm_stats(self, key: str, phase: int) -> dict[str, dict[str, SufficientStats]]:
        """Arm -> metric -> statistics of one phase."""
        return await self._threads.read(lambda conn: _arm_stats(conn, key, phase))

    async def units_by_allocation(self, key: str, phase: int) -> dict[str, dict[int, int]]:
        """Arm -> allocation -> exposed units of one phase."""

        def work(conn: sqlite3.Connection) -> dict[str, dict[int, int]]:
            out: dict[str, dict[int, int]] = {}
            query = "SELECT arm, allocation, units FROM allocations WHERE experiment = ? AND phase = ?"
            for arm, allocation, units in conn.execute(query, (key, phase)):
                out.setdefault(arm, {})[int(allocation)] = int(units)
            return out

        return await self._threads.read(work)

    async def snapshots(self, key: str, phase: int) -> list[Snapshot]:
        """The phase's snapshots, oldest first."""

        def work(conn: sqlite3.Connection) -> list[Snapshot]:
            query = "SELECT at_us, body FROM snapshots WHERE experiment = ? AND phase = ? ORDER BY at_us, rowid"
            return [
                Snapshot(to_datetime(int(at)), _decode_arms(json.loads(body)))
                for at, body in conn.execute(query, (key, phase))
            ]

        return await self._threads.read(work)


class _Batch:
    """The changes of one batch, applied inside its transaction (the SQL twin of the Redis script)."""

    def __init__(self, conn: sqlite3.Connection, plan: StatsPlan) -> None:
        self.conn = conn
        self.plan = plan
        self.key = plan.key
        self.touched: set[int] = set()

    def expose(self, row: ExposureRow) -> Verdict:
        found = self.conn.execute(
            "SELECT arm, exposed_us FROM units WHERE experiment = ? AND phase = ? AND unit = ?",
            (self.key, row.phase, row.unit),
        ).fetchone()
        if found is not None:
            arm, exposed_us = found
            if arm != row.arm:
                return Verdict.CONFLICTING_ARM
            if row.at_us < exposed_us:  # another replica saw the exposure earlier: the first exposure moves back
                self.conn.execute(
                    "UPDATE units SET exposed_us = ? WHERE experiment = ? AND phase = ? AND unit = ?",
                    (row.at_us, self.key, row.phase, row.unit),
                )
                for metric in self.plan.metrics:
                    if metric.covariate_event:
                        num, y, has_y = self._unit_metric(row.phase, row.unit, metric)
                        new_y, new_has_y = self._covariate(row.unit, metric, row.at_us)
                        self._change(row.phase, row.unit, arm, metric, (num, y, has_y), (num, new_y, new_has_y))
            return Verdict.DUPLICATE
        self.conn.execute(
            "INSERT INTO units (experiment, phase, unit, arm, allocation, exposed_us) VALUES (?, ?, ?, ?, ?, ?)",
            (self.key, row.phase, row.unit, row.arm, row.allocation, row.at_us),
        )
        self.conn.execute(
            "INSERT INTO allocations (experiment, phase, arm, allocation, units) VALUES (?, ?, ?, ?, 1) "
            "ON CONFLICT (experiment, phase, arm, allocation) DO UPDATE SET units = units + 1",
            (self.key, row.phase, row.arm, row.allocation),
        )
        for metric in self.plan.metrics:
            y, has_y = self._covariate(row.unit, metric, row.at_us) if metric.covariate_event else (0.0, 0)
            self._change(row.phase, row.unit, row.arm, metric, None, (0.0, y, has_y))
        return Verdict.ACCEPTED

    def outcome(self, row: OutcomeRow) -> Verdict:
        if self._seen(row.outcome_id):
            return Verdict.DUPLICATE
        found = self.conn.execute(
            "SELECT arm, exposed_us FROM units WHERE experiment = ? AND phase = ? AND unit = ?",
            (self.key, row.phase, row.unit),
        ).fetchone()
        if found is None or found[1] > row.at_us:
            return Verdict.UNIT_NOT_EXPOSED
        self._remember(row.outcome_id)
        arm = found[0]
        for index, slot in self.plan.outcome_targets(row.event):
            metric = self.plan.metrics[index]
            old = self._unit_metric(row.phase, row.unit, metric)
            num, y, has_y = old
            new = (next_num(metric, num, row.amount), y, has_y) if slot == "x" else (num, y + row.amount, 1)
            self._change(row.phase, row.unit, arm, metric, old, new)
        return Verdict.ACCEPTED

    def covariate(self, row: OutcomeRow) -> Verdict:
        if self._seen(row.outcome_id):
            return Verdict.DUPLICATE
        self._remember(row.outcome_id)
        self.conn.execute(
            "INSERT INTO covariates (experiment, unit, outcome_id, event, at_us, amount) VALUES (?, ?, ?, ?, ?, ?)",
            (self.key, row.unit, row.outcome_id, row.event, row.at_us, row.amount),
        )
        targets = self.plan.covariate_targets(row.event)
        if not targets:
            return Verdict.ACCEPTED
        # A covariate arriving after the unit's exposure joins every phase whose window it falls in.
        exposed = self.conn.execute(
            "SELECT phase, arm, exposed_us FROM units WHERE experiment = ? AND unit = ?", (self.key, row.unit)
        ).fetchall()
        for phase, arm, exposed_us in exposed:
            for index in targets:
                metric = self.plan.metrics[index]
                if in_window(metric, row.at_us, exposed_us):
                    old = self._unit_metric(phase, row.unit, metric)
                    self._change(phase, row.unit, arm, metric, old, (old[0], old[1] + row.amount, 1))
        return Verdict.ACCEPTED

    def finish(self, now_us: int, every_us: int) -> None:
        for phase in sorted(self.touched):
            self.conn.execute(
                "INSERT INTO snapshot_state (experiment, phase, dirty, last_us) VALUES (?, ?, 1, NULL) "
                "ON CONFLICT (experiment, phase) DO UPDATE SET dirty = 1",
                (self.key, phase),
            )
            _maybe_snapshot(self.conn, self.key, phase, now_us, every_us)

    # --- helpers -------------------------------------------------------------------------------------------

    def _seen(self, outcome_id: str) -> bool:
        query = "SELECT 1 FROM outcome_ids WHERE experiment = ? AND outcome_id = ?"
        return self.conn.execute(query, (self.key, outcome_id)).fetchone() is not None

    def _remember(self, outcome_id: str) -> None:
        self.conn.execute("INSERT INTO outcome_ids (experiment, outcome_id) VALUES (?, ?)", (self.key, outcome_id))

    def _unit_metric(self, phase: int, unit: str, metric: MetricPlan) -> tuple[float, float, int]:
        found = self.conn.execute(
            "SELECT num, y, has_y FROM unit_metrics WHERE experiment = ? AND phase = ? AND unit = ? AND metric = ?",
            (self.key, phase, unit, metric.name),
        ).fetchone()
        return (0.0, 0.0, 0) if found is None else (float(found[0]), float(found[1]), int(found[2]))

    def _covariate(self, unit: str, metric: MetricPlan, exposed_us: int) -> tuple[float, int]:
        rows = self.conn.execute(
            "SELECT amount FROM covariates WHERE experiment = ? AND unit = ? AND event = ? AND at_us >= ? "
            "AND at_us < ? ORDER BY outcome_id",
            (self.key, unit, metric.covariate_event, exposed_us - metric.window_us, exposed_us),
        ).fetchall()
        return (sum(float(amount) for (amount,) in rows), 1) if rows else (0.0, 0)

    def _change(
        self,
        phase: int,
        unit: str,
        arm: str,
        metric: MetricPlan,
        old: tuple[float, float, int] | None,
        new: tuple[float, float, int],
    ) -> None:
        self.conn.execute(
            "INSERT INTO unit_metrics (experiment, phase, unit, metric, num, y, has_y) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (experiment, phase, unit, metric) DO UPDATE SET num = excluded.num, y = excluded.y, "
            "has_y = excluded.has_y",
            (self.key, phase, unit, metric.name, *new),
        )
        d = Delta.of(metric, old, new)
        self.conn.execute(
            "INSERT INTO arm_stats (experiment, phase, arm, metric, n, sx, sxx, sy, syy, sxy, ny) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (experiment, phase, arm, metric) DO UPDATE SET "
            "n = n + excluded.n, sx = sx + excluded.sx, sxx = sxx + excluded.sxx, sy = sy + excluded.sy, "
            "syy = syy + excluded.syy, sxy = sxy + excluded.sxy, ny = ny + excluded.ny",
            (self.key, phase, arm, metric.name, d.n, d.sx, d.sxx, d.sy, d.syy, d.sxy, d.n_y),
        )
        self.touched.add(phase)


def _arm_stats(conn: sqlite3.Connection, key: str, phase: int) -> dict[str, dict[str, SufficientStats]]:
    out: dict[str, dict[str, SufficientStats]] = {}
    query = (
        "SELECT arm, metric, n, sx, sxx, sy, syy, sxy, ny FROM arm_stats WHERE experiment = ? AND phase = ? "
        "ORDER BY arm, metric"
    )
    for arm, metric, n, sx, sxx, sy, syy, sxy, ny in conn.execute(query, (key, phase)):
        out.setdefault(arm, {})[metric] = SufficientStats(int(n), sx, sxx, sy, syy, sxy, int(ny))
    return out


def _maybe_snapshot(conn: sqlite3.Connection, key: str, phase: int, now_us: int, every_us: int) -> bool:
    state = conn.execute(
        "SELECT dirty, last_us FROM snapshot_state WHERE experiment = ? AND phase = ?", (key, phase)
    ).fetchone()
    if state is None or not state[0] or (state[1] is not None and now_us - state[1] < every_us):
        return False
    arms = _arm_stats(conn, key, phase)
    body = {arm: {m: _encode(s) for m, s in metrics.items()} for arm, metrics in arms.items()}
    conn.execute(
        "INSERT INTO snapshots (experiment, phase, at_us, body) VALUES (?, ?, ?, ?)",
        (key, phase, now_us, json.dumps(body, separators=(",", ":"))),
    )
    conn.execute(
        "UPDATE snapshot_state SET dirty = 0, last_us = ? WHERE experiment = ? AND phase = ?", (now_us, key, phase)
    )
    return True


def _encode(stats: SufficientStats) -> dict[str, float]:
    return {"n": stats.n, "sx": stats.sx, "sxx": stats.sxx, "sy": stats.sy, "syy": stats.syy, "sxy": stats.sxy,
            "ny": stats.n_y}  # fmt: skip


def _decode_arms(body: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, SufficientStats]]:
    return {arm: {m: stats_from_fields(f) for m, f in metrics.items()} for arm, metrics in body.items()}
