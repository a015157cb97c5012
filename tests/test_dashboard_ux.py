"""The dashboard as W&B and TensorBoard users expect it (issue 15), in a real Chromium against the real server:
hover labels that fit and say where a point is, tables that follow live transitions, controls that are honest
about what a token may do, one colour per run everywhere, no Plotly Cloud, a proposal on screen at 1024 px, a
dark theme, readable log ticks, smoothing per series density and decisions numbered per run."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Download, Locator, Page, Route, ViewportSize, expect

from tests.conftest import LiveServer, make_run, sqlite_copy
from tests.test_dashboard import (
    Tab,
    decision_status,
    ingest,
    open_run,
    opened_tab,
    shot,
    staged_run,
    until_proposal,
    wait_chart,
    wait_until,
)
from tests.test_live_detection import LR, CurveWorker, start

pytestmark = pytest.mark.slow  # browser tests: see the tiers in the README


@pytest.fixture
def migrated_url(tmp_path: Path, migrated_templates: dict[str, str]) -> str:
    """SQLite only, as tests/test_dashboard.py: storage is tested on both engines elsewhere."""
    return sqlite_copy(migrated_templates, tmp_path)


@pytest.fixture
def tab(browser: Browser, server: LiveServer) -> Iterator[Tab]:
    with opened_tab(browser, server.url) as watched:
        yield watched


def point_on_screen(page: Page, trace: int, index: int) -> tuple[float, float]:
    """Where plotly drew point `index` of trace `trace`, in page pixels (its axes' own data-to-pixel mapping)."""
    x, y = page.evaluate(
        """([trace, index]) => {
            const gd = document.getElementById('chart');
            const t = gd.data[trace];
            const xa = gd._fullLayout[t.xaxis.replace('x', 'xaxis')];
            const ya = gd._fullLayout[t.yaxis.replace('y', 'yaxis')];
            const box = gd.getBoundingClientRect();
            const yv = ya.type === 'log' ? Math.log10(t.y[index]) : t.y[index];
            return [box.left + xa._offset + xa.l2p(t.x[index]), box.top + ya._offset + ya.l2p(yv)];
        }""",
        [trace, index],
    )
    return float(x), float(y)


def hover_until_shown(page: Page, trace: int, index: int, label: Locator, timeout_s: float = 15.0) -> None:
    """Hovers point ``index`` of ``trace`` until ``label`` shows once. A live event that redraws the chart after
    the mouse arrived takes the hover away (and may move the point): the position is measured again each time.
    Waits on the label, never on the clock alone."""
    deadline = time.monotonic() + timeout_s
    while True:
        x, y = point_on_screen(page, trace, index)
        page.mouse.move(x + 2, y)
        page.mouse.move(x, y)
        try:
            expect(label).to_have_count(1, timeout=1000)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def trace_index(page: Page, role: str, key: str, run: int | None = None) -> int:
    index: int = page.evaluate(
        """([role, key, run]) => document.getElementById('chart').data.findIndex((t) => t.meta
            && t.meta.role === role && t.meta.key === key && (run === null || t.meta.run === run))""",
        [role, key, run],
    )
    assert index >= 0, (role, key, run)
    return index


# --- 1: decision hovers fit the chart -------------------------------------------------------------------------------


def test_a_long_decision_hover_is_wrapped_inside_the_chart(server: LiveServer, client: httpx.Client, tab: Tab) -> None:
    page = tab.page
    run_id = staged_run(client, "hover", {61: 0.01})
    assert server.app.state.stagewatch.live.wait_idle(timeout=10)
    reason = "a long note, " * 30 + "and a path/with/no/spaces/" * 6
    response = client.post(f"/api/v1/runs/{run_id}/commands", json={"action": "decay", "factor": 0.5, "reason": reason})
    assert response.status_code in (200, 201), response.text
    open_run(page, server, run_id)
    page.wait_for_function(
        "() => document.getElementById('chart').data.some((t) => t.meta && t.meta.role === 'decisions')"
    )
    marker = page.evaluate(
        "() => document.getElementById('chart').data.findIndex((t) => t.meta && t.meta.role === 'decisions')"
    )
    label = page.locator("#chart .hoverlayer .hovertext")
    hover_until_shown(page, marker, 0, label)
    expect(label).to_contain_text("a long note")
    chart = page.locator("#chart").bounding_box()
    box = label.bounding_box()
    assert chart and box
    # Wrapped (many lines, none wider than the label can be), and all of it inside the chart.
    assert label.locator("tspan.line").count() >= 8
    assert box["width"] <= 520, box
    assert box["x"] >= chart["x"] - 1 and box["x"] + box["width"] <= chart["x"] + chart["width"] + 1, (box, chart)
    shot(page, "ux-decision-hover")


# --- 2 and 10: the table follows a live transition; the proposal is on screen at 1024 px ------------------------


NARROW: ViewportSize = {"width": 1024, "height": 768}


@pytest.mark.parametrize("verb", ["approve", "override"])
def test_the_tables_follow_a_transition_that_overtakes_the_pages_own_answer(
    server: LiveServer, browser: Browser, tmp_path: Path, verb: str
) -> None:
    """The worker applies the decision before the browser gets the answer to its approve (held back here): the
    late answer ("approved") must not put the table back behind the live event ("applied")."""
    with start(server, tmp_path, "approve", auto_approve_after_s=3600) as run, opened_tab(browser, server.url) as tab:
        page = tab.page
        page.set_viewport_size(NARROW)
        worker = CurveWorker(server, run)
        proposal = until_proposal(server, worker)
        open_run(page, server, run.id)
        approve = page.locator("#approve")
        expect(approve).to_be_in_viewport()  # at 1024 px the waiting proposal comes before the charts
        shot(page, f"ux-proposal-1024-{verb}")

        held: list[Route] = []
        page.route(re.compile(rf"/decisions/{proposal['id']}/{verb}$"), lambda route: held.append(route))
        if verb == "approve":
            approve.click()
        else:
            page.get_by_label("New LR").fill("0.02")
            page.get_by_role("button", name="Override with this LR").click()
        # The route handler runs while Playwright talks to the page: evaluate() lets it.
        wait_until(lambda: page.evaluate("() => true") and bool(held), "the request")
        answer = held[0].fetch()  # the server decides now; the page hears of it only from the stream
        assert answer.status == 200, answer.text()
        worker.settle()
        assert worker.train_epoch()
        assert worker.lr == pytest.approx(LR * 0.1 if verb == "approve" else 0.02)
        wait_until(lambda: decision_status(server, run.id, proposal["id"])["status"] == "applied", "applied")
        row = page.locator(f'#decisions tr[data-decision="{proposal["id"]}"]')
        expect(row).to_contain_text("applied")
        expect(row).to_contain_text("· LR")  # the Applied column: step and LR
        held[0].fulfill(response=answer)  # the stale answer arrives last
        expect(page.locator("#decision-status")).to_have_count(0)  # the panel moved on: no proposal
        page.wait_for_function(
            "() => !document.querySelector('#decisions .dstatus.approved')"
            " && document.querySelector('#decisions .dstatus.applied') !== null"
        )
        # Give the late answer's redraw a frame, then the row must still be current.
        page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
        expect(row).to_contain_text("applied")
        expect(row).not_to_contain_text("approved")


# --- 3: honest controls ------------------------------------------------------------------------------------------


def open_signin(page: Page) -> None:
    """Opens the sign-in form whatever its state: a refusal (a 401) opens it by itself, and a click on the
    summary would then close it again."""
    page.locator("#signin").evaluate("(details) => { details.open = true; }")


def sign_in(page: Page, token: str) -> None:
    open_signin(page)
    page.get_by_label("Token (viewer to watch, operator to decide)").fill(token)
    page.get_by_role("button", name="Sign in", exact=True).click()


def sign_out(page: Page) -> None:
    open_signin(page)
    page.get_by_role("button", name="Sign out").click()


def test_a_viewer_sees_the_controls_disabled_with_the_reason(
    secured: tuple[str, dict[str, str]], browser: Browser
) -> None:
    url, tokens = secured
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {tokens['worker']}"}) as worker:
        run_id = make_run(worker, name="watched")
        ingest(worker, run_id, [{"key": "lr", "step": 1, "value": 0.1}, {"key": "train/loss", "step": 1, "value": 1}])
    with opened_tab(browser, url) as tab:
        page = tab.page
        page.goto(f"{url}/ui/")
        # Anonymous: no empty-state under the refusal, and the stream waits for a sign-in instead of retrying.
        expect(page.locator("#load-error")).to_contain_text("Sign in with a token")
        expect(page.locator("#runs")).not_to_contain_text("No runs yet")
        expect(page.locator("#live-state")).to_have_attribute("data-state", "signin")

        sign_in(page, "not-a-token")
        expect(page.locator("#signin summary")).to_have_text("Token refused · sign in again")
        expect(page.locator("#signin-message")).to_contain_text("invalid or revoked token")
        expect(page.locator("#live-state")).to_have_attribute("data-state", "signin")

        sign_out(page)
        sign_in(page, tokens["viewer"])
        expect(page.locator("#signin summary")).to_have_text("Signed in · viewer-token (viewer)")
        page.goto(f"{url}/ui/run.html?id={run_id}")
        wait_chart(page)
        expect(page.get_by_role("button", name="Decay now")).to_be_disabled()
        expect(page.get_by_role("button", name="Stop the run…")).to_be_disabled()
        expect(page.locator("#controls-note")).to_contain_text(
            "signed in as viewer-token (viewer): deciding and acting need an operator token"
        )
        expect(page.get_by_role("button", name="Save notes and tags")).to_be_disabled()
        expect(page.locator("#notes-status")).to_contain_text("editing needs a worker or operator token")
        shot(page, "ux-viewer")

        sign_out(page)
        sign_in(page, tokens["operator"])
        expect(page.get_by_role("button", name="Decay now")).to_be_enabled()
        expect(page.locator("#signin summary")).to_have_text("Signed in · operator-token (operator)")


# --- 4: hovers with context --------------------------------------------------------------------------------------


def test_a_hover_says_step_epoch_time_stage_and_lr(server: LiveServer, client: httpx.Client, tab: Tab) -> None:
    page = tab.page
    run_id = staged_run(client, "context", {61: 0.01})
    assert server.app.state.stagewatch.live.wait_idle(timeout=10)
    open_run(page, server, run_id)
    page.wait_for_function("() => document.getElementById('chart').layout.shapes.length > 2")
    trace = trace_index(page, "raw", "train/loss")
    index = page.evaluate("([t]) => document.getElementById('chart').data[t].x.indexOf(80)", [trace])
    page.mouse.move(*point_on_screen(page, trace, index))
    info = page.locator("#hover-info")
    expect(info).to_contain_text("step 80")
    expect(info).to_contain_text("epoch 8")
    expect(info).to_contain_text("stage S1")
    expect(info).to_contain_text("LR 0.01")
    expect(info).to_have_text(re.compile(r"\d{1,2}:\d{2}:\d{2}"))  # the point's wall time
    # A stage has one colour: its band behind the panels is its ribbon's colour in the strip, faint.
    shapes = page.evaluate("() => document.getElementById('chart').layout.shapes")
    ribbons = [s["fillcolor"] for s in shapes if (s.get("label") or {}).get("text", "").startswith("S")]
    bands = [s["fillcolor"] for s in shapes if s["yref"].endswith("domain") and s["xref"] == "x2"]
    rgb = [tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5)) for colour in ribbons]
    assert [band.startswith(f"rgba({r}, {g}, {b},") for band, (r, g, b) in zip(bands, rgb, strict=True)] == [
        True
    ] * len(ribbons), (ribbons, bands)


