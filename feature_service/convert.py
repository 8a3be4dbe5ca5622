"""Proto ↔ Python: values and entity keys, feature views, statistics, and the fast encoder of the
columns GetFeatures answers with."""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack
import numpy as np
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from fresco.api.common.v1 import values_pb2
from fresco.api.features.v1 import feature_view_pb2 as vpb
from fresco.api.features.v1 import statistics_pb2 as spb
from fresco.client import from_value as from_value  # the one conversion, shared with the client and the gateway
from fresco.features.definitions import Definitions, FeatureView, JoinKey
from fresco.features.policy import INT32_RANGE, Baseline
from fresco.features.statistics import FeatureSummary

VALUE_TYPES: dict[str, vpb.ValueType.ValueType] = {
    name: vpb.ValueType.Value(f"VALUE_TYPE_{name.upper()}")
    for name in (
        "double", "float", "int64", "int32", "string", "bool", "bytes",
        "double_list", "float_list", "int64_list", "int32_list", "string_list",
    )
}  # fmt: skip
STRATEGIES: dict[str, vpb.ImputationStrategy.ValueType] = {
    name: vpb.ImputationStrategy.Value(f"IMPUTATION_STRATEGY_{name.upper()}")
    for name in ("keep_null", "default_value", "mean", "median", "most_frequent", "reject")
}
# The Value field each declared join-key type travels in.
KEY_FIELDS = {"int64": "int64_value", "int32": "int64_value", "string": "string_value", "bytes": "bytes_value"}


# --- values ------------------------------------------------------------------------------------


def to_value(value: Any, value_type: str | None = None) -> values_pb2.Value:
    """A Value for a Python value, in the field its declared type travels in (or by its Python type)."""
    if value is None:
        return values_pb2.Value()
    if isinstance(value, bool):
        return values_pb2.Value(bool_value=value)
    if isinstance(value, int) and value_type not in ("double", "float"):
        return values_pb2.Value(int64_value=value)
    if isinstance(value, (int, float)):
        return values_pb2.Value(double_value=float(value))
    if isinstance(value, str):
        return values_pb2.Value(string_value=value)
    if isinstance(value, bytes):
        return values_pb2.Value(bytes_value=value)
    items = list(value)
    if value_type in ("double_list", "float_list") or any(isinstance(v, float) for v in items):
        return values_pb2.Value(double_list=values_pb2.DoubleList(values=[float(v) for v in items]))
    if value_type == "string_list" or any(isinstance(v, str) for v in items):
        return values_pb2.Value(string_list=values_pb2.StringList(values=[str(v) for v in items]))
    return values_pb2.Value(int64_list=values_pb2.Int64List(values=items))


def normalize(value_type: str, value: Any) -> Any:
    """A value that passed its type check, stored in its type's one Python form (ints of a float feature
    become floats), so pushes, materialisation and training all store and see the same thing."""
    if value is None:
        return None
    if value_type in ("double", "float"):
        return float(value)
    if value_type in ("double_list", "float_list"):
        return [float(v) for v in value]
    if value_type.endswith("_list"):
        return list(value)
    return value


def describe(value: values_pb2.Value) -> str:
    """A short description of a Value for error messages, e.g. `string_value "abc"`."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return "null"
    text = repr(from_value(value))
    return f"{kind} {text[:40]}{'...' if len(text) > 40 else ''}"


@dataclass(frozen=True)
class KeyProblem:
    """Why an entity key does not identify an entity of a view."""

    key: str
    missing: bool
    expected: str
    actual: str


def key_value(key: JoinKey, value: values_pb2.Value | None) -> Any:
    """The Python value of one join key, or a KeyProblem saying why it is missing or mistyped."""
    expected = f"{key.type} in Value.{KEY_FIELDS[key.type]}"
    kind = None if value is None else value.WhichOneof("kind")
    if value is None or kind is None:
        return KeyProblem(key.name, True, expected, "missing" if value is None else "null")
    if kind != KEY_FIELDS[key.type]:
        return KeyProblem(key.name, False, expected, describe(value))
    result = getattr(value, kind)
    if key.type == "int32" and not INT32_RANGE[0] <= result <= INT32_RANGE[1]:
        return KeyProblem(key.name, False, f"{expected} within int32", str(result))
    return result


def entity_values(join_keys: Sequence[JoinKey], entity: values_pb2.EntityKey) -> list[Any] | KeyProblem:
    """The join-key values of an entity in the view's key order, or the first problem with them."""
    given = entity.join_keys
    values = []
    for key in join_keys:
        value = key_value(key, given.get(key.name))
        if isinstance(value, KeyProblem):
            return value
        values.append(value)
    return values


