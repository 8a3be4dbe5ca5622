"""Statistics in Redis hashes, so that many service replicas aggregate into one set of sums: every batch of one
experiment is one server-side script (atomic, one round trip), the twin of the SQLite store's transaction.

All keys of an experiment share the hash tag `{key}`, so the script touches one slot (Redis Cluster) and builds
its keys from that base. Durability is Redis's own: run it with appendonly (appendfsync always) for acknowledged
batches to survive a Redis crash.

Keys under `<prefix>{<key>}:`: `o` set of recorded outcome ids; `u:<phase>:<unit>` hash of a unit's exposure
(arm, al, t) and per-metric state (x|m, y|m, h|m); `c:<unit>` list of covariate rows; `s:<phase>` hash of arm
sums (`arm\\x1fmetric\\x1ffield`); `a:<phase>` hash of units per `arm\\x1fallocation`; `m:<phase>` snapshot state;
`h:<phase>` list of snapshots."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from chassis.errors import Unavailable
from experiment_service.stats_store import (
    ExposureRow,
    OutcomeRow,
    Snapshot,
    StatsPlan,
    Verdict,
    stats_from_fields,
    to_datetime,
    to_us,
)
from experiment_service.sufficient import SufficientStats

DEFAULT_PREFIX = "fresco:stats:"
ROWS_PER_CALL = 1000  # each script call holds Redis for its duration

# ARGV: plan JSON ([[name, kind, cap, covariate_event, window_us]...], [phases]), rows JSON, now (us),
# snapshot spacing (us), phase to snapshot now (or ""). Rows: ["e", phase, unit, arm, allocation, t],
# ["o", id, phase, unit, t, amount, [[metric index, "x"|"y"]...]], ["c", id, unit, item, t, amount, [metric index...]]
# (item: the JSON [event, t, amount] kept in the unit's covariate list). Returns one verdict code per row.
_APPLY = r"""
local base = KEYS[1]
local plan = cjson.decode(ARGV[1])
local rows = cjson.decode(ARGV[2])
local now, every, snap_phase = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local metrics, phases = plan[1], plan[2]
local S, PROPORTION = '\31', 1
local touched = {}

local function value(m, num)
  if m[2] == PROPORTION then return num end
  if m[3] > 0 and num > m[3] then return m[3] end
  return num
end

local function unit_state(uk, m)
  local s = redis.call('HMGET', uk, 'x' .. S .. m[1], 'y' .. S .. m[1], 'h' .. S .. m[1])
  return tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[3]) or 0
end

-- Sets the unit's state of metric m and adds the change of its contribution to its arm's sums.
local function change(p, uk, arm, m, dn, num0, y0, h0, num1, y1, h1)
  redis.call('HSET', uk, 'x' .. S .. m[1], num1, 'y' .. S .. m[1], y1, 'h' .. S .. m[1], h1)
  local stats, f = base .. 's:' .. p, arm .. S .. m[1] .. S
  local x0, x1 = value(m, num0), value(m, num1)
  if dn ~= 0 then redis.call('HINCRBY', stats, f .. 'n', dn) end
  local deltas = {{'sx', x1 - x0}, {'sxx', x1 * x1 - x0 * x0}, {'sy', y1 - y0}, {'syy', y1 * y1 - y0 * y0},
                  {'sxy', x1 * y1 - x0 * y0}}
  for _, d in ipairs(deltas) do
    if d[2] ~= 0 then redis.call('HINCRBYFLOAT', stats, f .. d[1], d[2]) end
  end
  if h1 ~= h0 then redis.call('HINCRBY', stats, f .. 'ny', h1 - h0) end
  touched[p] = true
end

local function covariate(unit, m, t0)
  local y, h = 0, 0
  for _, item in ipairs(redis.call('LRANGE', base .. 'c:' .. unit, 0, -1)) do
    local row = cjson.decode(item)
    if row[1] == m[4] and row[2] >= t0 - m[5] and row[2] < t0 then y, h = y + row[3], 1 end
  end
  return y, h
end

local function expose(row)
  local p, unit, arm, alloc, t = row[2], row[3], row[4], row[5], row[6]
  local uk = base .. 'u:' .. p .. ':' .. unit
  local cur = redis.call('HMGET', uk, 'arm', 't')
  if cur[1] then
    if cur[1] ~= arm then return 2 end
    if t < tonumber(cur[2]) then
      redis.call('HSET', uk, 't', string.format('%d', t))
      for _, m in ipairs(metrics) do
        if m[4] ~= '' then
          local num, y, h = unit_state(uk, m)
          local y1, h1 = covariate(unit, m, t)
          change(p, uk, arm, m, 0, num, y, h, num, y1, h1)
        end
      end
    end
    return 1
  end
  redis.call('HSET', uk, 'arm', arm, 'al', alloc, 't', string.format('%d', t))
  redis.call('HINCRBY', base .. 'a:' .. p, arm .. S .. alloc, 1)
  for _, m in ipairs(metrics) do
    local y, h = 0, 0
    if m[4] ~= '' then y, h = covariate(unit, m, t) end
    change(p, uk, arm, m, 1, 0, 0, 0, 0, y, h)
  end
  return 0
