"""Prometheus alerting rules read from rule files (`--alert-rules`): each alert's name, expression, `for:` duration,
severity and the metric names its expression reads, for the monitoring part of a model family's safety score."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from fresco.yaml_reader import Reader

GROUP_FIELDS = ("name", "interval", "limit", "query_offset", "rules")
RULE_FIELDS = ("alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations")
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31536000.0}
# PromQL words that look like identifiers but name no metric.
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
     "inf", "nan", "start", "end"}
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")


class AlertRulesError(ValueError):
    """A rule file that cannot be read; the message names the file and each problem's YAML path."""


@dataclass(frozen=True)
class AlertRule:
    """One alerting rule: `for_s` is its `for:` in seconds (0 when absent), `metrics` the metric names `expr` reads."""

    name: str
    expr: str
    for_s: float
    severity: str
    metrics: frozenset[str]


def duration_s(text: str) -> float | None:
    """A Prometheus duration ("90s", "1h30m", "500ms") in seconds; None when it is not one."""
    text = text.strip()
    if not text or _DURATION_PART.sub("", text):
        return None
    return sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))


def metric_names(expr: str) -> frozenset[str]:
    """The metric names a PromQL expression selects: bare identifiers that are not functions, keywords or label
    names, plus `__name__="..."` matchers."""
    names = set(_NAME_MATCHER.findall(expr))
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)  # label matchers
    text = _BRACKETS.sub(" ", text)  # range and subquery durations
    text = _LABEL_LIST.sub(" ", text)  # by (...), on (...), group_left (...)
    for match in _IDENTIFIER.finditer(text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return frozenset(names)


def parse(document: object, source: str) -> list[AlertRule]:
    """The alerting rules of one loaded rule file (recording rules are skipped); AlertRulesError lists problems."""
    problems: list[str] = []
    top = Reader(document, "", problems, ("groups",))
    rules: list[AlertRule] = []
    for where, item in top.items("groups", required=True):
        group = Reader(item, where, problems, GROUP_FIELDS)
        group.text("name", required=True)
        for rule_where, raw in group.items("rules"):
            rule = Reader(raw, rule_where, problems, RULE_FIELDS)
            if not rule.has("alert"):
                if not rule.has("record"):
                    rule.problem(rule.at("alert"), "required (or record, for a recording rule)")
                continue
            name, expr = rule.text("alert"), rule.text("expr", required=True)
            for_text = rule.text("for") if rule.has("for") else "0s"
            for_s = duration_s(for_text)
            if for_s is None:
                rule.problem(rule.at("for"), f'expected a duration such as "5m" or "1h30m", got {for_text!r}')
            severity = rule.labels("labels").get("severity", "")
            rules.append(AlertRule(name, expr, for_s or 0.0, severity, metric_names(expr)))
    if problems:
        raise AlertRulesError(f"{source}: " + "; ".join(problems))
    return rules


def load_rules(paths: Iterable[Path]) -> list[AlertRule]:
    """Every alerting rule of the given Prometheus rule files, in file order."""
    rules: list[AlertRule] = []
    for path in paths:
        try:
            document = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise AlertRulesError(f"{path}: {err}") from None
        rules.extend(parse(document, str(path)))
    return rules
