"""The inspector's JSON over HTTP: `GET /runs` (paged, filtered, 400s), `GET /stats`, the
page and its files (public, shipped in the package), and the live notices stream.

The page itself, in a real browser, is `test_inspector_browser.py`.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest
from inspector_support import answer_by_path, inspector_runtime
from sse_support import collect
from starlette.applications import Starlette
from starlette.routing import Mount
from test_embedding import HypercornServer
from waiting import wait_until

TOKEN = "inspector-token"


def test_runs_are_listed_newest_first_in_pages_with_sends_per_destination(
    make_runtime, make_api, make_sink
):
    sink = make_sink(answer_by_path)
    runtime = inspector_runtime(make_runtime, sink)
    run_ids = [runtime.run("p_orders", {"n": n}).run_id for n in range(7)]
    assert runtime.flush(timeout=30)
    api = make_api(runtime)
    with httpx.Client(base_url=api.url, timeout=10) as client:
        seen, before, pages = [], None, 0
        while True:
            params = {"limit": 3, **({"before": before} if before else {})}
            page = client.get("/runs", params=params)
            assert page.status_code == 200, page.text
            answer = page.json()
            pages += 1
            assert len(answer["runs"]) <= 3
            seen += answer["runs"]
            before = answer["next"]
            if before is None:
                break
        assert pages == 3
        assert [run["run_id"] for run in seen] == list(reversed(run_ids))
        assert answer["kept"] == 7 and answer["scope"] == "node"
        assert answer["workflows"] == ["p_orders", "p_refunds"]
        newest = seen[0]
        assert newest["workflow_id"] == "p_orders" and newest["status"] == "succeeded"
        assert newest["sends"] == 2 and newest["started_at"] > 0
        zero = {"retrying": 0, "failed": 0, "pending": 0}
        assert newest["destinations"] == {
            "http": {"delivered": 1, **zero},
            "sse": {"delivered": 1, **zero},
        }
        # A run no longer kept (or never run) ends the list: nothing older is kept.
        assert client.get("/runs", params={"before": "r-gone"}).json()["runs"] == []


def test_runs_are_filtered_by_workflow_status_destination_and_delivery_status(
    make_runtime, make_api, make_sink
):
    sink = make_sink(answer_by_path)
    runtime = inspector_runtime(make_runtime, sink)
    delivered = runtime.run("p_orders", {"n": 1}).run_id
    refused = runtime.run("p_orders", {"n": 2, "path": "/status/404"}).run_id
    refund = runtime.run("p_refunds", {"n": 3}).run_id
    failed = runtime.run("p_refunds", {"n": 4, "fail": True}).run_id
    assert runtime.flush(timeout=30)
    api = make_api(runtime)

    def listed(**params: str) -> list[str]:
        answer = httpx.get(f"{api.url}/runs", params=params, timeout=10)
        assert answer.status_code == 200, answer.text
        return [run["run_id"] for run in answer.json()["runs"]]

    assert listed() == [failed, refund, refused, delivered]
    assert listed(workflow="p_refunds") == [failed, refund]
    assert listed(status="failed") == [failed]
    assert listed(workflow="p_orders", status="succeeded") == [refused, delivered]
    assert listed(destination="http") == [refused, delivered]
    assert listed(delivery="failed") == [refused]
    assert listed(destination="sse", delivery="failed") == []
    assert listed(destination="nowhere") == []
    # Empty values are no filter (what an HTML form sends for "any").
    assert listed(workflow="", status="") == [failed, refund, refused, delivered]
    answer = httpx.get(f"{api.url}/runs", params={"status": "failed"}, timeout=10).json()
    assert answer["filters"] == {"status": "failed"}
    failed_run = answer["runs"][0]
    assert failed_run["error"] == "RuntimeError: refund refused"
    assert failed_run["destinations"]["sse"]["delivered"] == 1
    # The run's own page has what the list leaves out: the HTTP detail, the dead letter.
    shown = httpx.get(f"{api.url}/runs/{refused}", timeout=10).json()
    http = next(record for record in shown["deliveries"] if record["destination"] == "http")
    assert http["status"] == "failed" and http["detail"]["status_code"] == 404
    assert http["detail"]["response"] == "no such hook"
    assert http["detail"]["dead_letter"].endswith(".jsonl")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit must be a whole number from 1 to 500"),
        ("limit=501", "limit must be a whole number from 1 to 500"),
        ("limit=ten", "limit must be a whole number from 1 to 500"),
        ("limit=-1", "limit must be a whole number from 1 to 500"),
        ("status=lost", "status must be one of running, succeeded, ended, failed"),
        ("delivery=done", "delivery must be one of delivered, retrying, failed, pending"),
        ("workflow=p_nope", "workflow must be a registered workflow; 'p_nope' is not"),
        ("before=" + "r" * 201, "before must be a non-empty text of at most 200"),
        ("statuss=failed", "unknown parameter 'statuss'"),
    ],
)
def test_bad_list_parameters_get_400_naming_the_parameter_and_the_rule(
    make_runtime, make_api, make_sink, query, message
):
    runtime = inspector_runtime(make_runtime, make_sink(answer_by_path))
    api = make_api(runtime)
    answer = httpx.get(f"{api.url}/runs?{query}", timeout=10)
    assert answer.status_code == 400
    assert message in answer.json()["error"]


def test_recent_runs_from_python_checks_its_arguments(make_runtime, make_sink):
    runtime = inspector_runtime(make_runtime, make_sink(answer_by_path))
    first = runtime.run("p_refunds", {"n": 1}).run_id
    second = runtime.run("p_refunds", {"n": 2}).run_id
    page = runtime.recent_runs(limit=1)
    assert [run.run_id for run in page.runs] == [second] and page.next == second
    assert [run.run_id for run in runtime.recent_runs(before=page.next).runs] == [first]
    with pytest.raises(ValueError, match="limit must be a whole number from 1 to 500"):
        runtime.recent_runs(limit=True)
    with pytest.raises(ValueError, match="status must be one of"):
        runtime.recent_runs(status="lost")


def test_stats_and_the_page_files_with_a_token(make_runtime, make_api, make_sink):
    runtime = inspector_runtime(make_runtime, make_sink(answer_by_path), api_token=TOKEN)
    runtime.run("p_refunds", {"n": 1})
    api = make_api(runtime)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=api.url, timeout=10) as client:
        # The page and its files hold no data: the page answers 401 without the token, like
        # every path of the API, with itself as the body (a browser shows it: it asks for
        # the token); its script and style are served without it...
        page = client.get("/inspector")
        assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
        assert page.headers["www-authenticate"].startswith("Bearer")
        assert 'id="token-form"' in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert 'src="inspector/inspector.js"' in page.text  # relative: works under a prefix
        assert (
            client.get("/inspector", headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
        assert client.get("/inspector", headers=bearer).status_code == 200
        for name, kind in (("inspector.js", "text/javascript"), ("inspector.css", "text/css")):
            asset = client.get(f"/inspector/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert client.get("/inspector/secrets.txt").status_code == 404
        # ... what it reads is not.
        for path in ("/runs", "/stats", "/runs/r-x"):
            assert client.get(path).status_code == 401, path
        stats = client.get("/stats", headers=bearer)
        assert stats.status_code == 200
        assert stats.json()["runs"] == {"succeeded": 1}
        assert client.get("/runs", headers=bearer).json()["runs"][0]["workflow_id"] == "p_refunds"
    events = f"{api.url}/inspector/events"
    assert collect(events, lambda got: True).status == 401
    assert collect(f"{events}?token=wrong", lambda got: True).status == 401


def _notices_while(url: str, feed: Any, action: Any, enough: Any) -> Any:
    """The notices a page at `url` gets while `action()` runs (once it is connected),
    until `enough(collected)`."""
    received: list[Any] = []
    reader = threading.Thread(target=lambda: received.append(collect(url, enough)))
    reader.start()
    try:
        wait_until(lambda: feed.hub.subscribers == 1)
        outcome = action()
    finally:
        reader.join(30)
    return received[0], outcome


def test_the_notices_stream_tells_of_runs_ending_and_deliveries_becoming_final(
    make_runtime, make_api, make_sink
):
    runtime = inspector_runtime(make_runtime, make_sink(answer_by_path))
    api = make_api(runtime)
    feed = api.app.state.inspector.feed
    streamed, result = _notices_while(
        f"{api.url}/inspector/events",
        feed,
        lambda: runtime.run("p_refunds", {"n": 1}),
        lambda got: {"run", "delivery"} <= {event.type for event in got.events},
    )
    assert streamed.status == 200
    notices = {event.type: json.loads(event.data) for event in streamed.events}
    assert notices["run"] == {
        "run_id": result.run_id,
        "workflow_id": "p_refunds",
        "status": "succeeded",
        "started_at": result.started_at,
    }
    delivery = notices["delivery"]
    assert delivery["run_id"] == result.run_id and delivery["destination"] == "sse"
    assert delivery["status"] == "delivered"
    # The page went away: the ledger's listeners go with it.
    wait_until(lambda: feed.hub.subscribers == 0)
    ledger = runtime.ledger
    wait_until(
        lambda: (
            feed._delivery_final not in ledger._listeners
            and feed._run_ended not in ledger._run_listeners
        )
    )


def test_notices_go_on_after_the_runtime_is_started_again(make_runtime, make_sink):
    runtime = inspector_runtime(make_runtime, make_sink(answer_by_path))
    app = Starlette(routes=[Mount("/outbound", app=runtime.asgi_app())])  # one app, two starts
    feed = app.routes[0].app.state.inspector.feed
    with HypercornServer(app) as server:
        for start in range(2):
            streamed, _result = _notices_while(
                f"{server.url}/outbound/inspector/events",
                feed,
                lambda: runtime.run("p_refunds", {"n": 0}),
                lambda got: got.events,
            )
            assert streamed.events, f"no notice after start {start + 1}"
            wait_until(lambda: feed.hub.subscribers == 0)
            runtime.stop(drain=True, timeout=10)
            runtime.start()


def test_a_run_keeps_its_event_as_json_text_cut_to_the_excerpt_limit(make_runtime, make_api):
    runtime = make_runtime(start=False, run_event_excerpt=60)

    @runtime.workflow("p_changes_its_event")
    def changes_its_event(event: Any, ctx: Any) -> None:
        event["seen"] = True  # after the run started: the kept event is what it was called with

    runtime.start()
    api = make_api(runtime)
    with httpx.Client(base_url=api.url, timeout=10) as client:

        def event_of(body: bytes) -> Any:
            posted = client.post(
                "/workflows/p_changes_its_event/events",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            assert posted.status_code == 202, posted.text
            run_id = posted.json()["run_id"]
            wait_until(lambda: client.get(f"/runs/{run_id}").json()["status"] != "running")
            answer = client.get(f"/runs/{run_id}")
            assert answer.status_code == 200
            return answer.json()["event"]

        assert event_of(b'{"order": "A-1", "total": 12.5}') == '{"order":"A-1","total":12.5}'
        long_text = event_of(json.dumps({"note": "x" * 500}).encode())
        assert long_text == '{"note":"' + "x" * 50 + "…" and len(long_text) == 60
        # A lone surrogate parsed from a JSON escape cannot be UTF-8: it stays an escape,
        # and the run's page still answers.
        assert event_of(b'{"name": "\\ud800"}') == '{"name":"\\ud800"}'


def test_an_event_json_cannot_hold_is_kept_as_its_bounded_repr(make_runtime):
    runtime = make_runtime(start=False)
    runtime.workflow("p_anything")(lambda event, ctx: None)
    runtime.start()

    class Order:
        def __repr__(self) -> str:
            return "Order(id=7)"

    assert runtime.run("p_anything", Order()).event == "Order(id=7)"
    assert runtime.run("p_anything", {"price": float("nan")}).event == "{'price': nan}"
    assert runtime.run("p_anything", None).event == "null"
    big = runtime.run("p_anything", {"blob": b"x" * 100_000}).event
    assert big is not None and len(big) < 1000 and big.startswith("{'blob': b'xxx")


def test_no_event_is_kept_when_the_excerpt_limit_is_zero(make_runtime, make_sink):
    runtime = inspector_runtime(make_runtime, make_sink(answer_by_path), run_event_excerpt=0)
    result = runtime.run("p_refunds", {"card": "4111 1111 1111 1111"})
    assert result.event is None
    assert runtime.run_result(result.run_id).as_dict()["event"] is None


def test_a_bad_excerpt_limit_is_refused_naming_the_setting(make_runtime):
    with pytest.raises(ValueError, match="run_event_excerpt must be at least 0, got -1"):
        make_runtime(run_event_excerpt=-1)


def test_runs_in_progress_are_listed_apart_and_told_live(make_runtime, make_api):
    runtime = make_runtime(start=False)
    release = threading.Event()

    @runtime.workflow("p_slow")
    def slow(event: Any, ctx: Any) -> None:
        release.wait(30)
        ctx.send.sse(channel="slow", payload=event)

    runtime.workflow("p_quick")(lambda event, ctx: None)
    runtime.start()
    api = make_api(runtime)
    feed = api.app.state.inspector.feed
    try:
        quick = runtime.run("p_quick", {}).run_id
        streamed, slow_run = _notices_while(
            f"{api.url}/inspector/events",
            feed,
            lambda: runtime.submit("p_slow", {"n": 1}),
            lambda got: any('"running"' in event.data for event in got.events),
        )
        running_notice = json.loads(
            next(event.data for event in streamed.events if '"running"' in event.data)
        )
        assert running_notice["run_id"] == slow_run.run_id
        assert running_notice["workflow_id"] == "p_slow"
        with httpx.Client(base_url=api.url, timeout=10) as client:
            page = client.get("/runs").json()
            assert [run["run_id"] for run in page["running"]] == [slow_run.run_id]
            assert page["running"][0]["status"] == "running" and page["running_total"] == 1
            assert [run["run_id"] for run in page["runs"]] == [quick]
            only_running = client.get("/runs", params={"status": "running"}).json()
            assert [run["run_id"] for run in only_running["running"]] == [slow_run.run_id]
            assert only_running["runs"] == []
            # Filters a run in progress cannot match yet, and later pages, show none.
            for params in ({"workflow": "p_quick"}, {"destination": "sse"}, {"before": quick}):
                assert client.get("/runs", params=params).json()["running"] == [], params
            assert client.get("/runs", params={"status": "succeeded"}).json()["running"] == []
        release.set()
        assert slow_run.result(10).status == "succeeded"
        page = runtime.recent_runs()
        assert page.running == [] and page.runs[0].run_id == slow_run.run_id
    finally:
        release.set()


def test_a_run_that_ends_while_the_list_is_read_is_listed_once_as_ended():
    from types import SimpleNamespace

    from outbound.run_list import RunQuery, list_runs

    ended = SimpleNamespace(
        run_id="r-1",
        workflow_id="p",
        status="succeeded",
        started_at=1.0,
        duration=0.1,
        sends=0,
        error=None,
    )
    still_running = SimpleNamespace(run_id="r-2", workflow_id="p", submitted_at=2.0)
    # r-1 was read as in progress, then its end reached the history before it was read.
    in_progress = [SimpleNamespace(run_id="r-1", workflow_id="p", submitted_at=1.0), still_running]
    page = list_runs([(ended, [])], RunQuery(), in_progress=in_progress)
    assert [run.run_id for run in page.runs] == ["r-1"]
    assert [run.run_id for run in page.running] == ["r-2"] and page.running_total == 1


def test_a_long_text_event_is_cut_as_if_it_were_encoded_whole():
    from outbound.destinations.json_encoding import json_encoder
    from outbound.event_excerpt import event_excerpt

    text = 'a "quoted"\nline\t\u00e9\u2028 ' * 50_000
    whole = json_encoder(compact=True)(text)
    assert event_excerpt(text, 100) == whole[:99] + "…"
    assert event_excerpt("short", 100) == '"short"'
