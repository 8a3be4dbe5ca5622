"""Training/serving parity: fresco.features.resolve_rows, given the baselines of the same data's
statistics, yields exactly the values the running feature service serves for the same rows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from feature_service import convert
from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.api.features.v1 import feature_service_pb2_grpc as pb_grpc
from fresco.features import Status, parse_definitions, resolve, resolve_rows
from fresco.features.statistics import baselines, summarize
from fresco.suite import ServiceProcess

pytestmark = pytest.mark.integration

DEFINITIONS = """
entities: [{name: customer, join_keys: [{name: customer_id, type: int64}]}]
feature_views:
  - name: customer
    entities: [customer]
    features:
      - {name: income, type: double, null_policy: {strategy: mean}}
      - {name: age, type: int64, null_policy: {strategy: median}}
      - {name: orders, type: int64, null_policy: {strategy: mean}}
      - {name: segment, type: string, null_policy: {strategy: most_frequent}}
      - {name: active, type: bool, null_policy: {strategy: most_frequent}}
      - {name: score, type: double, null_policy: {strategy: most_frequent}}
      - {name: channel, type: string, null_policy: {strategy: default_value, default: web}}
      - {name: discount, type: double, null_policy: {strategy: default_value, default: 0}}
      - {name: note, type: string}
      - {name: risk, type: double, null_policy: {strategy: reject}}
