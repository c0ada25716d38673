"""The send collector: `ctx.send.<kind>(...)` for every registered destination, and `to(...)`.

Owns `SendCollector` and `RunInfo`. A send validates everything at the call
and raises `SendError` naming the field and the rule; only a valid send is
appended to the run's outbox, so a caught error loses nothing that was
already accepted. No I/O happens here: delivery starts after the run ends.

The collector knows no destination: `ctx.send.http(...)` is the registry's
`validate_http` (`destinations/registry.py`), made a method of
`SendCollector` once, when this module is imported (`_send_method`), so a
call costs one plain Python call more than the validation itself. Each validation returns a typed
payload (encoded once, so its size is checked at the call and destinations do
not encode it again) and its size.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from outbound.config import Config
from outbound.destinations.delivery import Send, new_send
from outbound.destinations.registry import DESTINATION_KINDS, DestinationKind
from outbound.destinations.validation import PLAIN_SCALARS, SendError, check_custom_payload

__all__ = ["HOW_TO_ENABLE", "RunInfo", "SendCollector", "SendError"]

#: What to do when a built-in destination is not running, per send kind.
HOW_TO_ENABLE: dict[str, str] = {kind.name: kind.how_to_enable for kind in DESTINATION_KINDS}


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Who is sending: copied into every delivery record of the run."""

    run_id: str
    workflow_id: str
    depth: int = 0
    traceparent: str | None = None  # the trace its caller was in (W3C), if any


class SendCollector:
    """`ctx.send`: validates each call and appends it to the run's outbox.

    Besides `to(...)`, it has one method per registered destination kind
    (`http`, `email`, `s3`, `sql`, `sse`, `emit`), added below from the registry.
    """

    __slots__ = ("_run", "_config", "_max_bytes", "_available", "outbox")

    def __init__(self, run: RunInfo, config: Config, available: Callable[[str], bool]) -> None:
        self._run = run
        self._config = config
        self._max_bytes = config.max_payload_bytes
        self._available = available
        self.outbox: list[Send] = []

    def to(self, destination: str, payload: Any) -> str:
        """Queue `payload` for a custom destination added with `Runtime.add_destination`."""
        if not isinstance(destination, str) or not destination:
            raise SendError("to", "destination", "must be the name of an added destination")
        if type(payload) not in PLAIN_SCALARS:
            check_custom_payload(payload)
        return self._append(destination, payload, 0, field="destination")

    def _append(self, destination: str, payload: Any, size: int, field: str = "") -> str:
        if not self._available(destination):
            hint = HOW_TO_ENABLE.get(destination)
            if hint is None:
                raise SendError(
                    "to",
                    field or "destination",
                    f"no destination named {destination!r}; add it with rt.add_destination()",
                )
            raise SendError(destination, "destination", f"not configured: {hint}")
        run = self._run
        # The run id and the send's ordinal: a run run again (its event was journaled,
        # its process killed) makes the same ids, so its sends are deduplicated downstream.
        delivery_id = f"{run.run_id[:24]}{len(self.outbox):08x}"
        self.outbox.append(
            new_send(
                destination,
                delivery_id,
                run.run_id,
                run.workflow_id,
                time.time(),
                payload,
                size,
                run.depth,
            )
        )
        return delivery_id


# The parameters a validation may have besides (config, max_bytes): named ones.
_FORWARDED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _send_method(kind: DestinationKind) -> Callable[..., str]:
    """`ctx.send.<kind>(...)`: the kind's validation, then the outbox, as one method.

    Written out with the validation's own parameters (after `config, max_bytes`)
    and compiled once, here, as `dataclasses` writes `__init__`: forwarding
    `*args, **kwargs` instead would cost more than half a microsecond a send
    (packing and unpacking them), a fifth of a whole SQL or S3 send. It also
    gives `help(ctx.send.http)` and argument errors the call's real signature.
    """
    signature = inspect.signature(kind.validate)
    parameters = list(signature.parameters.values())[2:]  # after (config, max_bytes)
    namespace: dict[str, Any] = {"_validate": kind.validate, "_name": kind.name}
    declared, passed = ["self"], []
    for index, parameter in enumerate(parameters):
        if parameter.kind not in _FORWARDED:
            raise TypeError(f"{kind.name}: validate takes no {parameter.kind.description}")
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and "*" not in declared:
            declared.append("*")
        default = ""
        if parameter.default is not inspect.Parameter.empty:
            namespace[f"_default_{index}"] = parameter.default
            default = f"=_default_{index}"
        declared.append(f"{parameter.name}{default}")
        keyword = parameter.kind is inspect.Parameter.KEYWORD_ONLY
        passed.append(f"{parameter.name}={parameter.name}" if keyword else parameter.name)
    source = (
        f"def {kind.name}({', '.join(declared)}):\n"
        f"    payload, size = _validate(self._config, self._max_bytes, {', '.join(passed)})\n"
        "    return self._append(_name, payload, size)\n"
    )
    exec(source, namespace)  # noqa: S102 (our own text, made from a signature)
    method: Callable[..., str] = namespace[kind.name]
    method.__qualname__ = f"SendCollector.{kind.name}"
    method.__module__ = __name__
    method.__doc__ = kind.validate.__doc__
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_parameter, *parameters], return_annotation="str"
    )
    return method


for _kind in DESTINATION_KINDS:
    setattr(SendCollector, _kind.name, _send_method(_kind))
del _kind
