"""`fresco experiments` options checked before any call: weights, overrides without a reason, nothing to update."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from fresco.cli import app
from fresco.cli_experiments import parse_weights

# Nothing listens here: every case below must fail before connecting.
NOWHERE = ["--service", "127.0.0.1:1"]


def test_weights_parse_into_arms() -> None:
    assert parse_weights("control=0.5, treatment=0.5", ["control", "treatment"]) == {"control": 0.5, "treatment": 0.5}
    assert parse_weights("treatment=2", ["control", "treatment"]) == {"treatment": 2.0}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("control", "expected ARM=WEIGHT, got 'control'"),
        ("=0.5", "expected ARM=WEIGHT, got '=0.5'"),
        ("other=1", "expected one of the arms (control, treatment), got 'other'"),
        ("control=half", "expected a number for control, got 'half'"),
        (" , ", "expected ARM=WEIGHT[,ARM=WEIGHT...]"),
    ],
)
def test_bad_weights_name_what_is_wrong(text: str, expected: str) -> None:
    with pytest.raises(typer.BadParameter, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_weights(text, ["control", "treatment"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["update", "k"], "give --weights, --coverage or both"),
        (["decide", "k", "--action", "ship", "--reason", "r"], "--action ship needs --arm"),
        (["decide", "k", "--action", "keep"], "an override needs a --reason"),
        (["list", "--status", "paused"], "expected one of draft, running, stopped, decided, got 'paused'"),
        (["create", "/no/such/file.yaml"], "/no/such/file.yaml is not a valid experiment file"),
    ],
)
def test_usage_errors_stop_before_any_call(args: list[str], expected: str) -> None:
    result = CliRunner().invoke(app, ["experiments", *args, *NOWHERE], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
