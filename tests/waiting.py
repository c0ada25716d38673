"""`wait_until`: the tests' one way to wait for something another thread does.

Polls instead of sleeping a fixed time, so a test waits only as long as the
code under test takes; the timeout is only how long a failing test hangs.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `condition` every 10 ms until it is true (then True); fail the test if
    `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"the condition did not come true in {timeout} s"
        time.sleep(0.01)
    return True
