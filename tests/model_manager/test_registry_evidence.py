"""A version's evidence: its drift policy and the summary of its test report, stored with it (also in databases made
before they existed); JUnit and Cobertura reports read safely, and bad reports or policies refused naming the field."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from chassis.errors import InvalidArgument
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager import messages, schema, test_reports
from model_manager.registry import Registry
from model_manager.tables import sqlite_url
from tests.model_manager.registry_support import (
    artifact,
    database_url,
    model_spec,
    postgres_server,
    registry,
    version_spec,
)

__all__ = ["database_url", "postgres_server", "registry"]

JUNIT = b"""<?xml version="1.0" encoding="utf-8"?>
<testsuites>
  <testsuite name="a" tests="3" failures="1" errors="0" skipped="1">
    <testcase name="x"/><testcase name="y"><failure/></testcase><testcase name="z"><skipped/></testcase>
  </testsuite>
  <testsuite name="b">
    <testcase name="p"/><testcase name="q"><error message="boom"/></testcase>
  </testsuite>
</testsuites>"""
COBERTURA = b'<?xml version="1.0" ?><coverage line-rate="0.8712" branch-rate="0" version="7.6"><packages/></coverage>'
POLICY = rpb.DriftPolicy(
    defaults=rpb.DriftLimits(max_psi=0.2, max_ks=0.15),
    overrides={"users:age": rpb.DriftLimits(max_psi=0.3)},
    min_rows=500,
    task=rpb.MODEL_TASK_BINARY_CLASSIFICATION,
)


def refused(call: object, *args: object) -> str:
    with pytest.raises(InvalidArgument) as caught:
        call(*args)  # type: ignore[operator]
    return str(caught.value)


def test_junit_and_cobertura_are_summarised() -> None:
    summary = test_reports.summarize(rpb.TestReport(junit_xml=JUNIT, coverage_xml=COBERTURA))
    assert summary is not None
    # Suite a by its attributes; suite b, without any, by its test cases.
    assert (summary.tests, summary.failures, summary.errors, summary.skipped) == (5, 1, 1, 1)
    assert summary.line_coverage == pytest.approx(0.8712)
    single = test_reports.summarize(
        rpb.TestReport(junit_xml=b'<testsuite tests="7" failures="0"><testcase/></testsuite>')
    )
    assert single is not None
    assert (single.tests, single.failures, single.errors, single.skipped) == (7, 0, 0, 0)
    assert not single.HasField("line_coverage")
    assert test_reports.summarize(rpb.TestReport()) is None


ENTITY_BOMB = (
    b'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><testsuite>&b;</testsuite>'
)
EXTERNAL = b'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY x SYSTEM "file:///etc/passwd">]><coverage line-rate="&x;"/>'


@pytest.mark.parametrize(
    ("report", "message"),
    [
        (rpb.TestReport(junit_xml=b"not xml"), "metadata.test_report.junit_xml: expected well-formed XML"),
        (rpb.TestReport(junit_xml=ENTITY_BOMB), "metadata.test_report.junit_xml: expected XML without a DTD"),
        (rpb.TestReport(coverage_xml=EXTERNAL), "metadata.test_report.coverage_xml: expected XML without a DTD"),
        (rpb.TestReport(junit_xml=b"<coverage/>"), "junit_xml: expected a <testsuites> or <testsuite> root"),
        (rpb.TestReport(junit_xml=b'<testsuite tests="-1"/>'), "junit_xml.tests: expected a whole number"),
        (rpb.TestReport(junit_xml=b'<testsuite tests="two"/>'), "junit_xml.tests: expected a whole number"),
        (
            rpb.TestReport(junit_xml=b'<testsuites><testsuite tests="1" failures="2"/></testsuites>'),
            "junit_xml testsuite[0]: expected failures + errors + skipped <= tests",
        ),
        (rpb.TestReport(coverage_xml=b"<coverage/>"), "coverage_xml.line-rate: expected the attribute"),
        (rpb.TestReport(coverage_xml=b'<coverage line-rate="1.5"/>'), "coverage_xml.line-rate: expected a number"),
        (rpb.TestReport(coverage_xml=b'<coverage line-rate="nan"/>'), "coverage_xml.line-rate: expected a number"),
        (rpb.TestReport(coverage_xml=b"<testsuite/>"), "coverage_xml: expected a Cobertura <coverage> root"),
    ],
)
def test_an_unreadable_report_is_refused_naming_the_field(report: rpb.TestReport, message: str) -> None:
    assert message in refused(test_reports.summarize, report)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (rpb.DriftPolicy(defaults=rpb.DriftLimits(max_psi=math.nan)), "metadata.drift_policy.defaults.max_psi"),
        (rpb.DriftPolicy(defaults=rpb.DriftLimits(max_ks=-0.1)), "metadata.drift_policy.defaults.max_ks"),
        (
            rpb.DriftPolicy(overrides={"f": rpb.DriftLimits(max_out_of_range_rate=math.inf)}),
            "metadata.drift_policy.overrides[f].max_out_of_range_rate",
        ),
        (rpb.DriftPolicy(overrides={" ": rpb.DriftLimits()}), "metadata.drift_policy.overrides: expected non-empty"),
        (rpb.DriftPolicy(min_rows=-1), "metadata.drift_policy.min_rows: expected 0"),
        (rpb.DriftPolicy(task=7), "metadata.drift_policy.task: expected a ModelTask"),  # type: ignore[arg-type]
    ],
)
def test_a_bad_drift_policy_is_refused_naming_the_field(policy: rpb.DriftPolicy, message: str) -> None:
    spec = replace(version_spec("churn", b"x"), drift_policy=policy)
    assert message in refused(schema.version_spec, spec)


def test_upload_metadata_carries_both_into_the_spec() -> None:
    meta = pb.UploadModelVersionMetadata(
        model_name="churn",
        format=rpb.MODEL_FORMAT_ONNX,
        drift_policy=POLICY,
        test_report=rpb.TestReport(junit_xml=JUNIT),
    )
    spec = messages.version_spec(meta)
    assert spec.drift_policy == POLICY
    assert spec.test_summary is not None
    assert spec.test_summary.tests == 5
    bare = messages.version_spec(pb.UploadModelVersionMetadata(model_name="churn", format=rpb.MODEL_FORMAT_ONNX))
    assert (bare.drift_policy, bare.test_summary) == (None, None)
    bad = pb.UploadModelVersionMetadata(format=rpb.MODEL_FORMAT_ONNX, test_report=rpb.TestReport(junit_xml=b"<"))
    assert "metadata.test_report.junit_xml" in refused(messages.version_spec, bad)


def test_the_evidence_is_stored_with_the_version(registry: Registry) -> None:
    registry.create_model(model_spec("churn"), "tester")
    summary = test_reports.summarize(rpb.TestReport(junit_xml=JUNIT, coverage_xml=COBERTURA))
    spec = replace(version_spec("churn", b"one"), drift_policy=POLICY, test_summary=summary)
    registry.register_version(spec, artifact(b"one"), "tester")
    registry.register_version(version_spec("churn", b"two"), artifact(b"two"), "tester")
    first = registry.get_version("churn", 1)
    assert first.drift_policy == POLICY
    assert first.test_summary == summary
    second = registry.get_version("churn", 2)
    assert (second.drift_policy, second.test_summary) == (None, None)
    shown = messages.version_message(first)
    assert shown.drift_policy.overrides["users:age"].max_psi == pytest.approx(0.3)
    assert shown.test_summary.line_coverage == pytest.approx(0.8712)
    assert not messages.version_message(second).HasField("test_summary")


def test_a_database_made_before_the_evidence_table_gains_it(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "old.db")
    old = Registry.open(url)
    old.create_model(model_spec("churn"), "tester")
    old.register_version(version_spec("churn", b"one"), artifact(b"one"), "tester")
    with old.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE version_evidence"))
    old.close()
    reopened = Registry.open(url)
    assert reopened.get_version("churn", 1).test_summary is None
    spec = replace(version_spec("churn", b"two"), drift_policy=POLICY)
    assert reopened.register_version(spec, artifact(b"two"), "tester").drift_policy == POLICY
    reopened.close()


@given(st.binary(max_size=300), st.sampled_from(["junit_xml", "coverage_xml"]))
def test_any_bytes_are_read_or_refused_naming_the_field(document: bytes, which: str) -> None:
    report = rpb.TestReport(**{which: document})
    try:
        summary = test_reports.summarize(report)
    except InvalidArgument as err:
        message = str(err)
    else:
        assert summary is None or summary.tests >= summary.failures + summary.errors + summary.skipped
        return
    assert message.startswith(f"metadata.test_report.{which}")


LIMIT = st.floats(allow_nan=True, allow_infinity=True, width=64)


@given(st.sampled_from(schema.LIMIT_FIELDS), LIMIT, st.text(max_size=8), st.integers(-5, 5))
def test_any_policy_is_accepted_only_when_valid(name: str, value: float, feature: str, min_rows: int) -> None:
    policy = rpb.DriftPolicy(min_rows=min_rows, overrides={feature: rpb.DriftLimits(**{name: value})})
    valid = math.isfinite(value) and value >= 0 and bool(feature.strip()) and "\x00" not in feature and min_rows >= 0
    try:
        schema.drift_policy("metadata.drift_policy", policy)
    except InvalidArgument as err:
        message = str(err)
    else:
        assert valid
        return
    assert not valid
    assert message.startswith("metadata.drift_policy.")
