"""Outbound's embedding API: workflows, runs and the delivery of what they send.

    from runtime import Runtime, Config, SendError, Busy

This package owns workflows, runs, configuration and the HTTP API; delivery
logic lives in `destinations`, the actor kernel in `actors`.
"""

from destinations.delivery import Delivery
from destinations.sql_store import SqlQueryError
from runtime.admission import Busy
from runtime.config import Config
from runtime.run import Context, RunFuture, RunResult
from runtime.runtime import Runtime, ShutdownReport, UnknownWorkflowError
from runtime.send import SendError

__all__ = [
    "Busy",
    "Config",
    "Context",
    "Delivery",
    "RunFuture",
    "RunResult",
    "Runtime",
    "SendError",
    "ShutdownReport",
    "SqlQueryError",
    "UnknownWorkflowError",
]
