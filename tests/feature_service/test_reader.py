"""GetFeatures in process: the status of every value (present, imputed, null, expired, not found,
rejected, unavailable), request validation, the hand-written column encoding and its speed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chassis.errors import InvalidArgument, NotFound, Unavailable
from feature_service import convert
from feature_service.bloom import BloomFilters
from feature_service.reader import (
    Catalog,
    Column,
    FeatureAnswer,
    FeatureQuery,
    FeatureReader,
    Served,
    answer_to_proto,
    answer_to_wire,
)
from feature_service.records import Record, entity_key
from feature_service.service import FeatureServicer, method_handlers
from feature_service.store import TieredStore
from feature_service.tiers.memory import MemoryCache
from feature_service.tiers.sqlite import SQLiteTier
from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.features import parse_definitions
from fresco.features.policy import Baseline

DEFINITIONS = """
entities:
  - {name: user, join_keys: [{name: user_id, type: int64}]}
  - {name: shop, join_keys: [{name: shop_id, type: string}, {name: region, type: int32}]}
feature_views:
  - name: profile
    entities: [user]
    features:
      - {name: age, type: int64, null_policy: {strategy: median}}
      - {name: spend, type: double, null_policy: {strategy: mean}}
      - {name: plan, type: string, null_policy: {strategy: most_frequent}}
      - {name: country, type: string, null_policy: {strategy: default_value, default: "??"}}
      - {name: note, type: string}
      - {name: score, type: double, null_policy: {strategy: reject}}
      - {name: flags, type: int64_list}
      - {name: vip, type: bool}
  - name: fresh
    entities: [user]
    ttl_seconds: 60
    features:
      - {name: clicks, type: int64}
      - {name: rate, type: double, null_policy: {strategy: default_value, default: 0.5}}
  - name: shops
    entities: [shop]
    features:
      - {name: rating, type: double}
