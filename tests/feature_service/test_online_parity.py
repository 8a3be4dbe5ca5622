"""Online-offline parity in the running feature service: sampled served values are checked against the
materialised files resolved by resolve_rows. Identical policies give no mismatch; an online policy changed
after materialisation (offline side resolving with the old definitions) gives mismatches on exactly the
changed features; pushed values count as missing offline; sources survive a restart; a full queue drops
samples without touching the answers; bad refs get INVALID_ARGUMENT or NOT_FOUND naming the field."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from typer.testing import CliRunner

from feature_service import convert
from feature_service.records import entity_key
from fresco.api.common.v1 import values_pb2 as vpb
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.api.features.v1 import feature_service_pb2_grpc as pb_grpc
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.cli_features import app as features_cli
from fresco.features import parse_definitions, resolve_rows
from fresco.features.statistics import baselines, summarize
from fresco.suite import ServiceProcess

pytestmark = pytest.mark.integration

DEFINITIONS = """
entities: [{name: customer, join_keys: [{name: customer_id, type: int64}]}]
feature_views:
  - name: customer
    entities: [customer]
    ttl_seconds: 86400
    features:
      - {name: income, type: double, null_policy: {strategy: mean}}
      - {name: age, type: int64, null_policy: {strategy: median}}
      - {name: segment, type: string, null_policy: {strategy: most_frequent}}
      - {name: channel, type: string, null_policy: {strategy: default_value, default: web}}
      - {name: note, type: string}
      - {name: history, type: double_list}
  - name: risk
    entities: [customer]
    ttl_seconds: 3600
    features:
      - {name: score, type: double, null_policy: {strategy: mean}}
"""
# The online policy changed after materialisation: income by median, channel defaulting to app.
CHANGED = DEFINITIONS.replace(
    "income, type: double, null_policy: {strategy: mean}", "income, type: double, null_policy: {strategy: median}"
)
CHANGED = CHANGED.replace("default: web", "default: app")
VIEW = parse_definitions(DEFINITIONS).feature_views[0]
NEW_VIEW = parse_definitions(CHANGED).feature_views[0]
FEATURES = [f.name for f in VIEW.features]
REFS = [f"customer:{name}" for name in FEATURES] + ["risk:score"]
ENTITIES = 120
PUSHED = [10_000 + i for i in range(4)]  # entities only ever pushed
OVERWRITTEN = 0  # a materialised entity pushed a newer value
SAME_TIME = 1  # a materialised entity pushed other values with the event time of its file row
FILE_TIME = float(int(time.time()))  # whole seconds: a pushed Timestamp carries the file's time exactly


def customers(seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)

    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.25 else value

    return [
        {
            "customer_id": i,
            "income": maybe(float(rng.lognormal(10, 1))),
            "age": maybe(int(rng.integers(18, 90))),
            "segment": maybe(str(rng.choice(["a", "b", "c"]))),
            "channel": maybe(str(rng.choice(["web", "app", "store"]))),
            "note": maybe(str(rng.choice(["x", "y"]))),
            "history": maybe([float(v) for v in rng.random(3)]),
        }
        for i in range(ENTITIES)
    ]


SCHEMA = pa.schema(
    [("customer_id", pa.int64()), ("income", pa.float64()), ("age", pa.int64()), ("segment", pa.string()),
     ("channel", pa.string()), ("note", pa.string()), ("history", pa.list_(pa.float64())),
     ("event_timestamp", pa.float64())]
)  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("online_parity")
    (root / "features.yaml").write_text(DEFINITIONS)
    (root / "changed.yaml").write_text(CHANGED)
    return root


@pytest.fixture(scope="module")
def latest() -> list[dict[str, Any]]:
    """Each entity's latest offline row; an older row of each, with other values, is in the file too."""
    return customers(seed=5)


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    """The baselines materialisation records: statistics of every row of the file, older ones included."""
    rows = customers(seed=6) + customers(seed=5)
    return baselines({f.name: summarize(f, [row[f.name] for row in rows]) for f in VIEW.features})


