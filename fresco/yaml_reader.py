"""A strict reader of YAML mappings for the CLI's declarative files: typed fields, unknown fields rejected, and
every problem reported with its YAML path (e.g. "models[0].strategy.canary.steps[1].wieght: unknown field")."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from google.protobuf import duration_pb2

T = TypeVar("T")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class Reader:
    """Reads one YAML mapping at `path`, collecting problems in `problems` instead of stopping at the first."""

    def __init__(self, value: object, path: str, problems: list[str], fields: tuple[str, ...]) -> None:
        self.path, self.problems = path, problems
        self.data: Mapping[str, Any] = {}
        if not isinstance(value, Mapping):
            self.problem(path, f"expected a mapping, got {_kind(value)}")
            return
        self.data = value
        for key in value:
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.problem(self.at(str(key)), f"unknown field{hint}; expected one of {', '.join(sorted(fields))}")

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def problem(self, path: str, text: str) -> None:
        self.problems.append(f"{path or 'document'}: {text}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(
        self, key: str, check: Callable[[object], T | None], expected: str, default: T, required: bool = False
    ) -> T:
        """The field converted by `check` (None when it does not fit), else `default` with a problem recorded."""
        value = self.data.get(key)
        if value is None:
            if required:
                self.problem(self.at(key), f"required; expected {expected}")
            return default
        converted = check(value)
        if converted is None:
            self.problem(self.at(key), f"expected {expected}, got {_shown(value)}")
            return default
        return converted

    def text(self, key: str, required: bool = False) -> str:
        return self.get(
            key, lambda v: v if isinstance(v, str) and v.strip() else None, "a non-empty string", "", required
        )

    def integer(self, key: str, minimum: int = 0, required: bool = False) -> int:
        def check(value: object) -> int | None:
            return value if isinstance(value, int) and not isinstance(value, bool) and value >= minimum else None

        return self.get(key, check, f"an integer >= {minimum}", 0, required)

    def number(self, key: str, low: float = 0.0, high: float = math.inf) -> float | None:
        def check(value: object) -> float | None:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high
            return float(value) if ok else None  # type: ignore[arg-type]

        if math.isfinite(high):
            bound = f" in [{num(low)}, {num(high)}]"
        else:
            bound = f" >= {num(low)}" if math.isfinite(low) else ""
        return self.get(key, check, f"a number{bound}", None) if self.has(key) else None

    def flag(self, key: str) -> bool:
        return self.get(key, lambda v: v if isinstance(v, bool) else None, "true or false", False)

    def duration(self, key: str) -> duration_pb2.Duration | None:
        if not self.has(key):
            return None
        seconds = self.get(key, _seconds, 'a duration such as "30s", "5m", "1h", "14d", "500ms" or seconds >= 0', None)
        if seconds is None:
            return None
        out = duration_pb2.Duration()
        out.FromNanoseconds(round(seconds * 1e9))
        return out

    def labels(self, key: str) -> dict[str, str]:
        def text(v: object) -> str | None:
            return str(v) if isinstance(v, str | int | float) and not isinstance(v, bool) else None

        return self.get(key, lambda v: mapping_of(v, text), "a mapping of names to strings", {})

    def numbers(self, key: str) -> dict[str, float]:
        def finite(v: object) -> float | None:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            return float(v) if ok else None  # type: ignore[arg-type]

        return self.get(key, lambda v: mapping_of(v, finite), "a mapping of names to finite numbers", {})

    def child(self, key: str, fields: tuple[str, ...]) -> Reader | None:
        return Reader(self.data[key], self.at(key), self.problems, fields) if self.has(key) else None

    def items(self, key: str, required: bool = False) -> list[tuple[str, object]]:
        """The (path, item) pairs of a list field."""
        value = self.data.get(key)
        if value is None:
            if required:
                self.problem(self.at(key), "required; expected a list")
            return []
        if not isinstance(value, list):
            self.problem(self.at(key), f"expected a list, got {_kind(value)}")
            return []
        return [(f"{self.at(key)}[{i}]", item) for i, item in enumerate(value)]


def mapping_of(value: object, check: Callable[[object], T | None]) -> dict[str, T] | None:
    """`value` as a mapping of strings to checked values, or None if a key or a value does not fit."""
    if not isinstance(value, Mapping):
        return None
    out = {}
    for key, item in value.items():
        checked = check(item)
        if not isinstance(key, str) or checked is None:
            return None
        out[key] = checked
    return out


def _seconds(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if value >= 0 and math.isfinite(value) else None
    if isinstance(value, str) and (match := _DURATION.match(value.strip())):
        return float(match.group(1)) * _UNIT_S[match.group(2)]
    return None


def _kind(value: object) -> str:
    kinds = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}
    return kinds.get(type(value), type(value).__name__)


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str | int | float | bool) else _kind(value)


def num(value: float) -> str:
    return f"{value:g}"
