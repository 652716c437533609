"""The run report rendered by a real headless Chromium (selenium): every section there, every
image decoded and laid out, every plot visible, no console error; a screenshot is saved.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and ``pip install selenium``.
Set ``SPO_REPORT_SCREENSHOT`` to a file path to keep the screenshot.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_report import EXPECTED_PLOTS, SECTION_IDS, make_run

from spo.evaluation.report import write_report

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")

PAGE_STATE = """
const ids = arguments[0];
const box = (el) => { const r = el.getBoundingClientRect(); return [r.width, r.height]; };
const shown = (el) => { for (let e = el; e && e.nodeType === 1; e = e.parentElement) {
    const cs = getComputedStyle(e);
    if (cs.display === 'none' || cs.visibility === 'hidden' || cs.opacity === '0') return false; }
  return true; };
return {
  ready: document.readyState,
  missing: ids.filter((id) => !document.getElementById(id)
                       || !document.getElementById(id).querySelector('h2')),
  images: Array.from(document.images).map((img) => ({
    complete: img.complete, naturalWidth: img.naturalWidth, box: box(img), shown: shown(img),
    src: img.currentSrc.slice(0, 22)})),
  plots: Array.from(document.querySelectorAll('svg.plot')).map((svg) => ({
    id: svg.dataset.plot, box: box(svg), shown: shown(svg),
    lines: Array.from(svg.querySelectorAll('polyline')).filter((p) => p.getTotalLength() > 0).length})),
  height: document.documentElement.scrollHeight,
};
"""


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium driven by chromedriver, with its console log kept."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing: install with `apt-get install -y chromium chromium-driver`")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: `pip install selenium`")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def _console_errors(driver: Any) -> list[str]:
    try:
        entries = driver.get_log("browser")
    except Exception:  # noqa: BLE001 - a driver without the log endpoint: nothing to check
        return []
    return [e.get("message", "") for e in entries if e.get("level") == "SEVERE"]


def test_report_in_chromium(tmp_path: Path, browser: Any) -> None:
    run = make_run(tmp_path, "spo", models=("spo", "ddpo"))
    report = write_report(run)
    browser.get(report.resolve().as_uri())
    state = browser.execute_script(PAGE_STATE, list(SECTION_IDS))
    assert state["ready"] == "complete"
    assert state["missing"] == []
    assert len(state["images"]) == 8  # 4 samples + 2 grids for each of 2 models
    for img in state["images"]:
        assert img["src"] == "data:image/png;base64,", img
        assert img["complete"] and img["naturalWidth"] > 0 and img["shown"], img
        assert img["box"][0] > 0 and img["box"][1] > 0, img
    assert sorted(p["id"] for p in state["plots"]) == sorted(EXPECTED_PLOTS["spo"])
    for plot in state["plots"]:
        assert plot["box"][0] > 100 and plot["box"][1] > 50 and plot["shown"], plot
        assert plot["lines"] >= 1, plot
    assert _console_errors(browser) == []
    browser.set_window_size(1400, min(int(state["height"]) + 150, 12000))
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("SPO_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["SPO_REPORT_SCREENSHOT"])


def test_empty_report_in_chromium(tmp_path: Path, browser: Any) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    browser.get(write_report(run).resolve().as_uri())
    state = browser.execute_script(PAGE_STATE, list(SECTION_IDS))
    assert state["missing"] == [] and state["images"] == [] and state["plots"] == []
    assert "No metrics yet" in browser.find_element("id", "summary").text
    assert _console_errors(browser) == []
