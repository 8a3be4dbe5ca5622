"""PushFeatures in process: every violation code, rejected rows numbered across the stream, accepted
rows durable before the answer, and a durable tier that is down failing the push rather than dropping it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry

from chassis.errors import Unavailable
from feature_service import convert
from feature_service.metrics import FeatureMetrics
from feature_service.reader import Catalog
from feature_service.records import Record, entity_key
from feature_service.store import TieredStore
from feature_service.tiers.memory import MemoryCache
from feature_service.tiers.sqlite import SQLiteTier
from feature_service.writer import FeatureWriter, Violation
from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.features import parse_definitions

DEFINITIONS = """
entities:
  - {name: user, join_keys: [{name: user_id, type: int64}]}
  - {name: device, join_keys: [{name: device_id, type: string}, {name: slot, type: int32}]}
feature_views:
  - name: activity
    entities: [user]
    ttl_seconds: 3600
    features:
      - {name: spend, type: double, range: {min: 0, max: 1000}}
      - {name: visits, type: int64}
      - {name: plan, type: string, categories: [free, pro]}
      - {name: score, type: double, null_policy: {strategy: reject}}
      - {name: tags, type: string_list}
      - {name: embedding, type: float_list}
  - name: devices
    entities: [device]
    features:
      - {name: battery, type: double}
"""


def key(user_id: int | None = 1, **extra: vpb.Value) -> vpb.EntityKey:
    keys = {} if user_id is None else {"user_id": vpb.Value(int64_value=user_id)}
    return vpb.EntityKey(join_keys={**keys, **extra})


def row(
    user_id: int | None = 1, at: float | None = None, entity: vpb.EntityKey | None = None, **features
) -> pb.FeatureRow:
    values = {"score": vpb.Value(double_value=0.5), **{k: v for k, v in features.items() if v is not None}}
    message = pb.FeatureRow(entity_key=entity or key(user_id), features=values)
    if at is not None:
        message.event_timestamp.CopyFrom(convert.timestamp_of(at))
    return message


async def stream(*messages: pb.PushFeaturesRequest) -> AsyncIterator[pb.PushFeaturesRequest]:
    for message in messages:
        yield message


class CountingTier(SQLiteTier):
    """SQLite that remembers each write batch, and can be made to fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []
        self.down = False

    async def write(self, view: str, rows: Sequence[tuple[str, Record]]) -> dict[str, Record]:
        if self.down:
            raise Unavailable("sqlite: down for the test")
        self.batches.append(len(rows))
        return await super().write(view, rows)


@pytest.fixture
async def tier(tmp_path: Path) -> CountingTier:
    """Closed with the store that owns it."""
    tier = CountingTier(tmp_path / "features.db")
    await tier.connect()
    return tier


@pytest.fixture
async def writer(tier: CountingTier) -> AsyncIterator[FeatureWriter]:
    store = TieredStore(MemoryCache(), None, tier, None)
    catalog = Catalog(parse_definitions(DEFINITIONS))
    yield FeatureWriter(catalog, store, FeatureMetrics(CollectorRegistry()), max_future_s=60, max_rejections=100)
    await store.close()


async def push_one(writer: FeatureWriter, *rows: pb.FeatureRow, view: str = "activity"):
    return await writer.push(stream(pb.PushFeaturesRequest(feature_view=view, rows=rows)))


def codes(outcome) -> list[list[tuple[str, Violation]]]:
    return [[(p.feature, p.code) for p in r.problems] for r in outcome.rejections.rows]


async def test_valid_rows_are_written_durably_before_the_answer(writer, tier, tmp_path: Path) -> None:
    outcome = await push_one(
        writer,
        row(1, spend=vpb.Value(int64_value=12), plan=vpb.Value(string_value="pro"),
            tags=vpb.Value(string_list=vpb.StringList(values=["a", "b"]))),
        row(2, at=time.time() - 60, visits=vpb.Value(int64_value=3),
            embedding=vpb.Value(int64_list=vpb.Int64List(values=[1, 2]))),
    )  # fmt: skip
    assert (outcome.accepted, outcome.rejections.count) == (2, 0)
    reopened = SQLiteTier(tmp_path / "features.db")
    records = (await reopened.read({"activity": [entity_key([1]), entity_key([2])]}))["activity"]
    await reopened.close()
    first, second = records
    assert first is not None
    assert second is not None
    # Features left out are stored as null; numbers of a float feature are stored as floats.
    assert first.features == {
        "spend": 12.0,
        "visits": None,
        "plan": "pro",
        "score": 0.5,
        "tags": ["a", "b"],
        "embedding": None,
    }
    assert isinstance(first.features["spend"], float)
    assert second.features["embedding"] == [1.0, 2.0]
    assert abs(first.event_ts - time.time()) < 5  # no event timestamp: the receive time
    assert abs(second.event_ts - (time.time() - 60)) < 5


