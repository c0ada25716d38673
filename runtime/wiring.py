"""The destinations of one runtime: their factories, their actors, and the ones given up on.

Owns `DestinationWiring`: the built-in destinations that the configuration
enables (`outbound.destinations.registry`) and the ones added with
`Runtime.add_destination` (with its checks), starting each under the
supervisor of a start (`Machinery`), counting batched ones against the memory
budget, what happens when the supervisor gives up on one (what it held is
dead-lettered at once), and handing them to a stop (`Shutdown`). Delivery
itself is `outbound.destinations`'. Takes what it needs as arguments; must not
import the runtime facade.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from outbound.actors import ChildSpec
from outbound.backpressure import Backpressure
from outbound.config import Config
from outbound.destinations.base import Services
from outbound.destinations.delivery import Ledger
from outbound.destinations.http.endpoint_state import EndpointState
from outbound.destinations.http.endpoints import Endpoints
from outbound.destinations.registry import DESTINATION_KINDS
from outbound.destinations.sse.hub import SseHub
from outbound.machinery import Machinery
from outbound.shutdown import Shutdown, dead_letter_left_by

logger = logging.getLogger(__name__)

DestinationFactory = Callable[[Config], pykka.ActorRef[Any]]


@dataclass(frozen=True, slots=True)
class _Builtin:
    """A built-in destination's factory: `start(services)` with the services of each start.

    Not a closure over the runtime: the factories outlive a stop (so the
    runtime can start again), and a closure would tie the runtime into a
    reference cycle, which a runtime that is dropped must not be part of.
    """

    start: Callable[[Services], pykka.ActorRef[Any]]


class DestinationWiring:
    """A runtime's destination factories (kept across restarts) and the actors of this start."""

    def __init__(self, config: Config, backpressure: Backpressure, **parts: Any) -> None:
        self.config = config
        self.backpressure = backpressure
        self.factories: dict[str, DestinationFactory | _Builtin] = {}
        self.refs: dict[str, pykka.ActorRef[Any]] = {}  # the actors of the current start
        self.failed: dict[str, BaseException] = {}  # given up on by the supervisor
        #: The SSE destination's hub, lent to it with `parts` (subscriptions, emit log).
        self.sse_hub = SseHub.from_config(config)
        #: Settings per HTTP endpoint (`Runtime.http_endpoint`), lent to the HTTP destination.
        self.http_endpoints = Endpoints()
        #: Gone HTTP endpoints and open circuits (`Runtime.enable_endpoint`, health).
        self.http_endpoint_state = EndpointState()
        for kind in DESTINATION_KINDS:
            if kind.is_enabled(config):
                start = kind.starter(
                    config,
                    sse_hub=self.sse_hub,
                    http_endpoints=self.http_endpoints,
                    http_endpoint_state=self.http_endpoint_state,
                    **parts,
                )
                self.factories[kind.name] = _Builtin(start)

    def add(self, name: str, factory: DestinationFactory, machinery: Machinery | None) -> None:
        """Add a destination; start it now if the runtime runs (`machinery` is not None)."""
        if not isinstance(name, str) or not name:
            raise ValueError("destination name must be a non-empty string")
        if name in self.factories:
            raise ValueError(f"a destination named {name!r} is already added")
        self.factories[name] = factory
        if machinery is not None:
            self._start(name, factory, machinery)

    def start(self, ledger: Ledger, **callbacks: Callable[..., Any]) -> Machinery:
        """Start the machinery of a start (`callbacks` go to `Machinery.start`), then every
        destination on it."""
        machinery = Machinery.start(
            self.config, ledger, self.backpressure, self.refs, self.failed, **callbacks
        )
        for name, factory in self.factories.items():
            self._start(name, factory, machinery)
        return machinery

    def shutdown(self, ledger: Ledger, machinery: Machinery | None) -> Shutdown:
        """What a stop works with: these destinations and the supervisor of this start."""
        supervisor = machinery.supervisor if machinery is not None else None
        config = self.config
        return Shutdown(
            ledger,
            self.backpressure,
            self.refs,
            self.failed,
            supervisor,
            config.data_dir,
            config.shutdown_timeout,
            machinery.journal if machinery is not None else None,
        )

    def _start(
        self, name: str, factory: DestinationFactory | _Builtin, machinery: Machinery
    ) -> None:
        if isinstance(factory, _Builtin):
            spec = ChildSpec(name, functools.partial(factory.start, machinery.services))
        else:
            spec = ChildSpec(name, functools.partial(factory, self.config))
        ref = machinery.start_destination(spec)
        if getattr(ref.actor_class, "batched", False):
            self.backpressure.batched.add(name)
        self.refs[name] = ref

    def gave_up(self, error: BaseException) -> None:
        """The supervisor gave up on a destination that crash-looped: settle what it held.

        Runs on the supervisor's thread; later sends to it fail at hand-off.
        """
        name = getattr(error, "child", "")
        self.failed[name] = error
        logger.error("destination %r stopped for good: %s", name, error)
        ref = self.refs.get(name)
        if ref is not None:
            reason = "the destination stopped for good"
            dead_letter_left_by(name, ref, reason, self.backpressure, error)
