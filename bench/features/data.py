"""The benchmark's data and definitions: two feature views of one entity (user_id int64), 20 features each,
as one Parquet file per view that both Fresco and Feast load; Fresco's definitions YAML and Feast's
repository (feature_store.yaml and a definitions module) describing the same views."""

from __future__ import annotations

import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

ENTITY = "user"
JOIN_KEY = "user_id"
PROJECT = "fresco_bench"
UNKNOWN_BASE = 1_000_000_000
"""Entities from here on are never written: the unknown-entity cases read them."""


@dataclass(frozen=True)
class View:
    """One feature view: its name and (feature, type) pairs, type "double" or "int64"."""

    name: str
    features: tuple[tuple[str, str], ...]

    def refs(self) -> list[str]:
        return [f"{self.name}:{feature}" for feature, _ in self.features]


VIEWS = (
    View("user_stats", tuple((f"s{i:02d}", "double") for i in range(20))),
    View(
        "user_activity",
        tuple((f"c{i:02d}", "int64") for i in range(10)) + tuple((f"a{i:02d}", "double") for i in range(10)),
    ),
)
REFS = [ref for view in VIEWS for ref in view.refs()]
"""Every feature of both views: the 40 refs each 40-feature read asks for, in this order."""


@dataclass(frozen=True)
class Dataset:
    """The generated data: per view, its Parquet file and its feature columns (for checking answers)."""

    entities: int
    files: dict[str, Path]
    columns: dict[str, dict[str, np.ndarray]]
    oldest_s: float
    newest_s: float

    def expected(self, ref: str, user_id: int) -> float | int:
        """The value a read of `ref` for a known entity must answer."""
        view, _, feature = ref.partition(":")
        value = self.columns[view][feature][user_id]
        return int(value) if value.dtype.kind == "i" else float(value)


def generate(directory: Path, entities: int, seed: int = 7) -> Dataset:
    """One Parquet file per view: user_id 0..entities-1, event times within the last day, random values
    (doubles from a normal distribution, int64 counts in 0..999)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    now = time.time()
    ids = np.arange(entities, dtype=np.int64)
    # Microsecond event times an hour to a day old: within Fresco's and Feast's windows, never in the future.
    event_us = ((now - 3600 - rng.uniform(0, 82_800, entities)) * 1e6).astype(np.int64)
    files: dict[str, Path] = {}
    columns: dict[str, dict[str, np.ndarray]] = {}
    for view in VIEWS:
        values: dict[str, np.ndarray] = {}
        for feature, kind in view.features:
            values[feature] = (
                rng.integers(0, 1000, entities, dtype=np.int64) if kind == "int64" else rng.normal(0, 1, entities)
            )
        table = pa.table(
            {
                JOIN_KEY: pa.array(ids, pa.int64()),
                "event_timestamp": pa.array(event_us, pa.timestamp("us", tz="UTC")),
                **{name: pa.array(column) for name, column in values.items()},
            }
        )
        path = directory / f"{view.name}.parquet"
        pq.write_table(table, path)
        files[view.name] = path
        columns[view.name] = values
    return Dataset(entities, files, columns, float(event_us.min()) / 1e6, float(event_us.max()) / 1e6)


def fresco_definitions() -> str:
    """Fresco's definitions YAML for the two views (never expiring, nulls kept as null)."""
    lines = [
        "entities:",
        f"  - name: {ENTITY}",
        f"    join_keys: [{{name: {JOIN_KEY}, type: int64}}]",
        "feature_views:",
    ]
    for view in VIEWS:
        lines += [f"  - name: {view.name}", f"    entities: [{ENTITY}]", "    ttl_seconds: 0", "    features:"]
        lines += [f"      - {{name: {feature}, type: {kind}}}" for feature, kind in view.features]
    return "\n".join(lines) + "\n"


def write_feast_repo(directory: Path, dataset: Dataset, redis_host: str, redis_port: int, redis_db: int) -> Path:
    """A Feast repository: feature_store.yaml (Redis online store, file offline store, local registry cached
    forever as Feast advises for serving, so no read waits for a registry refresh) and definitions.py with
    the entity, a FileSource per Parquet file and a FeatureView per view."""
    if directory.exists():
        shutil.rmtree(directory)
    (directory / "data").mkdir(parents=True)
    (directory / "feature_store.yaml").write_text(
        textwrap.dedent(
            f"""\
            project: {PROJECT}
            registry:
              path: data/registry.db
              cache_ttl_seconds: 0
            provider: local
            online_store:
              type: redis
              connection_string: "{redis_host}:{redis_port},db={redis_db}"
            offline_store:
              type: file
            entity_key_serialization_version: 3
            """
        )
    )
    types = {"double": "Float64", "int64": "Int64"}
    views = []
    for view in VIEWS:
        fields = "\n".join(f'        Field(name="{feature}", dtype={types[kind]}),' for feature, kind in view.features)
        views.append(
            f"{view.name}_source = FileSource(\n"
            f'    name="{view.name}_source",\n'
            f'    path="{dataset.files[view.name].resolve()}",\n'
            '    timestamp_field="event_timestamp",\n'
            ")\n\n"
            f"{view.name} = FeatureView(\n"
            f'    name="{view.name}",\n'
            f"    entities=[{ENTITY}],\n"
            "    ttl=timedelta(0),\n"
            "    schema=[\n"
            f"{fields}\n"
            "    ],\n"
            "    online=True,\n"
            f"    source={view.name}_source,\n"
            ")\n"
        )
    (directory / "definitions.py").write_text(
        '"""The benchmark\'s feature views, as Feast definitions (written by bench/features/data.py)."""\n\n'
        "from datetime import timedelta\n\n"
        "from feast import Entity, FeatureView, Field, FileSource, ValueType\n"
        "from feast.types import Float64, Int64\n\n"
        f'{ENTITY} = Entity(name="{ENTITY}", join_keys=["{JOIN_KEY}"], value_type=ValueType.INT64)\n\n'
        + "\n".join(views)
    )
    return directory