async def test_every_row_violation_code(writer) -> None:
    now = time.time()
    future = time.time() + 3600
    rows = [
        row(1, typo=vpb.Value(double_value=1.0)),
        row(None),
        row(entity=vpb.EntityKey(join_keys={"user_id": vpb.Value(string_value="1")})),
        row(1, spend=vpb.Value(string_value="12")),
        row(1, spend=vpb.Value(double_value=1000.5)),
        row(1, plan=vpb.Value(string_value="gold")),
        row(1, score=vpb.Value()),
        row(1, at=future),
        row(1, at=now - 7200),  # older than the view's TTL: it would only ever be served EXPIRED
        row(1, visits=vpb.Value(bool_value=True), tags=vpb.Value(string_value="a")),
        row(1, embedding=vpb.Value(double_list=vpb.DoubleList(values=[float("nan")]))),  # no range: NaN passes
    ]
    bad_time = row(1)
    bad_time.event_timestamp.CopyFrom(Timestamp(seconds=1, nanos=-5))
    outcome = await push_one(writer, *rows, bad_time)
    assert outcome.accepted == 1
    assert codes(outcome) == [
        [("typo", Violation.UNKNOWN_FEATURE)],
        [("user_id", Violation.MISSING_JOIN_KEY)],
        [("user_id", Violation.TYPE_MISMATCH)],
        [("spend", Violation.TYPE_MISMATCH)],
        [("spend", Violation.OUT_OF_RANGE)],
        [("plan", Violation.UNKNOWN_CATEGORY)],
        [("score", Violation.NULL_REJECTED)],
        [("", Violation.EVENT_TIMESTAMP_OUT_OF_RANGE)],
        [("", Violation.EVENT_TIMESTAMP_OUT_OF_RANGE)],
        [("visits", Violation.TYPE_MISMATCH), ("tags", Violation.TYPE_MISMATCH)],
        [("", Violation.EVENT_TIMESTAMP_OUT_OF_RANGE)],
    ]
    assert [r.row_index for r in outcome.rejections.rows] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    out_of_range = outcome.rejections.rows[4].problems[0]
    assert (out_of_range.expected, out_of_range.actual) == ("a value in [0.0, 1000.0]", "1000.5")
    assert "TTL" in outcome.rejections.rows[8].problems[0].expected


async def test_missing_event_timestamp_when_required(writer) -> None:
    writer.require_event_timestamp = True
    outcome = await push_one(writer, row(1), row(2, at=time.time()))
    assert codes(outcome) == [[("", Violation.MISSING_EVENT_TIMESTAMP)]]
    assert outcome.accepted == 1


async def test_unknown_view_and_composite_keys(writer) -> None:
    good = key(None, device_id=vpb.Value(string_value="d1"), slot=vpb.Value(int64_value=2))
    huge = key(None, device_id=vpb.Value(string_value="d1"), slot=vpb.Value(int64_value=2**31))
    unknown = pb.PushFeaturesRequest(feature_view="nope", rows=[row(1), row(2)])
    devices = pb.PushFeaturesRequest(
        feature_view="devices",
        rows=[pb.FeatureRow(entity_key=good, features={"battery": vpb.Value(double_value=0.3)}),
              pb.FeatureRow(entity_key=huge, features={"battery": vpb.Value(double_value=0.3)})],
    )  # fmt: skip
    outcome = await writer.push(stream(unknown, devices))
    assert outcome.accepted == 1
    assert codes(outcome) == [
        [("", Violation.UNKNOWN_FEATURE_VIEW)],
        [("", Violation.UNKNOWN_FEATURE_VIEW)],
        [("slot", Violation.TYPE_MISMATCH)],
    ]
    assert [(r.row_index, r.view) for r in outcome.rejections.rows] == [(0, "nope"), (1, "nope"), (3, "devices")]


async def test_indexes_span_messages_and_the_list_is_capped_but_counted(writer, tier) -> None:
    writer.max_rejections = 3
    messages = [
        pb.PushFeaturesRequest(feature_view="activity", rows=[row(i, spend=vpb.Value(double_value=-1.0 * (i % 2)))
                                                              for i in range(10 * m, 10 * m + 10)])
        for m in range(3)
    ]  # fmt: skip
    outcome = await writer.push(stream(*messages))
    assert (outcome.accepted, outcome.rejections.count) == (15, 15)
    assert [r.row_index for r in outcome.rejections.rows] == [1, 3, 5]
    assert tier.batches == [5, 5, 5]  # one store write per stream message


async def test_the_latest_row_of_an_entity_in_a_message_wins(writer, tier, tmp_path: Path) -> None:
    now = time.time()
    await push_one(
        writer,
        row(7, at=now - 10, visits=vpb.Value(int64_value=2)),
        row(7, at=now - 20, visits=vpb.Value(int64_value=1)),
        row(7, at=now - 10, visits=vpb.Value(int64_value=3)),
    )
    assert tier.batches == [1]
    (record,) = (await tier.read({"activity": [entity_key([7])]}))["activity"]
    assert record is not None
    assert record.features["visits"] == 3


async def test_durable_tier_down_fails_the_push(writer, tier) -> None:
    tier.down = True
    with pytest.raises(Unavailable, match="sqlite"):
        await push_one(writer, row(1))


async def test_push_metrics_count_values_and_out_of_range(writer) -> None:
    await push_one(writer, row(1, spend=vpb.Value(double_value=5.0)), row(2, spend=vpb.Value(double_value=-5.0)),
                   row(3, plan=vpb.Value(string_value="gold")))  # fmt: skip
    metrics = writer.metrics
    assert metrics is not None
    sample = metrics.values_pushed.labels("activity", "spend")._value.get()
    assert sample == 2
    assert metrics.values_out_of_range.labels("activity", "spend")._value.get() == 1
    assert metrics.values_out_of_range.labels("activity", "plan")._value.get() == 1
    assert metrics.rows.labels("activity", "push", "rejected")._value.get() == 2
