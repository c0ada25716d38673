"""The inspector page in a real browser: headless Chromium driven over the DevTools protocol.

A run posted through `POST /workflows/{id}/events` shows in the list; clicking
it shows its deliveries and their statuses; a second run appears without a
reload (over the page's notices stream); the token is asked for once; the page
works with the API mounted under a prefix. Clicks and typing are real input
events (`chromium_support.Tab`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
from chromium_support import Browser, Tab, needs_chromium
from inspector_support import answer_by_path, inspector_runtime
from starlette.applications import Starlette
from starlette.routing import Mount
from test_embedding import HypercornServer

TOKEN = "inspector-browser-token"


def _row(run_id: str) -> str:
    return f'tr[data-run-id="{run_id}"]'


def _shown_runs(tab: Tab) -> list[str]:
    return tab.evaluate("[...document.querySelectorAll('#runs tr')].map(r => r.dataset.runId)")


def _deliveries(tab: Tab) -> list[list[str]]:
    """[destination, status] of each delivery row of the run shown."""
    return tab.evaluate(
        "[...document.querySelectorAll('#deliveries tr')]"
        ".map(r => [r.querySelector('th').firstChild.textContent, r.dataset.status])"
    )


def _live(tab: Tab) -> None:
    tab.wait_for("document.getElementById('live').textContent === 'Live'")


def _post(client: httpx.Client, prefix: str, event: dict[str, Any]) -> str:
    accepted = client.post(f"{prefix}/workflows/p_orders/events", json=event)
    assert accepted.status_code == 202, accepted.text
    return accepted.json()["run_id"]  # type: ignore[no-any-return]


def _list_open_and_live(tab: Tab, client: httpx.Client, prefix: str) -> tuple[str, str]:
    """The scenario every test shares: a posted run is listed; a second appears live;
    clicking the first shows its deliveries. Returns both run ids."""
    first = _post(client, prefix, {"n": 1})
    tab.wait_for(f"document.querySelector('{_row(first)} .count-delivered')")
    tab.wait_for(f"document.querySelectorAll('{_row(first)} .count-delivered').length === 2")
    row = tab.evaluate(f"document.querySelector('{_row(first)}').innerText")
    assert "p_orders" in row and "succeeded" in row
    _live(tab)
    tab.evaluate("window.stillTheSamePage = true")
    second = _post(client, prefix, {"n": 2, "path": "/status/404"})
    tab.wait_for(f"document.querySelector('{_row(second)} .count-failed')")
    assert _shown_runs(tab)[:2] == [second, first]
    assert tab.evaluate("window.stillTheSamePage") is True  # no reload
    tab.click(f"{_row(first)} a")
    tab.wait_for("!document.getElementById('run-section').hidden")
    tab.wait_for("document.querySelectorAll('#deliveries tr').length === 2")
    assert tab.evaluate("document.getElementById('run-title').textContent") == f"Run {first}"
    assert sorted(_deliveries(tab)) == [["http", "delivered"], ["sse", "delivered"]]
    http_detail = tab.evaluate("document.querySelector('#deliveries tr .detail').innerText")
    assert "HTTP status" in http_detail and "200" in http_detail and "received" in http_detail
    # Its event, as it was posted (pretty-printed).
    assert json.loads(tab.evaluate("document.getElementById('run-event').textContent")) == {"n": 1}
    return first, second


@needs_chromium
def test_the_list_shows_posted_runs_live_and_a_run_its_deliveries(
    make_runtime, make_api, make_sink, tmp_path: Path
):
    runtime = inspector_runtime(make_runtime, make_sink(answer_by_path))
    api = make_api(runtime)
    with httpx.Client(base_url=api.url, timeout=10) as client, Browser(tmp_path) as browser:
        tab = browser.open(f"{api.url}/inspector")
        tab.wait_for("!document.getElementById('list-section').hidden")
        first, second = _list_open_and_live(tab, client, "")
        # The failed delivery: where it was dead-lettered, and how to replay it.
        _back_to_the_list(tab)
        tab.wait_for(f"document.querySelector('{_row(second)}')")
        tab.click(f"{_row(second)} a")
        tab.wait_for("document.querySelector('#deliveries .dead-letter')")
        assert sorted(_deliveries(tab)) == [["http", "failed"], ["sse", "delivered"]]
        dead = tab.evaluate("document.querySelector('#deliveries .dead-letter').innerText")
        assert "Dead-lettered to" in dead and ".jsonl" in dead
        assert "outbound replay --destination http --since" in dead
        # The search opens a run by its id.
        _back_to_the_list(tab)
        tab.type_into("#run-id", first)
        tab.click("#search button[type=submit]")
        tab.wait_for(f"document.getElementById('run-title').textContent === 'Run {first}'")
        assert sorted(_deliveries(tab)) == [["http", "delivered"], ["sse", "delivered"]]
        # Filters: only runs with a failed delivery.
        _back_to_the_list(tab)
        tab.wait_for("!document.getElementById('list-section').hidden")
        tab.evaluate("document.getElementById('f-delivery').value = 'failed'")
        tab.click("#filters button[type=submit]")
        tab.wait_for(f"document.querySelectorAll('#runs tr').length === 1 && {_shown(second)}")
        assert tab.errors == []


def _back_to_the_list(tab: Tab) -> None:
    """Back from a run's page to the list, once the list and health are drawn (a click
    before health is shown would land on a row that then moved)."""
    tab.click("#back")
    tab.wait_for(
        "!document.getElementById('list-section').hidden"
        " && !document.getElementById('health-section').hidden"
    )


def _shown(run_id: str) -> str:
    return f"document.querySelector('{_row(run_id)}') !== null"


@needs_chromium
def test_the_page_asks_for_the_token_once_and_uses_it(
    make_runtime, make_api, make_sink, tmp_path: Path
):
    runtime = inspector_runtime(make_runtime, make_sink(answer_by_path), api_token=TOKEN)
    api = make_api(runtime)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with (
        httpx.Client(base_url=api.url, timeout=10, headers=bearer) as client,
        Browser(tmp_path) as browser,
    ):
        tab = browser.open(f"{api.url}/inspector")
        tab.wait_for("!document.getElementById('token-section').hidden")
        assert tab.evaluate("document.getElementById('list-section').hidden") is True
        tab.type_into("#token-input", "not-the-token")
        tab.click("#token-form button[type=submit]")
        tab.wait_for("document.getElementById('token-problem').textContent.includes('refused')")
        tab.type_into("#token-input", TOKEN)
        tab.click("#token-form button[type=submit]")
        tab.wait_for("!document.getElementById('list-section').hidden")
        assert tab.evaluate("sessionStorage.getItem('outbound-inspector-token')") == TOKEN
        _list_open_and_live(tab, client, "")
        assert TOKEN not in tab.evaluate("location.href")
        # Asked once: a reload of the tab keeps using it.
        tab.navigate(f"{api.url}/inspector")
        tab.wait_for("!document.getElementById('list-section').hidden")
        assert tab.evaluate("document.getElementById('token-section').hidden") is True
        assert tab.errors == []


@needs_chromium
def test_the_page_works_under_a_mounted_prefix(make_runtime, make_sink, tmp_path: Path):
    runtime = inspector_runtime(make_runtime, make_sink(answer_by_path))
    app = Starlette(routes=[Mount("/outbound", app=runtime.asgi_app())])
    with (
        HypercornServer(app) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
        Browser(tmp_path) as browser,
    ):
        tab = browser.open(f"{server.url}/outbound/inspector")
        tab.wait_for("!document.getElementById('list-section').hidden")
        _list_open_and_live(tab, client, "/outbound")
        requested = tab.evaluate(
            "performance.getEntriesByType('resource').map(entry => new URL(entry.name).pathname)"
        )
        assert requested and all(path.startswith("/outbound/") for path in requested), requested
        assert json.dumps(tab.errors) == "[]"


@needs_chromium
def test_runs_in_progress_and_an_open_circuit_show_without_a_reload(
    make_runtime, make_api, make_sink, tmp_path: Path
):
    sink = make_sink(answer_by_path)
    runtime = make_runtime(start=False, http_circuit_failures=2, http_circuit_cool_down=30)
    release = threading.Event()

    @runtime.workflow("p_slow")
    def slow(event: Any, ctx: Any) -> None:
        release.wait(30)
        ctx.send.sse(channel="slow", payload=event)

    @runtime.workflow("p_hook")
    def hook(event: Any, ctx: Any) -> None:
        ctx.send.http(url=f"{sink.url}{event['path']}", data=event)

    runtime.start()
    api = make_api(runtime)
    try:
        with httpx.Client(base_url=api.url, timeout=10) as client, Browser(tmp_path) as browser:
            tab = browser.open(f"{api.url}/inspector")
            tab.wait_for("!document.getElementById('list-section').hidden")
            _live(tab)
            tab.evaluate("window.stillTheSamePage = true")
            posted = client.post("/workflows/p_slow/events", json={"n": 1})
            slow_run = posted.json()["run_id"]
            running = f"document.querySelector('{_row(slow_run)}[data-status=running]')"
            tab.wait_for(running)
            row = tab.evaluate(f"{running}.innerText")
            assert "p_slow" in row and "running" in row and "when it ends" in row
            release.set()
            tab.wait_for(f"document.querySelector('{_row(slow_run)}[data-status=succeeded]')")
            # An endpoint failing twice in a row opens its host's circuit: the health card
            # says so (it reloads on its own: no run ends when a circuit opens).
            client.post("/workflows/p_hook/events", json={"path": "/status/503"})
            host = sink.url.removeprefix("http://")
            tab.wait_for(
                "document.getElementById('destinations').innerText.includes('circuit open to')"
            )
            trouble = tab.evaluate("document.getElementById('destinations').innerText")
            assert host in trouble and "after 2 failures" in trouble, trouble
            counters = tab.evaluate("document.getElementById('counters').innerText")
            assert "Open circuits\t1" in counters or "Open circuits\n1" in counters, counters
            assert tab.evaluate("window.stillTheSamePage") is True
            assert tab.errors == []
    finally:
        release.set()
        # The send behind the open circuit would hold a draining stop for its 5 s.
        runtime.stop(drain=False)


@needs_chromium
def test_thousands_of_runs_are_paged_and_a_burst_shows_the_newest(
    make_runtime, make_api, tmp_path: Path
):
    runtime = make_runtime(start=False)
    runtime.workflow("p_burst")(lambda event, ctx: ctx.send.sse(channel="burst", payload=event))
    runtime.start()
    api = make_api(runtime)
    with Browser(tmp_path) as browser:
        tab = browser.open(f"{api.url}/inspector")
        tab.wait_for("!document.getElementById('list-section').hidden")
        _live(tab)
        # A burst far past what notices tell one by one (`MAX_NOTICES`): the page is told
        # to reload once, and shows the newest page of 50, not thousands of rows.
        for n in range(3000):
            runtime.submit("p_burst", {"n": n})
        assert runtime.flush(timeout=60)
        # Newest first means by when they ended (8 pool workers end them out of order).
        first_page = [run.run_id for run in runtime.recent_runs(limit=50).runs]
        second_page = [
            run.run_id for run in runtime.recent_runs(limit=50, before=first_page[-1]).runs
        ]
        top_row = "document.querySelector('#runs tr')?.dataset.runId"
        tab.wait_for(f"{top_row} === '{first_page[0]}'")
        tab.wait_for("document.querySelectorAll('#runs tr[data-status=succeeded]').length === 50")
        assert _shown_runs(tab) == first_page
        tab.click("#older")
        tab.wait_for(f"{top_row} === '{second_page[0]}'")
        assert _shown_runs(tab) == second_page
        assert tab.evaluate("document.getElementById('page-label').textContent") == "Page 2"
        tab.click("#newer")
        tab.wait_for(f"{top_row} === '{first_page[0]}'")
        assert tab.errors == []