def test_compare_hover_shows_every_run_at_that_x(server: LiveServer, client: httpx.Client, tab: Tab) -> None:
    page = tab.page
    first = staged_run(client, "ad-approve-seed-1", {61: 0.01})
    second = staged_run(client, "ad-approve-seed-2", {41: 0.01})
    assert server.app.state.stagewatch.live.wait_idle(timeout=10)
    page.goto(f"{server.url}/ui/compare.html?runs={first},{second}")
    wait_chart(page)
    trace = trace_index(page, "raw", "train/loss", first)
    page.mouse.move(*point_on_screen(page, trace, 49))
    label = page.locator("#chart .hoverlayer")
    expect(label).to_contain_text(f"#{first} ad-approve-seed-1")
    expect(label).to_contain_text(f"#{second} ad-approve-seed-2")
    info = page.locator("#hover-info")
    expect(info).to_contain_text(f"#{first} ad-approve-seed-1")
    expect(info).to_contain_text(f"#{second} ad-approve-seed-2")
    expect(info).to_contain_text("step 50")
    # Lane labels are told apart by run id even where the names' first characters are the same.
    ticks = page.evaluate("() => document.getElementById('chart').layout.yaxis.ticktext.join(' ')")
    assert f"#{first} " in ticks and f"#{second} " in ticks
    shot(page, "ux-compare-hover")