end

local function outcome(row)
  local id, p, unit, t, amount = row[2], row[3], row[4], row[5], row[6]
  if redis.call('SISMEMBER', base .. 'o', id) == 1 then return 1 end
  local uk = base .. 'u:' .. p .. ':' .. unit
  local cur = redis.call('HMGET', uk, 'arm', 't')
  if not cur[1] or tonumber(cur[2]) > t then return 3 end
  redis.call('SADD', base .. 'o', id)
  for _, target in ipairs(row[7]) do
    local m = metrics[target[1] + 1]
    local num, y, h = unit_state(uk, m)
    if target[2] == 'x' then
      local num1 = num + amount
      if m[2] == PROPORTION then
        num1 = num
        if amount > 0 then num1 = 1 end
      end
      change(p, uk, cur[1], m, 0, num, y, h, num1, y, h)
    else
      change(p, uk, cur[1], m, 0, num, y, h, num, y + amount, 1)
    end
  end
  return 0
end

local function covariate_row(row)
  local id, unit, item, t, amount = row[2], row[3], row[4], row[5], row[6]
  if redis.call('SISMEMBER', base .. 'o', id) == 1 then return 1 end
  redis.call('SADD', base .. 'o', id)
  redis.call('RPUSH', base .. 'c:' .. unit, item)
  if #row[7] == 0 then return 0 end
  for _, p in ipairs(phases) do
    local uk = base .. 'u:' .. p .. ':' .. unit
    local cur = redis.call('HMGET', uk, 'arm', 't')
    if cur[1] then
      local t0 = tonumber(cur[2])
      for _, index in ipairs(row[7]) do
        local m = metrics[index + 1]
        if t >= t0 - m[5] and t < t0 then
          local num, y, h = unit_state(uk, m)
          change(p, uk, cur[1], m, 0, num, y, h, num, y + amount, 1)
        end
      end
    end
  end
  return 0
end

local function snapshot(p, spacing)
  local meta = base .. 'm:' .. p
  local state = redis.call('HMGET', meta, 'dirty', 'last')
  if state[1] ~= '1' then return 0 end
  if state[2] and now - tonumber(state[2]) < spacing then return 0 end
  local flat = redis.call('HGETALL', base .. 's:' .. p)
  redis.call('RPUSH', base .. 'h:' .. p, cjson.encode({ARGV[3], flat}))
  redis.call('HSET', meta, 'dirty', '0', 'last', ARGV[3])
  return 1
end

local out = {}
for i, row in ipairs(rows) do
  if row[1] == 'e' then out[i] = expose(row)
  elseif row[1] == 'o' then out[i] = outcome(row)
  else out[i] = covariate_row(row) end
end
for _, p in ipairs(phases) do
  if touched[p] then
    redis.call('HSET', base .. 'm:' .. p, 'dirty', '1')
    snapshot(p, every)
  end
