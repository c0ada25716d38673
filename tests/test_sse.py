"""SSE streams over real HTTP on loopback: history, resume, keepalive, fan-out, slow subscribers."""

from __future__ import annotations

import functools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sse_support import SseParser, StalledClient, collect, fan_collect

from outbound import Runtime, SendError
from outbound.destinations.base import Deliver
from outbound.destinations.delivery import Send
from outbound.destinations.sse.hub import encode_frame
from outbound.embedded import free_port


def _streaming_runtime(make_runtime: Any, **config: Any) -> Runtime:
    runtime = make_runtime(start=False, **config)

    @runtime.workflow("p_orders")
    def orders(event: Any, ctx: Any) -> None:
        ctx.send.sse(channel=event.get("channel", "orders"), payload=event)

    @runtime.workflow("p_quiet")
    def quiet(event: Any, ctx: Any) -> None:
        pass

    return runtime.start()


def _publish(runtime: Runtime, count: int, start: int = 0, **extra: Any) -> None:
    for number in range(start, start + count):  # one after another: ids follow send order
        runtime.run("p_orders", {"n": number, **extra})
    assert runtime.flush(10)


def _wait_subscribers(runtime: Runtime, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while runtime.sse_hub.subscribers < count:
        assert time.monotonic() < deadline, f"only {runtime.sse_hub.subscribers} subscribers"
        time.sleep(0.01)


def _wait_subscribers_at_most(runtime: Runtime, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while runtime.sse_hub.subscribers > count:
        assert time.monotonic() < deadline, f"still {runtime.sse_hub.subscribers} subscribers"
        time.sleep(0.01)


def _payloads(collected: Any) -> list[Any]:
    return [json.loads(event.data) for event in collected.events]


def test_new_subscriber_gets_the_last_100_events_then_live_ones(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime)
    api = make_api(runtime)
    for number in range(150):  # one after another: ids follow send order
        runtime.run("p_orders", {"n": number})
    assert runtime.flush(10)
    url = f"{api.url}/pipelines/p_orders/sse"
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(collect, url, lambda got: len(got.events) >= 103)
        _wait_subscribers(runtime, 1)
        for number in range(150, 153):
            runtime.run("p_orders", {"n": number})
        got = reading.result(15)
    assert got.status == 200
    assert got.headers["content-type"].startswith("text/event-stream")
    assert got.ids == list(range(51, 154))
    assert [payload["n"] for payload in _payloads(got)] == list(range(50, 153))
    assert {event.type for event in got.events} == {"orders"}


def test_last_event_id_header_resumes_after_that_event(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime)
    api = make_api(runtime)
    _publish(runtime, 20)
    got = collect(
        f"{api.url}/pipelines/p_orders/sse",
        lambda got: len(got.events) >= 5,
        headers={"Last-Event-ID": "15"},
    )
    assert got.ids == [16, 17, 18, 19, 20]


def test_last_event_id_query_parameter_resumes_too(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime)
    api = make_api(runtime)
    _publish(runtime, 10)
    got = collect(
        f"{api.url}/pipelines/p_orders/sse?lastEventId=7", lambda got: len(got.events) >= 3
    )
    assert got.ids == [8, 9, 10]


def test_resume_from_before_the_history_replays_what_history_still_has(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime, sse_history=10)
    api = make_api(runtime)
    _publish(runtime, 30)
    got = collect(
        f"{api.url}/pipelines/p_orders/sse",
        lambda got: len(got.events) >= 11,
        headers={"Last-Event-ID": "3"},
    )
    lost, *kept = got.events
    # Events 4 to 20 are gone: the stream says so first (no id: the client keeps "3").
    assert lost.type == "history-lost"
    assert json.loads(lost.data) == {"last_event_id": "3", "oldest_event_id": 21}
    assert lost.last_event_id == ""
    assert [int(event.last_event_id) for event in kept] == list(range(21, 31))


def test_resume_from_the_last_dropped_id_loses_nothing(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime, sse_history=10)
    api = make_api(runtime)
    _publish(runtime, 30)
    got = collect(
        f"{api.url}/pipelines/p_orders/sse",
        lambda got: len(got.events) >= 10,
        headers={"Last-Event-ID": "20"},
        timeout=3.0,
    )
    assert got.ids == list(range(21, 31))  # 21 on are all kept: no history-lost


def test_an_id_from_a_previous_process_replays_the_whole_history(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime)
    api = make_api(runtime)
    _publish(runtime, 5)
    for last_event_id in ("999", "not-a-number"):
        got = collect(
            f"{api.url}/pipelines/p_orders/sse",
            lambda got: len(got.events) >= 5,
            headers={"Last-Event-ID": last_event_id},
        )
        assert got.ids == [1, 2, 3, 4, 5]


def test_events_published_while_connecting_arrive_once_and_in_order(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime, sse_history=1000)
    api = make_api(runtime)
    url = f"{api.url}/pipelines/p_orders/sse"

    def publish() -> None:
        for number in range(400):
            runtime.run("p_orders", {"n": number})

    publisher = threading.Thread(target=publish)
    publisher.start()
    time.sleep(0.05)
    try:
        got = collect(url, lambda got: bool(got.events) and got.ids[-1] == 400)
    finally:
        publisher.join()
    assert got.ids == list(range(1, 401)), "replay and live must join without gap or duplicate"


def test_keepalive_comment_on_an_idle_stream(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime, sse_keepalive=0.2)
    api = make_api(runtime)
    started = time.monotonic()
    got = collect(f"{api.url}/pipelines/p_quiet/sse", lambda got: len(got.comments) >= 3)
    elapsed = time.monotonic() - started
    assert got.comments[:3] == ["keepalive"] * 3
    assert got.events == []
    assert 0.5 <= elapsed < 3


def test_unknown_workflow_is_404(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime)
    api = make_api(runtime)
    got = collect(f"{api.url}/pipelines/p_nope/sse")
    assert got.status == 404
    assert "p_nope" in json.loads(got.body)["error"]


def test_stream_of_a_registered_workflow_exists_before_its_first_event(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime)
    api = make_api(runtime)
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(
            collect, f"{api.url}/pipelines/p_orders/sse", lambda got: len(got.events) >= 1
        )
        _wait_subscribers(runtime, 1)
        runtime.run("p_orders", {"n": 1})
        got = reading.result(10)
    assert got.ids == [1]


def test_multi_line_and_unicode_payloads_arrive_intact(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime)
    api = make_api(runtime)
    texts = ["line one\nline two", "crlf\r\nand cr\rend", "\n\nleading blank lines", "é ✓ 🚀"]
    for text in texts:
        runtime.run("p_orders", {"text": text, "channel": "notes"})
    got = collect(f"{api.url}/pipelines/p_orders/sse", lambda got: len(got.events) >= 4)
    assert [payload["text"] for payload in _payloads(got)] == texts
    assert {event.type for event in got.events} == {"notes"}


def test_encoded_frames_follow_the_whatwg_parsing_rules():
    raw = encode_frame(7, "multi", "first\nsecond\r\nthird\rfourth") + encode_frame(8, "x", "")
    parser = SseParser()
    events = []
    for index in range(len(raw)):  # byte by byte: splits CRLF and UTF-8 sequences
        events.extend(parser.feed(raw[index : index + 1]))
    assert [(e.type, e.data, e.last_event_id) for e in events] == [
        ("multi", "first\nsecond\nthird\nfourth", "7"),
        ("x", "", "8"),
    ]


def test_slow_subscriber_is_cut_off_and_a_fast_one_gets_everything(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime, sse_queue=50, sse_history=1000)
    api = make_api(runtime)
    url = f"{api.url}/pipelines/p_orders/sse"
    total = 700
    stalled = StalledClient(url)
    try:
        with ThreadPoolExecutor(1) as pool:
            fast = pool.submit(collect, url, lambda got: len(got.events) >= total, None, 30)
            _wait_subscribers(runtime, 2)
            filler = "x" * 16_000  # 11 MB in all: far more than the stalled socket buffers hold
            started = time.monotonic()
            for number in range(total):  # one run at a time, as a steady producer would
                runtime.run("p_orders", {"n": number, "filler": filler})
                time.sleep(0.002)
            fast_got = fast.result(30)
            elapsed = time.monotonic() - started
        assert fast_got.ids == list(range(1, total + 1))
        assert runtime.sse_hub.disconnected == 1
        _wait_subscribers_at_most(runtime, 0)  # the fast one has hung up too
        # The server let go of the stalled connection (its write was stuck) without
        # the client reading anything.
        open_streams = api.app.state.sse.open_streams
        deadline = time.monotonic() + 5
        while open_streams:
            assert time.monotonic() < deadline, f"connections still held: {open_streams}"
            time.sleep(0.02)
        assert elapsed < 20
        seen, ended = stalled.read_all()
    finally:
        stalled.close()
    assert ended, "the stalled subscriber's stream must be closed by the server"
    assert 0 < len(seen) < total
    # It reconnects with the last id it saw and gets the rest from history.
    last = seen[-1].last_event_id
    rest = collect(
        url, lambda got: bool(got.events) and got.ids[-1] == total, headers={"Last-Event-ID": last}
    )
    assert rest.ids == list(range(int(last) + 1, total + 1))


def test_200_concurrent_subscribers_each_receive_every_event(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime)
    api = make_api(runtime)
    url = f"{api.url}/pipelines/p_orders/sse"
    events = 20

    with ThreadPoolExecutor(1) as pool:
        receiving = pool.submit(fan_collect, url, clients=200, events=events)
        _wait_subscribers(runtime, 200)
        for number in range(events):
            runtime.run("p_orders", {"n": number})
        received = receiving.result(30)
    assert len(received) == 200
    for number, got in enumerate(received):
        assert [int(event.last_event_id) for event in got] == list(range(1, events + 1)), number
        assert [json.loads(event.data)["n"] for event in got] == list(range(events))
    deliveries = runtime.stats()["destinations"]["sse"]
    assert deliveries["delivered"] == events


def test_sse_delivery_records_show_event_id_and_subscribers(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime)
    make_api(runtime)
    result = runtime.run("p_orders", {"n": 1})
    assert runtime.flush(5)
    (record,) = runtime.deliveries(result.run_id)
    assert record.status == "delivered"
    assert record.detail == {"channel": "orders", "event_id": 1, "subscribers": 0}


def test_history_and_ids_survive_a_crash_of_the_hub_actor(make_runtime, make_api):
    runtime = _streaming_runtime(make_runtime)
    api = make_api(runtime)
    _publish(runtime, 3)
    poison = Send("sse", id="poison", workflow_id="p_orders", payload=None)
    # The payload is not (channel, data): it crashes the actor.
    runtime._destinations.refs["sse"].tell(Deliver([poison]))
    deadline = time.monotonic() + 5
    while runtime.health()["destinations"]["sse"]["incarnation"] < 2:
        assert time.monotonic() < deadline, "the SSE actor was not restarted"
        time.sleep(0.02)
    assert poison.status == "failed"
    _publish(runtime, 2, start=3)
    got = collect(f"{api.url}/pipelines/p_orders/sse", lambda got: len(got.events) >= 5)
    assert got.ids == [1, 2, 3, 4, 5]
    assert [payload["n"] for payload in _payloads(got)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "origins, origin, expected",
    [
        ("*", "http://page.example", "*"),
        ("http://a.example, http://page.example", "http://page.example", "http://page.example"),
        ("http://a.example", "http://page.example", None),
    ],
)
def test_sse_answers_with_cors_headers(make_runtime, make_api, origins, origin, expected):
    runtime = _streaming_runtime(make_runtime, cors_origins=origins)
    api = make_api(runtime)
    _publish(runtime, 1)
    got = collect(
        f"{api.url}/pipelines/p_orders/sse",
        lambda got: len(got.events) >= 1,
        headers={"Origin": origin},
    )
    assert got.headers.get("access-control-allow-origin") == expected


class ForeignServer:
    """`rt.asgi_app()` served by hypercorn on an event loop of its own (trio or asyncio)."""

    def __init__(self, app: Any, library: str) -> None:
        self.app = app
        self.library = library
        self.port = 0
        self._ready = threading.Event()
        self._stop: Any = None
        self._schedule: Any = None
        self._thread = threading.Thread(target=self._main, name=f"foreign-{library}")

    def _main(self) -> None:
        import asyncio

        import trio
        from hypercorn.config import Config as HypercornConfig

        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.graceful_timeout = 2

        if self.library == "trio":
            from hypercorn.trio import serve as trio_serve

            async def main_trio() -> None:
                self._stop = trio.Event()
                self._schedule = trio.lowlevel.current_trio_token().run_sync_soon
                async with trio.open_nursery() as nursery:
                    binds = await nursery.start(
                        functools.partial(
                            trio_serve, self.app, config, shutdown_trigger=self._stop.wait
                        )
                    )
                    self.port = int(binds[0].rsplit(":", 1)[1])
                    self._ready.set()

            trio.run(main_trio)
            return

        from hypercorn.asyncio import serve as asyncio_serve

        async def main_asyncio() -> None:
            self._stop = asyncio.Event()
            self._schedule = asyncio.get_running_loop().call_soon_threadsafe
            config.bind = [f"127.0.0.1:{free_port()}"]
            self.port = int(config.bind[0].rsplit(":", 1)[1])
            task = asyncio.ensure_future(
                asyncio_serve(self.app, config, shutdown_trigger=self._stop.wait)
            )
            for _ in range(200):  # until hypercorn listens
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                break
            self._ready.set()
            await task

        asyncio.run(main_asyncio())

    def __enter__(self) -> ForeignServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._schedule(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.mark.parametrize("library", ["trio", "asyncio"])
def test_app_served_on_another_event_loop_relays_streams(make_runtime, library):
    runtime = _streaming_runtime(make_runtime, sse_keepalive=0.2)
    _publish(runtime, 3)
    with ForeignServer(runtime.asgi_app(), library) as server:
        url = f"{server.url}/pipelines/p_orders/sse"
        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(
                collect, url, lambda got: len(got.events) >= 5 and len(got.comments) >= 1
            )
            _wait_subscribers(runtime, 1)
            _publish(runtime, 2, start=3)
            got = reading.result(15)
        assert got.ids == [1, 2, 3, 4, 5]
        assert got.comments[0] == "keepalive"
        _wait_subscribers_at_most(runtime, 0)  # the client left: the relay unsubscribed
        health = httpx.get(f"{server.url}/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"


def test_a_channel_that_cannot_be_encoded_is_refused_and_blocks_nothing(make_runtime):
    """A lone surrogate used to fail the hub's publish task: every SSE send queued
    with it stayed pending and `stop()` raised while dead-lettering them."""
    runtime = make_runtime(start=False)
    caught: list[SendError] = []

    @runtime.workflow("p_mixed")
    def mixed(event: Any, ctx: Any) -> None:
        ctx.send.sse(channel="orders", payload={"n": 1})
        try:
            ctx.send.sse(channel="bad\ud800", payload={"n": 2})
        except SendError as error:
            caught.append(error)
        ctx.send.sse(channel="orders", payload={"n": 3})

    runtime.start()
    first = runtime.run("p_mixed", None)
    second = runtime.run("p_mixed", None)
    assert [(error.field, "valid Unicode" in error.rule) for error in caught] == [
        ("channel", True)
    ] * 2
    assert runtime.flush(10)
    records = runtime.deliveries(first.run_id) + runtime.deliveries(second.run_id)
    assert [record.status for record in records] == ["delivered"] * 4
    assert [record.detail["event_id"] for record in records] == [1, 2, 3, 4]
    runtime.stop()  # returns normally: nothing was left to dead-letter
