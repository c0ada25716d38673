"""`RuntimeView`: what the HTTP API reads from a runtime, and nothing more.

The API wing depends on this protocol, not on `outbound.runtime`: `Runtime`
satisfies it with its public methods and properties (a test checks that), and
`Runtime.asgi_app()` imports the API lazily, so the layers point one way
(runtime <- api). Anything that offers these members can be served. Must not
import `outbound.runtime`, not even for type hints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from outbound.actors.loops import LoopThread
from outbound.config import Config
from outbound.destinations.sse.hub import SseHub


class Record(Protocol):
    """A run result or a delivery record: the API shows `as_dict()`."""

    def as_dict(self) -> dict[str, Any]: ...


class Submitted(Protocol):
    """A submitted run: its id is known at once."""

    @property
    def run_id(self) -> str: ...


class LedgerView(Protocol):
    """The part of the runtime's ledger the API reads: final deliveries, runs that start
    and runs that end (the inspector's live notices listen to them)."""

    def add_listener(self, listener: Callable[[Any], None]) -> None: ...

    def add_start_listener(self, listener: Callable[[Any], None]) -> None: ...

    def add_run_listener(self, listener: Callable[[Any], None]) -> None: ...

    def remove_listener(self, listener: Callable[[Any], None]) -> None: ...

    def wait_runs(self, timeout: float | None) -> bool: ...


@runtime_checkable
class RuntimeView(Protocol):
    """The public face of a runtime, as the HTTP API and its metrics use it."""

    @property
    def config(self) -> Config: ...

    @property
    def ledger(self) -> LedgerView: ...

    @property
    def sse_hub(self) -> SseHub: ...

    @property
    def running(self) -> bool: ...

    @property
    def workflows(self) -> list[str]: ...

    @property
    def trio_loop(self) -> LoopThread | None: ...

    @property
    def asyncio_loop(self) -> LoopThread | None: ...

    def submit(
        self, workflow_id: str, event: Any = None, timeout: float | None = None
    ) -> Submitted: ...

    def publish(self, workflow_id: str, event: Any = None, timeout: float | None = None) -> str: ...

    def run_result(self, run_id: str) -> Record | None: ...

    def run_in_progress(self, run_id: str) -> bool: ...

    def follow_cluster_runs(self, listener: Callable[[Any], None]) -> Callable[[], None] | None: ...

    def recent_runs(
        self,
        limit: int = 50,
        before: str | None = None,
        workflow: str | None = None,
        status: str | None = None,
        destination: str | None = None,
        delivery: str | None = None,
    ) -> Record: ...

    def deliveries(self, run_id: str) -> Sequence[Record]: ...

    def emits(self, workflow_id: str, limit: int | None = None) -> list[dict[str, Any]]: ...

    def health(self) -> dict[str, Any]: ...

    def stats(self) -> dict[str, Any]: ...

    def sql_query(self, sql: str, timeout: float = 60.0) -> dict[str, Any]: ...