# --- 8: one colour per run ---------------------------------------------------------------------------------------


def colour_of(page: Page, selector: str) -> str:
    """A swatch's colour as "#rrggbb"."""
    # Queried afresh until it has one: live updates can replace a row between finding it and reading it.
    handle = page.wait_for_function(
        "(sel) => { const el = document.querySelector(sel); return el && getComputedStyle(el).backgroundColor; }",
        arg=selector,
    )
    rgb: str = handle.json_value()
    parts = [int(v) for v in re.findall(r"\d+", rgb)[:3]]
    assert len(parts) == 3, (selector, rgb)
    return "#" + "".join(f"{v:02x}" for v in parts)


def test_a_run_keeps_its_colour_on_every_page(server: LiveServer, client: httpx.Client, tab: Tab) -> None:
    page = tab.page
    ids = [staged_run(client, f"run-{i}", {61: 0.01}, steps=80) for i in range(3)]
    a, b, c = ids
    seen: dict[int, dict[str, str]] = {run: {} for run in ids}
    for order in ([a, b, c], [c, a], [b, c]):
        page.goto(f"{server.url}/ui/compare.html?runs={','.join(map(str, order))}")
        wait_chart(page)
        expect(page.locator("#run-legend li")).to_have_count(len(order))
        for run in order:
            expect(page.locator("#run-legend")).to_contain_text(f"#{run} run-")
            seen[run][f"legend {order}"] = colour_of(page, f'#run-legend li[data-run="{run}"] .swatch')
            seen[run][f"line {order}"] = page.evaluate(
                "([run]) => document.getElementById('chart').data.find((t) => t.meta && t.meta.run === run"
                " && t.meta.role === 'raw').line.color",
                [run],
            )
    page.goto(f"{server.url}/ui/")
    expect(page.locator("#runs tr")).to_have_count(3)
    for run in ids:
        seen[run]["runs page"] = colour_of(page, f'tr[data-run="{run}"] .swatch')
    open_run(page, server, a)
    seen[a]["run page"] = colour_of(page, "#run-name .swatch")
    for run, colours in seen.items():
        assert len(set(colours.values())) == 1, (run, colours)
    assert len({next(iter(c.values())) for c in seen.values()}) == 3, "three runs, three colours"


