"""Cutting off a TCP connection the ASGI server will not let go of.

Owns `shutdown_connection(local, peer)`. Hypercorn's trio worker shields its
socket writes, so a client that stops reading wedges its connection's task in
a write that no cancellation reaches. ASGI gives the app no handle on the
socket, only the two addresses; this finds the process's own socket with
those addresses (through `/proc/self/fd` or `/dev/fd`) and shuts it down,
which fails the blocked write at once and tells the client to reconnect.
Only sockets of this process are touched, and only the one connection.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def _fd_dir() -> str | None:
    for path in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(path):
            return path
    return None


def _same(address: Sequence[object], wanted: Sequence[object]) -> bool:
    return tuple(address[:2]) == tuple(wanted[:2])


def shutdown_connection(local: Sequence[object] | None, peer: Sequence[object] | None) -> bool:
    """Shut down this process's TCP connection `local` <-> `peer`; False if none matched."""
    fd_dir = _fd_dir()
    if fd_dir is None or not local or not peer:
        return False
    for name in os.listdir(fd_dir):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))  # our own handle: closing it keeps theirs
        except (ValueError, OSError):
            continue
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM:
                    continue
                if _same(sock.getsockname(), local) and _same(sock.getpeername(), peer):
                    sock.shutdown(socket.SHUT_RDWR)
                    logger.info("shut down the connection of %s:%s", *tuple(peer)[:2])
                    return True
            except OSError:
                continue
    return False