@pytest.fixture(scope="module")
def files(workdir: Path, latest: list[dict[str, Any]]) -> tuple[Path, Path]:
    now = FILE_TIME
    older = [row | {"event_timestamp": now - 7200} for row in customers(seed=6)]
    newer = [row | {"event_timestamp": now - 60} for row in latest]
    path = workdir / "customers.parquet"
    pq.write_table(pa.Table.from_pylist(older + newer, schema=SCHEMA), path)
    # Expired by the risk view's TTL of an hour, online and offline alike.
    risk = workdir / "risk.parquet"
    pq.write_table(
        pa.table({"customer_id": list(range(ENTITIES)), "score": [i / 7 for i in range(ENTITIES)],
                  "event_timestamp": [now - 7200.0] * ENTITIES}),
        risk,
    )  # fmt: skip
    return path, risk


@pytest.fixture(scope="module")
def materialised(workdir: Path, files: tuple[Path, Path]) -> None:
    """Both views materialised into the module's SQLite file, and a few pushes: entity 0 gets a newer value,
    PUSHED entities exist only online."""
    service = start(workdir, "features.yaml")
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            for view, path in (("customer", files[0]), ("risk", files[1])):
                response = stub.Materialize(pb.MaterializeRequest(feature_view=view, source_uri=str(path)), timeout=60)
                assert response.rows_rejected == 0
            push(stub, [OVERWRITTEN, *PUSHED])
            push(stub, [SAME_TIME], FILE_TIME - 60)
    finally:
        assert service.stop() == 0


def start(workdir: Path, definitions: str, *extra: str) -> ServiceProcess:
    args = ["--definitions", str(workdir / definitions), "--sqlite-path", str(workdir / "f.db"), "--port", "0"]
    args += ["--materialize-source-dirs", str(workdir), *extra]
    service = ServiceProcess("feature_service", args).start()
    service.wait_healthy(60)
    return service


def customer_keys(ids: list[int]) -> list[vpb.EntityKey]:
    return [vpb.EntityKey(join_keys={"customer_id": vpb.Value(int64_value=i)}) for i in ids]


def get(stub: pb_grpc.FeatureServiceStub, ids: list[int]) -> pb.GetFeaturesResponse:
    response: pb.GetFeaturesResponse = stub.GetFeatures(
        pb.GetFeaturesRequest(entity_keys=customer_keys(ids), feature_refs=REFS), timeout=30
    )
    return response


def parity(stub: pb_grpc.FeatureServiceStub, refs: list[str] | None = None) -> dict[str, spb.FeatureParity]:
    response = stub.GetFeatureParity(pb.GetFeatureParityRequest(feature_refs=refs or []), timeout=10)
    return {f.feature_ref: f for f in response.features}


def wait_checked(stub: pb_grpc.FeatureServiceStub, expected: int) -> dict[str, spb.FeatureParity]:
    """Poll until every ref has `expected` checks (the check runs in the background)."""
    deadline = time.monotonic() + 60
    while True:
        counts = parity(stub)
        if all(ref in counts and counts[ref].checked >= expected for ref in REFS):
            return counts
        assert time.monotonic() < deadline, {ref: c.checked for ref, c in counts.items()}
        time.sleep(0.05)


def summary(counts: dict[str, spb.FeatureParity]) -> dict[str, tuple[int, int, int]]:
    return {ref: (c.checked, c.mismatched, c.missing_offline) for ref, c in counts.items()}


