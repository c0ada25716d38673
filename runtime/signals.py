"""SIGINT/SIGTERM handling shared by `outbound serve` and `Runtime.install_signal_handlers()`.

Owns installing handlers for the stop signals, remembering the handlers they
replace, restoring those, and chaining to them (what the process would have
done without us: the default action exits, a Python handler is called). What
a signal should do for a runtime (drain) is the caller's; this module knows
nothing of runtimes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
Handler = Callable[[int, FrameType | None], Any]


class SignalHandlers:
    """`on_signal(signum, frame)` for each of `signals`, with the previous handlers kept.

    Python runs signal handlers only on the main thread, so `install()` must be
    called there; elsewhere it raises a `RuntimeError` that says so.
    """

    def __init__(self, on_signal: Handler, signals: Iterable[int] = STOP_SIGNALS) -> None:
        self.on_signal = on_signal
        self.signals = tuple(signals)
        self.previous: dict[int, Any] = {}

    def install(self) -> SignalHandlers:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "signal handlers can only be installed from the main thread (Python runs "
                "them there): call this from your program's main thread, e.g. at start-up"
            )
        for signum in self.signals:
            self.previous.setdefault(signum, signal.signal(signum, self.on_signal))
        return self

    def restore(self) -> None:
        """Put back the handlers that `install()` replaced."""
        previous, self.previous = self.previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def chain(self, signum: int, frame: FrameType | None) -> None:
        """Do what the handler we replaced would have done with this signal.

        A Python handler (SIGINT's default raises KeyboardInterrupt) is called;
        the default action (SIGTERM's: terminate) becomes `SystemExit(128 +
        signum)`, the shell's status for a death by that signal, so `finally`
        blocks and `atexit` still run; an ignored signal stays ignored.
        """
        previous = self.previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)
