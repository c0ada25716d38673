"""The `http` benchmark: its sink, and each measured client on a few requests."""

from __future__ import annotations

from pathlib import Path

import httpx

from outbound.benchmarks import http
from outbound.benchmarks.http_sink import fast_sink_process, sink_capacity


def test_the_sink_answers_every_request_on_a_kept_connection() -> None:
    with fast_sink_process() as url, httpx.Client() as client:
        answers = [client.post(url + f"/{n}", content=b"x" * n) for n in range(5)]
        answers.append(client.get(url + "/get"))
        assert [answer.status_code for answer in answers] == [200] * 6
        assert {answer.text for answer in answers} == {"ok"}
        assert sink_capacity(url, seconds=0.2, connections=2, depth=4) > 0


def test_each_client_delivers_to_the_sink(tmp_path: Path) -> None:
    with fast_sink_process() as url:
        assert http.measure_raw_aiohttp(url, 40, 4) > 0
        assert http.measure_raw_httpx(url, 40, 4) > 0
        assert http.measure_ours(url, 40, 4, data_dir=tmp_path) > 0
        assert http.measure_fast_host_beside_slow(url, None, 40, 4, str(tmp_path)) > 0
