"""The query side of the SQL destination: a role that can only read, its own pool, bounded results.

Owns `SqlReader`, which answers `rt.sql_query` / `POST /sql`. Queries never run on
the loader's connections and never on a superuser session (a superuser session can
undo any `SET ROLE`, and then read server files or run programs). Instead:

- The configured role (which must be a superuser or have CREATEROLE) creates or
  fixes up a *login* role, `outbound_reader_<12 hex of sha256(configured user)>`:
  not a superuser, no CREATEROLE/CREATEDB/REPLICATION/BYPASSRLS, a member of no
  role (so no `SET ROLE` anywhere and no `pg_read_server_files`-style powers),
  `default_transaction_read_only` on. It may read only the tables the SQL destination
  made: tables in the loader's schema, owned by the configured role, with the
  `_event_id uuid` and `_received_at timestamptz` columns. Tables made later are
  granted when a query is refused a table, and that query runs once more.
- Its password is an HMAC of the configured password, so every runtime using the
  same credentials derives the same one; it is sent to Postgres only as a SCRAM
  verifier and never logged.
- The reader logs in on a pool of its own, opened at the first query; a query's
  session settings stay on that pool (and asyncpg resets them on release).
- Results are read through a cursor in chunks while their JSON size is counted;
  past `max_result_bytes` the rows read so far come back marked `truncated`.

If the configured role cannot make such a role, every query fails with
`SqlQueryRefused` and nothing runs. Coroutines run on the runtime's asyncio loop
only. Must not touch actor state or the loader's schema cache; the loader's pool is
borrowed only for the role's own set-up statements and grants.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import decimal
import hashlib
import hmac
import logging
import math
import os
import secrets
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from outbound.destinations.delivery import describe_error
from outbound.destinations.json_encoding import json_encoder
from outbound.destinations.sql.schema import EVENT_ID, RECEIVED_AT, quote_ident
from outbound.destinations.sql.store import SqlQueryError, _init_connection, close_pool

if TYPE_CHECKING:
    from outbound.destinations.sql.store import PostgresStore

__all__ = ["SqlQueryError", "SqlQueryRefused", "SqlReader", "reader_role_name"]

logger = logging.getLogger(__name__)

READER_PREFIX = "outbound_reader_"
GRACE = 5.0  # seconds past a query's own timeout before the whole call gives up
FIRST_CHUNK_ROWS = 32  # rows can be huge: learn their size before fetching many
CHUNK_BYTES = 1024 * 1024  # later chunks aim at this much JSON
MAX_CHUNK_ROWS = 10_000

#: Tables of the SQL destination (schema $1, owner $2) that role $3 cannot read yet.
_UNREADABLE_TABLES = f"""
SELECT c.oid::regclass::text FROM pg_class c
 WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1)
   AND c.relowner = (SELECT oid FROM pg_roles WHERE rolname = $2)
   AND c.relkind IN ('r', 'p')
   AND NOT has_table_privilege($3, c.oid, 'SELECT')
   AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND NOT a.attisdropped
                  AND a.attname = '{EVENT_ID}' AND a.atttypid = 'uuid'::regtype)
   AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND NOT a.attisdropped
                  AND a.attname = '{RECEIVED_AT}' AND a.atttypid = 'timestamptz'::regtype)
"""

#: Is role $1 more than a plain reader (attributes, or a member of any role)?
_PRIVILEGED = """
SELECT r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls
       OR EXISTS (SELECT FROM pg_auth_members m WHERE m.member = r.oid)
  FROM pg_roles r WHERE r.rolname = $1
"""

#: What the first statement on a pooled connection raises when its session ended while it
#: sat idle (Postgres restarted, an administrator ended it): no query ran on it yet.
_DIED_IDLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # the session's last words arrived while it sat idle
    ConnectionError,
)

_TYPE_NAMES = {
    "float8": "double precision",
    "float4": "real",
    "int8": "bigint",
    "int4": "integer",
    "int2": "smallint",
    "bool": "boolean",
    "varchar": "character varying",
    "bpchar": "character",
    "timestamptz": "timestamp with time zone",
}


class SqlQueryRefused(SqlQueryError):
    """The query API is off: no role that can only read could be set up. Nothing ran."""


@dataclass(frozen=True, slots=True)
class ReaderLogin:
    """Who queries log in as, and where the SQL destination's tables are."""

    role: str
    password: str
    owner: str  # the configured role: it owns the tables the reader may read
    schema: str  # the loader's current_schema(): the reader's search_path


