"""`outbound config`: every `OUTBOUND_*` variable, its default, its value here and meaning.

Owns `variables` (one typed `Variable` per `Config` field, grouped by the
settings class that declares it), `masked` (what of a value may be shown:
secrets never are) and the two renderings: text wrapped to the terminal, and
`--json`. Reads the environment and `Config`'s fields only; starts nothing.
Values are shown as set; whether they are valid is checked by making a
`Config` from them, and a bad one is reported (exit status 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outbound.config import Config

MASK = "****"
#: A variable whose whole value is a secret (API token, S3 secret key, signing secrets).
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD")
# `scheme://userinfo@`: the password of user:password@, or a token@ without a user.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s,]*)@")
# ?password=..., &sslpassword=..., ?token=... in a URL's query.
_QUERY_SECRET = re.compile(
    r"(?i)(?P<key>[?&](?:[a-z_]*password|passwd|token|secret|api_?key)=)[^&#\s,]*"
)
#: Headings of the settings classes `Config` is made of (by class name).
SECTIONS = {
    "RuntimeSettings": "Runtime",
    "RetrySettings": "Retries (HTTP, email, batches)",
    "HttpSettings": "HTTP destination",
    "S3Settings": "S3 destination",
    "BatchSettings": "Batches (S3, SQL)",
    "SqlSettings": "SQL destination",
    "EmailSettings": "Email destination",
    "SseSettings": "SSE destination",
    "ApiSettings": "HTTP API (outbound serve)",
    "EmitSettings": "Emit destination",
    "JournalSettings": "Journal (durability, cluster)",
}
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Variable:
    """One `OUTBOUND_*` variable as `outbound config` shows it."""

    name: str  # the environment variable
    field: str  # the `Config` field
    section: str
    default: str  # as text
    value: str | None  # as set in the environment, masked; None when unset
    meaning: str
    secret: bool  # its whole value is masked

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"set": self.value is not None}


def masked(name: str, value: str) -> str:
    """`value` of variable `name` as it may be shown: a secret variable's as `****`, a
    URL's password (`user:****@`), token (`****@`) and password/token query parameters."""
    if _SECRET_NAME.search(name):
        return MASK

    def userinfo(match: re.Match[str]) -> str:
        user, colon, _password = match["userinfo"].partition(":")
        shown = f"{user}:{MASK}" if colon else MASK
        return f"{match['scheme']}{shown}@"

    value = _URL_USERINFO.sub(userinfo, value)
    return _QUERY_SECRET.sub(lambda match: f"{match['key']}{MASK}", value)


def _shown_default(default: Any) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, Path):
        return str(default)
    if isinstance(default, int) and default >= MiB and default % MiB == 0:
        return f"{default} ({default // MiB} MiB)"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    if default == "":
        return '""'
    return str(default)


def _sections() -> dict[str, str]:
    """Field name -> heading, from the settings class that declares each field."""
    owners: dict[str, str] = {}
    for base in Config.__mro__[1:]:  # each settings class holds its own fields only
        if dataclasses.is_dataclass(base):
            for f in dataclasses.fields(base):
                owners.setdefault(f.name, SECTIONS.get(base.__name__, base.__name__))
    return owners


def variables(environ: Mapping[str, str] | None = None) -> list[Variable]:
    """Every variable `Config.from_env()` reads, in `Config.describe()`'s order."""
    environ = os.environ if environ is None else environ
    sections = _sections()
    found = []
    for f in dataclasses.fields(Config):
        name = f.metadata["env"]
        raw = environ.get(name)
        found.append(
            Variable(
                name=name,
                field=f.name,
                section=sections.get(f.name, "Other"),
                default=_shown_default(f.default),
                value=None if raw is None or raw == "" else masked(name, raw),
                meaning=f.metadata["doc"],
                secret=bool(_SECRET_NAME.search(name)),
            )
        )
    return found


def render_text(found: list[Variable], width: int) -> str:
    """Grouped by section; each variable on one line (with its value and default) and its
    meaning wrapped below it, every line within `width` columns."""
    width = max(width, 40)
    wrap = textwrap.TextWrapper(width=width, break_long_words=True, break_on_hyphens=False)
    lines = textwrap.wrap(
        "Outbound reads these environment variables (current value, default, meaning); "
        "secrets are masked. Machine-readable: outbound config --json.",
        width,
    )
    section = None
    for variable in found:
        if variable.section != section:
            section = variable.section
            lines += ["", section]
        if variable.value is None:
            shown = f"{variable.name} = {variable.default}  (default)"
        else:
            shown = f"{variable.name} = {variable.value}  (set; default {variable.default})"
        wrap.initial_indent, wrap.subsequent_indent = "  ", "      "
        lines += wrap.wrap(shown)
        wrap.initial_indent = wrap.subsequent_indent = "      "
        lines += wrap.wrap(variable.meaning)
    return "\n".join(lines)


def run_config(arguments: argparse.Namespace) -> int:
    """Entry point of `outbound config` (argument parsing lives in runtime.cli)."""
    found = variables()
    if arguments.json:
        print(json.dumps([variable.as_dict() for variable in found], indent=2))
    else:
        print(render_text(found, shutil.get_terminal_size((80, 24)).columns))
    try:
        Config.from_env()
    except ValueError as error:
        problem = str(error)
        for variable in found:  # the message quotes the value: a secret stays masked
            raw = os.environ.get(variable.name, "")
            if raw and variable.value is not None and raw != variable.value:
                problem = problem.replace(raw, variable.value)
        print(f"outbound config: not a valid configuration: {problem}", file=sys.stderr)
        return 1
    return 0
