"""The machinery of one start of a runtime: threads, loops, actors, and how to stop them.

Owns `Machinery`: the run pool, the trio and asyncio loop threads (and the
loop of user coroutines), the timers, the `Services` handed to destination
actors, the root supervisor, the `RunEnvironment` every run shares, and the
`HandOff` from runs to destinations, and the `Journal` when one is configured
(opened first: a start fails at once, clearly, if it cannot be reached).
`Machinery.start(...)` makes them all;
`stop()` ends them in order. A runtime makes a new one at each start and drops
it at stop, so nothing of a stopped runtime's threads is kept. Takes what it
needs as arguments; must not import the runtime facade or the shutdown module,
and holds no destination-specific logic.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pykka

from outbound.actors import ActorPool, AsyncioLoop, ChildSpec, Supervisor, Timers, TrioLoop
from outbound.backpressure import Backpressure
from outbound.config import Config
from outbound.destinations.base import Services
from outbound.destinations.delivery import Ledger
from outbound.handoff import HandOff
from outbound.journal.deadletters import JournaledDeadLetters
from outbound.journal.journal import Journal
from outbound.journal.views import ClusterViews
from outbound.run import RunEnvironment


@dataclass
class Machinery:
    """The threads and actors of one start; `stop()` ends them."""

    pool: ActorPool
    services: Services
    supervisor: pykka.ActorRef[Supervisor]
    env: RunEnvironment
    hand_off: HandOff
    journal: Journal | None = None
    #: The ledger's dead-letter store while it also stores in this start's journal.
    dead_letters: JournaledDeadLetters | None = None
    #: In a cluster: the SSE streams, emit log and run records every node shares.
    views: ClusterViews | None = None

    @classmethod
    def start(
        cls,
        config: Config,
        ledger: Ledger,
        backpressure: Backpressure,
        destinations: Mapping[str, pykka.ActorRef[Any]],
        failed_destinations: Mapping[str, BaseException],
        submit_child_run: Callable[..., Any],
        on_give_up: Callable[[BaseException], None],
    ) -> Machinery:
        """Start the pool, loops, timers and supervisor (no destination actors yet)."""
        journal = None
        if config.journal != "off":
            journal = Journal(config, config.data_dir, config.max_payload_bytes)
            journal.open()
        dead_letters = ledger.dead_letters
        if journal is not None and isinstance(dead_letters, JournaledDeadLetters):
            dead_letters.attach_journal(journal)  # a replay on any node sees them
        else:
            dead_letters = None
        pool = ActorPool(config.pool_workers, name="outbound-runs")
        hand_off = HandOff(ledger, backpressure, pool, destinations, failed_destinations, journal)
        trio_loop = TrioLoop().start()
        asyncio_loop = AsyncioLoop().start()
        # User coroutines get a loop of their own: one that blocks (time.sleep)
        # must not stall the destinations' clients (asyncpg, aiosmtplib).
        workflow_loop = AsyncioLoop(name="workflows").start()
        services = Services(
            config,
            trio_loop,
            asyncio_loop,
            Timers(),
            ledger,
            backpressure.budget,
            submit_run=submit_child_run,
            journal=journal,
            admission=backpressure.admission,
        )
        supervisor = Supervisor.start(on_give_up=on_give_up)
        env = RunEnvironment(
            config, pool, workflow_loop, destinations.__contains__, hand_off.hand_off
        )
        return cls(pool, services, supervisor, env, hand_off, journal, dead_letters)

    def start_destination(self, spec: ChildSpec) -> pykka.ActorRef[Any]:
        """Start a destination actor under the supervisor."""
        return self.supervisor.proxy().start_child(spec).get()

    def caller_may_wait(self) -> bool:
        """False on the runtime's own threads: room may be freed only by the work they do."""
        if self.pool.is_worker():
            return False
        loops = (self.services.trio, self.services.asyncio, self.env.workflow_loop)
        return not any(loop.in_loop_thread() for loop in loops)

    def stop(self) -> None:
        """Stop the supervisor (and its destination actors), the journal (its last
        acknowledgements sent), timers, loops and the pool."""
        self.supervisor.stop(block=True, timeout=30)
        if self.dead_letters is not None:
            self.dead_letters.detach_journal()
        log_summaries = getattr(self.services.ledger.dead_letters, "log_summaries", None)
        if log_summaries is not None:
            log_summaries()  # failures a rate-limited WARNING line has not told yet
        if self.views is not None:
            self.views.stop()
        if self.journal is not None:
            self.journal.close()
        services = self.services
        services.timers.shutdown()
        services.trio.stop()
        services.asyncio.stop()
        self.env.workflow_loop.stop()
        self.pool.shutdown()

    def destination_health(self, retrying_after: float) -> dict[str, dict[str, Any]]:
        """Each destination actor's state from the supervisor, `retrying` once a batch has
        kept failing for longer than `retrying_after` s (with how long and the last error);
        a batching destination's `retrying_batches` (batches failing now, however long)."""
        if not self.supervisor.is_alive():
            return {}
        try:
            children: dict[str, dict[str, Any]] = self.supervisor.proxy().children().get(timeout=5)
        except (pykka.ActorDeadError, pykka.Timeout):
            return {}
        now = time.monotonic()
        for name, child in children.items():
            status = self.services.status.get(name)
            if status is not None:
                child["retrying_batches"] = status.retrying_batches
            since = status.retrying_since if status is not None else None
            if since is not None and now - since > retrying_after:
                child["retrying_for"] = round(now - since, 3)
                child["last_error"] = status.last_error  # type: ignore[union-attr]
                if child["status"] == "running":
                    child["status"] = "retrying"
        return children
