"""Every ```python block of README.md runs, against real services on loopback.

Each block is preceded by `<!-- example: NAME -->` (run by the test of that
name below) or `<!-- not runnable: REASON -->`. A test checks what each example
prints or delivers: the HTTP sink's requests, Postgres's rows, the app's
answers. Examples that are whole programs run in a subprocess of their own
(a fresh interpreter, as a reader would run them); fragments that use names
the surrounding text introduces (`rt`, a received request) run in-process with
those names filled in by the test.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from sql_support import Db

from outbound import Runtime
from outbound.embedded import HttpSink, ReceivedRequest, SinkResponse

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = re.compile(r"^\s*<!--\s*(example|not runnable):\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
#: A fresh interpreter importing outbound (and fastapi, or starting a nats-server) takes
#: seconds alone and far longer on a loaded machine: a bound for a hang, not a speed test.
SUBPROCESS_TIMEOUT = 240


@dataclass(frozen=True)
class Block:
    """One fenced ```python block of the README and the marker on the line before it."""

    line: int  # 1-based line of the opening fence
    code: str  # dedented
    kind: str | None  # "example", "not runnable" or None (no marker)
    label: str  # the example's name, or the reason it is not runnable


def python_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = index + 1
        while not re.match(rf"^{opening.group(1)}```\s*$", lines[end]):
            end += 1
        if opening.group(2) == "python":
            marker = MARKER.match(lines[index - 1]) if index else None
            blocks.append(
                Block(
                    line=index + 1,
                    code=textwrap.dedent("\n".join(lines[index + 1 : end])) + "\n",
                    kind=marker.group(1) if marker else None,
                    label=marker.group(2) if marker else "",
                )
            )
        index = end + 1
    return blocks


def example(name: str) -> str:
    [block] = [
        b for b in python_blocks(README.read_text()) if b.kind == "example" and b.label == name
    ]
    return block.code


#: The examples the tests below run; every named example must be one of them.
RUN_HERE = {
    "quickstart",
    "custom-destination",
    "verify-webhook",
    "replay",
    "fastapi-app",
    "fastapi-test",
}


def test_every_python_block_is_an_example_run_here_or_says_why_not() -> None:
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no python blocks: the parser is broken"
    unmarked = [b.line for b in blocks if b.kind is None]
    assert not unmarked, (
        f"README.md lines {unmarked}: put `<!-- example: NAME -->` (and run it in "
        "tests/test_readme_examples.py) or `<!-- not runnable: REASON -->` before the block"
    )
    names = [b.label for b in blocks if b.kind == "example"]
    assert len(names) == len(set(names)), f"example names repeat: {names}"
    assert set(names) == RUN_HERE
    assert all(b.label for b in blocks if b.kind == "not runnable"), "give the reason"


def test_the_parser_sees_markers_unmarked_and_indented_blocks() -> None:
    text = (
        "<!-- example: one -->\n```python\nprint(1)\n```\n"
        "```python\nprint(2)\n```\n"
        "- item\n  <!-- not runnable: needs a network -->\n  ```python\n  print(3)\n  ```\n"
        "```sh\necho no\n```\n"
    )
    assert python_blocks(text) == [
        Block(2, "print(1)\n", "example", "one"),
        Block(5, "print(2)\n", None, ""),
        Block(10, "print(3)\n", "not runnable", "needs a network"),
    ]


# -- running examples -------------------------------------------------------------------


def run_program(code: str, cwd: Path, env: dict[str, str], name: str = "example.py") -> str:
    """Run `code` as a script in a fresh interpreter; its stdout (fails with its stderr)."""
    script = cwd / name
    script.write_text(code)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOUND_")}
    environ.update(env)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def database(postgres_url: str) -> Iterator[tuple[str, Db]]:
    """A fresh database of the session's Postgres, so an example's tables are its own."""
    name = f"readme_{uuid.uuid4().hex[:12]}"
    admin = Db(postgres_url)
    admin.execute(f"CREATE DATABASE {name}")
    url = urlunsplit(urlsplit(postgres_url)._replace(path=f"/{name}"))
    yield url, Db(url)
    admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.mark.timeout(SUBPROCESS_TIMEOUT + 60)