"""
VIEW = parse_definitions(DEFINITIONS).feature_views[0]
REFS = [f"customer:{f.name}" for f in VIEW.features]
STATUS = {Status.PRESENT: pb.FEATURE_STATUS_PRESENT, Status.IMPUTED: pb.FEATURE_STATUS_IMPUTED}
STATUS |= {Status.NULL: pb.FEATURE_STATUS_NULL, Status.REJECTED: pb.FEATURE_STATUS_REJECTED}


def training_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Rows with a null in about one cell of six, and awkward floats (the mean is not round)."""
    rng = np.random.default_rng(seed)

    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.17 else value

    return [
        {
            "customer_id": i,
            "income": maybe(float(rng.lognormal(10, 1))),
            "age": maybe(int(rng.integers(18, 90))),
            "orders": maybe(int(rng.poisson(4))),
            "segment": maybe(str(rng.choice(["a", "b", "c"], p=[0.5, 0.3, 0.2]))),
            "active": maybe(bool(rng.random() < 0.4)),
            "score": maybe(float(rng.integers(0, 5)) / 3),
            "channel": maybe(str(rng.choice(["web", "app", "store"]))),
            "discount": maybe(float(rng.random())),
            "note": maybe(str(rng.choice(["x", "y"]))),
            "risk": float(rng.random()),  # a reject-policy feature: a null would be refused on write
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("parity")
    (root / "features.yaml").write_text(DEFINITIONS)
    service = ServiceProcess(
        "feature_service",
        [
            *["--definitions", str(root / "features.yaml"), "--sqlite-path", str(root / "f.db"), "--port", "0"],
            *["--materialize-source-dirs", str(tmp_path_factory.getbasetemp())],
        ],
    ).start()
    try:
        service.wait_healthy(60)
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[pb_grpc.FeatureServiceStub]:
    with grpc.insecure_channel(service.address) as channel:
        yield pb_grpc.FeatureServiceStub(channel)


@pytest.fixture(scope="module")
def materialized(stub, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The training frame, materialised through the service (which records its statistics)."""
    rows = training_rows(400, seed=3)
    now = time.time()
    table = pa.Table.from_pylist(
        [{**row, "event_timestamp": now - 60} for row in rows],
        schema=pa.schema(
            [("customer_id", pa.int64()), ("income", pa.float64()), ("age", pa.int64()), ("orders", pa.int64()),
             ("segment", pa.string()), ("active", pa.bool_()), ("score", pa.float64()), ("channel", pa.string()),
             ("discount", pa.float64()), ("note", pa.string()), ("risk", pa.float64()),
             ("event_timestamp", pa.float64())]
        ),
    )  # fmt: skip
    path = tmp_path_factory.mktemp("data") / "customers.parquet"
    pq.write_table(table, path)
    response = stub.Materialize(pb.MaterializeRequest(feature_view="customer", source_uri=str(path)), timeout=60)
    assert (response.rows_read, response.rows_written, response.rows_rejected) == (400, 400, 0)
    return rows


def offline_baselines(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What training computes from its own frame with the SDK."""
    return baselines({f.name: summarize(f, [row[f.name] for row in rows]) for f in VIEW.features})


def served(stub, ids: list[int]) -> dict[str, list[tuple[Any, int]]]:
    keys = [vpb.EntityKey(join_keys={"customer_id": vpb.Value(int64_value=i)}) for i in ids]
    response = stub.GetFeatures(pb.GetFeaturesRequest(entity_keys=keys, feature_refs=REFS), timeout=30)
    return {
        c.feature_ref.split(":")[1]: [(convert.from_value(v), s) for v, s in zip(c.values, c.statuses, strict=True)]
        for c in response.columns
    }


def expected(rows: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, list[tuple[Any, int]]]:
    """resolve_rows for the values, and the policy's status for each (resolve, as the SDK applies it)."""
    values = resolve_rows(VIEW, rows, base)
    return {
        f.name: [
            (v[f.name], STATUS[resolve(f, row.get(f.name), base.get(f.name))[1]])
            for row, v in zip(rows, values, strict=True)
        ]
        for f in VIEW.features
    }


def assert_same(online: dict[str, list[tuple[Any, int]]], offline: dict[str, list[tuple[Any, int]]]) -> None:
    for name in offline:
        double = VIEW.feature(name).type == "double"  # type: ignore[union-attr]
        for i, (got, want) in enumerate(zip(online[name], offline[name], strict=True)):
            if double and want[0] is not None:
                # The wire carries a double feature as a double: the SDK's integer YAML default 0 arrives as 0.0.
                want = (float(want[0]), want[1])
            # Otherwise exact equality, types included: 3 is not 3.0 and True is not 1.
            assert (got, type(got[0])) == (want, type(want[0])), f"{name} of row {i}"


def test_materialised_rows_resolve_identically(stub, materialized) -> None:
    base = offline_baselines(materialized)
    assert all(b.mean is not None or b.most_frequent is not None for b in base.values())
    ids = [row["customer_id"] for row in materialized]
    assert_same(served(stub, ids), expected(materialized, base))


def test_pushed_rows_with_nulls_resolve_identically(stub, materialized) -> None:
    base = offline_baselines(materialized)  # baselines stay those of the materialisation
    pushed = [row | {"customer_id": 10_000 + row["customer_id"]} for row in training_rows(60, seed=11)]
    request = pb.PushFeaturesRequest(
        feature_view="customer",
        rows=[
            pb.FeatureRow(
                entity_key=vpb.EntityKey(join_keys={"customer_id": vpb.Value(int64_value=row["customer_id"])}),
                features={
                    f.name: convert.to_value(row[f.name], f.type) for f in VIEW.features if row[f.name] is not None
                },
            )
            for row in pushed
        ],
    )
    response = stub.PushFeatures(iter([request]), timeout=30)
    assert (response.accepted_count, response.rejected_count) == (60, 0)
    assert_same(served(stub, [row["customer_id"] for row in pushed]), expected(pushed, base))


def test_unknown_entities_resolve_like_empty_rows(stub, materialized) -> None:
    base = offline_baselines(materialized)
    online = served(stub, [-1, -2])
    values = resolve_rows(VIEW, [{}, {}], base)
    for f in VIEW.features:
        want_value = values[0][f.name]
        _, status = resolve(f, None, base.get(f.name))
        # Offline a missing row is all nulls; online the status says the entity was never written.
        want_status = pb.FEATURE_STATUS_NOT_FOUND if status == Status.NULL else STATUS[status]
        assert online[f.name] == [(want_value, want_status)] * 2, f.name