def reader_role_name(configured_user: str) -> str:
    """The reader role of a configured user (roles are cluster-wide: one per user)."""
    return READER_PREFIX + hashlib.sha256(configured_user.encode("utf-8")).hexdigest()[:12]


def configured_password(url: str, conn: asyncpg.Connection | None = None) -> str | None:
    """The password a loader connection logged in with: as asyncpg resolved it (URL,
    `PGPASSWORD` or a passfile), else as the URL or `PGPASSWORD` give it."""
    resolved = getattr(getattr(conn, "_params", None), "password", None)
    if isinstance(resolved, str) and resolved:
        return resolved
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return urllib.parse.unquote(parts.password)
    query = urllib.parse.parse_qs(parts.query)
    if query.get("password"):
        return query["password"][0]
    return os.environ.get("PGPASSWORD") or None


def reader_password(configured: str | None, role: str) -> str:
    """Derived from the configured password, so runtimes with the same credentials agree.

    Without a configured password (trust, peer or certificate authentication) the
    reader's password does not matter for logging in; it is random, so it is no
    guessable secret either.
    """
    if configured is None:
        return secrets.token_urlsafe(32)
    digest = hmac.new(
        configured.encode("utf-8"), b"outbound sql reader\x00" + role.encode("utf-8"), "sha256"
    ).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier Postgres stores (so the password itself is never sent)."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class SqlReader:
    """Read-only queries for one runtime. Every coroutine must run on one asyncio loop."""

    def __init__(self, store: PostgresStore, pool_size: int, max_result_bytes: int) -> None:
        self.store = store  # the loader: its pool runs the reader's set-up and grants
        self.pool_size = pool_size
        self.max_result_bytes = max_result_bytes
        self._pool: asyncpg.Pool | None = None
        self._login: ReaderLogin | None = None
        self._opening: asyncio.Lock | None = None
        self._refusal_logged = False

    # -- queries -------------------------------------------------------------------------

    async def query(self, sql: str, timeout: float) -> dict[str, Any]:
        """Run one statement as the reader in a READ ONLY transaction, bounded in time and size.

        Returns `{"columns": [{"name", "type"}], "rows": [[...]], "truncated": bool}`
        with JSON-friendly values; `truncated` says rows were left out past
        `max_result_bytes` of JSON.
        """
        try:
            async with asyncio.timeout(timeout + GRACE):
                pool, login = await self._ready(timeout)
                for last in (False, True):
                    conn = await self._acquire(pool, timeout)
                    try:
                        try:
                            await _begin(conn, timeout)
                        except _DIED_IDLE:
                            if last:
                                raise
                            continue  # the pool noticed too late: take another connection
                        try:
                            return await self._run(conn, sql)
                        except asyncpg.InsufficientPrivilegeError:
                            if not await self._grant_new_tables(login):
                                raise
                        await _begin(conn, timeout)
                        return await self._run(conn, sql)  # it may read them now
                    finally:
                        await pool.release(conn)
                raise AssertionError("unreachable")
        except SqlQueryError:
            raise
        except asyncpg.InvalidAuthorizationSpecificationError as error:  # logging in failed
            await self.close()  # the next query sets the role (and its password) up again
            raise SqlQueryRefused(
                f"SQL queries are refused: the reader role cannot log in ({error}); "
                f"check that the server accepts password logins for it"
            ) from None
        except asyncpg.PostgresError as error:
            raise SqlQueryError(_explain(error, self._login), error.sqlstate) from None
        except RecursionError:  # the query's doing: Postgres's code for "too complex"
            raise SqlQueryError("a value in the result is nested too deeply", "54001") from None
        except TimeoutError:  # as Postgres's statement timeout says it (query_canceled)
            raise SqlQueryError(f"the query took longer than {timeout:g} s", "57014") from None
        except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError) as error:
            raise SqlQueryError(f"cannot query Postgres: {describe_error(error)}") from None

    async def _acquire(self, pool: asyncpg.Pool, timeout: float) -> asyncpg.Connection:
        try:
            return await pool.acquire(timeout=timeout)
        except TimeoutError:  # busy, not the query's fault: no sqlstate (POST /sql: 503)
            raise SqlQueryError(
                f"all {self.pool_size} query connections stayed busy for {timeout:g} s "
                f"(OUTBOUND_SQL_POOL_SIZE)"
            ) from None

    async def _run(self, conn: asyncpg.Connection, sql: str) -> dict[str, Any]:
        """`sql` in the transaction `_begin` opened, which ends here (rolled back)."""
        try:
            statement = await conn.prepare(sql)
            attributes = statement.get_attributes()
            if attributes:
                rows, truncated = await self._read_bounded(statement)
            else:  # a statement that returns no rows (DO, SET, ...)
                await statement.fetch()
                rows, truncated = [], False
        except asyncpg.PostgresError:
            await _end(conn)
            raise
        await _end(conn)
        result: dict[str, Any] = {
            "columns": [{"name": a.name, "type": _type_name(a.type)} for a in attributes],
            "rows": rows,
            "truncated": truncated,
        }
        if truncated:
            result["max_result_bytes"] = self.max_result_bytes
        return result

    async def _read_bounded(
        self, statement: asyncpg.prepared_stmt.PreparedStatement
    ) -> tuple[list[list[Any]], bool]:
        """Rows, in chunks from a cursor, until their JSON passes `max_result_bytes`."""
        limit = self.max_result_bytes
        cursor = await statement.cursor()
        rows: list[list[Any]] = []
        used = 0  # bytes of JSON of `rows`, with a separator each
        want = FIRST_CHUNK_ROWS
        while True:
            records = await cursor.fetch(want)
            chunk = [[json_value(value) for value in record] for record in records]
            size = _json_size(chunk)  # one encoding for the chunk, row by row only at the end
            if used + size <= limit:
                rows.extend(chunk)
                used += size
            else:
                for row in chunk:
                    size = _json_size(row) + 1
                    if used + size > limit:
                        return rows, True
                    used += size
                    rows.append(row)
            if len(records) < want:
                return rows, False
            want = max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES * len(rows) // max(used, 1)))

    # -- the reader's pool and role --------------------------------------------------------

    async def _ready(self, timeout: float) -> tuple[asyncpg.Pool, ReaderLogin]:
        if self._pool is not None and self._login is not None:
            return self._pool, self._login
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None or self._login is None:
                login = await self._set_up(timeout)
                self._pool = await asyncpg.create_pool(
                    self.store.url,
                    user=login.role,
                    password=login.password,
                    min_size=0,
                    max_size=self.pool_size,
                    statement_cache_size=0,  # every query is new text
                    command_timeout=None,  # bounded by statement_timeout and `query`
                    init=_init_reader_connection,
                    server_settings={
                        "search_path": quote_ident(login.schema),
                        "default_transaction_read_only": "on",
                        "application_name": "outbound-query",
                    },
                )
                self._login = login
        return self._pool, self._login

    async def _set_up(self, timeout: float) -> ReaderLogin:
        """Create or fix up the reader role on a loader connection; refuse if we cannot."""
        pool = await self.store.pool()
        async with pool.acquire(timeout=timeout) as conn:
            user, schema, superuser, createrole = await conn.fetchrow(
                "SELECT r.rolname, current_schema(), r.rolsuper, r.rolcreaterole "
                "FROM pg_roles r WHERE r.rolname = current_user"
            )
            role = reader_role_name(user)
            if not (superuser or createrole):
                raise self._refused(user, role, "it is neither a superuser nor has CREATEROLE")
            if schema is None:
                raise self._refused(user, role, "its search_path names no existing schema")
            password = reader_password(configured_password(self.store.url, conn), role)
            login = ReaderLogin(role=role, password=password, owner=user, schema=schema)
            try:
                async with conn.transaction():
                    await _lock_reader(conn, role)
                    await _make_reader(conn, login)
                    await _grant(conn, login)
                    if await conn.fetchval(_PRIVILEGED, role):
                        raise self._refused(
                            user,
                            role,
                            "it still has more than read powers",
                            fix=f"take them from {role} as a superuser",
                        )
            except asyncpg.InsufficientPrivilegeError as error:
                raise self._refused(user, role, str(error)) from None
        logger.info("SQL queries log in as %s (reads the tables in schema %s)", role, schema)
        return login

    def _refused(
        self,
        user: str,
        role: str,
        why: str,
        fix: str = "give it CREATEROLE, or connect as a role that has it",
    ) -> SqlQueryRefused:
        message = (
            f"SQL queries are refused: the configured Postgres role {user!r} cannot set up "
            f"the read-only login role {role!r} that queries must run as ({why}); {fix}"
        )
        if not self._refusal_logged:
            self._refusal_logged = True
            logger.warning("%s", message)
        return SqlQueryRefused(message)

    async def _grant_new_tables(self, login: ReaderLogin) -> list[str]:
        """Grant the tables the SQL destination made since the reader was set up.

        Called when a query was refused a table: the cheapest moment to learn of new
        tables (loads never wait for it, queries pay nothing otherwise).
        """
        pool = await self.store.pool()
        async with pool.acquire(timeout=30) as admin, admin.transaction():
            await _lock_reader(admin, login.role)
            return await _grant(admin, login)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self._login = None
        self._opening = None  # a runtime started again may run another loop
        await close_pool(pool)