# --- 9: offline export -------------------------------------------------------------------------------------------


def test_no_plotly_cloud_and_the_png_is_named_after_the_run(server: LiveServer, client: httpx.Client, tab: Tab) -> None:
    page = tab.page
    run_id = staged_run(client, "resnet-lr0.1", {61: 0.01}, steps=40)
    open_run(page, server, run_id)
    page.locator("#chart").hover()
    buttons = page.locator("#chart .modebar-btn")
    expect(buttons.first).to_be_attached()
    titles = [buttons.nth(i).get_attribute("data-title") or "" for i in range(buttons.count())]
    assert not [t for t in titles if re.search(r"cloud|chart studio|share|edit", t, re.I)], titles
    assert page.locator("#chart a[href*='plot.ly'], #chart a[href*='plotly.com']").count() == 0
    context = page.evaluate("() => document.getElementById('chart')._context")
    assert context.get("showSendToCloud") is not True and context.get("showEditInChartStudio") is not True
    with page.expect_download() as download:
        page.locator("#chart .modebar-btn[data-title^='Download as PNG']").click()
    assert download.value.suggested_filename == "resnet-lr0.1.png"


# --- 10: dark mode -----------------------------------------------------------------------------------------------


def test_dark_mode_follows_the_system_and_the_toggle_is_kept(server: LiveServer, browser: Browser) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        run_id = staged_run(client, "dark", {61: 0.01}, steps=40)
    context = browser.new_context(viewport={"width": 1400, "height": 900}, color_scheme="dark")
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        open_run(page, server, run_id)
        background = "() => getComputedStyle(document.body).backgroundColor"
        assert page.evaluate(background) == "rgb(13, 17, 23)"
        page.wait_for_function("() => document.getElementById('chart').layout.paper_bgcolor === '#0d1117'")
        shot(page, "ux-dark")
        page.get_by_role("button", name="Switch to the light theme").click()
        page.wait_for_function("() => document.getElementById('chart').layout.paper_bgcolor === '#ffffff'")
        page.reload()
        wait_chart(page)
        assert page.evaluate(background) == "rgb(255, 255, 255)"  # the choice outlives the page
        expect(page.get_by_role("button", name="Switch to the dark theme")).to_be_visible()
        assert errors == []
    finally:
        context.close()


