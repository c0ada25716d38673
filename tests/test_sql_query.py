"""The query API (`rt.sql_query`, `POST /sql`) against a real Postgres, connected as a superuser.

Queries must log in as a role that can only read the SQL destination's tables, on
connections of their own, with results bounded in size. Rows are loaded with the
`load` workflow of test_sql and checked with the test's own superuser connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import tracemalloc
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sql_support import Db, load

from outbound import Runtime
from outbound.actors.ids import new_id
from outbound.destinations.sql.query import (
    SqlQueryError,
    SqlQueryRefused,
    reader_password,
    reader_role_name,
)
from outbound.embedded import EmbeddedPostgres


@pytest.fixture
def make_login_role(db: Db) -> Iterator[Callable[..., str]]:
    """`make_login_role(*attributes)` -> the URL of a new non-superuser role with its own
    schema (where its loads go); both are dropped at teardown."""
    made: list[str] = []

    def make(*attributes: str) -> str:
        role = f"t_login_{new_id()[:12]}"
        made.append(role)
        db.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}' {' '.join(attributes)}")
        db.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")  # first on its search_path
        parts = urllib.parse.urlsplit(db.url)
        netloc = f"{role}:pw-{role}@{parts.hostname}:{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    yield make
    for role in made:
        reader = reader_role_name(role)
        db.value(  # runtimes still logged in (fixtures stop them later)
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE usename = $1 OR usename = $2",
            role,
            reader,
        )
        db.execute(f"DROP SCHEMA IF EXISTS {role} CASCADE")
        db.execute(f"DROP OWNED BY {role}")
        db.execute(
            f"""DO $$ BEGIN
                  IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{reader}') THEN
                    DROP OWNED BY {reader}; DROP ROLE {reader};
                  END IF;
                END $$"""
        )
        db.execute(f"DROP ROLE {role}")


def _superuser(db: Db) -> str:
    return str(db.value("SELECT current_user"))


def _end_logins(db: Db, role: str) -> None:
    """End every session of `role` and wait until Postgres has let them go."""
    db.value(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1", role
    )
    deadline = time.monotonic() + 10
    while db.value("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role):
        assert time.monotonic() < deadline, f"sessions of {role} did not end"
        time.sleep(0.02)


# -- no escalation ----------------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory Postgres could write to, whichever user it runs as."""
    path = Path(tempfile.mkdtemp(prefix="outbound-query-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_the_escalation_do_block_fails_and_runs_no_program(
    make_sql_runtime: Callable[..., Runtime], db: Db, shared_dir: Path
) -> None:
    rt = make_sql_runtime()
    target = shared_dir / "escalated"
    superuser = _superuser(db)
    with pytest.raises(SqlQueryError, match="permission denied") as caught:
        rt.sql_query(
            f"DO $$BEGIN PERFORM set_config('role','{superuser}',true); "
            f"EXECUTE 'COPY (SELECT 1) TO PROGRAM ''id > {target}'''; END$$"
        )
    assert caught.value.sqlstate == "42501"
    assert not target.exists()


@pytest.mark.parametrize(
    ("statement", "refusal"),
    [
        ("SELECT pg_read_file('/etc/hostname')", "permission denied for function pg_read_file"),
        (
            "SELECT set_config('role', '{superuser}', true), pg_read_file('/etc/hostname')",
            "permission denied",
        ),  # fmt: skip
        ("SELECT pg_ls_dir('.')", "permission denied for function pg_ls_dir"),
        ("SELECT rolname, rolpassword FROM pg_authid", "permission denied for table pg_authid"),
        ("SET ROLE {superuser}", "permission denied to set role"),
        ("SELECT set_config('role', '{superuser}', false)", "permission denied to set role"),
        ("SET SESSION AUTHORIZATION {superuser}", "permission denied to set session authoriz"),
        ("COPY (SELECT 1) TO PROGRAM 'true'", "permission denied to COPY to or from an external"),
        ("COPY (SELECT 1) TO '/tmp/outbound-query-copy'", "permission denied to COPY to a file"),
        ('SELECT * FROM "{other}"', "permission denied for table"),
        ('DELETE FROM "{table}"', "read-only transaction"),
        (
            'INSERT INTO "{table}" (_event_id, _received_at) VALUES (gen_random_uuid(), now())',
            "read-only transaction",
        ),  # fmt: skip
        ('DROP TABLE "{table}"', "read-only transaction"),
        ('ALTER TABLE "{table}" ADD COLUMN x int', "read-only transaction"),
        ("CREATE TABLE {table}_new (a int)", "read-only transaction"),
        ("SET TRANSACTION READ WRITE", "read-write mode"),
        ("SELECT 1; SELECT 2", "multiple commands"),
    ],
)
def test_privileged_reads_writes_and_ddl_fail_with_a_clear_error(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str, statement: str, refusal: str
) -> None:
    rt = make_sql_runtime()
    load(rt, table, [{"n": 1}])
    other = f"{table}_not_ours"  # made by the same superuser, but not by the destination
    db.execute(f'CREATE TABLE "{other}" (secret text)')
    try:
        sql = statement.format(table=table, other=other, superuser=_superuser(db))
        with pytest.raises(SqlQueryError) as caught:
            rt.sql_query(sql)
        assert refusal.lower() in str(caught.value).lower()
        assert caught.value.sqlstate  # Postgres's refusal: POST /sql answers 400
    finally:
        db.execute(f'DROP TABLE "{other}"')
    assert db.count(table) == 1
    assert not os.path.exists("/tmp/outbound-query-copy")
    assert rt.sql_query(f'SELECT n FROM "{table}"')["rows"] == [[1.0]]


def test_queries_log_in_as_a_plain_role_that_reads_only_the_destinations_tables(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    load(rt, table, [{"n": 1}])
    [[session_user, current_user]] = rt.sql_query("SELECT session_user, current_user")["rows"]
    superuser = _superuser(db)
    assert session_user == current_user == reader_role_name(superuser)
    [role] = db.fetch(
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, rolcanlogin,"
        " (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid) AS memberships"
        " FROM pg_roles r WHERE rolname = $1",
        session_user,
    )
    assert role == {
        "rolsuper": False, "rolcreaterole": False, "rolcreatedb": False,
        "rolreplication": False, "rolbypassrls": False, "rolcanlogin": True, "memberships": 0,
    }  # fmt: skip
    for power in ("pg_read_server_files", "pg_execute_server_program", "pg_read_all_data",
                  "pg_read_all_settings", "pg_write_server_files", superuser):  # fmt: skip
        assert db.value("SELECT pg_has_role($1, $2, 'USAGE')", session_user, power) is False
    readable = rt.sql_query(
        "SELECT relname FROM pg_class WHERE relkind = 'r' "
        "AND relnamespace = 'public'::regnamespace AND has_table_privilege(oid, 'SELECT')"
    )["rows"]
    ours = db.fetch(
        "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r' "
        "AND c.relnamespace = 'public'::regnamespace AND EXISTS (SELECT FROM pg_attribute a "
        "WHERE a.attrelid = c.oid AND a.attname = '_event_id' AND NOT a.attisdropped)"
    )
    assert {row[0] for row in readable} <= {row["relname"] for row in ours}
    assert [table] in readable


def test_powers_given_to_the_reader_are_taken_back_or_stop_queries(
    make_sql_runtime: Callable[..., Runtime], db: Db
) -> None:
    reader = reader_role_name(_superuser(db))
    first = make_sql_runtime()
    first.sql_query("SELECT 1")  # the reader exists
    db.execute(f"GRANT pg_read_server_files, pg_execute_server_program TO {reader}")
    try:
        _end_logins(db, reader)  # the next query logs in anew
        with pytest.raises(SqlQueryRefused, match="more than read powers"):
            first.sql_query("SELECT pg_read_file('/etc/hostname')")
        second = make_sql_runtime()  # sets the reader up again: the grants are revoked
        assert second.sql_query("SELECT 2")["rows"] == [[2]]
        assert db.value("SELECT count(*) FROM pg_auth_members m JOIN pg_roles r "
                        "ON r.oid = m.member WHERE r.rolname = $1", reader) == 0  # fmt: skip
        assert first.sql_query("SELECT 3")["rows"] == [[3]]
    finally:
        db.execute(f"REVOKE pg_read_server_files, pg_execute_server_program FROM {reader}")


def test_a_table_loaded_after_the_first_query_is_readable_at_once(
    make_sql_runtime: Callable[..., Runtime], table: str
) -> None:
    rt = make_sql_runtime()
    assert rt.sql_query("SELECT 1 AS one")["rows"] == [[1]]  # the reader is set up
    load(rt, table, [{"n": 1}, {"n": 2}])
    assert rt.sql_query(f'SELECT n FROM "{table}" ORDER BY n')["rows"] == [[1.0], [2.0]]


# -- queries have connections of their own ------------------------------------------------------


def test_the_query_pool_opens_at_the_first_query_and_closes_at_stop(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    def query_sessions() -> int:
        return int(
            db.value(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbound-query'"
            )
        )

    def wait_for_no_query_sessions() -> None:
        deadline = time.monotonic() + 10
        while query_sessions() and time.monotonic() < deadline:
            time.sleep(0.02)  # the server ends a session a moment after its client left

    wait_for_no_query_sessions()  # those of earlier tests' runtimes
    rt = make_sql_runtime()
    load(rt, table, [{"n": 1}])
    assert query_sessions() == 0  # starting and loading open no query connection
    assert rt.sql_query(f'SELECT count(*) FROM "{table}"')["rows"] == [[1]]
    assert query_sessions() == 1
    rt.stop()
    wait_for_no_query_sessions()
    assert query_sessions() == 0


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT set_config('role', '{nobody}', false)",
        "SET SESSION AUTHORIZATION {nobody}",
        "SELECT set_config('search_path', 'pg_catalog', false)",
        "SELECT set_config('default_transaction_read_only', 'on', false)",
        "SELECT set_config('statement_timeout', '1', false)",
        "SELECT pg_advisory_lock(hashtextextended(current_schema() || '.' || '{table}', 0))",
    ],
)
def test_a_query_leaves_no_setting_on_the_loaders_connections(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str, statement: str
) -> None:
    nobody = f"t_nobody_{new_id()[:12]}"  # a role with no rights at all
    db.execute(f"CREATE ROLE {nobody} NOLOGIN")
    try:
        rt = make_sql_runtime(sql_pool_size=1)  # one loader connection: the one a query got
        load(rt, table, [{"n": 1}])
        with contextlib.suppress(SqlQueryError):  # refused or not, the loader must not mind
            rt.sql_query(statement.format(nobody=nobody, table=table))
        load(rt, table, [{"n": 2}, {"text": "x"}])  # a schema change, into public.<table>
        assert rt.stats()["destinations"]["sql"]["delivered"] == 3
        assert db.count(table) == 3
        assert rt.sql_query(f'SELECT count(*) FROM "{table}"')["rows"] == [[3]]
    finally:
        db.execute(f"DROP OWNED BY {nobody}")
        db.execute(f"DROP ROLE {nobody}")


def test_six_slow_queries_do_not_hold_up_a_load(
    make_sql_runtime: Callable[..., Runtime], db: Db, table: str
) -> None:
    rt = make_sql_runtime()
    # The case is six pg_sleep(6); they sleep longer here so that a slow machine
    # cannot end them before the load, and they are cancelled once the load is in.
    sleep = "SELECT pg_sleep(60) AS slept"
    finished: list[str] = []

    def slow_query() -> None:
        try:
            rt.sql_query(sleep, timeout=60)
            finished.append("completed")
        except SqlQueryError as error:
            finished.append(str(error))

    queries = [threading.Thread(target=slow_query) for _ in range(6)]
    for thread in queries:
        thread.start()

    def sleeping() -> int:
        return int(db.value("SELECT count(*) FROM pg_stat_activity WHERE query = $1", sleep))

    try:
        running = min(6, rt.config.sql_pool_size)
        deadline = time.monotonic() + 30
        while sleeping() < running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleeping() >= running
        load(rt, table, [{"n": n} for n in range(50)])  # flushed: every row is in
        assert finished == []  # ... while every query is still sleeping or waiting
        assert db.count(table) == 50
    finally:
        while any(thread.is_alive() for thread in queries):  # end them early
            db.value(
                "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE query = $1",
                sleep,
            )
            for thread in queries:
                thread.join(0.1)
    assert len(finished) == 6


def test_a_query_that_finds_every_query_connection_busy_says_so(
    make_sql_runtime: Callable[..., Runtime], db: Db
) -> None:
    rt = make_sql_runtime(sql_pool_size=1)
    sleep = "SELECT pg_sleep(60) AS busy"
    slow = threading.Thread(target=_try_query, args=(rt, sleep))  # cancelled at the end
    slow.start()
    try:
        deadline = time.monotonic() + 30
        while not db.value("SELECT count(*) FROM pg_stat_activity WHERE query = $1", sleep):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(SqlQueryError, match="busy") as caught:
            rt.sql_query("SELECT 1", timeout=0.5)
        assert caught.value.sqlstate is None  # POST /sql: 503, not the query's fault
    finally:
        while slow.is_alive():
            db.value(
                "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE query = $1",
                sleep,
            )
            slow.join(0.1)
    assert rt.sql_query("SELECT 1")["rows"] == [[1]]


def _try_query(rt: Runtime, sql: str) -> dict[str, Any] | SqlQueryError:
    try:
        return rt.sql_query(sql)
    except SqlQueryError as error:
        return error


# -- bounded results --------------------------------------------------------------------------


def test_a_result_over_the_limit_is_cut_and_marked_truncated(
    make_sql_runtime: Callable[..., Runtime],
) -> None:
    limit = 10_000
    rt = make_sql_runtime(sql_max_result_bytes=limit)
    result = rt.sql_query("SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 100000) g")
    assert result["truncated"] is True and result["max_result_bytes"] == limit
    rows = result["rows"]
    assert 0 < len(rows) < 100
    assert [row[0] for row in rows] == list(range(1, len(rows) + 1))
    assert len(json.dumps(rows, separators=(",", ":"))) <= limit
    small = rt.sql_query("SELECT g FROM generate_series(1, 50) g")
    assert small["truncated"] is False and len(small["rows"]) == 50
    with pytest.raises(SqlQueryError, match="permission denied"):  # still the reader
        rt.sql_query("SELECT rolpassword FROM pg_authid")


def test_a_huge_result_is_read_in_chunks_not_held_whole(
    make_sql_runtime: Callable[..., Runtime],
) -> None:
    rt = make_sql_runtime(sql_max_result_bytes=256 * 1024)
    rt.sql_query("SELECT 1")  # the pools and the reader are set up outside the measure
    tracemalloc.start()
    try:
        result = rt.sql_query("SELECT g, g::text AS t FROM generate_series(1, 1000000) g")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result["truncated"] is True
    assert peak < 16 * 1024 * 1024  # a million rows held at once take well over 100 MiB


# -- a configured role that cannot make the reader ---------------------------------------------


def test_a_role_without_createrole_gets_queries_refused_while_loading_works(
    make_sql_runtime: Callable[..., Runtime],
    make_login_role: Callable[..., str],
    make_api: Callable[..., Any],
    db: Db,
    table: str,
) -> None:
    url = make_login_role("NOCREATEROLE")
    role = urllib.parse.urlsplit(url).username
    rt = make_sql_runtime(database_url=url)
    load(rt, table, [{"n": 1}])
    assert db.value(f'SELECT count(*) FROM {role}."{table}"') == 1
    with pytest.raises(SqlQueryRefused, match="CREATEROLE") as caught:
        rt.sql_query(f'SELECT n FROM "{table}"')
    assert caught.value.sqlstate is None
    assert db.value("SELECT count(*) FROM pg_roles WHERE rolname = $1",
                    reader_role_name(str(role))) == 0  # fmt: skip
    api = make_api(rt)
    answer = httpx.post(f"{api.url}/sql", json={"query": "SELECT 1"}, timeout=30)
    assert answer.status_code == 503
    assert "refused" in answer.json()["error"] and "CREATEROLE" in answer.json()["error"]
    load(rt, table, [{"n": 2}])  # loading goes on
    assert db.value(f'SELECT count(*) FROM {role}."{table}"') == 2


def test_a_role_with_createrole_makes_a_reader_for_its_own_tables(
    make_sql_runtime: Callable[..., Runtime],
    make_login_role: Callable[..., str],
    db: Db,
    table: str,
) -> None:
    url = make_login_role("CREATEROLE")
    role = str(urllib.parse.urlsplit(url).username)
    rt = make_sql_runtime(database_url=url)
    load(rt, table, [{"n": 1}])
    result = rt.sql_query(f'SELECT n, current_user, current_schema() FROM "{table}"')
    assert result["rows"] == [[1.0, reader_role_name(role), role]]
    with pytest.raises(SqlQueryError, match="permission denied"):
        rt.sql_query(f"SET ROLE {role}")


# -- password authentication ------------------------------------------------------------------


def test_with_password_logins_runtimes_on_one_database_derive_the_same_reader_password(
    make_runtime: Callable[..., Runtime], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = EmbeddedPostgres().start()
    try:
        Db(server.url).execute(f"ALTER ROLE {server.user} PASSWORD 'configured secret'")
        Db(server.url).execute("ALTER SYSTEM SET log_statement = 'all'")
        hba = server.pgdata / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        Db(server.url).value("SELECT pg_reload_conf()")
        url = server.url.replace(f"{server.user}@", f"{server.user}:configured%20secret@")
        with pytest.raises(Exception, match="password"):
            Db(server.url).value("SELECT 1")  # passwords are required now
        first = make_runtime(database_url=url, sql_pool_size=1)
        second = make_runtime(database_url=url, sql_pool_size=1)
        reader = reader_role_name(server.user)
        assert first.sql_query("SELECT 1")["rows"] == [[1]]
        assert second.sql_query("SELECT 2")["rows"] == [[2]]  # it set the password again
        admin = Db(url)
        _end_logins(admin, reader)  # `first` logs in anew, with the password it derives
        assert first.sql_query("SELECT 3")["rows"] == [[3]]
        stored = admin.value("SELECT rolpassword FROM pg_authid WHERE rolname = $1", reader)
        assert stored.startswith("SCRAM-SHA-256$")
        first.stop()
        second.stop()
        password = reader_password("configured secret", reader)
        server_log = (server.directory / "postgres.log").read_text(errors="replace")
        assert "ALTER ROLE" in server_log and password not in server_log
        assert password not in caplog.text
    finally:
        server.close()


# -- POST /sql ------------------------------------------------------------------------------


def test_post_sql_answers_400_for_a_refused_query_and_marks_truncation(
    make_sql_runtime: Callable[..., Runtime], make_api: Callable[..., Any], table: str
) -> None:
    rt = make_sql_runtime(sql_max_result_bytes=2_000)
    load(rt, table, [{"n": 1}])
    api = make_api(rt)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        refused = client.post("/sql", json={"query": "SELECT * FROM pg_authid"})
        assert refused.status_code == 400
        assert "permission denied" in refused.json()["error"]
        program = client.post("/sql", json={"query": "COPY (SELECT 1) TO PROGRAM 'true'"})
        assert program.status_code == 400
        big = client.post("/sql", json={"query": "SELECT g FROM generate_series(1, 10000) g"})
        assert big.status_code == 200
        body = big.json()
        assert body["truncated"] is True and 0 < len(body["rows"]) < 10000
        ok = client.post("/sql", json={"query": f'SELECT n FROM "{table}"'})
        assert ok.json() == {
            "columns": [{"name": "n", "type": "double precision"}],
            "rows": [[1.0]],
            "truncated": False,
        }
        deep = client.post("/sql", content=b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert deep.status_code == 400
