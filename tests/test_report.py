"""The timeline report: its data from a run's events, and the HTML drawn by a real browser."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from helpers import SERVER, TYPES, VOLUME, need_service, res, sk, uses_service
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
        need_service(
            f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        )
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
def browser_session() -> Iterator[Any]:
    yield from _browser()


@pytest.fixture
def browser(browser_session: Any) -> Any:
    """The module's browser, for a test marked ``service`` (checked for every test)."""
    uses_service("a headless browser")
    return browser_session


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


@pytest.mark.service
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
        "return [document.querySelectorAll('#chart rect.bar').length,"
        " document.querySelectorAll('line.barrier').length,"
        " document.querySelectorAll('line.cut-at').length,"
        " document.querySelectorAll('rect.quiesce').length]"
    )
    assert counts == [len(data["bars"]), 2, len(data["cuts"]), len(data["quiesce"])]
    header = browser.find_element("css selector", 'header [data-fact="skew"] dd').text
    assert header.endswith("ms")
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "timeline.png"))


@pytest.mark.service
def test_browser_stays_usable_at_a_thousand_resources(browser: Any, tmp_path: Path) -> None:
    """1,000 rows: sections of more than 50 rows start collapsed; the filter opens and
    narrows them; expanding shows every row; collapsing types hides them."""
    data, page = _karbor_run(250, 3)
    assert len(data["rows"]) == 1000
    _open(browser, page, tmp_path)
    assert _rows(browser) == 0
    headers = [h.text for h in browser.find_elements("css selector", "g.type-header text")]
    assert len(headers) == 2 and all("click to expand" in h for h in headers)
    box = browser.find_element("id", "filter")
    box.send_keys("s1")  # servers s1, s10-s19, s100-s199 and their volumes
    expected = sum(1 for r in data["rows"] if "s1" in f"{r[0]}#{r[1]} {r[2]} {r[3]} {r[4]}".lower())
    assert _rows(browser) == expected
    box.clear()
    browser.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
    assert _rows(browser) == 0
    browser.find_element("id", "expand").click()
    assert _rows(browser) == 1000
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


@pytest.mark.service
def test_browser_opens_a_collapsed_section_on_click(browser: Any, tmp_path: Path) -> None:
    """A section of 50 rows starts open; one of 51 starts collapsed and a click opens it."""
    data, page = _karbor_run(17, 3)  # 17 servers (open), 51 volumes (collapsed)
    _open(browser, page, tmp_path)
    assert _rows(browser) == 17
    browser.execute_script(
        "document.querySelector(`g.type-header[data-type='${arguments[0]}'] rect`)"
        ".dispatchEvent(new MouseEvent('click', {bubbles: true}))",
        VOLUME,
    )
    assert _rows(browser) == 68 == len(data["rows"])


def _boxes(browser: Any, selector: str) -> list[dict[str, float]]:
    return list(
        browser.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map((e) => {"
            " const r = e.getBoundingClientRect();"
            " return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; })",
            selector,
        )
    )


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return (
        a["left"] < b["right"]
        and b["left"] < a["right"]
        and a["top"] < b["bottom"]
        and b["top"] < a["bottom"]
    )


@pytest.mark.service
@pytest.mark.parametrize("gap", [0.0, 0.001, 0.015, 0.2])
def test_browser_barrier_labels_never_overlap(browser: Any, tmp_path: Path, gap: float) -> None:
    """Cut and main barrier labels (two groups' too) do not overlap each other or the time
    ticks, however close the releases (15 ms apart in a 2 s run was the case seen)."""
    data, _ = _karbor_run(2, 1)
    data["end"] = 2.0
    data["barriers"] = [
        ["default", "cut", 0.039],
        ["default", "main", 0.039 + gap],
        ["db", "cut", 0.040 + gap],
        ["db", "main", 1.2],
    ]
    _open(browser, render_timeline(data), tmp_path)
    labels = _boxes(browser, "#axis .barrier-label")
    assert len(labels) == 4
    ticks = _boxes(browser, "#axis-ticks text")
    for i, a in enumerate(labels):
        for b in labels[i + 1 :] + ticks:
            assert not _overlap(a, b), (a, b)
    axis = _boxes(browser, "#axis")[0]
    assert all(axis["top"] <= b["top"] and b["bottom"] <= axis["bottom"] for b in labels + ticks)


@pytest.mark.service
def test_browser_legend_draws_open_and_aborting_bars_as_the_chart_does(
    browser: Any, tmp_path: Path
) -> None:
    """The legend has the dotted outline of bars that never ended, and the paler aborting
    call, styled by the chart's own rules."""
    data, _ = _karbor_run(1, 1)
    data["bars"].append([0, 2, 0.0, data["end"], "open", 1, False])
    _open(browser, render_timeline(data), tmp_path)
    style = (
        "const e = document.querySelector(arguments[0]); const c = getComputedStyle(e);"
        " return [c.strokeDasharray, c.stroke, e.getAttribute('fill-opacity')];"
    )
    legend = browser.execute_script(style, '[data-legend="open"] rect')
    chart = browser.execute_script(style, "#chart rect.bar.open")
    assert legend[:2] == chart[:2] and legend[0] not in ("none", "")
    aborting = browser.execute_script(style, '[data-legend="aborting"] rect')
    assert aborting[2] == "0.45"


async def test_a_cancelled_runs_summary_does_not_call_the_cancel_an_error() -> None:
    """Cancelled with no hook failing: the outcome says it was cancelled, not 'first error',
    and the timeline's header labels it 'cancelled', not 'error'."""
    plugin = RecordingPlugin(TYPES, faults={(sk("v0-0"), Hook.MAIN): Fault.CANCEL_RUN})
    pairs = [(res("s0"), res("v0-0"))]
    engine = Engine([plugin], protectables_for(pairs), store=MemoryStore(), discover=False)
    async with engine:
        run = await engine.build_protect(Plan(name="c", resources=[res("s0")]))
        plugin.cancel_run = run.cancel
        with pytest.raises(RunError) as info:
            await engine.execute(run)
        record = await engine.store.get_run(run.run_id)
        events = await engine.store.read_events(run.run_id, 0)
    outcome = info.value.outcome
    assert outcome.status.value == "cancelled"
    assert outcome.error is not None and "first error" not in outcome.error
    assert outcome.error.endswith(f"run {run.run_id} was cancelled")
    page = render_timeline(build_timeline(record, events, record.outcome))
    assert 'data-fact="cancelled"' in page and 'data-fact="error"' not in page


def test_resource_helper_types_match() -> None:
    """The rows keep the resource's type and id as the data attribute shows them."""
    data, _ = _karbor_run(1, 1)
    keys = {f"{r[0]}#{r[1]}" for r in data["rows"]}
    assert keys == {f"{SERVER}#s0", f"{VOLUME}#v0-0"}
    assert isinstance(res("s0"), Resource)