# --- time ----------------------------------------------------------------------------------------


def seconds_of(ts: Timestamp) -> float:
    """Seconds since the epoch of a Timestamp."""
    return ts.seconds + ts.nanos / 1e9


def timestamp_of(seconds: float) -> Timestamp:
    """A Timestamp for seconds since the epoch (microsecond precision, as records keep them)."""
    whole = math.floor(seconds)
    return Timestamp(seconds=whole, nanos=round((seconds - whole) * 1e6) * 1000)


def duration_of(seconds: float) -> Duration:
    whole = math.floor(seconds)
    return Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


# --- the GetFeatures columns, encoded by hand ------------------------------------------------------
# Building 4,000 Value messages one by one costs milliseconds of Python; the wire form of scalar
# Values is simple enough to write directly (a few hundred µs), and the service sends those bytes as they are.
# tests/feature_service/test_reader.py checks it against messages built the slow way.

_PACK_DOUBLE = struct.Struct("<d").pack
_NULL_ENTRY = b"\x12\x00"  # FeatureColumn.values (field 2) holding an empty Value: null
_DOUBLE_ENTRY = np.dtype([("head", "S3"), ("value", "<f8")])
_NUMPY_FROM = 16  # doubles in a column from which numpy's packing beats encoding them one by one


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=1 << 16)  # feature integers repeat (counts, ids, codes): encode each once
def _entry_int(x: int) -> bytes:
    body = b"\x10" + _varint(x if x >= 0 else x + (1 << 64))
    return b"\x12" + bytes([len(body)]) + body


_BOOL_ENTRIES = {True: b"\x12\x02\x20\x01", False: b"\x12\x02\x20\x00"}


def _entry_double(x: Any) -> bytes:
    return b"\x12\x09\x09" + _PACK_DOUBLE(x)


def _entry_str(x: Any) -> bytes:
    data: bytes = x.encode()
    n = len(data)
    if n < 126:  # both lengths fit one byte
        return bytes((0x12, n + 2, 0x1A, n)) + data
    return _field(b"\x12", _field(b"\x1a", data))


def _entry_bytes(x: Any) -> bytes:
    return _field(b"\x12", _field(b"\x2a", x))


def _entry_bool(x: Any) -> bytes:
    return _BOOL_ENTRIES[x]


def _entry_any(x: Any, value_type: str | None = None) -> bytes:
    return _field(b"\x12", to_value(x, value_type).SerializeToString())


_ENTRY: dict[str, tuple[Callable[[Any], bytes], tuple[type, ...]]] = {
    "double": (_entry_double, (float, int)),
    "float": (_entry_double, (float, int)),
    "int64": (_entry_int, (int,)),
    "int32": (_entry_int, (int,)),
    "string": (_entry_str, (str,)),
    "bytes": (_entry_bytes, (bytes,)),
    "bool": (_entry_bool, (bool,)),
}


