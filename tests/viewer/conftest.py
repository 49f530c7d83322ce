"""Viewer tests: on a failure, what the browser showed is kept for whoever reads the CI log."""

from __future__ import annotations

import pytest

from viewer_peers import ARTEFACTS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    page = getattr(item, "funcargs", {}).get("page")
    if report.when != "call" or not report.failed or page is None:
        return
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / f"failed_{item.name}.png"
    try:
        page.screenshot(path=str(shot))
        report.sections.append(("viewer", f"screenshot of the failing page: {shot}"))
    except Exception as exc:  # noqa: BLE001 (the page may be gone; the failure itself is reported anyway)
        report.sections.append(("viewer", f"no screenshot: {exc}"))
