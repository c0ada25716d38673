"""Outbound's embedding API: workflows, runs and the delivery of what they send.

    from outbound import Runtime, Config, SendError, Destination, Busy

This package (the repository's `runtime/` folder) owns workflows, runs,
configuration, the `Runtime` facade and its parts (README: Architecture), and
the HTTP API in `outbound.api` (`runtime/api/`, imported only when used);
delivery logic lives in `outbound.destinations` (`destinations/`), the actor
kernel in `outbound.actors` (`actors/`). This module re-exports the public
names only.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

from outbound.admission import Busy
from outbound.config import Config
from outbound.destinations.backoff import RetryPolicy
from outbound.destinations.base import Destination
from outbound.destinations.delivery import Delivery
from outbound.destinations.sql.store import SqlQueryError
from outbound.replay import ReplayReport
from outbound.run import Context, RunFuture, RunResult
from outbound.runs import UnknownWorkflowError
from outbound.runtime import Runtime
from outbound.send import SendError
from outbound.shutdown import ShutdownReport

try:
    __version__ = _distribution_version("outbound-runtime")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "Busy",
    "Config",
    "Context",
    "Delivery",
    "Destination",
    "RunFuture",
    "RunResult",
    "ReplayReport",
    "RetryPolicy",
    "Runtime",
    "SendError",
    "ShutdownReport",
    "SqlQueryError",
    "UnknownWorkflowError",
]
