"""The timeline report: its data from a run's events, and the HTML drawn by a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from helpers import SERVER, TYPES, VOLUME, res, sk
from karbor_async import BarrierPolicy, Engine, Hook, MemoryStore, Plan, Resource, Timeouts
from karbor_async._report import build_timeline, render_timeline
from karbor_async.exceptions import RunError
from karbor_async.testing import Fault, RecordingPlugin, protectables_for

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


async def _protect(engine: Engine, plan: Plan) -> tuple[dict[str, Any], str]:
    store = engine.store
    async with engine:
        try:
            outcome = await engine.protect(plan)
        except RunError as exc:
            outcome = exc.outcome
    run = await store.get_run(outcome.run_id)
    events = await store.read_events(outcome.run_id, 0)
    data = build_timeline(run, events, run.outcome)
    return data, render_timeline(data)


def _karbor_run(
    servers: int, volumes_per_server: int, faults: dict[Any, Fault] | None = None
) -> tuple[dict[str, Any], str]:
    """Protect servers with their volumes (RecordingPlugin, barrier cut) and build the report."""
    pairs = [
        (res(f"s{i}"), res(f"v{i}-{j}")) for i in range(servers) for j in range(volumes_per_server)
    ]
    plugin = RecordingPlugin(TYPES, faults=faults)
    engine = Engine([plugin], protectables_for(pairs), store=MemoryStore(), discover=False)
    plan = Plan(
        name="report-test",
        resources=[res(f"s{i}") for i in range(servers)],
        barrier=BarrierPolicy.CUT,
        timeouts=Timeouts(hook=30),
    )
    return anyio.run(_protect, engine, plan, backend="asyncio")


def test_timeline_data_has_a_row_per_resource_and_a_bar_per_hook() -> None:
    """Rows cover the graph; each resource has its four hook bars, cuts, quiesce windows."""
    data, _ = _karbor_run(3, 2)
    assert len(data["rows"]) == 9
    assert len(data["bars"]) == 9 * 4
    assert {tuple(r[:2]) for r in data["rows"]} >= {(SERVER, "s0"), (VOLUME, "v2-1")}
    assert len(data["cuts"]) == 6  # volumes cut; servers only quiesce
    assert len(data["quiesce"]) == 3 and all(q[3] for q in data["quiesce"])
    assert {b[1] for b in data["barriers"]} == {"cut", "main"}
    meta = data["meta"]
    assert meta["status"] == "succeeded" and meta["skew"] is not None
    assert meta["longest_quiesce"] is not None
    assert meta["longest_quiesce_resource"].startswith(SERVER)
    # every bar lies inside the run
    assert all(0 <= b[2] <= b[3] <= data["end"] + 1e-6 for b in data["bars"])


def test_a_failed_hook_is_marked_with_its_error() -> None:
    """A hook that raised is a 'failed' bar carrying the error text; the header says failed."""
    data, page = _karbor_run(2, 1, faults={(sk("v0-0"), Hook.MAIN): Fault.RAISE})
    failed = [b for b in data["bars"] if b[4] == "failed"]
    assert len(failed) == 1
    assert data["rows"][failed[0][0]][:2] == [VOLUME, "v0-0"]
    assert "InjectedError" in failed[0][7]
    assert data["meta"]["status"] == "failed"
    assert 'data-fact="error"' in page


def test_html_is_self_contained_and_escapes_run_text() -> None:
    """No external resource is referenced; run text cannot close the embedded script."""
    data, _ = _karbor_run(1, 1)
    data["rows"][0][2] = "</script><script>alert(1)</script>"
    data["meta"]["plan"] = "<b>@@DATA@@</b>"
    page = render_timeline(data)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page
    assert page.count("</script>") == 2  # the data block's and the code's own
    assert "&lt;b&gt;@@DATA@@&lt;/b&gt;" in page
    embedded = re.search(r'id="timeline-data">(.*?)</script>', page, re.DOTALL)
    assert embedded is not None
    assert json.loads(embedded.group(1))["rows"][0][2].startswith("</script>")


# -- in a real browser ---------------------------------------------------------------------


def _browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    missing = []
    if chromium is None:
        missing.append("chromium")
    if driver_path is None:
        missing.append("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        reason = (
            f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("KARBOR_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    profile = tempfile.mkdtemp(prefix="karbor-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(driver_path)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from _browser()


def _open(browser: Any, page: str, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    path = tmp_path / "timeline.html"
    path.write_text(page, encoding="utf-8")
    browser.get(path.as_uri())
    WebDriverWait(browser, 20).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-rendered") == "true"
    )


def _rows(browser: Any) -> int:
    return int(
        browser.execute_script("return document.querySelectorAll('g.row[data-resource]').length")
    )


def test_browser_draws_one_row_per_resource_and_saves_a_screenshot(
    browser: Any, tmp_path: Path
) -> None:
    """A sample application on the simulated cloud: rows, bars, barriers and cuts are drawn."""
    sim = pytest.importorskip("karbor_simcloud")
    cloud = sim.SimCloud.generate(40, seed=7, latency=sim.LatencyProfile.realistic())
    engine = Engine(
        sim.all_protections(cloud), sim.all_protectables(cloud), store=MemoryStore(), discover=False
    )
    plan = Plan(name="sample-app", resources=cloud.project_resources(), barrier=BarrierPolicy.CUT)
    data, page = anyio.run(_protect, engine, plan, backend="asyncio")
    _open(browser, page, tmp_path)
    assert _rows(browser) == len(data["rows"]) == 40
    counts = browser.execute_script(
        "return [document.querySelectorAll('rect.bar').length,"
        " document.querySelectorAll('line.barrier').length,"
        " document.querySelectorAll('line.cut-at').length,"
        " document.querySelectorAll('rect.quiesce').length]"
    )
    assert counts == [len(data["bars"]), 2, len(data["cuts"]), len(data["quiesce"])]
    header = browser.find_element("css selector", 'header [data-fact="skew"] dd').text
    assert header.endswith("ms")
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "timeline.png"))


def test_browser_stays_usable_at_a_thousand_resources(browser: Any, tmp_path: Path) -> None:
    """1,000 rows render; the filter narrows them and collapsing types hides them."""
    data, page = _karbor_run(250, 3)
    assert len(data["rows"]) == 1000
    _open(browser, page, tmp_path)
    assert _rows(browser) == 1000
    box = browser.find_element("id", "filter")
    box.send_keys("s1")  # servers s1, s10-s19, s100-s199 and their volumes
    expected = sum(1 for r in data["rows"] if "s1" in f"{r[0]}#{r[1]} {r[2]} {r[3]} {r[4]}".lower())
    assert _rows(browser) == expected
    box.clear()
    browser.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
    browser.find_element("id", "collapse").click()
    assert _rows(browser) == 0
    assert len(browser.find_elements("css selector", "g.type-header")) == 2
    browser.find_element("id", "expand").click()
    assert _rows(browser) == 1000
    browser.find_element("id", "zoom-in").click()
    width = float(
        browser.execute_script("return document.getElementById('chart').getAttribute('width')")
    )
    assert width > 1400


def test_resource_helper_types_match() -> None:
    """The rows keep the resource's type and id as the data attribute shows them."""
    data, _ = _karbor_run(1, 1)
    keys = {f"{r[0]}#{r[1]}" for r in data["rows"]}
    assert keys == {f"{SERVER}#s0", f"{VOLUME}#v0-0"}
    assert isinstance(res("s0"), Resource)
