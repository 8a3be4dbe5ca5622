"""The Grafana dashboards in deploy/grafana as data: every PromQL query of every panel (collapsed rows included),
and the query with Grafana's variables replaced the way a dashboard showing "All" would send it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
# Grafana's built-in interval variables, at values that suit a 1 s scrape (a rate window of 4 scrapes or more).
BUILTINS = {
    "${__rate_interval}": "1m", "$__rate_interval": "1m", "${__interval}": "15s", "$__interval": "15s",
    "${__range}": "1h", "$__range": "1h",
}  # fmt: skip
_VARIABLE = re.compile(r"\$\{?[A-Za-z_]")  # "$1" in a label_replace is no variable


@dataclass(frozen=True)
class Query:
    """One target of one panel."""

    dashboard: str
    panel: str
    ref: str
    expr: str  # as written, with variables

    @property
    def where(self) -> str:
        return f"{self.dashboard}: {self.panel} [{self.ref}]"


def load_all() -> dict[str, dict[str, Any]]:
    """Every dashboard by file stem."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels(items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels a collapsed row keeps inside it."""
    for item in items:
        yield item
        yield from panels(item.get("panels", []))


def queries(name: str, board: dict[str, Any]) -> list[Query]:
    return [
        Query(name, panel["title"], target["refId"], target["expr"])
        for panel in panels(board["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def variable_values(board: dict[str, Any]) -> dict[str, str]:
    """Each template variable's value as sent: query variables at "All" (their allValue), others at their current."""
    values = {}
    for variable in board["templating"]["list"]:
        if variable["type"] == "datasource":
            continue
        if variable["type"] == "query":
            values[variable["name"]] = variable.get("allValue") or ".*"
        else:
            values[variable["name"]] = variable["current"]["value"]
    return values


def substitute(expr: str, board: dict[str, Any]) -> str:
    """`expr` with the built-in and the dashboard's variables replaced (longest names first); ValueError if any is
    left."""
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    values = variable_values(board)
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    if _VARIABLE.search(expr):
        raise ValueError(f"a variable is left in {expr!r}")
    return expr
