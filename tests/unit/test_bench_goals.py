"""The benchmarks' shared goal form and `make bench`'s summary (no benchmark runs here)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import bench.__main__ as runner
from bench import goals
from bench.goals import Goal
from bench.measure import descendants, machine_load, memory, tree_cpu_seconds, tree_memory


@pytest.fixture(autouse=True)
def goals_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(goals, "GOALS_DIR", tmp_path)
    return tmp_path


def test_a_goal_refuses_an_unknown_status() -> None:
    with pytest.raises(ValueError, match="status: expected one of"):
        Goal("c16 CPU/request", "OK", "1.1×", "≤ 1.25×")


def test_recorded_goals_come_back_as_recorded() -> None:
    judged = [
        Goal("c16 CPU/request ≤ 1.25× floor", "PASS", "1.12×", "≤ 1.25×", "floor", 1.12),
        Goal("p99 ≤ 2× predictor alone", "MISS", "2.40×", "≤ 2×", "predictor", 2.4),
        Goal("GPU utilisation", "SKIP", "no GPU on this machine", "≥ 60%"),
    ]
    goals.record("predictor", judged, quick=True, notes=["one note"])
    found = goals.load_recorded("predictor")
    assert found is not None
    header, back = found
    assert back == judged
    assert header["quick"] is True
    assert header["notes"] == ["one note"]
    assert goals.load_recorded("gateway") is None


def test_the_summary_is_one_table_and_names_what_did_not_finish() -> None:
    began = time.time()
    goals.record("int8", [Goal("size ratio", "PASS", "0.27×", "≤ 0.3×", "parent", 0.27)], quick=False)
    goals.record("gateway", [Goal("gateway CPU/Predict", "MISS", "1.4×", "≤ 1×", "predictor", 1.4)], quick=True)
    text, failed = runner.summary(["int8", "gateway", "features"], began, {"int8": "12 s", "features": "exit 1"})
    lines = text.splitlines()
    assert lines[0] == "goals of every benchmark"
    assert "benchmark" in lines[1]
    assert "peer" in lines[1]
    int8_row = next(line for line in lines if line.strip().startswith("int8"))
    assert "size ratio" in int8_row
    assert "parent" in int8_row
    assert int8_row.endswith("PASS")
    assert any(line.strip().startswith("gateway") and line.endswith("MISS") for line in lines)
    assert "features: no goals recorded by this run (exit 1)" in text
    assert "gateway: quick run, not run" in text  # no outcome given: said so
    assert lines[-1] == "1 PASS, 1 MISS, 0 SKIP; did not finish: features"
    assert failed == ["features"]


def test_goals_recorded_before_the_run_do_not_count() -> None:
    goals.record("int8", [Goal("size ratio", "PASS", "0.27×", "≤ 0.3×")], quick=False)
    text, failed = runner.summary(["int8"], time.time() + 1, {})
    assert failed == ["int8"]
    assert "no goals recorded" in text


def test_process_tree_measurements_read_this_process() -> None:
    pid = os.getpid()
    assert pid in descendants(pid)
    assert tree_cpu_seconds(pid) > 0
    mine = memory(pid)
    assert 0 < mine.pss <= mine.rss
    assert tree_memory(pid).rss >= mine.rss
    assert 0.0 <= machine_load(0.05).steal <= 1.0