def test_quickstart_delivers_to_the_endpoint_postgres_and_the_stream(
    sink: HttpSink, database: tuple[str, Db], tmp_path: Path
) -> None:
    url, db = database
    env = {
        "HOOKS_URL": sink.url + "/hooks",
        "OUTBOUND_DATABASE_URL": url,
        "OUTBOUND_DATA_DIR": str(tmp_path / "data"),
    }
    printed = run_program(example("quickstart"), tmp_path, env)
    # It prints the first run's delivery records: every send delivered.
    for destination in ("http", "sql", "sse"):
        assert f"destination='{destination}', status='delivered'" in printed, printed
    assert "status='failed'" not in printed and "status='pending'" not in printed
    # The endpoint got one request per event, each with its own Idempotency-Key.
    requests = [r for r in sink.requests if r.path == "/hooks"]
    assert sorted(r.json()["id"] for r in requests) == [1, 2, 3]
    assert len({r.headers["idempotency-key"] for r in requests}) == 3
    # Postgres has the three rows, loaded by the SQL destination.
    rows = db.fetch("SELECT id FROM orders ORDER BY id")
    assert [row["id"] for row in rows] == [1, 2, 3]


@pytest.mark.timeout(SUBPROCESS_TIMEOUT + 60)
def test_custom_destination_prints_what_it_stored(tmp_path: Path) -> None:
    printed = run_program(
        example("custom-destination"), tmp_path, {"OUTBOUND_DATA_DIR": str(tmp_path / "data")}
    )
    assert printed.strip() == "[{'any': 'payload'}]"


def test_verify_webhook_accepts_a_request_the_runtime_signed(
    make_runtime: Callable[..., Runtime], sink: HttpSink
) -> None:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    rt = make_runtime(http_signing_secrets=secret)
    rt.register("p_signed", lambda event, ctx: ctx.send.http(sink.url, data=event, sign=True))
    assert rt.run("p_signed", {"order": 7}).status == "succeeded"
    assert rt.flush(timeout=20)
    [request] = sink.wait_for(1)
    code = example("verify-webhook")
    assert code.count('"whsec_..."') == 1
    received = {"request_body_bytes": request.body, "request_headers": request.headers}
    names = dict(received)
    exec(code.replace('"whsec_..."', repr(secret)), names)
    assert names["payload"] == {"order": 7}
    # The same lines refuse a body changed on the way.
    forged = dict(received, request_body_bytes=b'{"order": 8}')
    with pytest.raises(Exception, match="(?i)signature"):
        exec(code.replace('"whsec_..."', repr(secret)), forged)


def test_replay_sends_a_dead_letter_again_and_prints_the_report(
    make_runtime: Callable[..., Runtime],
    make_sink: Callable[..., HttpSink],
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = {"now": True}

    def answer(request: ReceivedRequest) -> SinkResponse:
        return SinkResponse(422 if broken["now"] else 200)

    endpoint = make_sink(answer)
    rt = make_runtime()
    rt.register("p_post", lambda event, ctx: ctx.send.http(endpoint.url + "/hook", data=event))
    result = rt.run("p_post", {"n": 1})
    assert rt.flush(timeout=10)
    [failed] = rt.deliveries(result.run_id)
    assert failed.status == "failed"  # a final 422: dead-lettered
    rt.stop()
    broken["now"] = False  # the cause is fixed

    exec(example("replay"), {"rt": rt})

    printed = capsys.readouterr().out
    assert "http: found 1, replayed 1, " in printed, printed
    assert "delivered 1, failed again 0" in printed, printed
    first, again = endpoint.requests
    assert again.headers["idempotency-key"] == first.headers["idempotency-key"] == failed.id
    assert again.json() == {"n": 1}


@pytest.mark.timeout(SUBPROCESS_TIMEOUT + 60)
def test_fastapi_example_and_its_test_pass_with_one_runtime_per_app(
    sink: HttpSink, tmp_path: Path
) -> None:
    (tmp_path / "app.py").write_text(example("fastapi-app"))
    (tmp_path / "test_app.py").write_text(example("fastapi-test"))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOUND_")}
    environ["HOOKS_URL"] = sink.url + "/hooks"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_app.py"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    # The test's order reached the endpoint through the app's runtime.
    [request] = sink.wait_for(1)
    assert request.path == "/hooks" and request.json() == {"id": 7}
