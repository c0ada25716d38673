"""The built-in destinations, one entry each: what `ctx.send.<kind>` and the runtime look up.

Owns `DestinationKind` (what the runtime needs to know of a destination: its
`ctx.send.<kind>` validation, its settings, when it is enabled and what to
set to enable it, how to start its actor, whether its sends are batched) and
`DESTINATION_KINDS`, the registry. Each destination lives in its own folder,
`destinations/<kind>/`, in files of the same names:

- `settings.py`: its settings dataclass (composed into the runtime's `Config`),
  `is_enabled(config)` and `HOW_TO_ENABLE`;
- `send.py`: `validate_<kind>(config, max_bytes, ...)`, which checks a
  `ctx.send.<kind>(...)` call and returns its typed payload and size, and
  `from_dead_letter(fields)`, the inverse of its dead-letter line (replay);
- `actor.py`: the destination actor and `starter(config, **parts)`, which
  returns what starts it with the services of each runtime start;
- its service code (workers, SMTP, uploader, store, hub, log), named for what it is.

Adding a destination is adding a folder and one entry here. Actor modules are
imported only when their destination is enabled (S3 and SQL pull in minio and
asyncpg). Imports the destinations' `send` and `settings` modules; no
destination imports this module, and it does not import the runtime.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from outbound.destinations.email import send as email_send
from outbound.destinations.email import settings as email_settings
from outbound.destinations.emit import send as emit_send
from outbound.destinations.emit import settings as emit_settings
from outbound.destinations.http import send as http_send
from outbound.destinations.http import settings as http_settings
from outbound.destinations.s3 import send as s3_send
from outbound.destinations.s3 import settings as s3_settings
from outbound.destinations.sql import send as sql_send
from outbound.destinations.sql import settings as sql_settings
from outbound.destinations.sse import send as sse_send
from outbound.destinations.sse import settings as sse_settings

#: `validate_<kind>(config, max_bytes, *args, **kwargs) -> (payload, size)`.
Validate = Callable[..., tuple[Any, int]]


@dataclass(frozen=True, slots=True)
class DestinationKind:
    """One built-in destination, as the runtime and `ctx.send.<name>` see it."""

    name: str
    validate: Validate  # ctx.send.<name>(...): SendError, or the typed payload and its size
    settings: type  # its settings dataclass, one of Config's bases
    is_enabled: Callable[[Any], bool]  # from the runtime's Config
    how_to_enable: str  # what a send says while it is not enabled
    batched: bool  # sends held in batches, counted against the batch memory budget
    payload: type  # the typed payload its validation makes (the journal encodes its fields)
    #: `from_dead_letter(fields) -> (payload, size)`: a dead-letter line's fields back (replay).
    from_dead_letter: Callable[[Any], tuple[Any, int]] | None = None

    def starter(self, config: Any, **parts: Any) -> Callable[[Any], Any]:
        """What starts the actor: `start(services) -> ActorRef`, for every runtime start.

        `parts` are what the runtime owns and lends (`subscriptions`, `emit_log`,
        `sse_hub`); each destination takes the ones it needs. Settings that can
        be wrong (the SMTP URL) are checked here, when the runtime is made.
        """
        actor = importlib.import_module(f"outbound.destinations.{self.name}.actor")
        return actor.starter(config, **parts)  # type: ignore[no-any-return]


def _kind(
    name: str, send: Any, settings: Any, settings_class: type, payload: type, batched: bool
) -> DestinationKind:
    return DestinationKind(
        name=name,
        validate=getattr(send, f"validate_{name}"),
        settings=settings_class,
        is_enabled=settings.is_enabled,
        how_to_enable=settings.HOW_TO_ENABLE,
        batched=batched,
        payload=payload,
        from_dead_letter=send.from_dead_letter,
    )


#: The built-in destinations, in the order the runtime starts them.
DESTINATION_KINDS: tuple[DestinationKind, ...] = (
    _kind(
        "http",
        http_send,
        http_settings,
        http_settings.HttpSettings,
        http_send.HttpRequest,
        batched=False,
    ),
    _kind(
        "emit",
        emit_send,
        emit_settings,
        emit_settings.EmitSettings,
        emit_send.EmittedEvent,
        batched=False,
    ),
    _kind(
        "email",
        email_send,
        email_settings,
        email_settings.EmailSettings,
        email_send.Email,
        batched=False,
    ),
    _kind(
        "sse", sse_send, sse_settings, sse_settings.SseSettings, sse_send.SseEvent, batched=False
    ),
    _kind("s3", s3_send, s3_settings, s3_settings.S3Settings, s3_send.S3Line, batched=True),
    _kind("sql", sql_send, sql_settings, sql_settings.SqlSettings, sql_send.SqlRow, batched=True),
)
