"""Headless Chromium for the browser tests: its command line, and a DevTools client over a pipe.

`chromium_command(tmp_path, ...)` is Debian's `chromium` with a throwaway
profile. `Browser` starts it with `--remote-debugging-pipe` (the DevTools
protocol as NUL-separated JSON on file descriptors 3 and 4: no port, no
WebSocket library) and `Browser.open(url)` gives a `Tab` that navigates,
evaluates JavaScript, waits for a condition in the page, clicks and types
with real input events, and takes screenshots. Errors the page throws are
kept in `Tab.errors`. The browser is killed with its whole process group.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
)


def chromium_command(tmp_path: Path, *extra: str) -> list[str]:
    assert CHROMIUM is not None
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *extra,
    ]


class DevToolsError(RuntimeError):
    pass


class Browser:
    """One headless Chromium driven through the DevTools protocol on a pipe."""

    def __init__(self, tmp_path: Path, width: int = 1280, height: int = 900) -> None:
        command = chromium_command(
            tmp_path, "--remote-debugging-pipe", f"--window-size={width},{height}", "about:blank"
        )
        # The pipe must be fds 3 (commands in) and 4 (answers out): the shell moves
        # our stdin/stdout pipes there and gives Chromium /dev/null instead.
        self.process = subprocess.Popen(
            ["sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', "sh", *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.width, self.height = width, height
        self._ids = itertools.count(1)
        self._answers: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._write_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="devtools-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        buffered = b""
        while True:
            chunk = self.process.stdout.read1(65536)
            if not chunk:
                break
            buffered += chunk
            *messages, buffered = buffered.split(b"\0")
            with self._changed:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self._events.append(message)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def command(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        number = next(self._ids)
        message: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        assert self.process.stdin is not None
        with self._write_lock:
            self.process.stdin.write(json.dumps(message).encode() + b"\0")
            self.process.stdin.flush()
        with self._changed:
            answered = self._changed.wait_for(
                lambda: number in self._answers or self.process.poll() is not None, 60
            )
            answer = self._answers.pop(number, None)
        if not answered or answer is None:
            raise DevToolsError(f"no answer to {method} (Chromium exited: {self.process.poll()})")
        if "error" in answer:
            raise DevToolsError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def events(self, method: str, session: str | None = None) -> list[dict[str, Any]]:
        with self._changed:
            return [
                event["params"]
                for event in self._events
                if event["method"] == method and event.get("sessionId") == session
            ]

    def open(self, url: str) -> Tab:
        target = self.command("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.command("Target.attachToTarget", {"targetId": target, "flatten": True})
        tab = Tab(self, session["sessionId"])
        tab.command("Page.enable")
        tab.command("Runtime.enable")
        tab.command(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        tab.navigate(url)
        return tab

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]
        self._reader.join(10)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Tab:
    """One page of the browser (a DevTools session)."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def command(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.command(method, params, self.session)

    @property
    def errors(self) -> list[str]:
        """Exceptions the page's scripts threw, as DevTools reported them."""
        return [
            json.dumps(event["exceptionDetails"])[:2000]
            for event in self.browser.events("Runtime.exceptionThrown", self.session)
        ]

    def navigate(self, url: str) -> None:
        self.command("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.command(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll `expression` in the page until it is truthy (in JavaScript's sense: an
        element is, though it comes back as `{}`); its value."""
        deadline = time.monotonic() + timeout
        probe = f"(async () => {{ const it = await ({expression}); return [!!it, it]; }})()"
        while True:
            truthy, value = self.evaluate(probe)
            if truthy:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(
                    f"{expression!r} did not come true in {timeout} s; the page shows:\n"
                    f"{str(text)[:3000]}\nerrors: {self.errors}"
                )
            time.sleep(0.05)

    def _center(self, selector: str) -> tuple[float, float]:
        box = self.wait_for(
            f"""(() => {{
                const node = document.querySelector({json.dumps(selector)});
                if (!node || node.offsetParent === null) return null;
                node.scrollIntoView({{block: "center"}});
                const r = node.getBoundingClientRect();
                return [r.left + r.width / 2, r.top + r.height / 2];
            }})()"""
        )
        return box[0], box[1]

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the (visible) element."""
        x, y = self._center(selector)
        for kind in ("mousePressed", "mouseReleased"):
            self.command(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    def type_into(self, selector: str, text: str) -> None:
        """Focus the element by a click, then type `text` as keyboard input would."""
        self.click(selector)
        self.command("Input.insertText", {"text": text})

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (not only the window)."""
        height = self.evaluate("document.documentElement.scrollHeight")
        shot = self.command(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": self.browser.width, "height": height, "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
