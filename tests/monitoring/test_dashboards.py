"""The five Grafana dashboards are well formed (classic JSON model, a datasource variable, unique ids) and every
query of every panel parses: promtool checks them all as recording rules. That they return series is proven against
the running platform in test_prometheus_platform.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from model_manager.alert_rules import metric_names
from tests.monitoring.dashboards import load_all, panels, queries, substitute

BOARDS = load_all()
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_the_five_dashboards() -> None:
    assert sorted(BOARDS) == ["drift", "experiments", "features", "rollouts", "serving"]
    assert len({board["uid"] for board in BOARDS.values()}) == 5
    for board in BOARDS.values():
        assert board["templating"]["list"][0] == {**board["templating"]["list"][0], "name": "datasource",
                                                  "type": "datasource", "query": "prometheus"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panels_are_well_formed(name: str) -> None:
    board = BOARDS[name]
    every = list(panels(board["panels"]))
    assert len({p["id"] for p in every}) == len(every), "panel ids repeat"
    for panel in every:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            assert panel.get("panels") == [] or panel["collapsed"], f"{panel['title']}: an open row holds no panels"
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs, panel["title"]
        assert len(set(refs)) == len(refs), panel["title"]
        assert all(t["datasource"] == DATASOURCE and t["expr"] for t in panel["targets"]), panel["title"]
    assert any(p["type"] == "row" and p["collapsed"] and p["panels"] for p in every) or name == "drift"


def test_every_query_parses(tmp_path: Path) -> None:
    """All queries, variables substituted, as recording rules: `promtool check rules` parses each one."""
    every = [q for name, board in BOARDS.items() for q in queries(name, board)]
    rules = [
        {"record": f"dashboard:query:{i}", "expr": substitute(q.expr, BOARDS[q.dashboard])} for i, q in enumerate(every)
    ]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing although make test installs it"
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(every)} rules found" in checked.stdout
    assert all(metric_names(q.expr) for q in every)


def test_a_left_variable_is_refused() -> None:
    with pytest.raises(ValueError, match="variable is left"):
        substitute('up{job="$unknown"}', BOARDS["serving"])
    assert substitute('label_replace(up, "a", "$1", "job", "(.*)")', BOARDS["serving"]).count("$1") == 1