def encode_values(value_type: str, values: Sequence[Any]) -> bytes:
    """The `values` field of a FeatureColumn holding `values` (None is null), as wire bytes."""
    if value_type in ("double", "float") and len(values) >= _NUMPY_FROM and None not in values:
        try:  # the common case: a dense numeric column, packed by numpy in one go
            array = np.empty(len(values), _DOUBLE_ENTRY)
            array["head"] = b"\x12\x09\x09"
            array["value"] = values
            return array.tobytes()
        except (TypeError, ValueError):
            pass
    entry, kinds = _ENTRY.get(value_type, (_entry_any, ()))
    if len(values) == 1:  # one entity: no list to join
        x = values[0]
        return _NULL_ENTRY if x is None else entry(x) if type(x) in kinds else _entry_any(x, value_type)
    # Exact type checks: a bool is not taken for an int, and anything unexpected goes the slow, general way.
    return b"".join(
        [_NULL_ENTRY if x is None else entry(x) if type(x) in kinds else _entry_any(x, value_type) for x in values]
    )


def encode_timestamps(seconds: Sequence[float | None]) -> bytes:
    """The `event_timestamps` field of a FeatureColumn (epoch 0 where there is none), as wire bytes."""
    return b"".join(_field(b"\x22", timestamp_of(s or 0.0).SerializeToString()) for s in seconds)


@functools.lru_cache(maxsize=1 << 14)  # callers ask for the same refs again and again
def _ref_field(ref: str) -> bytes:
    return _field(b"\x0a", ref.encode())


@functools.lru_cache(maxsize=64)
def _tier_field(served_tier: str) -> bytes:
    return _field(b"\x2a", served_tier.encode()) if served_tier else b""


def encode_column(ref: str, values: bytes, statuses: Sequence[int], timestamps: bytes, served_tier: str) -> bytes:
    """One FeatureColumn as a `columns` entry of GetFeaturesResponse, from its encoded parts."""
    body = b"".join(
        (
            _ref_field(ref),
            values,
            _field(b"\x1a", bytes(statuses)) if statuses else b"",  # packed enum; every status is < 128
            timestamps,
            _tier_field(served_tier),
        )
    )
    return b"\x12" + _varint(len(body)) + body


@functools.lru_cache(maxsize=1024)  # callers repeat their lists of refs
def _refs_fields(refs: tuple[str, ...]) -> bytes:
    return b"".join([_field(b"\x0a", ref.encode()) for ref in refs])


def encode_metadata(
    refs: tuple[str, ...], degraded: bool, served_tiers: Sequence[str], failed_tiers: Sequence[str]
) -> bytes:
    """A GetFeaturesMetadata's wire form."""
    return b"".join(
        (
            _refs_fields(refs),
            b"\x10\x01" if degraded else b"",
            *[_field(b"\x1a", tier.encode()) for tier in served_tiers],
            *[_field(b"\x22", tier.encode()) for tier in failed_tiers],
        )
    )


def encode_response(metadata: bytes, columns: Sequence[bytes]) -> bytes:
    """The wire form of the GetFeaturesResponse of an encoded GetFeaturesMetadata and encoded columns: what the
    service sends as it is (see service.add_to_server), so an answer is serialised once and never parsed on the
    server."""
    return b"".join((b"\x0a", _varint(len(metadata)), metadata, *columns))


# --- feature views ---------------------------------------------------------------------------------


def view_to_proto(
    definitions: Definitions,
    view: FeatureView,
    statistics: spb.FeatureViewStatistics | None = None,
    updated_at: float | None = None,
) -> vpb.FeatureView:
    """A feature view definition as the API shows it."""
    by_name = {e.name: e for e in definitions.entities}
    message = vpb.FeatureView(
        name=view.name,
        description=view.description,
        online_backend=view.online_backend,
        labels=view.labels,
        entities=[
            vpb.Entity(
                name=entity.name,
                description=entity.description,
                join_keys=[vpb.JoinKey(name=k.name, value_type=VALUE_TYPES[k.type]) for k in entity.join_keys],
            )
            for entity in (by_name[name] for name in view.entities)
        ],
    )
    for feature in view.features:
        policy = vpb.NullPolicy(strategy=STRATEGIES[feature.null_policy.strategy])
        if feature.null_policy.default is not None:
            policy.default_value.CopyFrom(to_value(feature.null_policy.default, feature.type))
        out = message.features.add(
            name=feature.name,
            description=feature.description,
            value_type=VALUE_TYPES[feature.type],
            null_policy=policy,
        )
        if feature.range is not None:
            if feature.range.min is not None:
                out.constraint.range.min = feature.range.min
            if feature.range.max is not None:
                out.constraint.range.max = feature.range.max
            out.constraint.range.SetInParent()
        if feature.categories is not None:
            out.constraint.categories.values.extend(feature.categories)
            out.constraint.categories.SetInParent()
    if view.ttl_seconds:
        message.ttl.CopyFrom(duration_of(view.ttl_seconds))
    if statistics is not None:
        message.latest_statistics.CopyFrom(statistics)
    if updated_at is not None:
        message.updated_at.CopyFrom(timestamp_of(updated_at))
    return message