# --- 6 and 5: log ticks, smoothing --------------------------------------------------------------------------------


def axis_of(page: Page, key: str) -> dict[str, Any]:
    axis: dict[str, Any] = page.evaluate(
        """([key]) => { const gd = document.getElementById('chart');
            const t = gd.data.find((t) => t.meta && t.meta.key === key);
            return gd.layout[t.yaxis.replace('y', 'yaxis')]; }""",
        [key],
    )
    return axis


def test_log_ticks_are_whole_values(server: LiveServer, client: httpx.Client, tab: Tab) -> None:
    page = tab.page
    run_id = staged_run(client, "ticks", {41: 0.01, 81: 0.001})
    open_run(page, server, run_id)
    axis = axis_of(page, "lr")
    assert axis["type"] == "log"
    assert axis["tickvals"], axis
    for value, text in zip(axis["tickvals"], axis["ticktext"], strict=True):
        assert float(text) == pytest.approx(value), (value, text)  # "0.02", never a bare "2"
    rendered = page.locator("#chart .yaxislayer-above text").all_text_contents()
    assert "0.01" in rendered and "0.1" in rendered


def test_smoothing_is_scaled_to_each_series_density(server: LiveServer, client: httpx.Client, tab: Tab) -> None:
    page = tab.page
    run_id = staged_run(client, "smooth", {61: 0.01})  # 120 points of train/loss, 12 of test/accuracy
    open_run(page, server, run_id, "#smooth=0.9")
    page.wait_for_function("() => document.getElementById('chart').data.some((t) => t.meta?.role === 'smoothed')")
    traces = page.evaluate(
        """() => document.getElementById('chart').data.filter((t) => t.meta && t.meta.key)
            .map((t) => ({ ...t.meta, last: t.y[t.y.length - 1] }))"""
    )
    by = {(t["key"], t["role"]): t for t in traces}
    dense, sparse = by[("train/loss", "smoothed")], by[("test/accuracy", "smoothed")]
    assert dense["weight"] > sparse["weight"]  # fewer points, less smoothing
    assert sparse["weight"] < 0.1
    # The sparse curve ends near its raw value (a flat 0.9 would leave it far behind).
    assert sparse["last"] == pytest.approx(by[("test/accuracy", "raw")]["last"], rel=0.01)
    # The raw line stays, faint, and counts for the y-axis when zoomed.
    page.locator("#zoom-from").fill("10")
    page.locator("#zoom-to").fill("60")
    page.get_by_role("button", name="Zoom to steps").click()
    page.wait_for_function(
        """() => { const gd = document.getElementById('chart');
            const t = gd.data.find((t) => t.meta && t.meta.key === 'train/loss');
            return gd.layout[t.yaxis.replace('y', 'yaxis')].autorange === false; }"""
    )
    raw = page.evaluate(
        """() => { const t = document.getElementById('chart').data.find((t) => t.meta && t.meta.role === 'raw'
            && t.meta.key === 'train/loss'); return t.y.filter((_, i) => t.x[i] >= 10 && t.x[i] <= 60); }"""
    )
    low, high = axis_of(page, "train/loss")["range"]
    assert low <= min(raw) and high >= max(raw)


# --- 11: per-run numbers and finished stages ------------------------------------------------------------------


def test_decisions_are_numbered_per_run_and_a_finished_run_has_no_open_stage(
    server: LiveServer, client: httpx.Client, tab: Tab
) -> None:
    page = tab.page
    first = staged_run(client, "first", {61: 0.01}, steps=40)
    second = staged_run(client, "second", {61: 0.01}, steps=40)
    for run in (first, second):
        response = client.post(f"/api/v1/runs/{run}/commands", json={"action": "decay", "factor": 0.5})
        assert response.status_code in (200, 201), response.text
    assert client.patch(f"/api/v1/runs/{second}", json={"status": "finished"}).status_code == 200
    open_run(page, server, second)
    rows = page.locator("#decisions tr")
    expect(rows).to_have_count(1)
    expect(rows.first.locator("th")).to_have_text("1")  # the API's id is 2
    expect(page.locator("#stages")).not_to_contain_text("(open)")
    expect(page.locator("#stages")).to_contain_text("1\u201340")


