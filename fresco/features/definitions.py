"""Feature definitions: entities, feature views and their features, read from YAML and validated
with errors that name the place in the file. Shared by the feature service and by training code."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chassis.errors import InvalidArgument, invalid_config

ValueType = Literal[
    "double", "float", "int64", "int32", "string", "bool", "bytes",
    "double_list", "float_list", "int64_list", "int32_list", "string_list",
]  # fmt: skip
Strategy = Literal["keep_null", "default_value", "mean", "median", "most_frequent", "reject"]

NUMERIC_TYPES = frozenset({"double", "float", "int64", "int32"})
INTEGER_TYPES = frozenset({"int64", "int32"})
LIST_TYPES = frozenset({"double_list", "float_list", "int64_list", "int32_list", "string_list"})
JOIN_KEY_TYPES = frozenset({"int64", "int32", "string", "bytes"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JoinKey(_Strict):
    """One join key of an entity."""

    name: str
    type: ValueType = "string"

    @field_validator("type")
    @classmethod
    def _keyable(cls, value: str) -> str:
        if value not in JOIN_KEY_TYPES:
            raise ValueError(f"join keys must be one of {sorted(JOIN_KEY_TYPES)}, got {value}")
        return value


class Entity(_Strict):
    """A kind of thing features describe (a user, a driver), identified by its join keys."""

    name: str
    description: str = ""
    join_keys: tuple[JoinKey, ...]


class NullPolicy(_Strict):
    """What a null becomes, online and offline alike."""

    strategy: Strategy = "keep_null"
    default: float | int | str | bool | None = None

    @model_validator(mode="after")
    def _default_given(self) -> NullPolicy:
        if self.strategy == "default_value" and self.default is None:
            raise ValueError("strategy default_value needs a `default`")
        return self


class Range(_Strict):
    """Allowed numeric range, inclusive; either side may be open."""

    min: float | None = None
    max: float | None = None


class Feature(_Strict):
    """One feature of a view."""

    name: str
    type: ValueType
    description: str = ""
    null_policy: NullPolicy = Field(default_factory=NullPolicy)
    range: Range | None = None
    categories: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _constraints_fit_type(self) -> Feature:
        if self.range is not None and self.type not in NUMERIC_TYPES:
            raise ValueError(f"feature {self.name}: a range needs a numeric type, not {self.type}")
        if self.categories is not None and self.type != "string":
            raise ValueError(f"feature {self.name}: categories need type string, not {self.type}")
        if self.null_policy.strategy in ("mean", "median") and self.type not in NUMERIC_TYPES:
            raise ValueError(f"feature {self.name}: {self.null_policy.strategy} imputation needs a numeric type")
        if self.null_policy.strategy == "default_value":
            from fresco.features.policy import check_value  # the same check pushes get

            problem = check_value(self, self.null_policy.default)
            if problem is not None:
                raise ValueError(f"feature {self.name}: default {self.null_policy.default!r}: {problem.expected}")
        return self


class FeatureView(_Strict):
    """Features of one entity (or several), stored and expired together."""

    name: str
    description: str = ""
    entities: tuple[str, ...]
    features: tuple[Feature, ...]
    ttl_seconds: float = Field(default=0, ge=0, description="Age past which values are EXPIRED; 0 never expires.")
    online_backend: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def ttl(self) -> timedelta | None:
        return timedelta(seconds=self.ttl_seconds) if self.ttl_seconds else None

    def feature(self, name: str) -> Feature | None:
        """A feature of the view by name."""
        return next((f for f in self.features if f.name == name), None)

    @model_validator(mode="after")
    def _unique_features(self) -> FeatureView:
        names = [f.name for f in self.features]
        if duplicates := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"view {self.name}: features named twice: {duplicates}")
        return self


class Definitions(_Strict):
    """A whole definitions file."""

    entities: tuple[Entity, ...]
    feature_views: tuple[FeatureView, ...]

    @model_validator(mode="after")
    def _references_resolve(self) -> Definitions:
        known = {e.name for e in self.entities}
        for view in self.feature_views:
            if missing := [e for e in view.entities if e not in known]:
                raise ValueError(f"view {view.name}: unknown entities {missing}; defined: {sorted(known)}")
        views = [v.name for v in self.feature_views]
        if duplicates := sorted({n for n in views if views.count(n) > 1}):
            raise ValueError(f"feature views named twice: {duplicates}")
        return self

    def view(self, name: str) -> FeatureView | None:
        """A view by name."""
        return next((v for v in self.feature_views if v.name == name), None)

    def join_keys(self, view: FeatureView) -> tuple[JoinKey, ...]:
        """Every join key of a view's entities, in order."""
        by_name = {e.name: e for e in self.entities}
        return tuple(key for entity in view.entities for key in by_name[entity].join_keys)


def parse_definitions(text: str, source: str = "definitions") -> Definitions:
    """Definitions from YAML text; errors name the source and the path of the bad field."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise InvalidArgument(f"{source}: not valid YAML: {err}") from None
    try:
        return Definitions.model_validate(raw)
    except ValidationError as err:
        raise invalid_config(source, err) from None


def load_definitions(path: Path) -> Definitions:
    """Definitions from a YAML file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise InvalidArgument(f"{path}: cannot read definitions: {err.strerror}") from None
    return parse_definitions(text, str(path))
