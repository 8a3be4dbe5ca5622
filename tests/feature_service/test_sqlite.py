"""The embedded SQLite tier: batched reads, key listing, statistics, errors as Unavailable, and pushes
the service acknowledged surviving a SIGKILL or SIGTERM of the service process."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from chassis.errors import Unavailable
from feature_service.records import Record, entity_key
from feature_service.tiers import sqlite as sqlite_tier
from feature_service.tiers.sqlite import SQLiteTier
from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.api.features.v1 import feature_service_pb2_grpc as pb_grpc
from fresco.suite import ServiceProcess

DEFINITIONS = """
entities: [{name: user, join_keys: [{name: user_id, type: int64}]}]
feature_views:
  - name: clicks
    entities: [user]
    features:
      - {name: count, type: int64}
      - {name: last_page, type: string}
"""


def record(i: int) -> Record:
    return Record({"count": i, "last_page": f"/p/{i}"}, 1_700_000_000.0 + i, 1_700_000_100.0)


@pytest.fixture
async def tier(tmp_path: Path) -> AsyncIterator[SQLiteTier]:
    tier = SQLiteTier(tmp_path / "sub" / "features.db")
    await tier.connect()
    yield tier
    await tier.close()


async def test_reads_return_records_in_key_order_with_none_for_missing(tier) -> None:
    await tier.write("clicks", [(entity_key([i]), record(i)) for i in range(2000)])
    await tier.write("other", [(entity_key([1]), record(99))])
    keys = [entity_key([i]) for i in (1999, 5, 5000, 0, 5)] + [entity_key([i]) for i in range(1000, 1950)]
    result = await tier.read({"clicks": keys, "other": [entity_key([1]), entity_key([2])]})
    assert [r.features["count"] if r else None for r in result["clicks"][:5]] == [1999, 5, None, 0, 5]
    assert [r.features["count"] for r in result["clicks"][5:] if r] == list(range(1000, 1950))
    assert result["other"][0] == record(99)
    assert result["other"][1] is None


async def test_writes_replace_and_keys_are_listed_page_by_page(tier, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_tier, "KEYS_PAGE", 7)
    await tier.write("clicks", [(entity_key([i]), record(i)) for i in range(30)])
    await tier.write("clicks", [(entity_key([3]), record(300))])
    (found,) = (await tier.read({"clicks": [entity_key([3])]}))["clicks"]
    assert found == record(300)
    listed = [key async for key in tier.keys("clicks")]
    assert sorted(listed) == sorted(entity_key([i]) for i in range(30))
    assert [key async for key in tier.keys("nothing")] == []


async def test_statistics_round_trip(tier) -> None:
    assert await tier.load_statistics("clicks") is None
    await tier.save_statistics("clicks", b"one")
    await tier.save_statistics("clicks", b"two")
    assert await tier.load_statistics("clicks") == b"two"


async def test_the_file_is_in_wal_mode_with_full_sync(tier) -> None:
    await tier.write("clicks", [(entity_key([1]), record(1))])
    conn = sqlite3.connect(tier.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    synchronous = await tier._threads.write(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
    assert synchronous == 2  # FULL


async def test_errors_are_unavailable(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    tier = SQLiteTier(blocked / "features.db")
    with pytest.raises(Unavailable, match="sqlite"):
        await tier.connect()
    await tier.close()
    closed = SQLiteTier(tmp_path / "ok.db")
    await closed.connect()
    await closed.close()
    with pytest.raises(Unavailable, match="closed"):
        await closed.read({"clicks": [entity_key([1])]})


async def test_a_second_process_sees_acknowledged_writes(tier) -> None:
    await tier.write("clicks", [(entity_key([1]), record(1))])
    other = SQLiteTier(tier.path)
    try:
        assert (await other.read({"clicks": [entity_key([1])]}))["clicks"] == [record(1)]
    finally:
        await other.close()


# --- through the service process ---------------------------------------------------------------------


def start(definitions: Path, database: Path) -> ServiceProcess:
    service = ServiceProcess(
        "feature_service", ["--definitions", str(definitions), "--sqlite-path", str(database), "--port", "0"]
    ).start()
    service.wait_healthy(60)
    return service


def push(stub: pb_grpc.FeatureServiceStub, first: int, count: int) -> pb.PushFeaturesResponse:
    rows = [
        pb.FeatureRow(
            entity_key=vpb.EntityKey(join_keys={"user_id": vpb.Value(int64_value=i)}),
            features={"count": vpb.Value(int64_value=i * 10), "last_page": vpb.Value(string_value=f"/p/{i}")},
        )
        for i in range(first, first + count)
    ]
    messages = [pb.PushFeaturesRequest(feature_view="clicks", rows=rows[i : i + 50]) for i in range(0, count, 50)]
    response: pb.PushFeaturesResponse = stub.PushFeatures(iter(messages), timeout=30)
    return response


@pytest.mark.integration
@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM])
def test_acknowledged_pushes_survive_a_restart(tmp_path: Path, stop_signal: signal.Signals) -> None:
    definitions = tmp_path / "features.yaml"
    definitions.write_text(DEFINITIONS)
    database = tmp_path / "features.db"
    service = start(definitions, database)
    try:
        with grpc.insecure_channel(service.address) as channel:
            response = push(pb_grpc.FeatureServiceStub(channel), 0, 500)
        assert (response.accepted_count, response.rejected_count) == (500, 0)
        assert service.process is not None
        service.process.send_signal(stop_signal)  # right after the answer: no time to flush anything else
        service.process.wait(30)
    finally:
        service.stop()
    restarted = start(definitions, database)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            keys = [vpb.EntityKey(join_keys={"user_id": vpb.Value(int64_value=i)}) for i in range(0, 501)]
            began = time.monotonic()
            answer = stub.GetFeatures(
                pb.GetFeaturesRequest(entity_keys=keys, feature_refs=["clicks:count"]), timeout=30
            )
            assert time.monotonic() - began < 30
    finally:
        assert restarted.stop() == 0
    (column,) = answer.columns
    assert [v.int64_value for v in column.values[:500]] == [i * 10 for i in range(500)]
    assert list(column.statuses) == [pb.FEATURE_STATUS_PRESENT] * 500 + [pb.FEATURE_STATUS_NOT_FOUND]
