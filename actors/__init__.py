"""The actor kernel: pooled pykka actors, supervision, event-loop threads and timers.

This package knows nothing of workflows or destinations; `runtime` and
`destinations` build on it, never the other way round.
"""

from outbound.actors.loops import AsyncioLoop, LoopResult, TrioLoop
from outbound.actors.pool import ActorPool, default_pool
from outbound.actors.pykka_internals import PooledActor
from outbound.actors.supervisor import (
    ChildSpec,
    Restart,
    Supervised,
    SupervisedRef,
    Supervisor,
    SupervisorGaveUp,
)
from outbound.actors.timers import TimerHandle, Timers

__all__ = [
    "ActorPool",
    "AsyncioLoop",
    "ChildSpec",
    "LoopResult",
    "PooledActor",
    "Restart",
    "Supervised",
    "SupervisedRef",
    "Supervisor",
    "SupervisorGaveUp",
    "TimerHandle",
    "Timers",
    "TrioLoop",
    "default_pool",
]
