"""The journal's settings: where sends are journaled, and how to reach it.

Owns `JournalSettings` (composed into the runtime's `Config`) and
`journal_mode`, the one reading of `OUTBOUND_JOURNAL`. Must not import the
rest of the runtime.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Literal

from outbound.destinations.settings import Settings, setting

JournalMode = Literal["off", "local", "nats"]

#: What a cluster name may hold: it prefixes stream names (no `.`, `*`, `>`, spaces).
_CLUSTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


def default_node_id() -> str:
    """The host name and pid: unique among the processes of a cluster."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class JournalSettings(Settings):
    """The journal (README: Durability): off, an embedded nats-server, or a NATS you run."""

    journal: str = setting(
        "OUTBOUND_JOURNAL",
        "off",
        "off (sends live in memory only), local (an embedded nats-server, storage under "
        "<data_dir>/journal/) or nats://host:port[,nats://...] (a NATS with JetStream; "
        "user:password@ or token@ in the URL)",
    )
    cluster: str = setting(
        "OUTBOUND_CLUSTER",
        "outbound",
        "prefix of every journal stream and subject (letters, digits, _ and -)",
    )
    node_id: str = setting("OUTBOUND_NODE_ID", "", "this node's name (default: host name and pid)")
    journal_sync: str = setting(
        "OUTBOUND_JOURNAL_SYNC",
        "default",
        "local journal: how often nats-server fsyncs (default: every 2 min; always: "
        "before each acknowledgement, so a machine crash loses nothing; or a duration like 1s)",
    )
    journal_ack_wait: float = setting(
        "OUTBOUND_JOURNAL_ACK_WAIT",
        30.0,
        "cluster (nats://): seconds after which a node that stopped answering is taken for "
        "dead, and its events and sends are taken over by the others",
        rule="positive",
    )
    journal_wait: float = setting(
        "OUTBOUND_JOURNAL_WAIT",
        5.0,
        "seconds a journal write may wait for an unreachable journal before rt.publish "
        "and POST /workflows/{id}/events give up (503)",
        rule="positive",
    )
    journal_max_queued: int = setting(
        "OUTBOUND_JOURNAL_MAX_QUEUED",
        100_000,
        "cluster (nats://): events waiting for a node (published, taken by none yet) before "
        "rt.publish waits for room and POST /workflows/{id}/events answers 503 (checked "
        "every 0.5 s, so a burst may pass it a little); emits' listener runs are never refused",
        rule="at least 1",
    )
    journal_replicas: int = setting(
        "OUTBOUND_JOURNAL_REPLICAS",
        1,
        "nats://: copies of every journal stream and bucket in a NATS cluster (3 for a "
        "three-server cluster: one server may die without losing anything); at most 5",
        rule="at least 1",
    )
    journal_creds: str | None = setting(
        "OUTBOUND_JOURNAL_CREDS", None, "NATS credentials file (JWT and NKey) for nats:// URLs"
    )
    journal_tls_ca: str | None = setting(
        "OUTBOUND_JOURNAL_TLS_CA", None, "CA bundle that signs the NATS servers' certificates"
    )
    journal_tls_cert: str | None = setting(
        "OUTBOUND_JOURNAL_TLS_CERT", None, "client certificate for NATS (mutual TLS)"
    )
    journal_tls_key: str | None = setting(
        "OUTBOUND_JOURNAL_TLS_KEY", None, "the client certificate's private key"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_journal_settings(self)


def check_journal_settings(settings: JournalSettings) -> None:
    """Fail when the config is made, naming the variable, not at the first journal write."""
    journal_mode(settings.journal)
    if not _CLUSTER_NAME.fullmatch(settings.cluster):
        raise ValueError(
            f"OUTBOUND_CLUSTER={settings.cluster!r}: use 1 to 32 letters, digits, _ or -"
        )
    if not 1 <= settings.journal_replicas <= 5:
        raise ValueError(
            f"OUTBOUND_JOURNAL_REPLICAS={settings.journal_replicas}: use 1 to 5 (JetStream's limit)"
        )
    if settings.journal_replicas > 1 and journal_mode(settings.journal) != "nats":
        raise ValueError(
            f"OUTBOUND_JOURNAL_REPLICAS={settings.journal_replicas} needs a NATS cluster "
            "(OUTBOUND_JOURNAL=nats://...); the local journal is one server"
        )
    if settings.journal_sync != "default" and not re.fullmatch(
        r"always|\d+(ms|s|m|h)", settings.journal_sync
    ):
        raise ValueError(
            f"OUTBOUND_JOURNAL_SYNC={settings.journal_sync!r}: use default, always, "
            "or a duration like 500ms, 1s, 2m"
        )


def journal_mode(journal: str) -> JournalMode:
    """`off`, `local` or `nats` (a URL list); ValueError naming the variable otherwise."""
    value = journal.strip()
    if value in ("off", "local"):
        return value  # type: ignore[return-value]
    urls = [url.strip() for url in value.split(",")]
    if urls and all(re.match(r"(nats|tls)://[^\s]+$", url) for url in urls):
        return "nats"
    raise ValueError(
        f"OUTBOUND_JOURNAL={journal!r}: use off, local, or nats://host:port "
        "(comma-separated for a cluster)"
    )