end
if snap_phase ~= '' then out[#out + 1] = snapshot(snap_phase, 0) end
return out
"""
_APPLY_SHA = hashlib.sha1(_APPLY.encode(), usedforsecurity=False).hexdigest()
_EMPTY_PLAN = "[[],[]]"


class RedisStats:
    """StatsStore over Redis (redis.asyncio); several stores, in one process or many, share one set of sums."""

    def __init__(self, client: Redis, *, prefix: str = DEFAULT_PREFIX, snapshot_every_s: float = 60.0) -> None:
        self.client = client
        self.prefix = prefix
        self.snapshot_every_us = int(snapshot_every_s * 1_000_000)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = DEFAULT_PREFIX, snapshot_every_s: float = 60.0, timeout_s: float = 5.0
    ) -> RedisStats:
        """A store on a new connection pool to `url`; a call fails (UNAVAILABLE) within about `timeout_s`."""
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=32,
            timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_keepalive=True,
            # One immediate retry on a connection error replaces a pooled connection a restarted Redis closed; a
            # retried batch that did run answers its rows as duplicates, never counting them twice.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        return cls(Redis.from_pool(pool), prefix=prefix, snapshot_every_s=snapshot_every_s)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    def _base(self, key: str) -> str:
        return f"{self.prefix}{{{key}}}:"

    async def _apply(self, key: str, plan: str, calls: Sequence[list[Any]], now_us: int, snap: str) -> list[int]:
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for rows in calls:
                args = (plan, json.dumps(rows, separators=(",", ":")), now_us, self.snapshot_every_us, snap)
                pipe.evalsha(_APPLY_SHA, 1, self._base(key), *args)
            try:
                replies: list[list[int]] = await pipe.execute()
                break
            except NoScriptError:
                # Redis restarted or flushed its scripts; a retried row comes back a duplicate, never twice counted.
                if attempt:
                    raise Unavailable("stats redis: the statistics script cannot be loaded") from None
                await self._call(self.client.script_load(_APPLY))
            except (RedisError, OSError) as exc:
                raise Unavailable(f"stats redis: {type(exc).__name__}: {exc}") from exc
        return [int(code) for reply in replies for code in reply]

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise Unavailable(f"stats redis: {type(exc).__name__}: {exc}") from exc

    async def _rows(self, plan: StatsPlan, encoded: list[list[Any]], now: datetime) -> list[Verdict]:
        if not encoded:
            return []
        calls = [encoded[i : i + ROWS_PER_CALL] for i in range(0, len(encoded), ROWS_PER_CALL)]
        codes = await self._apply(plan.key, plan.encoded(), calls, to_us(now), "")
        return [Verdict(code) for code in codes]

    async def record_exposures(self, plan: StatsPlan, rows: Sequence[ExposureRow], now: datetime) -> list[Verdict]:
        """Record exposures of one experiment; one verdict per row."""
        encoded: list[list[Any]] = [["e", r.phase, r.unit, r.arm, r.allocation, r.at_us] for r in rows]
        return await self._rows(plan, encoded, now)

    async def record_outcomes(self, plan: StatsPlan, rows: Sequence[OutcomeRow], now: datetime) -> list[Verdict]:
        """Record outcome and covariate rows of one experiment; one verdict per row."""
        encoded: list[list[Any]] = []
        for r in rows:
            if r.covariate:
                item = json.dumps([r.event, r.at_us, r.amount], separators=(",", ":"))
                targets: list[Any] = list(plan.covariate_targets(r.event))
                encoded.append(["c", r.outcome_id, r.unit, item, r.at_us, r.amount, targets])
            else:
                targets = [list(t) for t in plan.outcome_targets(r.event)]
                encoded.append(["o", r.outcome_id, r.phase, r.unit, r.at_us, r.amount, targets])
        return await self._rows(plan, encoded, now)

    async def snapshot(self, key: str, phase: int, now: datetime) -> bool:
        """Snapshot the phase now if it changed since its last snapshot."""
        codes = await self._apply(key, _EMPTY_PLAN, [[]], to_us(now), str(phase))
        return codes == [1]

    async def arm_stats(self, key: str, phase: int) -> dict[str, dict[str, SufficientStats]]:
        """Arm -> metric -> statistics of one phase."""
        flat: dict[bytes, bytes] = await self._call(self.client.hgetall(f"{self._base(key)}s:{phase}"))
        return _parse_stats([(k.decode(), v.decode()) for k, v in flat.items()])

    async def units_by_allocation(self, key: str, phase: int) -> dict[str, dict[int, int]]:
        """Arm -> allocation -> exposed units of one phase."""
        flat: dict[bytes, bytes] = await self._call(self.client.hgetall(f"{self._base(key)}a:{phase}"))
        out: dict[str, dict[int, int]] = {}
        for field, units in flat.items():
            arm, allocation = field.decode().rsplit("\x1f", 1)
            out.setdefault(arm, {})[int(allocation)] = int(units)
        return out

    async def snapshots(self, key: str, phase: int) -> list[Snapshot]:
        """The phase's snapshots, oldest first."""
        items: list[bytes] = await self._call(self.client.lrange(f"{self._base(key)}h:{phase}", 0, -1))
        out = []
        for item in items:
            at, flat = json.loads(item)
            pairs = list(zip(flat[0::2], flat[1::2], strict=True)) if isinstance(flat, list) else []
            out.append(Snapshot(to_datetime(int(at)), _parse_stats(pairs)))
        return out


def _parse_stats(pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, SufficientStats]]:
    fields: dict[tuple[str, str], dict[str, float]] = {}
    for name, value in pairs:
        arm, metric, field = name.rsplit("\x1f", 2)
        fields.setdefault((arm, metric), {})[field] = float(value)
    out: dict[str, dict[str, SufficientStats]] = {}
    for (arm, metric), values in sorted(fields.items()):
        out.setdefault(arm, {})[metric] = stats_from_fields(values)
    return out