# --- 12: created and duration columns, CSV export from compare ------------------------------------------------


def test_runs_table_has_created_and_duration(server: LiveServer, client: httpx.Client, tab: Tab) -> None:
    page = tab.page
    run_id = staged_run(client, "timed", {61: 0.01}, steps=40)
    page.goto(f"{server.url}/ui/")
    head = page.locator("#runs-head")
    expect(head).to_contain_text("Created")
    expect(head).to_contain_text("Duration")
    cells = page.locator(f'tr[data-run="{run_id}"] td')
    expect(cells.last).to_have_text(re.compile(r"^\d+ s$"))  # ingested within a few seconds of its creation
    expect(cells.nth(-2)).to_have_text(re.compile(r"^[A-Z][a-z]{2} \d{1,2}, \d{2}:\d{2}$"))


def test_compare_exports_a_csv_per_run(server: LiveServer, client: httpx.Client, tab: Tab, tmp_path: Path) -> None:
    page = tab.page
    first = staged_run(client, "first", {61: 0.01}, steps=40)
    second = staged_run(client, "second", {61: 0.01}, steps=30)
    page.goto(f"{server.url}/ui/compare.html?runs={first},{second}")
    wait_chart(page)
    downloads: list[Download] = []
    page.on("download", lambda download: downloads.append(download))
    page.get_by_role("button", name="Export CSV (one file per run)").click()
    wait_until(lambda: page.evaluate("() => true") and len(downloads) == 2, "two downloads")
    names = sorted(d.suggested_filename for d in downloads)
    assert names == [f"run-{first}-metrics.csv", f"run-{second}-metrics.csv"]
    for download in downloads:
        saved = tmp_path / download.suggested_filename
        download.save_as(saved)
        lines = saved.read_text().splitlines()
        assert lines[0] == "key,step,value,epoch,time"
        assert len(lines) > 30


def test_config_values_become_columns_picked_by_the_user(server: LiveServer, client: httpx.Client, tab: Tab) -> None:
    page = tab.page
    small = make_run(client, name="small-batch", config={"batch_size": 32, "optimizer": {"momentum": 0.9}})
    large = make_run(client, name="large-batch", config={"batch_size": 256, "optimizer": {"momentum": 0.8}})
    page.goto(f"{server.url}/ui/")
    expect(page.locator("#runs tr")).to_have_count(2)
    head = page.locator("#runs-head")
    expect(head).not_to_contain_text("batch_size")
    page.locator("#column-picker summary").click()
    page.get_by_label("batch_size").check()
    page.get_by_label("optimizer.momentum").check()
    expect(page.locator(f'tr[data-run="{small}"] td[data-config="batch_size"]')).to_have_text("32")
    expect(page.locator(f'tr[data-run="{large}"] td[data-config="optimizer.momentum"]')).to_have_text("0.8")
    head.get_by_role("button", name="batch_size").click()  # sortable: numbers high to low first
    expect(page.locator("#runs tr").first).to_have_attribute("data-run", str(large))
    page.reload()  # the picked columns are kept on the device
    expect(page.locator(f'tr[data-run="{small}"] td[data-config="batch_size"]')).to_have_text("32")


def test_notes_and_tags_are_edited_in_the_page(server: LiveServer, client: httpx.Client, tab: Tab) -> None:
    page = tab.page
    run_id = staged_run(client, "noted", {61: 0.01}, steps=30)
    open_run(page, server, run_id)
    page.get_by_label("Tags, comma-separated").fill("baseline, sgd baseline")
    page.get_by_label("Notes", exact=True).fill("LR 0.1 diverged once at step 12")
    page.get_by_role("button", name="Save notes and tags").click()
    expect(page.locator("#notes-status")).to_have_text("Done.")
    expect(page.locator("#run-meta")).to_contain_text("tags baseline, sgd")
    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert (run["tags"], run["notes"]) == (["baseline", "sgd"], "LR 0.1 diverged once at step 12")
    expect(page.locator("#audit")).to_contain_text("Run updated")
