"""Suite-wide hooks."""

from __future__ import annotations

import pytest


def _utf8(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Captured output made of fuzzed bytes (lone surrogates that asyncua logs from a malformed
    message) cannot be sent from an xdist worker to the controller: it would abort the whole run.
    Escape what is not UTF-8 in the report's sections, keep everything else as it is."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [(_utf8(title), _utf8(content)) for title, content in report.sections]
