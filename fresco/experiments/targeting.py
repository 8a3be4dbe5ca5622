"""Targeting: whether a request's attributes satisfy an experiment's conditions (all must hold)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fresco.api.common.v1 import values_pb2
from fresco.api.experiments.v1 import experiment_pb2 as xpb

Scalar = float | int | str | bool | bytes | tuple[object, ...] | None

_SINGLE = {
    xpb.CONDITION_OPERATOR_EQUALS,
    xpb.CONDITION_OPERATOR_NOT_EQUALS,
    xpb.CONDITION_OPERATOR_GREATER_THAN,
    xpb.CONDITION_OPERATOR_GREATER_OR_EQUAL,
    xpb.CONDITION_OPERATOR_LESS_THAN,
    xpb.CONDITION_OPERATOR_LESS_OR_EQUAL,
}
_ORDERED = {
    xpb.CONDITION_OPERATOR_GREATER_THAN,
    xpb.CONDITION_OPERATOR_GREATER_OR_EQUAL,
    xpb.CONDITION_OPERATOR_LESS_THAN,
    xpb.CONDITION_OPERATOR_LESS_OR_EQUAL,
}
_SETS = {xpb.CONDITION_OPERATOR_IN, xpb.CONDITION_OPERATOR_NOT_IN}
_PRESENCE = {xpb.CONDITION_OPERATOR_EXISTS, xpb.CONDITION_OPERATOR_NOT_EXISTS}


def scalar(value: values_pb2.Value) -> Scalar:
    """The Python value of a Value; ints and doubles compare as numbers, lists as tuples, unset as None."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind in ("double_list", "int64_list", "string_list"):
        return tuple(getattr(value, kind).values)
    result: Scalar = getattr(value, kind)
    return result


def _number(value: Scalar) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _equal(a: Scalar, b: Scalar) -> bool:
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    return type(a) is type(b) and a == b


def matches(conditions: Sequence[xpb.TargetingCondition], attributes: Mapping[str, values_pb2.Value]) -> bool:
    """Whether every condition holds for `attributes` (an attribute holding an unset Value counts as absent)."""
    for condition in conditions:
        raw = attributes.get(condition.attribute)
        value = scalar(raw) if raw is not None else None
        if not _holds(condition, value):
            return False
    return True


def _holds(condition: xpb.TargetingCondition, value: Scalar) -> bool:
    op = condition.operator
    if op == xpb.CONDITION_OPERATOR_EXISTS:
        return value is not None
    if op == xpb.CONDITION_OPERATOR_NOT_EXISTS:
        return value is None
    if value is None:
        return False  # every other operator needs the attribute, NOT_EQUALS and NOT_IN included
    operands = [scalar(v) for v in condition.values]
    if op == xpb.CONDITION_OPERATOR_EQUALS:
        return _equal(value, operands[0])
    if op == xpb.CONDITION_OPERATOR_NOT_EQUALS:
        return not _equal(value, operands[0])
    if op == xpb.CONDITION_OPERATOR_IN:
        return any(_equal(value, o) for o in operands)
    if op == xpb.CONDITION_OPERATOR_NOT_IN:
        return not any(_equal(value, o) for o in operands)
    left, right = _number(value), _number(operands[0])
    if left is None or right is None:
        return False
    if op == xpb.CONDITION_OPERATOR_GREATER_THAN:
        return left > right
    if op == xpb.CONDITION_OPERATOR_GREATER_OR_EQUAL:
        return left >= right
    if op == xpb.CONDITION_OPERATOR_LESS_THAN:
        return left < right
    return left <= right  # LESS_OR_EQUAL: `problems` refuses any other operator


def problems(conditions: Sequence[xpb.TargetingCondition], field: str = "targeting") -> list[str]:
    """What is wrong with the conditions, one message per problem naming the field; empty when they are valid."""
    out: list[str] = []
    for i, condition in enumerate(conditions):
        here = f"{field}[{i}]"
        if not condition.attribute:
            out.append(f"{here}.attribute: expected an attribute name, got an empty string")
        op, count = condition.operator, len(condition.values)
        name = xpb.ConditionOperator.Name(op) if op in xpb.ConditionOperator.values() else str(op)
        if op in _PRESENCE:
            if count:
                out.append(f"{here}.values: expected no values for {name}, got {count}")
        elif op in _SINGLE:
            if count != 1:
                out.append(f"{here}.values: expected exactly one value for {name}, got {count}")
            elif op in _ORDERED and _number(scalar(condition.values[0])) is None:
                out.append(f"{here}.values[0]: expected a number for {name}")
        elif op in _SETS:
            if not count:
                out.append(f"{here}.values: expected at least one value for {name}")
        else:
            out.append(f"{here}.operator: expected one of EQUALS .. NOT_EXISTS, got {op}")
        for j, value in enumerate(condition.values):
            if value.WhichOneof("kind") is None and op not in _PRESENCE:
                out.append(f"{here}.values[{j}]: expected a value, got an unset Value")
    return out