# --- statistics ----------------------------------------------------------------------------------


def summary_to_proto(summary: FeatureSummary) -> spb.FeatureStatistics:
    """One feature's summary as FeatureStatistics."""
    out = spb.FeatureStatistics(
        feature_name=summary.name, count=summary.count, null_count=summary.null_count, null_rate=summary.null_rate
    )
    if (numeric := summary.numeric) is not None:
        out.numeric.CopyFrom(
            spb.NumericStatistics(
                mean=numeric.mean,
                stddev=numeric.std,
                min=numeric.min,
                max=numeric.max,
                percentiles=[spb.Percentile(quantile=q, value=v) for q, v in sorted(numeric.percentiles.items())],
                # numpy gives the lower edge of the first bucket too; the proto keeps upper bounds only,
                # and its last bucket counts values above the final bound (none here).
                histogram=spb.Histogram(
                    bucket_bounds=numeric.bucket_bounds[1:], bucket_counts=[*numeric.bucket_counts, 0]
                ),
            )
        )
    if (categorical := summary.categorical) is not None:
        out.categorical.CopyFrom(
            spb.CategoricalStatistics(
                distinct_count=categorical.distinct_count,
                top_categories=[spb.CategoryCount(value=v, count=n, fraction=f) for v, n, f in categorical.top],
            )
        )
    return out


def encode_statistics(
    statistics: spb.FeatureViewStatistics, modes: Mapping[str, Any], sources: Sequence[Mapping[str, Any]] = ()
) -> bytes:
    """What the durable tier keeps: the statistics and each feature's typed most frequent value
    (the proto's categories are strings and numbers have no mode; imputation needs the real value), and the
    files the view was materialised from (see feature_service.sources)."""
    raw = {"statistics": statistics.SerializeToString(), "modes": dict(modes), "sources": [dict(s) for s in sources]}
    data: bytes = msgpack.packb(raw, use_bin_type=True)
    return data


def decode_sources(data: bytes) -> list[dict[str, Any]]:
    """The materialised files recorded with stored statistics (none in blobs written before they were)."""
    raw = msgpack.unpackb(data, raw=False)
    return list(raw.get("sources", []))


def decode_statistics(data: bytes) -> tuple[spb.FeatureViewStatistics, dict[str, Baseline]]:
    """Stored statistics and the baselines imputation draws on (as fresco.features.statistics.baselines)."""
    raw = msgpack.unpackb(data, raw=False)
    statistics = spb.FeatureViewStatistics.FromString(raw["statistics"])
    modes = raw["modes"]
    result = {}
    for feature in statistics.features:
        numeric = feature.numeric if feature.HasField("numeric") else None
        median = next((p.value for p in numeric.percentiles if p.quantile == 0.5), None) if numeric else None
        result[feature.feature_name] = Baseline(
            mean=numeric.mean if numeric else None, median=median, most_frequent=modes.get(feature.feature_name)
        )
    return statistics, result


def utc(seconds: float) -> str:
    """An ISO-8601 UTC time for messages."""
    return datetime.fromtimestamp(seconds, UTC).isoformat()
