"""A real browser subscribes: headless Chromium's EventSource with addEventListener(channel).

The page is served from one loopback origin (an `HttpSink` answering with
HTML) and subscribes to the API on another origin, so CORS and the `?token=`
query parameter are exercised as a browser really uses them. The page posts
what it received back to its own origin, and also writes it into the DOM.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from chromium_support import chromium_command, needs_chromium

from outbound.embedded import ReceivedRequest, SinkResponse

TOKEN = "browser-token"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>waiting</title></head>
<body><ul id="events"></ul>
<script>
const expected = %(expected)d;
const received = [];
const source = new EventSource(%(stream_url)s);
function record(event) {
  received.push({type: event.type, id: event.lastEventId, data: JSON.parse(event.data)});
  const item = document.createElement("li");
  item.textContent = event.type + " " + event.lastEventId + " " + event.data;
  document.getElementById("events").appendChild(item);
  if (received.length === expected) {
    source.close();
    document.title = "done";
    fetch("/report", {method: "POST", body: JSON.stringify(received)});
  }
}
source.addEventListener("orders", record);
source.addEventListener("refunds", record);
source.addEventListener("open", () => fetch("/opened", {method: "POST", body: "{}"}));
</script></body></html>
"""


def _page_server(make_sink: Any, page: str) -> Any:
    def answer(request: ReceivedRequest) -> SinkResponse:
        if request.method == "GET" and request.path == "/page":
            return SinkResponse(
                headers={"Content-Type": "text/html; charset=utf-8"}, body=page.encode("utf-8")
            )
        return SinkResponse(status=204, body=b"")

    return make_sink(answer)


def _wait_for(sink: Any, path: str, timeout: float) -> ReceivedRequest | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for request in list(sink.requests):
            if request.path == path:
                return request
        time.sleep(0.05)
    return None


def _streaming_runtime(make_runtime: Any) -> Any:
    runtime = make_runtime(start=False, api_token=TOKEN)

    @runtime.workflow("p_orders")
    def orders(event: Any, ctx: Any) -> None:
        ctx.send.sse(channel=event["channel"], payload=event)

    return runtime.start()


@needs_chromium
def test_browser_event_source_receives_history_and_live_events(
    make_runtime, make_api, make_sink, tmp_path: Path
):
    runtime = _streaming_runtime(make_runtime)
    api = make_api(runtime)
    for number in range(3):  # history, replayed on connect
        runtime.run("p_orders", {"channel": "orders", "n": number, "text": "two\nlines"})
    runtime.run("p_orders", {"channel": "ignored", "n": 99})  # no listener for this channel
    stream_url = f"{api.url}/pipelines/p_orders/sse?token={TOKEN}"
    page = _page_server(make_sink, PAGE % {"expected": 5, "stream_url": json.dumps(stream_url)})
    # The browser stays up until killed; its own session, so the whole group is killed.
    browser = subprocess.Popen(
        chromium_command(tmp_path, f"{page.url}/page"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        opened = _wait_for(page, "/opened", timeout=60)
        assert opened is not None, "the page's EventSource never opened"
        runtime.run("p_orders", {"channel": "refunds", "n": 3, "text": "live"})
        runtime.run("p_orders", {"channel": "orders", "n": 4, "text": "é ✓"})
        report = _wait_for(page, "/report", timeout=30)
        assert report is not None, f"the page did not receive every event: {page.requests}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGKILL)
        browser.wait(30)
    received = report.json()
    assert [(event["type"], event["id"], event["data"]["n"]) for event in received] == [
        ("orders", "1", 0),
        ("orders", "2", 1),
        ("orders", "3", 2),
        ("refunds", "5", 3),
        ("orders", "6", 4),
    ]
    assert received[0]["data"]["text"] == "two\nlines"
    assert received[4]["data"]["text"] == "é ✓"


@needs_chromium
def test_browser_dom_shows_the_replayed_history(make_runtime, make_api, make_sink, tmp_path):
    runtime = _streaming_runtime(make_runtime)
    api = make_api(runtime)
    for number in range(4):
        channel = "refunds" if number == 2 else "orders"
        runtime.run("p_orders", {"channel": channel, "n": number})
    stream_url = f"{api.url}/pipelines/p_orders/sse?token={TOKEN}"
    page = _page_server(make_sink, PAGE % {"expected": 4, "stream_url": json.dumps(stream_url)})
    dumped = subprocess.run(
        chromium_command(tmp_path, "--virtual-time-budget=10000", "--dump-dom", f"{page.url}/page"),
        capture_output=True,
        text=True,
        timeout=90,
        start_new_session=True,
    )
    items = re.findall(r"<li>(.*?)</li>", dumped.stdout)
    assert "<title>done</title>" in dumped.stdout, dumped.stdout[:2000]
    assert [item.split(" ", 2)[:2] for item in items] == [
        ["orders", "1"],
        ["orders", "2"],
        ["refunds", "3"],
        ["orders", "4"],
    ]
    assert json.loads(html.unescape(items[2].split(" ", 2)[2])) == {"channel": "refunds", "n": 2}