async def _begin(conn: asyncpg.Connection, timeout: float) -> None:
    # One round trip. The SELECT starts the transaction's snapshot, after which
    # `SET TRANSACTION READ WRITE` is refused too.
    milliseconds = max(1, int(timeout * 1000))  # an int: safe in the text
    await conn.execute(
        f"BEGIN READ ONLY; SELECT set_config('statement_timeout', '{milliseconds}', true)"
    )


async def _end(conn: asyncpg.Connection) -> None:
    if conn.is_in_transaction():  # unless the query ended it itself (COMMIT)
        await conn.execute("ROLLBACK")  # it read only: nothing to keep


async def _lock_reader(conn: asyncpg.Connection, role: str) -> None:
    # Runtimes sharing a database set the role up at once: concurrent ALTER ROLE or
    # GRANT on one object fails with "tuple concurrently updated".
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", role)


async def _make_reader(conn: asyncpg.Connection, login: ReaderLogin) -> None:
    role = quote_ident(login.role)
    # Advisory locks are per database: a runtime on another database may create it too.
    await conn.execute(
        f"""DO $$ BEGIN CREATE ROLE {role};
            EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"""
    )
    powers = await conn.fetchrow(
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolinherit, rolreplication, rolbypassrls "
        "FROM pg_roles WHERE rolname = $1",
        login.role,
    )
    # Name only the attributes to take away: a CREATEROLE role may not even mention
    # SUPERUSER, REPLICATION or BYPASSRLS (a role that has them is refused below).
    taken = " ".join(_TAKE_AWAY[name] for name, value in powers.items() if value)
    await conn.execute(
        f"ALTER ROLE {role} WITH LOGIN {taken} PASSWORD {_literal(scram_verifier(login.password))}"
    )
    await conn.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
    granted = await conn.fetch(
        "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
        "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = $1",
        login.role,
    )
    for (name,) in granted:  # a role it belongs to would lend it powers or SET ROLE
        await conn.execute(f"REVOKE {quote_ident(name)} FROM {role}")
    if not await conn.fetchval("SELECT has_schema_privilege($1, $2, 'USAGE')", login.role,
                               login.schema):  # fmt: skip
        await conn.execute(f"GRANT USAGE ON SCHEMA {quote_ident(login.schema)} TO {role}")