"""
BASELINES = {"age": Baseline(40.0, 38.0, 38), "spend": Baseline(12.5, 10.0, 9.0), "plan": Baseline(most_frequent="pro")}


def user(i: int) -> vpb.EntityKey:
    return vpb.EntityKey(join_keys={"user_id": vpb.Value(int64_value=i)})


class FailingTier(SQLiteTier):
    """A durable tier that is down for reads."""

    async def read(self, keys_by_view: Mapping[str, Sequence[str]]) -> dict[str, list[Record | None]]:
        raise Unavailable("sqlite: down for the test")


@pytest.fixture
def catalog() -> Catalog:
    catalog = Catalog(parse_definitions(DEFINITIONS))
    catalog.views["profile"].baselines = dict(BASELINES)
    return catalog


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[TieredStore]:
    tier = SQLiteTier(tmp_path / "features.db")
    await tier.connect()
    store = TieredStore(MemoryCache(), None, tier, BloomFilters())
    await store.start(["profile", "fresh", "shops"])
    now = time.time()
    await store.write(
        "profile",
        [
            (
                entity_key([1]),
                Record(
                    {
                        "age": 30,
                        "spend": 5.0,
                        "plan": "free",
                        "country": "FR",
                        "note": "hi",
                        "score": 0.9,
                        "flags": [1, 2],
                        "vip": True,
                    },
                    now,
                    now,
                ),
            ),
            (
                entity_key([2]),
                Record(
                    {
                        "age": None,
                        "spend": None,
                        "plan": None,
                        "country": None,
                        "note": None,
                        "score": None,
                        "flags": None,
                        "vip": None,
                    },
                    now,
                    now,
                ),
            ),
        ],
    )
    await store.write(
        "fresh",
        [
            (entity_key([1]), Record({"clicks": 7, "rate": 0.1}, now - 10, now)),
            (entity_key([2]), Record({"clicks": 3, "rate": None}, now - 3600, now)),
        ],
    )
    yield store
    await store.close()


async def read(store, catalog, refs, entities, **options) -> pb.GetFeaturesResponse:
    request = pb.GetFeaturesRequest(entity_keys=entities, feature_refs=refs, **options)
    query = FeatureQuery.from_proto(request, catalog, 1_000_000)
    return answer_to_proto(await FeatureReader(store).read(query))


def column(response: pb.GetFeaturesResponse, ref: str) -> list[tuple[object, int]]:
    found = next(c for c in response.columns if c.feature_ref == ref)
    return [(convert.from_value(v), s) for v, s in zip(found.values, found.statuses, strict=True)]


PROFILE = ["age", "spend", "plan", "country", "note", "score", "flags", "vip"]


async def test_present_values_come_back_as_stored(store, catalog) -> None:
    response = await read(store, catalog, [f"profile:{f}" for f in PROFILE], [user(1)])
    assert [column(response, f"profile:{f}")[0] for f in PROFILE] == [
        (30, Served.PRESENT), (5.0, Served.PRESENT), ("free", Served.PRESENT), ("FR", Served.PRESENT),
        ("hi", Served.PRESENT), (0.9, Served.PRESENT), ([1, 2], Served.PRESENT), (True, Served.PRESENT),
    ]  # fmt: skip
    assert list(response.metadata.feature_refs) == [f"profile:{f}" for f in PROFILE]


async def test_nulls_are_imputed_kept_or_rejected_by_policy(store, catalog) -> None:
    response = await read(store, catalog, [f"profile:{f}" for f in PROFILE], [user(2)])
    assert [column(response, f"profile:{f}")[0] for f in PROFILE] == [
        (38, Served.IMPUTED),  # median
        (12.5, Served.IMPUTED),  # mean
        ("pro", Served.IMPUTED),  # most frequent
        ("??", Served.IMPUTED),  # default
        (None, Served.NULL),  # keep_null
        (None, Served.REJECTED),  # reject
        (None, Served.NULL),
        (None, Served.NULL),
    ]


async def test_never_written_entities_are_not_found_unless_imputed(store, catalog) -> None:
    response = await read(store, catalog, ["profile:age", "profile:note", "profile:score"], [user(99)])
    assert column(response, "profile:age") == [(38, Served.IMPUTED)]
    assert column(response, "profile:note") == [(None, Served.NOT_FOUND)]
    assert column(response, "profile:score") == [(None, Served.REJECTED)]


async def test_no_baseline_yet_means_no_imputation(store, catalog) -> None:
    catalog.views["profile"].baselines = {}
    response = await read(store, catalog, ["profile:age", "profile:spend"], [user(2), user(99)])
    assert column(response, "profile:age") == [(None, Served.NULL), (None, Served.NOT_FOUND)]


async def test_values_older_than_the_ttl_are_expired_or_imputed(store, catalog) -> None:
    response = await read(store, catalog, ["fresh:clicks", "fresh:rate"], [user(1), user(2)])
    assert column(response, "fresh:clicks") == [(7, Served.PRESENT), (None, Served.EXPIRED)]
    assert column(response, "fresh:rate") == [(0.1, Served.PRESENT), (0.5, Served.IMPUTED)]


async def test_max_staleness_replaces_the_ttl(store, catalog) -> None:
    from google.protobuf.duration_pb2 import Duration

    tight = await read(store, catalog, ["fresh:clicks"], [user(1)], max_staleness=Duration(seconds=5))
    assert column(tight, "fresh:clicks") == [(None, Served.EXPIRED)]
    loose = await read(store, catalog, ["fresh:clicks"], [user(2)], max_staleness=Duration(seconds=7200))
    assert column(loose, "fresh:clicks") == [(3, Served.PRESENT)]
    never = await read(store, catalog, ["profile:age"], [user(1)], max_staleness=Duration(seconds=0))
    assert column(never, "profile:age") == [(30, Served.PRESENT)]


async def test_disable_imputation_serves_raw_statuses(store, catalog) -> None:
    response = await read(
        store, catalog, ["profile:age", "profile:score", "fresh:rate"], [user(2), user(99)], disable_imputation=True
    )
    assert column(response, "profile:age") == [(None, Served.NULL), (None, Served.NOT_FOUND)]
    assert column(response, "profile:score") == [(None, Served.NULL), (None, Served.NOT_FOUND)]
    assert column(response, "fresh:rate") == [(None, Served.EXPIRED), (None, Served.NOT_FOUND)]


async def test_event_timestamps_and_served_tier(store, catalog) -> None:
    response = await read(
        store, catalog, ["fresh:clicks", "profile:age"], [user(1), user(99)], include_event_timestamps=True
    )
    stamps = response.columns[0].event_timestamps
    assert stamps[0].seconds > 0
    assert (stamps[1].seconds, stamps[1].nanos) == (0, 0)
    assert response.columns[0].served_tier in ("memory", "sqlite")
    plain = await read(store, catalog, ["fresh:clicks"], [user(1)])
    assert len(plain.columns[0].event_timestamps) == 0


async def test_one_call_spans_views_and_repeats_entities(store, catalog) -> None:
    entities = [user(1), user(2), user(1)]
    response = await read(store, catalog, ["profile:age", "fresh:clicks", "profile:age"], entities)
    assert [c.feature_ref for c in response.columns] == ["profile:age", "fresh:clicks", "profile:age"]
    assert column(response, "fresh:clicks") == [(7, 1), (None, Served.EXPIRED), (7, 1)]


async def test_composite_keys(store, catalog) -> None:
    shop = vpb.EntityKey(join_keys={"shop_id": vpb.Value(string_value="s1"), "region": vpb.Value(int64_value=3)})
    await store.write("shops", [(entity_key(["s1", 3]), Record({"rating": 4.5}, time.time(), time.time()))])
    response = await read(store, catalog, ["shops:rating"], [shop])
    assert column(response, "shops:rating") == [(4.5, Served.PRESENT)]


async def test_durable_tier_down_marks_values_unavailable(tmp_path: Path, catalog) -> None:
    tier = FailingTier(tmp_path / "down.db")
    await tier.connect()
    store = TieredStore(MemoryCache(), None, tier, None)
    try:
        response = await read(store, catalog, ["profile:age", "profile:score"], [user(1)])
    finally:
        await store.close()
    assert column(response, "profile:age") == [(None, Served.UNAVAILABLE)]
    assert column(response, "profile:score") == [(None, Served.UNAVAILABLE)]
    assert response.metadata.degraded
    assert list(response.metadata.failed_tiers) == ["sqlite"]


@pytest.mark.parametrize(
    ("refs", "entities", "error", "words"),
    [
        ([], [user(1)], InvalidArgument, ["feature_refs", "at least one"]),
        (["profile"], [user(1)], InvalidArgument, ["feature_refs[0]", "view:feature"]),
        (["profile:age", ":age"], [user(1)], InvalidArgument, ["feature_refs[1]"]),
        (["profile:age:x"], [user(1)], InvalidArgument, ["feature_refs[0]"]),
        (["nope:age"], [user(1)], NotFound, ["nope", "profile"]),
        (["profile:nope"], [user(1)], NotFound, ["nope", "age"]),
        (["profile:age"], [user(1), vpb.EntityKey()], InvalidArgument, ["entity_keys[1]", "user_id", "missing"]),
        (["profile:age"], [vpb.EntityKey(join_keys={"user_id": vpb.Value()})], InvalidArgument, ["user_id", "null"]),
        (
            ["profile:age"],
            [vpb.EntityKey(join_keys={"user_id": vpb.Value(string_value="1")})],
            InvalidArgument,
            ["entity_keys[0].join_keys[user_id]", "int64"],
        ),
        (
            ["shops:rating"],
            [vpb.EntityKey(join_keys={"shop_id": vpb.Value(string_value="s"), "region": vpb.Value(int64_value=2**40)})],
            InvalidArgument,
            ["region", "int32"],
        ),
    ],
)
def test_bad_requests_name_the_field(catalog, refs, entities, error, words) -> None:
    with pytest.raises(error) as caught:
        FeatureQuery.from_proto(pb.GetFeaturesRequest(entity_keys=entities, feature_refs=refs), catalog, 1000)
    for word in words:
        assert word in str(caught.value)


def test_negative_staleness_and_too_many_values_are_invalid(catalog) -> None:
    from google.protobuf.duration_pb2 import Duration

    request = pb.GetFeaturesRequest(
        entity_keys=[user(1)], feature_refs=["profile:age"], max_staleness=Duration(seconds=-1)
    )
    with pytest.raises(InvalidArgument, match="max_staleness"):
        FeatureQuery.from_proto(request, catalog, 1000)
    request = pb.GetFeaturesRequest(entity_keys=[user(i) for i in range(11)], feature_refs=["profile:age"] * 10)
    with pytest.raises(InvalidArgument, match="at most 100"):
        FeatureQuery.from_proto(request, catalog, 100)


# --- the hand-written encoding equals what protobuf builds ----------------------------------------------

SCALARS = {
    "double": st.floats(allow_nan=False),
    "int64": st.integers(-(2**63), 2**63 - 1),
    "string": st.text(max_size=300),
    "bool": st.booleans(),
    "bytes": st.binary(max_size=300),
    "double_list": st.lists(st.floats(allow_nan=False), max_size=5),
    "string_list": st.lists(st.text(max_size=5), max_size=5),
}


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(SCALARS)).flatmap(
        lambda kind: st.tuples(st.just(kind), st.lists(st.none() | SCALARS[kind], max_size=20))
    ),
    st.lists(st.sampled_from(list(Served)), max_size=20),
    st.lists(st.none() | st.floats(0, 4e9), max_size=20),
    st.text(max_size=200),
)
def test_fast_encoding_matches_protobuf(kind_values, statuses, stamps, tier) -> None:
    kind, values = kind_values
    encoded = convert.encode_column(
        "v:f", convert.encode_values(kind, values), statuses, convert.encode_timestamps(stamps), tier
    )
    fast = pb.GetFeaturesResponse.FromString(
        convert.encode_response(convert.encode_metadata(("v:f",), True, [], []), [encoded])
    )
    slow = pb.GetFeaturesResponse(metadata=pb.GetFeaturesMetadata(feature_refs=["v:f"], degraded=True))
    slow.columns.add(
        feature_ref="v:f",
        values=[convert.to_value(v, kind) for v in values],
        statuses=statuses,
        event_timestamps=[convert.timestamp_of(s or 0.0) for s in stamps],
        served_tier=tier,
    )
    assert fast == slow


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.text(max_size=150), max_size=60),
    st.booleans(),
    st.lists(st.text(max_size=20), max_size=4),
    st.lists(st.text(max_size=20), max_size=4),
)
def test_fast_metadata_encoding_matches_protobuf(refs, degraded, served, failed) -> None:
    encoded = convert.encode_metadata(tuple(refs), degraded, served, failed)
    slow = pb.GetFeaturesMetadata(feature_refs=refs, degraded=degraded, served_tiers=served, failed_tiers=failed)
    assert pb.GetFeaturesMetadata.FromString(encoded) == slow
    assert pb.GetFeaturesResponse.FromString(convert.encode_response(encoded, [])).metadata == slow


def test_values_of_another_type_than_declared_still_encode() -> None:
    # e.g. an integer default for a double feature, or a most-frequent value of a list feature (a repr string)
    values = [1, True, "x", 2.5, None, [1.0]]
    response = pb.GetFeaturesResponse.FromString(
        convert.encode_response(
            convert.encode_metadata((), False, [], []),
            [convert.encode_column("v:f", convert.encode_values("double", values), [], b"", "")],
        )
    )
    assert [convert.from_value(v) for v in response.columns[0].values] == [1.0, True, "x", 2.5, None, [1.0]]


async def test_100_entities_by_40_features_answer_in_a_few_milliseconds(tmp_path: Path) -> None:
    kinds = ["double", "int64", "string", "bool"]
    features = "\n".join(f"      - {{name: f{i}, type: {kinds[i % 4]}}}" for i in range(40))
    catalog = Catalog(
        parse_definitions(
            "entities: [{name: user, join_keys: [{name: user_id, type: int64}]}]\n"
            f"feature_views:\n  - name: wide\n    entities: [user]\n    features:\n{features}\n"
        )
    )
    sample = {"double": 1.5, "int64": 12345, "string": "category", "bool": True}
    tier = SQLiteTier(tmp_path / "wide.db")
    await tier.connect()
    store = TieredStore(MemoryCache(), None, tier, BloomFilters())
    now = time.time()
    rows = {f.name: sample[f.type] for f in catalog.views["wide"].view.features}
    await store.write("wide", [(entity_key([i]), Record(rows, now, now)) for i in range(100)])
    request = pb.GetFeaturesRequest(
        entity_keys=[user(i) for i in range(100)], feature_refs=[f"wide:f{i}" for i in range(40)]
    )
    reader = FeatureReader(store)
    timings = []
    try:
        for _ in range(30):
            began = time.perf_counter()
            response = answer_to_proto(await reader.read(FeatureQuery.from_proto(request, catalog, 10**6)))
            timings.append(time.perf_counter() - began)
    finally:
        await store.close()
    assert all(list(c.statuses) == [pb.FEATURE_STATUS_PRESENT] * 100 for c in response.columns)
    assert len(response.columns) == 40
    median_ms = sorted(timings)[len(timings) // 2] * 1000
    print(f"GetFeatures 100×40 from memory, validate + read + build: median {median_ms:.2f} ms")
    assert median_ms < 15, f"{median_ms:.2f} ms"  # 2-4 ms here; generous for busy two-core CI machines


def test_the_service_sends_get_features_answers_as_encoded() -> None:
    # Serialised once: the servicer answers with the wire form answer_to_wire encodes, and the handler the
    # service registers sends those very bytes (no parse into a message, no second serialisation).
    handlers = method_handlers(FeatureServicer())
    wire = answer_to_wire(
        FeatureAnswer([Column("v:f", "double", [1.5, None], [1, 5], None, "memory")], served_tiers=["memory"])
    )
    serialize = handlers["GetFeatures"].response_serializer
    assert serialize is not None
    assert serialize(wire) is wire
    assert handlers["GetFeatures"].request_deserializer == pb.GetFeaturesRequest.FromString
    parsed = pb.GetFeaturesResponse.FromString(wire)
    assert [convert.from_value(v) for v in parsed.columns[0].values] == [1.5, None]
    assert list(parsed.metadata.served_tiers) == ["memory"]
    # Every other method keeps the generated serializer of its message.
    assert handlers["ListFeatureViews"].response_serializer == pb.ListFeatureViewsResponse.SerializeToString