def metric(service: ServiceProcess, name: str, labels: str) -> float:
    text = urllib.request.urlopen(service.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(part in line for part in labels.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def push(stub: pb_grpc.FeatureServiceStub, ids: list[int], event_ts: float | None = None) -> None:
    rows = [
        pb.FeatureRow(
            entity_key=customer_keys([i])[0],
            features={"income": vpb.Value(double_value=1.5), "channel": vpb.Value(string_value="store")},
            event_timestamp=convert.timestamp_of(time.time() if event_ts is None else event_ts),
        )
        for i in ids
    ]
    response = stub.PushFeatures(iter([pb.PushFeaturesRequest(feature_view="customer", rows=rows)]), timeout=30)
    assert response.accepted_count == len(ids)


def test_parity_across_policy_change_and_restart(workdir, materialised, latest, base) -> None:
    ids = list(range(ENTITIES)) + PUSHED
    service = start(workdir, "features.yaml", "--parity-sample-rate", "1")
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            answer = get(stub, ids)
            counts = wait_checked(stub, len(ids))
            # Same policies: nothing differs; pushed values have no offline row at their time.
            pushed = len(PUSHED) + 2
            want = {ref: (len(ids), 0, pushed) for ref in REFS[:-1]}
            want["risk:score"] = (len(ids), 0, len(PUSHED))  # the risk view's rows are expired: both impute
            assert summary(counts) == want
            assert metric(service, "fresco_feature_parity_checks_total", 'feature="income",outcome="match"') == (
                ENTITIES - 2
            )
            # The answers are those of the policy: sampling every entity did not change them.
            served = {c.feature_ref: [convert.from_value(v) for v in c.values] for c in answer.columns}
            expected = resolve_rows(VIEW, latest[2:], base)
            for name in FEATURES:
                assert served[f"customer:{name}"][2:ENTITIES] == [r[name] for r in expected], name
            assert served["customer:channel"][:2] == ["store", "store"]
    finally:
        assert service.stop() == 0

    # Restarted with the online policy changed, the offline side resolving with the definitions materialised under.
    service = start(
        workdir,
        "changed.yaml",
        "--parity-sample-rate",
        "1",
        "--parity-offline-definitions",
        str(workdir / "features.yaml"),
    )
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            get(stub, ids)
            counts = wait_checked(stub, len(ids))
            compared = latest[2:]  # entities 0 and 1 were pushed over: missing offline
            nulls = {name: sum(row[name] is None for row in compared) for name in FEATURES}
            assert min(nulls["income"], nulls["channel"]) > 0
            want = {ref: (len(ids), 0, len(PUSHED) + 2) for ref in REFS[:-1]}
            want["customer:income"] = (len(ids), nulls["income"], len(PUSHED) + 2)
            want["customer:channel"] = (len(ids), nulls["channel"], len(PUSHED) + 2)
            want["risk:score"] = (len(ids), 0, len(PUSHED))
            assert summary(counts) == want
            # The online and offline answers of the examples are those of the two policies.
            example = counts["customer:channel"].examples[0]
            assert "customer_id=" in example
            assert "online 'app', offline 'web'" in example
            assert len(counts["customer:income"].examples) == 5
            assert f"offline {base['income'].mean!r}" in counts["customer:income"].examples[0]
            result = CliRunner().invoke(
                features_cli, ["parity", "--service", service.address, "--ref", "customer:channel"]
            )
            assert result.exit_code == 0, result.output
            line = next(line for line in result.output.splitlines() if "customer:channel" in line).split()
            assert [cell for cell in line if cell.isdigit()] == [
                str(len(ids)),
                str(nulls["channel"]),
                str(len(PUSHED) + 2),
            ]
    finally:
        assert service.stop() == 0


def test_full_queue_drops_samples_not_answers(workdir, materialised) -> None:
    """Half the entities sampled by their key's hash, a queue of one: one checked, the others dropped."""
    ids = list(range(2, ENTITIES))
    sampled = [i for i in ids if zlib.crc32(entity_key([i]).encode()) < 2**31]
    assert 0 < len(sampled) < len(ids)
    reference = start(workdir, "features.yaml", "--parity-sample-rate", "0")
    try:
        with grpc.insecure_channel(reference.address) as channel:
            unsampled = get(pb_grpc.FeatureServiceStub(channel), ids)
    finally:
        assert reference.stop() == 0
    service = start(workdir, "features.yaml", "--parity-sample-rate", "0.5", "--parity-queue-size", "1")
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            # One call, one view at a time: the first sampled entity is queued, the rest find the queue full.
            answer = stub.GetFeatures(
                pb.GetFeaturesRequest(entity_keys=customer_keys(ids), feature_refs=REFS[:-1]), timeout=30
            )
            assert answer.columns == unsampled.columns[:-1]
            deadline = time.monotonic() + 60
            while parity(stub, ["customer:income"])["customer:income"].checked < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert metric(service, "fresco_feature_parity_samples_dropped_total", 'reason="queue_full"') == (
                len(sampled) - 1
            )
            counts = parity(stub, ["customer:age", "risk:score"])
            assert summary(counts) == {"customer:age": (1, 0, 0), "risk:score": (0, 0, 0)}
            assert stub.GetFeatureParity(pb.GetFeatureParityRequest(), timeout=10).sample_rate == 0.5
    finally:
        assert service.stop() == 0


@pytest.mark.parametrize(
    ("ref", "code", "message"),
    [
        ("customer", grpc.StatusCode.INVALID_ARGUMENT, 'feature_refs[1]: expected "view:feature"'),
        ("customer:a:b", grpc.StatusCode.INVALID_ARGUMENT, 'feature_refs[1]: expected "view:feature"'),
        ("nope:income", grpc.StatusCode.NOT_FOUND, "feature_refs[1]: unknown feature view 'nope'"),
        ("customer:nope", grpc.StatusCode.NOT_FOUND, "feature_refs[1]: view 'customer' has no feature 'nope'"),
    ],
)
def test_bad_refs_name_the_field(bad_ref_stub, ref: str, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        bad_ref_stub.GetFeatureParity(pb.GetFeatureParityRequest(feature_refs=["customer:age", ref]), timeout=10)
    assert (caught.value.code(), message in (caught.value.details() or "")) == (code, True), caught.value.details()


@pytest.fixture(scope="module")
def bad_ref_stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.FeatureServiceStub]:
    root = tmp_path_factory.mktemp("parity_refs")
    (root / "features.yaml").write_text(DEFINITIONS)
    service = start(root, "features.yaml")
    try:
        with grpc.insecure_channel(service.address) as channel:
            yield pb_grpc.FeatureServiceStub(channel)
    finally:
        assert service.stop() == 0


def test_a_new_materialisation_is_read_again(workdir, materialised) -> None:
    """Newer rows materialised while the service runs: the offline index is rebuilt, so they match."""
    now = time.time()
    rows = [row | {"event_timestamp": now - 30, "income": 7.0 + row["customer_id"]} for row in customers(seed=9)[:20]]
    path = workdir / "customers2.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    service = start(workdir, "features.yaml", "--parity-sample-rate", "1")
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            get(stub, [2, 3])
            wait_checked(stub, 2)
            stub.Materialize(pb.MaterializeRequest(feature_view="customer", source_uri=str(path)), timeout=60)
            answer = get(stub, list(range(1, 20)))
            assert [v.double_value for v in answer.columns[0].values] == [8.0 + i for i in range(19)]
            counts = wait_checked(stub, 21)
            assert summary(counts)["customer:income"] == (21, 0, 0)
            assert summary(counts)["customer:history"] == (21, 0, 0)
            # Without imputation a null is served as null: the offline side then takes the raw value too.
            nulls = [i for i in range(20, 30) if customers(seed=5)[i]["income"] is None]
            assert nulls
            request = pb.GetFeaturesRequest(
                entity_keys=customer_keys(nulls), feature_refs=["customer:income"], disable_imputation=True
            )
            assert [v.WhichOneof("kind") for v in stub.GetFeatures(request, timeout=30).columns[0].values] == [
                None
            ] * len(nulls)
            deadline = time.monotonic() + 60
            while parity(stub, ["customer:income"])["customer:income"].checked < 21 + len(nulls):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert summary(parity(stub, ["customer:income"])) == {"customer:income": (21 + len(nulls), 0, 0)}
    finally:
        assert service.stop() == 0


def test_offline_definitions_must_define_every_served_feature(workdir) -> None:
    (workdir / "partial.yaml").write_text(DEFINITIONS.replace("      - {name: note, type: string}\n", ""))
    args = [
        "--definitions",
        str(workdir / "features.yaml"),
        "--parity-offline-definitions",
        str(workdir / "partial.yaml"),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "feature_service", *args, "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "partial.yaml: view 'customer' lacks served feature(s) ['note']" in done.stderr