_TAKE_AWAY = {
    "rolsuper": "NOSUPERUSER",
    "rolcreatedb": "NOCREATEDB",
    "rolcreaterole": "NOCREATEROLE",
    "rolinherit": "NOINHERIT",
    "rolreplication": "NOREPLICATION",
    "rolbypassrls": "NOBYPASSRLS",
}


async def _grant(conn: asyncpg.Connection, login: ReaderLogin) -> list[str]:
    """SELECT on the destination's tables the reader cannot read yet; those tables."""
    tables = [name for (name,) in await conn.fetch(
        _UNREADABLE_TABLES, login.schema, login.owner, login.role)]  # fmt: skip
    if tables:  # regclass text: quoted, and qualified if needed
        await conn.execute(f"GRANT SELECT ON {', '.join(tables)} TO {quote_ident(login.role)}")
    return tables


async def _init_reader_connection(conn: asyncpg.Connection) -> None:
    # The last check before any query runs on this login: if someone made the
    # reader more than a reader since it was set up, refuse rather than run.
    if await conn.fetchval(_PRIVILEGED, await conn.fetchval("SELECT session_user")):
        raise SqlQueryRefused(
            "SQL queries are refused: the reader role has been given more than read "
            "powers (superuser, CREATEROLE or a role membership); take them away"
        )
    await _init_connection(conn)


def _explain(error: asyncpg.PostgresError, login: ReaderLogin | None) -> str:
    message = describe_error(error)
    if error.sqlstate == "42501" and login is not None:  # insufficient_privilege
        message += (
            f" (queries run as {login.role}, which can only read the tables "
            f"the SQL destination made)"
        )
    return message


def _type_name(pg_type: Any) -> str:
    name = pg_type.name
    return _TYPE_NAMES.get(name, name)


_compact_json = json_encoder(compact=True)


def _json_size(value: Any) -> int:
    """Bytes of `value` as compact UTF-8 JSON."""
    text = _compact_json(value)
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def json_value(value: Any) -> Any:
    """A query result value as JSON can carry it."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return str(value)
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple | asyncpg.Record):
        return [json_value(item) for item in value]
    return str(value)
