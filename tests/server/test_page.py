"""The side-by-side page (``GET /``) in a real headless Chromium, driven by Playwright.

Needs Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run`` tries) and the ``playwright``
package (``.[dev]``); Playwright's own browser download is never used. Skipped, with the reason,
where either is missing. The screenshot is kept in ``$WDSERVE_TEST_ARTIFACTS`` (default
``test-artifacts/`` in the repository, ignored by git).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import DE_EN_BLEU, ServerProcess

REPO = Path(__file__).resolve().parents[2]
GERMAN = "Ein Mann fährt mit dem Fahrrad über die Brücke."


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium to drive: install Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                                 "(pip install playwright)")
    executable = chromium_path()
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        launched = playwright.chromium.launch(executable_path=executable, headless=True,
                                              args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(de_en_workdir: Path) -> Iterator[ServerProcess]:
    running = ServerProcess(de_en_workdir, "--default-max-length", "24")
    yield running
    running.stop()


def test_page_is_plain_html_with_nothing_from_elsewhere(server: ServerProcess) -> None:
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text and "<script src" not in page.text
    assert '["teacher", "student"]' in page.text  # the server's compare_models, filled in


def test_side_by_side_in_a_browser(server: ServerProcess, browser) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server.url}/")
    page.wait_for_selector("body[data-state=ready]", timeout=20_000)
    assert page.input_value("#model-left") == "teacher-int8"
    assert page.input_value("#model-right") == "student-int8"
    assert f"BLEU {DE_EN_BLEU['teacher']:.2f}" in page.inner_text("#about-left")
    assert f"BLEU {DE_EN_BLEU['student']:.2f}" in page.inner_text("#about-right")

    page.fill("#source", GERMAN)
    page.click("#translate")
    page.wait_for_selector("body[data-state=done]", timeout=30_000)
    for side in ("left", "right"):
        assert page.inner_text(f"#output-{side}").strip()
        assert page.inner_text(f"#latency-{side}").endswith("ms (median of 3)")
    assert "x as fast as" in page.inner_text("#speedup")
    assert page.inner_text("#error") == "" and errors == []

    artifacts = Path(os.environ.get("WDSERVE_TEST_ARTIFACTS", REPO / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "side-by-side.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # a server error reaches the page as a message, not a silent hang
    page.select_option("#model-right", "teacher-int8")
    page.fill("#source", "")
    page.click("#translate")
    page.wait_for_selector("body[data-state=error]", timeout=30_000)
    assert "empty" in page.inner_text("#error")
    page.close()
