"""The test evidence a version is registered with: a JUnit XML report and a Cobertura coverage report, read into a
TestSummary. Parsed without DTDs or entities (defusedxml), so a report cannot reach files or blow up in memory."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET  # the Element type and ParseError only: parsing is defusedxml's

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from chassis.errors import InvalidArgument
from fresco.api.models.v1 import registry_pb2 as rpb

# A report is metadata, not an artifact: a few MB holds tens of thousands of test cases.
MAX_REPORT_BYTES = 8 * 1024 * 1024
COUNTS = ("tests", "failures", "errors", "skipped")


def summarize(report: rpb.TestReport, field: str = "metadata.test_report") -> rpb.TestSummary | None:
    """The summary of a report, or None when it holds neither document; INVALID_ARGUMENT naming the unreadable one."""
    if not report.junit_xml and not report.coverage_xml:
        return None
    summary = rpb.TestSummary()
    if report.junit_xml:
        counts = junit_counts(_parse(f"{field}.junit_xml", report.junit_xml), f"{field}.junit_xml")
        summary.tests, summary.failures, summary.errors, summary.skipped = counts
    if report.coverage_xml:
        summary.line_coverage = line_rate(_parse(f"{field}.coverage_xml", report.coverage_xml), f"{field}.coverage_xml")
    return summary


def _parse(field: str, document: bytes) -> ET.Element:
    if len(document) > MAX_REPORT_BYTES:
        raise InvalidArgument(f"{field}: expected at most {MAX_REPORT_BYTES} bytes, got {len(document)}")
    try:
        root: ET.Element = fromstring(document, forbid_dtd=True)
    except DefusedXmlException as err:
        raise InvalidArgument(f"{field}: expected XML without a DTD or entities, got {type(err).__name__}") from None
    except (ET.ParseError, ValueError) as err:
        raise InvalidArgument(f"{field}: expected well-formed XML, got: {str(err)[:200]}") from None
    return root


def junit_counts(root: ET.Element, field: str) -> tuple[int, int, int, int]:
    """(tests, failures, errors, skipped) of a <testsuites> or <testsuite> document."""
    if root.tag == "testsuite":
        return _suite(root, field)
    if root.tag != "testsuites":
        raise InvalidArgument(f"{field}: expected a <testsuites> or <testsuite> root element, got <{root.tag[:60]}>")
    suites = root.findall("testsuite")
    if not suites:  # a summary-only document: its own attributes, or its test cases
        return _suite(root, field)
    totals = [0, 0, 0, 0]
    for i, suite in enumerate(suites):
        for k, value in enumerate(_suite(suite, f"{field} testsuite[{i}]")):
            totals[k] += value
    return totals[0], totals[1], totals[2], totals[3]


def _suite(suite: ET.Element, field: str) -> tuple[int, int, int, int]:
    # Attributes when present; otherwise counted from the test cases (some writers leave them out).
    cases = list(suite.iter("testcase"))
    counted = {
        "tests": len(cases),
        "failures": sum(1 for c in cases if c.find("failure") is not None),
        "errors": sum(1 for c in cases if c.find("error") is not None),
        "skipped": sum(1 for c in cases if c.find("skipped") is not None),
    }
    values = []
    for name in COUNTS:
        raw = suite.get(name)
        values.append(counted[name] if raw is None else _count(f"{field}.{name}", raw))
    tests, failures, errors, skipped = values
    if failures + errors + skipped > tests:
        raise InvalidArgument(
            f"{field}: expected failures + errors + skipped <= tests, got {failures} + {errors} + {skipped} > {tests}"
        )
    return tests, failures, errors, skipped


def _count(field: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidArgument(f"{field}: expected a whole number of 0 or more, got {raw[:40]!r}") from None
    if value < 0:
        raise InvalidArgument(f"{field}: expected a whole number of 0 or more, got {value}")
    return value


def line_rate(root: ET.Element, field: str) -> float:
    """The line-rate of a Cobertura <coverage> document, in [0, 1]."""
    if root.tag != "coverage":
        raise InvalidArgument(f"{field}: expected a Cobertura <coverage> root element, got <{root.tag[:60]}>")
    raw = root.get("line-rate")
    if raw is None:
        raise InvalidArgument(f"{field}.line-rate: expected the attribute on <coverage>, it is missing")
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"{field}.line-rate: expected a number in [0, 1], got {raw[:40]!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgument(f"{field}.line-rate: expected a number in [0, 1], got {raw[:40]!r}")
    return value
