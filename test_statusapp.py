"""StatusApp's tests: real servers on loopback, StatusApp under TestClient and under uvicorn.

Sections, in statusapp.py's section order (the section each mainly tests in brackets):

- Fixtures and loopback servers: ``eventually``, configs and keys, ``Server`` (a real
  ``statusapp serve`` subprocess), ``served`` (one such process shared by the tests that only
  need their own monitors on it).
- Config tests                    [2 Config]
- Storage tests                   [4 Storage]
- Validation tests                [5 Validation: field rules, read-only markers, masked
                                   secrets echoed back]
- Auth tests                      [6 Auth: keys, permissions, teams, rate limits]
- Probe tests                     [7 Probes]
- Scheduler tests                 [8 Scheduler: probing]
- Agent tests                     [8 Scheduler: ``statusapp agent`` for a remote region; 10 the
                                   regions' verdicts]
- Heartbeat tests                 [8 Scheduler: heartbeat deadlines; the heartbeat routes]
- Notifier tests                  [9 Notifiers]
- Incident tests                  [10 Incidents; channel, webhook and incident routes]
- Analytics and retention tests   [11 Analytics]
- API tests                       [3 Errors, 12 API routes: monitor routes, the OpenAPI
                                   document (also checked by schemathesis), health, storage
                                   failures]
- Team and account tests          [12 API routes: team, account, keys, usage]
- Metrics tests                   [13 Metrics]
- Page tests                      [14 Pages; status page routes]
- Hostile input tests             [12 API routes and 14 Pages: no 500s, no tracebacks]
- Dashboard tests                 [15 Dashboard]
- Application tests               [16 Application: the services]
- CLI tests                       [17 CLI: serve, init, apikey, pip install; the README's
                                   commands]

Run with ``python -m pytest -q -n 4`` (as the README and .ci/run do): tests
wait on events (``eventually``, positive markers such as a later transition or check), not on
fixed sleeps, so they may share the two cores with each other.  The sleeps left are loopback
servers answering slowly on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime as dt
import email
import gzip
import email.policy
import hashlib
import hmac
import html.parser
import http.server
import itertools
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import subprocess
import sysconfig
import sys
import threading
import time
import tomllib
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dns.message
import hypothesis
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               negative_data_rejection,
                                               response_schema_conformance,
                                               status_code_conformance)
import dns.rcode
import dns.rrset
import httpcore
import httpx
import openapi_spec_validator
import pytest
import pytest_asyncio
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from click.testing import CliRunner
from cryptography import x509
from starlette.testclient import TestClient

import statusapp

HERE = Path(__file__).resolve().parent


# --- Fixtures and loopback servers ---


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing listens on: bound, noted, closed."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def eventually(probe, seconds: float = 60.0):
    """Poll ``probe`` until it returns something truthy; fail after ``seconds``.

    It returns as soon as the probe holds, so the limit is generous: a wait, never a timing
    assertion, that must survive a loaded 2-core machine running the suite on 4 workers."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not true within {seconds} s: {probe.__doc__ or probe}")


def make_cfg(tmp_path: Path, **sections: dict) -> dict:
    """A config on a fresh database in tmp_path, with section overrides."""
    overrides = {"server": {"database": str(tmp_path / "statusapp.db")}}
    for section, keys in sections.items():
        overrides.setdefault(section, {}).update(keys)
    return statusapp.load_config(overrides=overrides, environ={})


def cli(cfg: dict, *args: str) -> str:
    """Run a CLI command against cfg's database and return its output (asserting success)."""
    result = CliRunner().invoke(statusapp.cli, [*args, "--db", cfg["server"]["database"]])
    assert result.exit_code == 0, result.output
    return result.output


def new_key(cfg: dict, email: str = "owner@example.test") -> str:
    """The last line `statusapp init` prints is a new full-access key."""
    return cli(cfg, "init", "--email", email).strip().splitlines()[-1]


def sql(cfg: dict, query: str, params: tuple = ()) -> list:
    with sqlite3.connect(cfg["server"]["database"]) as conn:
        return conn.execute(query, params).fetchall()


@pytest.fixture
def cfg(tmp_path):
    return make_cfg(tmp_path)


@pytest.fixture
def key(cfg):
    return new_key(cfg)


@pytest.fixture
def client(cfg, key):
    """StatusApp under TestClient with its lifespan running, authenticated as the owner."""
    app = statusapp.create_app(cfg)
    with TestClient(app, headers={"X-API-Key": key}) as test_client:
        yield test_client


def wait_for_http(url: str, proc: subprocess.Popen | None = None, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer in {seconds} s")


class Server:
    """`statusapp serve` as a subprocess on a free loopback port."""

    def __init__(self, tmp_path: Path, *extra: str, env: dict | None = None) -> None:
        self.tmp_path, self.extra = tmp_path, extra
        self.db = str(tmp_path / "served.db")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "STATUSAPP_PROBES_MIN_INTERVAL": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self.stderr = open(self.tmp_path / f"serve-{time.monotonic_ns()}.err", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "statusapp.py"), "serve", "--db", self.db,
             "--port", str(self.port), *self.extra],
            stderr=self.stderr, stdout=subprocess.DEVNULL, env=self.env, cwd=self.tmp_path)
        wait_for_http(self.url + "/api/v1/health", self.proc)
        return self

    def output(self) -> str:
        if not self.stderr.closed:
            self.stderr.flush()
        return Path(self.stderr.name).read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.stderr.close()
        return code


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path).start()
    yield srv
    if srv.proc and srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One `statusapp serve` shared by the tests that only need their own monitors on it (one
    per pytest-xdist worker that runs any of them).  Probe retries wait 1 s, not 5."""
    srv = Server(tmp_path_factory.mktemp("served"), env={"STATUSAPP_PROBES_RETRY_DELAY": "1"})
    yield srv.start()
    srv.stop()


# --- Config tests ---


def test_config_precedence_flag_over_env_over_file_over_default(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 7000\nhost = "0.0.0.0"\n[probes]\nblocklists = ["a.test"]\n')
    env = {"STATUSAPP_SERVER_PORT": "7100", "STATUSAPP_PROBES_DNS_NAMESERVERS": "127.0.0.1:53, ::1"}
    cfg = statusapp.load_config(str(path), {"server": {"port": 7200}}, environ=env)
    assert cfg["server"]["port"] == 7200
    assert statusapp.load_config(str(path), environ=env)["server"]["port"] == 7100
    assert cfg["server"]["host"] == "0.0.0.0"
    assert cfg["probes"]["blocklists"] == ["a.test"]
    assert cfg["probes"]["dns_nameservers"] == ["127.0.0.1:53", "::1"]
    assert cfg["probes"]["min_interval"] == 60
    assert cfg["server"]["base_url"] == "http://0.0.0.0:7200"


@pytest.mark.parametrize("text, env, message", [
    ("[server]\nport = \"x\"\n", {}, "server.port must be a int"),
    ("[server]\nprot = 1\n", {}, "unknown key server.prot"),
    ("[nope]\n", {}, "unknown section [nope]"),
    ("[server\n", {}, "is not valid TOML"),
    ("", {"STATUSAPP_ACCOUNT_PLAN": "GOLD"}, "account.plan must be one of"),
    ("", {"STATUSAPP_PROBES_CONFIRMATIONS": "two"}, "probes.confirmations must be a int"),
    ("[server]\nport = 99999\n", {}, "server.port must be between 1 and 65,535, got 99999"),
    ("[probes]\nmax_concurrency = 0\n", {}, "probes.max_concurrency must be between 1 and"),
    ("", {"STATUSAPP_NOTIFICATIONS_TIMEOUT": "nan"}, "notifications.timeout must be a float"),
    ("[server]\nlog_level = \"loud\"\n", {}, "server.log_level must be one of critical"),
])
def test_bad_config_stops_start_up_with_one_line(tmp_path, text, env, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(statusapp.ConfigError, match=message.replace("[", r"\[")):
        statusapp.load_config(str(path), environ=env)
    result = subprocess.run([sys.executable, str(HERE / "statusapp.py"), "serve", "--config",
                             str(path), "--db", str(tmp_path / "x.db")],
                            capture_output=True, text=True, env={**os.environ, **env}, timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_readme_field_reference_matches_the_validation_table():
    readme = (HERE / "README.md").read_text()
    for fields in (statusapp.MONITOR_FIELDS, statusapp.MAINTENANCE_FIELDS):
        assert statusapp.field_reference(fields) in readme


def test_example_config_and_readme_are_generated_from_the_config_table():
    text = (HERE / "config.example.toml").read_text()
    assert text == statusapp.example_config()
    assert tomllib.loads(text) == statusapp.CONFIG_DEFAULTS
    assert statusapp.config_reference() in (HERE / "README.md").read_text()
    for section, keys in statusapp.CONFIG.items():  # every key has a type and a range or choices
        for key, spec in keys.items():
            bounded = spec.low is not None and spec.high is not None
            assert isinstance(spec.default, (str, list, bool)) or bounded, f"{section}.{key}"


# --- Storage tests ---


def _old_database(cfg, version: int) -> None:
    """A database left at schema ``version``, holding one STARTER account old@example.test."""
    async def make_old():
        db = statusapp.Database(cfg["server"]["database"])
        await db.open(upto=version)
        async with db.transaction() as conn:
            await statusapp.create_account(conn, "old@example.test", "Old", "STARTER")
        await db.close()
    asyncio.run(make_old())


def test_schema_upgrades_an_older_database_in_place(tmp_path):
    """A database left at the previous schema version is migrated and keeps its data."""
    cfg = make_cfg(tmp_path)
    latest = max(statusapp.load_migrations())
    assert latest >= 2
    _old_database(cfg, latest - 1)
    assert sql(cfg, "SELECT version FROM schema_version") == [(latest - 1,)]
    key = new_key(cfg, "old@example.test")
    assert sql(cfg, "SELECT version FROM schema_version") == [(latest,)]
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        response = client.get("/api/v1/monitors")
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "1000"  # the old account's plan survived


def test_checks_are_stored_compactly_and_an_older_database_keeps_its_checks(tmp_path):
    """Upgrading rewrites checks into compact rows; the checks view reads and takes them as
    before (monitor_latest, check_count); a stored check costs under 60 bytes with its index."""
    cfg = make_cfg(tmp_path)
    compact = next(n for n, block in statusapp.load_migrations().items() if "compact checks" in block)
    rows = [(f"mon_{i % 3}", ("local", "eu")[i % 2], ("UP", "DOWN", "DEGRADED")[i % 3],
             100 + i % 50, 200, None if i % 7 else "boom", 1_700_000_000_000 + i * 1000)
            for i in range(6000)]
    _old_database(cfg, compact - 1)
    with sqlite3.connect(cfg["server"]["database"]) as conn:
        conn.executemany(
            "INSERT INTO monitors (id, account_id, name, url, type, interval, timeout,"
            " http_method, grace_period, ssl_cert_expiry_days, regression_enabled,"
            " regression_threshold, regression_period, performance_timings, domain_expiry_days,"
            " domain_monitor_dns, domain_monitor_blacklist, domain_monitor_whois, status,"
            " is_paused, created_at, updated_at) SELECT ?, id, ?, 'http://127.0.0.1/', 'WEBSITE',"
            " 60, 30, 'GET', 60, 30, 0, 50, 7, 0, 30, 0, 0, 0, 'UP', 0, 0, 0 FROM accounts",
            [(f"mon_{n}", f"m{n}") for n in range(3)])
        conn.executemany(
            "INSERT INTO checks (monitor_id, region_id, status, response_time, status_code,"
            " error, checked_at) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    latest_before = sql(cfg, "SELECT * FROM monitor_latest ORDER BY monitor_id, region_id")
    new_key(cfg, "old@example.test")  # opens and migrates
    assert sql(cfg, "SELECT monitor_id, region_id, status, response_time, status_code, error,"
                    " checked_at FROM checks ORDER BY id") == rows
    assert sql(cfg, "SELECT * FROM monitor_latest ORDER BY monitor_id, region_id") == latest_before
    size = sql(cfg, "SELECT SUM(pgsize) FROM dbstat WHERE name IN ('check_rows',"
                    " 'check_rows_monitor_time')")[0][0]
    assert size / len(rows) < 60

    async def store_one():
        db = statusapp.Database(cfg["server"]["database"])
        await db.open()
        await db.write(statusapp.check_statements(
            "mon_1", "us", statusapp.CheckResult(statusapp.Status.UP, response_time=5), 1))
        await db.close()
    asyncio.run(store_one())
    newest = sql(cfg, "SELECT id, monitor_id, region_id, status FROM checks ORDER BY id DESC"
                      " LIMIT 1")[0]
    assert newest[1:] == ("mon_1", "us", "UP")
    assert (newest[0],) in sql(cfg, "SELECT check_id FROM monitor_latest WHERE monitor_id = 'mon_1'"
                                    " AND region_id = 'us'")
    assert sql(cfg, "SELECT check_count FROM monitors WHERE id = 'mon_1'") == [(2001,)]
    with sqlite3.connect(cfg["server"]["database"]) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("DELETE FROM monitors WHERE id = 'mon_1'")
    assert sql(cfg, "SELECT COUNT(*) FROM checks WHERE monitor_id = 'mon_1'") == [(0,)]
    assert sql(cfg, "SELECT COUNT(*) FROM check_rows") == [(4000,)]
def test_upgrade_scrubs_check_errors_from_old_automatic_incident_updates(tmp_path):
    """Older versions opened incidents with "<name> is down: <check error>" as a public update;
    the migration rewrites those (and only those) to the cause category."""
    cfg = make_cfg(tmp_path)
    scrub = next(n for n, text in statusapp.load_migrations().items()
                 if "UPDATE incident_updates SET message" in text)

    async def make_old():
        db = statusapp.Database(cfg["server"]["database"])
        await db.open(upto=scrub - 1)
        async with db.transaction() as conn:
            account = await statusapp.create_account(conn, "old@example.test", "Old", "STARTER")
            await conn.execute(*statusapp.insert_statement("monitors", {
                "id": "mon_1", "account_id": account, "name": "Backup", "url": "", "type": "CRON",
                "http_method": "GET", **dict.fromkeys((
                    "interval", "timeout", "grace_period", "ssl_cert_expiry_days",
                    "regression_enabled", "regression_threshold", "regression_period",
                    "performance_timings", "domain_expiry_days", "domain_monitor_dns",
                    "domain_monitor_blacklist", "domain_monitor_whois", "created_at",
                    "updated_at"), 1)}))
            await conn.execute(
                "INSERT INTO incidents (id, account_id, monitor_id, year, number, started_at,"
                " severity, status, root_cause, root_cause_category) VALUES ('inc_1', ?, 'mon_1',"
                " 2025, 1, 1000, 'high', 'open', 'x', 'APPLICATION_ERROR')", (account,))
            await conn.executemany("INSERT INTO incident_updates VALUES (?, 'inc_1', ?, ?, ?)", [
                ("iu_1", "investigating", "Backup is down: DB_PASSWORD=hunter2", 1000),
                ("iu_2", "investigating", "Backup is down: we think it is the disk", 5000)])
        await db.close()
    asyncio.run(make_old())
    new_key(cfg, "old@example.test")
    assert sql(cfg, "SELECT message FROM incident_updates ORDER BY id") == [
        ("Backup is down (cause: application error)",),
        ("Backup is down: we think it is the disk",)]  # a person's words stay


def test_newer_database_is_refused(tmp_path):
    cfg = make_cfg(tmp_path)
    new_key(cfg)
    sql(cfg, "UPDATE schema_version SET version = 999")
    result = CliRunner().invoke(statusapp.cli, ["apikey", "list", "--db", cfg["server"]["database"]])
    assert result.exit_code == 1 and "newer than this StatusApp" in result.output


def test_database_runs_in_wal_with_foreign_keys(cfg, client):
    assert sql(cfg, "PRAGMA journal_mode") == [("wal",)]
    monitor = client.post("/api/v1/monitors", json={"name": "a", "url": "http://127.0.0.1/"}).json()
    client.delete(f"/api/v1/monitors/{monitor['id']}")
    assert sql(cfg, "SELECT COUNT(*) FROM monitor_notifications") == [(0,)]


def test_group_commit_writes_many_items_in_one_transaction_and_isolates_a_bad_one(tmp_path):
    cfg = make_cfg(tmp_path)

    async def run():
        db = statusapp.Database(cfg["server"]["database"])
        await db.open()
        insert = "INSERT INTO worker_regions (id, city, country, country_code, latitude, longitude) VALUES (?, 'c', 'c', 'cc', 0, 0)"
        writes = [db.write([(insert, (f"r{i}",))]) for i in range(50)]
        writes.append(db.write([(insert, ("r1",))]))  # duplicate id: only this one fails
        results = await asyncio.gather(*writes, return_exceptions=True)
        count = await db.fetchval("SELECT COUNT(*) FROM worker_regions")
        await db.close()
        return results, count
    results, count = asyncio.run(run())
    assert count == 50
    assert isinstance(results[-1], sqlite3.IntegrityError)
    assert all(r is None for r in results[:-1])


def test_wal_starts_over_after_a_checkpoint_even_when_commits_ran_during_it(tmp_path, monkeypatch):
    """A commit made while the checkpointer copies the WAL is copied too before the next
    commit, which then starts the WAL over (under steady writes it grew without end) and cuts
    the file back to WAL_KEEP_BYTES."""
    cfg = make_cfg(tmp_path)
    path = cfg["server"]["database"]
    monkeypatch.setattr(statusapp, "CHECKPOINT_ROWS", 1)
    monkeypatch.setattr(statusapp, "CHECKPOINT_EVERY", 3600.0)
    monkeypatch.setattr(statusapp, "WAL_KEEP_BYTES", 256 * 1024)
    insert = ("INSERT INTO worker_regions (id, city, country, country_code, latitude, longitude)"
              " VALUES (?, ?, 'c', 'cc', 0, 0)")

    def restarts() -> int:
        """The WAL header's checkpoint sequence number: SQLite adds one at each start-over."""
        return int.from_bytes(Path(path + "-wal").read_bytes()[12:16], "big")

    async def run():
        db = statusapp.Database(path)
        await db.open()
        checkpointer, calls, copied = db._checkpointer, [], asyncio.Event()
        execute = checkpointer.execute

        async def checkpoint_then_commit(sql, *args):
            cursor = await execute(sql, *args)
            calls.append(sql)
            if len(calls) == 1:  # a commit behind the first checkpoint
                await db.write([(insert, ("during", "c"))])
            else:
                copied.set()
            return cursor
        monkeypatch.setattr(checkpointer, "execute", checkpoint_then_commit)
        await db.write([(insert, (f"before {i}", "x" * 100_000)) for i in range(20)])
        await asyncio.wait_for(copied.wait(), 30)
        before = restarts()
        await db.write([(insert, ("after", "c"))])
        after, kept = restarts(), Path(path + "-wal").stat().st_size
        await db.close()
        return before, after, kept
    before, after, kept = asyncio.run(run())
    assert after == before + 1
    assert kept <= 256 * 1024  # the WAL held the 2 MB written, and is cut back to the limit


def test_backup_under_write_load_restores_every_row_committed_before_it(tmp_path):
    """A real server takes monitor creates nonstop while `statusapp backup` runs; the backup
    passes the integrity check and holds every monitor whose 201 came before it started."""
    srv = Server(tmp_path).start()
    key = _owner_key(srv)
    acknowledged: list[str] = []
    stop = threading.Event()

    def write_load() -> None:
        with httpx.Client(base_url=srv.url + "/api/v1", headers={"X-API-Key": key}) as api:
            while not stop.is_set():
                created = api.post("/monitors", json={"name": f"m{len(acknowledged)}",
                                                      "url": "http://127.0.0.1:9/"})
                acknowledged.append(created.json()["id"])
    writer = threading.Thread(target=write_load)
    writer.start()
    try:
        eventually(lambda: len(acknowledged) >= 20)
        before = list(acknowledged)
        copy = tmp_path / "copy.db"
        assert "integrity ok" in cli({"server": {"database": srv.db}}, "backup", str(copy))
        eventually(lambda: len(acknowledged) > len(before) + 5)  # the load went on meanwhile
        refused = CliRunner().invoke(statusapp.cli, ["restore", str(copy), "--db", srv.db])
        assert refused.exit_code == 1 and "in use: stop the server first" in refused.output
    finally:
        stop.set()
        writer.join()
    srv.stop()
    with sqlite3.connect(copy) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        saved = {row[0] for row in conn.execute("SELECT id FROM monitors")}
    assert set(before) <= saved and len(saved) < len(acknowledged)
    restored = cli({"server": {"database": srv.db}}, "restore", str(copy))
    assert "restored" in restored and not Path(srv.db + "-wal").exists()
    with sqlite3.connect(srv.db) as conn:
        assert {row[0] for row in conn.execute("SELECT id FROM monitors")} == saved


def test_restore_refuses_a_damaged_or_newer_backup_and_keeps_the_database(tmp_path):
    cfg = make_cfg(tmp_path)
    new_key(cfg)
    garbage, newer = tmp_path / "garbage.db", tmp_path / "newer.db"
    garbage.write_bytes(b"not a database" * 100)
    cli(cfg, "backup", str(newer))
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE schema_version SET version = 999")
    for file, message in ((garbage, "is not a StatusApp database"),
                          (newer, "has schema version 999"), (tmp_path / "nope.db", "no such")):
        result = CliRunner().invoke(statusapp.cli, ["restore", str(file), "--db",
                                                    cfg["server"]["database"]])
        assert result.exit_code == 1 and message in result.output
    assert sql(cfg, "SELECT COUNT(*) FROM accounts") == [(1,)]


def test_wal_is_checkpointed_by_its_own_connection_not_by_commits(cfg, client, monkeypatch):
    """No commit copies the WAL into the database file (its fsyncs would hold up every write
    waiting behind it); the checkpointer does, once enough rows were written."""
    def in_file(name: str) -> bool:
        """Whether the database file alone, without its WAL, holds the monitor ``name``."""
        copy = cfg["server"]["database"] + ".copy"
        shutil.copy(cfg["server"]["database"], copy)
        try:
            with contextlib.closing(sqlite3.connect(copy)) as conn:
                return bool(conn.execute("SELECT 1 FROM monitors WHERE name = ?",
                                         (name,)).fetchall())
        except sqlite3.DatabaseError:  # copied while a checkpoint was writing it
            return False
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(copy + suffix).unlink(missing_ok=True)

    monkeypatch.setattr(statusapp, "CHECKPOINT_ROWS", 10**9)
    monkeypatch.setattr(statusapp, "CHECKPOINT_EVERY", 0.0)
    assert client.post("/api/v1/monitors", json={"name": "kept", "type": "CRON"}).status_code == 201
    assert sql(cfg, "SELECT COUNT(*) FROM monitors WHERE name = 'kept'") == [(1,)]
    assert not in_file("kept")
    monkeypatch.setattr(statusapp, "CHECKPOINT_ROWS", 1)
    assert client.post("/api/v1/monitors", json={"name": "next", "type": "CRON"}).status_code == 201
    eventually(lambda: in_file("next") and in_file("kept"))


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_restore_as_root_keeps_the_database_files_owner_and_mode(tmp_path):
    """`sudo statusapp restore` must leave a file the service's own user can still write."""
    cfg = make_cfg(tmp_path)
    new_key(cfg)
    backup = tmp_path / "backup.db"
    cli(cfg, "backup", str(backup))
    os.chown(cfg["server"]["database"], 4321, 4321)
    os.chmod(cfg["server"]["database"], 0o600)
    cli(cfg, "restore", str(backup))
    restored = os.stat(cfg["server"]["database"])
    assert (restored.st_uid, restored.st_gid, restored.st_mode & 0o777) == (4321, 4321, 0o600)


# --- Validation tests ---


def test_apply_markers_are_read_only_except_to_statusapp_apply(client):
    window = {"title": "Reboot", "startsAt": "2030-01-01T03:00:00Z",
              "endsAt": "2030-01-01T04:00:00Z", "managed": True}
    made = client.post("/api/v1/maintenance-windows", json=window).json()
    monitor = create(client, managed=True, secretsDigest="forged")
    assert made["managed"] is False and monitor["managed"] is False
    assert monitor["secretsDigest"] is None
    url = f"/api/v1/monitors/{monitor['id']}"
    assert client.put(url, json={"managed": True}).json()["managed"] is False
    marked = client.put(url, json={"managed": True}, headers={statusapp.APPLY_HEADER: "1"})
    assert marked.json()["managed"] is True
    doc = client.get("/api/v1/openapi.json").json()
    for path in ("/monitors", "/notifications", "/status-pages", "/maintenance-windows"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["managed"]["readOnly"] is True


def test_missing_name_gives_the_spec_issue_exactly(client):
    response = client.post("/api/v1/monitors", json={"url": "http://127.0.0.1/"})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == [{"code": "invalid_type", "expected": "string", "received": "undefined",
                              "path": ["name"], "message": "Required"}]
    assert body["code"] == "BAD_REQUEST"


BAD_MONITORS = [
    ({"type": "SMTP"}, ["type"], "invalid_enum_value"),
    ({"interval": 59}, ["interval"], "too_small"),
    ({"interval": 60.5}, ["interval"], "invalid_type"),
    ({"timeout": 4}, ["timeout"], "too_small"),
    ({"timeout": 301}, ["timeout"], "too_big"),
    ({"name": ""}, ["name"], "too_small"),
    ({"name": 5}, ["name"], "invalid_type"),
    ({"url": "not a url"}, ["url"], "custom"),
    ({"url": "ftp://127.0.0.1/"}, ["url"], "custom"),
    ({"expectedStatusCode": 99}, ["expectedStatusCode"], "too_small"),
    ({"expectedStatusCode": 600}, ["expectedStatusCode"], "too_big"),
    ({"httpMethod": "FETCH"}, ["httpMethod"], "invalid_enum_value"),
    ({"requestHeaders": "{nope"}, ["requestHeaders"], "custom"),
    ({"requestHeaders": '{"a": 1}'}, ["requestHeaders"], "custom"),
    ({"type": "PORT", "url": "127.0.0.1"}, ["port"], "invalid_type"),
    ({"type": "PORT", "url": "127.0.0.1", "port": 22}, ["protocol"], "invalid_type"),
    ({"type": "PORT", "url": "127.0.0.1", "port": 70000, "protocol": "TCP"}, ["port"], "too_big"),
    ({"type": "PORT", "url": "127.0.0.1", "port": 22, "protocol": "SCTP"}, ["protocol"],
     "invalid_enum_value"),
    ({"type": "PING", "url": "bad host!"}, ["url"], "custom"),
    ({"type": "DNS", "url": "home.test"}, ["dnsRecord"], "invalid_type"),
    ({"type": "DNS", "url": "home.test", "dnsRecord": "SRV"}, ["dnsRecord"], "invalid_enum_value"),
    ({"type": "DNS", "url": "home.test", "dnsRecord": "A", "expectedIp": "::1"}, ["expectedIp"],
     "custom"),
    ({"type": "SSL_CERT", "url": "http://home.test"}, ["url"], "custom"),
    ({"type": "CRON", "gracePeriod": 59}, ["gracePeriod"], "too_small"),
    ({"type": "CRON", "gracePeriod": 86401}, ["gracePeriod"], "too_big"),
    ({"sslCertExpiryDays": 0}, ["sslCertExpiryDays"], "too_small"),
    ({"sslCertExpiryDays": 91}, ["sslCertExpiryDays"], "too_big"),
    ({"enabledWorkerRegionIds": ["region_mars"]}, ["enabledWorkerRegionIds"], "custom"),
    ({"enabledWorkerRegionIds": "local"}, ["enabledWorkerRegionIds"], "invalid_type"),
    ({"regressionEnabled": "yes"}, ["regressionEnabled"], "invalid_type"),
    ({"regressionThreshold": 24}, ["regressionThreshold"], "too_small"),
    ({"regressionThreshold": 201}, ["regressionThreshold"], "too_big"),
    ({"regressionPeriod": 31}, ["regressionPeriod"], "too_big"),
    ({"performanceTimings": 1}, ["performanceTimings"], "invalid_type"),
    ({"apiAuthConfig": {"type": "kerberos"}}, ["apiAuthConfig", "type"], "invalid_enum_value"),
    ({"apiAuthConfig": {"type": "bearer"}}, ["apiAuthConfig", "token"], "invalid_type"),
    ({"apiAuthConfig": {"type": "basic", "username": "u"}}, ["apiAuthConfig", "password"],
     "invalid_type"),
    ({"apiAuthConfig": {"type": "api_key", "apiKey": "k"}}, ["apiAuthConfig", "apiKeyHeader"],
     "custom"),
    ({"apiAuthConfig": {"type": "api_key", "apiKey": "k", "apiKeyName": "key",
                        "apiKeyLocation": "cookie"}}, ["apiAuthConfig", "apiKeyLocation"],
     "invalid_enum_value"),
    ({"apiAuthConfig": {"type": "oauth2", "oauth2TokenUrl": "http://127.0.0.1/t",
                        "oauth2ClientId": "c"}}, ["apiAuthConfig", "oauth2ClientSecret"],
     "invalid_type"),
    ({"apiAuthConfig": {"type": "jwt"}}, ["apiAuthConfig", "jwtToken"], "invalid_type"),
    ({"apiAuthConfig": "bearer"}, ["apiAuthConfig"], "invalid_type"),
    ({"domainExpiryDays": 0}, ["domainExpiryDays"], "too_small"),
    ({"domainMonitorDns": "no"}, ["domainMonitorDns"], "invalid_type"),
    ({"notifications": [{"type": "PIGEON", "config": {}}]}, ["notifications", 0, "type"],
     "invalid_enum_value"),
    ({"notifications": [{"type": "SLACK"}]}, ["notifications", 0], "custom"),
    ({"notifications": [{"channelId": "nc_missing"}]}, ["notifications", 0, "channelId"], "custom"),
    ({"isActive": "true"}, ["isActive"], "invalid_type"),
]


@pytest.mark.parametrize("fields, path, code", BAD_MONITORS)
def test_every_validation_rule_is_a_400_naming_the_field(client, cfg, fields, path, code):
    body = {"name": "m", "url": "http://127.0.0.1/", **fields}
    response = client.post("/api/v1/monitors", json=body)
    assert response.status_code == 400, response.text
    issues = response.json()["error"]
    assert any(i["path"] == path and i["code"] == code for i in issues), issues
    assert sql(cfg, "SELECT COUNT(*) FROM monitors") == [(0,)]


def test_echoing_a_masked_secret_back_keeps_the_stored_one(cfg, client):
    monitor = client.post("/api/v1/monitors", json=FULL_MONITOR).json()
    client.put(f"/api/v1/monitors/{monitor['id']}", json={"apiAuthConfig": monitor["apiAuthConfig"]})
    stored = json.loads(sql(cfg, "SELECT api_auth_config FROM monitors")[0][0])
    assert stored["token"] == "tok-0123456789abcdef"


def test_echoed_masked_inline_channel_secrets_keep_the_stored_ones(cfg, client):
    hooks = ["http://127.0.0.1:9/hooks/first-secret-path", "http://127.0.0.1:9/hooks/second-secret"]
    monitor = create(client, notifications=[
        {"type": "SLACK", "config": {"webhookUrl": hook}} for hook in hooks])
    shown = monitor["monitorNotifications"]
    assert [n["config"]["webhookUrl"] for n in shown] == ["****path", "****cret"]
    echoed = [{"type": n["type"], "enabled": n["enabled"], "config": n["config"]} for n in shown]
    updated = client.put(f"/api/v1/monitors/{monitor['id']}", json={"notifications": echoed})
    assert updated.status_code == 200, updated.text
    stored = sql(cfg, "SELECT config FROM monitor_notifications ORDER BY created_at")
    assert [json.loads(c)["webhookUrl"] for (c,) in stored] == hooks


# --- Auth tests ---


def test_auth_missing_invalid_bearer_expired_revoked(cfg, client, key):
    def get(**headers: str):
        return client.get("/api/v1/monitors", headers={"X-API-Key": "", **headers})
    assert get().status_code == 401 and get().json()["code"] == "UNAUTHORIZED"
    assert get(**{"X-API-Key": "sk_live_wrong"}).status_code == 401
    assert get(Authorization=f"Bearer {key}").status_code == 200
    assert get(Authorization=f"Basic {key}").status_code == 401
    expiring = cli(cfg, "apikey", "create", "--email", "owner@example.test", "--name", "soon",
                   "--expires", "2099-01-01").strip().splitlines()[-1]
    assert get(**{"X-API-Key": expiring}).status_code == 200
    sql(cfg, "UPDATE api_keys SET expires_at = 1000 WHERE name = 'soon'")
    expired = get(**{"X-API-Key": expiring})
    assert expired.status_code == 401 and expired.json()["error"] == "API key expired"
    key_id = sql(cfg, "SELECT id FROM api_keys WHERE name = 'init'")[0][0]
    cli(cfg, "apikey", "revoke", key_id)
    assert get(**{"X-API-Key": key}).status_code == 401


def test_permissions_by_method_and_disabled_account(cfg, client):
    def key_with(perms: str) -> dict:
        out = cli(cfg, "apikey", "create", "--email", "owner@example.test", "--name", perms,
                  "--permissions", perms)
        return {"X-API-Key": out.strip().splitlines()[-1]}
    monitor = create(client)
    path = f"/api/v1/monitors/{monitor['id']}"
    read, write = key_with("read"), key_with("write")
    assert client.get(path, headers=read).status_code == 200
    denied = client.post("/api/v1/monitors", json={"name": "x", "url": "http://127.0.0.1/"}, headers=read)
    assert denied.status_code == 403 and denied.json()["code"] == "FORBIDDEN"
    assert client.post(path + "/pause", headers=write).status_code == 200
    assert client.get(path, headers=write).status_code == 403
    assert client.delete(path, headers=write).status_code == 403
    assert client.delete(path, headers=key_with("read,delete")).status_code == 200
    sql(cfg, "UPDATE accounts SET account_status = 'DISABLED'")
    disabled = client.get("/api/v1/monitors")
    assert disabled.status_code == 403 and disabled.json()["error"] == "Account not active"


def test_one_account_never_sees_another(cfg, client):
    other = {"X-API-Key": new_key(cfg, "neighbour@example.test")}
    mine = create(client, name="mine")
    theirs = client.post("/api/v1/monitors", json={"name": "theirs", "url": "http://127.0.0.1/"},
                         headers=other).json()
    assert [m["name"] for m in client.get("/api/v1/monitors").json()["monitors"]] == ["mine"]
    assert [m["name"] for m in client.get("/api/v1/monitors", headers=other).json()["monitors"]] == ["theirs"]
    path = f"/api/v1/monitors/{mine['id']}"
    for method in ("GET", "PUT", "DELETE"):
        assert client.request(method, path, headers=other, json={"name": "x"}).status_code == 404
    for suffix in ("/pause", "/regression"):
        assert client.request("POST" if suffix == "/pause" else "GET", path + suffix,
                              headers=other).status_code == 404
    assert client.get(f"/api/v1/monitors/{theirs['id']}").status_code == 404
    assert client.get(path).json()["name"] == "mine"


def test_rate_limit_headers_and_429(tmp_path):
    cfg = make_cfg(tmp_path, account={"plan": "STARTER"})
    result = CliRunner().invoke(statusapp.cli, ["init", "--email", "owner@example.test", "--db",
                                                cfg["server"]["database"]],
                                env={"STATUSAPP_ACCOUNT_PLAN": "STARTER"})
    key = result.output.strip().splitlines()[-1]
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        first = client.get("/api/v1/worker-regions")
        assert first.headers["X-RateLimit-Limit"] == "1000"
        assert first.headers["X-RateLimit-Remaining"] == "999"
        reset = int(first.headers["X-RateLimit-Reset"])
        assert reset % 3600 == 0 and 0 < reset - time.time() <= 3600
        missing = client.get("/api/v1/monitors/mon_nope")
        assert missing.status_code == 404 and missing.headers["X-RateLimit-Remaining"] == "998"
        for _ in range(998):
            client.get("/api/v1/worker-regions")
        limited = client.get("/api/v1/worker-regions")
        assert limited.status_code == 429
        assert limited.json()["code"] == "RATE_LIMIT_EXCEEDED"
        assert limited.headers["X-RateLimit-Remaining"] == "0"
        assert 0 < int(limited.headers["Retry-After"]) <= 3600
        # The window is the team's, whose plan it is: another key of it is limited too ...
        other = {"X-API-Key": cli(cfg, "apikey", "create", "--email", "owner@example.test",
                                  "--name", "second").strip().splitlines()[-1]}
        assert client.get("/api/v1/worker-regions", headers=other).status_code == 429
        # ... and the usage endpoint still answers, saying so.
        usage = client.get("/api/v1/account/usage", headers=other)
        assert usage.status_code == 200, usage.text
        assert usage.json()["rateLimit"] == {"limit": 1000, "used": 1001, "remaining": 0}
        assert usage.headers["X-RateLimit-Remaining"] == "0"
        # Another team has its own window.
        stranger = {"X-API-Key": new_key(cfg, "stranger@example.test")}
        assert client.get("/api/v1/worker-regions", headers=stranger).status_code == 200


def test_every_api_response_carries_rate_limit_headers(cfg, client):
    """Successes, validation failures, 401s, unknown routes, wrong methods, public routes."""
    anonymous = {"X-API-Key": ""}
    responses = {
        "ok": client.get("/api/v1/monitors"),
        "validation": client.post("/api/v1/monitors", json={}),
        "bad query": client.get("/api/v1/monitors?sort="),
        "not found": client.get("/api/v1/monitors/mon_nope"),
        "no route": client.get("/api/v1/nowhere"),
        "no route, no key": client.get("/api/v1/nowhere", headers=anonymous),
        "wrong method": client.patch("/api/v1/monitors"),
        "no key": client.get("/api/v1/monitors", headers=anonymous),
        "bad key": client.get("/api/v1/monitors", headers={"X-API-Key": "sk_live_nope"}),
        "public": client.get("/api/v1/health", headers=anonymous),
        "no body": client.put("/api/v1/account"),
    }
    for name, response in responses.items():
        for header in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
            assert header in response.headers, (name, response.status_code, dict(response.headers))
    keyed = [int(responses[n].headers["X-RateLimit-Remaining"]) for n in
             ("ok", "validation", "bad query", "not found", "no route")]
    assert keyed == sorted(keyed, reverse=True) and len(set(keyed)) == 5  # one window, counted


# --- Probe tests ---
#
# Every server here is real and listens on 127.0.0.1 only: HTTP (with an OAuth2 token endpoint
# and an RDAP endpoint), TLS with trustme certificates, TCP and UDP, DNS and WHOIS.


_NOW = dt.datetime.now(dt.timezone.utc)
_RDAP_DOMAINS = {"example.test": 400, "soon.test": 10, "expired.test": -5, "listed.test": 400}
_WHOIS_RECORDS = {
    "whoisonly.test": "Domain Name: WHOISONLY.TEST\r\nRegistrar: Loopback Registrar\r\n"
                      "Registry Expiry Date: 2031-02-03T04:05:06Z\r\n"
                      "Domain Status: clientTransferProhibited https://icann.org/epp\r\n"
                      "Name Server: NS1.WHOISONLY.TEST\r\nName Server: ns2.whoisonly.test\r\n",
}
_ZONE = {
    ("www.test.", "A"): ["127.0.0.10", "127.0.0.11"],
    ("www.test.", "AAAA"): ["::1"],
    ("alias.test.", "CNAME"): ["www.test."],
    ("test.", "MX"): ["10 mail.test."],
    ("test.", "TXT"): ['"v=spf1 -all"'],
    ("example.test.", "NS"): ["ns2.example.test.", "ns1.example.test."],
    ("example.test.", "A"): ["127.0.0.20"],
    ("listed.test.bl.test.", "A"): ["127.0.1.2"],
}


def _serve(server: socketserver.BaseServer):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    return server


def _stop(*servers: socketserver.BaseServer) -> None:
    for server in servers:
        server.shutdown()
        server.server_close()


_JSON_DOC = {"status": "ok", "count": 3, "items": [{"ok": True, "name": "a"}, {"ok": False}],
             "empty": [], "note": None}
_GZIP_JSON = gzip.compress(json.dumps(_JSON_DOC).encode())
_GZIP_BOMB = gzip.compress(b"a" * 20_000_000 + b"END")  # 20 MB in about 20 KB


class _HTTPHandler(http.server.BaseHTTPRequestHandler):
    """/ok /error /missing /slow /delay /redirect /see-other /elsewhere /loop /echo /protected
    /token /rdap/domain/NAME,
    /json (a JSON document with an X-Version header), /html (an error page) and /big."""

    protocol_version = "HTTP/1.1"  # keeps connections open, so reuse by the client would show
    seen: list[dict] = []
    hits: Counter = Counter()
    release_slow = threading.Event()  # /slow answers only once this is set

    def log_message(self, *args) -> None:
        pass

    def _answer(self, code: int, body: bytes = b"ok", headers: dict | None = None) -> None:
        try:
            self.send_response(code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except ConnectionError:
            pass  # the probe gave up first (timeout tests)

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        path = urllib.parse.urlsplit(self.path).path
        self.seen.append({"method": self.command, "path": self.path, "body": body,
                          "headers": dict(self.headers), "port": self.client_address[1]})
        self.hits[path] += 1
        if path == "/error":
            self._answer(500, b"boom")
        elif path == "/missing":
            self._answer(404, b"nope")
        elif path == "/slow":
            self.release_slow.wait(10)
            self._answer(200)
        elif path == "/delay":
            time.sleep(0.2)
            self._answer(200, b"x" * 100_000)
        elif path == "/json":
            self._answer(200, json.dumps(_JSON_DOC).encode(),
                         {"Content-Type": "application/json", "X-Version": "2.1"})
        elif path == "/html":
            self._answer(200, b"<html><h1>Internal error</h1>" + b"x" * 400 + b"</html>")
        elif path == "/big":
            self._answer(200, b"a" * 3000 + b"END")
        elif path == "/gzip":
            self._answer(200, _GZIP_JSON, {"Content-Encoding": "gzip"})
        elif path == "/bomb":
            self._answer(200, _GZIP_BOMB, {"Content-Encoding": "gzip"})
        elif path == "/cookie":
            self._answer(200, b"ok", {"Set-Cookie": "session=1; Path=/"})
        elif path == "/redirect":
            self._answer(302, b"", {"Location": "/ok"})
        elif path == "/see-other":
            self._answer(303, b"", {"Location": "echo"})
        elif path == "/elsewhere":  # another origin: localhost instead of 127.0.0.1
            self._answer(302, b"", {
                "Location": f"http://localhost:{self.server.server_address[1]}/echo"})
        elif path == "/loop":
            self._answer(302, b"", {"Location": "/loop"})
        elif path == "/protected":
            ok = self.headers.get("Authorization") == "Bearer tok-1"
            self._answer(200 if ok else 401)
        elif path == "/token":
            form = urllib.parse.parse_qs(body.decode())
            good = form.get("client_id") == ["cid"] and form.get("client_secret") == ["secret"]
            token = {"access_token": "tok-1", "token_type": "Bearer", "expires_in": 3600}
            self._answer(200 if good else 401,
                         json.dumps(token if good else {"error": "invalid_client"}).encode())
        elif path.startswith("/rdap/domain/"):
            self._rdap(path.rsplit("/", 1)[1])
        else:
            self._answer(200)

    do_POST = do_PUT = do_HEAD = do_GET

    def _rdap(self, name: str) -> None:
        if name not in _RDAP_DOMAINS:
            self._answer(404, b'{"errorCode": 404}')
            return
        expires = _NOW + dt.timedelta(days=_RDAP_DOMAINS[name], hours=1)
        data = {"objectClassName": "domain", "ldhName": name,
                "status": ["client transfer prohibited"],
                "events": [{"eventAction": "registration", "eventDate": "2000-01-01T00:00:00Z"},
                           {"eventAction": "expiration",
                            "eventDate": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}],
                "entities": [{"objectClassName": "entity", "roles": ["registrar"],
                              "vcardArray": ["vcard", [["version", {}, "text", "4.0"],
                                                       ["fn", {}, "text", "Test Registrar"]]]}],
                "nameservers": [{"ldhName": f"NS1.{name.upper()}"},
                                {"ldhName": f"ns2.{name}"}]}
        self._answer(200, json.dumps(data).encode(), {"Content-Type": "application/rdap+json"})


class _TLSHandler(socketserver.BaseRequestHandler):
    """Handshake with the server's certificate, then answer one HTTP request if one comes."""

    def handle(self) -> None:
        try:
            with self.server.context.wrap_socket(self.request, server_side=True) as conn:
                conn.settimeout(2)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except (OSError, ssl.SSLError):
            pass


class _UDPEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


class _DNSHandler(socketserver.BaseRequestHandler):
    """Answers from _ZONE; servfail.test fails, silent.test never answers, unknown is NXDOMAIN."""

    def handle(self) -> None:
        data, sock = self.request
        query = dns.message.from_wire(data)
        question = query.question[0]
        name, rdtype = question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype)
        if name == "silent.test.":
            return
        response = dns.message.make_response(query)
        if name == "servfail.test.":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif (name, rdtype) in _ZONE:
            response.answer.append(dns.rrset.from_text_list(name, 60, "IN", rdtype,
                                                            _ZONE[(name, rdtype)]))
        elif not any(known == name for known, _ in _ZONE):
            response.set_rcode(dns.rcode.NXDOMAIN)
        sock.sendto(response.to_wire(), self.client_address)


class _WhoisHandler(socketserver.StreamRequestHandler):
    """A registry when server.refer is None, else an IANA-like server that refers onward."""

    def handle(self) -> None:
        name = self.rfile.readline().decode().strip().lower()
        self.server.queries.append(name)
        if self.server.refer:
            answer = f"% IANA WHOIS server\r\nrefer:        {self.server.refer}\r\n"
        else:
            answer = _WHOIS_RECORDS.get(name, f'No match for "{name.upper()}".\r\n')
        self.wfile.write(answer.encode())


@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory):
    """A trustme CA (written as the ca_bundle) and server contexts for each certificate case."""
    ca, stranger = trustme.CA(), trustme.CA()
    bundle = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    leaves = {
        "valid": ca.issue_cert("localhost", "127.0.0.1", common_name="valid.test"),
        "expired": ca.issue_cert("127.0.0.1", common_name="expired.test",
                                 not_before=_NOW - dt.timedelta(days=60),
                                 not_after=_NOW - dt.timedelta(days=2)),
        "soon": ca.issue_cert("127.0.0.1", common_name="soon.test",
                              not_before=_NOW - dt.timedelta(days=60),
                              not_after=_NOW + dt.timedelta(days=5, hours=1)),
        "future": ca.issue_cert("127.0.0.1", common_name="future.test",
                                not_before=_NOW + dt.timedelta(days=3),
                                not_after=_NOW + dt.timedelta(days=90)),
        "wrong_host": ca.issue_cert("other.test", common_name="other.test"),
        "untrusted": stranger.issue_cert("127.0.0.1", common_name="stranger.test"),
    }
    return bundle, leaves


@pytest.fixture(scope="module")
def tls_servers(tls_certs):
    """One TLS server per certificate case: name -> port."""
    servers = {}
    for name, leaf in tls_certs[1].items():
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TLSHandler)
        server.daemon_threads = True
        server.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(server.context)
        servers[name] = _serve(server)
    yield {name: server.server_address[1] for name, server in servers.items()}
    _stop(*servers.values())


@pytest.fixture(scope="module")
def http_server():
    server = _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HTTPHandler))
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _stop(server)


@pytest.fixture(scope="module")
def dns_server():
    server = _serve(socketserver.ThreadingUDPServer(("127.0.0.1", 0), _DNSHandler))
    yield f"127.0.0.1:{server.server_address[1]}"
    _stop(server)


@pytest.fixture(scope="module")
def whois_servers():
    """(IANA-like server, registry): the first refers every query to the second."""
    servers = []
    for _ in range(2):
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _WhoisHandler)
        server.daemon_threads, server.queries, server.refer = True, [], None
        servers.append(_serve(server))
    servers[0].refer = f"127.0.0.1:{servers[1].server_address[1]}"
    yield servers
    _stop(*servers)


@pytest.fixture(scope="module")
def probe_cfg(tls_certs, http_server, dns_server, whois_servers):
    return statusapp.load_config(environ={}, overrides={"probes": {
        "ca_bundle": str(tls_certs[0]), "dns_nameservers": [dns_server],
        "rdap_url": f"{http_server}/rdap",
        "whois_server": f"127.0.0.1:{whois_servers[0].server_address[1]}",
        "blocklists": ["bl.test"]}})


@pytest_asyncio.fixture
async def probe_ctx(probe_cfg):
    ctx = statusapp.ProbeContext(probe_cfg)
    yield ctx
    await ctx.aclose()


def _monitor(url: str, kind: str = "WEBSITE", **fields) -> dict:
    return {"url": url, "type": kind, "timeout": 5, "lastDetails": None, **fields}


def test_every_monitor_type_but_cron_declares_a_probe():
    probed = {name for name, t in statusapp.MONITOR_TYPES.items() if t.probe is not None}
    assert probed == {"WEBSITE", "API", "PING", "PORT", "DNS", "SSL_CERT", "DOMAIN"}
    assert statusapp.MONITOR_TYPES["API"].probe is statusapp.probe_http
    assert statusapp.probe_of("CRON") is None and statusapp.probe_of("NOPE") is None
    port_fields = {f.name for f in statusapp.MONITOR_TYPES["PORT"].fields}
    assert {"name", "url", "port", "protocol"} <= port_fields and "httpMethod" not in port_fields


def test_channel_types_declare_fields_secrets_and_audience():
    assert list(statusapp.CHANNEL_TYPES) == ["EMAIL", "SMS", "SLACK", "DISCORD", "TELEGRAM",
                                             "PAGERDUTY", "OPSGENIE", "MICROSOFT_TEAMS", "WEBHOOK",
                                             "NTFY", "GOTIFY", "PUSHOVER", "MATRIX", "APPRISE"]
    telegram = statusapp.CHANNEL_TYPES["TELEGRAM"]
    assert telegram.required == ("botToken", "chatId") and telegram.secrets == ("botToken",)
    assert statusapp.CHANNEL_TYPES["WEBHOOK"].secrets == ("headers", "secret")
    ntfy, pushover = statusapp.CHANNEL_TYPES["NTFY"], statusapp.CHANNEL_TYPES["PUSHOVER"]
    assert ntfy.required == ("serverUrl", "topic") and ntfy.secrets == ("token", "password")
    assert pushover.secrets == ("userKey", "appToken")
    machines = {n for n, t in statusapp.CHANNEL_TYPES.items() if not t.person_facing}
    assert machines == {"WEBHOOK", "PAGERDUTY", "OPSGENIE"}


@pytest.mark.asyncio
@pytest.mark.parametrize("path, expected, status, code, category", [
    ("/ok", None, "UP", 200, None),
    ("/error", None, "DOWN", 500, "SERVER_ERROR"),
    ("/missing", None, "DOWN", 404, "APPLICATION_ERROR"),
    ("/missing", 404, "UP", 404, None),
    ("/ok", 201, "DOWN", 200, "APPLICATION_ERROR"),
    ("/redirect", None, "UP", 200, None),
    ("/redirect", 302, "UP", 302, None),
])
async def test_http_status_rules(probe_ctx, http_server, path, expected, status, code, category):
    result = await statusapp.probe_http(
        _monitor(http_server + path, expectedStatusCode=expected), probe_ctx)
    assert (result.status, result.status_code, result.category) == (status, code, category)
    assert result.response_time is not None and result.response_time >= 0


@pytest.mark.asyncio
async def test_http_redirects_are_followed_as_httpx_follows_them(probe_ctx, http_server):
    """A 303 after a POST is a GET without the body; Authorization goes to the same origin
    only; a loop ends after 20 redirects; a user and password in the URL are Basic auth."""
    _HTTPHandler.seen.clear()
    auth = {"type": "bearer", "token": "t0k"}
    result = await statusapp.probe_http(_monitor(
        http_server + "/see-other", httpMethod="POST", requestBody="data", apiAuthConfig=auth),
        probe_ctx)
    assert (result.status, result.status_code) == ("UP", 200)
    posted, got = _HTTPHandler.seen
    assert (posted["method"], posted["body"], got["method"], got["path"], got["body"]) == (
        "POST", b"data", "GET", "/echo", b"")
    assert got["headers"]["Authorization"] == "Bearer t0k" and "Content-Length" not in got[
        "headers"]
    _HTTPHandler.seen.clear()
    result = await statusapp.probe_http(_monitor(http_server + "/elsewhere",
                                                 apiAuthConfig=auth), probe_ctx)
    assert (result.status, result.status_code) == ("UP", 200)
    assert [s["headers"].get("Authorization") for s in _HTTPHandler.seen] == ["Bearer t0k", None]
    assert _HTTPHandler.seen[1]["headers"]["Host"].startswith("localhost:")
    _HTTPHandler.hits.clear()
    result = await statusapp.probe_http(_monitor(http_server + "/loop"), probe_ctx)
    assert (result.status, result.category, result.error) == (
        "DOWN", "APPLICATION_ERROR", "too many redirects")
    assert _HTTPHandler.hits["/loop"] == 21
    _HTTPHandler.seen.clear()
    result = await statusapp.probe_http(_monitor(
        http_server.replace("://", "://ann:pw%3A1@") + "/auth"), probe_ctx)
    assert result.status == "UP" and _HTTPHandler.seen[0]["headers"]["Authorization"] == (
        "Basic " + base64.b64encode(b"ann:pw:1").decode())


@pytest.mark.asyncio
async def test_http_method_headers_and_body_are_sent(probe_ctx, http_server):
    _HTTPHandler.seen.clear()
    monitor = _monitor(http_server + "/echo", "API", httpMethod="PUT", requestBody='{"a": 1}',
                       requestHeaders='{"X-Custom": "yes", "Content-Type": "application/json"}')
    assert (await statusapp.probe_http(monitor, probe_ctx)).status == "UP"
    seen = _HTTPHandler.seen[-1]
    assert (seen["method"], seen["body"]) == ("PUT", b'{"a": 1}')
    assert seen["headers"]["X-Custom"] == "yes"
    assert seen["headers"]["User-Agent"].startswith("StatusApp/")


@pytest.mark.asyncio
async def test_http_checks_keep_no_cookies(probe_ctx, http_server):
    _HTTPHandler.seen.clear()
    for _ in range(2):
        result = await statusapp.probe_http(_monitor(http_server + "/cookie"), probe_ctx)
        assert result.status == "UP"
    assert [s["headers"].get("Cookie") for s in _HTTPHandler.seen] == [None, None]


@pytest.mark.asyncio
async def test_http_bad_request_headers_is_a_configuration_error(probe_ctx, http_server):
    result = await statusapp.probe_http(_monitor(http_server, requestHeaders="{nope"), probe_ctx)
    assert (result.status, result.category) == ("DOWN", "CONFIGURATION_ERROR")


@pytest.mark.asyncio
@pytest.mark.parametrize("auth, header, value, query", [
    ({"type": "none"}, "Authorization", None, ""),
    ({"type": "bearer", "token": "t0k"}, "Authorization", "Bearer t0k", ""),
    ({"type": "basic", "username": "ann", "password": "pw:1"}, "Authorization",
     "Basic " + base64.b64encode(b"ann:pw:1").decode(), ""),
    ({"type": "api_key", "apiKey": "k1", "apiKeyHeader": "X-Key", "apiKeyLocation": "header"},
     "X-Key", "k1", ""),
    ({"type": "api_key", "apiKey": "k 2", "apiKeyName": "key", "apiKeyLocation": "query"},
     "Authorization", None, "key=k+2"),
    ({"type": "api_key", "apiKey": "k3", "apiKeyName": "key", "apiKeyLocation": "query",
      "url": "/auth?page=2"}, "Authorization", None, "page=2&key=k3"),
    ({"type": "jwt", "jwtToken": "a.b.c"}, "Authorization", "Bearer a.b.c", ""),
    ({"type": "jwt", "jwtToken": "a.b.c", "jwtHeader": "X-JWT", "jwtPrefix": ""}, "X-JWT",
     "a.b.c", ""),
])
async def test_http_auth_types(probe_ctx, http_server, auth, header, value, query):
    _HTTPHandler.seen.clear()
    auth = dict(auth)
    path = auth.pop("url", "/auth")  # a query of the monitor's own stays beside the key's
    result = await statusapp.probe_http(_monitor(http_server + path, apiAuthConfig=auth),
                                        probe_ctx)
    assert result.status == "UP"
    seen = _HTTPHandler.seen[-1]
    assert seen["headers"].get(header) == value
    assert urllib.parse.urlsplit(seen["path"]).query == query


@pytest.mark.asyncio
async def test_http_oauth2_token_is_fetched_once_and_cached(probe_ctx, http_server):
    _HTTPHandler.hits.clear()
    auth = {"type": "oauth2", "oauth2TokenUrl": http_server + "/token", "oauth2ClientId": "cid",
            "oauth2ClientSecret": "secret", "oauth2Scope": "read",
            "oauth2GrantType": "client_credentials"}
    monitor = _monitor(http_server + "/protected", "API", apiAuthConfig=auth)
    results = [await statusapp.probe_http(monitor, probe_ctx) for _ in range(3)]
    assert [r.status for r in results] == ["UP"] * 3
    assert (_HTTPHandler.hits["/token"], _HTTPHandler.hits["/protected"]) == (1, 3)
    token_request = next(s for s in _HTTPHandler.seen if s["path"] == "/token")
    form = urllib.parse.parse_qs(token_request["body"].decode())
    assert form["grant_type"] == ["client_credentials"] and form["scope"] == ["read"]


@pytest.mark.asyncio
async def test_http_oauth2_rejected_credentials(probe_ctx, http_server):
    auth = {"type": "oauth2", "oauth2TokenUrl": http_server + "/token", "oauth2ClientId": "cid",
            "oauth2ClientSecret": "wrong"}
    result = await statusapp.probe_http(_monitor(http_server + "/protected", apiAuthConfig=auth),
                                        probe_ctx)
    assert (result.status, result.category) == ("DOWN", "CONFIGURATION_ERROR")
    assert "OAuth2" in result.error and "401" in result.error


@pytest.mark.asyncio
async def test_http_timeout(probe_ctx, http_server):
    """/slow holds its answer until the probe has returned: only the probe's timeout ends it."""
    _HTTPHandler.release_slow.clear()
    try:
        result = await statusapp.probe_http(_monitor(http_server + "/slow", timeout=0.3),
                                            probe_ctx)
    finally:
        _HTTPHandler.release_slow.set()
    assert (result.status, result.category) == ("DOWN", "NETWORK_TIMEOUT")


class _EndlessBody(socketserver.BaseRequestHandler):
    """200 with no length and a body that never ends; records what it sent before the client
    hung up."""

    sent: list[int] = []

    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        total, chunk = 0, b"x" * 65536
        try:
            while total < 1 << 30:
                self.request.sendall(chunk)
                total += len(chunk)
        except OSError:
            pass
        self.sent.append(total)


@pytest.mark.asyncio
async def test_probe_streams_map_errors_and_see_a_closed_idle_connection():
    """The probes' asyncio network backend: a refused connect and a silent server become the
    httpcore errors httpx expects with the OS cause kept, and a connection the server closed
    is reported readable, so a pool drops it instead of reusing it."""
    closed = asyncio.Event()

    async def answer_then_close(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
        closed.set()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    backend = statusapp._PinnedBackend(allow_private=True)
    with pytest.raises(httpcore.ConnectError) as refused:
        await backend.connect_tcp("127.0.0.1", free_port(), timeout=5)
    assert any(isinstance(e, ConnectionRefusedError)
               for e in statusapp._exception_chain(refused.value))
    servers = [await asyncio.start_server(handler, "127.0.0.1", 0)
               for handler in (answer_then_close, silent)]
    try:
        ports = [server.sockets[0].getsockname()[1] for server in servers]
        stream = await backend.connect_tcp("127.0.0.1", ports[0], timeout=5)
        assert stream.get_extra_info("server_addr")[1] == ports[0]
        assert not stream.get_extra_info("is_readable")
        await stream.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
        await closed.wait()
        assert await stream.read(100, timeout=5) == b""
        assert stream.get_extra_info("is_readable")
        await stream.aclose()
        quiet = await backend.connect_tcp("127.0.0.1", ports[1], timeout=5)
        with pytest.raises(httpcore.ReadTimeout) as timed_out:
            await quiet.read(100, timeout=0.05)
        assert isinstance(timed_out.value.__cause__, TimeoutError)
        await quiet.aclose()
    finally:
        for server in servers:
            server.close()


@pytest.mark.asyncio
async def test_http_body_is_read_up_to_the_cap_then_the_check_ends(probe_cfg):
    server = _serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EndlessBody))
    cfg = {**probe_cfg, "probes": {**probe_cfg["probes"], "max_body_bytes": 100_000}}
    ctx = statusapp.ProbeContext(cfg)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        result = await statusapp.probe_http(_monitor(url, timeout=10), ctx)
        assert (result.status, result.status_code) == ("UP", 200)
        eventually(lambda: _EndlessBody.sent)  # the client hung up, the server stopped
        assert _EndlessBody.sent[0] < 1 << 30
        auth = {"type": "oauth2", "oauth2TokenUrl": url, "oauth2ClientId": "c",
                "oauth2ClientSecret": "s"}  # an endless token answer is cut short too
        result = await statusapp.probe_http(_monitor(url, timeout=10, apiAuthConfig=auth), ctx)
        assert (result.status, result.error) == (
            "DOWN", "OAuth2 token endpoint sent no access_token")
        eventually(lambda: len(_EndlessBody.sent) == 2)
        async with ctx.http.stream("GET", url) as response:  # what a check keeps: the cap
            assert len(await statusapp._read_capped(response, 100_000)) == 100_000
    finally:
        await ctx.aclose()
        _stop(server)


@pytest.mark.asyncio
async def test_private_targets_are_refused_at_connect_time(probe_cfg, tls_servers, notify_http):
    """With [probes] allow_private_targets = false, every connecting probe type refuses a
    target that is, or resolves to, a loopback address, before any connection is made."""
    cfg = {**probe_cfg, "probes": {**probe_cfg["probes"], "allow_private_targets": False}}
    ctx = statusapp.ProbeContext(cfg)
    port = notify_http.url.rsplit(":", 1)[1]
    try:
        checks = [(statusapp.probe_http, _monitor(f"http://localhost:{port}/")),
                  (statusapp.probe_port, _monitor("127.0.0.1", "PORT", port=int(port))),
                  (statusapp.probe_ssl, _monitor(f"https://127.0.0.1:{tls_servers['valid']}",
                                                 "SSL_CERT")),
                  (statusapp.probe_ping, _monitor("::1", "PING"))]
        for probe, monitor in checks:
            result = await probe(monitor, ctx)
            assert (result.status, result.category) == ("DOWN", "CONFIGURATION_ERROR"), result
            assert "allow_private_targets is false" in result.error
    finally:
        await ctx.aclose()
    assert notify_http.requests == []


@pytest.mark.asyncio
async def test_connections_go_to_the_one_address_resolved_and_checked(probe_cfg, notify_http,
                                                                      monkeypatch):
    """Probes and user-URL alerts resolve a name once per request and connect to that answer;
    a name answering 127.0.0.1 first and 127.0.0.2 (nothing listens) afterwards still works."""
    loop = asyncio.get_running_loop()
    real, lookups = loop.getaddrinfo, []

    async def rebinding(host, port, *args, **kwargs):
        if host != "pinned.test":
            return await real(host, port, *args, **kwargs)
        lookups.append(host)
        address = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(loop, "getaddrinfo", rebinding)
    port = notify_http.url.rsplit(":", 1)[1]
    ctx = statusapp.ProbeContext(probe_cfg)
    try:
        result = await statusapp.probe_http(_monitor(f"http://pinned.test:{port}/",
                                                     httpMethod="POST"), ctx)
        assert result.status == "UP" and lookups == ["pinned.test"], result
    finally:
        await ctx.aclose()
    for allow, requests in ((True, 2), (False, 2)):
        lookups.clear()
        cfg = statusapp.load_config(environ={}, overrides={
            "notifications": {"allow_private_targets": allow}})
        async with statusapp.NotifyContext(cfg) as notify:
            records = await statusapp.deliver(statusapp.send_webhook,
                                              {"url": f"http://pinned.test:{port}/hook"},
                                              _notify_down(), notify, attempts=1)
        assert records[0]["ok"] is allow and lookups == ["pinned.test"], records
        assert len(notify_http.requests) == requests  # refused: nothing was sent


@pytest.mark.asyncio
async def test_http_connection_refused(probe_ctx):
    port = free_port(socket.SOCK_STREAM)
    result = await statusapp.probe_http(_monitor(f"http://127.0.0.1:{port}/"), probe_ctx)
    assert (result.status, result.category, result.error) == (
        "DOWN", "INFRASTRUCTURE", "connection refused")


@pytest.mark.asyncio
async def test_http_dns_failure(probe_ctx, monkeypatch):
    async def no_such_name(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    # The system resolver is not on loopback, so the failure is injected where names resolve.
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", no_such_name)
    result = await statusapp.probe_http(_monitor("http://nowhere.test/"), probe_ctx)
    assert (result.status, result.category) == ("DOWN", "DNS_FAILURE")
    assert "Name or service not known" in result.error


@pytest.mark.asyncio
@pytest.mark.parametrize("case, fragment", [
    ("wrong_host", "match"), ("untrusted", "unable to get local issuer"), ("expired", "expired")])
async def test_http_invalid_certificate(probe_ctx, tls_servers, case, fragment):
    result = await statusapp.probe_http(_monitor(f"https://127.0.0.1:{tls_servers[case]}/"),
                                        probe_ctx)
    assert (result.status, result.category) == ("DOWN", "SSL_CERTIFICATE")
    assert fragment in result.error


@pytest.mark.asyncio
async def test_http_https_with_timings(probe_ctx, tls_servers):
    monitor = _monitor(f"https://localhost:{tls_servers['valid']}/", performanceTimings=True)
    result = await statusapp.probe_http(monitor, probe_ctx)
    assert (result.status, result.status_code) == ("UP", 200)
    assert set(result.timings) == {"dns", "connect", "tls", "ttfb", "transfer"}
    assert result.timings["dns"] > 0 and result.timings["connect"] > 0
    assert result.timings["tls"] > 0 and result.timings["ttfb"] > 0
    assert sum(result.timings.values()) <= result.response_time + 1
    plain = await statusapp.probe_http(_monitor(f"https://localhost:{tls_servers['valid']}/"),
                                       probe_ctx)
    assert plain.status == "UP" and plain.timings is None


@pytest.mark.asyncio
async def test_http_timings_are_measured_not_estimated(probe_ctx, http_server):
    _HTTPHandler.seen.clear()
    monitor = _monitor(http_server + "/delay", performanceTimings=True)
    first = await statusapp.probe_http(monitor, probe_ctx)
    second = await statusapp.probe_http(monitor, probe_ctx)
    assert first.timings["ttfb"] >= 190 and first.timings["tls"] == 0
    assert first.timings["transfer"] > 0
    # No keep-alive: each check opened its own connection.
    assert _HTTPHandler.seen[0]["port"] != _HTTPHandler.seen[1]["port"]
    assert second.timings["connect"] > 0


# Assertions: each source and comparison, passing and failing, with the actual value seen.
_ASSERTION_CASES = [
    ("STATUS_CODE", None, "EQUALS", "200", True, "200"),
    ("STATUS_CODE", None, "NOT_EQUALS", "200", False, "200"),
    ("STATUS_CODE", None, "LESS_THAN", "300", True, "200"),
    ("STATUS_CODE", None, "GREATER_THAN", "300", False, "200"),
    ("RESPONSE_TIME", None, "LESS_THAN", "60000", True, None),
    ("RESPONSE_TIME", None, "GREATER_THAN", "60000", False, None),
    ("HEADERS", "x-version", "EQUALS", "2.1", True, "2.1"),
    ("HEADERS", "X-Version", "CONTAINS", "3", False, "2.1"),
    ("HEADERS", "X-Missing", "IS_EMPTY", "", True, None),
    ("HEADERS", "X-Version", "IS_EMPTY", "", False, "2.1"),
    ("HEADERS", "Content-Type", "MATCHES", "^application/json$", True, "application/json"),
    ("TEXT_BODY", None, "CONTAINS", '"status": "ok"', True, None),
    ("TEXT_BODY", None, "NOT_CONTAINS", "ok", False, None),
    ("TEXT_BODY", None, "NOT_EMPTY", "", True, None),
    ("TEXT_BODY", None, "MATCHES", r'"count": [4-9]', False, None),
    ("JSON_BODY", "$.status", "EQUALS", "ok", True, "ok"),
    ("JSON_BODY", "$.status", "NOT_EQUALS", "ok", False, "ok"),
    ("JSON_BODY", "$.count", "GREATER_THAN", "2", True, "3"),
    ("JSON_BODY", "$.count", "LESS_THAN", "3", False, "3"),
    ("JSON_BODY", "$.items[0].ok", "EQUALS", "true", True, "true"),
    ("JSON_BODY", "$.items[?@.ok == false]", "NOT_EMPTY", "", True, '{"ok": false}'),
    ("JSON_BODY", "$.empty", "IS_EMPTY", "", True, "[]"),
    ("JSON_BODY", "$.items[?length(@.name) == 1].ok", "EQUALS", "true", True, "true"),
    ("JSON_BODY", "$.items[*].ok", "CONTAINS", "null", False, "[true, false]"),
    ("JSON_BODY", "$.nothing", "NOT_EMPTY", "", False, None),
    ("JSON_BODY", "$.items[1]", "NOT_CONTAINS", "true", True, '{"ok": false}'),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("source, prop, comparison, target, passed, actual", _ASSERTION_CASES)
async def test_http_assertions(probe_ctx, http_server, source, prop, comparison, target, passed,
                               actual):
    assertion = {"source": source, "property": prop, "comparison": comparison, "target": target}
    result = await statusapp.probe_http(_monitor(http_server + "/json", "API",
                                                 assertions=[assertion]), probe_ctx)
    outcome, = result.details["assertionResults"]
    assert outcome["passed"] is passed
    if actual is not None:
        assert outcome["actual"] == actual
    elif source == "RESPONSE_TIME":
        assert int(outcome["actual"]) == result.response_time
    if passed:
        assert (result.status, result.category) == ("UP", None)
    else:
        assert (result.status, result.category) == ("DOWN", "APPLICATION_ERROR")
        assert result.error.startswith(f"assertion failed: {source}")


@pytest.mark.asyncio
async def test_http_assertion_on_a_body_that_is_not_json(probe_ctx, http_server):
    assertions = [{"source": "JSON_BODY", "property": "$.status", "comparison": "EQUALS",
                   "target": "ok"},
                  {"source": "TEXT_BODY", "comparison": "NOT_CONTAINS", "target": "error"}]
    result = await statusapp.probe_http(_monitor(http_server + "/html", assertions=assertions),
                                        probe_ctx)
    first, second = result.details["assertionResults"]
    assert (first["passed"], first["error"]) == (False, "response body is not JSON")
    assert second["passed"] is False and len(second["actual"]) == 200
    assert second["actual"].startswith("<html><h1>Internal error")
    assert (result.status, result.category) == ("DOWN", "APPLICATION_ERROR")
    assert "response body is not JSON (and 1 more)" in result.error


@pytest.mark.asyncio
async def test_http_runaway_regex_gives_up_and_fails(probe_ctx, http_server):
    assertion = {"source": "TEXT_BODY", "comparison": "MATCHES", "target": "(a|aa)+$"}
    result = await statusapp.probe_http(_monitor(http_server + "/big", assertions=[assertion]),
                                        probe_ctx)
    outcome, = result.details["assertionResults"]
    assert outcome["passed"] is False and "gave up" in outcome["error"]
    assert result.status == "DOWN"


@pytest.mark.asyncio
async def test_http_body_is_read_up_to_the_cap(probe_cfg, http_server):
    cfg = {**probe_cfg, "probes": {**probe_cfg["probes"], "max_body_bytes": 1000}}
    ctx = statusapp.ProbeContext(cfg)
    try:
        assertion = {"source": "TEXT_BODY", "comparison": "NOT_CONTAINS", "target": "END"}
        result = await statusapp.probe_http(_monitor(http_server + "/big",
                                                     assertions=[assertion]), ctx)
    finally:
        await ctx.aclose()
    assert result.status == "UP" and result.details["assertionResults"][0]["passed"]


@pytest.mark.asyncio
async def test_http_compressed_bodies_are_decoded_within_the_cap(probe_ctx, http_server):
    json_ok = {"source": "JSON_BODY", "property": "$.status", "comparison": "EQUALS",
               "target": "ok"}
    result = await statusapp.probe_http(_monitor(http_server + "/gzip", assertions=[json_ok]),
                                        probe_ctx)
    assert result.status == "UP" and result.details["assertionResults"][0]["passed"]
    tail = {"source": "TEXT_BODY", "comparison": "NOT_CONTAINS", "target": "END"}
    result = await statusapp.probe_http(_monitor(http_server + "/bomb", assertions=[tail]),
                                        probe_ctx)
    assert result.status == "UP" and result.details["assertionResults"][0]["passed"]


@pytest.mark.asyncio
async def test_http_expected_status_code_still_rules_with_assertions(probe_ctx, http_server):
    assertion = {"source": "TEXT_BODY", "comparison": "EQUALS", "target": "nope"}
    result = await statusapp.probe_http(_monitor(http_server + "/missing", expectedStatusCode=404,
                                                 assertions=[assertion]), probe_ctx)
    assert result.status == "UP" and result.details["assertionResults"][0]["passed"]
    result = await statusapp.probe_http(_monitor(http_server + "/missing", assertions=[assertion]),
                                        probe_ctx)
    assert (result.status, result.category) == ("DOWN", "APPLICATION_ERROR")
    assert result.error.startswith("HTTP 404, expected 2xx or 3xx")


@pytest.mark.asyncio
async def test_https_reports_certificate_expiry_and_warns_before_it(probe_ctx, tls_servers):
    fine = await statusapp.probe_http(_monitor(f"https://localhost:{tls_servers['valid']}/"),
                                      probe_ctx)
    assert fine.status == "UP" and fine.details["certificate"]["daysRemaining"] > 30
    soon = await statusapp.probe_http(
        _monitor(f"https://127.0.0.1:{tls_servers['soon']}/", sslCertExpiryDays=14), probe_ctx)
    assert soon.details["certificate"]["daysRemaining"] == 5
    assert (soon.status, soon.category) == ("DEGRADED", "SSL_CERTIFICATE")
    assert soon.error == "certificate expires in 5 days"
    later = await statusapp.probe_http(
        _monitor(f"https://127.0.0.1:{tls_servers['soon']}/", sslCertExpiryDays=3), probe_ctx)
    assert later.status == "UP"


def test_assertions_are_validated(client):
    bad = [{"source": "JSON_BODY", "comparison": "EQUALS", "target": "x"},
           {"source": "JSON_BODY", "property": "$[", "comparison": "EQUALS", "target": "x"},
           {"source": "TEXT_BODY", "comparison": "MATCHES", "target": "(unclosed"},
           {"source": "TEXT_BODY", "comparison": "CONTAINS"},
           {"source": "BODY", "comparison": "SIMILAR", "target": "x"},
           {"source": "JSON_BODY", "property": "$[?match(@.a, '(a|aa)+')]",
            "comparison": "NOT_EMPTY"}]
    response = client.post("/api/v1/monitors", json={"name": "a", "url": "https://a.test",
                                                     "assertions": bad})
    assert response.status_code == 400
    paths = sorted(tuple(i["path"]) for i in response.json()["error"])
    assert paths == [("assertions", 0, "property"), ("assertions", 1, "property"),
                     ("assertions", 2, "target"), ("assertions", 3, "target"),
                     ("assertions", 4, "comparison"), ("assertions", 4, "source"),
                     ("assertions", 5, "property")]
    good = [{"source": "STATUS_CODE", "comparison": "EQUALS", "target": "200"}]
    created = client.post("/api/v1/monitors", json={"name": "a", "url": "https://a.test",
                                                    "assertions": good})
    assert created.status_code == 201
    assert created.json()["assertions"] == [{**good[0], "property": None}]


@pytest.mark.asyncio
async def test_port_tcp(probe_ctx):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        up = await statusapp.probe_port(
            _monitor("tcp://127.0.0.1/ignored", "PORT", port=port, protocol="TCP"), probe_ctx)
    down = await statusapp.probe_port(_monitor("127.0.0.1", "PORT", port=port), probe_ctx)
    assert up.status == "UP"
    assert (down.status, down.category) == ("DOWN", "INFRASTRUCTURE")


@pytest.mark.asyncio
async def test_port_udp_reply_silence_and_unreachable(probe_ctx):
    echo = _serve(socketserver.ThreadingUDPServer(("127.0.0.1", 0), _UDPEcho))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        results = [await statusapp.probe_port(
            _monitor("127.0.0.1", "PORT", port=port, protocol="UDP", timeout=0.3), probe_ctx)
            for port in (echo.server_address[1], silent.getsockname()[1],
                         free_port(socket.SOCK_DGRAM))]
    _stop(echo)
    replied, quiet, closed = results
    assert (replied.status, replied.details) == ("UP", {"udp": "open"})
    assert (quiet.status, quiet.details) == ("UP", {"udp": "open|filtered"})
    assert (closed.status, closed.category) == ("DOWN", "INFRASTRUCTURE")


@pytest.mark.asyncio
@pytest.mark.parametrize("probe, monitor", [
    (statusapp.probe_port, _monitor("127.0.0.1", "PORT")),
    (statusapp.probe_ping, _monitor("", "PING")),
    (statusapp.probe_dns, _monitor("", "DNS")),
    (statusapp.probe_dns, _monitor("www.test", "DNS", dnsRecord="SRV")),
    (statusapp.probe_domain, _monitor("", "DOMAIN")),
    (statusapp.probe_http, _monitor("ftp://127.0.0.1/")),
])
async def test_incomplete_monitors_are_configuration_errors(probe_ctx, probe, monitor):
    result = await probe(monitor, probe_ctx)
    assert (result.status, result.category) == ("DOWN", "CONFIGURATION_ERROR")


@pytest.mark.asyncio
async def test_ping_loopback(probe_ctx):
    result = await statusapp.probe_ping(_monitor("127.0.0.1", "PING"), probe_ctx)
    assert result.status == "UP", result.error
    assert result.details["packetLoss"] == 0 and result.details["packetsReceived"] == 3
    assert result.response_time == round(result.details["rttAvg"])


@pytest.mark.asyncio
async def test_ping_unprivileged(probe_ctx, monkeypatch):
    with open("/proc/sys/net/ipv4/ping_group_range") as fh:
        low, high = map(int, fh.read().split())
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = await statusapp.probe_ping(_monitor("127.0.0.1", "PING"), probe_ctx)
    if low <= os.getgid() <= high:
        assert result.status == "UP"
    else:
        assert (result.status, result.category) == ("DOWN", "CONFIGURATION_ERROR")
        assert "ping_group_range" in result.error


@pytest.mark.asyncio
@pytest.mark.parametrize("name, record, expected, status, answers", [
    ("www.test", "A", "127.0.0.11", "UP", ["127.0.0.10", "127.0.0.11"]),
    ("www.test", "A", "127.0.0.99", "DOWN", ["127.0.0.10", "127.0.0.11"]),
    ("http://www.test/path", "AAAA", "0:0::1", "UP", ["::1"]),
    ("alias.test", "CNAME", "WWW.test.", "UP", ["www.test"]),
    ("test", "MX", "mail.test", "UP", ["10 mail.test"]),
    ("test", "MX", "other.test", "DOWN", ["10 mail.test"]),
    ("test", "TXT", "v=spf1 -all", "UP", ["v=spf1 -all"]),
])
async def test_dns_answers(probe_ctx, name, record, expected, status, answers):
    result = await statusapp.probe_dns(_monitor(name, "DNS", dnsRecord=record,
                                                expectedIp=expected), probe_ctx)
    assert result.status == status
    assert sorted(result.details["answers"]) == answers
    if status == "DOWN":
        assert result.category == "DNS_FAILURE" and expected in result.error


@pytest.mark.asyncio
async def test_dns_failures_are_told_apart(probe_ctx):
    cases = {"nothere.test": "NXDOMAIN", "servfail.test": "SERVFAIL",
             "alias.test": "has no A record", "silent.test": "timed out"}
    for name, fragment in cases.items():
        result = await statusapp.probe_dns(_monitor(name, "DNS", dnsRecord="A", timeout=0.5),
                                           probe_ctx)
        assert result.status == "DOWN" and fragment in result.error, (name, result.error)
        assert result.category == ("NETWORK_TIMEOUT" if name == "silent.test" else "DNS_FAILURE")


@pytest.mark.parametrize("case", ["valid", "expired", "soon", "untrusted"])
def test_der_reader_agrees_with_cryptography(tls_certs, case):
    pem = tls_certs[1][case].cert_chain_pems[0].bytes()
    cert = x509.load_pem_x509_certificate(pem)
    parsed = statusapp._parse_certificate(ssl.PEM_cert_to_DER_cert(pem.decode()))
    assert parsed["notBefore"] == cert.not_valid_before_utc
    assert parsed["notAfter"] == cert.not_valid_after_utc
    common_name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    organization = cert.issuer.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value
    assert (parsed["subject"], parsed["issuer"]) == (common_name, organization)


def test_der_reader_rejects_garbage():
    with pytest.raises(ValueError):
        statusapp._parse_certificate(b"\x30\x82\x01\x00\x02")


@pytest.mark.asyncio
@pytest.mark.parametrize("case, status, fragment", [
    ("valid", "UP", None),
    ("soon", "DEGRADED", "expires in 5 days"),
    ("expired", "DOWN", "expired on"),
    ("future", "DOWN", "not valid before"),
    ("wrong_host", "DOWN", "is for 'other.test'"),
    ("untrusted", "DOWN", "not trusted"),
])
async def test_ssl_certificate_rules(probe_ctx, tls_servers, case, status, fragment):
    result = await statusapp.probe_ssl(_monitor(f"https://127.0.0.1:{tls_servers[case]}/x",
                                                "SSL_CERT", sslCertExpiryDays=30), probe_ctx)
    assert result.status == status, result.error
    assert result.error is None if fragment is None else fragment in result.error
    assert result.category == (None if status == "UP" else "SSL_CERTIFICATE")
    details = result.details
    assert details["subject"] == ("stranger.test" if case == "untrusted"
                                  else "other.test" if case == "wrong_host" else f"{case}.test")
    assert details["issuer"].startswith("trustme")
    valid_to = dt.datetime.fromisoformat(details["validTo"])
    assert details["daysRemaining"] == (valid_to - dt.datetime.now(dt.timezone.utc)).days


@pytest.mark.asyncio
async def test_ssl_threshold_comes_from_the_monitor(probe_ctx, tls_servers):
    result = await statusapp.probe_ssl(_monitor(f"127.0.0.1:{tls_servers['soon']}", "SSL_CERT",
                                                sslCertExpiryDays=3), probe_ctx)
    assert result.status == "UP" and result.details["daysRemaining"] == 5


@pytest.mark.asyncio
async def test_ssl_refused(probe_ctx):
    port = free_port(socket.SOCK_STREAM)
    result = await statusapp.probe_ssl(_monitor(f"https://127.0.0.1:{port}", "SSL_CERT"),
                                       probe_ctx)
    assert (result.status, result.category) == ("DOWN", "INFRASTRUCTURE")


def _domain(name: str, last: dict | None = None, **fields) -> dict:
    return _monitor(name, "DOMAIN", domainExpiryDays=30, lastDetails=last, **fields)


@pytest.mark.asyncio
async def test_domain_from_rdap(probe_ctx):
    result = await statusapp.probe_domain(_domain("https://example.test/"), probe_ctx)
    details = result.details
    assert (result.status, details["source"], details["daysRemaining"]) == ("UP", "rdap", 400)
    assert details["registrar"] == "Test Registrar"
    assert details["status"] == ["client transfer prohibited"]
    assert details["nameservers"] == ["ns1.example.test", "ns2.example.test"]
    assert details["dns"] == {"NS": ["ns1.example.test", "ns2.example.test"],
                              "A": ["127.0.0.20"]}
    assert details["blocklists"] == {"bl.test": "clean"} and details["changes"] == []


@pytest.mark.asyncio
@pytest.mark.parametrize("name, status, fragment", [
    ("soon.test", "DEGRADED", "expires in 10 days"),
    ("expired.test", "DOWN", "expired on"),
    ("listed.test", "DEGRADED", "listed on bl.test"),
])
async def test_domain_expiry_and_blocklist_rules(probe_ctx, name, status, fragment):
    result = await statusapp.probe_domain(_domain(name), probe_ctx)
    assert result.status == status and fragment in result.error


@pytest.mark.asyncio
async def test_domain_whois_fallback_follows_referral(probe_ctx, whois_servers):
    result = await statusapp.probe_domain(_domain("whoisonly.test", domainMonitorDns=False,
                                                  domainMonitorBlacklist=False), probe_ctx)
    details = result.details
    assert (result.status, details["source"]) == ("UP", "whois")
    assert details["expiresAt"] == "2031-02-03T04:05:06+00:00"
    assert details["registrar"] == "Loopback Registrar"
    assert details["status"] == ["client transfer prohibited"]
    assert details["nameservers"] == ["ns1.whoisonly.test", "ns2.whoisonly.test"]
    assert whois_servers[0].queries[-1] == whois_servers[1].queries[-1] == "whoisonly.test"
    assert "dns" not in details and "blocklists" not in details


@pytest.mark.asyncio
async def test_domain_down_when_no_registry_answers(probe_ctx):
    result = await statusapp.probe_domain(_domain("nowhere.test"), probe_ctx)
    assert (result.status, result.category) == ("DOWN", "THIRD_PARTY_SERVICE")
    assert "RDAP: HTTP 404" in result.error and "WHOIS: no record" in result.error


@pytest.mark.asyncio
async def test_domain_registry_data_is_cached(probe_ctx):
    _HTTPHandler.hits.clear()
    first = await statusapp.probe_domain(_domain("example.test"), probe_ctx)
    again = await statusapp.probe_domain(_domain("example.test", first.details), probe_ctx)
    assert _HTTPHandler.hits["/rdap/domain/example.test"] == 1
    assert again.details["fetchedAt"] == first.details["fetchedAt"]
    stale = dict(first.details, fetchedAt="2000-01-01T00:00:00+00:00", daysRemaining=1)
    refreshed = await statusapp.probe_domain(_domain("example.test", stale), probe_ctx)
    assert _HTTPHandler.hits["/rdap/domain/example.test"] == 2
    assert refreshed.details["daysRemaining"] == 400


@pytest.mark.asyncio
async def test_domain_cache_recomputes_days(probe_ctx):
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=7, hours=1)
    last = {"domain": "example.test", "source": "rdap",
            "fetchedAt": dt.datetime.now(dt.timezone.utc).isoformat(),
            "expiresAt": expires.isoformat(), "registrar": "Test Registrar",
            "status": [], "nameservers": [], "daysRemaining": 99}
    result = await statusapp.probe_domain(_domain("example.test", last, domainMonitorDns=False,
                                                  domainMonitorBlacklist=False), probe_ctx)
    assert (result.status, result.details["daysRemaining"]) == ("DEGRADED", 7)


@pytest.mark.asyncio
async def test_domain_reports_changes(probe_ctx):
    last = {"domain": "example.test", "registrar": "Old Registrar",
            "status": ["client transfer prohibited"], "nameservers": ["ns1.old.test"],
            "dns": {"NS": ["ns1.old.test"], "A": ["127.0.0.20"]}}
    result = await statusapp.probe_domain(_domain("example.test", last), probe_ctx)
    assert result.status == "UP"
    assert result.details["changes"] == [
        "registrar changed: Old Registrar → Test Registrar",
        "nameservers changed: ns1.old.test → ns1.example.test, ns2.example.test",
        "NS records changed: ns1.old.test → ns1.example.test, ns2.example.test"]
    quiet = await statusapp.probe_domain(_domain("example.test", last, domainMonitorWhois=False,
                                                 domainMonitorDns=False), probe_ctx)
    assert quiet.details["changes"] == []


@pytest.mark.parametrize("text, expected", [
    ("2030-01-02T03:04:05Z", "2030-01-02T03:04:05+00:00"),
    ("2030-01-02T03:04:05.0Z", "2030-01-02T03:04:05+00:00"),
    ("2030-01-02 03:04:05 UTC", "2030-01-02T03:04:05+00:00"),
    ("02-Jan-2030", "2030-01-02T00:00:00+00:00"),
    ("2030.01.02", "2030-01-02T00:00:00+00:00"),
    ("2030/01/02 (YYYY/MM/DD)", "2030-01-02T00:00:00+00:00"),
])
def test_whois_dates(text, expected):
    assert statusapp._parse_date(text).isoformat() == expected


def test_probe_context_rejects_bad_config(probe_cfg):
    cfg = {**probe_cfg, "probes": {**probe_cfg["probes"], "dns_nameservers": ["ns.example"]}}
    with pytest.raises(statusapp.ConfigError, match="dns_nameservers"):
        statusapp.ProbeContext(cfg)
    cfg["probes"] = {**probe_cfg["probes"], "ca_bundle": "/nonexistent/ca.pem"}
    with pytest.raises(statusapp.ConfigError, match="ca_bundle"):
        statusapp.ProbeContext(cfg)


# --- Scheduler tests ---
#
# A loopback HTTP target answers each path as a test scripts it, and records when each path
# was hit and how many requests to it were in flight at once.  StatusApp runs under TestClient
# (its lifespan starts the scheduler) with min_interval and retry_delay lowered to 1 s.


class _Target(http.server.BaseHTTPRequestHandler):
    """Per path, ``modes`` says: ok (200), fail (500), once (500 once, then ok), slow (2 s)."""

    modes: dict[str, str]
    hits: dict[str, list[float]]
    active: Counter
    peak: Counter
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        with self.lock:
            self.hits.setdefault(self.path, []).append(time.time())
            for key in (self.path, "*"):  # this path, and all paths together
                self.active[key] += 1
                self.peak[key] = max(self.peak[key], self.active[key])
            mode = self.modes.get(self.path, "ok")
            if mode == "once":
                self.modes[self.path] = "ok"
        try:
            if mode == "slow":
                time.sleep(2)
            self.send_response(500 if mode in ("fail", "once") else 200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        except ConnectionError:
            pass  # the app stopped while this request was slow
        finally:
            with self.lock:
                self.active[self.path] -= 1
                self.active["*"] -= 1


@pytest.fixture
def target():
    """A fresh scriptable target; ``target.url(path)`` is a URL on it."""
    handler = type("Target", (_Target,), {"modes": {}, "hits": {}, "active": Counter(),
                                          "peak": Counter()})
    server = _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler))
    handler.url = staticmethod(lambda path: f"http://127.0.0.1:{server.server_address[1]}{path}")
    yield handler
    _stop(server)


def _sched_cfg(tmp_path, **probes) -> dict:
    return make_cfg(tmp_path, probes={"min_interval": 1, "retry_delay": 1, **probes})


@contextlib.contextmanager
def _app(cfg: dict, key: str):
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as test_client:
        yield test_client


@pytest.fixture
def sched(tmp_path):
    """(cfg, client): StatusApp with its scheduler running and short intervals allowed."""
    cfg = _sched_cfg(tmp_path)
    with _app(cfg, new_key(cfg)) as test_client:
        yield cfg, test_client


def _create(client, url: str, **fields) -> str:
    response = client.post("/api/v1/monitors", json={"name": url, "url": url, "type": "WEBSITE",
                                                     "interval": 1, "timeout": 5, **fields})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _checks(cfg: dict, monitor_id: str) -> list:
    return sql(cfg, "SELECT status, checked_at, region_id, error FROM checks WHERE monitor_id = ?"
                    " ORDER BY checked_at", (monitor_id,))


def _transitions(cfg: dict, monitor_id: str) -> list:
    return sql(cfg, "SELECT old_status, new_status, reason FROM status_transitions"
                    " WHERE monitor_id = ? ORDER BY id", (monitor_id,))


def _status(cfg: dict, monitor_id: str) -> str:
    return sql(cfg, "SELECT status FROM monitors WHERE id = ?", (monitor_id,))[0][0]


def test_phases_are_stable_and_spread_over_the_interval():
    ids = [f"mon_{i:08x}" for i in range(10_000)]
    phases = [statusapp.check_phase(i, 60) for i in ids]
    assert phases == [statusapp.check_phase(i, 60) for i in ids]
    per_second = Counter(int(p) for p in phases)
    assert sorted(per_second) == list(range(60))
    assert max(per_second.values()) < 1.3 * 10_000 / 60
    for after in (0.0, 1_700_000_000.25, 1_700_000_059.9):
        slot = statusapp.next_slot("mon_a", 60, after)
        assert after < slot <= after + 60
        assert (slot - statusapp.check_phase("mon_a", 60)) % 60 == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("start, results, statuses, probes", [
    ("UP", "DOWN DOWN DOWN", "UP DOWN DOWN", {}),
    ("UP", "DOWN UP DOWN UP", "UP UP UP UP", {}),
    ("PENDING", "DOWN DOWN", "PENDING DOWN", {}),
    ("PENDING", "UP", "UP", {}),
    ("DOWN", "UP", "UP", {}),
    ("DOWN", "UP DOWN UP UP", "DOWN DOWN DOWN UP", {"recoveries": 2}),
    ("UP", "DEGRADED UP", "DEGRADED UP", {}),
    ("DOWN", "DEGRADED", "DEGRADED", {}),
    ("UP", "DOWN", "DOWN", {"confirmations": 1}),
])
def test_status_needs_confirmations_and_recoveries(start, results, statuses, probes):
    entry = statusapp._Scheduled({"id": "mon_x", "interval": 60}, start)
    seen = []
    for result in results.split():
        entry.status = entry.judge(statusapp.CheckResult(status=result),
                                   {"confirmations": 2, "recoveries": 1, **probes})
        seen.append(entry.status)
    assert seen == statuses.split()


def test_running_checks_follow_each_monitors_phase(sched, target):
    cfg, client = sched
    ids = [_create(client, target.url(f"/spread/{n}"), interval=3) for n in range(12)]
    eventually(lambda: all(len(_checks(cfg, i)) >= 2 for i in ids))
    planned = []  # (the slot a check was due at, when it started)
    for monitor_id in ids:
        times = [at / 1000 for _, at, _, _ in _checks(cfg, monitor_id)]
        for previous, at in itertools.pairwise(times):
            slot = statusapp.next_slot(monitor_id, 3, previous + 1.5)  # the one after
            assert at > slot - 0.01, "never before its slot on the monitor's grid"
            planned.append((slot, at))
    # Checks start in the order of their slots: one due half a second after another starts later.
    assert all(a_at < b_at for (a_slot, a_at), (b_slot, b_at)
               in itertools.combinations(sorted(planned), 2) if b_slot - a_slot >= 0.5)
    starts = {int(statusapp.check_phase(i, 3) * 2) for i in ids}
    assert len(starts) > 2  # 12 monitors do not share one half-second


def test_a_slow_target_never_gets_two_checks_at_once(sched, target):
    cfg, client = sched
    target.modes["/slow"] = "slow"
    _create(client, target.url("/slow"))
    eventually(lambda: len(target.hits.get("/slow", [])) >= 2)
    assert target.peak["/slow"] == 1
    gaps = [b - a for a, b in itertools.pairwise(target.hits["/slow"])]
    assert min(gaps) >= 2  # the next check waited for the previous one


def test_pause_resume_edit_and_delete_reach_the_running_scheduler(sched, target):
    """Each change is followed by the running scheduler.  A check already on its way when the
    change lands may still arrive (one at most: a monitor never has two checks at once); the
    marker monitor's checks show that long enough has passed for the checks the change should
    have stopped to arrive."""
    cfg, client = sched
    monitor_id = _create(client, target.url("/a"))
    _create(client, target.url("/marker"))  # its checks show the scheduler's time passing

    def marker_checks_since(at: float, count: int) -> bool:
        """``count`` checks of the marker since ``at``: its interval (1 s) passed that often."""
        return sum(t > at for t in target.hits.get("/marker", [])) >= count

    eventually(lambda: len(target.hits.get("/a", [])) >= 2)
    assert client.post(f"/api/v1/monitors/{monitor_id}/pause").json()["isPaused"] is True
    paused_at = time.time()
    eventually(lambda: marker_checks_since(paused_at, 3))  # 2 s: one more slot past that second
    assert sum(t > paused_at for t in target.hits["/a"]) <= 1
    client.post(f"/api/v1/monitors/{monitor_id}/pause")
    resumed_at = time.time()
    eventually(lambda: target.hits["/a"][-1] > resumed_at)
    client.put(f"/api/v1/monitors/{monitor_id}", json={"url": target.url("/b"), "interval": 2})
    edited_at = time.time()
    eventually(lambda: len(target.hits.get("/b", [])) >= 2)  # 2 s: /a's 1 s slots would show
    assert sum(t > edited_at for t in target.hits["/a"]) <= 1
    first_b, second_b = target.hits["/b"][:2]  # on the new 2 s grid, not the old 1 s one
    assert second_b > statusapp.next_slot(monitor_id, 2, first_b) - 0.01
    client.delete(f"/api/v1/monitors/{monitor_id}")
    deleted_at = time.time()
    eventually(lambda: marker_checks_since(deleted_at, 4))  # 3 s: a 2 s slot past that second
    assert sum(t > deleted_at for t in target.hits["/b"]) <= 1


def test_only_monitors_for_this_region_and_probing_types_are_scheduled(tmp_path, target):
    cfg = _sched_cfg(tmp_path)
    key = new_key(cfg)
    sql(cfg, "INSERT INTO worker_regions (id, city, country, country_code, latitude, longitude)"
             " VALUES ('far', 'Far', 'Far', 'FF', 1, 1)")
    with _app(cfg, key) as client:
        _create(client, target.url("/far"), enabledWorkerRegionIds=["far"])
        both = _create(client, target.url("/both"), enabledWorkerRegionIds=["far", "local"])
        _create(client, target.url("/off"), isActive=False)
        _create(client, target.url("/cron"), type="CRON")
        eventually(lambda: len(target.hits.get("/both", [])) >= 2)
        assert {r for _, _, r, _ in _checks(cfg, both)} == {"local"}
        assert client.get("/api/v1/health").json()["scheduler"]["monitors"] == 1
    assert set(target.hits) == {"/both"}


def test_restart_resumes_from_the_last_stored_check(tmp_path, target):
    cfg = _sched_cfg(tmp_path)
    key = new_key(cfg)
    with _app(cfg, key) as client:
        recent = _create(client, target.url("/recent"), interval=4)
        stale = _create(client, target.url("/stale"), interval=4)
        eventually(lambda: _checks(cfg, recent) and _checks(cfg, stale))
    last = _checks(cfg, recent)[-1][1] / 1000
    # A loaded machine may store a grid check before the app stops: count what is there.
    before = {recent: len(_checks(cfg, recent)), stale: len(_checks(cfg, stale))}
    sql(cfg, "UPDATE check_rows SET checked_at = checked_at - 3600000"
             " WHERE monitor = (SELECT seq FROM monitor_keys WHERE id = ?)", (stale,))
    starting = time.time()
    with _app(cfg, key) as client:
        started = time.time()  # the scheduler began between the two, maybe checks already
        eventually(lambda: all(len(_checks(cfg, m)) > n for m, n in before.items()))
    # The recent monitor's next check is one interval after its last one, on its grid; the
    # stale one's is its next grid slot after the restart, not an immediate catch-up.
    resumed = statusapp.next_slot(recent, 4, last + 2)
    expected = {recent: (resumed, resumed), stale: (statusapp.next_slot(stale, 4, starting),
                                                    statusapp.next_slot(stale, 4, started))}
    for monitor_id, (earliest, latest) in expected.items():  # that slot, not an earlier or later
        first_after = _checks(cfg, monitor_id)[before[monitor_id]][1] / 1000
        assert earliest - 0.01 < first_after < statusapp.next_slot(monitor_id, 4, latest)


def test_failures_are_confirmed_before_down_and_recovery_is_recorded(sched, target):
    cfg, client = sched
    target.modes["/flaky"] = "fail"
    monitor_id = _create(client, target.url("/flaky"), interval=3)
    eventually(lambda: _checks(cfg, monitor_id))
    assert _status(cfg, monitor_id) == "PENDING"  # one failure is not enough, even at first
    eventually(lambda: _status(cfg, monitor_id) == "DOWN")
    first, second = _checks(cfg, monitor_id)[:2]
    assert 0.9 < (second[1] - first[1]) / 1000 < 3  # re-checked after retry_delay (1 s),
    # sooner than its 3 s interval would bring a check
    target.modes["/flaky"] = "ok"
    eventually(lambda: _status(cfg, monitor_id) == "UP")  # the next slot: <= 1.5 intervals
    assert _transitions(cfg, monitor_id) == [
        ("PENDING", "DOWN", "HTTP 500, expected 2xx or 3xx"), ("DOWN", "UP", "HTTP 200")]
    assert [s for s, *_ in _checks(cfg, monitor_id)] == ["DOWN", "DOWN", "UP"]


def test_a_single_failure_never_goes_down(sched, target):
    cfg, client = sched
    monitor_id = _create(client, target.url("/blip"), interval=3)
    eventually(lambda: _status(cfg, monitor_id) == "UP")
    target.modes["/blip"] = "once"
    eventually(lambda: [s for s, *_ in _checks(cfg, monitor_id)][-2:] == ["DOWN", "UP"])
    assert _status(cfg, monitor_id) == "UP"
    assert [new for _, new, _ in _transitions(cfg, monitor_id)] == ["UP"]


def test_checks_show_region_timings_and_counts_in_the_api(sched, target):
    cfg, client = sched
    monitor_id = _create(client, target.url("/timed"), performanceTimings=True)
    eventually(lambda: len(_checks(cfg, monitor_id)) >= 2)
    body = client.get(f"/api/v1/monitors/{monitor_id}").json()
    assert body["status"] == "UP" and body["_count"]["checks"] >= 2
    [check] = body["checks"]
    assert check["workerRegion"]["id"] == "local" and check["statusCode"] == 200
    assert set(check["timings"]) == {"dns", "connect", "tls", "ttfb", "transfer"}
    assert check["timings"]["ttfb"] > 0


def test_health_reports_scheduler_lag_and_degrades_when_far_behind(tmp_path, target,
                                                                   monkeypatch, caplog):
    monkeypatch.setattr(statusapp, "_LAG_DEGRADED", 1.0)
    monkeypatch.setattr(statusapp, "_LAG_WARN", 0.5)
    cfg = _sched_cfg(tmp_path, max_concurrency=1)
    with _app(cfg, new_key(cfg)) as client:
        healthy = client.get("/api/v1/health").json()
        assert healthy["checks"]["scheduler"] == "healthy" and healthy["status"] == "healthy"
        for n in range(3):
            target.modes[f"/busy/{n}"] = "slow"
            _create(client, target.url(f"/busy/{n}"))
        body = eventually(lambda: (b := client.get("/api/v1/health").json())["scheduler"][
            "lag"]["max"] > 1 and b)
        assert body["status"] == "degraded" and body["checks"]["scheduler"] == "degraded"
        assert body["scheduler"]["running"] == 1
        assert target.peak["*"] == 1  # max_concurrency holds
    assert "scheduler is behind" in caplog.text


def test_served_website_monitor_goes_up_then_down(served, target):
    key = _owner_key(served)
    api = httpx.Client(base_url=served.url + "/api/v1", headers={"X-API-Key": key})
    created = api.post("/monitors", json={"name": "site", "url": target.url("/site"),
                                          "interval": 1, "timeout": 5})
    assert created.status_code == 201
    url = f"/monitors/{created.json()['id']}"
    # A status is committed after the check that set it, and a monitor is read in one snapshot:
    # a check may show a moment before its status, never after.
    up = eventually(lambda: (m := api.get(url).json())["status"] == "UP" and m["checks"] and m)
    assert up["checks"][0]["statusCode"] == 200
    target.modes["/site"] = "fail"
    down = eventually(lambda: (m := api.get(url).json())["status"] == "DOWN"
                      and m["checks"][0]["status"] == "DOWN" and m)
    assert down["checks"][0]["rootCauseCategory"] == "SERVER_ERROR"
    assert down["_count"]["checks"] >= 3
    api.delete(url)  # the shared server stops probing it

def test_a_regression_verdict_holds_degraded_across_good_checks(sched, target):
    """The detector's DEGRADED is not undone by the next good check, and its all-clear is
    not a second transition: the scheduler takes the worse of the two verdicts."""
    cfg, client = sched
    monitor_id = _create(client, target.url("/r"))
    eventually(lambda: _status(cfg, monitor_id) == "UP")
    rt = client.app.state.statusapp

    async def verdict(slow: bool) -> None:
        await statusapp._set_regression(rt.db, monitor_id, slow, f"slow={slow}", statusapp.now_ms())
        rt.monitor_changed(monitor_id)

    client.portal.call(verdict, True)
    seen = len(_checks(cfg, monitor_id))
    eventually(lambda: len(_checks(cfg, monitor_id)) >= seen + 3)
    assert _status(cfg, monitor_id) == "DEGRADED"
    client.portal.call(verdict, False)
    seen = len(_checks(cfg, monitor_id))
    eventually(lambda: len(_checks(cfg, monitor_id)) >= seen + 2)
    assert _status(cfg, monitor_id) == "UP"
    assert _transitions(cfg, monitor_id) == [("PENDING", "UP", "HTTP 200"),
                                             ("UP", "DEGRADED", "slow=True"),
                                             ("DEGRADED", "UP", "slow=False")]


def test_failing_assertion_makes_the_monitor_down_over_the_api(sched, target):
    cfg, client = sched
    monitor_id = _create(client, target.url("/a"), assertions=[
        {"source": "TEXT_BODY", "comparison": "EQUALS", "target": "ok"},
        {"source": "TEXT_BODY", "comparison": "MATCHES", "target": "^healthy$"}])
    eventually(lambda: _status(cfg, monitor_id) == "DOWN")
    check = client.get(f"/api/v1/monitors/{monitor_id}").json()["checks"][0]
    assert (check["status"], check["rootCauseCategory"]) == ("DOWN", "APPLICATION_ERROR")
    assert [(r["passed"], r["actual"]) for r in check["details"]["assertionResults"]] == \
        [(True, "ok"), (False, "ok")]
    fixed = client.put(f"/api/v1/monitors/{monitor_id}", json={"assertions": [
        {"source": "STATUS_CODE", "comparison": "EQUALS", "target": "200"}]})
    assert fixed.status_code == 200
    eventually(lambda: _status(cfg, monitor_id) == "UP")


def test_checks_inside_a_maintenance_window_run_and_are_marked(sched, target):
    cfg, client = sched
    monitor_id = _create(client, target.url("/m"))
    eventually(lambda: _checks(cfg, monitor_id))
    now = statusapp.now_ms()
    response = client.post("/api/v1/maintenance-windows", json={
        "title": "Swap", "startsAt": statusapp.iso(now), "endsAt": statusapp.iso(now + 3_600_000),
        "monitorIds": [monitor_id]})
    assert response.status_code == 201
    eventually(lambda: sql(cfg, "SELECT 1 FROM checks WHERE monitor_id = ? AND maintenance = 1",
                           (monitor_id,)))
    assert sql(cfg, "SELECT maintenance FROM checks WHERE monitor_id = ? ORDER BY id LIMIT 1",
               (monitor_id,)) == [(0,)]
    assert client.get(f"/api/v1/monitors/{monitor_id}").json()["status"] == "MAINTENANCE"


def test_a_new_or_activated_monitor_is_in_maintenance_from_its_first_check(tmp_path, monkeypatch,
                                                                            notify_http):
    """While a window covering all monitors runs, a monitor is created and an inactive one is
    edited to active, both with targets that are down: from their first check on, checks are marked,
    the status is MAINTENANCE, no incident opens and no alert goes out.  The window service is
    left out: what marks a check must not wait for it to learn of the new monitor."""
    monkeypatch.setattr(statusapp, "SERVICES", tuple(
        s for s in statusapp.SERVICES if s is not statusapp.run_maintenance))
    cfg = _sched_cfg(tmp_path)
    down = f"http://127.0.0.1:{free_port()}/"  # nothing listens: connection refused
    alert = [{"type": "SLACK", "config": {"webhookUrl": f"{notify_http.url}/slack"}}]
    with _app(cfg, new_key(cfg)) as client:
        edited = _create(client, down + "edited", isActive=False, notifications=alert)
        now = statusapp.now_ms()
        _window(client, startsAt=statusapp.iso(now - 60_000), endsAt=statusapp.iso(now + 3_600_000))
        fresh = _create(client, down + "fresh", notifications=alert)
        assert client.put(f"/api/v1/monitors/{edited}", json={"isActive": True}).status_code == 200
        for monitor_id in (fresh, edited):
            eventually(lambda: _status(cfg, monitor_id) == "DOWN" and len(
                _checks(cfg, monitor_id)) >= 3)
            assert client.get(f"/api/v1/monitors/{monitor_id}").json()["status"] == "MAINTENANCE"
        eventually(lambda: not sql(cfg, "SELECT 1 FROM status_transitions"
                                        " WHERE processed_at IS NULL"))
    assert sql(cfg, "SELECT monitor_id, COUNT(*) FROM checks WHERE maintenance = 0"
                    " GROUP BY monitor_id") == []
    assert sql(cfg, "SELECT COUNT(*) FROM incidents") == [(0,)]
    assert sql(cfg, "SELECT COUNT(*) FROM alert_outbox") == [(0,)] and not notify_http.requests


def test_https_certificate_expiring_in_5_days_warns_once(tmp_path, tls_certs, tls_servers,
                                                         notify_http):
    cfg = _sched_cfg(tmp_path, ca_bundle=str(tls_certs[0]))
    with _app(cfg, new_key(cfg)) as client:
        monitor_id = _create(client, f"https://127.0.0.1:{tls_servers['soon']}/",
                             sslCertExpiryDays=14, notifications=[
                                 {"type": "SLACK", "config": {"webhookUrl": notify_http.url}}])
        eventually(lambda: notify_http.requests and len(_checks(cfg, monitor_id)) >= 3)
        seen = len(_checks(cfg, monitor_id))
        eventually(lambda: len(_checks(cfg, monitor_id)) >= seen + 2)
        check = client.get(f"/api/v1/monitors/{monitor_id}").json()["checks"][0]
    assert check["details"]["certificate"]["daysRemaining"] == 5
    assert (check["status"], check["rootCauseCategory"]) == ("DEGRADED", "SSL_CERTIFICATE")
    assert _transitions(cfg, monitor_id) == [
        ("PENDING", "DEGRADED", "certificate expires in 5 days")]
    assert len(notify_http.requests) == 1
    assert "certificate expires in 5 days" in notify_http.requests[0]["body"].decode()


# --- Agent tests ---
#
# One server that probes nothing itself (``[probes] local = false``) and two `statusapp agent`
# subprocesses, regions "east" and "west", share a module: the target refuses what a path
# blocks for the region header a check carries, so one region can fail while the other works.


class _RegionTarget(http.server.BaseHTTPRequestHandler):
    """``blocked[path]`` is the set of regions refused (403) on that path; hits are recorded
    per (path, region)."""

    blocked: dict[str, set[str]]
    hits: Counter

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        region = self.headers.get(statusapp.REGION_HEADER, "")
        self.hits[(self.path, region)] += 1
        refused = region in self.blocked.get(self.path, ())
        self.send_response(403 if refused else 200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


class Agent:
    """`statusapp agent` as a subprocess with its own state directory; ``url``: where it finds
    the server (default: the server's own URL)."""

    def __init__(self, tmp_path: Path, server: Server, token: str, name: str,
                 url: str | None = None) -> None:
        self.server, self.token, self.name = server, token, name
        self.url = url or server.url
        self.state = tmp_path / f"agent-{name}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Agent":
        self.log = open(self.state.parent / f"agent-{self.name}-{time.monotonic_ns()}.err", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "statusapp.py"), "agent", "--server", self.url,
             "--state", str(self.state)], env={**os.environ, "STATUSAPP_AGENT_TOKEN": self.token},
            stderr=self.log, stdout=subprocess.DEVNULL)
        return self

    def buffered(self) -> list[str]:
        """Batch ids in the agent's on-disk buffer."""
        path = self.state / "buffer.db"
        if not path.exists():
            return []
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return [r[0] for r in conn.execute("SELECT batch_id FROM batches ORDER BY seq")]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)
        self.log.close()


class _HoldingProxy:
    """An HTTP relay on loopback between an agent and the server.  While ``hold`` is set, the
    first batch (POST /agent/results) is passed on and stored by the server, but its answer
    never goes back: ``held`` gets (batch, the server's answer) and the agent keeps waiting.
    Every batch passed on is recorded in ``relayed`` as (batch id, the server's answer)."""

    def __init__(self, upstream: str) -> None:
        self.hold = True
        self.held: list[tuple[dict, dict]] = []
        self.relayed: list[tuple[str, dict]] = []
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                answer = httpx.request(self.command, upstream + self.path, headers=headers,
                                       content=body, timeout=60)
                if self.path.endswith("/agent/results"):
                    batch = json.loads(body)
                    proxy.relayed.append((batch["batchId"], answer.json()))
                    if proxy.hold and not proxy.held:
                        proxy.held.append((batch, answer.json()))
                        proxy.release.wait()  # no answer: the agent is killed meanwhile
                        return
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("content-type", ""))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = relay

        self.http = _serve(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        _stop(self.http)


def _add_region(db: str, region_id: str, *options: str) -> str:
    """`statusapp region add`; the token is the last line it prints."""
    result = CliRunner().invoke(statusapp.cli, ["region", "add", region_id, "--name",
                                                region_id.title(), *options, "--db", db])
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


class Fleet:
    """The server, its API, the two agents, the target and a webhook channel's receiver; and
    a second team (not the server's owner) with a webhook channel of its own."""

    def __init__(self, tmp_path: Path) -> None:
        self.server = Server(tmp_path, env={"STATUSAPP_PROBES_LOCAL": "false",
                                            "STATUSAPP_PROBES_RETRY_DELAY": "1",
                                            "STATUSAPP_AGENTS_INACTIVE_AFTER": "2"})
        self.tokens = {r: _add_region(self.server.db, r, "--city", r.title(), "--country-code",
                                      "US" if r == "east" else "IE") for r in ("east", "west")}
        key = new_key({"server": {"database": self.server.db}})
        stranger = new_key({"server": {"database": self.server.db}}, "stranger@example.test")
        self.server.start()
        self.api = httpx.Client(base_url=self.server.url + "/api/v1", headers={"X-API-Key": key})
        handler = type("T", (_RegionTarget,), {"blocked": {}, "hits": Counter()})
        self.http = _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler))
        self.target = handler
        self.receiver = _NotifyReceiver()
        channel = self.api.post("/notifications", json={
            "name": "ops", "type": "WEBHOOK", "config": {"url": self.receiver.url}})
        assert channel.status_code == 201, channel.text
        self.owner_channel = channel.json()["id"]
        self.stranger = _NotifyReceiver()
        assert self.api.post("/notifications", headers={"X-API-Key": stranger}, json={
            "name": "theirs", "type": "WEBHOOK", "config": {"url": self.stranger.url},
        }).status_code == 201
        self.agents = {r: Agent(tmp_path, self.server, t, r).start()
                       for r, t in self.tokens.items()}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}{path}"

    def monitor(self, path: str, blocked: tuple[str, ...] = (), **fields) -> str:
        self.target.blocked[path] = set(blocked)
        response = self.api.post("/monitors", json={"name": path, "url": self.url(path),
                                                    "interval": 1, "timeout": 5, **fields})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def get(self, monitor_id: str) -> dict:
        return self.api.get(f"/monitors/{monitor_id}").json()

    def regions(self) -> dict:
        return {r["id"]: r for r in self.api.get("/worker-regions").json()["regions"]}

    def region_alerts(self, region: str) -> list[str]:
        bodies = [json.loads(r["body"]) for r in list(self.receiver.requests)]
        return [b["event"] for b in bodies if b.get("monitor", {}).get("id") == region]

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        if self.server.proc and self.server.proc.poll() is None:
            self.server.stop()
        self.api.close()
        _stop(self.http)
        self.receiver.close()
        self.stranger.close()


@pytest.fixture(scope="class")
def fleet(tmp_path_factory):
    """The fleet, shared by the tests of one class and stopped after them."""
    fleet = Fleet(tmp_path_factory.mktemp("fleet"))
    eventually(lambda: all(r["isActive"] for r in fleet.regions().values()
                           if r["isAgent"]))
    yield fleet
    fleet.close()


def _incident(fleet: Fleet, monitor_id: str) -> dict:
    incidents = fleet.api.get("/incidents", params={"monitorId": monitor_id}).json()["incidents"]
    return incidents[0] if incidents else {}


class TestAgentFleet:
    """End to end: the server probes nothing; agents east and west do."""

    def test_agents_probe_from_their_regions_and_status_combines_them(self, fleet):
        both = fleet.monitor("/both")
        west_blocked = fleet.monitor("/west-blocked", blocked=("west",))
        all_blocked = fleet.monitor("/all-blocked", blocked=("east", "west"))
        eventually(lambda: fleet.get(both)["status"] == "UP")
        eventually(lambda: fleet.get(all_blocked)["status"] == "DOWN")
        eventually(lambda: fleet.get(west_blocked)["status"] == "DEGRADED")
        # Only agents probed (the server's own region probes nothing), each naming its region.
        regions = {(c["workerRegion"]["id"], c["workerRegion"]["countryCode"])
                   for c in fleet.get(both)["checks"]}
        assert regions == {("east", "US"), ("west", "IE")}
        assert {region for _, region in fleet.target.hits} == {"east", "west"}
        assert _incident(fleet, west_blocked) == {}  # DEGRADED opens no incident
        incident = eventually(lambda: _incident(fleet, all_blocked))
        assert incident["severity"] == "high" and incident["affectedRegions"] == ["east", "west"]
        analytics = fleet.api.get(f"/analytics/monitors/{both}", params={"period": "1h"}).json()
        assert set(analytics["responseTimeByRegion"]) == {"east", "west"}
        page = fleet.api.post("/status-pages", json={"name": "P", "slug": "regions",
                                                     "monitorGroups": [
                                                         {"name": "G", "monitorIds": [west_blocked]}]})
        assert page.status_code == 201, page.text
        summary = httpx.get(fleet.server.url + "/status/regions.json").json()
        assert summary["groups"][0]["monitors"][0]["regions"] == [
            {"region": "East", "status": "UP"}, {"region": "West", "status": "DOWN"}]
        html = httpx.get(fleet.server.url + "/status/regions").text
        assert "East: Operational &middot; West: Outage" in html and "127.0.0.1" not in html
        assert {r: fleet.regions()[r]["isActive"] for r in ("east", "west", "local")} == {
            "east": True, "west": True, "local": False}


    def test_quorum_of_one_region_makes_a_monitor_down_with_medium_severity(self, fleet):
        quorum = fleet.monitor("/quorum", blocked=("west",), downQuorum=1,
                               enabledWorkerRegionIds=["east", "west"])
        assert fleet.get(quorum)["downQuorum"] == 1
        eventually(lambda: fleet.get(quorum)["status"] == "DOWN")
        incident = eventually(lambda: _incident(fleet, quorum))
        assert incident["severity"] == "medium" and incident["affectedRegions"] == ["west"]


    def test_monitors_follow_enabled_regions_and_edits_reach_agents(self, fleet):
        east_only = fleet.monitor("/east-only", enabledWorkerRegionIds=["east"])
        eventually(lambda: fleet.target.hits[("/east-only", "east")] >= 2)
        edited = fleet.api.put(f"/monitors/{east_only}",
                                 json={"url": fleet.url("/edited"), "enabledWorkerRegionIds": []})
        assert edited.status_code == 200, edited.text
        eventually(lambda: fleet.target.hits[("/edited", "west")] >= 1
                   and fleet.target.hits[("/edited", "east")] >= 1)
        assert fleet.target.hits[("/east-only", "west")] == 0
        unknown = fleet.api.post("/monitors", json={"name": "x", "url": fleet.url("/x"),
                                                    "enabledWorkerRegionIds": ["mars"]})
        assert unknown.status_code == 400 and "mars" in unknown.text


    def test_wrong_rotated_and_removed_tokens_and_keys_are_refused(self, fleet):
        def sync(token: str, path: str = "/agent/monitors") -> int:
            return httpx.get(fleet.server.url + "/api/v1" + path,
                             headers={"Authorization": f"Bearer {token}"}).status_code

        def region(*args: str) -> str:
            result = CliRunner().invoke(statusapp.cli, ["region", *args, "--db", fleet.server.db])
            assert result.exit_code == 0, result.output
            return result.output

        token = _add_region(fleet.server.db, "spare")
        key = fleet.api.headers["X-API-Key"]
        assert sync(token) == 200
        assert sync("sa_agent_wrong") == sync(key) == 401  # an API key is no agent token
        for headers in ({}, {"X-API-Key": key}):
            assert httpx.get(fleet.server.url + "/api/v1/agent/monitors",
                             headers=headers).status_code == 401
        assert sync(token, "/monitors") == 401  # and an agent token is no API key
        rotated = region("rotate-token", "spare").strip().splitlines()[-1]
        assert (sync(token), sync(rotated)) == (401, 200)
        listing = region("list")
        assert "spare" in listing and token not in listing and rotated not in listing
        region("remove", "spare")
        assert sync(rotated) == 401


    def test_a_silent_region_goes_inactive_and_back_alerting_once_each_way(self, fleet):
        west_blocked = fleet.monitor("/silent-west", blocked=("west",))
        eventually(lambda: fleet.get(west_blocked)["status"] == "DEGRADED")
        west = fleet.agents["west"].proc
        west.send_signal(signal.SIGSTOP)
        try:
            eventually(lambda: not fleet.regions()["west"]["isActive"])
            # Only east counts now: the monitor is UP, and nothing went DOWN for west's silence.
            eventually(lambda: fleet.get(west_blocked)["status"] == "UP")
            eventually(lambda: fleet.region_alerts("west") == ["monitor.down"])
        finally:
            west.send_signal(signal.SIGCONT)
        eventually(lambda: fleet.regions()["west"]["isActive"])
        eventually(lambda: fleet.get(west_blocked)["status"] == "DEGRADED")
        eventually(lambda: fleet.region_alerts("west") == ["monitor.down", "monitor.up"])
        transitions = [t[1] for t in sql({"server": {"database": fleet.server.db}},
                                         "SELECT old_status, new_status FROM status_transitions"
                                         " WHERE monitor_id = ?", (west_blocked,))]
        assert "DOWN" not in transitions
        assert fleet.region_alerts("east") == []
        # Only the server owner's channels were told: the other team's never were.
        targets = sql({"server": {"database": fleet.server.db}},
                      "SELECT DISTINCT channel_id FROM alert_outbox WHERE monitor_id IS NULL")
        assert targets == [(fleet.owner_channel,)]
        assert fleet.stranger.requests == []


    def test_buffered_results_survive_server_downtime_and_agent_kill_9_exactly_once(self, fleet):
        monitor_id = fleet.monitor("/buffered")
        eventually(lambda: min(fleet.target.hits[("/buffered", r)] for r in ("east", "west")))
        db = {"server": {"database": fleet.server.db}}
        fleet.server.stop()
        down_at = statusapp.now_ms()
        east = fleet.agents["east"]
        eventually(lambda: len(east.buffered()) >= 3)  # probing on, results kept on disk
        eventually(lambda: len(fleet.agents["west"].buffered()) >= 3)  # west too
        east.stop(signal.SIGKILL)
        kept = east.buffered()
        assert len(kept) >= 3
        east.start()
        up_at = statusapp.now_ms()
        fleet.server.start()
        eventually(lambda: not east.buffered() and not fleet.agents["west"].buffered())
        stored = [r[0] for r in sql(db, "SELECT batch_id FROM agent_batches WHERE region_id ="
                                        " 'east' AND batch_id IN (SELECT value FROM json_each(?))",
                                    (json.dumps(kept),))]
        assert sorted(stored) == sorted(kept)  # every buffered batch arrived
        duplicates = sql(db, "SELECT region_id, agent_checked_at, COUNT(*) FROM checks"
                             " WHERE monitor_id = ? GROUP BY 1, 2 HAVING COUNT(*) > 1",
                             (monitor_id,))
        assert duplicates == []  # and none twice
        probed_while_down = sql(db, "SELECT COUNT(*) FROM checks WHERE monitor_id = ? AND"
                                    " region_id = 'west' AND checked_at BETWEEN ? AND ?",
                                (monitor_id, down_at, up_at))[0][0]
        assert probed_while_down >= 2  # west kept probing; its results came after the restart
        west = fleet.agents["west"]
        west.stop()  # SIGTERM: a clean stop that keeps its last checks in the buffer
        assert west.proc.returncode == 0
        west.start()
        eventually(lambda: fleet.regions()["east"]["isActive"])


def test_an_agent_killed_while_its_batch_is_in_flight_sends_it_again_stored_once(tmp_path):
    """The server stores a batch, the agent is killed with `kill -9` before the answer reaches
    it (a relay holds it back), and the restarted agent sends the same batch again: the server
    acknowledges it without storing anything twice."""
    server = Server(tmp_path, env={"STATUSAPP_PROBES_LOCAL": "false",
                                   "STATUSAPP_AGENTS_INACTIVE_AFTER": "2"})  # no long-polls
    token = _add_region(server.db, "relay")
    key = new_key({"server": {"database": server.db}})
    server.start()
    handler = type("T", (_RegionTarget,), {"blocked": {}, "hits": Counter()})
    target = _serve(ThreadingHTTPServer(("127.0.0.1", 0), handler))
    proxy = _HoldingProxy(server.url)
    agent = Agent(tmp_path, server, token, "relay", url=proxy.url).start()
    db = {"server": {"database": server.db}}
    try:
        created = httpx.post(server.url + "/api/v1/monitors", headers={"X-API-Key": key}, json={
            "name": "m", "url": f"http://127.0.0.1:{target.server_address[1]}/", "interval": 1})
        assert created.status_code == 201, created.text
        batch, answer = eventually(lambda: proxy.held and proxy.held[0])
        assert answer["stored"] == len(batch["results"]) >= 1  # the server has it
        assert sql(db, "SELECT COUNT(*) FROM agent_batches WHERE batch_id = ?",
                   (batch["batchId"],)) == [(1,)]
        agent.stop(signal.SIGKILL)
        assert agent.buffered()[0] == batch["batchId"]  # the agent never heard it arrived
        proxy.hold = False
        agent = Agent(tmp_path, server, token, "relay", url=proxy.url).start()
        eventually(lambda: batch["batchId"] not in agent.buffered())
        again = [a for b, a in proxy.relayed if b == batch["batchId"]]
        assert again == [answer, {**answer, "stored": 0}]  # sent again, stored once
        stamps = [r["checkedAt"] for r in batch["results"]]
        rows = sql(db, "SELECT agent_checked_at, COUNT(*) FROM checks WHERE region_id = 'relay'"
                       " AND agent_checked_at IN (SELECT value FROM json_each(?))"
                       " GROUP BY 1", (json.dumps(stamps),))
        assert sorted(rows) == sorted((at, 1) for at in stamps)
        assert sql(db, "SELECT agent_checked_at FROM checks GROUP BY 1 HAVING COUNT(*) > 1") == []
    finally:
        agent.stop()
        proxy.close()
        _stop(target)
        server.stop()


def test_a_batch_sent_twice_is_stored_once_and_skewed_clocks_neither_misdate_nor_reorder(
        tmp_path):
    cfg = make_cfg(tmp_path, probes={"local": False})
    key = new_key(cfg)
    tokens = {r: _add_region(cfg["server"]["database"], r) for r in ("fast", "slow")}
    with _app(cfg, key) as client:
        monitor_id = client.post("/api/v1/monitors", json={
            "name": "m", "url": "http://127.0.0.1:9/"}).json()["id"]
        now = statusapp.now_ms()

        def post(region: str, skew: int, batch: str, ago: int) -> dict:
            result = {"monitorId": monitor_id, "checkedAt": now - ago + skew, "status": "UP",
                      "regionStatus": "UP", "responseTime": 5}
            response = client.post("/api/v1/agent/results", headers={
                "Authorization": f"Bearer {tokens[region]}", "X-API-Key": ""}, json={
                "batchId": batch, "sentAt": statusapp.now_ms() + skew, "results": [result]})
            assert response.status_code == 200, response.text
            return response.json()

        # "fast" runs 5 minutes ahead and checked first; "slow" 5 minutes behind, 1 s later.
        assert post("fast", 300_000, "batch-fast-1", 2_000)["stored"] == 1
        assert post("slow", -300_000, "batch-slow-1", 1_000)["stored"] == 1
        assert post("fast", 300_000, "batch-fast-1", 2_000)["stored"] == 0
        rows = sql(cfg, "SELECT region_id, checked_at, received_at, agent_checked_at FROM checks"
                        " WHERE monitor_id = ? ORDER BY checked_at", (monitor_id,))
        assert [r[0] for r in rows] == ["fast", "slow"]
        for region, checked_at, received_at, agent_at in rows:
            expected = now - (2_000 if region == "fast" else 1_000)
            assert abs(checked_at - expected) < 1_000 and checked_at <= received_at
            assert abs(agent_at - checked_at) > 250_000  # the agent's own (skewed) stamp
        check = client.get(f"/api/v1/monitors/{monitor_id}").json()["checks"][0]
        assert check["receivedAt"] is not None


def test_the_specs_create_monitor_example_works_with_regions_that_exist(cfg, key):
    tokens = {r: _add_region(cfg["server"]["database"], r)
              for r in ("region_us_east", "region_eu_west", "region_ap_south")}
    with _app(cfg, key) as client:
        response = client.post("/api/v1/monitors", json={
            "name": "My API Monitor", "url": "https://api.example.com/health", "type": "API",
            "interval": 300, "timeout": 30, "expectedStatusCode": 200, "httpMethod": "GET",
            "enabledWorkerRegionIds": ["region_us_east", "region_eu_west"],
            "regressionEnabled": True, "regressionThreshold": 50,
            "notifications": [{"type": "EMAIL", "enabled": True,
                               "config": {"emails": ["alerts@example.com"]}}]})
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["enabledWorkerRegionIds"] == ["region_us_east", "region_eu_west"]
        assert body["downQuorum"] is None
        assert {"id", "name", "url", "type", "status", "createdAt", "heartbeatUrl",
                "monitorNotifications"} <= set(body)
        assert [n["type"] for n in body["monitorNotifications"]] == ["EMAIL"]
        regions = {r["id"]: r for r in client.get("/api/v1/worker-regions").json()["regions"]}
        assert regions["region_us_east"]["isAgent"] and not regions["region_us_east"]["isActive"]

        def given_to(region: str) -> list[str]:
            sync = client.get("/api/v1/agent/monitors", headers={
                "Authorization": f"Bearer {tokens[region]}", "X-API-Key": ""})
            assert sync.status_code == 200, sync.text
            return [m["record"]["id"] for m in sync.json()["monitors"]]

        # The agents of the two named regions probe it; a third region's agent does not.
        assert given_to("region_us_east") == given_to("region_eu_west") == [body["id"]]
        assert given_to("region_ap_south") == []


def test_removing_a_region_drops_it_from_monitors_but_not_from_their_only_region(cfg, key):
    db = cfg["server"]["database"]
    for region in ("home", "vps"):
        _add_region(db, region)
    with _app(cfg, key) as client:
        def create(regions: list[str]) -> str:
            response = client.post("/api/v1/monitors", json={
                "name": f"m {regions}", "url": "http://127.0.0.1:9/",
                "enabledWorkerRegionIds": regions})
            assert response.status_code == 201, response.text
            return response.json()["id"]

        both, home_only, everywhere = create(["home", "vps"]), create(["home"]), create([])

        def regions_of(monitor_id: str) -> list[str]:
            return client.get(f"/api/v1/monitors/{monitor_id}").json()["enabledWorkerRegionIds"]

        refused = CliRunner().invoke(statusapp.cli, ["region", "remove", "home", "--db", db])
        assert refused.exit_code == 1 and home_only in refused.output
        assert "only enabled region" in refused.output and both not in refused.output
        assert regions_of(both) == ["home", "vps"]  # nothing was removed
        assert "home" in cli(cfg, "region", "list")
        assert client.put(f"/api/v1/monitors/{home_only}", json={
            "enabledWorkerRegionIds": ["vps"]}).status_code == 200
        removed = cli(cfg, "region", "remove", "home")
        assert both in removed and home_only not in removed and everywhere not in removed
        assert "home" not in cli(cfg, "region", "list")
        assert [regions_of(m) for m in (both, home_only, everywhere)] == [["vps"], ["vps"], []]
        edited = client.put(f"/api/v1/monitors/{both}", json={"name": "still editable"})
        assert edited.status_code == 200, edited.text
    missing = CliRunner().invoke(statusapp.cli, ["region", "remove", "home", "--db", db])
    assert missing.exit_code == 1 and "no agent region with id home" in missing.output


def test_agents_with_clocks_5_minutes_off_neither_misdate_nor_reorder(tmp_path, monkeypatch):
    """The agent's own feed, buffer and sender, with its clock moved by +-5 minutes, against
    a served StatusApp whose clock is right."""
    server = Server(tmp_path, env={"STATUSAPP_PROBES_LOCAL": "false"})
    tokens = {r: _add_region(server.db, r) for r in ("ahead", "behind")}
    key = new_key({"server": {"database": server.db}})
    server.start()
    real_now = statusapp.now_ms
    try:
        monitor_id = httpx.post(server.url + "/api/v1/monitors", headers={"X-API-Key": key},
                                json={"name": "m", "url": "http://127.0.0.1:9/"}).json()["id"]

        async def agent(region: str, skew: int, ago: int) -> None:
            buffer = statusapp.AgentBuffer(tmp_path / region / "buffer.db", 100)
            async with httpx.AsyncClient(base_url=server.url + "/api/v1", headers={
                    "Authorization": f"Bearer {tokens[region]}"}) as client:
                feed = statusapp.AgentFeed(client, buffer)
                await feed.sync(0)
                assert list(feed.monitors) == [monitor_id]
                monkeypatch.setattr(statusapp, "now_ms", lambda: real_now() + skew)
                feed.record(monitor_id, statusapp.CheckResult("UP", 5), real_now() + skew - ago,
                            "UP", "HTTP 200")
                feed.keep()
                await feed.send_buffered()
            assert buffer.oldest() is None
            buffer.close()

        started = real_now()
        asyncio.run(agent("ahead", 300_000, 2_000))    # checked first, clock 5 min ahead
        asyncio.run(agent("behind", -300_000, 1_000))  # checked 1 s later, clock 5 min behind
        rows = sql({"server": {"database": server.db}},
                   "SELECT region_id, checked_at, received_at, agent_checked_at FROM checks"
                   " WHERE monitor_id = ? ORDER BY checked_at", (monitor_id,))
        assert [r[0] for r in rows] == ["ahead", "behind"]
        for region, checked_at, received_at, agent_at in rows:
            assert started - 2_500 <= checked_at <= received_at <= real_now()
            assert abs(agent_at - checked_at) > 250_000  # the agent's own reading, kept
    finally:
        server.stop()


def test_agent_buffer_is_bounded_ordered_and_survives_reopening(tmp_path):
    buffer = statusapp.AgentBuffer(tmp_path / "state" / "buffer.db", limit=5)
    for n in range(3):
        buffer.add([{"n": n, "i": i} for i in range(2)])
    assert buffer.pending() == 4  # the oldest batch was dropped to stay within 5 results
    buffer.close()
    reopened = statusapp.AgentBuffer(tmp_path / "state" / "buffer.db", limit=5)
    seq, batch_id, results = reopened.oldest()
    assert [r["n"] for r in results] == [1, 1]
    reopened.done(seq)
    assert reopened.oldest()[2][0]["n"] == 2 and reopened.oldest()[1] != batch_id
    reopened.close()


def test_an_agent_loads_neither_dnspython_nor_assertion_or_email_packages_until_used(tmp_path):
    """What an idle agent holds in memory: the module and its ProbeContext leave dnspython,
    regex, the JSONPath package and smtplib unimported (some 7 MB) until a check needs them."""
    code = ("import sys, statusapp\n"
            "cfg = statusapp.load_config(None, {})\n"
            "ctx = statusapp.ProbeContext(cfg)\n"
            "heavy = ('dns', 'regex', 'jsonpath_rfc9535', 'smtplib')\n"
            "print(' '.join(m for m in heavy if m in sys.modules))\n"
            "ctx.resolver\n"
            "print('dns' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out == ["", "True"]

@pytest.mark.parametrize("statuses, regions, quorum, expected", [
    (["DOWN", "DOWN"], 2, None, "DOWN"),
    (["DOWN", "UP"], 2, None, "DEGRADED"),
    (["DOWN", "UP"], 2, 1, "DOWN"),
    (["DOWN", "PENDING"], 2, None, "DEGRADED"),
    (["DOWN"], 1, 3, "DOWN"),
    (["UP", "DEGRADED"], 2, None, "DEGRADED"),
    (["UP", "UP", "DOWN"], 3, 2, "DEGRADED"),
    (["PENDING"], 1, None, None),
])
def test_combined_status_follows_the_quorum(statuses, regions, quorum, expected):
    assert statusapp.combined_status(statuses, regions, quorum) == expected


# --- Heartbeat tests ---


def _hb_api(srv: Server) -> httpx.Client:
    """An API client for a served instance, with its first-run owner key."""
    key = _owner_key(srv)
    return httpx.Client(base_url=srv.url + "/api/v1", headers={"X-API-Key": key}, timeout=10)


def _cron(api: httpx.Client, **fields) -> dict:
    response = api.post("/monitors", json={"name": "backup", "type": "CRON", "interval": 60,
                                           "gracePeriod": 60, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def _beats(api: httpx.Client, monitor: dict, **query) -> dict:
    response = api.get(f"/monitors/{monitor['id']}/heartbeats", params=query)
    assert response.status_code == 200, response.text
    return response.json()


def _status_after(api: httpx.Client, monitor: dict, status: str) -> float:
    """Wait until the monitor has ``status``; return when that was seen (monotonic)."""
    eventually(lambda: api.get(f"/monitors/{monitor['id']}").json()["status"] == status)
    return time.monotonic()


def test_heartbeat_service_is_told_of_cron_monitors_only(cfg, key, monkeypatch):
    """Creating or editing a monitor the API knows is no CRON monitor gives the deadline service
    nothing to read; a CRON one, and an edit of one it knows, are queued for it."""
    monkeypatch.setattr(statusapp, "SERVICES", ())  # nothing consumes the queue meanwhile
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        beats = client.app.state.statusapp.heartbeats
        site = client.post("/api/v1/monitors", json={"name": "site", "type": "WEBSITE",
                                                     "url": "https://example.com"}).json()
        assert client.put(f"/api/v1/monitors/{site['id']}", json={"name": "site 2"}).is_success
        assert beats._dirty == set()
        cron = client.post("/api/v1/monitors", json={"name": "job", "type": "CRON",
                                                     "interval": 60}).json()
        assert beats._dirty == {cron["id"]}
        client.portal.call(beats.reload_changed)
        assert beats.known(cron["heartbeatUrl"].rsplit("/", 1)[1]) is not None
        assert client.put(f"/api/v1/monitors/{cron['id']}", json={
            "type": "WEBSITE", "url": "https://example.com"}).is_success
        assert beats._dirty == {cron["id"]}
        client.portal.call(beats.reload_changed)
        assert beats.known(cron["heartbeatUrl"].rsplit("/", 1)[1]) is None


def test_heartbeat_every_route_and_method_answers_ok_after_commit(served):
    api = _hb_api(served)
    monitor = _cron(api)
    url = monitor["heartbeatUrl"]
    assert url == f"{served.url}/api/v1/heartbeat/{monitor['heartbeatUrl'].rsplit('/', 1)[1]}"
    assert monitor["status"] == "PENDING"
    calls = [("GET", ""), ("POST", ""), ("HEAD", ""), ("GET", "/start"), ("POST", "/start")]
    for method, suffix in calls:
        response = httpx.request(method, url + suffix)
        assert response.status_code == 200
        assert response.content == (b"" if method == "HEAD" else b'{"message":"OK"}')
        assert response.headers["content-type"] == "application/json"
    other = _cron(api)["heartbeatUrl"]
    for method, suffix in [("GET", "/fail"), ("POST", "/fail"), ("POST", "/log")]:
        assert httpx.request(method, other + suffix).json() == {"message": "OK"}
    assert httpx.get(other + "/log").status_code == 405
    kinds = [b["kind"] for b in _beats(api, monitor)["heartbeats"]]
    assert kinds == ["start", "start", "success", "success", "success"]  # newest first
    assert api.get(f"/monitors/{monitor['id']}").json()["status"] == "UP"


def _in_busy_wait(pid: int) -> list[int]:
    """The threads of process ``pid`` asleep in clock_nanosleep: how SQLite's busy handler waits
    for another connection's lock (the event loop waits in epoll, the others on futexes)."""
    numbers = _CLOCK_NANOSLEEP[platform.machine()]
    tasks = Path(f"/proc/{pid}/task")
    return [int(t.name) for t in tasks.iterdir()
            if (t / "syscall").read_text().split()[0] in numbers]


# Linux syscall numbers of clock_nanosleep (32-bit ARM: also its 64-bit-time variant)
_CLOCK_NANOSLEEP = {"x86_64": ("230",), "aarch64": ("115",), "armv7l": ("265", "407")}


def test_ping_waits_out_another_process_write_lock_off_the_event_loop(server):
    """Pings commit on the event loop's own thread only when they can at once: while another
    process holds the write lock, the ping's commit waits in the writer's thread and the server
    goes on answering; once the lock is released the ping is stored and acknowledged."""
    api = _hb_api(server)
    monitor = _cron(api)
    assert httpx.get(monitor["heartbeatUrl"]).status_code == 200
    other = sqlite3.connect(server.db, isolation_level=None, timeout=30)
    other.execute("BEGIN IMMEDIATE")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ping = pool.submit(httpx.post, monitor["heartbeatUrl"], content=b"while locked",
                           timeout=60)
        sleepers = eventually(lambda: _in_busy_wait(server.proc.pid))
        assert server.proc.pid not in sleepers  # not the event loop's thread
        assert api.get(f"/monitors/{monitor['id']}").json()["status"] == "UP"
        assert not ping.done()
        other.execute("ROLLBACK")
        assert ping.result().status_code == 200
    assert [b["message"] for b in _beats(api, monitor)["heartbeats"]] == ["while locked", None]


def test_a_response_leaves_in_one_write(server):
    """uvicorn writes a response's head and body apart; the server sends them as one write
    (one TCP segment, one wake-up of the client), counted on its event loop's thread."""
    loop_io = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/io")

    def writes() -> int:
        return int(re.search(r"^syscw: (\d+)$", loop_io.read_text(), re.M).group(1))
    with httpx.Client(base_url=server.url) as client:  # one keep-alive connection
        assert client.get("/api/v1/health").status_code == 200
        before = writes()
        for _ in range(20):
            assert client.get("/api/v1/health").content
        assert writes() - before < 30  # two writes each would be 40


def test_forwarded_for_from_an_untrusted_peer_is_not_believed(served):
    """With no trusted proxies, a client on the server's own host that sends X-Forwarded-For is
    still itself: as a ping's source IP and as the rate-limit window of a request without a key
    (uvicorn would believe any peer on 127.0.0.1)."""
    api = _hb_api(served)
    monitor = _cron(api)
    spoof = {"X-Forwarded-For": "203.0.113.9"}
    assert httpx.post(monitor["heartbeatUrl"], headers=spoof).status_code == 200
    assert [b["sourceIp"] for b in _beats(api, monitor)["heartbeats"]] == ["127.0.0.1"]
    left = [int(httpx.get(served.url + "/api/v1/monitors", headers={
        "X-Forwarded-For": f"203.0.113.{n}"}).headers["x-ratelimit-remaining"]) for n in (1, 2)]
    assert left[1] == left[0] - 1  # one window, whatever the header says


def test_heartbeat_head_pings_every_route_that_takes_get(served):
    """Healthchecks takes HEAD on its ping URLs, so monitoring wrappers that only HEAD work:
    each route that answers GET answers HEAD alike (no body) and the ping counts the same."""
    api = _hb_api(served)
    monitor = _cron(api)
    url, db = monitor["heartbeatUrl"], {"server": {"database": served.db}}
    for suffix, status in [("/start", "PENDING"), ("/3", "DOWN"), ("/0", "UP"), ("/fail", "DOWN"),
                           ("", "UP")]:
        response = httpx.head(url + suffix)
        assert (response.status_code, response.content) == (200, b""), suffix
        assert response.headers["content-type"] == "application/json"
        assert api.get(f"/monitors/{monitor['id']}").json()["status"] == status, suffix
    assert [(b["kind"], b["exitCode"]) for b in _beats(api, monitor)["heartbeats"]] == [
        ("success", None), ("fail", None), ("success", 0), ("fail", 3), ("start", None)]
    assert sql(db, "SELECT new_status, reason FROM status_transitions WHERE monitor_id = ?"
                   " ORDER BY id", (monitor["id"],)) == [
        ("DOWN", "job exited with code 3"), ("UP", None), ("DOWN", "job reported failure"),
        ("UP", None)]
    for suffix, code in [("/log", 405), ("/256", 404)]:  # as GET answers them
        assert httpx.head(url + suffix).status_code == httpx.get(url + suffix).status_code == code


def test_heartbeat_unknown_and_non_cron_ids_are_404(served):
    api = _hb_api(served)
    website = api.post("/monitors", json={"name": "w", "url": "http://127.0.0.1:9/"}).json()
    cron = _cron(api)
    token = cron["heartbeatUrl"].rsplit("/", 1)[1]
    assert api.put(f"/monitors/{cron['id']}", json={"type": "WEBSITE",
                                                    "url": "http://127.0.0.1:9/"}).status_code == 200
    for ident in ("nope", website["id"], token):
        response = httpx.post(f"{served.url}/api/v1/heartbeat/{ident}", json={"message": "x"})
        assert response.status_code == 404
        assert response.json()["code"] == "NOT_FOUND"
    assert sql({"server": {"database": served.db}}, "SELECT COUNT(*) FROM heartbeats"
               " WHERE monitor_id IN (?, ?)", (website["id"], cron["id"])) == [(0,)]


def test_heartbeat_bodies_text_json_and_the_10kb_limit(served):
    api = _hb_api(served)
    first, second = _cron(api), _cron(api)
    url = first["heartbeatUrl"]
    at_limit = json.dumps({"message": "m" * (10_240 - len('{"message": ""}'))})
    assert len(at_limit) == 10_240
    assert httpx.post(url, content=at_limit).status_code == 200
    over = httpx.post(url + "/log", content="x" * 10_241)
    assert over.status_code == 413 and over.json()["code"] == "PAYLOAD_TOO_LARGE"
    assert httpx.post(url + "/log", content="plain text line\n").status_code == 200
    assert httpx.post(url + "/log", content='{"message": broken').status_code == 200
    assert httpx.post(url + "/fail", json={"error": "disk full"},
                      headers={"User-Agent": "u" * 500}).status_code == 200
    # curl -d sends the spec's JSON example form-encoded; the text is still found.
    assert httpx.post(second["heartbeatUrl"] + "/fail", content='{"error": "Backup script failed"}',
                      headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 200
    rows = _beats(api, first)["heartbeats"]
    assert [r["message"] for r in rows] == ["disk full", '{"message": broken', "plain text line",
                                            "m" * (10_240 - 15)]
    assert rows[0]["userAgent"] == "u" * 200
    assert rows[0]["sourceIp"] == "127.0.0.1"
    assert _beats(api, second)["heartbeats"][0]["message"] == "Backup script failed"
    assert _beats(api, first, kind="log", limit=1)["pagination"] == {
        "total": 2, "page": 1, "limit": 1, "totalPages": 2}


def test_heartbeat_rate_limit_is_five_a_minute_per_monitor(served):
    api = _hb_api(served)
    monitor, other = _cron(api), _cron(api)
    for i in range(5):
        assert httpx.get(monitor["heartbeatUrl"]).status_code == 200
    refused = httpx.post(monitor["heartbeatUrl"] + "/log", content="sixth")
    assert refused.status_code == 429
    assert refused.json()["code"] == "RATE_LIMIT_EXCEEDED"
    assert 55 <= int(refused.headers["Retry-After"]) <= 60
    assert httpx.get(other["heartbeatUrl"]).status_code == 200  # per monitor
    assert _beats(api, monitor)["pagination"]["total"] == 5


def test_heartbeat_rate_window_slides(client):
    rt = client.app.state.statusapp
    now = [1000.0]
    rt.heartbeats.clock = lambda: now[0]
    url = "/api/v1/heartbeat/" + client.post("/api/v1/monitors", json={
        "name": "j", "type": "CRON"}).json()["heartbeatUrl"].rsplit("/", 1)[1]
    for step in range(5):
        assert client.post(url + "/log", content="x").status_code == 200
        now[0] += 10
    assert client.post(url + "/log", content="x").status_code == 429  # 5 in the last 50 s
    now[0] = 1060.0  # the first ping has left the window, the others have not
    assert client.post(url + "/log", content="x").status_code == 200
    assert client.post(url + "/log", content="x").status_code == 429


def test_heartbeat_state_pings_past_the_limit_still_change_the_monitor(client):
    """The spec's three examples (start, success; start, fail) back to back and more: past the
    log limit a success or fail is not logged but is never lost; only log messages get 429."""
    monitor = client.post("/api/v1/monitors", json={"name": "j", "type": "CRON"}).json()
    url = "/api/v1/heartbeat/" + monitor["heartbeatUrl"].rsplit("/", 1)[1]
    answers = [client.get(url + suffix) for suffix in ("/start", "", "/start", "", "/start")]
    assert [a.json() for a in answers] == [{"message": "OK"}] * 5
    assert [a.headers["X-RateLimit-Remaining"] for a in answers] == ["4", "3", "2", "1", "0"]
    failed = client.post(url + "/fail", json={"error": "Backup script failed"})
    assert (failed.status_code, failed.json()) == (200, {"message": "OK", "logged": False})
    assert failed.headers["X-RateLimit-Remaining"] == "0" and "Retry-After" in failed.headers
    body = client.get(f"/api/v1/monitors/{monitor['id']}").json()
    assert body["status"] == "DOWN" and body["checks"][0]["error"] == "Backup script failed"
    assert client.get(url).json() == {"message": "OK", "logged": False}
    assert client.get(f"/api/v1/monitors/{monitor['id']}").json()["status"] == "UP"
    refused = client.post(url + "/log", content="progress")
    assert refused.status_code == 429 and refused.headers["X-RateLimit-Remaining"] == "0"
    logged = client.get(f"/api/v1/monitors/{monitor['id']}/heartbeats").json()["heartbeats"]
    assert len(logged) == 5
    row = sql(client.app.state.statusapp.cfg, "SELECT last_success_at, job_started_at FROM"
              " monitors WHERE id = ?", (monitor["id"],))[0]
    assert row[0] is not None and row[1] is None  # the unlogged success still set the clocks


def test_heartbeat_exit_code_pings(client):
    monitor = client.post("/api/v1/monitors", json={"name": "j", "type": "CRON"}).json()
    url = "/api/v1/heartbeat/" + monitor["heartbeatUrl"].rsplit("/", 1)[1]
    status = lambda: client.get(f"/api/v1/monitors/{monitor['id']}").json()
    assert client.get(url + "/0").json() == {"message": "OK"}
    assert status()["status"] == "UP"
    assert client.post(url + "/3").status_code == 200
    assert status()["status"] == "DOWN" and status()["checks"][0]["error"] == "job exited with code 3"
    assert client.post(url + "/255", content="disk full").status_code == 200
    assert status()["checks"][0]["error"] == "disk full"
    beats = client.get(f"/api/v1/monitors/{monitor['id']}/heartbeats").json()["heartbeats"]
    assert [(b["kind"], b["exitCode"]) for b in beats] == [("fail", 255), ("fail", 3),
                                                           ("success", 0)]
    for bad in ("/256", "/-1", "/x1"):
        assert client.get(url + bad).status_code == 404
    assert client.get(url + "/log").status_code == 405


def test_heartbeat_checks_past_the_view_are_stored_as_through_it(cfg, client, monkeypatch):
    """A monitor's first ping check goes through the checks view (whose trigger makes the
    monitor's key); once the heartbeat service has read the key, checks go straight into
    check_rows, and read back the same: the columns, the latest check and the check count."""
    through_view = []
    view = statusapp.check_statements
    monkeypatch.setattr(statusapp, "check_statements",
                        lambda *args: through_view.append(args) or view(*args))
    monitor = client.post("/api/v1/monitors", json={"name": "j", "type": "CRON"}).json()
    url = "/api/v1/heartbeat/" + monitor["heartbeatUrl"].rsplit("/", 1)[1]

    def ping(path: str = "") -> bool:
        """Ping; whether its check went past the view."""
        before = len(through_view)
        assert client.post(url + path, content="run").status_code == 200
        return len(through_view) == before
    assert not ping()
    eventually(ping)  # UP checks until the key is known
    assert ping("/3") and ping()  # DOWN with its text, then UP again
    rows = sql(cfg, "SELECT id, region_id, status, response_time, status_code, error, category,"
                    " timings, details, received_at = checked_at, agent_checked_at, maintenance"
                    " FROM checks WHERE monitor_id = ? ORDER BY id", (monitor["id"],))
    region = cfg["region"]["id"]
    up = (region, "UP", None, None, None, None, None,
          '{"heartbeat": "success", "duration": null, "exitCode": null}', 1, None, 0)
    down = (region, "DOWN", None, None, "run", "APPLICATION_ERROR", None,
            '{"heartbeat": "fail", "duration": null, "exitCode": 3}', 1, None, 0)
    assert [row[1:] for row in rows] == [up] * (len(rows) - 2) + [down, up]
    assert sql(cfg, "SELECT check_id FROM monitor_latest WHERE monitor_id = ?",
               (monitor["id"],)) == [(rows[-1][0],)]
    assert sql(cfg, "SELECT check_count FROM monitors WHERE id = ?",
               (monitor["id"],)) == [(len(rows),)]
    answer = client.get(f"/api/v1/monitors/{monitor['id']}").json()
    assert answer["status"] == "UP" and answer["checks"][0]["id"] == f"chk_{rows[-1][0]}"


def test_heartbeat_pings_of_known_monitors_skip_routing_and_answer_alike(client, monkeypatch):
    """A ping of a monitor already in memory is answered before routing (answer_ping), with
    the route's answer: body, content type, CORS and rate-limit headers, and its errors."""
    routed: list[bool] = []  # a True in turn sends the next ping through the routes
    answered: list[bool] = []
    answer = statusapp.answer_ping

    async def switch(*args):
        answered.append(not routed.pop(0) and await answer(*args))
        return answered[-1]
    monkeypatch.setattr(statusapp, "answer_ping", switch)
    monitor = client.post("/api/v1/monitors", json={"name": "j", "type": "CRON"}).json()
    url = "/api/v1/heartbeat/" + monitor["heartbeatUrl"].rsplit("/", 1)[1]
    routed.append(True)
    assert client.get(url + "/start").status_code == 200  # the route loads the monitor

    def twice(method: str, path: str, body: str) -> list[httpx.Response]:
        """The same ping through the routes, then answered directly."""
        routed[:], answered[:] = [True, False], []
        answers = [client.request(method, path, content=body) for _ in range(2)]
        assert answered == [False, True]
        return answers

    def same(answers: list[httpx.Response]) -> None:
        first, second = ({k: v for k, v in a.headers.items()
                          if k not in ("x-ratelimit-remaining", "x-ratelimit-reset",
                                       "retry-after")}
                         for a in answers)
        assert first == second and answers[0].content == answers[1].content
        assert first["access-control-allow-origin"] == "*"

    ok = twice("POST", url, "done")
    same(ok)
    assert ok[0].json() == {"message": "OK"} and "x-ratelimit-limit" in ok[0].headers
    assert [a.headers["x-ratelimit-remaining"] for a in ok] == ["3", "2"]
    too_big = twice("POST", url + "/log", "x" * 10_241)
    same(too_big)
    assert too_big[0].status_code == 413
    routed[:] = [False, False]
    assert all(client.post(url + "/log", content="fill").status_code == 200 for _ in "12")
    throttled = twice("POST", url + "/log", "six")
    same(throttled)
    assert throttled[0].status_code == 429
    beats = client.get(f"/api/v1/monitors/{monitor['id']}/heartbeats").json()["heartbeats"]
    assert [(b["kind"], b["message"]) for b in beats] == [("log", "fill")] * 2 + [
        ("success", "done")] * 2 + [("start", None)]


@pytest.mark.parametrize("path, method, target", [
    ("abc", "POST", ("abc", "success", None)), ("abc", "HEAD", None),
    ("abc/start", "GET", ("abc", "start", None)), ("abc/log", "GET", None),
    ("abc/log", "POST", ("abc", "log", None)), ("abc/0", "GET", ("abc", "success", 0)),
    ("abc/255", "POST", ("abc", "fail", 255)), ("abc/256", "GET", None),
    ("abc/\u00b2", "GET", None), ("abc/", "GET", None), ("abc/start/x", "GET", None),
    ("", "GET", None), ("abc/other", "GET", None)])
def test_heartbeat_direct_path_takes_exactly_the_ping_routes(path, method, target):
    assert statusapp.ping_target("/api/v1/heartbeat/" + path, method) == target


def test_heartbeat_source_ip_trusts_forwarded_for_only_from_proxies(tmp_path):
    cfg = make_cfg(tmp_path, server={"trusted_proxies": ["10.0.0.0/8"]})

    def source(peer: str, forwarded: str) -> str:
        scope = {"type": "http", "client": (peer, 1234),
                 "headers": [(b"x-forwarded-for", forwarded.encode())]}
        return statusapp.Runtime(cfg).clients.of(statusapp.Request(scope))
    assert source("10.1.2.3", "203.0.113.9, 10.9.9.9") == "203.0.113.9"
    assert source("192.0.2.1", "203.0.113.9") == "192.0.2.1"
    assert source("10.1.2.3", "") == "10.1.2.3"


def test_heartbeat_start_success_duration_fail_down_and_checks(served):
    api = _hb_api(served)
    monitor = _cron(api)
    url = monitor["heartbeatUrl"]
    httpx.get(url + "/start")
    started = time.monotonic()  # the start ping has been received (ms stored, hence the - 1)
    _beats(api, monitor)  # the job runs for at least one request
    took = time.monotonic() - started
    httpx.post(url, json={"message": "1.2GB"})
    success = _beats(api, monitor)["heartbeats"][0]
    received = dict(sql({"server": {"database": served.db}}, "SELECT kind, received_at FROM"
                        " heartbeats WHERE monitor_id = ?", (monitor["id"],)))
    assert success["kind"] == "success"
    assert success["duration"] == received["success"] - received["start"] > took * 1000 - 1
    assert api.get(f"/monitors/{monitor['id']}").json()["status"] == "UP"
    httpx.post(url + "/fail", json={"error": "Database connection timeout after 30s"})
    body = api.get(f"/monitors/{monitor['id']}").json()
    assert body["status"] == "DOWN"
    assert body["_count"]["checks"] == 2  # the success and the fail; start is not a check
    assert body["checks"][0]["error"] == "Database connection timeout after 30s"
    reasons = sql({"server": {"database": served.db}},
                  "SELECT old_status, new_status, reason FROM status_transitions"
                  " WHERE monitor_id = ? ORDER BY id", (monitor["id"],))
    assert reasons == [("PENDING", "UP", None),
                       ("UP", "DOWN", "Database connection timeout after 30s")]


def test_heartbeat_missed_and_unfinished_jobs_go_down_on_time(served):
    api = _hb_api(served)
    missed = _cron(api, interval=1, gracePeriod=1)
    job = _cron(api, interval=600, gracePeriod=1)
    quiet = _cron(api, interval=1, gracePeriod=1)  # never pinged: waits without alerting
    marker = _cron(api, interval=2, gracePeriod=1)  # due a second after ``missed``
    sent = time.monotonic()
    for url in (missed["heartbeatUrl"], job["heartbeatUrl"] + "/start", marker["heartbeatUrl"]):
        httpx.get(url)
    assert 0.8 <= _status_after(api, job, "DOWN") - sent  # not before its grace period ends
    assert 1.8 <= _status_after(api, missed, "DOWN") - sent
    _status_after(api, marker, "DOWN")
    down = [m for (m,) in sql({"server": {"database": served.db}}, "SELECT monitor_id FROM"
                              " status_transitions WHERE new_status = 'DOWN' ORDER BY id")]
    assert [m for m in down if m in (job["id"], missed["id"], marker["id"])] == [
        job["id"], missed["id"], marker["id"]]  # each on its deadline, none late past the next
    httpx.get(missed["heartbeatUrl"])
    assert api.get(f"/monitors/{missed['id']}").json()["status"] == "UP"
    assert api.get(f"/monitors/{quiet['id']}").json()["status"] == "PENDING"
    reasons = dict(sql({"server": {"database": served.db}},
                       "SELECT monitor_id, reason FROM status_transitions WHERE new_status = 'DOWN'"
                       " AND monitor_id IN (?, ?)", (missed["id"], job["id"])))
    assert reasons[missed["id"]].startswith("missed heartbeat")
    assert reasons[job["id"]].startswith("job did not complete")


def test_heartbeat_paused_monitor_logs_pings_but_keeps_its_status(served):
    api = _hb_api(served)
    monitor = _cron(api, interval=1, gracePeriod=1)
    httpx.get(monitor["heartbeatUrl"])
    assert api.post(f"/monitors/{monitor['id']}/pause").json()["isPaused"] is True
    httpx.post(monitor["heartbeatUrl"] + "/fail", content="ignored while paused")
    marker = _cron(api, interval=1, gracePeriod=1)  # pinged later, so its deadline is later
    httpx.get(marker["heartbeatUrl"])
    _status_after(api, marker, "DOWN")  # past interval + grace for the paused one too
    body = api.get(f"/monitors/{monitor['id']}").json()
    assert body["status"] == "UP" and body["_count"]["checks"] == 1
    assert _beats(api, monitor)["heartbeats"][0]["message"] == "ignored while paused"
    resumed = time.monotonic()
    api.post(f"/monitors/{monitor['id']}/pause")
    later = _cron(api, interval=2, gracePeriod=1)  # due a second after the resumed one
    httpx.get(later["heartbeatUrl"])
    assert api.get(f"/monitors/{monitor['id']}").json()["status"] == "UP"  # the clock restarted
    assert 1.5 <= _status_after(api, monitor, "DOWN") - resumed
    _status_after(api, later, "DOWN")
    down = sql({"server": {"database": served.db}}, "SELECT monitor_id FROM status_transitions"
               " WHERE new_status = 'DOWN' AND monitor_id IN (?, ?) ORDER BY id",
               (monitor["id"], later["id"]))
    assert down == [(monitor["id"],), (later["id"],)]  # down on its restarted clock, not later


def test_heartbeat_deadline_passed_while_stopped_acts_once_at_start(tmp_path):
    """Time passes while stopped (the stored clocks are moved back instead of sleeping); each
    start-up then acts on the deadlines due, oldest first.  A marker monitor made overdue after
    it going DOWN shows that start-up has gone past the first one, which went DOWN once."""
    srv = Server(tmp_path).start()
    api = _hb_api(srv)
    monitor, marker = (_cron(api, interval=1, gracePeriod=1) for _ in range(2))
    for beat in (monitor, marker):
        httpx.get(beat["heartbeatUrl"])
    srv.stop()
    cfg = {"server": {"database": srv.db}}
    assert sql(cfg, "SELECT status FROM monitors") == [("UP",), ("UP",)]

    def overdue(monitor_id: str, seconds: int) -> None:
        """As if the server had been stopped for ``seconds`` since this monitor's last ping."""
        sql(cfg, "UPDATE monitors SET status = 'UP', last_success_at = ?, updated_at = ?"
                 " WHERE id = ?", (statusapp.now_ms() - seconds * 1000,) * 2 + (monitor_id,))
    overdue(monitor["id"], 5)
    for _ in range(2):
        overdue(marker["id"], 3)
        again = Server(tmp_path).start()
        try:
            eventually(lambda: sql(cfg, "SELECT status FROM monitors WHERE id = ?",
                                   (marker["id"],)) == [("DOWN",)])
        finally:
            again.stop()
        assert sql(cfg, "SELECT status FROM monitors WHERE id = ?", (monitor["id"],)) == [("DOWN",)]
    assert sql(cfg, "SELECT old_status, new_status FROM status_transitions WHERE monitor_id = ?"
                    " ORDER BY id", (monitor["id"],)) == [("PENDING", "UP"), ("UP", "DOWN")]


def test_heartbeat_acknowledged_pings_survive_kill_9(tmp_path):
    srv = Server(tmp_path, env={"STATUSAPP_HEARTBEAT_PINGS_PER_MINUTE": "100000"}).start()
    api = _hb_api(srv)
    urls = [_cron(api)["heartbeatUrl"] for _ in range(8)]
    acked: list[str] = []
    enough = asyncio.Event()

    async def pinger(n: int, client: httpx.AsyncClient) -> None:
        for i in range(10_000):
            text = f"{n}-{i}"
            try:
                response = await client.post(urls[n % len(urls)], content=text)
            except httpx.HTTPError:
                return
            if response.status_code == 200:
                acked.append(text)
                if len(acked) >= 300:
                    enough.set()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            tasks = [asyncio.create_task(pinger(n, client)) for n in range(16)]
            await asyncio.wait_for(enough.wait(), 30)
            srv.proc.send_signal(signal.SIGKILL)
            await asyncio.gather(*tasks)
    asyncio.run(run())
    srv.proc.wait(timeout=10)
    again = Server(tmp_path).start()
    try:
        stored = {row[0] for row in sql({"server": {"database": again.db}},
                                        "SELECT message FROM heartbeats")}
    finally:
        again.stop()
    assert len(acked) >= 300 and set(acked) <= stored

# Cron schedules: due times are pure functions of the schedule, zone and last success; the
# live test moves the stored clocks back and lets the deadline service find the missed run.

_HOUR = 3_600_000


@pytest.mark.parametrize("schedule, success, due", [
    # 03:00 Berlin: CET (+01) before 29 March 2026, CEST (+02) from then, CET again 25 October.
    ("0 3 * * *", "2026-03-28T03:01:00+01:00", "2026-03-29T01:00:00+00:00"),  # a 23-hour day
    ("0 3 * * *", "2026-10-24T03:01:00+02:00", "2026-10-25T02:00:00+00:00"),  # a 25-hour day
    ("30 2 * * *", "2026-03-28T02:31:00+01:00", "2026-03-29T01:00:00+00:00"),  # 02:30 is 03:00
    ("30 2 * * *", "2026-10-24T02:31:00+02:00", "2026-10-25T00:30:00+00:00"),  # once, the first
    ("@daily", "2026-03-28T12:00:00+01:00", "2026-03-28T23:00:00+00:00"),
    # early for the 03:00 run (02:00 does not exist that night), so 04:00 CEST is next
    ("0 * * * *", "2026-03-29T01:59:00+01:00", "2026-03-29T02:00:00+00:00"),
])
def test_cron_due_times_across_dst(schedule, success, due):
    got = statusapp.next_scheduled_run(schedule, "Europe/Berlin", _utc_ms(success), 300_000)
    assert statusapp.iso(got) == statusapp.iso(_utc_ms(due))


def test_cron_an_early_run_does_not_confuse_the_next_due_time():
    def due(success: str) -> str:
        got = statusapp.next_scheduled_run("0 3 * * *", "UTC", _utc_ms(success), 600_000)
        return statusapp.iso(got)
    assert due("2026-05-10T02:55:00+00:00") == "2026-05-11T03:00:00Z"  # early: counts for 10 May
    assert due("2026-05-10T03:04:00+00:00") == "2026-05-11T03:00:00Z"  # on time
    assert due("2026-05-10T02:40:00+00:00") == "2026-05-10T03:00:00Z"  # too early: a stray run
    assert due("2026-05-10T14:00:00+00:00") == "2026-05-11T03:00:00Z"  # a manual run
    every_5 = statusapp.next_scheduled_run("*/5 * * * *", "UTC",
                                           _utc_ms("2026-05-10T03:00:10+00:00"), 600_000)
    assert statusapp.iso(every_5) == "2026-05-10T03:05:00Z"  # nearer the last run: that one


def test_cron_schedule_validation(client):
    bad = client.post("/api/v1/monitors", json={"name": "b", "type": "CRON",
                                                "schedule": "61 * * * *", "timezone": "Nowhere"})
    assert bad.status_code == 400
    assert sorted(i["path"][0] for i in bad.json()["error"]) == ["schedule", "timezone"]
    good = client.post("/api/v1/monitors", json={"name": "b", "type": "CRON",
                                                 "schedule": "@daily", "timezone": "Europe/Berlin"})
    assert good.status_code == 201
    assert (good.json()["schedule"], good.json()["timezone"]) == ("@daily", "Europe/Berlin")


def test_cron_missed_scheduled_run_goes_down_after_the_grace(client, cfg):
    rt = client.app.state.statusapp
    created = client.post("/api/v1/monitors", json={
        "name": "nightly", "type": "CRON", "schedule": "0 3 * * *", "timezone": "Europe/Berlin",
        "gracePeriod": 600})
    assert created.status_code == 201
    monitor = created.json()
    ping = urllib.parse.urlsplit(monitor["heartbeatUrl"]).path
    assert client.get(ping).status_code == 200
    assert client.get(f"/api/v1/monitors/{monitor['id']}").json()["status"] == "UP"
    # The last success was 3 days ago: the next 03:00 and its 10 minutes of grace have passed.
    before = statusapp.now_ms() - 72 * _HOUR
    sql(cfg, "UPDATE monitors SET last_success_at = ?, updated_at = ? WHERE id = ?",
        (before, before, monitor["id"]))
    client.portal.call(rt.monitor_changed, monitor["id"])
    eventually(lambda: sql(cfg, "SELECT status FROM monitors")[0][0] == "DOWN")
    (reason,), = sql(cfg, "SELECT reason FROM status_transitions WHERE new_status = 'DOWN'")
    assert reason == ("missed heartbeat: no success ping for the scheduled run (0 3 * * *,"
                      " Europe/Berlin) + 600 s grace period")
    (at,), = sql(cfg, "SELECT checked_at FROM checks WHERE status = 'DOWN'")
    expected = statusapp.next_scheduled_run("0 3 * * *", "Europe/Berlin", before, 600_000)
    assert at == expected + 600_000


# --- Notifier tests ---


class _NotifyReceiver:
    """A loopback HTTP server that records every request and answers from a script.

    ``script`` holds ``(status, body, delay_seconds)`` answers used in order; after that it
    answers 200, or what ``answer(request)`` says when set (a fake service's checks).  Each
    recorded request has method, path, lower-cased headers and raw body bytes.
    """

    def __init__(self, port: int = 0) -> None:
        self.requests: list[dict] = []
        self.script: list[tuple[int, bytes, float]] = []
        self.answer = None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = {"method": self.command, "path": self.path, "body": body,
                           "headers": {k.lower(): v for k, v in self.headers.items()}}
                receiver.requests.append(request)
                status, answer, delay = (
                    receiver.script.pop(0) if receiver.script else
                    (*receiver.answer(request), 0) if receiver.answer else (200, b'{"ok":true}', 0))
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the client gave up (timeout tests)

            do_PUT = do_POST

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def json(self, index: int = -1) -> dict:
        return json.loads(self.requests[index]["body"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _NotifyMailbox:
    """aiosmtpd handler that keeps every envelope."""

    def __init__(self) -> None:
        self.envelopes: list = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


@pytest.fixture
def notify_http():
    receiver = _NotifyReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def notify_cfg(notify_http):
    """Config whose every service base URL is the loopback receiver."""
    url = notify_http.url
    return statusapp.load_config(environ={}, overrides={"notifications": {
        "telegram_api_url": f"{url}/telegram",
        "pagerduty_url": f"{url}/pagerduty/v2/enqueue",
        "opsgenie_url": f"{url}/opsgenie",
        "twilio_api_url": f"{url}/twilio",
        "twilio_account_sid": "AC123",
        "twilio_auth_token": "twilio-token",
        "twilio_from": "+15550001111",
        "pushover_url": url,
        "timeout": 10,  # a loaded machine's loopback answer is never taken for a timeout
    }})


@pytest_asyncio.fixture
async def notify_ctx(notify_cfg):
    ctx = statusapp.NotifyContext(notify_cfg)
    yield ctx
    await ctx.aclose()


def _notify_down(**changes) -> statusapp.Alert:
    alert = statusapp.Alert(
        event="monitor.down",
        monitor={"id": "mon_abc123", "name": "Café ✓", "url": "https://api.home.test",
                 "type": "API", "status": "DOWN"},
        incident={"id": "inc_xyz789", "incidentNumber": "INC-2025-0042",
                  "startedAt": "2025-01-21T10:25:00Z", "resolvedAt": None, "severity": "high",
                  "mttr": None},
        check={"statusCode": 500, "responseTime": 1250.0, "error": "Internal Server Error",
               "region": "us-east-1"},
        timestamp="2025-01-21T10:30:00Z")
    for key, value in changes.items():
        setattr(alert, key, value)
    return alert


def _notify_up() -> statusapp.Alert:
    return _notify_down(
        event="monitor.up",
        monitor={"id": "mon_abc123", "name": "Café ✓", "url": "https://api.home.test",
                 "type": "API", "status": "UP"},
        incident={"id": "inc_xyz789", "incidentNumber": "INC-2025-0042",
                  "startedAt": "2025-01-21T10:25:00Z", "resolvedAt": "2025-01-21T10:37:05Z",
                  "severity": "high", "mttr": None},
        check={"statusCode": 200, "responseTime": 120, "error": None, "region": "us-east-1"},
        timestamp="2025-01-21T10:37:05Z")


def test_notify_message_says_what_when_and_how_long():
    down = statusapp._text(_notify_down())
    for part in ("Café ✓ is DOWN", "URL: https://api.home.test",
                 "Error: HTTP 500 Internal Server Error", "Region: us-east-1",
                 "Since: 2025-01-21 10:25:00 UTC", "Incident: INC-2025-0042 (severity high)"):
        assert part in down
    up = statusapp._text(_notify_up())
    assert "Café ✓ is back UP" in up and "Down for: 12m 5s" in up
    assert statusapp._summary(_notify_up()) == "Café ✓ is back UP - down for 12m 5s"
    degraded = _notify_down(event="monitor.degraded",
                            note="response time 480 ms is 92% above the 250 ms baseline")
    assert "92% above" in statusapp._summary(degraded)
    assert [statusapp.human_duration(s) for s in (0, 45, 725, 3725, 90061)] == \
        ["0s", "45s", "12m 5s", "1h 2m", "1d 1h"]
    with pytest.raises(ValueError):
        statusapp.Alert(event="monitor.sideways", monitor={})


@pytest.mark.asyncio
async def test_notify_slack_wire_format(notify_http, notify_ctx):
    config = {"webhookUrl": f"{notify_http.url}/services/T0/B0/secret", "channel": "#alerts"}
    assert await statusapp.send_slack(config, _notify_down(), notify_ctx) == 200
    request = notify_http.requests[0]
    assert request["path"] == "/services/T0/B0/secret"
    assert request["headers"]["content-type"] == "application/json"
    body = json.loads(request["body"])
    assert body["channel"] == "#alerts"
    assert body["text"].startswith("Café ✓ is DOWN - HTTP 500 Internal Server Error")
    header, section, context = body["blocks"]
    assert header["type"] == "header" and header["text"]["type"] == "plain_text"
    assert "Café ✓ is DOWN" in header["text"]["text"]
    fields = [f["text"] for f in section["fields"]]
    assert "*URL*\nhttps://api.home.test" in fields
    assert "*Error*\nHTTP 500 Internal Server Error" in fields
    assert context["type"] == "context"


@pytest.mark.asyncio
async def test_notify_discord_embed_colours(notify_http, notify_ctx):
    config = {"webhookUrl": f"{notify_http.url}/api/webhooks/1/tok"}
    await statusapp.send_discord(config, _notify_down(), notify_ctx)
    await statusapp.send_discord(config, _notify_up(), notify_ctx)
    down, up = (notify_http.json(i)["embeds"][0] for i in (0, 1))
    assert down["color"] == 0xE74C3C and up["color"] == 0x2ECC71
    assert down["title"] == "Café ✓ is DOWN" and down["url"] == "https://api.home.test"
    assert {"name": "Region", "value": "us-east-1", "inline": True} in down["fields"]
    assert {"name": "Down for", "value": "12m 5s", "inline": True} in up["fields"]
    assert notify_http.json(0)["allowed_mentions"] == {"parse": []}


@pytest.mark.asyncio
async def test_notify_telegram_send_message(notify_http, notify_ctx):
    config = {"botToken": "123456:ABC", "chatId": "-1001234567890"}
    assert await statusapp.send_telegram(config, _notify_up(), notify_ctx) == 200
    request = notify_http.requests[0]
    assert request["path"] == "/telegram/bot123456:ABC/sendMessage"
    body = json.loads(request["body"])
    assert body["chat_id"] == "-1001234567890"
    assert "Café ✓ is back UP" in body["text"] and "Down for: 12m 5s" in body["text"]


@pytest.mark.asyncio
async def test_notify_pagerduty_trigger_then_resolve(notify_http, notify_ctx):
    notify_http.script = [(202, b'{"status":"success"}', 0)] * 2
    config = {"integrationKey": "pd-key"}
    assert await statusapp.send_pagerduty(config, _notify_down(), notify_ctx) == 202
    await statusapp.send_pagerduty(config, _notify_up(), notify_ctx)
    assert [r["path"] for r in notify_http.requests] == ["/pagerduty/v2/enqueue"] * 2
    trigger, resolve = notify_http.json(0), notify_http.json(1)
    assert trigger["routing_key"] == resolve["routing_key"] == "pd-key"
    assert (trigger["event_action"], resolve["event_action"]) == ("trigger", "resolve")
    assert trigger["dedup_key"] == resolve["dedup_key"] == "statusapp-monitor-mon_abc123"
    assert trigger["payload"]["severity"] == "critical"
    assert trigger["payload"]["source"] == "https://api.home.test"
    assert "Café ✓ is DOWN" in trigger["payload"]["summary"]
    await statusapp.send_pagerduty({**config, "severity": "warning"}, _notify_down(), notify_ctx)
    assert notify_http.json()["payload"]["severity"] == "warning"
    with pytest.raises(statusapp.DeliveryError) as bad:
        await statusapp.send_pagerduty({**config, "severity": "high"}, _notify_down(), notify_ctx)
    assert bad.value.permanent


@pytest.mark.asyncio
async def test_notify_opsgenie_create_then_close(notify_http, notify_ctx):
    notify_http.script = [(202, b'{"result":"Request will be processed"}', 0)] * 2
    config = {"apiKey": "og-key", "priority": "P1"}
    await statusapp.send_opsgenie(config, _notify_down(), notify_ctx)
    await statusapp.send_opsgenie(config, _notify_up(), notify_ctx)
    create, close = notify_http.requests
    assert create["path"] == "/opsgenie/v2/alerts"
    assert close["path"] == \
        "/opsgenie/v2/alerts/statusapp-monitor-mon_abc123/close?identifierType=alias"
    assert create["headers"]["authorization"] == close["headers"]["authorization"] \
        == "GenieKey og-key"
    body = json.loads(create["body"])
    assert body["alias"] == "statusapp-monitor-mon_abc123" and body["priority"] == "P1"
    assert body["message"] == "Café ✓ is DOWN" and len(body["message"]) <= 130
    assert json.loads(close["body"])["source"] == "StatusApp"


@pytest.mark.asyncio
async def test_notify_teams_adaptive_card(notify_http, notify_ctx):
    config = {"webhookUrl": f"{notify_http.url}/workflows/abc"}
    await statusapp.send_teams(config, _notify_down(), notify_ctx)
    body = notify_http.json()
    assert body["type"] == "message"
    attachment = body["attachments"][0]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
    title, facts = card["body"]
    assert title["text"] == "Café ✓ is DOWN" and title["color"] == "Attention"
    assert {"title": "URL", "value": "https://api.home.test"} in facts["facts"]
    assert card["actions"][0] == {"type": "Action.OpenUrl", "title": "Open monitored URL",
                                  "url": "https://api.home.test"}


@pytest.mark.asyncio
async def test_notify_sms_twilio_form_and_basic_auth(notify_http, notify_ctx):
    notify_http.script = [(201, b'{"sid":"SM1"}', 0)] * 2
    config = {"phoneNumbers": ["+15551230001", "+15551230002"]}
    assert await statusapp.send_sms(config, _notify_down(), notify_ctx) == 201
    assert len(notify_http.requests) == 2
    expected_auth = "Basic " + base64.b64encode(b"AC123:twilio-token").decode()
    for request, number in zip(notify_http.requests, config["phoneNumbers"], strict=True):
        assert request["path"] == "/twilio/2010-04-01/Accounts/AC123/Messages.json"
        assert request["headers"]["content-type"] == "application/x-www-form-urlencoded"
        assert request["headers"]["authorization"] == expected_auth
        form = urllib.parse.parse_qs(request["body"].decode())
        assert form["To"] == [number] and form["From"] == ["+15550001111"]
        assert form["Body"][0].startswith("[StatusApp] Café ✓ is DOWN - HTTP 500")


@pytest.mark.asyncio
async def test_notify_sms_tries_every_number(notify_http, notify_ctx):
    notify_http.script = [(400, b'{"message":"invalid To"}', 0), (201, b"{}", 0)]
    config = {"phoneNumbers": ["+1bad", "+15551230002"]}
    with pytest.raises(statusapp.DeliveryError) as failed:
        await statusapp.send_sms(config, _notify_down(), notify_ctx)
    assert len(notify_http.requests) == 2
    assert failed.value.permanent and "1 of 2" in failed.value.message


@pytest.fixture
def notify_smtp():
    mailbox, port = _NotifyMailbox(), free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield mailbox, port
    controller.stop()


def _notify_smtp_cfg(port: int, **smtp) -> dict:
    cfg = statusapp.load_config(environ={}, overrides={"smtp": {
        "host": "127.0.0.1", "port": port, "security": "none", "sender": "alerts@status.test",
        **smtp}})
    cfg["notifications"]["timeout"] = 10
    return cfg


@pytest.mark.asyncio
async def test_notify_email_over_smtp(notify_smtp):
    mailbox, port = notify_smtp
    config = {"emails": ["team@home.test", "oncall@home.test"]}
    async with statusapp.NotifyContext(_notify_smtp_cfg(port)) as ctx:
        assert await statusapp.send_email(config, _notify_down(), ctx) is None
    envelope = mailbox.envelopes[0]
    assert envelope.mail_from == "alerts@status.test"
    assert envelope.rcpt_tos == config["emails"]
    message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
    assert message["To"] == "team@home.test, oncall@home.test"
    assert message["Subject"].startswith("[StatusApp] Café ✓ is DOWN - HTTP 500")
    assert message.get_content_type() == "text/plain"
    body = message.get_content()
    assert "URL: https://api.home.test" in body and "Region: us-east-1" in body


@pytest.mark.asyncio
async def test_notify_email_login_and_security(notify_smtp):
    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (auth_data.login, auth_data.password) == (b"bot", b"pw")
        return AuthResult(success=ok, handled=False)

    mailbox, port = _NotifyMailbox(), free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port,
                            authenticator=authenticator, auth_require_tls=False)
    controller.start()
    try:
        config, alert = {"emails": ["team@home.test"]}, _notify_down()
        async with statusapp.NotifyContext(_notify_smtp_cfg(port, username="bot",
                                                            password="pw")) as ctx:
            await statusapp.send_email(config, alert, ctx)
        assert len(mailbox.envelopes) == 1
        async with statusapp.NotifyContext(_notify_smtp_cfg(port, username="bot",
                                                            password="wrong")) as ctx:
            records = await statusapp.deliver(statusapp.send_email, config, alert, ctx)
        assert len(records) == 1 and records[0]["permanent"] and records[0]["statusCode"] == 535
    finally:
        controller.stop()
    # starttls must never fall back to plain text when the server does not offer it
    async with statusapp.NotifyContext(_notify_smtp_cfg(notify_smtp[1],
                                                        security="starttls")) as ctx:
        records = await statusapp.deliver(statusapp.send_email, config, alert, ctx)
    assert records[0]["permanent"] and "STARTTLS" in records[0]["error"]
    assert notify_smtp[0].envelopes == []


@pytest.mark.asyncio
async def test_notify_webhook_channel_headers_and_payload(notify_http, notify_ctx):
    config = {"url": f"{notify_http.url}/hook", "headers": {"Authorization": "Bearer token",
                                                            "Content-Type": "text/plain"}}
    alert = _notify_down()
    assert await statusapp.send_webhook(config, alert, notify_ctx) == 200
    request = notify_http.requests[0]
    assert request["headers"]["authorization"] == "Bearer token"
    assert request["headers"]["content-type"] == "application/json"
    assert "x-webhook-signature" not in request["headers"]
    assert request["body"] == statusapp.js_json(statusapp.webhook_payload(alert))
    body = json.loads(request["body"])
    assert list(body) == ["event", "timestamp", "monitor", "incident", "check"]
    assert list(body["monitor"]) == ["id", "name", "url", "type", "status"]
    assert list(body["incident"]) == ["id", "incidentNumber", "startedAt", "severity"]
    assert list(body["check"]) == ["statusCode", "responseTime", "error", "region"]
    with pytest.raises(statusapp.DeliveryError) as bad:
        await statusapp.send_webhook({**config, "headers": {"X-Evil": "a\r\nb"}}, alert,
                                     notify_ctx)
    assert bad.value.permanent


@pytest.mark.asyncio
async def test_notify_retry_transient_then_ok(notify_http, notify_ctx):
    notify_http.script = [(500, b"boom", 0)]
    records = await statusapp.deliver(statusapp.send_slack, {"webhookUrl": notify_http.url},
                                      _notify_down(), notify_ctx, base_delay=0.01)
    assert [(r["attempt"], r["ok"], r["statusCode"]) for r in records] == \
        [(1, False, 500), (2, True, 200)]
    assert "boom" in records[0]["error"] and not records[0]["permanent"]
    assert set(records[0]) == {"attempt", "ok", "statusCode", "error", "permanent", "durationMs"}


@pytest.mark.asyncio
async def test_notify_retry_stops_at_permanent(notify_http, notify_ctx):
    notify_http.script = [(401, b'{"ok":false,"description":"Unauthorized"}', 0)]
    records = await statusapp.deliver(statusapp.send_telegram,
                                      {"botToken": "999:SECRET", "chatId": "1"},
                                      _notify_down(), notify_ctx, base_delay=0.01)
    assert len(records) == 1 and records[0]["permanent"] and records[0]["statusCode"] == 401
    assert "Unauthorized" in records[0]["error"] and "SECRET" not in records[0]["error"]
    missing = await statusapp.deliver(statusapp.send_discord, {}, _notify_down(), notify_ctx)
    assert len(missing) == 1 and missing[0]["permanent"] and "webhookUrl" in missing[0]["error"]


@pytest.mark.asyncio
async def test_notify_retry_receiver_down(notify_ctx, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/hook"
    waits, sleep = [], asyncio.sleep

    async def recorded_sleep(delay: float, *args) -> None:
        waits.append(delay)
        await sleep(0)
    monkeypatch.setattr(statusapp.asyncio, "sleep", recorded_sleep)
    records = await statusapp.deliver(statusapp.send_webhook, {"url": url}, _notify_down(),
                                      notify_ctx, attempts=3, base_delay=0.05)
    assert [r["ok"] for r in records] == [False] * 3
    assert not any(r["permanent"] for r in records)
    assert [w for w in waits if w] == [0.05, 0.1]  # backoff: base, then twice base


@pytest.mark.asyncio
async def test_notify_slow_receiver_times_out(notify_http, notify_cfg):
    notify_cfg["notifications"]["timeout"] = 0.3
    notify_http.script = [(200, b"{}", 1.0)]
    async with statusapp.NotifyContext(notify_cfg) as ctx:
        records = await statusapp.deliver(statusapp.send_slack, {"webhookUrl": notify_http.url},
                                          _notify_down(), ctx, attempts=1)
    assert len(records) == 1 and not records[0]["ok"] and not records[0]["permanent"]
    assert "timed out" in records[0]["error"] and records[0]["durationMs"] < 1000


@pytest.mark.asyncio
async def test_notify_unexpected_error_is_recorded_not_raised(notify_ctx):
    async def broken(config, alert, ctx):
        raise KeyError("oops")

    records = await statusapp.deliver(broken, {}, _notify_down(), notify_ctx, base_delay=0)
    assert len(records) == 1 and records[0]["permanent"] and "KeyError" in records[0]["error"]


@pytest.mark.asyncio
async def test_notify_private_targets_guard(notify_http, notify_cfg):
    notify_cfg["notifications"]["allow_private_targets"] = False
    async with statusapp.NotifyContext(notify_cfg) as ctx:
        for url in (notify_http.url, notify_http.url.replace("127.0.0.1", "localhost"),
                    "http://[::1]:9/", "http://10.1.2.3/"):
            with pytest.raises(statusapp.DeliveryError) as refused:
                await statusapp.send_slack({"webhookUrl": url}, _notify_down(), ctx)
            assert refused.value.permanent
        records = await statusapp.deliver(statusapp.send_webhook, {"url": notify_http.url},
                                          _notify_down(), ctx)
        assert len(records) == 1 and records[0]["permanent"]
    assert notify_http.requests == []
    notify_cfg["notifications"]["allow_private_targets"] = True
    async with statusapp.NotifyContext(notify_cfg) as ctx:
        assert await statusapp.send_slack({"webhookUrl": notify_http.url}, _notify_down(),
                                          ctx) == 200
        for url in ("file:///etc/passwd", "ftp://127.0.0.1/", "http:///nohost"):
            with pytest.raises(statusapp.DeliveryError) as refused:
                statusapp.check_target(url)
            assert refused.value.permanent


def test_notify_js_json_matches_json_stringify():
    js = statusapp.js_json
    assert js({"a": 1.0, "b": [1e21, 1e-7, 0.000001, 1.5, -0.0, float("nan")]}) == \
        b'{"a":1,"b":[1e+21,1e-7,0.000001,1.5,0,null]}'
    assert js("Café ✓\u2028") == '"Café ✓\u2028"'.encode()
    assert js("\x01\n\"\\\ud800") == b'"\\u0001\\n\\"\\\\\\ud800"'
    assert js({"b": 1, "10": 2, "2": 3, "01": 4}) == b'{"2":3,"10":2,"b":1,"01":4}'
    assert js(2**53 + 1) == b"9007199254740992" and js(10**21) == b"1e+21"
    assert statusapp.sign_body(b"{}", "k") == hmac.new(b"k", b"{}", hashlib.sha256).hexdigest()


_NOTIFY_NODE_VERIFIER = r"""
const crypto = require('crypto');

function verifyWebhookSignature(payload, signature, secret) {
  const expectedSignature = crypto
    .createHmac('sha256', secret)
    .update(JSON.stringify(payload))
    .digest('hex');

  return crypto.timingSafeEqual(
    Buffer.from(signature),
    Buffer.from(expectedSignature)
  );
}

const chunks = [];
process.stdin.on('data', (chunk) => chunks.push(chunk));
process.stdin.on('end', () => {
  const body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  const ok = verifyWebhookSignature(body, process.env.SIGNATURE, process.env.SECRET);
  process.stdout.write(body.monitor.name);
  process.exit(ok ? 0 : 1);
});
"""


def _notify_signed_alert() -> statusapp.Alert:
    return _notify_down(check={"statusCode": 500, "responseTime": 1250.0,
                               "error": "line\u2028break \U0001f600", "region": "eu-west-1"})


@pytest.mark.asyncio
async def test_notify_webhook_signature_hmac(notify_http, notify_ctx):
    payload = statusapp.webhook_payload(_notify_signed_alert())
    await statusapp.post_webhook(f"{notify_http.url}/hook", payload, "s3cret", None, notify_ctx)
    request = notify_http.requests[0]
    assert request["headers"]["content-type"] == "application/json"
    expected = hmac.new(b"s3cret", request["body"], hashlib.sha256).hexdigest()
    assert request["headers"]["x-webhook-signature"] == expected
    assert json.loads(request["body"])["monitor"]["name"] == "Café ✓"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")
@pytest.mark.asyncio
async def test_notify_webhook_signature_node_verifier(notify_http, notify_ctx):
    payload = statusapp.webhook_payload(_notify_signed_alert())
    await statusapp.post_webhook(f"{notify_http.url}/hook", payload, "s3cret", None, notify_ctx)
    request = notify_http.requests[0]

    def verify(body: bytes, signature: str) -> subprocess.CompletedProcess:
        return subprocess.run(["node", "-e", _NOTIFY_NODE_VERIFIER], input=body,
                              capture_output=True, timeout=10,
                              env={"SIGNATURE": signature, "SECRET": "s3cret"})

    accepted = verify(request["body"], request["headers"]["x-webhook-signature"])
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.decode() == "Café ✓"
    # The check has teeth: Python's default json.dumps of the same payload does not verify.
    naive = json.dumps(payload).encode()
    assert verify(naive, statusapp.sign_body(naive, "s3cret")).returncode == 1


# Fakes of the homelab push services: each checks what the real one checks (method, path,
# credentials, required fields and their ranges) and answers as it does.

NTFY_TOKEN, GOTIFY_TOKEN, MATRIX_TOKEN = "tk_ntfytoken0123456789abc", "AvKcy9o-yvVhyKd", "syt_mx_token"
PUSHOVER_APP, PUSHOVER_USER = "azGDORePK8gMaC0QOYAMyEEuzJnyUi", "uQiRzpo4DXghDmr9QzzfQu27cmVRsG"
MATRIX_ROOM = "!homelab:matrix.home.test"


def _refuse(status: int, body: dict) -> tuple[int, bytes]:
    return status, json.dumps(body).encode()


def _fake_ntfy(request: dict, body: dict) -> tuple[int, bytes]:
    basic = "Basic " + base64.b64encode(b"phone:hunter2-pass").decode()
    if request["headers"].get("authorization") not in (f"Bearer {NTFY_TOKEN}", basic):
        return _refuse(403, {"code": 40301, "http": 403, "error": "forbidden"})
    if not (re.fullmatch(r"[-_A-Za-z0-9]{1,64}", str(body.get("topic")))
            and body.get("priority") in range(1, 6) and isinstance(body.get("message"), str)
            and all(isinstance(tag, str) for tag in body.get("tags", []))):
        return _refuse(400, {"code": 40001, "http": 400, "error": "invalid request"})
    return 200, json.dumps({"id": "k1", "event": "message", "topic": body["topic"]}).encode()


def _fake_gotify(request: dict, body: dict) -> tuple[int, bytes]:
    if request["headers"].get("x-gotify-key") != GOTIFY_TOKEN:
        return _refuse(401, {"error": "Unauthorized", "errorCode": 401,
                             "errorDescription": "you need to provide a valid access token"})
    if not isinstance(body.get("message"), str) or body.get("priority") not in range(0, 11):
        return _refuse(400, {"error": "Bad Request", "errorCode": 400,
                             "errorDescription": "Field 'message' is required"})
    return 200, json.dumps({"id": 1, "appid": 1, **body}).encode()


def _fake_pushover(request: dict, form: dict) -> tuple[int, bytes]:
    if request["headers"].get("content-type") != "application/x-www-form-urlencoded":
        return _refuse(400, {"status": 0, "errors": ["message cannot be blank"]})
    if form.get("token") != PUSHOVER_APP or form.get("user") != PUSHOVER_USER:
        return _refuse(400, {"status": 0, "errors": ["application token is invalid"]})
    priority = int(form.get("priority", "0"))
    emergency_ok = priority < 2 or (30 <= int(form.get("retry", 0)) and
                                    0 < int(form.get("expire", 0)) <= 10800)
    if not form.get("message") or priority not in range(-2, 3) or not emergency_ok:
        return _refuse(400, {"status": 0, "errors": ["retry and expire are required"]})
    return 200, b'{"status":1,"request":"5042853c-402d-4a18-abcb-168734a801de"}'


def _fake_matrix(request: dict, body: dict) -> tuple[int, bytes]:
    room = urllib.parse.quote(MATRIX_ROOM, safe="")
    if request["headers"].get("authorization") != f"Bearer {MATRIX_TOKEN}":
        return _refuse(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unrecognised access token"})
    prefix = f"/_matrix/client/v3/rooms/{room}/send/m.room.message/"
    if request["method"] != "PUT" or not request["path"].startswith(prefix):
        return _refuse(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})
    if body.get("msgtype") != "m.text" or not isinstance(body.get("body"), str) or (
            "formatted_body" in body and body.get("format") != "org.matrix.custom.html"):
        return _refuse(400, {"errcode": "M_BAD_JSON", "error": "bad message"})
    txn = request["path"][len(prefix):]
    return 200, json.dumps({"event_id": f"$event-{txn}"}).encode()


def _fake_apprise_json(request: dict, body: dict) -> tuple[int, bytes]:
    if set(body) != {"version", "title", "message", "attachments", "type"}:
        return _refuse(400, {"error": "not an Apprise JSON notification"})
    return 200, b"{}"


def _fake_homelab(request: dict) -> tuple[int, bytes]:
    """Every homelab service the receiver stands in for, told apart by path."""
    path = request["path"].split("?")[0]
    if path == "/1/messages.json":
        return _fake_pushover(request, dict(urllib.parse.parse_qsl(request["body"].decode())))
    if request["headers"].get("content-type", "").split(";")[0] != "application/json":
        return _refuse(415, {"error": "expected JSON"})
    body = json.loads(request["body"])
    fake = {"/": _fake_ntfy, "/message": _fake_gotify, "/apprise": _fake_apprise_json}.get(path)
    return (fake or _fake_matrix)(request, body)


def _homelab_configs(url: str) -> dict:
    """A valid config of each homelab channel type, pointing at the loopback fakes."""
    return {
        "NTFY": {"serverUrl": url, "topic": "homelab", "token": NTFY_TOKEN},
        "GOTIFY": {"serverUrl": url, "appToken": GOTIFY_TOKEN},
        "PUSHOVER": {"userKey": PUSHOVER_USER, "appToken": PUSHOVER_APP},
        "MATRIX": {"homeserver": url, "accessToken": MATRIX_TOKEN, "roomId": MATRIX_ROOM},
        "APPRISE": {"urls": [url.replace("http://", "json://") + "/apprise"]},
    }


@pytest.fixture
def homelab(notify_http):
    """The receiver acting as every homelab service; a valid config of each type for it."""
    notify_http.answer = _fake_homelab
    return _homelab_configs(notify_http.url)


async def _refused_once(send, config: dict, ctx) -> dict:
    """The one attempt a delivery refused for bad credentials makes: permanent, no retry."""
    records = await statusapp.deliver(send, config, _notify_down(), ctx, base_delay=0)
    assert len(records) == 1 and records[0]["permanent"]
    return records[0]


async def _accepted(send, config: dict, receiver, ctx) -> dict:
    """The JSON a fake service accepted (200) for a DOWN alert."""
    assert await send(config, _notify_down(), ctx) == 200
    return receiver.json()


@pytest.mark.asyncio
async def test_notify_ntfy_publishes_json_with_priority_tags_and_click(notify_http, notify_ctx,
                                                                       homelab):
    config = homelab["NTFY"]
    down = await _accepted(statusapp.send_ntfy, config, notify_http, notify_ctx)
    assert {k: down[k] for k in ("topic", "title", "priority", "tags", "click")} == {
        "topic": "homelab", "title": "Café ✓ is DOWN", "priority": 5,
        "tags": ["rotating_light"], "click": "https://api.home.test"}
    assert "Error: HTTP 500 Internal Server Error" in down["message"]
    basic = {"serverUrl": notify_http.url, "topic": "homelab", "username": "phone",
             "password": "hunter2-pass", "priority": 4}
    assert await statusapp.send_ntfy(basic, _notify_up(), notify_ctx) == 200
    assert (notify_http.json()["priority"], notify_http.json()["tags"]) == (3, ["white_check_mark"])
    wrong = await _refused_once(statusapp.send_ntfy, {**config, "token": "tk_wrong"}, notify_ctx)
    assert wrong["statusCode"] == 403 and "tk_wrong" not in wrong["error"]


@pytest.mark.asyncio
async def test_notify_gotify_message_with_app_token_and_priority(notify_http, notify_ctx,
                                                                 homelab):
    config = homelab["GOTIFY"]
    down = await _accepted(statusapp.send_gotify, config, notify_http, notify_ctx)
    assert (down["title"], down["priority"]) == ("Café ✓ is DOWN", 8)
    assert down["extras"]["client::notification"]["click"]["url"] == "https://api.home.test"
    assert notify_http.requests[-1]["path"] == "/message"
    await statusapp.send_gotify({**config, "priority": 3}, _notify_up(), notify_ctx)
    assert notify_http.json()["priority"] == 2 and "Down for: 12m 5s" in notify_http.json()["message"]
    wrong = await _refused_once(statusapp.send_gotify, {**config, "appToken": "no"}, notify_ctx)
    assert "valid access token" in wrong["error"]


@pytest.mark.asyncio
async def test_notify_pushover_emergency_for_down_quiet_for_recovery(notify_http, notify_ctx,
                                                                     homelab):
    config = homelab["PUSHOVER"]
    assert await statusapp.send_pushover(config, _notify_down(), notify_ctx) == 200
    down = dict(urllib.parse.parse_qsl(notify_http.requests[-1]["body"].decode()))
    assert {k: down[k] for k in ("priority", "retry", "expire", "title", "url")} == {
        "priority": "2", "retry": "60", "expire": "3600", "title": "Café ✓ is DOWN",
        "url": "https://api.home.test"}
    assert down["timestamp"] == str(int(dt.datetime(2025, 1, 21, 10, 30, tzinfo=dt.timezone.utc)
                                        .timestamp()))
    await statusapp.send_pushover({**config, "retry": 30, "expire": 600}, _notify_up(), notify_ctx)
    up = dict(urllib.parse.parse_qsl(notify_http.requests[-1]["body"].decode()))
    assert up["priority"] == "-1" and "retry" not in up
    wrong = await _refused_once(statusapp.send_pushover, {**config, "appToken": "x" * 30},
                                notify_ctx)
    assert "token is invalid" in wrong["error"]


@pytest.mark.asyncio
async def test_notify_matrix_room_message_plain_and_html_one_txn_per_alert(notify_http,
                                                                          notify_ctx, homelab):
    config = homelab["MATRIX"]
    notify_http.script = [(502, b"bad gateway", 0)]
    records = await statusapp.deliver(statusapp.send_matrix, config,
                                      _notify_down(monitor={"id": "m", "name": "<b>NAS</b>"}),
                                      notify_ctx, base_delay=0)
    assert [r["statusCode"] for r in records] == [502, 200]
    first, retry = notify_http.requests[-2:]
    assert first["path"] == retry["path"] and first["method"] == "PUT"  # same transaction id
    body = notify_http.json()
    assert body["body"].startswith("<b>NAS</b> is DOWN\n")
    assert body["formatted_body"].startswith("<b>🔴 &lt;b&gt;NAS&lt;/b&gt; is DOWN</b><br>")
    await statusapp.send_matrix(config, _notify_up(), notify_ctx)
    assert notify_http.requests[-1]["path"] != first["path"]
    wrong = await _refused_once(statusapp.send_matrix, {**config, "accessToken": "syt_no"},
                                notify_ctx)
    assert "M_UNKNOWN_TOKEN" in wrong["error"]


@pytest.mark.asyncio
async def test_notify_apprise_json_url_reaches_a_loopback_receiver(notify_http, notify_ctx,
                                                                   homelab):
    config = homelab["APPRISE"]
    assert await statusapp.send_apprise(config, _notify_down(), notify_ctx) is None
    sent = notify_http.json()
    assert (sent["title"], sent["type"]) == ("Café ✓ is DOWN", "failure")
    assert "Region: us-east-1" in sent["message"]
    notify_http.script = [(500, b"", 0)] * 2
    records = await statusapp.deliver(statusapp.send_apprise, config, _notify_up(), notify_ctx,
                                      attempts=3, base_delay=0)
    assert [r["ok"] for r in records] == [False, False, True] and not records[0]["permanent"]
    assert notify_http.json()["type"] == "success"


def test_homelab_channels_validate_mask_and_get_marked_failing(tmp_path, notify_http):
    """Each new type through the API and the outbox: created with its secrets masked, then an
    alert the fake refuses for bad credentials leaves it failing (Apprise, which cannot tell a
    bad credential from an outage, after its retries, with the error noted)."""
    notify_http.answer = _fake_homelab
    cfg = _inc_cfg(tmp_path, notify_http.url, pushover_url=notify_http.url)
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": new_key(cfg)}) as client:
        wrong = {"NTFY": {"token": "tk_revoked"}, "GOTIFY": {"appToken": "revoked-token"},
                 "PUSHOVER": {"userKey": "x" * 30}, "MATRIX": {"accessToken": "syt_revoked"},
                 "APPRISE": {"urls": [f"json://127.0.0.1:{free_port()}/down"]}}
        channels = {}
        for kind, config in _homelab_configs(notify_http.url).items():
            created = _inc_channel(client, kind, {**config, **wrong[kind]}, name=kind)
            secret = statusapp.CHANNEL_TYPES[kind].secrets[0]
            assert created["config"][secret] != {**config, **wrong[kind]}[secret]
            channels[kind] = created["id"]
        monitor = _inc_monitor(client, notifications=[{"channelId": c} for c in channels.values()])
        _inc_transition(client, monitor["id"], "UP", "DOWN", statusapp.now_ms(), "boom", _INC_DOWN)
        eventually(lambda: sql(cfg, "SELECT COUNT(*), SUM(done_at IS NULL) FROM alert_outbox")
                   == [(5, 0)])  # one snapshot: all queued and all done
        state = {c["name"]: c for c in client.get("/api/v1/notifications").json()["channels"]}
    for kind in ("NTFY", "GOTIFY", "PUSHOVER", "MATRIX"):
        assert state[kind]["failing"] and state[kind]["lastError"], kind
        assert "revoked" not in state[kind]["lastError"]
    assert not state["APPRISE"]["failing"] and "Apprise could not deliver" in state["APPRISE"][
        "lastError"]
    attempts = dict(sql(cfg, "SELECT channel_type, attempts FROM alert_outbox"))
    assert attempts == {"NTFY": 1, "GOTIFY": 1, "PUSHOVER": 1, "MATRIX": 1, "APPRISE": 3}


def test_homelab_deliveries_count_against_the_host_they_talk_to(tmp_path):
    cfg = make_cfg(tmp_path, notifications={"pushover_url": "http://push.home.test:8443"})
    hosts = {kind: statusapp.delivery_host({"channel_type": kind, "config": json.dumps(config)},
                                           cfg)
             for kind, config in _homelab_configs("http://lab.home.test:8080").items()}
    assert hosts == {"NTFY": "lab.home.test:8080", "GOTIFY": "lab.home.test:8080",
                     "PUSHOVER": "push.home.test:8443", "MATRIX": "lab.home.test:8080",
                     "APPRISE": ":"}  # Apprise picks its hosts itself: one shared lane

@pytest.mark.parametrize("kind, config, path", [
    ("NTFY", {"serverUrl": "http://127.0.0.1", "topic": "no spaces"}, "config.topic"),
    ("GOTIFY", {"serverUrl": "ftp://x"}, "config.serverUrl"),
    ("PUSHOVER", {"userKey": "short", "appToken": "a"}, "config.userKey"),
    ("PUSHOVER", {"userKey": PUSHOVER_USER, "appToken": "a", "retry": 5}, "config.retry"),
    ("MATRIX", {"homeserver": "http://127.0.0.1", "accessToken": "t", "roomId": "#alias:x"},
     "config.roomId"),
    ("APPRISE", {"urls": ["nosuchscheme://x"]}, "config.urls"),
])
def test_homelab_channel_configs_are_validated(client, kind, config, path):
    response = client.post("/api/v1/notifications", json={"name": "x", "type": kind,
                                                          "config": config})
    assert response.status_code == 400
    assert path in {".".join(map(str, issue["path"])) for issue in response.json()["error"]}


def test_apprise_channel_without_the_library_is_a_400_naming_the_extra(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "apprise", None)  # what an install without the extra has
    response = client.post("/api/v1/notifications", json={
        "name": "x", "type": "APPRISE", "config": {"urls": ["json://127.0.0.1:9/x"]}})
    assert response.status_code == 400
    assert "pip install 'statusapp[apprise]'" in response.json()["error"][0]["message"]


# --- Incident tests ---


def _inc_cfg(tmp_path, url: str, **notifications) -> dict:
    return make_cfg(tmp_path, notifications={
        "pagerduty_url": f"{url}/pagerduty", "telegram_api_url": f"{url}/telegram",
        "retry_delay": 0.01, "timeout": 10, "attempts": 3, "storm_window": 0, **notifications})


def _inc_monitor(client, name: str = "Café ✓", **fields) -> dict:
    """A monitor the prober leaves alone (inactive): these tests write its transitions."""
    body = {"name": name, "url": "https://api.home.test", "type": "API", "isActive": False,
            **fields}
    response = client.post("/api/v1/monitors", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def _inc_channel(client, kind: str, config: dict, name: str = "chan") -> dict:
    response = client.post("/api/v1/notifications",
                           json={"name": name, "type": kind, "config": config})
    assert response.status_code == 201, response.text
    return response.json()


def _inc_transition(client, monitor_id: str, old: str, new: str, at: int, reason=None,
                    check: statusapp.CheckResult | None = None) -> None:
    """Record a check and a status change the way the prober and heartbeats do (waking the
    incident engine once it is committed)."""
    statements = statusapp.transition_statements(monitor_id, old, new, reason, at)
    if check is not None:
        statements = statusapp.check_statements(monitor_id, "local", check, at) + statements
    _inc_write(client, statements)


def _inc_write(client, statements: list) -> None:
    rt = client.app.state.statusapp
    client.portal.call(rt.db.write, statements)
    client.portal.call(rt.engine_wake.set)


def test_a_commit_that_inserts_a_transition_or_an_alert_wakes_its_consumer(cfg, key,
                                                                          monkeypatch):
    """The wake-ups come from the write layer: a transition written by an ordinary write sets
    engine_wake, an alert queued in a transaction outbox_wake, with no call site setting them;
    other writes and a rolled-back insert wake nothing."""
    monkeypatch.setattr(statusapp, "SERVICES", ())  # no engine or delivery clears the events
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        monitor = _inc_monitor(client)
        rt = client.app.state.statusapp
        (account,), = sql(cfg, "SELECT id FROM accounts")
        outbox = ("INSERT INTO alert_outbox (account_id, target_key, channel_type, config, event,"
                  " alert, created_at, next_attempt_at) VALUES (?, 't', 'WEBHOOK', '{}',"
                  " 'monitor.up', '{}', 0, 0)", (account,))

        async def queue_alert(fail: bool) -> None:
            async with rt.db.transaction() as conn:
                await conn.execute(*outbox)
                if fail:
                    raise LookupError("rolled back")

        client.portal.call(rt.db.write, [("UPDATE monitors SET name = 'renamed' WHERE id = ?",
                                          (monitor["id"],))])
        assert not rt.engine_wake.is_set() and not rt.outbox_wake.is_set()
        client.portal.call(rt.db.write, statusapp.transition_statements(
            monitor["id"], "PENDING", "UP", "first check", statusapp.now_ms()))
        assert rt.engine_wake.is_set() and not rt.outbox_wake.is_set()
        with pytest.raises(LookupError):
            client.portal.call(queue_alert, True)
        assert not rt.outbox_wake.is_set()
        client.portal.call(queue_alert, False)
        assert rt.outbox_wake.is_set()
        assert sql(cfg, "SELECT COUNT(*) FROM alert_outbox") == [(1,)]


def _inc_marker(cfg: dict, monitor_id: str, old: str, new: str, client) -> None:
    """A later transition of the monitor, as a positive sign that nothing more arrives before it.

    The engine consumes transitions in order and each target (channel or webhook, per monitor)
    gets its alerts in order, so once the marker is consumed and every queued alert is done,
    any repeat of an earlier alert would already have been sent."""
    _inc_transition(client, monitor_id, old, new, statusapp.now_ms(), "marker")
    _inc_settled(cfg)


def _inc_settled(cfg: dict) -> None:
    """Wait until every transition is consumed and every queued alert is done (sent, or failed
    for good): then no alert for what happened so far is still to come."""
    eventually(lambda: sql(cfg, "SELECT (SELECT COUNT(*) FROM status_transitions WHERE"
                                " processed_at IS NULL) + (SELECT COUNT(*) FROM alert_outbox"
                                " WHERE done_at IS NULL)") == [(0,)])


def _inc_paths(receiver, prefix: str) -> list[dict]:
    return [r for r in receiver.requests if r["path"].startswith(prefix)]


_INC_DOWN = statusapp.CheckResult(status="DOWN", status_code=500, response_time=1250,
                                  error="Internal Server Error", category="SERVER_ERROR")
_INC_UP = statusapp.CheckResult(status="UP", status_code=200, response_time=120)
_INC_EVENTS = "monitor.down,monitor.up,incident.created,incident.resolved"


def test_incident_opens_alerts_once_and_resolves_with_mttr(tmp_path, notify_http, notify_smtp):
    mailbox, smtp_port = notify_smtp
    url = notify_http.url
    cfg = _inc_cfg(tmp_path, url)
    cfg["smtp"].update({"host": "127.0.0.1", "port": smtp_port, "security": "none"})
    key = new_key(cfg)
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        slack = _inc_channel(client, "SLACK", {"webhookUrl": f"{url}/slack"})
        pager = _inc_channel(client, "PAGERDUTY", {"integrationKey": "pd-routing-key-123"})
        hook = client.post("/api/v1/webhooks", json={
            "name": "Prod", "url": f"{url}/hook", "events": _INC_EVENTS, "secret": "s3cret"})
        assert hook.status_code == 201 and "secret" not in hook.json()
        monitor = _inc_monitor(client, notifications=[
            {"channelId": slack["id"]}, {"channelId": pager["id"]},
            {"type": "EMAIL", "config": {"emails": ["oncall@home.test"]}}])
        down_at = statusapp.now_ms() - 725_000
        _inc_transition(client, monitor["id"], "PENDING", "DOWN", down_at,
                        "HTTP 500 Internal Server Error", _INC_DOWN)
        eventually(lambda: len(notify_http.requests) >= 4 and mailbox.envelopes)

        incidents = client.get("/api/v1/incidents").json()
        assert incidents["pagination"]["total"] == 1
        incident = incidents["incidents"][0]
        year = time.gmtime(down_at / 1000).tm_year
        assert incident["incidentNumber"] == f"INC-{year}-0001"
        assert (incident["status"], incident["isResolved"], incident["severity"]) == \
            ("open", False, "high")
        assert incident["rootCause"] == "HTTP 500 Internal Server Error"
        assert incident["rootCauseCategory"] == "SERVER_ERROR"
        assert incident["affectedRegions"] == ["local"] and incident["mttr"] is None
        assert (incident["checksFailed"], incident["checksTotal"]) == (1, 1)

        slack_down = json.loads(_inc_paths(notify_http, "/slack")[0]["body"])
        assert "Café ✓ is DOWN" in slack_down["text"] and "HTTP 500" in slack_down["text"]
        trigger = json.loads(_inc_paths(notify_http, "/pagerduty")[0]["body"])
        assert trigger["event_action"] == "trigger"
        assert trigger["routing_key"] == "pd-routing-key-123"
        hooks = _inc_paths(notify_http, "/hook")
        assert sorted(json.loads(h["body"])["event"] for h in hooks) == \
            ["incident.created", "monitor.down"]
        for request in hooks:  # an independent HMAC over the bytes received
            expected = hmac.new(b"s3cret", request["body"], hashlib.sha256).hexdigest()
            assert request["headers"]["x-webhook-signature"] == expected
        created = next(json.loads(h["body"]) for h in hooks
                       if b"incident.created" in h["body"])
        assert created["incident"]["incidentNumber"] == f"INC-{year}-0001"
        assert created["check"] == {"statusCode": 500, "responseTime": 1250,
                                    "error": "Internal Server Error", "region": "local"}
        assert list(created) == ["event", "timestamp", "monitor", "incident", "check",
                                 "deliveryId", "sentAt"]  # the spec's keys, then ours
        for request in hooks:  # each delivery's id and send time, in the header and the body
            sent = json.loads(request["body"])
            assert request["headers"]["x-statusapp-delivery"] == sent["deliveryId"]
            assert request["headers"]["x-statusapp-timestamp"] == str(sent["sentAt"])
        assert "INC-" in mailbox.envelopes[0].content.decode()

        up_at = down_at + 725_000
        _inc_transition(client, monitor["id"], "DOWN", "UP", up_at, None, _INC_UP)
        eventually(lambda: len(notify_http.requests) >= 8 and len(mailbox.envelopes) >= 2)

        resolved = client.get(f"/api/v1/incidents/{incident['id']}").json()
        assert (resolved["status"], resolved["isResolved"], resolved["mttr"]) == \
            ("resolved", True, 725)
        assert (resolved["checksFailed"], resolved["checksTotal"]) == (1, 2)
        assert [u["status"] for u in resolved["updates"]] == ["investigating", "resolved"]
        assert [c["status"] for c in resolved["checks"]] == ["UP", "DOWN"]
        assert resolved["monitor"]["name"] == "Café ✓"
        resolve = json.loads(_inc_paths(notify_http, "/pagerduty")[1]["body"])
        assert resolve["event_action"] == "resolve" and resolve["dedup_key"] == trigger["dedup_key"]
        assert "down for 12m 5s" in json.loads(_inc_paths(notify_http, "/slack")[1]["body"])["text"]
        assert sorted(json.loads(h["body"])["event"] for h in _inc_paths(notify_http, "/hook")) \
            == ["incident.created", "incident.resolved", "monitor.down", "monitor.up"]

        deliveries = client.get(f"/api/v1/webhooks/{hook.json()['id']}/deliveries").json()
        assert len(deliveries["deliveries"]) == 4
        assert all(d["statusCode"] == 200 and d["attempts"] == 1 and d["deliveredAt"]
                   for d in deliveries["deliveries"])
        listed = client.get(f"/api/v1/webhooks/{hook.json()['id']}").json()
        assert listed["lastStatus"] == 200 and listed["lastTriggeredAt"]
        assert sql(cfg, "SELECT COUNT(*) FROM status_transitions WHERE processed_at IS NULL") \
            == [(0,)]
        _inc_marker(cfg, monitor["id"], "UP", "DOWN", client)  # its DOWN: 4 requests and a mail
        assert len(notify_http.requests) == 8 + 4 and len(mailbox.envelopes) == 2 + 1  # once


def test_degraded_warns_without_incident_and_one_open_incident_per_monitor(tmp_path,
                                                                            notify_http):
    url = notify_http.url
    cfg = _inc_cfg(tmp_path, url)
    key = new_key(cfg)
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        slack = _inc_channel(client, "SLACK", {"webhookUrl": f"{url}/slack"})
        client.post("/api/v1/webhooks", json={"name": "w", "url": f"{url}/hook",
                                              "events": _INC_EVENTS})
        monitor = _inc_monitor(client, type="SSL_CERT", url="https://api.home.test",
                               notifications=[{"channelId": slack["id"]}])
        at = statusapp.now_ms()
        warning = statusapp.CheckResult(status="DEGRADED", error="certificate expires in 5 days",
                                        category="SSL_CERTIFICATE")
        _inc_transition(client, monitor["id"], "UP", "DEGRADED", at, warning.error, warning)
        eventually(lambda: len(notify_http.requests) >= 1)
        _inc_marker(cfg, monitor["id"], "DEGRADED", "DEGRADED", client)  # a repeat alerts nobody
        assert [r["path"] for r in notify_http.requests] == ["/slack"]  # webhooks: no event
        assert "DEGRADED" in json.loads(notify_http.requests[0]["body"])["text"]
        assert client.get("/api/v1/incidents").json()["incidents"] == []

        expired = statusapp.CheckResult(status="DOWN", error="certificate expired",
                                        category="SSL_CERTIFICATE")
        _inc_transition(client, monitor["id"], "DEGRADED", "DOWN", at + 1000, expired.error,
                        expired)
        _inc_transition(client, monitor["id"], "DOWN", "DOWN", at + 2000, "still down")
        eventually(lambda: client.get("/api/v1/incidents").json()["pagination"]["total"] == 1
                  and len(notify_http.requests) >= 4)
        incident = client.get("/api/v1/incidents?status=open").json()["incidents"][0]
        assert incident["rootCauseCategory"] == "SSL_CERTIFICATE"
        assert incident["rootCause"] == "certificate expired"
        assert client.get("/api/v1/incidents?status=resolved").json()["incidents"] == []
        assert sql(cfg, "SELECT COUNT(*) FROM incidents") == [(1,)]
        _inc_marker(cfg, monitor["id"], "DOWN", "DOWN", client)
        assert len(notify_http.requests) == 4  # the repeated DOWNs alerted nobody


def test_one_engine_batch_opens_and_resolves_an_incident_in_order(tmp_path, notify_http,
                                                                   monkeypatch):
    """Transitions consumed together see each other: the DOWN opens the incident the UP after
    it resolves, each queues its alert, and a new monitor's PENDING -> UP queues none."""
    cfg = _inc_cfg(tmp_path, notify_http.url)
    key = new_key(cfg)
    monkeypatch.setattr(statusapp, "SERVICES", ())  # the test runs the engine itself
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        slack = _inc_channel(client, "SLACK", {"webhookUrl": f"{notify_http.url}/slack"})
        monitor = _inc_monitor(client, notifications=[{"channelId": slack["id"]}])
        at = statusapp.now_ms()
        for old, new, check, step in (("PENDING", "UP", _INC_UP, 0), ("UP", "DOWN", _INC_DOWN, 1),
                                      ("DOWN", "UP", _INC_UP, 2)):
            _inc_transition(client, monitor["id"], old, new, at + step * 1000, new, check)
        rt = client.app.state.statusapp
        assert client.portal.call(statusapp.process_transitions, rt) == 3
    assert sql(cfg, "SELECT COUNT(*) FROM status_transitions WHERE processed_at IS NULL") == [(0,)]
    assert sql(cfg, "SELECT started_at, resolved_at, status FROM incidents") == \
        [(at + 1000, at + 2000, "resolved")]
    assert sql(cfg, "SELECT event FROM alert_outbox ORDER BY id") == \
        [("monitor.down",), ("monitor.up",)]


def test_queued_alert_survives_restart_and_is_delivered_once(tmp_path, notify_http,
                                                             monkeypatch):
    url = notify_http.url
    cfg = _inc_cfg(tmp_path, url)
    key = new_key(cfg)
    monkeypatch.setattr(statusapp, "SERVICES", ())  # "crash" before any delivery
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        slack = _inc_channel(client, "SLACK", {"webhookUrl": f"{url}/slack"})
        monitor = _inc_monitor(client, notifications=[{"channelId": slack["id"]}])
        _inc_transition(client, monitor["id"], "UP", "DOWN", statusapp.now_ms(), "boom",
                        _INC_DOWN)
        rt = client.app.state.statusapp
        assert client.portal.call(statusapp.process_transitions, rt) == 1
        assert client.portal.call(statusapp.process_transitions, rt) == 0
    assert notify_http.requests == []
    assert sql(cfg, "SELECT event FROM alert_outbox WHERE done_at IS NULL") == \
        [("monitor.down",)]
    monkeypatch.undo()
    for _ in range(2):
        with TestClient(statusapp.create_app(cfg)) as client:
            eventually(lambda: len(notify_http.requests) >= 1)
            _inc_marker(cfg, monitor["id"], "DOWN", "DOWN", client)  # consumed: nothing to send
    assert len(notify_http.requests) == 1
    assert sql(cfg, "SELECT status, attempts FROM alert_outbox") == [("delivered", 1)]


def test_engine_and_outbox_are_woken_by_work_and_never_poll_while_idle(tmp_path, notify_http,
                                                                       monkeypatch):
    """With the safety poll an hour away, a committed transition still gets its alert at once
    (the engine and the outbox were woken), and once it is delivered neither reads the
    database between two region sweeps: they wait for work instead of polling."""
    monkeypatch.setattr(statusapp, "INCIDENT_SAFETY_POLL", 3600.0)
    seen: list[str] = []
    fetchall, sweep = statusapp.Database.fetchall, statusapp.sweep_regions

    async def counted_fetchall(db, query, params=()):
        seen.append(query)
        return await fetchall(db, query, params)

    async def counted_sweep(rt):
        seen.append("sweep")
        await sweep(rt)
    monkeypatch.setattr(statusapp.Database, "fetchall", counted_fetchall)
    monkeypatch.setattr(statusapp, "sweep_regions", counted_sweep)
    url = notify_http.url
    cfg = _inc_cfg(tmp_path, url)
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": new_key(cfg)}) as client:
        slack = _inc_channel(client, "SLACK", {"webhookUrl": f"{url}/slack"})
        monitor = _inc_monitor(client, notifications=[{"channelId": slack["id"]}])
        _inc_transition(client, monitor["id"], "UP", "DOWN", statusapp.now_ms(), "boom",
                        _INC_DOWN)
        eventually(lambda: len(notify_http.requests) == 1)
        eventually(lambda: sql(cfg, "SELECT COUNT(*) FROM alert_outbox WHERE done_at IS NULL")
                   == [(0,)])
        mark = len(seen)
        eventually(lambda: seen[mark:].count("sweep") >= 3)
        sweeps = [n for n, query in enumerate(seen) if n >= mark and query == "sweep"]
        between = seen[sweeps[1]:sweeps[2]]  # after the last delivery's own wake-up settled
    assert [q for q in between if "alert_outbox" in q or "status_transitions" in q] == []
    assert "SELECT * FROM worker_regions" in between  # the sweep itself did read
    assert sql(cfg, "SELECT status FROM alert_outbox") == [("delivered",)]


def test_failing_channels_retry_are_marked_and_never_delay_others(tmp_path, notify_http):
    slow, flaky, refused = _NotifyReceiver(), _NotifyReceiver(), _NotifyReceiver()
    try:
        slow.script = [(200, b"{}", 3)] * 3  # longer than the timeout, which is generous
        flaky.script = [(500, b"try again", 0)]  # enough for any quick answer under load
        refused.script = [(401, b'{"ok":false,"description":"Unauthorized"}', 0)] * 2
        cfg = _inc_cfg(tmp_path, refused.url, timeout=2)
        key = new_key(cfg)
        with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
            channels = {
                "slow": _inc_channel(client, "SLACK", {"webhookUrl": f"{slow.url}/s"}),
                "flaky": _inc_channel(client, "DISCORD", {"webhookUrl": f"{flaky.url}/d"}),
                "down": _inc_channel(client, "MICROSOFT_TEAMS", {
                    "webhookUrl": f"http://127.0.0.1:{free_port()}/t"}),
                "refused": _inc_channel(client, "TELEGRAM", {"botToken": "123:SECRET",
                                                             "chatId": "42"}),
            }
            hook = client.post("/api/v1/webhooks", json={
                "name": "w", "url": f"{notify_http.url}/hook", "events": "monitor.down"}).json()
            notify_http.script = [(500, b"", 0)]
            monitor = _inc_monitor(client, notifications=[
                *({"channelId": c["id"]} for c in channels.values()),
                {"type": "DISCORD", "config": {"webhookUrl": f"{refused.url}/inline"}}])
            _inc_transition(client, monitor["id"], "UP", "DOWN", statusapp.now_ms(), "boom",
                            _INC_DOWN)
            eventually(lambda: sql(cfg, "SELECT COUNT(*), SUM(done_at IS NULL)"
                                       " FROM alert_outbox") == [(6, 0)])  # one snapshot
            outcome = {row[0]: row[1:] for row in sql(
                cfg, "SELECT COALESCE(channel_id, webhook_id), status, attempts, status_code,"
                     " done_at - created_at FROM alert_outbox")}
            assert outcome[channels["flaky"]["id"]][:3] == ("delivered", 2, 200)
            assert outcome[channels["refused"]["id"]][:3] == ("failed", 1, 401)
            assert outcome[channels["down"]["id"]][:3] == ("failed", 3, None)
            assert outcome[channels["slow"]["id"]][:2] == ("failed", 3)
            assert outcome[hook["id"]][:3] == ("delivered", 2, 200)
            # The slow channel took its three timeouts; the others did not wait for it.
            assert outcome[channels["slow"]["id"]][3] >= 3 * 2000
            slow_log = json.loads(sql(cfg, "SELECT attempt_log FROM alert_outbox WHERE"
                                           " channel_id = ?", (channels["slow"]["id"],))[0][0])
            assert outcome[channels["flaky"]["id"]][3] < slow_log[0]["durationMs"]  # no queue
            state = {c["id"]: c for c in client.get("/api/v1/notifications").json()["channels"]}
            refused_state = state[channels["refused"]["id"]]
            assert refused_state["failing"] and "401" in refused_state["lastError"]
            assert "SECRET" not in refused_state["lastError"]
            assert not state[channels["down"]["id"]]["failing"]
            assert state[channels["down"]["id"]]["lastError"]
            assert not state[channels["flaky"]["id"]]["failing"]
            links = client.get(f"/api/v1/monitors/{monitor['id']}").json()["monitorNotifications"]
            inline, linked_refused = links[-1], links[3]
            assert inline["channelId"] is None and inline["failing"]
            assert "401" in inline["lastError"]
            assert linked_refused["failing"] and not links[0]["failing"]
            log = json.loads(sql(cfg, "SELECT attempt_log FROM alert_outbox WHERE channel_id = ?",
                                 (channels["flaky"]["id"],))[0][0])
            assert [r["statusCode"] for r in log] == [500, 200]
            deliveries = client.get(f"/api/v1/webhooks/{hook['id']}/deliveries").json()
            assert [(d["statusCode"], d["attempts"]) for d in deliveries["deliveries"]] == \
                [(200, 2)]
    finally:
        for receiver in (slow, flaky, refused):
            receiver.close()


class _HangingReceivers:
    """Loopback ports that accept connections and never answer, counting connections per port
    and the most open at once (``peak``, since ``peak`` was last set to 0)."""

    def __init__(self, count: int) -> None:
        self.listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
        self.urls = [f"http://127.0.0.1:{s.getsockname()[1]}/hang" for s in self.listeners]
        self.accepted: dict[int, list[socket.socket]] = {i: [] for i in range(count)}
        self.open = self.peak = 0
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import selectors
        with selectors.DefaultSelector() as selector:
            for index, listener in enumerate(self.listeners):
                selector.register(listener, selectors.EVENT_READ, index)
            while not self.stop.is_set():
                ready = sorted(selector.select(0.05), key=lambda event: event[0].data is not None)
                for key, _ in ready:  # hang-ups first, then new connections
                    if key.data is None:  # a request arriving, or the client hanging up
                        if not key.fileobj.recv(65536):
                            selector.unregister(key.fileobj)
                            self.open -= 1
                        continue
                    conn = key.fileobj.accept()[0]
                    self.accepted[key.data].append(conn)
                    selector.register(conn, selectors.EVENT_READ, None)
                    self.open += 1
                    self.peak = max(self.peak, self.open)

    def close(self) -> None:
        self.stop.set()
        for sock in [*self.listeners, *itertools.chain(*self.accepted.values())]:
            sock.close()


def test_hung_receivers_hold_few_slots_and_a_healthy_channel_is_not_delayed(tmp_path,
                                                                             notify_http):
    hung = _HangingReceivers(100)
    try:
        cfg = _inc_cfg(tmp_path, notify_http.url, timeout=60)
        key = new_key(cfg)
        with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
            crowd = [*hung.urls, *[hung.urls[0]] * 10]  # the first host has 11 targets
            monitor = _inc_monitor(client, notifications=[
                *({"type": "WEBHOOK", "config": {"url": url}} for url in crowd),
                {"type": "SLACK", "config": {"webhookUrl": f"{notify_http.url}/healthy"}}])
            _inc_transition(client, monitor["id"], "UP", "DOWN", statusapp.now_ms(), "boom",
                            _INC_DOWN)
            eventually(lambda: _inc_paths(notify_http, "/healthy"))
            # It arrived while every hung delivery was still waiting on its 60 s timeout...
            assert sql(cfg, "SELECT COUNT(*) FROM alert_outbox WHERE channel_type = 'WEBHOOK'"
                            " AND done_at IS NULL AND attempts = 0") == [(110,)]
            # ...and the host with 11 targets holds only notifications.per_host slots.
            eventually(lambda: len(hung.accepted[0]) == cfg["notifications"]["per_host"])
            assert max(len(conns) for conns in hung.accepted.values()) == 4
    finally:
        hung.close()


def test_receivers_that_never_answer_share_a_quarter_of_the_slots_while_retrying(tmp_path):
    hung = _HangingReceivers(10)
    try:
        cfg = _inc_cfg(tmp_path, "http://127.0.0.1:9", timeout=0.2, attempts=1000,
                       retry_delay=0.01, retry_max_delay=0.01, concurrency=8)
        key = new_key(cfg)
        with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
            monitor = _inc_monitor(client, notifications=[
                {"type": "WEBHOOK", "config": {"url": url}} for url in hung.urls])
            _inc_transition(client, monitor["id"], "UP", "DOWN", statusapp.now_ms(), "boom")

            def attempts() -> int:
                return sql(cfg, "SELECT SUM(attempts) FROM alert_outbox")[0][0] or 0
            eventually(lambda: sql(cfg, "SELECT COUNT(*) FROM alert_outbox WHERE attempts > 0")
                       == [(10,)])  # every host has failed once
            assert hung.peak > 2  # unknown hosts got every slot they needed at first...
            hung.peak, seen = hung.open, attempts()
            eventually(lambda: attempts() >= seen + 20)
            assert hung.peak <= 2  # ...hosts that never answer then share 8 // 4 slots
    finally:
        hung.close()


def test_retries_back_off_durably_across_a_restart_with_one_delivery_id(tmp_path):
    port = free_port()
    cfg = _inc_cfg(tmp_path, f"http://127.0.0.1:{port}", attempts=50, retry_delay=0.05,
                   retry_max_delay=0.2)
    key = new_key(cfg)
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        hook = client.post("/api/v1/webhooks", json={
            "name": "w", "url": f"http://127.0.0.1:{port}/hook", "events": "monitor.down"}).json()
        monitor = _inc_monitor(client)
        _inc_transition(client, monitor["id"], "UP", "DOWN", statusapp.now_ms(), "boom")
        pending = eventually(lambda: [d for d in client.get(
            "/api/v1/deliveries?status=pending").json()["deliveries"] if d["attempts"] >= 2])
        assert pending[0]["webhookId"] == hook["id"] and pending[0]["nextAttemptAt"]
        assert "ConnectError" in pending[0]["lastError"] and pending[0]["finishedAt"] is None
    receiver = _NotifyReceiver(port)  # the receiver comes back, answering 503 twice first
    receiver.script = [(503, b"restarting", 0)] * 2
    try:
        with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
            delivered = eventually(lambda: client.get(
                "/api/v1/deliveries?status=delivered").json()["deliveries"])
            assert len(receiver.requests) == 3
            ids = {r["headers"]["x-statusapp-delivery"] for r in receiver.requests}
            assert ids == {json.loads(r["body"])["deliveryId"] for r in receiver.requests} == \
                {delivered[0]["id"]}
            assert delivered[0]["attempts"] >= 5 and delivered[0]["statusCode"] == 200
            log = json.loads(sql(cfg, "SELECT attempt_log FROM alert_outbox")[0][0])
            assert [r["statusCode"] for r in log[-3:]] == [503, 503, 200]
            assert client.get("/api/v1/deliveries?status=pending").json()["deliveries"] == []
    finally:
        receiver.close()


def test_default_retry_schedule_spans_an_hour_with_jitter():
    cfg = statusapp.load_config(environ={})
    attempts = cfg["notifications"]["attempts"]
    waits = [statusapp.retry_delay(n, cfg) for n in range(1, attempts)]
    assert sum(waits) >= 3600
    assert len({statusapp.retry_delay(1, cfg) for _ in range(20)}) > 1  # jittered


def test_alert_storm_groups_person_facing_channels_and_keeps_webhook_events(tmp_path,
                                                                          notify_http):
    url = notify_http.url
    cfg = _inc_cfg(tmp_path, url, storm_window=1.0)
    key = new_key(cfg)
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        slack = _inc_channel(client, "SLACK", {"webhookUrl": f"{url}/slack"})
        client.post("/api/v1/webhooks", json={"name": "w", "url": f"{url}/hook",
                                              "events": "monitor.down"})
        monitors = [_inc_monitor(client, name=f"host-{i:03d}",
                                 notifications=[{"channelId": slack["id"]}]) for i in range(200)]
        at = statusapp.now_ms()
        statements = [statement for m in monitors for statement in statusapp.transition_statements(
            m["id"], "UP", "DOWN", "connection refused", at)]
        _inc_write(client, statements)
        eventually(lambda: sql(cfg, "SELECT COUNT(*), SUM(done_at IS NULL) FROM alert_outbox")
                   == [(400, 0)])  # one snapshot: all queued and all done
        assert len(_inc_paths(notify_http, "/hook")) == 200  # machines: one event each
        assert {json.loads(r["body"])["monitor"]["name"]
                for r in _inc_paths(notify_http, "/hook")} == {m["name"] for m in monitors}
        grouped = _inc_paths(notify_http, "/slack")
        assert len(grouped) == 1  # people: one message
        text = json.loads(grouped[0]["body"])["text"]
        assert text.startswith("200 monitors DOWN: host-000, host-001") and "and 180 more" in text
        listed = client.get(f"/api/v1/notifications/{slack['id']}/deliveries?limit=100").json()
        assert listed["pagination"]["total"] == 200  # every alert is still recorded
        assert {d["status"] for d in listed["deliveries"]} == {"delivered"}


_INC_VALID_CONFIGS = {
    "EMAIL": {"emails": ["team@home.test"]},
    "SMS": {"phoneNumbers": ["+1234567890"]},
    "SLACK": {"webhookUrl": "https://hooks.slack.com/services/T0/B0/abcdefghijkl",
              "channel": "#alerts"},
    "DISCORD": {"webhookUrl": "https://discord.com/api/webhooks/1/abcdefghijkl"},
    "TELEGRAM": {"botToken": "123456:ABCdefGHIjklMNO", "chatId": "-1001234567890"},
    "PAGERDUTY": {"integrationKey": "your-pagerduty-integration-key", "severity": "critical"},
    "OPSGENIE": {"apiKey": "your-opsgenie-api-key", "priority": "P1"},
    "MICROSOFT_TEAMS": {"webhookUrl": "https://outlook.office.com/webhook/abcdefghijkl"},
    "WEBHOOK": {"url": "https://api.home.test/webhook",
                "headers": {"Authorization": "Bearer token-abcdefghijkl"}},
    "NTFY": {"serverUrl": "https://ntfy.sh", "topic": "homelab-alerts",
             "token": "tk_abcdefghijklmnop", "priority": 4},
    "GOTIFY": {"serverUrl": "https://gotify.home.test", "appToken": "AvKcy9o-yvVhyKd",
               "priority": 6},
    "PUSHOVER": {"userKey": "uQiRzpo4DXghDmr9QzzfQu27cmVRsG",
                 "appToken": "azGDORePK8gMaC0QOYAMyEEuzJnyUi", "retry": 120, "expire": 7200},
    "MATRIX": {"homeserver": "https://matrix.home.test", "accessToken": "syt_abcdefghijklmnop",
               "roomId": "!homelab:matrix.home.test"},
    "APPRISE": {"urls": ["json://127.0.0.1:9/hook", "ntfys://tk_abcdefghijklmnop@ntfy.sh/x"]},
}


@pytest.mark.parametrize("kind", statusapp.CHANNEL_TYPES)
def test_channel_config_is_validated_per_type_and_secrets_masked(client, kind):
    config = _INC_VALID_CONFIGS[kind]
    created = _inc_channel(client, kind, config, name=f"{kind} channel")
    secrets_ = statusapp.CHANNEL_TYPES[kind].secrets
    shown = created["config"]
    for name, value in config.items():
        if name not in secrets_:
            assert shown[name] == value
        elif isinstance(value, str):
            assert shown[name] != value and shown[name].startswith("****")
        else:
            values = shown[name].values() if isinstance(shown[name], dict) else shown[name]
            assert all(v.startswith("****") for v in values)
    assert client.get("/api/v1/notifications").json()["channels"][0]["id"] == created["id"]
    # Echoing the masked config back keeps the stored secrets.
    updated = client.put(f"/api/v1/notifications/{created['id']}",
                         json={"name": "renamed", "config": shown})
    assert updated.status_code == 200 and updated.json()["name"] == "renamed"
    rows = sql(client.app.state.statusapp.cfg, "SELECT config FROM notification_channels")
    assert json.loads(rows[0][0]) == config
    for required in statusapp.CHANNEL_TYPES[kind].required:
        bad = {k: v for k, v in config.items() if k != required}
        response = client.post("/api/v1/notifications",
                               json={"name": "x", "type": kind, "config": bad})
        assert response.status_code == 400
        assert response.json()["error"][0]["path"] == ["config", required]


def test_telegram_token_shaped_like_the_specs_example_is_accepted(client):
    for token in ("123456:ABC...", "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"):
        created = client.post("/api/v1/notifications", json={
            "name": "Telegram Bot", "type": "TELEGRAM",
            "config": {"botToken": token, "chatId": "-1001234567890"}})
        assert created.status_code == 201, created.text
    for token in ("ABC", "123456", ":ABC", "12a:ABC", "123456:AB C"):
        refused = client.post("/api/v1/notifications", json={
            "name": "t", "type": "TELEGRAM", "config": {"botToken": token, "chatId": "1"}})
        assert refused.status_code == 400 and refused.json()["error"][0]["path"] == [
            "config", "botToken"], token


def test_channel_crud_and_inline_monitor_configs_share_the_rules(client):
    response = client.post("/api/v1/notifications",
                           json={"name": "x", "type": "SLACK", "config": {}})
    assert response.status_code == 400 and response.json()["error"][0]["path"] == \
        ["config", "webhookUrl"]
    bad = client.post("/api/v1/notifications", json={"name": "x", "type": "SMS",
                                                     "config": {"phoneNumbers": ["555"]}})
    assert bad.status_code == 400 and "E.164" in bad.json()["error"][0]["message"]
    inline = client.post("/api/v1/monitors", json={
        "name": "m", "url": "https://api.home.test", "isActive": False,
        "notifications": [{"type": "PAGERDUTY", "config": {"severity": "loud"}}]})
    assert inline.status_code == 400
    assert {tuple(i["path"]) for i in inline.json()["error"]} == {
        ("notifications", 0, "config", "integrationKey"),
        ("notifications", 0, "config", "severity")}
    ok = _inc_monitor(client, notifications=[
        {"type": "TELEGRAM", "config": {"botToken": "123456:ABCdefGHIjklMNO", "chatId": 42}}])
    link = ok["monitorNotifications"][0]
    assert link["config"] == {"botToken": "****lMNO", "chatId": "42"}
    channel = _inc_channel(client, "OPSGENIE", {"apiKey": "opsgenie-key-abcdef"})
    moved = client.put(f"/api/v1/notifications/{channel['id']}", json={"type": "SLACK"})
    assert moved.status_code == 400  # the stored config does not fit the new type
    assert client.put(f"/api/v1/notifications/{channel['id']}",
                      json={"isActive": False}).json()["isActive"] is False
    assert client.delete(f"/api/v1/notifications/{channel['id']}").json()["success"]
    assert client.get(f"/api/v1/notifications/{channel['id']}").status_code == 404


def test_webhook_crud_events_secret_and_test_endpoint(client, notify_http):
    bad = client.post("/api/v1/webhooks", json={"name": "w", "url": notify_http.url,
                                                "events": "monitor.down,monitor.sideways"})
    assert bad.status_code == 400 and bad.json()["error"][0]["path"] == ["events"]
    assert "monitor.sideways" in bad.json()["error"][0]["message"]
    missing = client.post("/api/v1/webhooks", json={"name": "w", "url": notify_http.url})
    assert missing.json()["error"][0]["path"] == ["events"]
    created = client.post("/api/v1/webhooks", json={
        "name": "w", "url": f"{notify_http.url}/hook", "secret": "s3cret",
        "events": " monitor.down , incident.created,monitor.down"}).json()
    assert created["events"] == "monitor.down,incident.created"
    assert created["hasSecret"] and "secret" not in created and created["lastStatus"] is None
    assert client.get("/api/v1/webhooks").json()["webhooks"][0]["id"] == created["id"]

    result = client.post(f"/api/v1/webhooks/{created['id']}/test").json()
    assert result["success"] is True and result["statusCode"] == 200
    assert isinstance(result["responseTime"], int)
    request = notify_http.requests[0]
    assert json.loads(request["body"])["event"] == "test"
    assert request["headers"]["x-webhook-signature"] == \
        hmac.new(b"s3cret", request["body"], hashlib.sha256).hexdigest()
    notify_http.script = [(404, b"gone", 0)]
    failed = client.post(f"/api/v1/webhooks/{created['id']}/test").json()
    assert failed["success"] is False and failed["statusCode"] == 404
    shown = client.get(f"/api/v1/webhooks/{created['id']}").json()
    assert shown["lastStatus"] == 404 and shown["lastTriggeredAt"]
    deliveries = client.get(f"/api/v1/webhooks/{created['id']}/deliveries").json()["deliveries"]
    assert [(d["event"], d["statusCode"], d["attempts"]) for d in deliveries] == \
        [("test", 404, 1), ("test", 200, 1)]
    assert deliveries[0]["deliveredAt"] is None and deliveries[1]["deliveredAt"]

    cleared = client.put(f"/api/v1/webhooks/{created['id']}", json={"secret": None}).json()
    assert cleared["hasSecret"] is False and cleared["name"] == "w"
    client.post(f"/api/v1/webhooks/{created['id']}/test")
    assert "x-webhook-signature" not in notify_http.requests[-1]["headers"]
    assert client.delete(f"/api/v1/webhooks/{created['id']}").json()["success"]
    assert client.get(f"/api/v1/webhooks/{created['id']}").status_code == 404


def test_incident_listing_filters_and_manual_updates(cfg, client, notify_http):
    cfg["notifications"]["retry_delay"] = 0.01
    hook = client.post("/api/v1/webhooks", json={"name": "w", "url": f"{notify_http.url}/hook",
                                                 "events": "incident.resolved"}).json()
    first, second = _inc_monitor(client, "first"), _inc_monitor(client, "second")
    at = statusapp.now_ms()
    _inc_transition(client, first["id"], "UP", "DOWN", at - 5000, "refused", _INC_DOWN)
    _inc_transition(client, second["id"], "UP", "DOWN", at - 3000, "refused", _INC_DOWN)
    _inc_transition(client, first["id"], "DOWN", "UP", at - 1000, None, _INC_UP)
    eventually(lambda: client.get("/api/v1/incidents?status=resolved").json()["incidents"])
    listed = client.get("/api/v1/incidents?sort=startedAt&order=asc").json()["incidents"]
    assert [i["monitorId"] for i in listed] == [first["id"], second["id"]]
    assert [i["incidentNumber"][-4:] for i in listed] == ["0001", "0002"]
    only = client.get(f"/api/v1/incidents?monitorId={second['id']}").json()
    assert only["pagination"]["total"] == 1 and only["incidents"][0]["status"] == "open"
    paged = client.get("/api/v1/incidents?limit=1&page=2&sort=mttr&order=desc").json()
    assert paged["pagination"] == {"total": 2, "page": 2, "limit": 1, "totalPages": 2}
    assert client.get("/api/v1/incidents?sort=name").status_code == 400
    assert client.get("/api/v1/incidents?status=closed").status_code == 400

    incident_id = only["incidents"][0]["id"]
    note = client.post(f"/api/v1/incidents/{incident_id}/updates",
                       json={"status": "identified", "message": "DB failover in progress"})
    assert note.status_code == 201 and note.json()["status"] == "open"
    assert note.json()["updates"][-1]["message"] == "DB failover in progress"
    assert client.post(f"/api/v1/incidents/{incident_id}/updates",
                       json={"status": "fixed", "message": "x"}).status_code == 400
    done = client.post(f"/api/v1/incidents/{incident_id}/updates",
                       json={"status": "resolved", "message": "Failover complete"}).json()
    assert done["isResolved"] and done["mttr"] >= 3
    assert [u["status"] for u in done["updates"]] == ["investigating", "identified", "resolved"]
    assert client.post(f"/api/v1/incidents/{incident_id}/updates",
                       json={"status": "monitoring", "message": "x"}).status_code == 409
    eventually(lambda: len(notify_http.requests) >= 2)  # the first monitor's and this one
    events = [json.loads(r["body"]) for r in notify_http.requests]
    assert sorted(e["monitor"]["name"] for e in events) == ["first", "second"]
    assert {e["event"] for e in events} == {"incident.resolved"}
    assert client.get(f"/api/v1/webhooks/{hook['id']}").json()["lastStatus"] == 200
    assert client.get("/api/v1/incidents/inc_nope").status_code == 404


def test_target_down_opens_one_incident_alerts_once_and_recovery_resolves_it(tmp_path, target,
                                                                             notify_http):
    """End to end through the real prober: `statusapp serve`, a loopback target that fails and
    recovers, and a loopback receiver standing in for Slack, PagerDuty and a webhook endpoint."""
    srv = Server(tmp_path, env={"STATUSAPP_PROBES_RETRY_DELAY": "1",
                                "STATUSAPP_NOTIFICATIONS_RETRY_DELAY": "0.2",
                                "STATUSAPP_NOTIFICATIONS_PAGERDUTY_URL": notify_http.url + "/pd"})
    srv.start()
    key = _owner_key(srv)
    api = httpx.Client(base_url=srv.url + "/api/v1", headers={"X-API-Key": key}, timeout=10)
    try:
        hook = api.post("/webhooks", json={
            "name": "hook", "url": notify_http.url + "/hook", "secret": "s3cret",
            "events": "monitor.down,monitor.up,incident.created,incident.resolved"})
        assert hook.status_code == 201, hook.text
        monitor = api.post("/monitors", json={
            "name": "Café ✓ API", "url": target.url("/svc"), "interval": 1, "timeout": 5,
            "notifications": [
                {"type": "SLACK", "config": {"webhookUrl": notify_http.url + "/slack"}},
                {"type": "PAGERDUTY", "config": {"integrationKey": "pd-routing-key-1234"}}]})
        assert monitor.status_code == 201, monitor.text
        monitor_id = monitor.json()["id"]
        eventually(lambda: api.get(f"/monitors/{monitor_id}").json()["status"] == "UP")

        def sent(path: str) -> list[dict]:
            return [json.loads(r["body"]) for r in notify_http.requests if r["path"] == path]

        target.modes["/svc"] = "fail"
        opened = eventually(lambda: api.get("/incidents", params={"status": "open"}).json()["incidents"])
        assert len(opened) == 1
        incident = opened[0]
        assert incident["monitorId"] == monitor_id and incident["severity"] == "high"
        assert incident["rootCauseCategory"] == "SERVER_ERROR" and "500" in incident["rootCause"]
        assert incident["incidentNumber"] == f"INC-{time.gmtime().tm_year}-0001"
        eventually(lambda: len(sent("/slack")) == 1 and len(sent("/pd")) == 1
                    and len(sent("/hook")) == 2)

        target.modes["/svc"] = "ok"
        resolved = eventually(lambda: api.get(f"/incidents/{incident['id']}").json()["isResolved"])
        assert resolved
        detail = api.get(f"/incidents/{incident['id']}").json()
        assert detail["status"] == "resolved" and detail["mttr"] is not None
        span = (dt.datetime.fromisoformat(detail["resolvedAt"].replace("Z", "+00:00"))
                - dt.datetime.fromisoformat(detail["startedAt"].replace("Z", "+00:00")))
        assert abs(detail["mttr"] - span.total_seconds()) <= 1
        assert [u["status"] for u in detail["updates"]] == ["investigating", "resolved"]
        eventually(lambda: len(sent("/slack")) == 2 and len(sent("/pd")) == 2
                    and len(sent("/hook")) == 4)
        assert len(api.get("/incidents").json()["incidents"]) == 1
        _inc_settled({"server": {"database": srv.db}})
        assert (len(sent("/slack")), len(sent("/pd")), len(sent("/hook"))) == (2, 2, 4)  # once
        trigger, resolve = sent("/pd")
        assert (trigger["event_action"], resolve["event_action"]) == ("trigger", "resolve")
        assert trigger["dedup_key"] == resolve["dedup_key"]
        assert "Café ✓ API" in json.dumps(sent("/slack")[0], ensure_ascii=False)
        events = [body["event"] for body in sent("/hook")]
        assert sorted(events[:2]) == ["incident.created", "monitor.down"]
        assert sorted(events[2:]) == ["incident.resolved", "monitor.up"]
        for request in (r for r in notify_http.requests if r["path"] == "/hook"):
            expected = hmac.new(b"s3cret", request["body"], hashlib.sha256).hexdigest()
            assert request["headers"]["x-webhook-signature"] == expected
    finally:
        srv.stop()


# Maintenance windows.  The calendar's clock is injected (rt.maintenance.clock); the tests write
# transitions the way the prober does and wake the window-end service after moving the clock.

def _window(client, **fields) -> dict:
    response = client.post("/api/v1/maintenance-windows", json={"title": "Reboot", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def _utc_ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


def _move_clock(client, at: int) -> None:
    """Move the maintenance clock; public pages are rendered afresh (the window service does
    that itself at each window's start and end)."""
    rt = client.app.state.statusapp
    rt.maintenance.clock = lambda: at
    rt.public_cache.invalidate()
    client.portal.call(rt.maintenance.wake.set)


def test_recurring_window_follows_its_zone_across_dst(client):
    window = _window(client, startsAt="2026-03-01T03:00:00", timezone="Europe/Berlin",
                     recurrence="RRULE:FREQ=WEEKLY;BYDAY=SU", durationMinutes=30)
    url = f"/api/v1/maintenance-windows/{window['id']}"
    expectations = [  # (clock, active, next occurrence start in UTC)
        ("2026-03-20T12:00:00+00:00", False, "2026-03-22T02:00:00Z"),  # CET: 03:00 = 02:00Z
        ("2026-03-27T12:00:00+00:00", False, "2026-03-29T01:00:00Z"),  # CEST from 29 March
        ("2026-03-29T01:10:00+00:00", True, "2026-03-29T01:00:00Z"),
        ("2026-10-24T12:00:00+00:00", False, "2026-10-25T02:00:00Z"),  # CET again
    ]
    for clock, active, starts in expectations:
        _move_clock(client, _utc_ms(clock))
        got = client.get(url).json()
        assert (got["active"], got["nextOccurrence"]["startsAt"]) == (active, starts), clock
        assert got["nextOccurrence"]["endsAt"] == iso_plus(starts, minutes=30)
    counted = _window(client, startsAt="2026-01-05T09:00:00Z", durationMinutes=60,
                      recurrence="FREQ=DAILY;INTERVAL=2;BYHOUR=9,17;BYMINUTE=0;COUNT=3")
    _move_clock(client, _utc_ms("2026-01-05T12:00:00+00:00"))
    got = client.get(f"/api/v1/maintenance-windows/{counted['id']}").json()
    assert got["nextOccurrence"]["startsAt"] == "2026-01-05T17:00:00Z"
    _move_clock(client, _utc_ms("2026-01-07T10:30:00+00:00"))
    got = client.get(f"/api/v1/maintenance-windows/{counted['id']}").json()
    assert got["nextOccurrence"] is None  # COUNT=3: 5 Jan 09:00, 5 Jan 17:00, 7 Jan 09:00
    until = _window(client, startsAt="2026-03-01T02:00:00Z", timezone="Europe/Berlin",
                    recurrence="FREQ=WEEKLY;BYDAY=SU;UNTIL=20260315T020000Z", durationMinutes=30)
    for clock, starts in [("2026-03-14T00:00:00+00:00", "2026-03-15T02:00:00Z"),
                          ("2026-03-16T00:00:00+00:00", None)]:
        _move_clock(client, _utc_ms(clock))
        got = client.get(f"/api/v1/maintenance-windows/{until['id']}").json()["nextOccurrence"]
        assert (got and got["startsAt"]) == starts


def iso_plus(text: str, **delta) -> str:
    moment = dt.datetime.fromisoformat(text) + dt.timedelta(**delta)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_maintenance_window_validation_and_crud(client):
    bad = client.post("/api/v1/maintenance-windows", json={
        "title": "x", "startsAt": "tomorrow", "timezone": "Mars/Base",
        "recurrence": "FREQ=SECONDLY", "monitorIds": ["mon_nope"]})
    assert bad.status_code == 400
    assert sorted(i["path"][0] for i in bad.json()["error"]) == \
        ["monitorIds", "recurrence", "startsAt", "timezone"]
    for fields, path in [({"startsAt": "2026-01-01T00:00:00Z"}, "endsAt"),
                         ({"startsAt": "2026-01-01T00:00:00Z", "endsAt": "2025-12-31T00:00:00Z"},
                          "endsAt"),
                         ({"startsAt": "2026-01-01T00:00:00Z", "recurrence": "FREQ=DAILY"},
                          "durationMinutes")]:
        response = client.post("/api/v1/maintenance-windows", json={"title": "x", **fields})
        assert response.status_code == 400 and response.json()["error"][0]["path"] == [path]
    window = _window(client, startsAt="2026-01-01T00:00:00Z", endsAt="2026-01-01T01:00:00Z")
    assert (window["monitorIds"], window["suppressAlerts"], window["timezone"]) == \
        (None, True, "UTC")
    url = f"/api/v1/maintenance-windows/{window['id']}"
    changed = client.put(url, json={"title": "Upgrade", "suppressAlerts": False})
    assert changed.status_code == 200
    assert (changed.json()["title"], changed.json()["suppressAlerts"]) == ("Upgrade", False)
    assert [w["id"] for w in client.get("/api/v1/maintenance-windows").json()[
        "maintenanceWindows"]] == [window["id"]]
    assert client.delete(url).status_code == 200
    assert client.get(url).status_code == 404


def test_outage_inside_a_window_alerts_nobody_and_one_outlasting_it_alerts_once(
        tmp_path, notify_http):
    cfg = _inc_cfg(tmp_path, notify_http.url)
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": new_key(cfg)}) as client:
        slack = [{"type": "SLACK", "config": {"webhookUrl": f"{notify_http.url}/slack"}}]
        brief = _inc_monitor(client, "Brief", notifications=slack)
        long = _inc_monitor(client, "Long", notifications=slack)
        other = _inc_monitor(client, "Elsewhere", isActive=False)
        now = statusapp.now_ms()
        window = _window(client, startsAt=statusapp.iso(now - 600_000),
                         endsAt=statusapp.iso(now + 600_000),
                         monitorIds=[brief["id"], long["id"]])
        shown = {m["id"]: m["status"] for m in client.get("/api/v1/monitors").json()["monitors"]}
        assert shown == {brief["id"]: "MAINTENANCE", long["id"]: "MAINTENANCE",
                         other["id"]: "PENDING"}
        _inc_transition(client, brief["id"], "PENDING", "DOWN", now, "HTTP 500", _INC_DOWN)
        _inc_transition(client, long["id"], "PENDING", "DOWN", now, "HTTP 500", _INC_DOWN)
        _inc_transition(client, brief["id"], "DOWN", "UP", now + 1000, "HTTP 200", _INC_UP)
        eventually(lambda: not sql(cfg, "SELECT 1 FROM status_transitions"
                                        " WHERE processed_at IS NULL"))
        assert sql(cfg, "SELECT COUNT(*) FROM incidents")[0][0] == 0
        assert notify_http.requests == []

        _move_clock(client, now + 660_000)  # the window has ended; "long" is still down
        eventually(lambda: notify_http.requests)
        incidents = client.get("/api/v1/incidents").json()["incidents"]
        assert [(i["monitorId"], i["status"]) for i in incidents] == [(long["id"], "open")]
        assert incidents[0]["startedAt"] == statusapp.iso(_utc_ms(window["endsAt"]))
        assert "still down when maintenance window 'Reboot' ended" in incidents[0]["rootCause"]
        _move_clock(client, now + 900_000)
        _move_clock(client, now + 1_000_000)
        eventually(lambda: not sql(cfg, "SELECT 1 FROM status_transitions"
                                        " WHERE processed_at IS NULL"))
        assert sql(cfg, "SELECT COUNT(*) FROM incidents")[0][0] == 1
        assert len(eventually(lambda: notify_http.requests)) == 1
        assert "Long is DOWN" in notify_http.requests[0]["body"].decode()


def test_deleting_a_running_window_opens_the_incident_of_a_monitor_still_down(cfg, client):
    monitor = _inc_monitor(client)
    now = statusapp.now_ms()
    window = _window(client, startsAt=statusapp.iso(now - 60_000),
                     endsAt=statusapp.iso(now + 3_600_000))
    _inc_transition(client, monitor["id"], "PENDING", "DOWN", now, "HTTP 500", _INC_DOWN)
    eventually(lambda: not sql(cfg, "SELECT 1 FROM status_transitions WHERE processed_at IS NULL"))
    assert sql(cfg, "SELECT COUNT(*) FROM incidents") == [(0,)]
    assert client.delete(f"/api/v1/maintenance-windows/{window['id']}").status_code == 200
    eventually(lambda: sql(cfg, "SELECT COUNT(*) FROM incidents") == [(1,)])


def test_window_end_service_wakes_at_the_end_on_the_real_clock(cfg, client):
    monitor = _inc_monitor(client)
    now = statusapp.now_ms()
    _window(client, startsAt=statusapp.iso(now - 60_000), endsAt=statusapp.iso(now + 1500))
    _inc_transition(client, monitor["id"], "PENDING", "DOWN", now, "HTTP 500", _INC_DOWN)
    eventually(lambda: not sql(cfg, "SELECT 1 FROM status_transitions WHERE processed_at IS NULL"))
    assert sql(cfg, "SELECT COUNT(*) FROM incidents") == [(0,)]
    eventually(lambda: sql(cfg, "SELECT COUNT(*) FROM incidents") == [(1,)])
    (started,), = sql(cfg, "SELECT started_at FROM incidents")
    assert started == _utc_ms(statusapp.iso(now + 1500).replace("Z", "+00:00"))


def test_maintenance_checks_are_left_out_of_uptime(client):
    monitor = _inc_monitor(client)
    now = statusapp.now_ms()
    statements = (statusapp.check_statements(monitor["id"], "local", _INC_UP, now - 3000)
                  + statusapp.check_statements(monitor["id"], "local", _INC_DOWN, now - 2000, True)
                  + statusapp.check_statements(monitor["id"], "local", _INC_UP, now - 1000))
    client.portal.call(client.app.state.statusapp.db.write, statements)
    figures = client.get(f"/api/v1/analytics/monitors/{monitor['id']}?period=24h").json()
    assert (figures["uptime"], figures["totalChecks"], figures["checksDown"]) == (100.0, 2, 0)


def test_status_page_and_feed_show_maintenance_ahead_and_while_it_runs(client):
    monitor = _inc_monitor(client, "Router", isActive=True, url="http://127.0.0.1:9/")
    page = client.post("/api/v1/status-pages", json={
        "name": "Home", "slug": "home", "monitorGroups": [{"name": "Net",
                                                            "monitorIds": [monitor["id"]]}]})
    assert page.status_code == 201
    now = statusapp.now_ms()
    _window(client, title="Firmware upgrade", description="Router reboots twice",
            startsAt=statusapp.iso(now + 2 * 86_400_000),
            endsAt=statusapp.iso(now + 2 * 86_400_000 + 3_600_000))
    html_page = client.get("/status/home").text
    assert "Scheduled maintenance" in html_page
    assert "Firmware upgrade (scheduled)" in html_page and "Router reboots twice" in html_page
    feed = client.get("/status/home/feed.atom").text
    assert "<title>Maintenance: Firmware upgrade (scheduled)</title>" in feed
    summary = client.get("/status/home.json").json()
    assert [(w["title"], w["state"]) for w in summary["maintenance"]] == \
        [("Firmware upgrade", "scheduled")]
    assert summary["groups"][0]["monitors"][0]["status"] != "MAINTENANCE"

    _move_clock(client, now + 2 * 86_400_000 + 60_000)
    assert "Firmware upgrade (in progress)" in client.get("/status/home").text
    assert ">maintenance<" in client.get(f"/badge/{monitor['id']}/status.svg").text
    assert "Firmware upgrade (in progress)" in client.get("/status/home/feed.atom").text
    summary = client.get("/status/home.json").json()
    assert summary["maintenance"][0]["state"] == "in_progress"
    assert summary["groups"][0]["monitors"][0]["status"] == "MAINTENANCE"
    _move_clock(client, now + 3 * 86_400_000)
    assert client.get("/status/home.json").json()["maintenance"] == []


# --- Analytics and retention tests ---


def _cron_monitor(client, name: str = "job") -> str:
    """A CRON monitor: nothing probes it, so the only checks are the ones a test stores."""
    response = client.post("/api/v1/monitors", json={"name": name, "type": "CRON"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _store_checks(cfg, monitor_id: str, rows: list) -> None:
    """Store (status, response_time, checked_at ms[, region]) rows as checks."""
    with sqlite3.connect(cfg["server"]["database"]) as conn:
        conn.executemany(
            "INSERT INTO checks (monitor_id, region_id, status, response_time, checked_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [(monitor_id, r[3] if len(r) > 3 else "local", r[0], r[1], r[2]) for r in rows])


def test_monitor_analytics_are_exact_on_a_known_sequence(cfg, client):
    monitor = _cron_monitor(client)
    now = int(time.time() * 1000)
    minute = 60_000
    rows = [("UP", 100 * (i + 1), now - (i + 1) * minute, "eu" if i < 3 else "us")
            for i in range(7)]
    rows += [("DOWN", 9000, now - 8 * minute), ("DOWN", None, now - 9 * minute),
             ("DEGRADED", 800, now - 10 * minute, "eu"),
             ("DOWN", None, now - 3 * 3_600_000)]  # outside 1h, inside 24h
    _store_checks(cfg, monitor, rows)
    body = client.get(f"/api/v1/analytics/monitors/{monitor}?period=1h").json()
    assert body == {
        "monitorId": monitor, "period": "1h", "uptime": 80.0, "avgResponseTime": 450,
        "p50ResponseTime": 400, "p95ResponseTime": 800, "p99ResponseTime": 800,
        "totalChecks": 10, "checksUp": 7, "checksDown": 2, "checksDegraded": 1, "incidents": 0,
        "mttr": None, "responseTimeByRegion": {"eu": 350, "us": 550}}
    day = client.get(f"/api/v1/analytics/monitors/{monitor}").json()
    assert day["period"] == "24h"
    assert (day["totalChecks"], day["uptime"]) == (11, 72.72)  # 8/11 rounded down


def test_analytics_period_is_validated_and_monitors_are_team_scoped(cfg, client):
    monitor = _cron_monitor(client)
    response = client.get(f"/api/v1/analytics/monitors/{monitor}?period=2d")
    assert response.status_code == 400
    assert response.json()["error"][0]["path"] == ["period"]
    assert client.get("/api/v1/analytics/monitors/mon_nope").status_code == 404
    other = new_key(cfg, "other@example.test")
    response = client.get(f"/api/v1/analytics/monitors/{monitor}",
                          headers={"X-API-Key": other})
    assert response.status_code == 404


def test_dashboard_counts_agree_with_the_monitors_api(cfg, client):
    ids = [_cron_monitor(client, f"m{i}") for i in range(5)]
    for monitor, status in zip(ids, ("UP", "UP", "DOWN", "DEGRADED")):
        sql(cfg, "UPDATE monitors SET status = ? WHERE id = ?", (status, monitor))
    client.post(f"/api/v1/monitors/{ids[1]}/pause")
    now = int(time.time() * 1000)
    team = sql(cfg, "SELECT account_id FROM monitors WHERE id = ?", (ids[0],))[0][0]
    for number, (started, resolved) in enumerate([(now - 600_000, None),
                                                  (now - 400_000, now - 100_000),
                                                  (now - 5 * 86_400_000, now - 5 * 86_400_000 + 1_800_000)]):
        sql(cfg, "INSERT INTO incidents (id, account_id, monitor_id, year, number, started_at,"
                 " resolved_at, severity, status) VALUES (?, ?, ?, 2025, ?, ?, ?, 'HIGH', ?)",
            (f"inc_{number}", team, ids[2], number, started, resolved,
             "resolved" if resolved else "open"))
    _store_checks(cfg, ids[0], [("UP", 100, now - 60_000), ("DOWN", None, now - 120_000)])
    inactive = _cron_monitor(client, "off")
    assert client.put(f"/api/v1/monitors/{inactive}", json={"isActive": False}).status_code == 200
    body = client.get("/api/v1/analytics").json()
    listed = {s: client.get(f"/api/v1/monitors?status={s}").json()["pagination"]["total"]
              for s in ("UP", "DOWN", "DEGRADED")}
    assert body["monitors"] == {"total": 6, "active": 4, "paused": 2, "up": listed["UP"],
                                "down": listed["DOWN"], "degraded": listed["DEGRADED"]}
    assert listed == {"UP": 2, "DOWN": 1, "DEGRADED": 1}
    resolved_today = 1 if (now - 100_000) // 86_400_000 == now // 86_400_000 else 0
    assert body["incidents"] == {"open": 1, "resolvedToday": resolved_today,
                                 "resolvedThisWeek": 2, "avgMttr": (300 + 1800) // 2}
    performance = body["performance"]  # p95 comes from the rollup histogram: within 2.5%
    assert (performance["avgResponseTime"], performance["overallUptime"]) == (100, 50.0)
    assert abs(performance["p95ResponseTime"] - 100) <= 100 * 0.025 + 1


def _on_db(cfg, job):
    """Run ``await job(db)`` on an open Database of cfg (no server running)."""
    async def run():
        db = statusapp.Database(cfg["server"]["database"])
        await db.open()
        try:
            return await job(db)
        finally:
            await db.close()
    return asyncio.run(run())


def _monitors(cfg, count: int, **columns) -> list:
    """``count`` CRON monitors created through the API (then the server stops)."""
    key = new_key(cfg)
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        ids = [_cron_monitor(client, f"m{i}") for i in range(count)]
    for name, value in columns.items():
        sql(cfg, f"UPDATE monitors SET {name} = ?", (value,))
    return ids


def test_rollups_give_the_same_analytics_as_raw_checks(cfg):
    rnd = random.Random(6)
    monitor = _monitors(cfg, 1)[0]
    hour, day = statusapp.HOUR_MS, statusapp.DAY_MS
    end = int(time.time() * 1000) // hour * hour - hour
    start = end - 3 * day + 1_800_000
    rows = [(rnd.choice(["UP"] * 8 + ["DOWN", "DEGRADED"]), rnd.randint(20, 3000), t,
             rnd.choice(["eu", "us"])) for t in range(start, end, 300_000)]
    _store_checks(cfg, monitor, rows)
    lo = statusapp._ceil_hour(start)

    async def job(db):
        exact = await statusapp.window_stats(db, [monitor], lo, end, exact=True)
        progress = await statusapp.roll_up(db, now=end + hour)
        plan = statusapp.plan_window(lo, end, *await statusapp.rollup_progress(db))
        rolled = await statusapp.window_stats(db, [monitor], lo, end, exact=False)
        return exact, progress, plan, rolled
    (exact, exact_regions), progress, plan, (rolled, regions) = _on_db(cfg, job)
    assert progress == (end, end // day * day)
    assert "d" in [kind for kind, _, _ in plan] and "raw" not in [kind for kind, _, _ in plan]
    assert (rolled.up, rolled.down, rolled.degraded, rolled.rt_sum, rolled.rt_count) == (
        exact.up, exact.down, exact.degraded, exact.rt_sum, exact.rt_count)
    assert rolled.uptime() == exact.uptime() and rolled.average() == exact.average()
    assert dict(regions) == dict(exact_regions)
    assert rolled.values is None and sum(rolled.hist.values()) == exact.rt_count
    for p in (50, 95, 99):
        assert abs(rolled.percentile(p) - exact.percentile(p)) <= exact.percentile(p) * 0.025 + 1
    stored = sql(cfg, "SELECT bucket, SUM(up + down + degraded) FROM check_rollups"
                      " GROUP BY bucket ORDER BY bucket")
    assert stored == [("d", sum(1 for r in rows if r[2] < end // day * day)),
                      ("h", len(rows))]


def test_team_rollups_give_the_same_team_figures_as_every_monitors_checks(cfg):
    rnd = random.Random(7)
    monitors = _monitors(cfg, 3)
    hour = statusapp.HOUR_MS
    now = int(time.time() * 1000)
    start = statusapp._ceil_hour(now - statusapp.DAY_MS)
    for monitor in monitors:
        _store_checks(cfg, monitor, [(rnd.choice(["UP"] * 8 + ["DOWN", "DEGRADED"]),
                                      rnd.randint(20, 3000), t, "local")
                                     for t in range(start + rnd.randint(0, 60_000), now, 240_000)])
    team = sql(cfg, "SELECT account_id FROM monitors LIMIT 1")[0][0]

    async def job(db):
        exact, _ = await statusapp.window_stats(db, monitors, start, now, exact=True)
        before = await statusapp._team_window(db, team, start, now)  # nothing rolled up yet
        await statusapp.roll_up(db, now=now)
        after = await statusapp._team_window(db, team, start, now)
        return exact, before, after
    exact, before, after = _on_db(cfg, job)
    teams_done = sql(cfg, "SELECT done_until FROM rollup_progress WHERE bucket = 't'")[0][0]
    assert teams_done == (now - statusapp.ROLLUP_GRACE_MS) // hour * hour
    rolled = sql(cfg, "SELECT COUNT(*), SUM(up + down + degraded) FROM team_rollups"
                      " WHERE account_id = ?", (team,))[0]
    assert rolled[0] >= 22 and rolled[1] > 0  # one row per rolled hour, not per monitor
    for stats in (before, after):
        assert (stats.up, stats.down, stats.degraded, stats.rt_sum, stats.rt_count) == (
            exact.up, exact.down, exact.degraded, exact.rt_sum, exact.rt_count)
        assert sum(stats.hist.values()) == exact.rt_count
        assert abs(stats.percentile(95) - exact.percentile(95)) <= exact.percentile(95) * 0.025 + 1


@pytest.mark.asyncio
async def test_team_analytics_are_computed_once_for_a_burst_and_refreshed_in_the_background(
        cfg, key, monkeypatch):
    computed = []
    original = statusapp._team_window

    async def counting(db, team, lo, hi):
        computed.append(team)
        return await original(db, team, lo, hi)
    monkeypatch.setattr(statusapp, "_team_window", counting)
    app = statusapp.create_app(cfg)
    async with app.router.lifespan_context(app):
        rt = app.state.statusapp
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t",
                                     headers={"X-API-Key": key}) as http:
            answers = await asyncio.gather(*(http.get("/api/v1/analytics") for _ in range(8)))
            assert {a.status_code for a in answers} == {200} and len(computed) == 1
            team = computed[0]
            at, figures = rt.performance[team]
            rt.performance[team] = (at - statusapp._PERFORMANCE_TTL_MS, figures)  # expired
            stale = await http.get("/api/v1/analytics")
            assert stale.json()["performance"] == answers[0].json()["performance"]
            await asyncio.gather(*list(rt._background))  # the one refresh it started
            assert len(computed) == 2 and rt.performance[team][0] >= at


def test_daily_stats_cover_rolled_up_and_raw_days(cfg):
    monitors = _monitors(cfg, 2)
    day, now = statusapp.DAY_MS, int(time.time() * 1000)
    today = now // day * day
    _store_checks(cfg, monitors[0], [("UP", 100, today - 2 * day + 1000),
                                     ("DOWN", None, today - 2 * day + 2000),
                                     ("UP", 100, today - day + 5000), ("DEGRADED", 100, now - 1000)])

    async def job(db):
        await statusapp.roll_up(db)
        return await statusapp.daily_stats(db, monitors, 3)
    stats = _on_db(cfg, job)
    names = [time.strftime("%Y-%m-%d", time.gmtime((today - n * day) / 1000)) for n in (2, 1, 0)]
    assert stats[monitors[0]] == [
        {"day": names[0], "up": 1, "down": 1, "degraded": 0, "total": 2, "uptime": 50.0},
        {"day": names[1], "up": 1, "down": 0, "degraded": 0, "total": 1, "uptime": 100.0},
        {"day": names[2], "up": 0, "down": 0, "degraded": 1, "total": 1, "uptime": 100.0}]
    assert [d["uptime"] for d in stats[monitors[1]]] == [None, None, None]


def test_daily_stats_memo_keeps_settled_days_of_recent_monitors(cfg, monkeypatch):
    monkeypatch.setattr(statusapp, "_SETTLED_MEMO_MONITORS", 2)
    monitors = _monitors(cfg, 3)
    day, now = statusapp.DAY_MS, int(time.time() * 1000)
    _store_checks(cfg, monitors[0], [("DOWN", None, now - 2 * day), ("UP", 100, now - 1000)])
    memo: statusapp.SettledDays = {}

    async def job(db):
        await statusapp.roll_up(db)
        plain = await statusapp.daily_stats(db, monitors[:2], 3)
        first = await statusapp.daily_stats(db, monitors[:2], 3, memo)
        again = await statusapp.daily_stats(db, monitors[:2], 3, memo)
        await statusapp.daily_stats(db, monitors[2:], 3, memo)  # over the bound: drops the pair
        return plain, first, again
    plain, first, again = _on_db(cfg, job)
    assert plain == first == again and first[monitors[0]][0]["down"] == 1
    assert first[monitors[0]][-1]["up"] == 1 and first[monitors[1]][-1]["uptime"] is None
    assert [key[0] for key in memo] == [tuple(monitors[2:])]

def test_pruning_runs_in_small_batches_and_keeps_rollups(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, retention={"raw_days": 3, "hourly_days": 2})
    monkeypatch.setattr(statusapp, "RETENTION_BATCH", 100)
    monkeypatch.setattr(statusapp, "_RETENTION_PAUSE", 0)
    monitor = _monitors(cfg, 1)[0]
    day, now = statusapp.DAY_MS, int(time.time() * 1000)
    old = [("UP", 50, now - 4 * day + i * 60_000) for i in range(1000)]
    _store_checks(cfg, monitor, [*old, ("UP", 60, now - day)])
    _store_checks(cfg, monitor, [("UP", 70, now - 9 * day, "lonely")])  # that region's latest
    with sqlite3.connect(cfg["server"]["database"]) as conn:
        conn.executemany("INSERT INTO heartbeats (monitor_id, kind, received_at) VALUES (?, 'log', ?)",
                         [(monitor, now - 4 * day), (monitor, now - 2 * day)])
        account = conn.execute("SELECT account_id FROM monitors").fetchone()[0]
        conn.executemany(
            "INSERT INTO alert_outbox (account_id, target_key, channel_type, config, event, alert,"
            " created_at, done_at) VALUES (?, 't', 'SLACK', '{}', 'monitor.down', '{}', ?, ?)",
            [(account, now - 5 * day, now - 4 * day), (account, now - 5 * day, None)])
        conn.executemany("INSERT INTO agent_batches VALUES ('east', ?, ?)",
                         [("old-batch", now - 4 * day), ("new-batch", now - day)])
    transactions = []

    async def job(db):
        real = db.transaction
        db.transaction = lambda: transactions.append(1) or real()
        await statusapp.roll_up(db)
        return await statusapp.prune(db, cfg)
    deleted = _on_db(cfg, job)
    assert deleted["raw"] == 1000 and len(transactions) >= 10
    assert deleted["pings"] == 1 and deleted["alerts"] == 1 and deleted["batches"] == 1
    assert sql(cfg, "SELECT batch_id FROM agent_batches") == [("new-batch",)]
    assert sql(cfg, "SELECT done_at FROM alert_outbox") == [(None,)]  # undelivered ones stay
    assert sql(cfg, "SELECT received_at FROM heartbeats") == [(now - 2 * day,)]
    assert sql(cfg, "SELECT response_time FROM checks ORDER BY checked_at") == [(70,), (60,)]
    assert deleted["h"] >= 17 and deleted["d"] == 0
    assert sql(cfg, "SELECT COUNT(*) FROM check_rollups WHERE bucket = 'h' AND start < ?",
               (now - 2 * day,)) == [(0,)]
    assert sql(cfg, "SELECT SUM(up) FROM check_rollups WHERE bucket = 'd'") == [(1001,)]


def test_regression_detection_degrades_and_recovers(cfg):
    slow, thin = _monitors(cfg, 2, status="UP", regression_enabled=1, regression_threshold=50,
                           regression_period=7)
    now, minute = int(time.time() * 1000), 60_000
    later = now + 20 * minute
    baseline = [("UP", 250, now - 200 * minute + i * 4 * minute) for i in range(40)]
    _store_checks(cfg, slow, [*baseline, *[("UP", 480, now - i * minute) for i in range(6)]])
    _store_checks(cfg, thin, [*baseline[:10], *[("UP", 480, now - i * minute) for i in range(6)]])
    state = "SELECT status, regression_active, baseline_response_time FROM monitors WHERE id = ?"

    async def job(db):
        await statusapp.detect_regressions(db, cfg, now)
        seen = sql(cfg, state, (slow,)), sql(cfg, state, (thin,))
        _store_checks(cfg, slow, [("UP", 260, later - i * minute) for i in range(5)])
        await statusapp.detect_regressions(db, cfg, later)
        return seen
    degraded, not_enough = _on_db(cfg, job)
    assert degraded == [("DEGRADED", 1, 250)]
    assert not_enough == [("UP", 0, None)]
    assert sql(cfg, state, (slow,)) == [("UP", 0, 250)]
    assert sql(cfg, "SELECT old_status, new_status, reason FROM status_transitions"
                    " ORDER BY id") == [
        ("UP", "DEGRADED", "response time 480 ms is 92% above the 250 ms baseline (threshold 50%)"),
        ("DEGRADED", "UP", "response time 260 ms is back within 50% of the 250 ms baseline")]


# --- API tests ---

FULL_MONITOR = {
    "name": "My API Monitor", "url": "https://api.internal.test/health", "type": "API",
    "interval": 300, "timeout": 30, "expectedStatusCode": 200, "httpMethod": "POST",
    "requestHeaders": '{"X-Trace": "1"}', "requestBody": '{"ping": true}',
    "enabledWorkerRegionIds": ["local"], "regressionEnabled": True, "regressionThreshold": 50,
    "regressionPeriod": 14, "performanceTimings": True,
    "apiAuthConfig": {"type": "bearer", "token": "tok-0123456789abcdef"},
    "notifications": [{"type": "EMAIL", "enabled": True, "config": {"emails": ["ops@home.test"]}}],
}


def create(client, **fields) -> dict:
    body = {"name": "m", "url": "http://127.0.0.1:9/", **fields}
    response = client.post("/api/v1/monitors", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_create_returns_every_field_with_defaults_and_masked_secrets(client):
    created = client.post("/api/v1/monitors", json=FULL_MONITOR)
    assert created.status_code == 201
    body = created.json()
    for name in ("name", "url", "type", "interval", "expectedStatusCode", "httpMethod",
                 "requestHeaders", "requestBody", "enabledWorkerRegionIds", "regressionPeriod"):
        assert body[name] == FULL_MONITOR[name]
    assert body["apiAuthConfig"] == {"type": "bearer", "token": "****cdef"}
    assert body["status"] == "PENDING" and body["isPaused"] is False and body["isActive"] is True
    assert body["heartbeatUrl"] is None
    assert body["checks"] == [] and body["_count"] == {"checks": 0, "incidents": 0}
    assert body["monitorNotifications"][0]["type"] == "EMAIL"
    assert body["monitorNotifications"][0]["config"] == {"emails": ["ops@home.test"]}
    assert body["id"].startswith("mon_") and body["createdAt"].endswith("Z")
    defaults = create(client)
    assert (defaults["type"], defaults["interval"], defaults["timeout"], defaults["httpMethod"]) == (
        "WEBSITE", 300, 30, "GET")
    assert (defaults["domainExpiryDays"], defaults["domainMonitorDns"],
            defaults["domainMonitorBlacklist"], defaults["domainMonitorWhois"]) == (30, True, True, True)
    fetched = client.get(f"/api/v1/monitors/{body['id']}").json()
    live = ("checks", "_count", "status")  # the prober checks a new monitor at once
    assert {k: v for k, v in fetched.items() if k not in live} == {
        k: v for k, v in body.items() if k not in live}


def test_type_specific_monitors_are_accepted(client):
    port = create(client, type="PORT", url="127.0.0.1", port=22, protocol="UDP")
    assert (port["port"], port["protocol"]) == (22, "UDP")
    dns = create(client, type="DNS", url="home.test", dnsRecord="AAAA", expectedIp="::1")
    assert dns["expectedIp"] == "::1"
    assert create(client, type="SSL_CERT", url="https://home.test")["type"] == "SSL_CERT"
    assert create(client, type="DOMAIN", url="home.test", domainExpiryDays=14)["domainExpiryDays"] == 14
    assert create(client, type="PING", url="10.0.0.1")["url"] == "10.0.0.1"


def test_cron_monitor_gets_an_unguessable_heartbeat_url(cfg, client):
    first = client.post("/api/v1/monitors", json={"name": "backup", "type": "CRON"}).json()
    second = create(client, type="CRON")
    base = cfg["server"]["base_url"] + "/api/v1/heartbeat/"
    assert first["heartbeatUrl"].startswith(base) and second["heartbeatUrl"].startswith(base)
    token = first["heartbeatUrl"][len(base):]
    assert len(token) >= 22 and token != second["heartbeatUrl"][len(base):]
    assert first["url"] == first["heartbeatUrl"]
    assert first["gracePeriod"] == 300
    changed = client.put(f"/api/v1/monitors/{first['id']}", json={"type": "WEBSITE",
                                                                  "url": "http://127.0.0.1/"})
    assert changed.json()["heartbeatUrl"] is None


def test_list_paginates_filters_sorts_and_searches(cfg, client):
    for i, name in enumerate(["alpha", "Bravo", "charlie_1", "delta%"]):
        create(client, name=name, type="WEBSITE" if i % 2 else "API",
               url=f"http://127.0.0.1:{8000 + i}/")
    sql(cfg, "UPDATE monitors SET status = 'UP' WHERE name IN ('alpha', 'Bravo')")
    page = client.get("/api/v1/monitors", params={"limit": 3, "page": 2, "sort": "name",
                                                  "order": "asc"}).json()
    assert [m["name"] for m in page["monitors"]] == ["delta%"]
    assert page["pagination"] == {"total": 4, "page": 2, "limit": 3, "totalPages": 2}
    names = lambda **q: [m["name"] for m in client.get("/api/v1/monitors", params=q).json()["monitors"]]
    assert names(sort="name", order="desc") == ["delta%", "charlie_1", "alpha", "Bravo"]
    assert names() == ["delta%", "charlie_1", "Bravo", "alpha"]  # newest first by default
    assert sorted(names(status="UP")) == ["Bravo", "alpha"]
    assert names(status="PENDING", sort="name", order="asc") == ["charlie_1", "delta%"]
    assert names(type="API", sort="name", order="asc") == ["alpha", "charlie_1"]
    assert names(search="%") == ["delta%"]            # wildcards are literal
    assert names(search="_") == ["charlie_1"]
    assert names(search="8001") == ["Bravo"]         # URL matches too
    assert client.get("/api/v1/monitors", params={"limit": 500}).json()["pagination"]["limit"] == 100
    for bad in ({"limit": 0}, {"page": "x"}, {"sort": "password"}, {"order": "up"},
                {"status": "MAYBE"}, {"type": "SMTP"}):
        response = client.get("/api/v1/monitors", params=bad)
        assert response.status_code == 400, bad
        assert response.json()["error"][0]["path"] == [next(iter(bad))]


def test_update_is_partial_and_validated(client):
    monitor = create(client, name="before", interval=120)
    response = client.put(f"/api/v1/monitors/{monitor['id']}", json={"name": "after"})
    assert response.status_code == 200
    assert (response.json()["name"], response.json()["interval"]) == ("after", 120)
    assert response.json()["updatedAt"] >= monitor["updatedAt"]
    bad = client.put(f"/api/v1/monitors/{monitor['id']}", json={"type": "PORT"})
    assert bad.status_code == 400
    assert {tuple(i["path"]) for i in bad.json()["error"]} >= {("port",), ("protocol",)}
    assert client.get(f"/api/v1/monitors/{monitor['id']}").json()["type"] == "WEBSITE"
    assert client.put(f"/api/v1/monitors/{monitor['id']}", json={"timeout": 999}).status_code == 400
    assert client.put("/api/v1/monitors/mon_nope", json={"name": "x"}).status_code == 404


def test_pause_toggles_and_delete_cascades(cfg, client):
    monitor = create(client, notifications=[{"type": "SLACK", "config": {"webhookUrl": "http://127.0.0.1/h"}}])
    path = f"/api/v1/monitors/{monitor['id']}"
    assert client.post(path + "/pause").json() == {"id": monitor["id"], "isPaused": True}
    assert client.get(path).json()["isPaused"] is True
    assert client.post(path + "/pause").json() == {"id": monitor["id"], "isPaused": False}
    deleted = client.delete(path)
    assert deleted.json() == {"success": True, "message": "Monitor deleted successfully"}
    assert client.get(path).status_code == 404
    assert client.delete(path).status_code == 404
    assert sql(cfg, "SELECT COUNT(*) FROM monitor_notifications") == [(0,)]


def test_list_entries_follow_every_change_and_match_the_single_monitor(cfg, client):
    """The list encodes a monitor's own fields once per version of its row: an edit, a pause,
    a maintenance window and a new check each show at once, as GET of the one monitor shows."""
    monitor = client.post("/api/v1/monitors", json={  # inactive: no check lands meanwhile
        "name": "a", "url": "http://127.0.0.1:9/", "isActive": False, "apiAuthConfig": {
            "type": "bearer", "token": "tok-0123456789abcdef"}}).json()
    listed = lambda: client.get("/api/v1/monitors").json()["monitors"][0]
    assert listed() == listed() == client.get(f"/api/v1/monitors/{monitor['id']}").json()
    assert listed()["apiAuthConfig"] == {"type": "bearer", "token": "****cdef"}
    client.put(f"/api/v1/monitors/{monitor['id']}", json={"name": "b"})
    client.post(f"/api/v1/monitors/{monitor['id']}/pause")
    assert (listed()["name"], listed()["isPaused"]) == ("b", True)
    now = dt.datetime.now(dt.timezone.utc)
    assert client.post("/api/v1/maintenance-windows", json={
        "title": "w", "startsAt": (now - dt.timedelta(minutes=1)).isoformat(),
        "endsAt": (now + dt.timedelta(hours=1)).isoformat(),
        "monitorIds": [monitor["id"]]}).status_code == 201
    assert listed()["status"] == "MAINTENANCE"
    statements = statusapp.check_statements(monitor["id"], "elsewhere",
                                            statusapp.CheckResult("UP"), statusapp.now_ms())
    client.portal.call(client.app.state.statusapp.db.write, statements)
    assert listed()["_count"]["checks"] == 1
    assert [c["workerRegion"]["id"] for c in listed()["checks"]] == ["elsewhere"]
    assert listed() == client.get(f"/api/v1/monitors/{monitor['id']}").json()


@pytest.mark.parametrize("path", ["/api/v1/monitors/{id}", "/api/v1/monitors"])
def test_a_monitor_and_its_latest_check_are_read_together(client, monkeypatch, path):
    """A new check and the status it sets, committed while the request reads: the answer shows
    both or neither (a status never precedes its check)."""
    rt = client.app.state.statusapp
    monitor = _inc_monitor(client)

    def stored(status: str) -> list:
        return statusapp.check_statements(monitor["id"], "local", statusapp.CheckResult(status),
                                          statusapp.now_ms()) + [
            ("UPDATE monitors SET status = ? WHERE id = ?", (status, monitor["id"]))]
    client.portal.call(rt.db.write, stored("UP"))
    read, pending = rt.db.fetchall, [stored("DOWN")]

    async def fetchall(sql: str, params=()):  # the write lands just after the monitor's row
        rows = await read(sql, params)
        if pending and any(monitor["id"] in tuple(row) for row in rows):
            await rt.db.write(pending.pop())
        return rows
    monkeypatch.setattr(rt.db, "fetchall", fetchall)

    def shown() -> dict:
        body = client.get(path.format(id=monitor["id"])).json()
        return body["monitors"][0] if "monitors" in body else body
    first = shown()
    assert not pending
    assert first["status"] == first["checks"][0]["status"]
    assert shown()["status"] == shown()["checks"][0]["status"] == "DOWN"


def test_a_list_page_is_kept_until_something_is_committed(client):
    """An identical page is answered from memory while nothing was committed; a commit (here
    a new check) makes the next answer read again and show it."""
    rt = client.app.state.statusapp
    monitor = _inc_monitor(client)

    def from_memory() -> bool:
        commits, renders = rt.db.commits, rt.list_pages.renders
        page = client.get("/api/v1/monitors?limit=10").json()
        return (rt.db.commits, rt.list_pages.renders) == (commits, renders) and page == (
            client.get("/api/v1/monitors?limit=10").json())
    client.get("/api/v1/monitors?limit=10")
    eventually(from_memory)
    client.portal.call(rt.db.write, statusapp.check_statements(
        monitor["id"], "local", statusapp.CheckResult("UP"), statusapp.now_ms()))
    listed = client.get("/api/v1/monitors?limit=10").json()["monitors"][0]
    assert (listed["_count"]["checks"], [c["status"] for c in listed["checks"]]) == (1, ["UP"])


def test_tags_and_groups_filter_the_list_and_pause_resume_in_bulk(cfg, client):
    web = create(client, name="web", tags=["prod", {"name": "edge", "color": "#FF0000"}],
                 group="Frontend")
    api = create(client, name="api", tags=[{"name": "prod"}], group="Backend")
    lab = create(client, name="lab", tags=["test"])
    assert web["tags"] == [{"name": "prod", "color": None}, {"name": "edge", "color": "#ff0000"}]
    assert (web["group"], lab["group"]) == ("Frontend", None)

    def names(**query) -> list[str]:
        listed = client.get("/api/v1/monitors", params={"sort": "name", "order": "asc", **query})
        return [m["name"] for m in listed.json()["monitors"]]
    assert names(tag="prod") == ["api", "web"]
    assert names(tag="edge") == ["web"] and names(group="Backend") == ["api"]
    assert names(tag="prod", group="Frontend") == ["web"] and names(tag="nope") == []

    paused = client.post("/api/v1/monitors/pause", json={"tag": "prod"})
    assert paused.json() == {"monitorIds": sorted([web["id"], api["id"]]), "isPaused": True}
    assert sql(cfg, "SELECT name FROM monitors WHERE is_paused = 1 ORDER BY name") == \
        [("api",), ("web",)]
    resumed = client.post("/api/v1/monitors/resume", json={"group": "Backend"})
    assert resumed.json() == {"monitorIds": [api["id"]], "isPaused": False}
    assert sql(cfg, "SELECT name FROM monitors WHERE is_paused = 1") == [("web",)]
    assert client.post("/api/v1/monitors/pause", json={}).status_code == 400
    for bad in ([{"name": "x", "color": "red"}], ["a", "a"], [""], [5]):
        assert client.post("/api/v1/monitors", json={"name": "b", "url": "http://127.0.0.1:9/",
                                                     "tags": bad}).status_code == 400, bad


def test_status_page_can_show_a_monitor_group_or_a_tag(client):
    db = create(client, name="db", group="Backend")
    create(client, name="cache", group="Backend", tags=["public"])
    hidden = create(client, name="hidden")
    assert client.get(f"/badge/{db['id']}/status.svg").status_code == 404
    page = client.post("/api/v1/status-pages", json={
        "name": "Svc", "slug": "svc", "monitorGroups": [
            {"name": "Backend", "monitorGroup": "Backend"},
            {"name": "Public", "monitorTag": "public"}]})
    assert page.status_code == 201, page.text
    assert [(g["monitorGroup"], g["monitorTag"], g["monitorIds"])
            for g in page.json()["monitorGroups"]] == [("Backend", None, []), (None, "public", [])]
    create(client, name="queue", group="Backend")  # joins the page without editing it
    shown = client.get("/status/svc.json").json()["groups"]
    assert [[m["name"] for m in g["monitors"]] for g in shown] == [["cache", "db", "queue"],
                                                                  ["cache"]]
    assert client.get(f"/badge/{db['id']}/status.svg").status_code == 200
    assert client.get(f"/badge/{hidden['id']}/status.svg").status_code == 404
    renamed = client.put(f"/api/v1/status-pages/{page.json()['id']}", json={"name": "Services"})
    assert renamed.json()["monitorGroups"][0]["monitorGroup"] == "Backend"
    both = client.post("/api/v1/status-pages", json={"name": "x", "slug": "x", "monitorGroups": [
        {"name": "g", "monitorGroup": "Backend", "monitorTag": "public"}]})
    assert both.status_code == 400


def test_regression_settings(client):
    monitor = create(client)
    path = f"/api/v1/monitors/{monitor['id']}/regression"
    assert client.get(path).json() == {"regressionEnabled": False, "regressionThreshold": 50,
                                       "regressionPeriod": 7, "baselineResponseTime": None,
                                       "baselineCalculatedAt": None}
    updated = client.put(path, json={"regressionEnabled": True, "regressionThreshold": 75,
                                     "regressionPeriod": 14})
    assert updated.json()["regressionThreshold"] == 75 and updated.json()["regressionEnabled"]
    assert client.put(path, json={"regressionThreshold": 10}).status_code == 400
    assert client.get(path).json()["regressionThreshold"] == 75


def test_private_targets_are_refused_when_saved_if_not_allowed(tmp_path):
    cfg = make_cfg(tmp_path, probes={"allow_private_targets": False},
                   notifications={"allow_private_targets": False})
    with _app(cfg, new_key(cfg)) as client:
        refused = [
            ("/monitors", {"name": "m", "type": "WEBSITE", "url": "http://localhost:9/"}, ["url"]),
            ("/monitors", {"name": "m", "type": "PORT", "url": "10.0.0.5", "port": 22,
                           "protocol": "TCP"}, ["url"]),
            ("/monitors", {"name": "m", "type": "PING", "url": "169.254.169.254"}, ["url"]),
            ("/monitors", {"name": "m", "type": "API", "url": "https://api.home.test",
                           "apiAuthConfig": {"type": "oauth2", "oauth2ClientId": "c",
                                             "oauth2TokenUrl": "http://127.0.0.1/t",
                                             "oauth2ClientSecret": "s"}},
             ["apiAuthConfig", "oauth2TokenUrl"]),
            ("/monitors", {"name": "m", "type": "API", "url": "https://api.home.test",
                           "notifications": [{"type": "SLACK", "config": {
                               "webhookUrl": "http://[::1]/hook"}}]},
             ["notifications", 0, "config", "webhookUrl"]),
            ("/notifications", {"name": "n", "type": "DISCORD",
                                "config": {"webhookUrl": "http://127.0.0.1/x"}},
             ["config", "webhookUrl"]),
            ("/webhooks", {"name": "w", "url": "http://localhost/hook", "events": "monitor.down"},
             ["url"])]
        for path, body, field in refused:
            response = client.post("/api/v1" + path, json=body)
            assert response.status_code == 400, (path, response.text)
            issue = response.json()["error"][0]
            assert issue["path"] == field and "allow_private_targets is false" in issue["message"]
        public = client.post("/api/v1/monitors", json={"name": "m", "type": "WEBSITE",
                                                       "url": "https://api.home.test"})
        dns = client.post("/api/v1/monitors", json={"name": "d", "type": "DNS",
                                                    "url": "localhost", "dnsRecord": "A"})
        assert public.status_code == dns.status_code == 201  # DNS checks ask a resolver
        moved = client.put(f"/api/v1/monitors/{public.json()['id']}",
                           json={"url": "http://127.0.0.1:8080/"})
        assert moved.status_code == 400 and moved.json()["error"][0]["path"] == ["url"]
    cfg["notifications"]["allow_private_targets"] = True  # the settings are independent
    with _app(cfg, new_key(cfg, "second@example.test")) as client:
        hook = client.post("/api/v1/webhooks", json={"name": "w", "url": "http://localhost/h",
                                                     "events": "monitor.down"})
        assert hook.status_code == 201, hook.text


def test_cors_preflight_and_headers(client):
    preflight = client.options("/api/v1/monitors", headers={
        "Origin": "http://dash.home.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "X-API-Key, Content-Type"})
    assert preflight.status_code == 204
    expected = {"access-control-allow-origin": "*",
                "access-control-allow-methods": "GET, POST, PUT, DELETE, OPTIONS",
                "access-control-allow-headers": "Content-Type, Authorization, X-API-Key",
                "access-control-max-age": "86400"}
    for response in (preflight, client.get("/api/v1/monitors"), client.get("/api/v1/nowhere")):
        assert {k: response.headers.get(k) for k in expected} == expected


def test_bad_requests_get_clear_json_errors_never_500(cfg, client):
    cases = [
        (client.post("/api/v1/monitors", content=b"{not json", headers={"Content-Type": "application/json"}),
         400, "Malformed JSON body"),
        (client.post("/api/v1/monitors", content=b"name=x", headers={"Content-Type": "application/x-www-form-urlencoded"}),
         400, "Content-Type must be application/json"),
        (client.post("/api/v1/monitors", json=[1, 2]), 400, None),
        (client.get("/api/v1/nowhere"), 404, "Not found"),
        (client.patch("/api/v1/monitors"), 405, "Method not allowed"),
        (client.post("/api/v1/monitors", content=b"{" + b" " * 1_048_576 + b"}",
                     headers={"Content-Type": "application/json"}), 413, "Request body too large"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error", "code", "details"}
        if message:
            assert body["error"] == message
    assert sql(cfg, "SELECT COUNT(*) FROM monitors") == [(0,)]


def test_openapi_document_is_valid_and_follows_the_validation_tables(cfg, client):
    doc = client.get("/api/v1/openapi.json", headers={"X-API-Key": ""}).json()
    openapi_spec_validator.validate(doc)
    for route in statusapp.ROUTES:
        path = re.sub(r":\w+}", "}", route.path.removeprefix("/api/v1"))
        assert set(doc["paths"][path]) >= {m.lower() for m in route.methods if m != "HEAD"}
    body = doc["paths"]["/monitors"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["name"]
    assert set(body["properties"]) == {f.name for f in statusapp.MONITOR_FIELDS}
    assert body["properties"]["interval"]["minimum"] == cfg["probes"]["min_interval"] == 60
    assert body["properties"]["type"]["enum"] == list(statusapp.MONITOR_TYPES)
    assert body["properties"]["timeout"] == {"type": "integer", "minimum": 5, "maximum": 300,
                                             "default": 30, "description": "Timeout in seconds"}
    listing = {p["name"]: p for p in doc["paths"]["/monitors"]["get"]["parameters"]}
    assert listing["sort"]["schema"]["enum"] == list(statusapp.MONITOR_SORTS)
    assert doc["paths"]["/team/members"]["post"]["x-statusapp-least-role"] == "ADMIN"
    assert doc["paths"]["/monitors/{monitorId}"]["get"]["x-statusapp-least-role"] == "VIEWER"
    assert doc["paths"]["/health"]["get"]["security"] == []


def test_every_operation_has_an_id_tags_and_its_success_shape(client):
    doc = client.get("/api/v1/openapi.json").json()
    operations = [op for item in doc["paths"].values() for op in item.values()]
    assert len({op["operationId"] for op in operations}) == len(operations) == len(statusapp.API_DOCS)
    for op in operations:
        assert op["tags"] and op["operationId"]
        success = [code for code in op["responses"] if code.startswith("2")]
        assert success and "2XX" not in success, op["operationId"]
        for code in success:
            schema = op["responses"][code].get("content", {}).get("application/json", {}).get("schema")
            assert schema is not None or op["operationId"].endswith("_head"), op["operationId"]
    monitor = doc["paths"]["/monitors/{monitorId}"]["get"]["responses"]["200"]
    shown = monitor["content"]["application/json"]["schema"]["properties"]
    assert set(shown) >= {f.name for f in statusapp.MONITOR_COLUMNS} | {"id", "checks", "_count"}
    assert doc["paths"]["/monitors"]["post"]["responses"]["201"]


SCHEMATHESIS_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
                       response_schema_conformance, negative_data_rejection]


def _schemathesis_ids(srv: Server, api: httpx.Client) -> dict[str, str]:
    """Real ids for the path parameters, so generated requests reach the handlers."""
    monitor = api.post("/monitors", json={"name": "m", "url": "http://127.0.0.1:9/"}).json()
    cron = api.post("/monitors", json={"name": "c", "type": "CRON"}).json()
    sql({"server": {"database": srv.db}}, "INSERT INTO incidents (id, account_id, monitor_id,"
        " year, number, started_at, severity, status) SELECT 'inc_st', account_id, id, 2024, 1,"
        " 0, 'critical', 'open' FROM monitors WHERE id = ?", (monitor["id"],))
    channel = api.post("/notifications", json={"name": "c", "type": "WEBHOOK",
                                               "config": {"url": "http://127.0.0.1:9/"}}).json()
    webhook = api.post("/webhooks", json={"name": "w", "url": "http://127.0.0.1:9/",
                                          "events": "monitor.down"}).json()
    page = api.post("/status-pages", json={"name": "p", "slug": "st-page"}).json()
    invite = api.post("/team/members", json={"email": "st@example.test", "role": "MEMBER"}).json()
    key = api.post("/account/api-keys", json={"name": "k"}).json()
    window = api.post("/maintenance-windows", json={
        "title": "w", "startsAt": "2030-01-01T00:00:00Z", "endsAt": "2030-01-01T01:00:00Z"}).json()
    return {"windowId": window["id"], "monitorId": monitor["id"], "heartbeatId": cron["heartbeatUrl"].rsplit("/", 1)[1],
            "incidentId": "inc_st", "channelId": channel["id"], "webhookId": webhook["id"],
            "statusPageId": page["id"], "memberId": invite["id"], "keyId": key["id"],
            "token": invite["invitationToken"]}


def test_schemathesis_finds_no_5xx_and_answers_match_the_document(server):
    """Schemathesis over every operation of the served OpenAPI document (a few examples each,
    path ids mostly real): no 5xx, and every status, content type and body as documented."""
    api = _hb_api(server)
    key = api.headers["X-API-Key"]
    ids = _schemathesis_ids(server, api)
    schema = schemathesis.openapi.from_url(server.url + "/api/v1/openapi.json")
    operations = sorted((result.ok() for result in schema.get_all_operations()),
                        key=lambda op: (op.method.upper() == "DELETE", op.path))
    assert len(operations) == sum(doc.method != "HEAD" for doc in statusapp.API_DOCS)
    failures = []
    for operation in operations:
        @hypothesis.settings(max_examples=6, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=hypothesis.strategies.one_of(
            operation.as_strategy(), operation.as_strategy(
                generation_mode=schemathesis.GenerationMode.NEGATIVE)),
            real=hypothesis.strategies.booleans())
        def run(case, real):
            if real or operation.method.upper() == "DELETE":
                for name in case.path_parameters or {}:
                    case.path_parameters[name] = ids.get(name, case.path_parameters[name])
            case.call_and_validate(base_url=server.url + "/api/v1", headers={"X-API-Key": key},
                                   checks=SCHEMATHESIS_CHECKS, timeout=10)
        try:
            run()
        except Exception as exc:  # noqa: BLE001 -- collect every operation's failure, then fail
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
    _stateful_run(schema, server.url + "/api/v1", key)
    assert "Traceback" not in server.output()


def _stateful_run(schema, base_url: str, key: str) -> None:
    """Schemathesis's stateful run: it creates resources and follows the document's links from
    each creation to the operations on what it created, with the same checks."""
    workflow = schema.as_state_machine()
    followed = Counter()

    class Flow(workflow):
        def get_call_kwargs(self, case):
            followed[case.operation.method.upper() == "POST" and "{" not in case.operation.path] += 1
            return {"base_url": base_url, "headers": {"X-API-Key": key}, "timeout": 10}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=SCHEMATHESIS_CHECKS)

    Flow.run(settings=hypothesis.settings(
        max_examples=8, stateful_step_count=6, deadline=None, database=None, derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck)))
    assert followed[True] and followed[False], followed  # creations, then linked operations


def test_health_version_and_regions(cfg, client):
    health = client.get("/api/v1/health", headers={"X-API-Key": ""}).json()
    assert health["status"] == "healthy" and health["checks"]["database"] == "healthy"
    assert health["version"] == statusapp.VERSION and health["timestamp"].endswith("Z")
    assert client.get("/api/v1/server/version", headers={"X-API-Key": ""}).json() == {"version": statusapp.VERSION, "apiVersion": "v1"}
    regions = client.get("/api/v1/worker-regions").json()["regions"]
    assert regions == [{"id": "local", "name": "Local", "city": "Local", "country": "Local",
                        "countryCode": "ZZ", "latitude": 0.0, "longitude": 0.0, "isActive": True,
                        "isAgent": False, "lastSeenAt": None}]


def test_health_reports_a_broken_database(cfg, client):
    rt = client.app.state.statusapp
    client.portal.call(rt.db._writer.close)
    response = client.get("/api/v1/health")
    assert response.status_code == 503
    assert response.json()["status"] == "unhealthy"
    assert response.json()["checks"]["database"] == "unhealthy"


async def _on_writer(db: statusapp.Database, *statements: str) -> None:
    """Run statements on the server's own writer connection, between its transactions."""
    async with db._lock:
        for statement in statements:
            await db._writer.execute(statement)


@contextlib.contextmanager
def _storage_fault(cfg: dict, client, cause: str):
    """Make the server's writes fail for real: disk full (no page may be added), the database
    locked by another process past the busy timeout, or read-only."""
    db = client.app.state.statusapp.db
    if cause == "full":
        pages = sql(cfg, "PRAGMA page_count")[0][0]
        client.portal.call(_on_writer, db, f"PRAGMA max_page_count = {pages}")
        yield
        client.portal.call(_on_writer, db, "PRAGMA max_page_count = 1073741823")
    elif cause == "locked":
        other = sqlite3.connect(cfg["server"]["database"], isolation_level=None)
        client.portal.call(_on_writer, db, "PRAGMA busy_timeout = 50")
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("ROLLBACK")
        other.close()
    else:
        client.portal.call(_on_writer, db, "PRAGMA query_only = ON")
        yield
        client.portal.call(_on_writer, db, "PRAGMA query_only = OFF")


@pytest.mark.parametrize("cause, text", [("full", "the disk is full"),
                                         ("locked", "the database is locked"),
                                         ("read-only", "the database is read-only")])
def test_storage_failures_answer_503_log_one_line_and_make_health_unhealthy(cfg, client, caplog,
                                                                            cause, text):
    def create(index: int):
        return client.post("/api/v1/monitors", json={
            "name": f"m{index} " + "x" * 200, "url": "https://api.home.test", "type": "API",
            "isActive": False, "description": "d" * 2000})

    assert client.get("/api/v1/health").status_code == 200
    cron = client.post("/api/v1/monitors", json={"name": "backup", "type": "CRON",
                                                  "interval": 60, "gracePeriod": 60}).json()
    ping = urllib.parse.urlsplit(cron["heartbeatUrl"]).path
    caplog.clear()
    with _storage_fault(cfg, client, cause):
        if cause != "full":  # a ping row may still fit in a page when only growth fails
            assert client.post(ping).status_code == 503
        failed = []
        for index in range(60):  # "full" needs writes that take new pages before one fails
            answer = create(index)
            failed += [answer] if answer.status_code != 201 else []
            if len(failed) == 3:
                break
        assert failed and {r.status_code for r in failed} == {503}
        assert failed[0].json() == {"error": f"Storage unavailable: {text}",
                                    "code": "SERVICE_UNAVAILABLE", "details": "retry later"}
        assert failed[0].headers["retry-after"] == "5"
        health = client.get("/api/v1/health")
        assert health.status_code == 503 and health.json()["checks"]["database"] == "unhealthy"
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(failed) >= 2 and len(lines) == 1  # one line per cause, however many requests
    assert text in lines[0].getMessage() and lines[0].exc_info is None
    assert create(99).status_code == 201  # writes work again...
    assert client.get("/api/v1/health").status_code == 200  # ...and health says so


def test_a_client_that_disconnects_mid_body_is_no_error(client, key, caplog):
    """Drive the app as a server does when the client hangs up after part of the body."""
    messages = [{"type": "http.request", "body": b'{"na', "more_body": True},
                {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/api/v1/monitors", "raw_path": b"/api/v1/monitors",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 80), "headers": [
                 (b"host", b"x"), (b"x-api-key", key.encode()), (b"content-length", b"1000"),
                 (b"content-type", b"application/json")]}
    caplog.clear()
    client.portal.call(client.app, scope, receive, send)
    assert sent[0]["status"] == 400
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# --- Team and account tests ---

API = "/api/v1"
MONITOR_BODY = {"name": "Loopback", "url": "http://127.0.0.1:9/"}


def _invite(client, email: str, role: str, **headers) -> dict:
    response = client.post(f"{API}/team/members", json={"email": email, "name": email.split("@")[0],
                                                        "role": role}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def _accept(client, token: str) -> dict:
    response = client.post(f"{API}/team/invitations/{token}/accept", headers={"X-API-Key": ""})
    assert response.status_code == 201, response.text
    return response.json()


def _join(client, email: str, role: str) -> str:
    """Invite ``email`` with the client's owner key and accept: the member's first key."""
    return _accept(client, _invite(client, email, role)["invitationToken"])["apiKey"]["key"]


def _as(key: str) -> dict:
    return {"X-API-Key": key}


def test_every_role_against_every_kind_of_route(cfg, client, key):
    """Roles decide, whatever the key's permissions: each role's invitation key, plus a VIEWER
    holding a full-permission key made by the CLI (which does not cap by role)."""
    keys = {role: _join(client, f"{role.lower()}@example.test", role)
            for role in ("VIEWER", "MEMBER", "ADMIN")}
    keys["OWNER"] = key
    keys["VIEWER+full"] = cli(cfg, "apikey", "create", "--email", "viewer@example.test", "--name",
                              "full", "--permissions", "read,write,delete").strip().splitlines()[-1]
    victim = _join(client, "victim@example.test", "MEMBER")
    member_id = next(m["id"] for m in client.get(f"{API}/team/members").json()["members"]
                     if m["email"] == "victim@example.test")
    monitor_id = client.post(f"{API}/monitors", json=MONITOR_BODY).json()["id"]
    victim_keys = iter(client.post(f"{API}/account/api-keys", json={"name": f"v{i}"},
                                   headers=_as(victim)).json()["id"] for i in range(len(keys)))
    pending = iter(_invite(client, f"p{i}@example.test", "VIEWER")["id"] for i in range(len(keys)))
    table = [  # kind of route, method, path, body, least role
        ("read monitors", "GET", lambda: "/monitors", None, "VIEWER"),
        ("read a monitor", "GET", lambda: f"/monitors/{monitor_id}", None, "VIEWER"),
        ("create monitor", "POST", lambda: "/monitors", MONITOR_BODY, "MEMBER"),
        ("edit monitor", "PUT", lambda: f"/monitors/{monitor_id}", {"name": "x"}, "MEMBER"),
        ("read team", "GET", lambda: "/team/members", None, "VIEWER"),
        ("read invitations", "GET", lambda: "/team/invitations", None, "VIEWER"),
        ("invite", "POST", lambda: "/team/members", {"email": "new@x.test", "role": "VIEWER"},
         "ADMIN"),
        ("change a role", "PUT", lambda: f"/team/members/{member_id}", {"role": "MEMBER"},
         "ADMIN"),
        ("remove a member", "DELETE", lambda: f"/team/members/{next(pending)}", None, "ADMIN"),
        ("list own keys", "GET", lambda: "/account/api-keys", None, "VIEWER"),
        ("create own key", "POST", lambda: "/account/api-keys", {"name": "ci"}, "MEMBER"),
        ("revoke a member's key", "DELETE", lambda: f"/account/api-keys/{next(victim_keys)}",
         None, "ADMIN"),
        ("read account", "GET", lambda: "/account", None, "VIEWER"),
        ("edit account", "PUT", lambda: "/account", {"timezone": "Europe/Paris"}, "MEMBER"),
        ("read usage", "GET", lambda: "/account/usage", None, "VIEWER"),
    ]
    got, want = {}, {}
    for kind, method, path, body, least in table:
        for who, role_key in keys.items():
            role = who.split("+")[0]
            body = {**body, "email": f"{who}-{kind}@x.test".replace(" ", "-")} \
                if kind == "invite" else body
            response = client.request(method, API + path(), json=body, headers=_as(role_key))
            got[kind, who] = response.status_code
            allowed = statusapp.ROLES.index(role) >= statusapp.ROLES.index(least)
            want[kind, who] = ({"POST": 201}.get(method, 200) if allowed else 403)
    assert got == want
    assert client.get(f"{API}/monitors").json()["pagination"]["total"] == 4  # 1 + 3 allowed


def _owner_key(srv: Server) -> str:
    """The first-run key from the server's stderr (waited for: on a loaded machine the line may
    land a moment after the server first answers)."""
    return eventually(lambda: next((line for line in srv.output().splitlines()
                                    if line.startswith("sk_live_")), None))


def test_invitation_flow_over_http_with_expiry_and_reuse(tmp_path):
    srv = Server(tmp_path).start()
    try:
        db = {"server": {"database": srv.db}}
        owner = httpx.Client(base_url=srv.url, headers=_as(_owner_key(srv)), timeout=10)
        public = httpx.Client(base_url=srv.url, timeout=10)
        invited = _invite(owner, "Bob@Example.test", "MEMBER")
        token = invited["invitationToken"]
        assert invited["status"] == "PENDING" and invited["acceptedAt"] is None
        assert invited["emailSent"] is False  # no SMTP configured
        expires = statusapp._parse_time(invited["expiresAt"]).timestamp()
        assert abs(expires - (time.time() + 7 * 86400)) < 60
        assert sql(db, "SELECT invitation_hash FROM team_members WHERE id = ?",
                   (invited["id"],)) == [(statusapp.hash_key(token),)]
        pending = owner.get(f"{API}/team/invitations").json()["invitations"]
        assert [(i["email"], i["isExpired"]) for i in pending] == [("Bob@Example.test", False)]
        # A second invitation to the same person (any case) is a conflict.
        again = owner.post(f"{API}/team/members",
                           json={"email": "bob@example.test", "role": "VIEWER"})
        assert again.status_code == 409 and again.json()["code"] == "CONFLICT"

        accepted = _accept(public, token)
        assert accepted["member"]["status"] == "ACCEPTED" and accepted["member"]["acceptedAt"]
        assert accepted["apiKey"]["permissions"] == "read,write,delete"
        bob = httpx.Client(base_url=srv.url, headers=_as(accepted["apiKey"]["key"]),
                           timeout=10)
        created = bob.post(f"{API}/monitors", json=MONITOR_BODY)
        assert created.status_code == 201
        assert owner.get(f"{API}/monitors/{created.json()['id']}").status_code == 200  # team's
        assert bob.get(f"{API}/account").json()["email"] == "Bob@Example.test"
        assert owner.get(f"{API}/team/invitations").json()["invitations"] == []
        reused = public.post(f"{API}/team/invitations/{token}/accept")
        assert reused.status_code == 404 and reused.json()["code"] == "NOT_FOUND"

        carol = _invite(owner, "carol@example.test", "VIEWER")
        sql(db, "UPDATE team_members SET expires_at = ? WHERE id = ?",
            (statusapp.now_ms() - 1000, carol["id"]))
        expired = public.post(f"{API}/team/invitations/{carol['invitationToken']}/accept")
        assert expired.status_code == 410 and expired.json()["code"] == "GONE"
        listed = owner.get(f"{API}/team/invitations").json()["invitations"]
        assert [(i["id"], i["isExpired"]) for i in listed] == [(carol["id"], True)]
        renewed = _invite(owner, "carol@example.test", "VIEWER")  # replaces the expired one
        assert public.post(f"{API}/team/invitations/{carol['invitationToken']}/accept"
                           ).status_code == 404
        viewer = _accept(public, renewed["invitationToken"])["apiKey"]
        assert viewer["permissions"] == "read"
        members = owner.get(f"{API}/team/members").json()["members"]
        assert [(m["email"], m["role"], m["status"]) for m in members] == [
            ("admin@localhost", "OWNER", "ACCEPTED"), ("Bob@Example.test", "MEMBER", "ACCEPTED"),
            ("carol@example.test", "VIEWER", "ACCEPTED")]
    finally:
        srv.stop()


def test_owner_is_never_removed_or_demoted(client):
    members = client.get(f"{API}/team/members").json()["members"]
    owner_id = members[0]["id"]
    assert members[0]["role"] == "OWNER"
    admin = _join(client, "admin@example.test", "ADMIN")
    for headers in ({}, _as(admin)):
        demote = client.put(f"{API}/team/members/{owner_id}", json={"role": "ADMIN"},
                            headers=headers)
        assert demote.status_code == 403 and "owner" in demote.json()["error"]
        assert client.delete(f"{API}/team/members/{owner_id}", headers=headers).status_code == 403
    admin_id = client.get(f"{API}/team/members").json()["members"][1]["id"]
    promote = client.put(f"{API}/team/members/{admin_id}", json={"role": "OWNER"})
    assert promote.status_code == 400 and promote.json()["error"][0]["path"] == ["role"]
    invite = client.post(f"{API}/team/members", json={"email": "o@x.test", "role": "OWNER"})
    assert invite.status_code == 400 and invite.json()["error"][0]["code"] == "invalid_enum_value"
    roles = [m["role"] for m in client.get(f"{API}/team/members").json()["members"]]
    assert roles == ["OWNER", "ADMIN"]


def test_removing_a_member_revokes_their_keys_at_once(cfg, client):
    first = _join(client, "bob@example.test", "MEMBER")
    second = client.post(f"{API}/account/api-keys", json={"name": "ci"},
                         headers=_as(first)).json()["key"]
    member = client.get(f"{API}/team/members").json()["members"][1]
    assert client.get(f"{API}/monitors", headers=_as(second)).status_code == 200
    assert client.delete(f"{API}/team/members/{member['id']}").status_code == 200
    for old in (first, second):
        assert client.get(f"{API}/monitors", headers=_as(old)).status_code == 401
    assert sql(cfg, "SELECT COUNT(*), SUM(is_active) FROM api_keys k JOIN accounts a"
                    " ON a.id = k.account_id WHERE a.email = 'bob@example.test'") == [(2, 0)]
    # Invited again, the same person keeps their account; the old keys stay dead.
    again = _join(client, "bob@example.test", "VIEWER")
    assert sql(cfg, "SELECT COUNT(*) FROM accounts WHERE email = 'bob@example.test'") == [(1,)]
    assert client.get(f"{API}/monitors", headers=_as(first)).status_code == 401
    assert client.get(f"{API}/monitors", headers=_as(again)).status_code == 200


def test_a_person_belongs_to_one_team(cfg, client):
    other = new_key(cfg, "other@example.test")  # owns a team of their own
    for address in ("other@example.test", "owner@example.test"):
        response = client.post(f"{API}/team/members", json={"email": address, "role": "MEMBER"})
        assert response.status_code == 409, address
    token = _invite(client, "dana@example.test", "MEMBER")["invitationToken"]
    stolen = client.post(f"{API}/team/members", json={"email": "dana@example.test",
                                                      "role": "MEMBER"}, headers=_as(other))
    token_elsewhere = stolen.json()["invitationToken"]  # pending in two teams is allowed
    _accept(client, token)
    late = client.post(f"{API}/team/invitations/{token_elsewhere}/accept")
    assert late.status_code == 409


def test_account_details_and_validation(client):
    account = client.get(f"{API}/account").json()
    assert list(account)[:11] == ["id", "email", "name", "image", "accountStatus", "plan",
                                  "phoneNumber", "smsNotificationsEnabled", "language",
                                  "timezone", "createdAt"]
    assert account["accountStatus"] == "ENABLED" and account["plan"] == "ENTERPRISE"
    bad = client.put(f"{API}/account", json={"timezone": "Mars/Olympus", "phoneNumber": "+0987",
                                             "language": "xx", "image": "ftp://x/y.png",
                                             "smsNotificationsEnabled": "yes"})
    assert bad.status_code == 400 and bad.json()["code"] == "BAD_REQUEST"
    assert sorted(i["path"][0] for i in bad.json()["error"]) == [
        "image", "language", "phoneNumber", "smsNotificationsEnabled", "timezone"]
    good = {"name": "Jane Doe", "phoneNumber": "+441234567890", "smsNotificationsEnabled": True,
            "timezone": "Europe/London", "language": "fr", "image": "https://cdn.test/a.png"}
    updated = client.put(f"{API}/account", json=good).json()
    assert {k: updated[k] for k in good} == good
    assert client.get(f"{API}/account").json() == updated
    no_phone = client.put(f"{API}/account", json={"phoneNumber": None})
    assert no_phone.json()["error"][0]["path"] == ["smsNotificationsEnabled"]
    # plan and accountStatus: a round trip passes, a change is refused.
    assert client.put(f"{API}/account", json=updated).status_code == 200
    for field, value in (("plan", "STARTER"), ("accountStatus", "DISABLED")):
        refused = client.put(f"{API}/account", json={field: value})
        assert refused.status_code == 400 and refused.json()["error"][0]["path"] == [field]
    assert client.get(f"{API}/account").json()["plan"] == "ENTERPRISE"


def test_plan_and_status_are_set_from_the_cli(cfg, client):
    member = _join(client, "bob@example.test", "MEMBER")
    assert client.get(f"{API}/monitors").headers["X-RateLimit-Limit"] == "100000"
    assert "STARTER" in cli(cfg, "account", "set-plan", "owner@example.test", "starter")
    for headers in ({}, _as(member)):  # the team's plan applies to every member's keys
        response = client.get(f"{API}/account/usage", headers=headers)
        assert response.headers["X-RateLimit-Limit"] == "1000"
        assert response.json()["rateLimit"]["limit"] == 1000
    assert client.get(f"{API}/account").json()["plan"] == "STARTER"
    refused = CliRunner().invoke(statusapp.cli, ["account", "set-plan", "bob@example.test",
                                                 "BUSINESS", "--db", cfg["server"]["database"]])
    assert refused.exit_code != 0 and "no team owner" in refused.output
    cli(cfg, "account", "disable", "bob@example.test")
    assert client.get(f"{API}/monitors", headers=_as(member)).status_code == 403
    assert client.get(f"{API}/monitors").status_code == 200
    cli(cfg, "account", "enable", "bob@example.test")
    cli(cfg, "account", "disable", "owner@example.test")  # the whole team stops
    for headers in ({}, _as(member)):
        response = client.get(f"{API}/monitors", headers=headers)
        assert response.status_code == 403 and response.json()["code"] == "FORBIDDEN"
    cli(cfg, "account", "enable", "owner@example.test")
    assert client.get(f"{API}/monitors", headers=_as(member)).status_code == 200
    unknown = CliRunner().invoke(statusapp.cli, ["account", "disable", "nobody@x.test",
                                                 "--db", cfg["server"]["database"]])
    assert unknown.exit_code != 0


def test_api_keys_created_capped_listed_and_revoked(cfg, client, key):
    created = client.post(f"{API}/account/api-keys",
                          json={"name": "ci", "permissions": "write,read",
                                "expiresAt": "2099-01-01T00:00:00Z"})
    assert created.status_code == 201
    body = created.json()
    assert body["permissions"] == "read,write" and body["expiresAt"] == "2099-01-01T00:00:00Z"
    assert body["key"].startswith(body["prefix"].rstrip(".")) and body["isActive"]
    listed = client.get(f"{API}/account/api-keys").json()["apiKeys"]
    assert [k["name"] for k in listed] == ["ci", "init"] and "key" not in listed[0]
    ci = _as(body["key"])
    assert client.get(f"{API}/monitors", headers=ci).status_code == 200
    assert client.get(f"{API}/account/api-keys").json()["apiKeys"][0]["lastUsedAt"]
    assert client.delete(f"{API}/monitors/x", headers=ci).status_code == 403  # no delete
    # A key grants no more than the key that makes it.
    wider = client.post(f"{API}/account/api-keys", json={"name": "d", "permissions": "delete"},
                        headers=ci)
    assert wider.status_code == 403 and "delete" in wider.json()["error"]
    default = client.post(f"{API}/account/api-keys", json={"name": "d"}, headers=ci).json()
    assert default["permissions"] == "read,write"
    for bad in ({"permissions": "read,admin"}, {"expiresAt": "2001-01-01"},
                {"expiresAt": "soon"}, {"name": ""}):
        response = client.post(f"{API}/account/api-keys", json={"name": "k", **bad})
        assert response.status_code == 400, bad
    # Roles cap too: a VIEWER's invitation key reads only, and a VIEWER cannot make keys.
    viewer = _join(client, "viewer@example.test", "VIEWER")
    viewer_full = cli(cfg, "apikey", "create", "--email", "viewer@example.test", "--name", "f",
                      "--permissions", "read,write,delete").strip().splitlines()[-1]
    refused = client.post(f"{API}/account/api-keys", json={"name": "x"}, headers=_as(viewer_full))
    assert refused.status_code == 403 and "MEMBER" in refused.json()["error"]
    # Revoking: one's own; another's only as ADMIN+, the owner's only as the owner.
    member = _join(client, "member@example.test", "MEMBER")
    admin = _join(client, "admin@example.test", "ADMIN")
    owner_key_id = listed[1]["id"]
    assert client.delete(f"{API}/account/api-keys/{owner_key_id}",
                         headers=_as(member)).status_code == 403
    assert client.delete(f"{API}/account/api-keys/{owner_key_id}",
                         headers=_as(admin)).status_code == 403
    viewer_keys = client.get(f"{API}/account/api-keys", headers=_as(viewer)).json()["apiKeys"]
    member_id = next(m["id"] for m in client.get(f"{API}/team/members").json()["members"]
                     if m["email"] == "viewer@example.test")
    assert client.get(f"{API}/account/api-keys?memberId={member_id}",
                      headers=_as(member)).status_code == 403
    assert client.get(f"{API}/account/api-keys?memberId={member_id}",
                      headers=_as(admin)).json()["apiKeys"] == viewer_keys
    for k in viewer_keys:
        assert client.delete(f"{API}/account/api-keys/{k['id']}",
                             headers=_as(admin)).status_code == 200
    assert client.get(f"{API}/monitors", headers=_as(viewer)).status_code == 401
    assert client.delete(f"{API}/account/api-keys/{body['id']}").status_code == 200
    assert client.get(f"{API}/monitors", headers=ci).status_code == 401
    keys_now = client.get(f"{API}/account/api-keys").json()["apiKeys"]
    states = {k["id"]: k["isActive"] for k in keys_now}
    assert states[body["id"]] is False and states[listed[1]["id"]] is True
    assert client.delete(f"{API}/account/api-keys/key_nope").status_code == 404
    other = new_key(cfg, "other@example.test")  # another team's key is not found
    other_id = client.get(f"{API}/account/api-keys", headers=_as(other)).json()["apiKeys"][0]["id"]
    assert client.delete(f"{API}/account/api-keys/{other_id}").status_code == 404


def test_usage_counts_match_requests_before_and_after_a_flush(cfg, client):
    rt = client.app.state.statusapp
    monitor = client.post(f"{API}/monitors", json=MONITOR_BODY).json()["id"]
    for _ in range(3):
        client.get(f"{API}/monitors")
    for _ in range(2):
        client.get(f"{API}/monitors/{monitor}")
    hour = statusapp.now_ms() // 3_600_000
    sql(cfg, "INSERT INTO api_usage VALUES ((SELECT id FROM accounts), '/api/v1/old', ?, 5)",
        (hour - 2,))
    expected = {"/api/v1/monitors": 4, "/api/v1/monitors/{monitorId}": 2,
                "/api/v1/account/usage": 1}
    response = client.get(f"{API}/account/usage?period=1h")
    usage = response.json()
    assert usage["period"] == "1h" and usage["requestsByEndpoint"] == expected
    assert usage["totalRequests"] == 7
    limit = int(response.headers["X-RateLimit-Limit"])
    assert usage["rateLimit"] == {"limit": limit, "used": 7,
                                  "remaining": int(response.headers["X-RateLimit-Remaining"])}
    client.portal.call(rt.usage.flush, rt.db)
    assert rt.usage.pending() == []
    stored = dict(sql(cfg, "SELECT endpoint, count FROM api_usage WHERE hour = ?", (hour,)))
    assert stored == expected
    after = client.get(f"{API}/account/usage?period=24h").json()
    assert after["requestsByEndpoint"] == {**expected, "/api/v1/account/usage": 2,
                                           "/api/v1/old": 5}
    assert after["totalRequests"] == 13 and after["rateLimit"]["used"] == 8
    assert client.get(f"{API}/account/usage?period=2h").status_code == 400


def test_invitation_is_emailed_when_smtp_is_configured(tmp_path, notify_smtp):
    mailbox, port = notify_smtp
    cfg = make_cfg(tmp_path, smtp={"host": "127.0.0.1", "port": port, "security": "none",
                                   "sender": "status@team.test"})
    with TestClient(statusapp.create_app(cfg), headers=_as(new_key(cfg))) as client:
        invited = _invite(client, "eve@example.test", "MEMBER")
        assert invited["emailSent"] is True
        message = email.message_from_bytes(mailbox.envelopes[0].original_content,
                                           policy=email.policy.default)
        assert mailbox.envelopes[0].rcpt_tos == ["eve@example.test"]
        assert message["From"] == "status@team.test"
        assert f"/api/v1/team/invitations/{invited['invitationToken']}/accept" in \
            message.get_content()
        client.app.state.statusapp.cfg["smtp"]["port"] = free_port()  # nobody listens
        assert _invite(client, "fay@example.test", "VIEWER")["emailSent"] is False


# --- Metrics tests ---


def test_metrics_exposition_and_auth(tmp_path):
    cfg = make_cfg(tmp_path, server={"metrics_token": "scrape-me"})
    key = new_key(cfg)
    with TestClient(statusapp.create_app(cfg)) as client:
        client.headers["X-API-Key"] = key
        monitor = _cron_monitor(client, 'say "hi" \\ now')
        cert = _cron_monitor(client, "cert")
        del client.headers["X-API-Key"]
        sql(cfg, "UPDATE monitors SET type = 'SSL_CERT', status = 'UP' WHERE id = ?", (cert,))
        now = int(time.time() * 1000)
        _store_checks(cfg, monitor, [("UP", 120, now - 120_000), ("DOWN", None, now - 60_000)])
        sql(cfg, "INSERT INTO checks (monitor_id, region_id, status, response_time, details,"
                 " checked_at) VALUES (?, 'local', 'UP', 250, ?, ?)",
            (cert, json.dumps({"daysRemaining": 42}), now))
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        reader = cli(cfg, "apikey", "create", "--email", "owner@example.test", "--name", "r",
                     "--permissions", "write").strip().splitlines()[-1]
        assert client.get("/metrics", headers={"X-API-Key": reader}).status_code == 403
        by_key = client.get("/metrics", headers={"X-API-Key": key})
        by_token = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert by_key.status_code == by_token.status_code == 200
    assert by_key.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = by_token.text
    labels = f'id="{monitor}",name="say \\"hi\\" \\\\ now",type="CRON"'
    assert f"statusapp_monitor_status{{{labels},status=\"PENDING\"}} 1" in text
    assert f'statusapp_monitor_uptime_ratio{{{labels},window="24h"}} 0.5' in text
    assert f'statusapp_monitor_checks_total{{{labels}}} 2' in text
    assert f'statusapp_certificate_days_remaining{{id="{cert}",name="cert",type="SSL_CERT"}} 42' in text
    assert f'statusapp_monitor_response_time_seconds{{id="{cert}",name="cert",type="SSL_CERT"}} 0.25' in text
    assert "statusapp_write_queue_depth 0" in text
    for name in ("monitor_status", "monitor_uptime_ratio", "write_queue_depth"):
        assert text.count(f"# TYPE statusapp_{name} ") == 1
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert all(line.rsplit(" ", 1)[1].replace(".", "").isdigit() for line in samples)


# --- Page tests ---


DAY = 86_400_000
EVIL = "<script>alert(1)</script>"


def _page_monitor(client, name: str) -> str:
    """A monitor whose history the tests seed: CRON, so no prober adds checks of its own."""
    resp = client.post("/api/v1/monitors", json={"name": name, "url": "http://127.0.0.1:9/",
                                                 "type": "CRON"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def _day_start(offset: int) -> int:
    """The start (UTC midnight) of the day ``offset`` days before today."""
    return (statusapp.now_ms() // DAY - offset) * DAY


def _day_name(offset: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(_day_start(offset) / 1000))


def _seed_checks(db: str, monitor_id: str, offset: int, statuses: list[str]) -> None:
    """Checks on the day ``offset`` days ago, from 01:00 UTC one second apart."""
    start = _day_start(offset) + 3_600_000
    with sqlite3.connect(db, timeout=10) as conn:
        conn.executemany(
            "INSERT INTO checks (monitor_id, region_id, status, response_time, checked_at)"
            " VALUES (?, 'local', ?, 50, ?)",
            [(monitor_id, status, start + i * 1000) for i, status in enumerate(statuses)])


def _seed_incident(db: str, monitor_id: str, number: int, started: int, resolved: int | None,
                   updates: list[tuple[str, str, int]] = ()) -> str:
    incident_id = f"inc_test{number}"
    with sqlite3.connect(db, timeout=10) as conn:
        conn.execute(
            "INSERT INTO incidents (id, account_id, monitor_id, year, number, started_at,"
            " resolved_at, severity, status, root_cause, root_cause_category)"
            " SELECT ?, account_id, id, 2025, ?, ?, ?, 'high', ?, 'secret internal detail',"
            " 'NETWORK_TIMEOUT' FROM monitors WHERE id = ?",
            (incident_id, number, started, resolved, "resolved" if resolved else "open",
             monitor_id))
        conn.executemany("INSERT INTO incident_updates VALUES (?, ?, ?, ?, ?)",
                         [(f"{incident_id}_{i}", incident_id, status, message, at)
                          for i, (status, message, at) in enumerate(updates)])
    return incident_id


# The seeded history of the "api" monitor: (days ago, statuses) -> expected class and hover text.
_HISTORY = [(1, ["UP", "UP", "DEGRADED", "DOWN"], "major", "75.00% uptime"),
            (2, ["DOWN"] + ["UP"] * 199, "minor", "99.50% uptime"),
            (3, ["UP"] * 3, "ok", "100.00% uptime"),
            (4, ["DOWN"] * 3 + ["UP"] * 97, "partial", "97.00% uptime"),
            (5, ["UP", "DOWN", "DEGRADED"], "major", "66.66% uptime")]
_HISTORY_UPTIME = "98.06"  # (3 + 199 + 3 + 97 + 2) / 310 = 98.0645...%, rounded down


@pytest.fixture
def seeded(cfg, client):
    """A public page "acme": group Core = [api, EVIL], group Edge = [cdn]; history, incidents."""
    api_id, evil_id, cdn_id = (_page_monitor(client, n) for n in ("api", EVIL, "cdn"))
    hidden = _page_monitor(client, "not on the page")
    resp = client.post("/api/v1/status-pages", json={
        "name": "Acme & Co", "slug": "acme", "description": "Acme <services>",
        "brandColor": "#22c55e", "logoUrl": "https://cdn.acme.test/logo.png",
        "faviconUrl": "https://cdn.acme.test/favicon.ico", "customDomain": "Status.Acme.test",
        "monitorGroups": [{"name": "Core", "monitorIds": [api_id, evil_id]},
                          {"name": "Edge", "monitorIds": [cdn_id]}]})
    assert resp.status_code == 201, resp.text
    db = cfg["server"]["database"]
    for offset, statuses, _, _ in _HISTORY:
        _seed_checks(db, api_id, offset, statuses)
    sql(cfg, "UPDATE monitors SET status = 'DOWN' WHERE id = ?", (api_id,))
    sql(cfg, "UPDATE monitors SET status = 'UP' WHERE id IN (?, ?)", (evil_id, cdn_id))
    now = statusapp.now_ms()
    _seed_incident(db, api_id, 3, now - 3_600_000, None, [
        ("investigating", "Timeouts from <the> database", now - 3_000_000),
        ("identified", "A bad index", now - 1_200_000)])
    _seed_incident(db, evil_id, 2, now - 3 * DAY, now - 3 * DAY + 900_000,
                   [("resolved", "Fixed & verified", now - 3 * DAY + 900_000)])
    _seed_incident(db, cdn_id, 1, now - 20 * DAY, now - 20 * DAY + 60_000)
    _seed_incident(db, hidden, 4, now - 600_000, None)
    return {"api": api_id, "evil": evil_id, "cdn": cdn_id, "hidden": hidden,
            "page": resp.json()["id"]}


def test_page_api_crud_keeps_group_order(client):
    a, b, c = (_page_monitor(client, n) for n in "abc")
    resp = client.post("/api/v1/status-pages", json={
        "name": "Public", "slug": "public", "brandColor": "#ABC",
        "monitorGroups": [{"name": "Second first", "monitorIds": [c, a, c]},
                          {"name": "Empty"}]})
    assert resp.status_code == 201
    page = resp.json()
    assert page["isPublic"] is True and page["brandColor"] == "#abc"
    assert page["url"].endswith("/status/public") and page["customDomain"] is None
    assert [(g["name"], g["monitorIds"]) for g in page["monitorGroups"]] == [
        ("Second first", [c, a]), ("Empty", [])]
    assert page["monitorGroups"][0]["monitors"][0] == {"id": c, "name": "c", "type": "CRON",
                                                       "status": "PENDING"}
    listed = client.get("/api/v1/status-pages").json()["statusPages"]
    assert [p["slug"] for p in listed] == ["public"] and "monitorGroups" not in listed[0]

    resp = client.put(f"/api/v1/status-pages/{page['id']}",
                      json={"name": "Renamed", "isPublic": False, "description": "d"})
    assert resp.status_code == 200
    got = client.get(f"/api/v1/status-pages/{page['id']}").json()
    assert (got["name"], got["slug"], got["isPublic"], got["description"]) == (
        "Renamed", "public", False, "d")
    assert [g["monitorIds"] for g in got["monitorGroups"]] == [[c, a], []]

    resp = client.put(f"/api/v1/status-pages/{page['id']}", json={
        "monitorGroups": [{"name": "Only", "monitorIds": [b]}], "isPublic": None,
        "description": None})
    got = resp.json()
    assert [(g["name"], g["monitorIds"]) for g in got["monitorGroups"]] == [("Only", [b])]
    assert got["isPublic"] is True and got["description"] is None
    client.delete(f"/api/v1/monitors/{b}")
    assert client.get(f"/api/v1/status-pages/{page['id']}").json()["monitorGroups"][0][
        "monitorIds"] == []

    resp = client.delete(f"/api/v1/status-pages/{page['id']}")
    assert resp.json() == {"success": True, "message": "Status page deleted successfully"}
    assert client.get(f"/api/v1/status-pages/{page['id']}").status_code == 404


@pytest.mark.parametrize("body, path", [
    ({"slug": "ok"}, ["name"]),
    ({"name": "x"}, ["slug"]),
    ({"name": "x", "slug": "Bad Slug"}, ["slug"]),
    ({"name": "x", "slug": "-edge"}, ["slug"]),
    ({"name": "x", "slug": "a" * 65}, ["slug"]),
    ({"name": "x", "slug": "ok", "brandColor": "red"}, ["brandColor"]),
    ({"name": "x", "slug": "ok", "brandColor": "#12345"}, ["brandColor"]),
    ({"name": "x", "slug": "ok", "logoUrl": "javascript:alert(1)"}, ["logoUrl"]),
    ({"name": "x", "slug": "ok", "faviconUrl": "ftp://host.test/f.ico"}, ["faviconUrl"]),
    ({"name": "x", "slug": "ok", "customDomain": "https://status.acme.test/"}, ["customDomain"]),
    ({"name": "x", "slug": "ok", "customDomain": "10.0.0.1"}, ["customDomain"]),
    ({"name": "x", "slug": "ok", "isPublic": "yes"}, ["isPublic"]),
    ({"name": "x", "slug": "ok", "monitorGroups": [{"monitorIds": []}]},
     ["monitorGroups", 0, "name"]),
    ({"name": "x", "slug": "ok", "monitorGroups": [{"name": "g", "monitorIds": ["mon_nope"]}]},
     ["monitorGroups", 0, "monitorIds"]),
])
def test_page_api_validation(client, body, path):
    resp = client.post("/api/v1/status-pages", json=body)
    assert resp.status_code == 400
    assert [issue["path"] for issue in resp.json()["error"]] == [path]


def test_page_api_conflicts_and_team_isolation(cfg, client):
    first = client.post("/api/v1/status-pages", json={
        "name": "A", "slug": "taken", "customDomain": "status.acme.test"}).json()
    second = client.post("/api/v1/status-pages", json={"name": "B", "slug": "free"}).json()
    for change in ({"slug": "taken"}, {"customDomain": "STATUS.acme.test."}):
        resp = client.put(f"/api/v1/status-pages/{second['id']}", json=change)
        assert resp.status_code == 409 and resp.json()["code"] == "CONFLICT"
    assert client.put(f"/api/v1/status-pages/{first['id']}",
                      json={"slug": "taken", "name": "A2"}).status_code == 200

    other_key = new_key(cfg, "other@example.test")
    mine = _page_monitor(client, "mine")
    headers = {"X-API-Key": other_key}
    theirs = client.post("/api/v1/monitors", headers=headers,
                         json={"name": "theirs", "url": "http://127.0.0.1:9/"}).json()["id"]
    resp = client.post("/api/v1/status-pages", headers=headers, json={
        "name": "T", "slug": "theirs", "monitorGroups": [{"name": "g", "monitorIds": [mine]}]})
    assert resp.status_code == 400 and mine in resp.json()["error"][0]["message"]
    assert client.post("/api/v1/status-pages", headers=headers,
                       json={"name": "T", "slug": "taken"}).status_code == 409
    assert client.get(f"/api/v1/status-pages/{first['id']}", headers=headers).status_code == 404
    assert client.get("/api/v1/status-pages", headers=headers).json() == {"statusPages": []}
    resp = client.put(f"/api/v1/status-pages/{first['id']}",
                      json={"monitorGroups": [{"name": "g", "monitorIds": [theirs]}]})
    assert resp.status_code == 400


def test_page_overall_status_rule():
    def monitors(*states):
        return [{"status": s.lstrip("~"), "paused": s.startswith("~")} for s in states]
    assert statusapp.overall_status(monitors()) == "operational"
    assert statusapp.overall_status(monitors("UP", "PENDING", "~DOWN")) == "operational"
    assert statusapp.overall_status(monitors("UP", "DEGRADED")) == "degraded"
    assert statusapp.overall_status(monitors("UP", "DOWN", "DEGRADED")) == "partial_outage"
    assert statusapp.overall_status(monitors("UP", "DOWN")) == "partial_outage"
    assert statusapp.overall_status(monitors("UP", "DOWN", "DOWN")) == "major_outage"
    assert statusapp.overall_status(monitors("DOWN", "PENDING")) == "major_outage"


@pytest.mark.asyncio
async def test_page_daily_stats_counts_each_utc_day(cfg):
    db = statusapp.Database(cfg["server"]["database"])
    await db.open()
    try:
        await db.write([("INSERT INTO accounts (id, email, plan, created_at, updated_at)"
                         " VALUES ('acc', 'a@x.test', 'STARTER', 0, 0)", ())])
        await db.write([(
            "INSERT INTO monitors (id, account_id, name, url, type, interval, timeout, http_method,"
            " grace_period, ssl_cert_expiry_days, regression_enabled, regression_threshold,"
            " regression_period, performance_timings, domain_expiry_days, domain_monitor_dns,"
            " domain_monitor_blacklist, domain_monitor_whois, created_at, updated_at) VALUES"
            " (?, 'acc', 'm', 'http://x.test', 'WEBSITE', 60, 30, 'GET', 300, 30, 0, 50, 7, 0,"
            " 30, 1, 1, 1, 0, 0)", (m,)) for m in ("m1", "m2")])
        for offset, statuses, _, _ in _HISTORY[:2]:
            _seed_checks(cfg["server"]["database"], "m1", offset, statuses)
        _seed_checks(cfg["server"]["database"], "m1", 7, ["DOWN"])  # outside a 3-day window
        stats = await statusapp.daily_stats(db, ["m1", "m2"], 3)
    finally:
        await db.close()
    assert [d["day"] for d in stats["m1"]] == [_day_name(2), _day_name(1), _day_name(0)]
    assert stats["m1"] == [
        {"day": _day_name(2), "up": 199, "down": 1, "degraded": 0, "total": 200, "uptime": 99.5},
        {"day": _day_name(1), "up": 2, "down": 1, "degraded": 1, "total": 4, "uptime": 75.0},
        {"day": _day_name(0), "up": 0, "down": 0, "degraded": 0, "total": 0, "uptime": None}]
    assert [d["total"] for d in stats["m2"]] == [0, 0, 0]


def _bars(page_html: str) -> list[list[tuple[str, str]]]:
    """Per monitor bar: the (class, hover text) of each day, a cell that spans a run of days
    giving each of them its own class and text (cells are grouped by class)."""
    bars = []
    for svg in re.findall(r'<svg class="bars".*?</svg>', page_html):
        cells = sorted(
            (int(x), int(width), level, text)
            for level, group in re.findall(r'<g class="d-(\w+)">(.*?)</g>', svg)
            for x, width, text in re.findall(
                r'<path d="M(\d+) 0h(\d+)v34h-\2"><title>([^<]*)</title></path>', group))
        days: list[tuple[str, str]] = []
        for x, width, level, text in cells:
            assert x == len(days) * 10  # cells abut, in day order
            days += [(level, text)] * ((width + 2) // 10)
        bars.append(days)
    return bars


def test_page_html_shows_state_bars_and_incidents(client, seeded):
    resp = client.get("/status/acme")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "script-src" not in resp.headers["content-security-policy"]  # no scripts at all
    assert resp.headers["content-encoding"] == "gzip"
    page = resp.text
    assert page.count("<script") == 0
    assert '<meta name="viewport"' in page and "<header" in page and "<main" in page
    assert "<footer" in page and "<h1>Acme &amp; Co</h1>" in page
    assert '<img src="https://cdn.acme.test/logo.png" alt="Acme &amp; Co logo">' in page
    assert '<link rel="icon" href="https://cdn.acme.test/favicon.ico">' in page
    assert "--brand:#22c55e;--on-brand:#111827" in page  # dark text on a light brand colour
    assert "Acme &lt;services&gt;" in page
    assert ">Partial outage<" in page  # 1 of 3 monitors DOWN
    assert page.index(">Core<") < page.index(">api<") < page.index(">Edge<") < page.index(">cdn<")

    api_bar, evil_bar, cdn_bar = _bars(page)
    assert len(api_bar) == 90 and api_bar[-1] == ("none", f"{_day_name(0)}: no data")
    for offset, _, level, text in _HISTORY:
        assert api_bar[89 - offset] == (level, f"{_day_name(offset)}: {text}")
    assert sum(level == "none" for level, _ in api_bar) == 85
    assert api_bar[0] == ("none", f"{_day_name(89)} to {_day_name(6)}: no data")  # one cell
    assert page.count("<path ") == 7 + 1 + 1  # api: 84 days of no data, 5 seeded, today
    assert f"<strong>{_HISTORY_UPTIME}% uptime</strong>" in page
    assert all(level == "none" for level, _ in evil_bar + cdn_bar)
    assert page.count("<strong>No data</strong>") == 2
    assert 'class="state s-down"><span class="dot" aria-hidden="true"></span>Outage' in page

    active = page[page.index("Active incidents"):page.index("Current status")]
    assert "INC-2025-0003: api (open)" in active and "Ongoing for 1 h" in active
    assert active.index("A bad index") < active.index("Timeouts from &lt;the&gt; database")
    assert "Network timeout" in active and "secret internal detail" not in page
    past = page[page.index("Past incidents"):]
    assert "INC-2025-0002: &lt;script&gt;alert(1)&lt;/script&gt; (resolved)" in past
    assert "after 15 min" in past and "Fixed &amp; verified" in past
    assert "INC-2025-0001" not in page and "INC-2025-0004" not in page  # too old; not on page


def test_page_bar_cells_are_runs_of_days_at_one_level():
    def day(name: str, up: int, down: int) -> dict:
        return {"day": name, "up": up, "down": down, "degraded": 0, "total": up + down,
                "uptime": statusapp.uptime_percent(up, up + down)}
    days = [day("d1", 99, 1), day("d2", 199, 1), day("d3", 5, 0), day("d4", 7, 0),
            day("d5", 0, 0), day("d6", 9, 1), day("d7", 3, 0)]
    assert statusapp._day_runs(days) == [
        (0, 2, "minor", "d1 to d2: 99.33% uptime"), (2, 2, "ok", "d3 to d4: no downtime"),
        (4, 1, "none", "d5: no data"), (5, 1, "major", "d6: 90.00% uptime"),
        (6, 1, "ok", "d7: 100.00% uptime")]


def test_page_escapes_user_text(client, seeded):
    page = client.get("/status/acme").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and EVIL not in page
    summary = client.get("/status/acme.json").json()
    assert summary["groups"][0]["monitors"][1]["name"] == EVIL
    feed = client.get("/status/acme/feed.atom").text
    assert EVIL not in feed and "&lt;script&gt;alert(1)&lt;/script&gt;" in feed


def test_page_private_and_unknown_are_404(client, seeded):
    client.put(f"/api/v1/status-pages/{seeded['page']}", json={"isPublic": False})
    for path in ("/status/acme", "/status/nope"):
        resp = client.get(path)
        assert resp.status_code == 404 and "Status page not found" in resp.text
        assert "acme" not in resp.text.lower()
    assert client.get("/", headers={"Host": "status.acme.test"}).status_code == 404
    for path in ("/status/acme.json", "/status/acme/feed.atom",
                 f"/badge/{seeded['api']}/status.svg"):
        resp = client.get(path)
        assert resp.status_code == 404 and resp.json()["code"] == "NOT_FOUND"


def test_public_responses_are_cached_with_etag_gzip_and_invalidated_by_writes(client, seeded):
    cache = client.app.state.statusapp.public_cache
    first = client.get("/status/acme")
    renders = cache.renders
    again = client.get("/status/acme")
    assert cache.renders == renders and again.content == first.content  # served from memory
    etag = first.headers["etag"]
    assert first.headers["content-encoding"] == "gzip" and first.headers["vary"] == "Accept-Encoding"
    plain = client.get("/status/acme", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.headers["etag"] == etag
    unchanged = client.get("/status/acme", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b""
    for path in ("/status/acme.json", "/status/acme/feed.atom",
                 f"/badge/{seeded['api']}/status.svg"):
        tag = client.get(path).headers["etag"]
        assert client.get(path, headers={"If-None-Match": tag}).status_code == 304
    resp = client.post(f"/api/v1/monitors/{seeded['api']}/pause")
    assert resp.status_code == 200, resp.text
    changed = client.get("/status/acme", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert cache.renders > renders
    assert client.get(f"/badge/{seeded['api']}/status.svg").text.count(">paused<") == 2


@pytest.mark.asyncio
async def test_a_stampede_of_first_requests_renders_the_page_once(cfg, key):
    app = statusapp.create_app(cfg)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://status.test",
                                     headers={"X-API-Key": key}) as http:
            monitor = (await http.post("/api/v1/monitors", json={
                "name": "api", "type": "CRON", "interval": 3600})).json()
            page = await http.post("/api/v1/status-pages", json={
                "name": "Stampede", "slug": "stampede",
                "monitorGroups": [{"name": "All", "monitorIds": [monitor["id"]]}]})
            assert page.status_code == 201
            cache = app.state.statusapp.public_cache
            answers = await asyncio.gather(*(http.get("/status/stampede") for _ in range(20)))
    assert {a.status_code for a in answers} == {200} and cache.renders == 1
    assert len({a.headers["etag"] for a in answers}) == 1


def test_page_custom_domain_serves_root(client, seeded):
    for host in ("status.acme.test", "STATUS.ACME.TEST:8443", "status.acme.test."):
        resp = client.get("/", headers={"Host": host})
        assert resp.status_code == 200 and "<h1>Acme &amp; Co</h1>" in resp.text
    other = client.get("/", headers={"Host": "other.acme.test"}, follow_redirects=False)
    assert other.status_code == 303 and other.headers["location"] == "/signin?next=/"


def test_page_json_summary(client, seeded):
    summary = client.get("/status/acme.json").json()
    assert summary["status"] == {"indicator": "partial_outage", "description": "Partial outage"}
    assert summary["page"]["url"] == "http://testserver/status/acme"
    assert summary["page"]["brandColor"] == "#22c55e"
    assert [[(m["name"], m["status"], m["uptime90d"]) for m in g["monitors"]]
            for g in summary["groups"]] == [[("api", "DOWN", 98.06), (EVIL, "UP", None)],
                                            [("cdn", "UP", None)]]
    [active] = summary["activeIncidents"]
    assert active["incidentNumber"] == "INC-2025-0003" and active["status"] == "open"
    assert [u["message"] for u in active["updates"]] == ["A bad index",
                                                         "Timeouts from <the> database"]
    assert "rootCause" not in active and active["rootCauseCategory"] == "NETWORK_TIMEOUT"
    assert [i["incidentNumber"] for i in summary["recentIncidents"]] == ["INC-2025-0002"]


def test_page_atom_feed(client, seeded):
    import xml.etree.ElementTree as ET
    resp = client.get("/status/acme/feed.atom")
    assert resp.headers["content-type"] == "application/atom+xml; charset=utf-8"
    ns = {"a": "http://www.w3.org/2005/Atom"}
    feed = ET.fromstring(resp.content)
    assert feed.find("a:id", ns).text == f"urn:statusapp:status-page:{seeded['page']}"
    assert feed.find("a:title", ns).text == "Acme & Co incidents"
    assert feed.find("a:author/a:name", ns).text == "Acme & Co"
    entries = feed.findall("a:entry", ns)
    assert [e.find("a:title", ns).text for e in entries] == [
        "INC-2025-0003: api (open)", f"INC-2025-0002: {EVIL} (resolved)",
        "INC-2025-0001: cdn (resolved)"]
    newest = entries[0]
    assert newest.find("a:id", ns).text == "urn:statusapp:incident:inc_test3"
    assert feed.find("a:updated", ns).text >= newest.find("a:updated", ns).text
    content = newest.find("a:content", ns)
    assert content.get("type") == "text" and "Timeouts from <the> database" in content.text
    assert all(e.find("a:updated", ns).text.endswith("Z") for e in entries)


def test_page_badges(cfg, client, seeded):
    resp = client.get(f"/badge/{seeded['api']}/status.svg")
    assert resp.status_code == 200 and resp.headers["cache-control"] == "max-age=60"
    assert resp.headers["content-type"].startswith("image/svg+xml")
    assert "<title>api: down</title>" in resp.text and 'fill="#e05d44"' in resp.text
    resp = client.get(f"/badge/{seeded['api']}/uptime.svg?period=7d")
    assert "<title>api: 98.06% uptime over 7d</title>" in resp.text
    assert 'fill="#dfb317"' in resp.text  # 95-99 %: yellow
    assert ">uptime 30d<" in client.get(f"/badge/{seeded['api']}/uptime.svg").text
    resp = client.get(f"/badge/{seeded['evil']}/uptime.svg?period=24h")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;: no data uptime over 24h" in resp.text
    now = statusapp.now_ms()
    with sqlite3.connect(cfg["server"]["database"]) as conn:
        conn.executemany("INSERT INTO checks (monitor_id, region_id, status, checked_at)"
                         " VALUES (?, 'local', ?, ?)",
                         [(seeded["cdn"], s, now - 600_000 - i * 1000)
                          for i, s in enumerate(["UP"] * 7 + ["DOWN"])])
        conn.execute("INSERT INTO checks (monitor_id, region_id, status, checked_at)"
                     " VALUES (?, 'local', 'DOWN', ?)", (seeded["cdn"], now - 7_200_000))
    resp = client.get(f"/badge/{seeded['cdn']}/uptime.svg?period=1h")
    assert ">87.50%<" in resp.text and "over 1h" in resp.text
    assert ">77.77%<" in client.get(f"/badge/{seeded['cdn']}/uptime.svg?period=24h").text
    assert client.get(f"/badge/{seeded['api']}/uptime.svg?period=2d").status_code == 400
    assert client.get(f"/badge/{seeded['hidden']}/status.svg").status_code == 404
    assert client.get("/badge/mon_nope/uptime.svg").status_code == 404


def test_page_in_headless_browser(tmp_path):
    import re
    import shutil
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    srv = Server(tmp_path).start()
    try:
        key = re.search(r"sk_live_\S+", srv.output()).group(0)
        api = httpx.Client(base_url=srv.url + "/api/v1", headers={"X-API-Key": key})
        ids = [api.post("/monitors", json={"name": name, "url": "http://127.0.0.1:9/",
                                           "isActive": False}).json()["id"]
               for name in ("Checkout API", EVIL)]
        resp = api.post("/status-pages", json={
            "name": "Browser Co", "slug": "browser", "brandColor": "#1e3a8a",
            "monitorGroups": [{"name": "Services", "monitorIds": ids}]})
        assert resp.status_code == 201, resp.text
        for offset, statuses, _, _ in _HISTORY:
            _seed_checks(srv.db, ids[0], offset, statuses)
        now = statusapp.now_ms()
        _seed_incident(srv.db, ids[0], 9, now - 600_000, None,
                       [("investigating", "Payments are slow for some users", now - 300_000)])
        common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=390,844"]
        url = f"{srv.url}/status/browser"
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                             timeout=90).stdout
        shot = tmp_path / "page.png"
        subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=90)
    finally:
        srv.stop()
    assert "<h1>Browser Co</h1>" in dom and "Checkout API" in dom
    assert "Payments are slow for some users" in dom and "INC-2025-0009" in dom
    assert f"{_HISTORY_UPTIME}% uptime" in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # shown as text...
    assert "<script" not in dom  # ...and no element was injected
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert int.from_bytes(png[16:20], "big") == 390  # the phone-width viewport


# Secrets fed through every input a public page could echo: a heartbeat's fail body, a check
# error carrying the target's own words, a target URL with credentials and a query-string key,
# and request headers.  One served instance; its stderr is the log the logging test reads.

_FAIL_BODY = "DB_PASSWORD=hunter2 at 10.0.0.5"
_LEAK_ANSWER = b"LEAK-7f3a at 10.9.8.7\r\n\r\n"  # not HTTP: the check error quotes it
_SECRETS = ("hunter2", "10.0.0.5", "LEAK-7f3a", "10.9.8.7", "pw-s3cret", "qs-s3cret",
            "hdr-s3cret", "api_key")


class _GarbageTarget(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(_LEAK_ANSWER)


@pytest.fixture(scope="module")
def leaky_run(tmp_path_factory):
    """A served StatusApp whose WEBSITE and CRON monitors went DOWN with secret-laden errors,
    alerted a channel and a webhook, and sit on the public page "leaky"."""
    target = _serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), _GarbageTarget))
    receiver = _NotifyReceiver()
    srv = Server(tmp_path_factory.mktemp("leaky"), env={"STATUSAPP_PROBES_RETRY_DELAY": "1"})
    srv.start()
    try:
        api = _hb_api(srv)
        channel = api.post("/notifications", json={"name": "ops hook", "type": "WEBHOOK",
                                                    "config": {"url": f"{receiver.url}/chan"}})
        hook = api.post("/webhooks", json={"name": "audit", "url": f"{receiver.url}/hook",
                                           "events": "monitor.down,incident.created"})
        assert channel.status_code == hook.status_code == 201, (channel.text, hook.text)
        links = [{"channelId": channel.json()["id"]}]
        url = f"http://admin:pw-s3cret@127.0.0.1:{target.server_address[1]}/h?api_key=qs-s3cret"
        shop = api.post("/monitors", json={
            "name": "Shop", "url": url, "type": "WEBSITE", "interval": 1, "timeout": 5,
            "requestHeaders": json.dumps({"X-Token": "hdr-s3cret"}), "notifications": links})
        assert shop.status_code == 201, shop.text
        backup = _cron(api, name="Backup", notifications=links)
        ping = backup["heartbeatUrl"].removeprefix(srv.url + "/api/v1")
        assert api.post(ping + "/fail", content=_FAIL_BODY).status_code == 200
        page = api.post("/status-pages", json={"name": "Leaky", "slug": "leaky", "monitorGroups": [
            {"name": "All", "monitorIds": [shop.json()["id"], backup["id"]]}]})
        assert page.status_code == 201, page.text
        # Per monitor: monitor.down to the channel, monitor.down and incident.created to the hook.
        eventually(lambda: len(receiver.requests) == 6 and
                   api.get("/incidents").json()["pagination"]["total"] == 2)
        incident = api.get("/incidents", params={"monitorId": backup["id"]}).json()["incidents"]
        update = api.post(f"/incidents/{incident[0]['id']}/updates",
                          json={"status": "identified", "message": "Backups paused by Ann"})
        assert update.status_code == 201, update.text
        yield {"srv": srv, "api": api, "receiver": receiver, "ping": ping, "url": url,
               "monitors": [shop.json()["id"], backup["id"]]}
    finally:
        srv.stop()
        receiver.close()
        _stop(target)


def test_public_routes_never_show_check_errors_job_output_urls_or_headers(leaky_run):
    srv, api = leaky_run["srv"], leaky_run["api"]
    paths = ["/status/leaky", "/status/leaky.json", "/status/leaky/feed.atom",
             *(f"/badge/{m}/{kind}.svg" for m in leaky_run["monitors"]
               for kind in ("status", "uptime"))]
    public = ""
    for path in paths:
        response = httpx.get(srv.url + path, timeout=10)
        assert response.status_code == 200, path
        public += response.text
    errors = {c["error"] for m in leaky_run["monitors"]
              for c in api.get(f"/monitors/{m}").json()["checks"]}
    assert any("LEAK-7f3a" in e for e in errors) and _FAIL_BODY in errors  # they were stored...
    target = urllib.parse.urlsplit(leaky_run["url"]).netloc.rsplit("@")[1]  # 127.0.0.1:port
    for secret in (*_SECRETS, *errors, target, leaky_run["ping"].rsplit("/", 1)[1]):
        assert secret not in public, secret  # ...and published nowhere
    assert "Shop is down (cause: Server error)" in public
    assert "Backup is down (cause: Application error)" in public
    assert "Backups paused by Ann" in public  # what a person wrote is shown


def test_log_has_status_changes_and_alert_outcomes_and_no_secrets(leaky_run):
    """The default level logs one line per status change and per alert outcome, no probe
    requests, and never a URL's credentials or query, a heartbeat id or a job's output."""
    srv, token = leaky_run["srv"], leaky_run["ping"].rsplit("/", 1)[1]
    output = eventually(lambda: srv.output().count(": delivered") == 6 and srv.output())
    for secret in ("pw-s3cret", "qs-s3cret", "hdr-s3cret", "hunter2", token):
        assert secret not in output, secret
    assert "HTTP Request:" not in output and "check of" not in output
    shop, backup = leaky_run["monitors"]
    assert re.search(rf"monitor Shop \({shop}\): PENDING \u2192 DOWN \(invalid HTTP answer", output)
    assert f"monitor Backup ({backup}): PENDING \u2192 DOWN (heartbeat ping)" in output
    assert "alert monitor.down for monitor Shop via WEBHOOK 'ops hook': delivered" in output
    assert "alert incident.created for monitor Backup via WEBHOOK 'audit': delivered" in output
    assert len(re.findall(r"alert monitor\.down for monitor Shop via WEBHOOK 'ops hook'",
                          output)) == 1
    for request in leaky_run["receiver"].requests:  # no payload carries the ping URL
        assert token not in request["body"].decode(), request["path"]


def test_every_log_line_is_redacted_at_any_level():
    """The formatter `serve` installs strips URL credentials, queries and heartbeat ids from
    messages and tracebacks alike."""
    assert statusapp.redact('GET https://u:pw@api.test:8/v1/x?api_key=k#f "HTTP/1.1 200"') == \
        'GET https://api.test:8/v1/x?\u2026 "HTTP/1.1 200"'
    assert statusapp.redact("POST /api/v1/heartbeat/AbC-_9/fail") == \
        "POST /api/v1/heartbeat/\u2026/fail"
    assert statusapp.redact("plain https://status.test/page") == "plain https://status.test/page"
    try:
        raise ValueError("cannot reach http://admin:hunter2@10.0.0.5/?token=t0k")
    except ValueError:
        record = logging.LogRecord("statusapp", logging.DEBUG, __file__, 1, "failed %s", (
            "https://hooks.test/x?secret=s3c",), sys.exc_info())
    line = statusapp.RedactingFormatter("%(message)s").format(record)
    assert "ValueError: cannot reach http://10.0.0.5/?\u2026" in line
    assert not {"hunter2", "t0k", "s3c"} & set(re.findall(r"\w+", line))


# --- Hostile input tests ---

HOSTILE_VALUES = (None, [], {}, "x", -1, 10**20, 1e308, True, "\ud800", "é" * 3000)
HOSTILE_RAW_BODIES = (b"null", b"[]", b'"str"', b"123", b"{}", b'{"name": NaN, "interval": Infinity}',
                      b'{"interval": 1e999, "timeout": -1e999}', b'{"name": "\\ud800"}',
                      b"\xff\xfe{", b'{"a":' * 2000)
HOSTILE_PATH_IDS = ("nope", "%00", "x" * 5000, "\u00e9\u2603", "..%2F..%2Fetc", "%ED%A0%80", "%FF")
HOSTILE_QUERIES = ("page=-1", "page=99999999999999999999999", "limit=abc", "limit=-5",
                   "limit=10000000000000000000000", "period=x", "sort=__proto__", "order=sideways",
                   "status=%00", "search=%ED%A0%80", "memberId=%FF", "page=1e3&limit=0")
HOSTILE_NESTED = {
    "apiAuthConfig": ({"type": "bearer", "token": 5}, {"type": [], "username": {}},
                      {"type": "oauth2", "tokenUrl": 1e308, "clientId": None, "scopes": {}}),
    "notifications": ([None, 1, "x"], [{"type": "EMAIL", "config": []}],
                      [{"type": "SLACK", "enabled": "yes", "config": {"webhookUrl": 10**20}}],
                      [{"channelId": {}}, {"channelId": 10**20}]),
    "config": ({"emails": "a"}, {"emails": [None, 10**20]}, {"webhookUrl": []},
               {"headers": {"X": 1}}, {"headers": []}, {"phoneNumbers": [{}]}),
    "monitorGroups": ([None], [{"name": 1, "monitorIds": "x"}], [{"name": "g", "monitorIds": [1, None, {}]}]),
    "monitorIds": ([1, None], "x"),
    "requestHeaders": ('{"a": 1}', "[]", "null", '"x"', "{"),
    "events": (["monitor.down", 1], "monitor.down"),
    "permissions": ([], "read,bogus", "x" * 10000),
    "expiresAt": ("yesterday", "1970-01-01T00:00:00Z", "9999-99-99", "+999999-01-01T00:00:00Z"),
}
CONTENT_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded",
                 "application/merge-patch+json", "")


def _field_names() -> list[str]:
    """Every field name any resource's Field table knows."""
    tables = [value for value in vars(statusapp).values() if isinstance(value, tuple) and value
              and all(isinstance(item, statusapp.Field) for item in value)]
    return sorted({field.name for table in tables for field in table})


def _hostile_bodies(rng: random.Random, names: list[str]) -> list[tuple[bytes, str]]:
    """Bodies of every kind: raw oddities, every field set to each wrong type, nested junk."""
    bodies = [(raw, "application/json") for raw in HOSTILE_RAW_BODIES]
    bodies += [(json.dumps({name: value for name in names}).encode(), "application/json")
               for value in HOSTILE_VALUES]
    for name, values in HOSTILE_NESTED.items():
        for value in values:
            body = {"name": "m", "url": "http://127.0.0.1:9/", "type": "API", "slug": "s",
                    "email": "a@b.test", name: value}
            bodies.append((json.dumps(body).encode(), "application/json"))
    bodies += [(b'{"name": "x"}', rng.choice(CONTENT_TYPES[1:])) for _ in range(2)]
    return bodies


def _single_field_bodies(rng: random.Random, names: list[str]) -> list[tuple[bytes, str]]:
    """One wrong value per field on an otherwise plausible body, so no other error masks it."""
    base = {"name": "m", "url": "http://127.0.0.1:9/", "slug": "fuzz-other", "email": "x@y.test",
            "role": "VIEWER", "events": "monitor.down", "status": "identified", "message": "m"}
    return [(json.dumps({**base, name: rng.choice(HOSTILE_VALUES)}).encode(), "application/json")
            for name in names]


def _real_ids(cfg, client) -> dict[str, str]:
    """One real id of every kind of resource, for the path parameters."""
    monitor = client.post("/api/v1/monitors", json={"name": "m", "url": "http://127.0.0.1:9/"}).json()
    sql(cfg, "INSERT INTO incidents (id, account_id, monitor_id, year, number, started_at, severity,"
             " status) SELECT 'inc_fuzz', account_id, id, 2024, 1, 0, 'critical', 'open' FROM monitors"
             " WHERE id = ?", (monitor["id"],))
    cron = client.post("/api/v1/monitors", json={"name": "c", "url": "job", "type": "CRON"}).json()
    channel = client.post("/api/v1/notifications", json={
        "name": "c", "type": "WEBHOOK", "config": {"url": "http://127.0.0.1:9/"}}).json()
    webhook = client.post("/api/v1/webhooks", json={"name": "w", "url": "http://127.0.0.1:9/",
                                                    "events": "monitor.down"}).json()
    page = client.post("/api/v1/status-pages", json={"name": "p", "slug": "fuzz-page", "monitorGroups": [
        {"name": "g", "monitorIds": [monitor["id"]]}]}).json()
    invite = client.post("/api/v1/team/members", json={"email": "fuzz@example.test",
                                                           "role": "MEMBER"}).json()
    api_key = client.post("/api/v1/account/api-keys", json={"name": "k"}).json()
    window = client.post("/api/v1/maintenance-windows", json={
        "title": "w", "startsAt": "2030-01-01T00:00:00Z", "endsAt": "2030-01-01T01:00:00Z"}).json()
    ids = {"monitorId": monitor.get("id"), "channelId": channel.get("id"),
           "windowId": window.get("id"),
           "webhookId": webhook.get("id"), "statusPageId": page.get("id"),
           "memberId": invite.get("id"), "keyId": api_key.get("id"),
           "heartbeatId": (cron.get("heartbeatUrl") or "x").rstrip("/").rsplit("/", 1)[-1],
           "slug": "fuzz-page", "token": invite.get("invitationToken"), "incidentId": "inc_fuzz",
           "exitCode": "3", "agentToken": _add_region(cfg["server"]["database"], "fuzz")}
    assert all(ids.values()), ids
    assert client.get("/api/v1/incidents/inc_fuzz").status_code == 200
    assert client.get(f"/badge/{monitor['id']}/status.svg").status_code == 200
    return ids


def _hostile_requests(real: dict[str, str]) -> list[tuple[str, str, bytes, str]]:
    """(method, url, body, content type): every route with real and weird path ids, each with
    hostile bodies or queries; the same list on every call (a fixed seed)."""
    rng = random.Random(1)
    names = _field_names()
    bodies = _hostile_bodies(rng, names)
    singles = _single_field_bodies(rng, names)
    routes = [(route.path, method) for route in
              [*statusapp.ROUTES, *statusapp.PAGE_ROUTES, *statusapp.METRICS_ROUTES]
              for method in sorted(route.methods - {"HEAD"})]
    requests = []
    for path, method in routes:
        params = re.findall(r"{(\w+)}", path)
        fillings = [real] + [dict.fromkeys(params, weird) for weird in HOSTILE_PATH_IDS]
        for filling in fillings:
            url = path
            for name in params:
                url = url.replace("{" + name + "}", str(filling.get(name, "nope")))
            if method in ("POST", "PUT", "PATCH"):
                chosen = [*bodies, *singles] if filling is real else rng.sample(bodies, 3)
                requests += [(method, url, body, ctype) for body, ctype in chosen]
            else:
                requests.append((method, url, b"", "application/json"))
                for query in (HOSTILE_QUERIES if filling is real else rng.sample(HOSTILE_QUERIES, 2)):
                    requests.append((method, f"{url}?{query}", b"", "application/json"))
    return requests


_HOSTILE_PARTS = 4  # the requests are dealt out to this many tests, which -n runs side by side


@pytest.mark.parametrize("part", range(_HOSTILE_PARTS))
def test_hostile_input_never_gets_a_500_or_a_traceback(cfg, client, caplog, part):
    requests = _hostile_requests(_real_ids(cfg, client))[part::_HOSTILE_PARTS]
    failures = []

    def send(method: str, url: str, body: bytes = b"", ctype: str = "application/json") -> None:
        headers = {"Content-Type": ctype} if ctype else {}
        try:
            response = client.request(method, url, content=body, headers=headers)
        except Exception as exc:  # a traceback raised through the app
            failures.append((method, url, body[:80], repr(exc)))
            return
        if response.status_code >= 500 and not url.endswith("/health"):
            failures.append((method, url, body[:80], response.text[:300]))
        elif response.headers.get("content-type", "").startswith("application/json"):
            payload = response.json()
            if response.status_code >= 400:
                assert set(payload) == {"error", "code", "details"}, (method, url, payload)
        elif url.startswith(statusapp.API_PREFIX) and response.status_code != 204 and "heartbeat" not in url:
            failures.append((method, url, body[:80], "not JSON: " + response.text[:100]))

    caplog.set_level(logging.ERROR, logger="statusapp")
    for method, url, body, ctype in requests:
        send(method, url, body, ctype)
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, "\n".join(map(str, failures[:40])) + f"\n({len(failures)} in all)"
    assert not logged, logged[:10]


def test_hostile_json_is_a_400_and_null_restores_a_default(client):
    for raw in (b'{"name": NaN}', b'{"interval": 1e999}', b'{"name": "\\ud800"}',
                b'[' * 5000 + b']' * 5000):
        response = client.post("/api/v1/monitors", content=raw,
                               headers={"Content-Type": "application/json"})
        assert (response.status_code, response.json()["error"]) == (400, "Malformed JSON body"), raw
    url = f"/api/v1/monitors/{create(client, interval=600, timeout=10)['id']}"
    monitor = client.put(url, json={"interval": None, "timeout": None})
    assert (monitor.json()["interval"], monitor.json()["timeout"]) == (300, 30), monitor.text


# One value of each JSON type; a field gets every one its kind does not accept.
JSON_TYPES = {"string": "x", "integer": 7, "number": 1.5, "boolean": True, "array": [], "object": {}}


def _field_tables() -> dict[int, tuple]:
    """Every Field table of the module (and of each channel type), by identity."""
    tables = [value for value in vars(statusapp).values() if isinstance(value, tuple)
              and value and all(isinstance(item, statusapp.Field) for item in value)]
    tables += [kind.fields for kind in statusapp.CHANNEL_TYPES.values()]
    return {id(table): table for table in tables}


def _wrong_values(field: statusapp.Field) -> list:
    """The JSON values a field refuses (Telegram's numeric chat ids are taken as strings)."""
    return [value for kind, value in JSON_TYPES.items()
            if kind != field.kind and not (field.kind == "number" and kind == "integer")
            and (field.name, kind) != ("chatId", "integer")]


def _typed_cases(real: dict) -> list[tuple[str, str, tuple, object]]:
    """(method, url, Field table, body maker) for every route body table and every nested table:
    a body maker puts one value into one field and says the issue path to expect."""
    cases = []
    for doc in statusapp.API_DOCS:
        url = statusapp.API_PREFIX + re.sub(r"{(\w+)}", lambda m: real[m.group(1)], doc.path)
        if doc.body:
            cases.append((doc.method, url, doc.body, lambda f, v: ({f.name: v}, [f.name])))
    monitors, pages = statusapp.API_PREFIX + "/monitors", statusapp.API_PREFIX + "/status-pages"
    cases += [
        ("POST", monitors, statusapp.AUTH_FIELDS, lambda f, v: (
            {"apiAuthConfig": {"type": "bearer", f.name: v}}, ["apiAuthConfig", f.name])),
        ("POST", monitors, statusapp.INLINE_NOTIFICATION_FIELDS, lambda f, v: (
            {"notifications": [{f.name: v}]}, ["notifications", 0, f.name])),
        ("POST", pages, statusapp.MONITOR_GROUP_FIELDS, lambda f, v: (
            {"monitorGroups": [{f.name: v}]}, ["monitorGroups", 0, f.name])),
        ("POST", monitors, statusapp.ASSERTION_FIELDS, lambda f, v: (
            {"assertions": [{f.name: v}]}, ["assertions", 0, f.name])),
        ("POST", monitors, statusapp.TAG_FIELDS, lambda f, v: (
            {"tags": [{f.name: v}]}, ["tags", 0, f.name])),
        *(("POST", statusapp.API_PREFIX + "/notifications", kind.fields,
           lambda f, v, kind=kind: ({"type": kind.name, "config": {f.name: v}}, ["config", f.name]))
          for kind in statusapp.CHANNEL_TYPES.values()),
        ("PUT", statusapp.API_PREFIX + "/account", statusapp._ACCOUNT_READ_ONLY,
         lambda f, v: ({f.name: v}, [f.name])),
        ("POST", statusapp.API_PREFIX + "/agent/results", statusapp.AGENT_RESULT_FIELDS,
         lambda f, v: ({"results": [{f.name: v}]}, ["results", 0, f.name]))]
    return cases


def _auth_for(url: str, real: dict) -> dict:
    """Agent routes take the agent token (and no API key); the rest the client's API key."""
    return ({"Authorization": f"Bearer {real['agentToken']}", "X-API-Key": ""}
            if "/agent/" in url else {})


def test_every_field_of_every_table_refuses_each_wrong_json_type_with_a_400(cfg, client):
    """Generated from the Field tables: each field, each JSON type it does not take, on every
    route (and nested object) it belongs to, is a 400 naming that field, never a 500."""
    real = _real_ids(cfg, client)
    cases = _typed_cases(real)
    covered = {id(table) for _, _, table, _ in cases} | {id(statusapp.BADGE_QUERY)} | {
        id(doc.query) for doc in statusapp.API_DOCS} | {  # query tables: the next tests
        id(t) for t in (statusapp.SIGNIN_FIELDS, statusapp.PASSWORD_FIELDS,  # dashboard forms:
                        statusapp.CHANGE_PASSWORD_FIELDS)}  # form text, see the dashboard tests
    covered_fields = {id(f) for _, _, table, _ in cases for f in table}
    for table in _field_tables().values():  # the rest are parts of covered tables
        assert id(table) in covered or all(id(f) in covered_fields for f in table), table
    failures = []
    for method, url, table, body_for in cases:
        for field in table:
            for value in _wrong_values(field):
                body, path = body_for(field, value)
                marker = {statusapp.APPLY_HEADER: "1"} if field.read_only else {}  # else ignored
                response = client.request(method, url, json=body,
                                          headers={**_auth_for(url, real), **marker})
                issues = response.json()["error"] if response.status_code == 400 else []
                typed = [i for i in issues if isinstance(issues, list) and i["path"] == path]
                expected = "integer" if value == 1.5 and field.kind == "integer" else (
                    "number" if field.kind == "integer" else field.kind)  # as zod names them
                if not typed or (typed[0]["code"], typed[0]["expected"]) != ("invalid_type", expected):
                    failures.append((method, url, body, response.status_code, response.text[:200]))
    assert not failures, "\n".join(map(str, failures[:20])) + f"\n({len(failures)} in all)"


def test_issues_name_types_as_zod_does(client):
    issues = client.post("/api/v1/monitors", json={"name": 5, "url": "http://127.0.0.1:9/",
                                                   "interval": "60", "timeout": 1.5}).json()["error"]
    by_path = {issue["path"][0]: issue for issue in issues}
    assert (by_path["name"]["expected"], by_path["name"]["received"]) == ("string", "number")
    assert (by_path["interval"]["expected"], by_path["interval"]["received"]) == ("number", "string")
    assert (by_path["timeout"]["expected"], by_path["timeout"]["received"]) == ("integer", "float")
    required = client.post("/api/v1/monitors", json={"url": "http://127.0.0.1:9/"}).json()["error"]
    assert required == [{"code": "invalid_type", "expected": "string", "received": "undefined",
                         "path": ["name"], "message": "Required"}]


def test_put_without_a_body_is_a_400(cfg, client):
    real = _real_ids(cfg, client)
    for doc in statusapp.API_DOCS:
        if doc.method == "PUT":
            url = statusapp.API_PREFIX + re.sub(r"{(\w+)}", lambda m: real[m.group(1)], doc.path)
            response = client.put(url)
            assert (response.status_code, response.json()["error"]) == (
                400, "Request body required"), url


def test_empty_or_unknown_query_values_are_400s_from_the_query_tables(cfg, client):
    real = _real_ids(cfg, client)
    checked = 0
    for doc in statusapp.API_DOCS:
        url = statusapp.API_PREFIX + re.sub(r"{(\w+)}", lambda m: real[m.group(1)], doc.path)
        for field in doc.query:
            bad = ["", "bogus"] if field.choices or field.kind == "integer" else []
            for value in bad:
                response = client.get(url, params={field.name: value},
                                      headers=_auth_for(url, real))
                assert response.status_code == 400, (url, field.name, value, response.text)
                assert response.json()["error"][0]["path"] == [field.name]
                checked += 1
    assert checked >= 20
    monitor = real["monitorId"]
    for value in ("", "bogus"):
        assert client.get(f"/badge/{monitor}/uptime.svg", params={"period": value}).status_code == 400
    assert client.get("/api/v1/monitors", params={"search": ""}).status_code == 200


# --- Dashboard tests ---


def test_password_kdf_is_salted_scrypt_and_verifies():
    first, second = statusapp.hash_password("a long password"), statusapp.hash_password(
        "a long password")
    assert first.startswith("scrypt$16384$8$1$") and first != second  # a fresh salt each time
    assert statusapp.verify_password("a long password", first)
    assert not statusapp.verify_password("a long passwore", first)
    assert not statusapp.verify_password("anything", None)
    _, n, r, p, salt, digest = first.split("$")
    assert hashlib.scrypt(b"a long password", salt=statusapp._unb64(salt), n=int(n), r=int(r),
                          p=int(p), dklen=32) == statusapp._unb64(digest)


def test_signed_values_refuse_tampering():
    value = statusapp.sign("secret", "token")
    assert statusapp.unsign("secret", value) == "token"
    assert statusapp.unsign("other", value) is None
    assert statusapp.unsign("secret", "tokem" + value[5:]) is None
    assert statusapp.unsign("secret", value[:-1] + ("0" if value[-1] != "0" else "1")) is None
    assert statusapp.unsign("secret", "") is None


def test_form_is_generated_from_the_field_table_and_parsed_back():
    fields = (*statusapp.WEBHOOK_FIELDS,
              statusapp.Field("retries", "integer", default=3, minimum=1, maximum=9,
                              doc="Retries <max>"),
              statusapp.Field("mode", "string", ("WEBSITE",), choices=("fast", "slow"),
                              kinds=("WEBSITE",)))
    cfg = statusapp.load_config(environ={})
    values = statusapp.form_values(fields, {}, {})
    html_text = statusapp.form_fields(fields, {}, values, {"retries": "Too <big>"}, cfg)
    assert re.search(r'<label for="f-retries">Retries &lt;max&gt;</label><input type="number" '
                     r'id="f-retries" name="retries"[^>]*aria-invalid="true"[^>]*value="3" '
                     r'min="1" max="9"', html_text)
    assert '<p class="err" id="f-retries-err">Too &lt;big&gt;</p>' in html_text
    assert re.search(r'<div data-kinds="WEBSITE"><label for="f-mode">Mode</label><select '
                     r'id="f-mode" name="mode"[^>]*><option value="">', html_text)
    assert '<p class="hint" id="f-mode-hint">required for WEBSITE (for WEBSITE)</p>' in html_text
    assert re.search(r'<label class="check"><input type="hidden" name="isActive" value="false">'
                     r'<input type="checkbox" id="f-isActive" [^>]*checked>'
                     r'Is active</label><p class="hint" id="f-isActive-hint">Inactive webhooks'
                     r' receive nothing</p>', html_text)
    assert 'name="isActive" value="false"><input type="checkbox"' in html_text
    form = {"name": "n", "url": "http://x.test", "events": "a", "secret": "", "isActive": "true",
            "retries": "x7", "mode": "fast"}
    assert statusapp.form_body(fields, {}, form, None) == {
        "name": "n", "url": "http://x.test", "events": "a", "secret": None, "isActive": True,
        "retries": "x7", "mode": "fast"}  # kept as typed, so validate names the field
    assert "secret" not in statusapp.form_body(fields, {}, form, {"name": "old"})


def test_monitor_form_covers_every_monitor_field_and_nested_auth():
    cfg = statusapp.load_config(environ={})
    res = statusapp.RESOURCES["monitors"]
    html_text = statusapp.form_fields(res.fields, res.nested, {}, {}, cfg)
    for field in statusapp.MONITOR_FIELDS:
        shown = (f'name="{field.name}"' in html_text or f'name="{field.name}.0.' in html_text
                 or field.name in res.nested)
        assert shown is not field.read_only, field.name
    for field in statusapp.AUTH_FIELDS:
        assert f'name="apiAuthConfig.{field.name}"' in html_text
    assert 'id="f-type" name="type" aria-describedby="f-type-hint" data-kind-select' in html_text
    channels = statusapp.RESOURCES["channels"]  # one form per type, its declaration's fields
    assert channels.by_type is not None and set(channels.by_type) == set(statusapp.CHANNEL_TYPES)
    for channel in statusapp.CHANNEL_TYPES.values():
        assert channels.by_type[channel.name]["config"] is channel.fields


class _Browser:
    """Signed-in HTTP as a browser would do it (cookies, CSRF tokens from pages)."""

    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, timeout=10, follow_redirects=False)

    def csrf(self, path: str) -> str:
        return re.search(r'name="csrf" value="([^"]+)"', self.http.get(path).text).group(1)

    def post(self, path: str, data: dict, page: str | None = None) -> httpx.Response:
        return self.http.post(path, data={"csrf": self.csrf(page or path), **data})

    def sign_in(self, email: str, password: str) -> httpx.Response:
        return self.post("/signin", {"email": email, "password": password}, "/signin")

    def use_cookie(self, value: str) -> None:
        self.http.cookies.clear()
        self.http.cookies.set("statusapp_session", value, domain="testserver.local")


@pytest.fixture
def dashboard(cfg, key):
    """StatusApp under uvicorn-free TestClient with a signed-in owner as a _Browser-like client."""
    cli_input = CliRunner().invoke(statusapp.cli, ["passwd", "--email", "owner@example.test",
                                                   "--db", cfg["server"]["database"]],
                                   input="correct horse battery\n")
    assert cli_input.exit_code == 0 and "password set" in cli_input.output
    with TestClient(statusapp.create_app(cfg), follow_redirects=False) as test_client:
        browser = _Browser.__new__(_Browser)
        browser.http = test_client
        assert browser.sign_in("owner@example.test", "correct horse battery").status_code == 303
        yield browser


def test_session_cookie_flags_expiry_revocation_and_tampering(cfg, dashboard):
    cookie = dashboard.http.cookies["statusapp_session"]
    assert dashboard.http.get("/").status_code == 200
    response = dashboard.post("/signout", {}, "/")
    assert "HttpOnly" in response.headers["set-cookie"]
    assert "SameSite=lax" in response.headers["set-cookie"]
    dashboard.use_cookie(cookie)
    assert dashboard.http.get("/").headers["location"] == "/signin?next=/"  # revoked
    dashboard.sign_in("owner@example.test", "correct horse battery")
    cookie = dashboard.http.cookies["statusapp_session"]
    dashboard.use_cookie(cookie[:-2] + ("00" if cookie[-2:] != "00" else "11"))
    assert dashboard.http.get("/").status_code == 303  # tampered signature
    dashboard.use_cookie(cookie)
    assert dashboard.http.get("/").status_code == 200
    sql(cfg, "UPDATE sessions SET expires_at = 0")
    assert dashboard.http.get("/").status_code == 303  # expired


def test_sign_out_everywhere_and_password_change_end_every_session(cfg, dashboard):
    other = _Browser.__new__(_Browser)
    other.http = TestClient(dashboard.http.app, follow_redirects=False)
    other.use_cookie(dashboard.http.cookies["statusapp_session"])
    dashboard.sign_in("owner@example.test", "correct horse battery")
    assert other.http.get("/").status_code == 200
    dashboard.post("/signout-everywhere", {}, "/account")
    assert other.http.get("/").status_code == 303 and dashboard.http.get("/").status_code == 303
    assert sql(cfg, "SELECT COUNT(*) FROM sessions") == [(0,)]


def test_sign_in_is_rate_limited_per_account_with_a_clear_message(cfg, dashboard):
    dashboard.post("/signout", {}, "/")
    for _ in range(5):
        wrong = dashboard.sign_in("owner@example.test", "wrong password")
        assert wrong.status_code == 401 and "Wrong email or password." in wrong.text
    blocked = dashboard.sign_in("owner@example.test", "correct horse battery")
    assert blocked.status_code == 429
    assert "Too many failed sign-ins for this account; try again in 15 minutes" in blocked.text
    assert dashboard.sign_in("nobody@example.test", "x").status_code == 401  # others still may


def test_sign_in_is_rate_limited_per_address(tmp_path):
    cfg = make_cfg(tmp_path, dashboard={"signin_failures_per_ip": 3})
    new_key(cfg)
    with TestClient(statusapp.create_app(cfg), follow_redirects=False) as test_client:
        browser = _Browser.__new__(_Browser)
        browser.http = test_client
        for n in range(3):
            assert browser.sign_in(f"p{n}@example.test", "x").status_code == 401
        blocked = browser.sign_in("p9@example.test", "x")
        assert blocked.status_code == 429 and "for your address" in blocked.text


def test_forms_refuse_a_missing_or_foreign_csrf_token(dashboard):
    forged = dashboard.http.post("/monitors/new", data={"name": "x", "url": "http://a.test"})
    assert forged.status_code == 403 and "CSRF" in forged.text
    foreign = dashboard.http.post("/monitors/new", headers={"Origin": "http://evil.test"},
                                  data={"csrf": dashboard.csrf("/"), "name": "x"})
    assert foreign.status_code == 403


def test_validation_errors_show_next_to_their_field_with_the_typed_values(dashboard):
    response = dashboard.post("/monitors/new", {"name": "", "type": "PORT", "url": "a b",
                                                "interval": "soon", "port": "70000"}, "/")
    assert response.status_code == 400
    text = response.text
    assert re.search(r'id="f-name-err">Required<', text)
    assert re.search(r'id="f-interval"[^>]*value="soon"', text)
    assert re.search(r'id="f-interval-err">Expected [a-z]+, received string<', text)
    assert re.search(r'id="f-port-err">Number must be less than or equal to 65535<', text)
    assert re.search(r'<option selected>PORT</option>', text)


def test_a_monitors_latest_checks_read_as_its_history_shows_them(cfg, client):
    """The monitor's latest checks are built by SQLite, the history by check_json: one table."""
    monitor = client.post("/api/v1/monitors", json={"name": "same", "isActive": False,
                                                    "url": "http://127.0.0.1:9/"}).json()
    with sqlite3.connect(cfg["server"]["database"]) as conn:
        conn.executemany(
            "INSERT INTO checks (monitor_id, region_id, status, response_time, status_code,"
            " error, category, timings, details, checked_at, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(monitor["id"], "local", "DOWN", 12, 503, "bad <gateway>", "SERVER_ERROR",
              '{"dns": 1, "total": 12}', '{"certDaysLeft": 9}', 1_700_000_000_123,
              1_700_000_000_999),
             (monitor["id"], "eu", "UP", None, None, None, None, None, None,
              1_700_000_060_000, None)])
    latest = client.get(f"/api/v1/monitors/{monitor['id']}").json()["checks"]
    history = client.get(f"/api/v1/monitors/{monitor['id']}/checks").json()["checks"]
    by_region = {c["workerRegion"]["id"]: c for c in latest}
    assert by_region["local"]["timings"] == {"dns": 1, "total": 12}
    assert "timings" not in by_region["eu"] and by_region["eu"]["statusCode"] is None
    assert sorted(latest, key=lambda c: c["id"]) == sorted(history, key=lambda c: c["id"])


def test_history_api_pages_and_filters_checks(cfg, client):
    monitor = client.post("/api/v1/monitors", json={"name": "h", "url": "http://127.0.0.1:9/",
                                                    "isActive": False}
                          ).json()
    rows = [(monitor["id"], "local" if i % 2 else "eu", "UP" if i % 3 else "DOWN",
             10 + i, 1_700_000_000_000 + i * 60_000) for i in range(7)]
    with sqlite3.connect(cfg["server"]["database"]) as conn:
        conn.executemany("INSERT INTO checks (monitor_id, region_id, status, response_time,"
                         " checked_at) VALUES (?, ?, ?, ?, ?)", rows)
    url = f"/api/v1/monitors/{monitor['id']}/checks"
    page = client.get(url, params={"limit": 3, "page": 2}).json()
    assert page["pagination"] == {"total": 7, "page": 2, "limit": 3, "totalPages": 3}
    assert [c["responseTime"] for c in page["checks"]] == [13, 12, 11]
    down = client.get(url, params={"status": "DOWN"}).json()["checks"]
    assert [c["responseTime"] for c in down] == [16, 13, 10]
    window = client.get(url, params={"from": "2023-11-14T22:15:00Z", "to": "2023-11-14T22:17:00Z",
                                     "region": "local", "order": "asc"}).json()["checks"]
    assert [(c["responseTime"], c["workerRegion"]["id"]) for c in window] == [(13, "local")]
    assert client.get(url, params={"from": "yesterday"}).status_code == 400
    spec = client.get("/api/v1/openapi.json").json()
    assert {p["name"] for p in spec["paths"]["/monitors/{monitorId}/checks"]["get"]["parameters"]
            } >= {"from", "to", "region", "status", "page", "limit"}


def test_channel_test_endpoint_reports_the_receivers_answer(client):
    receiver = _NotifyReceiver()
    try:
        receiver.script = [(503, b"busy", 0)]
        channel = client.post("/api/v1/notifications", json={
            "name": "hook", "type": "WEBHOOK", "config": {"url": receiver.url + "/in"}}).json()
        answer = client.post(f"/api/v1/notifications/{channel['id']}/test").json()
        assert answer["success"] is False and answer["statusCode"] == 503
        answer = client.post(f"/api/v1/notifications/{channel['id']}/test").json()
        assert answer["success"] is True and answer["statusCode"] == 200
        assert receiver.json()["event"] == "test" and len(receiver.requests) == 2
    finally:
        receiver.close()


def test_passwd_refuses_short_passwords_and_unknown_accounts(cfg, key):
    short = CliRunner().invoke(statusapp.cli, ["passwd", "--email", "owner@example.test", "--db",
                                               cfg["server"]["database"]], input="short\n")
    assert short.exit_code != 0 and "at least 10" in short.output
    unknown = CliRunner().invoke(statusapp.cli, ["passwd", "--email", "x@example.test", "--db",
                                                 cfg["server"]["database"]], input="long enough pw\n")
    assert unknown.exit_code != 0 and "no account with email x@example.test" in unknown.output


def test_cron_monitor_page_shows_ping_url_cron_line_and_ping_log(cfg, key, dashboard):
    api = {"X-API-Key": key}
    monitor = dashboard.http.post("/api/v1/monitors", headers=api, json={
        "name": "backup", "type": "CRON", "interval": 3600}).json()
    ping = dashboard.http.post(urllib.parse.urlsplit(monitor["heartbeatUrl"]).path + "/log",
                               content=b"42 files <copied>")
    assert ping.status_code == 200
    page = dashboard.http.get(f"/monitors/{monitor['id']}").text
    assert f'<pre id="ping-url">{monitor["heartbeatUrl"]}</pre>' in page
    assert re.search(r'<pre id="cron-line">\*/5 \* \* \* \* /path/to/job.sh &amp;&amp; curl -fsS'
                     r' -m 10 --retry 3 ' + re.escape(monitor["heartbeatUrl"]), page)
    assert "<td>log</td>" in page and "42 files &lt;copied&gt;" in page
    assert "Regression detection is off." in page
    for period in ("7d", "30d"):
        page = dashboard.http.get(f"/monitors/{monitor['id']}", params={"period": period}).text
        assert f'<a href="?period={period}" aria-current=true>{period}</a>' in page


def test_incident_update_and_resolve_from_the_dashboard(cfg, key, dashboard):
    monitor = dashboard.http.post("/api/v1/monitors", headers={"X-API-Key": key}, json={
        "name": "db", "url": "http://127.0.0.1:9/", "isActive": False}).json()
    sql(cfg, "INSERT INTO incidents (id, account_id, monitor_id, year, number, started_at,"
             " severity, status, affected_regions) VALUES ('inc_1', (SELECT account_id FROM"
             " monitors), ?, 2026, 1, 1764547200000, 'high', 'open', '[]')",
        (monitor["id"],))
    assert "INC-2026-0001" in dashboard.http.get("/").text  # open incidents on top
    bad = dashboard.post("/incidents/inc_1", {"status": "sleeping", "message": "x"})
    assert bad.status_code == 400 and re.search(r'id="f-status-err">Invalid enum value', bad.text)
    dashboard.post("/incidents/inc_1", {"status": "identified", "message": "Disk <full>"})
    page = dashboard.http.get("/incidents/inc_1").text
    assert "<strong>identified</strong> &ndash; Disk &lt;full&gt;" in page
    dashboard.post("/incidents/inc_1", {"status": "resolved", "message": "Resolved from the"
                                        " dashboard."})
    assert sql(cfg, "SELECT resolved_at IS NOT NULL FROM incidents") == [(1,)]
    assert "Resolve now" not in dashboard.http.get("/incidents/inc_1").text
    assert "INC-2026-0001" not in dashboard.http.get("/").text


def test_team_keys_and_account_pages_act_through_the_api(cfg, dashboard):
    invited = dashboard.post("/team", {"email": "ann@example.test", "role": "MEMBER"})
    link = re.search(r'<pre id="invite-link">([^<]+)</pre>', invited.text).group(1)
    assert "/invite?token=inv_" in link
    member = sql(cfg, "SELECT id FROM team_members WHERE email = 'ann@example.test'")[0][0]
    dashboard.post(f"/team/{member}/role", {"role": "VIEWER"}, "/team")
    assert sql(cfg, "SELECT role FROM team_members WHERE id = ?", (member,)) == [("VIEWER",)]
    dashboard.post(f"/team/{member}/remove", {}, "/team")
    assert sql(cfg, "SELECT COUNT(*) FROM team_members WHERE id = ?", (member,)) == [(0,)]
    created = dashboard.post("/keys", {"name": "laptop", "permissions": "read"})
    new_key_text = re.search(r'<pre id="new-key">(sk_live_[^<]+)</pre>', created.text).group(1)
    assert dashboard.http.get("/api/v1/monitors", headers={"X-API-Key": new_key_text}
                              ).status_code == 200
    key_id = sql(cfg, "SELECT id FROM api_keys WHERE name = 'laptop'")[0][0]
    dashboard.post(f"/keys/{key_id}/revoke", {}, "/keys")
    assert dashboard.http.get("/api/v1/monitors", headers={"X-API-Key": new_key_text}
                              ).status_code == 401
    saved = dashboard.post("/account", {"name": "Olive", "language": "xx", "timezone": "UTC",
                                        "smsNotificationsEnabled": "false"})
    assert saved.status_code == 400 and 'id="f-language-err"' in saved.text
    dashboard.post("/account", {"name": "Olive", "language": "de", "timezone": "Europe/Berlin",
                                "smsNotificationsEnabled": "false"})
    assert sql(cfg, "SELECT name, language FROM accounts WHERE email = 'owner@example.test'"
               ) == [("Olive", "de")]
    usage = dashboard.http.get("/account").text
    assert "<code>/api/v1/monitors</code>" in usage
    changed = dashboard.post("/account", {"form": "password", "current": "correct horse battery",
                                          "password": "another long one",
                                          "confirm": "another long one"})
    assert changed.headers["location"] == "/signin"
    assert dashboard.http.get("/").status_code == 303  # a new password ends every session
    assert dashboard.sign_in("owner@example.test", "another long one").status_code == 303


def test_first_start_prints_a_one_time_setup_link_valid_for_an_hour(tmp_path, capsys):
    cfg = make_cfg(tmp_path)
    with TestClient(statusapp.create_app(cfg), follow_redirects=False) as test_client:
        printed = capsys.readouterr().err
        key = re.search(r"^(sk_live_\S+)$", printed, re.M).group(1)
        token = re.search(r"http://127\.0\.0\.1:8080/setup\?token=(setup_\S+)", printed).group(1)
        browser = _Browser.__new__(_Browser)
        browser.http = test_client
        assert browser.http.get("/setup?token=setup_wrong").status_code == 404
        short = browser.post("/setup", {"token": token, "password": "short", "confirm": "short"},
                             f"/setup?token={token}")
        assert short.status_code == 400 and re.search(r'id="f-password-err">String must contain'
                                                      r' at least 10', short.text)
        differ = browser.post("/setup", {"token": token, "password": "long enough 1",
                                         "confirm": "long enough 2"}, f"/setup?token={token}")
        assert re.search(r'id="f-confirm-err">The two passwords differ', differ.text)
        done = browser.post("/setup", {"token": token, "password": "long enough 1",
                                       "confirm": "long enough 1"}, f"/setup?token={token}")
        assert done.status_code == 303 and browser.http.get("/").status_code == 200
        assert browser.http.get(f"/setup?token={token}").status_code == 404  # used once
        assert browser.http.get("/api/v1/monitors", headers={"X-API-Key": key}).status_code == 200
    expiry = sql(cfg, "SELECT COUNT(*) FROM setup_tokens")
    assert expiry == [(0,)]


def test_setup_links_expire(cfg, key, dashboard):
    token = "setup_" + "x" * 32
    sql(cfg, "INSERT INTO setup_tokens VALUES (?, (SELECT id FROM accounts), ?)",
        (statusapp.hash_key(token), int(time.time() * 1000) - 1))
    assert dashboard.http.get(f"/setup?token={token}").status_code == 404


def test_sign_in_returns_only_to_a_page_of_this_site(dashboard):
    dashboard.post("/signout", {}, "/")
    for target, expected in (("/incidents?status=open", "/incidents?status=open"),
                             ("//evil.test/", "/"), ("/\\\\evil.test/", "/"),
                             ("https://evil.test/", "/")):
        response = dashboard.post("/signin", {"email": "owner@example.test", "next": target,
                                              "password": "correct horse battery"})
        assert response.headers["location"] == expected


def test_session_cookie_is_secure_behind_https(dashboard):
    form = {"email": "owner@example.test", "password": "correct horse battery"}
    cookie = dashboard.post("https://testserver/signin", form, "https://testserver/signin"
                            ).headers["set-cookie"]
    assert "; Secure" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Secure" not in dashboard.sign_in(**form).headers["set-cookie"]


def test_a_viewer_gets_no_write_controls_on_any_page(cfg, key, dashboard):
    api = {"X-API-Key": key}
    monitor = dashboard.http.post("/api/v1/monitors", headers=api, json={
        "name": "db", "url": "http://127.0.0.1:9/", "isActive": False}).json()
    dashboard.http.post("/api/v1/notifications", headers=api, json={
        "name": "hook", "type": "WEBHOOK", "config": {"url": "http://127.0.0.1:9/"}})
    invited = dashboard.post("/team", {"email": "vic@example.test", "role": "VIEWER"})
    token = re.search(r"/invite\?token=(inv_[^<]+)</pre>", invited.text).group(1)
    dashboard.post("/signout", {}, "/")
    joined = dashboard.post("/invite", {"token": token, "password": "viewer password",
                                        "confirm": "viewer password"}, f"/invite?token={token}")
    assert joined.status_code == 303
    for path in ("/", f"/monitors/{monitor['id']}", "/channels", "/webhooks", "/pages", "/team",
                 "/keys", "/incidents"):
        page = dashboard.http.get(path).text
        actions = set(re.findall(r'<form[^>]*method="post" action="([^"]+)"', page))
        assert actions <= {"/signout"}, (path, actions)
        assert not re.search(r'href="/[a-z]+/(new|[^"]+/edit)"', page), path
    account = dashboard.http.get("/account").text
    assert set(re.findall(r'<form[^>]*method="post" action="([^"]+)"', account)) == {
        "/signout", "/account", "/signout-everywhere"}  # the password form and signing out
    assert 'name="language"' not in account  # PUT /account needs MEMBER, as on the API


def test_dashboard_changes_show_on_public_pages_at_once(key, dashboard):
    api = {"X-API-Key": key}
    monitor = dashboard.http.post("/api/v1/monitors", headers=api, json={
        "name": "old name", "url": "http://127.0.0.1:9/", "isActive": False}).json()
    dashboard.http.post("/api/v1/status-pages", headers=api, json={
        "name": "Home", "slug": "home", "monitorGroups": [
            {"name": "All", "monitorIds": [monitor["id"]]}]})
    assert "old name" in dashboard.http.get("/status/home").text  # now in the public cache
    edit = f"/monitors/{monitor['id']}/edit"
    assert dashboard.post(edit, {"name": "new name"}).status_code == 303
    assert "new name" in dashboard.http.get("/status/home").text
    form = dashboard.http.get("/pages/new").text
    assert re.search(r'id="f-monitorGroups-hint">[^<]*a JSON array', form)


def test_monitor_chart_and_overview_sparkline_are_drawn_from_the_checks(cfg, key, dashboard):
    monitor = dashboard.http.post("/api/v1/monitors", headers={"X-API-Key": key}, json={
        "name": "drawn", "url": "http://127.0.0.1:9/", "isActive": False}).json()
    now = int(time.time() * 1000)
    with sqlite3.connect(cfg["server"]["database"]) as conn:
        conn.executemany("INSERT INTO checks (monitor_id, region_id, status, response_time,"
                         " checked_at) VALUES (?, 'local', 'UP', ?, ?)",
                         [(monitor["id"], ms, now - i) for i, ms in enumerate((100, 200, 900))])
    page = dashboard.http.get(f"/monitors/{monitor['id']}").text
    chart = re.search(r'<svg class="chart"[^>]*aria-label="p50 and p95 response time, 24h">'
                      r'(.*?)</svg>', page).group(1)
    assert '<polyline class="p50"' in chart and '<polyline class="p95"' in chart
    assert re.search(r"<text [^>]*>\d+ ms</text>", chart)
    overview = dashboard.http.get("/").text
    assert 'aria-label="drawn: hourly average response time, 400 to 400 ms"' in overview
    assert "100.00%" in overview


@pytest.fixture
def live(tmp_path):
    """A real `statusapp serve` with its owner signed in as a _Browser, and the owner's key."""
    srv = Server(tmp_path).start()
    result = CliRunner().invoke(statusapp.cli, ["passwd", "--email", "admin@localhost", "--db",
                                                srv.db], input="correct horse battery\n")
    assert result.exit_code == 0, result.output
    browser = _Browser(srv.url)
    try:
        assert browser.sign_in("admin@localhost", "correct horse battery").status_code == 303
        yield browser, _owner_key(srv)
    finally:
        browser.http.close()
        srv.stop()


def _form_inputs(page: str) -> set[str]:
    """The names of the inputs, selects and text areas of a page's POST forms."""
    forms = re.findall(r'<form[^>]*method="post".*?</form>', page, re.S)
    return {name for form in forms
            for name in re.findall(r'<(?:input|select|textarea)[^>]*name="([^"]+)"', form)}


def test_channel_forms_are_one_per_type_from_its_declaration(live):
    browser, key = live
    chooser = browser.http.get("/channels/new").text
    assert re.search(r'<form method="get" action="/channels/new"[^>]*data-autosubmit>', chooser)
    assert not any(n.startswith("config.") for n in _form_inputs(chooser))  # a type first
    for kind, channel in statusapp.CHANNEL_TYPES.items():
        page = browser.http.get("/channels/new", params={"type": kind}).text
        assert {n for n in _form_inputs(page) if n.startswith("config.")} == {
            f"config.{f.name}" for f in channel.fields}, kind
        assert '<input type="hidden" name="type" value="%s">' % kind in page
    ntfy = browser.http.get("/channels/new?type=NTFY").text
    assert re.search(r'<input type="number" id="f-config-priority" name="config.priority"'
                     r'[^>]*min="1" max="5"', ntfy)
    opsgenie = browser.http.get("/channels/new?type=OPSGENIE").text
    assert re.search(r'<select id="f-config-priority" name="config.priority"[^>]*>'
                     r'<option value="">&ndash;</option><option>P1</option>', opsgenie)
    gotify = browser.http.get("/channels/new?type=GOTIFY").text
    assert re.search(r'name="config.priority"[^>]*min="0" max="10"', gotify)
    saved = browser.post("/channels/new", {"type": "NTFY", "name": "phone", "isActive": "true",
                                           "config.serverUrl": "http://127.0.0.1:9",
                                           "config.topic": "alerts", "config.priority": "4"},
                         "/channels/new?type=NTFY")
    assert saved.status_code == 303
    api = {"X-API-Key": key}
    channel = browser.http.get("/api/v1/notifications", headers=api).json()["channels"][0]
    assert (channel["type"], channel["config"]["priority"]) == ("NTFY", 4)
    bad = browser.post("/channels/new", {"type": "NTFY", "name": "x", "config.serverUrl": "",
                                         "config.topic": "t", "config.priority": "9"},
                       "/channels/new?type=NTFY")
    assert bad.status_code == 400 and 'id="f-config-priority-err"' in bad.text
    assert re.search(r'name="config.priority"[^>]*value="9"', bad.text)  # typed value kept
    retyped = browser.http.get(f"/channels/{channel['id']}/edit?type=GOTIFY").text
    assert "config.appToken" in _form_inputs(retyped) and "config.topic" not in _form_inputs(
        retyped)


def test_apply_markers_are_a_note_not_form_fields(live):
    browser, key = live
    api = {"X-API-Key": key}
    channel = browser.http.post("/api/v1/notifications", headers={
        **api, statusapp.APPLY_HEADER: "1"}, json={  # as `statusapp apply` makes it
        "name": "hook", "type": "WEBHOOK", "config": {"url": "http://127.0.0.1:9/"},
        "managed": True, "secretsDigest": "abc"}).json()
    monitor = browser.http.post("/api/v1/monitors", headers=api, json={
        "name": "m", "url": "http://127.0.0.1:9/", "isActive": False}).json()
    for path in ("/monitors/new", "/channels/new?type=WEBHOOK", "/webhooks/new", "/pages/new",
                 "/maintenance/new", f"/monitors/{monitor['id']}/edit",
                 f"/channels/{channel['id']}/edit"):
        names = _form_inputs(browser.http.get(path).text)
        assert names & {"name", "title"} and not names & {"managed", "secretsDigest"}, path
    edit = browser.http.get(f"/channels/{channel['id']}/edit").text
    assert "managed by <code>statusapp apply</code>" in edit
    assert "managed by" not in browser.http.get(f"/monitors/{monitor['id']}/edit").text
    assert "(managed by statusapp apply)" in browser.http.get("/channels").text
    saved = browser.post(f"/channels/{channel['id']}/edit", {
        "type": "WEBHOOK", "name": "hook 2", "config.url": "http://127.0.0.1:9/x"})
    assert saved.status_code == 303
    after = browser.http.get(f"/api/v1/notifications/{channel['id']}", headers=api).json()
    assert (after["name"], after["managed"], after["secretsDigest"]) == ("hook 2", True, "abc")


def _window_form(**fields: str) -> dict:
    return {"title": "Reboot", "description": "", "startsAt": "2020-01-01T00:00:00Z",
            "endsAt": "2099-01-01T00:00:00Z", "recurrence": "", "timezone": "UTC",
            "durationMinutes": "", "monitorIds": "", "suppressAlerts": "true", **fields}


def test_maintenance_windows_are_listed_created_edited_and_deleted(live):
    browser, key = live
    api = {"X-API-Key": key}
    monitor = browser.http.post("/api/v1/monitors", headers=api, json={
        "name": "db", "url": "http://127.0.0.1:9/", "interval": 3600}).json()
    assert "No maintenance windows yet." in browser.http.get("/maintenance").text
    form = browser.http.get("/maintenance/new").text
    fields = [f for f in statusapp.MAINTENANCE_FIELDS if not f.read_only]
    assert {f.name for f in fields} | {f.name + statusapp.SCOPE for f in fields if f.unset} == (
        _form_inputs(form) - {"csrf"})  # and the "all" / "only" choice of monitorIds
    bad = browser.post("/maintenance/new", _window_form(endsAt="2019-01-01T00:00:00Z"))
    assert bad.status_code == 400 and re.search(r'id="f-endsAt-err">endsAt must be after', bad.text)
    assert browser.post("/maintenance/new", _window_form(monitorIds=monitor["id"])
                        ).status_code == 303
    window = browser.http.get("/api/v1/maintenance-windows", headers=api).json()[
        "maintenanceWindows"][0]
    assert window["monitorIds"] == [monitor["id"]] and window["active"] is True
    listing = browser.http.get("/maintenance").text
    assert "Reboot" in listing and "Running" in listing
    overview = browser.http.get("/").text  # the overview shows the window's status
    assert re.search(r'<span class="st st-none"><span aria-hidden="true">[^<]+</span> '
                     r'Maintenance</span>', overview)
    edit = f"/maintenance/{window['id']}/edit"
    assert re.search(r'<input type="checkbox" id="f-monitorIds-0" name="monitorIds" value="%s" '
                     r'checked>db \(WEBSITE\)</label>' % monitor["id"], browser.http.get(edit).text)
    assert browser.post(edit, _window_form(title="Recurring", startsAt="2026-01-04T03:00:00",
                                           endsAt="", recurrence="FREQ=WEEKLY;BYDAY=SU",
                                           durationMinutes="30", timezone="Europe/Berlin")
                        ).status_code == 303
    listing = browser.http.get("/maintenance").text
    window = browser.http.get(f"/api/v1/maintenance-windows/{window['id']}", headers=api).json()
    span = window["nextOccurrence"]
    assert f"{span['startsAt']} to {span['endsAt']} (FREQ=WEEKLY;BYDAY=SU, Europe/Berlin)" in listing
    assert ("Running" if window["active"] else "Scheduled") in listing and "Recurring" in listing
    assert browser.post(f"/maintenance/{window['id']}/delete", {}, "/maintenance"
                        ).status_code == 303
    assert browser.http.get(f"/api/v1/maintenance-windows/{window['id']}", headers=api
                            ).status_code == 404


def test_a_window_covers_the_monitors_checked_by_name(live):
    """A list of monitor ids is a checkbox per monitor, by name; the checked ones come back as
    the list, stay checked when the form is redrawn with an error, and none checked is all."""
    browser, key = live
    api = {"X-API-Key": key}
    made = {name: browser.http.post("/api/v1/monitors", headers=api, json={
        "name": name, "url": "http://127.0.0.1:9/", "isActive": False, **extra}).json()["id"]
        for name, extra in (("router", {}), ("NAS", {"type": "PING", "url": "127.0.0.1"}),
                            ("backup <job>", {}))}
    form = browser.http.get("/maintenance/new").text
    picks = re.search(r'<fieldset id="f-monitorIds" [^>]*><legend>Monitors it covers[^<]*'
                      r'</legend>(.*?)</fieldset>', form, re.S).group(1)
    assert re.findall(r'<input type="radio" [^>]*name="monitorIds.scope" value="(\w+)"( checked)?'
                      r'[^>]*>([^<]+)</label>', picks) == [
        ("all", " checked", "All the team&#x27;s monitors"),
        ("only", "", "Only the monitors checked below")]  # a new window covers all
    assert re.findall(r'value="(mon_[^"]+)">([^<]+)</label>', picks) == [
        (made["backup <job>"], "backup &lt;job&gt; (WEBSITE)"), (made["NAS"], "NAS (PING)"),
        (made["router"], "router (WEBSITE)")]  # by name, labelled with name and type
    chosen = [made["NAS"], made["router"]]
    assert browser.post("/maintenance/new", {**_window_form(), "monitorIds": ["", *chosen],
                                             "monitorIds.scope": "only"}).status_code == 303
    window = browser.http.get("/api/v1/maintenance-windows", headers=api).json()[
        "maintenanceWindows"][0]
    assert sorted(window["monitorIds"]) == sorted(chosen)
    edit = f"/maintenance/{window['id']}/edit"
    checked = re.findall(r'value="(mon_[^"]+)" checked>', browser.http.get(edit).text)
    assert sorted(checked) == sorted(chosen)
    bad = browser.post(edit, {**_window_form(endsAt="2019-01-01T00:00:00Z"),
                              "monitorIds": ["", made["router"], made["backup <job>"]]})
    assert bad.status_code == 400 and 'id="f-endsAt-err"' in bad.text
    assert sorted(re.findall(r'value="(mon_[^"]+)" checked>', bad.text)) == sorted(
        [made["router"], made["backup <job>"]])  # what was checked stays checked
    assert browser.post(edit, {**_window_form(), "monitorIds": ["", made["router"]]}
                        ).status_code == 303  # NAS unchecked
    url = f"/api/v1/maintenance-windows/{window['id']}"
    assert browser.http.get(url, headers=api).json()["monitorIds"] == [made["router"]]
    assert browser.post(edit, _window_form()).status_code == 303  # none checked
    assert browser.http.get(url, headers=api).json()["monitorIds"] is None  # all monitors
    browser.http.put(url, headers=api, json={"monitorIds": [made["router"]]})
    browser.http.delete(f"/api/v1/monitors/{made['router']}", headers=api)
    gone = browser.http.get(edit).text  # a deleted monitor's id is shown, not dropped unseen
    assert re.search(r'value="%s" checked>%s \(unknown id\)</label>' % ((made["router"],) * 2),
                     gone)


class _Submitted(html.parser.HTMLParser):
    """What a browser sends for a page's POST form left as drawn: each input's value (a
    checkbox's or radio button's when checked), each select's chosen option (else its first),
    each text area's text."""

    def __init__(self) -> None:
        super().__init__()
        self.form: dict[str, list[str]] = {}
        self.into: str | None = None  # the select or text area being read
        self.option: tuple[str | None, bool] | None = None  # value attribute, selected
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        at = dict(attrs)
        if tag == "input" and (at.get("type") not in ("checkbox", "radio") or "checked" in at):
            self.form.setdefault(at["name"], []).append(at.get("value") or "")
        elif tag in ("select", "textarea"):
            self.into, self.text = at["name"], ""
        elif tag == "option":
            self.option, self.text = (at.get("value"), "selected" in at), ""

    def handle_data(self, data: str) -> None:
        self.text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "option" and self.option and self.into:
            value = self.text if self.option[0] is None else self.option[0]
            if self.option[1] or self.into not in self.form:
                self.form[self.into] = [value]
        elif tag == "textarea" and self.into:
            self.form[self.into] = [self.text]
        if tag in ("select", "textarea"):
            self.into = None


def _as_submitted(page: str, action: str) -> dict[str, list[str]]:
    parser = _Submitted()
    parser.feed(re.search(r'<form method="post" action="%s".*?</form>' % re.escape(action),
                          page, re.S).group(0))
    return parser.form


def _scope_of(page: str) -> tuple[str, list[str]]:
    """The scope chosen in a window form, and the monitors checked."""
    return (re.search(r'name="monitorIds.scope" value="(\w+)" checked', page).group(1),
            sorted(re.findall(r'value="(mon_[^"]+)" checked>', page)))


def test_a_window_of_no_monitors_stays_one_when_saved_from_the_dashboard(live):
    """null (all the team's monitors) and [] (none) are told apart by an explicit choice drawn
    before the checkboxes: a window of no monitors saved unchanged keeps [], "all" saves null,
    "only" the checked ones, and "all" with boxes checked is refused rather than guessed."""
    browser, key = live
    api = {"X-API-Key": key}
    ids = sorted(browser.http.post("/api/v1/monitors", headers=api, json={
        "name": name, "url": "http://127.0.0.1:9/", "isActive": False}).json()["id"]
        for name in ("router", "NAS", "mail"))
    window = browser.http.post("/api/v1/maintenance-windows", headers=api, json={
        "title": "Reboot", "startsAt": "2020-01-01T00:00:00Z", "endsAt": "2099-01-01T00:00:00Z",
        "monitorIds": []}).json()
    url, edit = f"/api/v1/maintenance-windows/{window['id']}", f"/maintenance/{window['id']}/edit"
    assert window["monitorIds"] == [] and _scope_of(browser.http.get(edit).text) == ("only", [])
    unchanged = _as_submitted(browser.http.get(edit).text, edit)
    assert unchanged["monitorIds.scope"] == ["only"] and unchanged["monitorIds"] == [""]
    assert unchanged["title"] == ["Reboot"] and unchanged["timezone"] == ["UTC"]
    assert browser.post(edit, unchanged).status_code == 303
    assert browser.http.get(url, headers=api).json()["monitorIds"] == []  # still none
    bad = browser.post(edit, {**unchanged, "monitorIds.scope": "all",
                              "monitorIds": ["", ids[0]]})
    assert bad.status_code == 400 and 'id="f-monitorIds-err"' in bad.text
    assert _scope_of(bad.text) == ("all", [ids[0]])  # kept as posted, to be corrected
    assert browser.http.get(url, headers=api).json()["monitorIds"] == []
    assert browser.post(edit, {**unchanged, "monitorIds.scope": "all"}).status_code == 303
    assert browser.http.get(url, headers=api).json()["monitorIds"] is None  # all monitors
    assert _scope_of(browser.http.get(edit).text) == ("all", [])
    wrong = browser.post(edit, {**unchanged, "endsAt": "2019-01-01T00:00:00Z",
                                "monitorIds.scope": "only", "monitorIds": ["", *ids[:2]]})
    assert wrong.status_code == 400 and _scope_of(wrong.text) == ("only", ids[:2])
    assert browser.post(edit, {**unchanged, "monitorIds.scope": "only",
                               "monitorIds": ["", *ids[:2]]}).status_code == 303
    assert sorted(browser.http.get(url, headers=api).json()["monitorIds"]) == ids[:2]
    assert _scope_of(browser.http.get(edit).text) == ("only", ids[:2])


def test_a_viewer_cannot_see_or_post_maintenance_and_channel_forms(live):
    browser, key = live
    api = {"X-API-Key": key}
    window = browser.http.post("/api/v1/maintenance-windows", headers=api, json={
        "title": "Reboot", "startsAt": "2099-01-01T00:00:00Z",
        "endsAt": "2099-01-02T00:00:00Z"}).json()
    invited = browser.post("/team", {"email": "vic@example.test", "role": "VIEWER"})
    token = re.search(r"/invite\?token=(inv_[^<]+)</pre>", invited.text).group(1)
    browser.post("/signout", {}, "/")
    assert browser.post("/invite", {"token": token, "password": "viewer password",
                                    "confirm": "viewer password"}, f"/invite?token={token}"
                        ).status_code == 303
    page = browser.http.get("/maintenance").text
    assert "Reboot" in page and _form_inputs(page) <= {"csrf"}  # only signing out
    assert "/maintenance/new" not in page and "/edit" not in page
    for path, form in (("/maintenance/new", _window_form()),
                       (f"/maintenance/{window['id']}/edit", _window_form(title="Hacked")),
                       (f"/maintenance/{window['id']}/delete", {}),
                       ("/channels/new", {"type": "WEBHOOK", "name": "x",
                                          "config.url": "http://127.0.0.1:9/"})):
        refused = browser.post(path, form, "/maintenance")
        assert refused.status_code == 403 and "needs the MEMBER role" in refused.text, path
    for path in ("/maintenance/new", f"/maintenance/{window['id']}/edit", "/channels/new"):
        refused = browser.http.get(path)  # no form to fill for nothing
        assert refused.status_code == 403 and "needs the MEMBER role" in refused.text, path
    assert browser.http.post("/maintenance/new", data=_window_form()).status_code == 403  # CSRF
    assert browser.http.get(f"/api/v1/maintenance-windows/{window['id']}", headers=api
                            ).json()["title"] == "Reboot"


def test_assertions_are_edited_as_rows_of_inputs_from_their_field_table(live):
    browser, key = live
    form = browser.http.get("/monitors/new").text
    rows = re.search(r'<fieldset class="rows" data-kinds="WEBSITE API">(.*?)</fieldset>', form,
                     re.S).group(1)
    assert len(re.findall(r"<tr><td>", rows)) == statusapp.ROW_SPARE  # empty rows to fill
    sources = re.search(r'<select id="f-assertions-0-source" name="assertions.0.source">(.*?)'
                        r'</select>', rows).group(1)
    assert re.findall(r"<option>([A-Z_]+)</option>", sources) == list(
        statusapp.ASSERTION_SOURCES) and '<option value="">' in sources  # a row may stay blank
    assert re.search(r'<select id="f-assertions-2-comparison" name="assertions.2.comparison">'
                     r'<option value="">&ndash;</option><option>EQUALS</option>', rows)
    assert '<label class="sr" for="f-assertions-1-target">Target of row 2</label>' in rows
    typed = {"name": "api", "url": "http://127.0.0.1:9/", "type": "API", "isActive": "false",
             "assertions.0.source": "JSON_BODY", "assertions.0.property": "$.ok",
             "assertions.0.comparison": "EQUALS", "assertions.0.target": "true",
             "assertions.1.source": "", "assertions.1.comparison": "",
             "assertions.2.source": "STATUS_CODE", "assertions.2.comparison": "LESS_THAN",
             "assertions.2.target": "400"}
    bad = browser.post("/monitors/new", {**typed, "assertions.0.property": "$[?"}, "/")
    assert bad.status_code == 400 and re.search(
        r'id="f-assertions-0-property" name="assertions.0.property" aria-invalid="true"[^>]*>'
        r'<p class="err" id="f-assertions-0-property-err">Invalid JSONPath', bad.text)
    assert "(at 0.property)" not in bad.text  # said once, in its row
    assert re.search(r'name="assertions.0.property"[^>]*value="\$\[\?"', bad.text)  # kept
    sources = re.findall(r'name="assertions\.\d+\.source"', bad.text)
    assert len(sources) == 3 + statusapp.ROW_SPARE
    saved = browser.post("/monitors/new", typed, "/")
    assert saved.status_code == 303
    monitor_id = saved.headers["location"].rsplit("/", 1)[1]
    api = {"X-API-Key": key}
    monitor = browser.http.get(f"/api/v1/monitors/{monitor_id}", headers=api).json()
    assert monitor["assertions"] == [
        {"source": "JSON_BODY", "property": "$.ok", "comparison": "EQUALS", "target": "true"},
        {"source": "STATUS_CODE", "property": None, "comparison": "LESS_THAN", "target": "400"}]
    edit = browser.http.get(f"/monitors/{monitor_id}/edit").text
    assert re.search(r'name="assertions.1.target"[^>]*value="400"', edit)
    assert len(re.findall(r'name="assertions\.\d+\.source"', edit)) == 2 + statusapp.ROW_SPARE
    cleared = browser.post(f"/monitors/{monitor_id}/edit", {
        "assertions.0.source": "", "assertions.0.comparison": "", "assertions.0.target": "",
        "assertions.0.property": ""})
    assert cleared.status_code == 303
    assert browser.http.get(f"/api/v1/monitors/{monitor_id}", headers=api
                            ).json()["assertions"] == []


def test_overview_pages_reach_every_one_of_300_monitors(live):
    browser, key = live
    api = {"X-API-Key": key}
    for i in range(300):
        assert browser.http.post("/api/v1/monitors", headers=api, json={
            "name": f"site {i:03d}", "url": "http://127.0.0.1:9/", "isActive": False}
                                 ).status_code == 201
    seen: list[str] = []
    path = "/"
    while path:
        page = browser.http.get(path).text
        names = re.findall(r'<a href="/monitors/mon_[^"]+">(site \d+)</a>', page)
        assert len(names) <= 100
        seen += names
        following = re.search(r'<a href="(\?[^"]*)" rel="next">', page)
        path = "/" + following.group(1).replace("&amp;", "&") if following else ""
    assert seen == [f"site {i:03d}" for i in range(300)]
    last = browser.http.get("/?page=3").text
    assert "Page 3 of 3 (300 in all)" in last and 'rel="prev"' in last
    searched = browser.http.get("/", params={"search": "site 29", "page": 1}).text
    assert re.findall(r">(site \d+)</a>", searched) == [f"site {i}" for i in range(290, 300)]


def _chrome(width: int = 1280, height: int = 900):
    """Headless Debian chromium through chromedriver (nothing downloads a browser)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options,
                            service=webdriver.ChromeService("/usr/bin/chromedriver"))


class _Site(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


def _waiter(driver):
    """A 30 s wait for which a lookup racing a page load (no such element yet, a stale one,
    or Chromium's "node does not belong to the document", a plain WebDriverException) means
    "look again"."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,))


def _fill(driver, **values: str) -> None:
    """Type into the inputs ``f-<name>``, or choose a select's option by its text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    for ident, value in values.items():
        element = driver.find_element(By.ID, f"f-{ident}")
        if element.tag_name == "select":
            Select(element).select_by_visible_text(value)
        else:
            element.clear()
            element.send_keys(value)


def _submit(driver) -> None:
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, "main form[method=post] button").click()


def _set_up_owner(driver, srv: Server, wait) -> None:
    """Open the link the first `serve` printed and choose the owner's password."""
    from selenium.webdriver.common.by import By
    link = re.search(r"(http://\S+/setup\?token=\S+)", srv.output()).group(1)
    driver.get(link.replace("http://127.0.0.1:8080", srv.url))
    _fill(driver, password="correct horse battery", confirm="correct horse battery")
    _submit(driver)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Overview")


def test_dashboard_in_a_real_browser(tmp_path):
    """Set up the owner from the printed link, run a monitor and a channel through the forms,
    see status and incidents live, invite a VIEWER who gets no write controls."""
    from selenium.webdriver.common.by import By
    shots = HERE / "docs" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    site = _serve(ThreadingHTTPServer(("127.0.0.1", 0), _Site))
    receiver = _NotifyReceiver()
    srv = Server(tmp_path, env={"STATUSAPP_PROBES_CONFIRMATIONS": "1",
                                "STATUSAPP_DASHBOARD_REFRESH_SECONDS": "1"}).start()
    driver = _chrome()
    wait = _waiter(driver)

    def fill(**values: str) -> None:
        _fill(driver, **values)

    def submit() -> None:
        _submit(driver)

    try:
        _set_up_owner(driver, srv, wait)
        driver.get(srv.url + "/monitors/new")
        fill(name="Home site", url=f"http://127.0.0.1:{site.server_address[1]}/", interval="1",
             timeout="5")
        submit()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Home site")
        monitor_url = driver.current_url
        driver.get(srv.url + "/")
        wait.until(lambda d: "Up" in d.find_element(By.ID, "live").text)  # refreshed live
        driver.save_screenshot(str(shots / "overview-desktop.png"))
        dark = [{"name": "prefers-color-scheme", "value": "dark"}]
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": dark})
        driver.save_screenshot(str(shots / "overview-dark.png"))
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        _stop(site)
        wait.until(lambda d: "Open incidents" in d.find_element(By.ID, "live").text)
        assert "Down" in driver.find_element(By.ID, "live").text
        driver.get(monitor_url)
        driver.save_screenshot(str(shots / "monitor-desktop.png"))
        driver.set_window_size(390, 844)
        driver.save_screenshot(str(shots / "monitor-phone.png"))
        driver.get(srv.url + "/")
        driver.save_screenshot(str(shots / "overview-phone.png"))
        driver.set_window_size(1280, 900)
        driver.get(monitor_url + "/edit")
        fill(name="Home site (edited)")
        submit()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Home site (edited)")
        driver.find_element(By.XPATH, "//button[text()='Pause']").click()
        wait.until(lambda d: "Paused" in d.find_element(By.ID, "live").text)
        driver.get(srv.url + "/channels/new")
        fill(type="WEBHOOK")  # the type chooser submits itself; the WEBHOOK form follows
        wait.until(lambda d: d.find_element(By.ID, "f-config-url"))
        fill(name="Receiver", **{"config-url": receiver.url + "/hook"})
        submit()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Notification channels")
        driver.find_element(By.XPATH, "//button[text()='Send a test']").click()
        notice = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "p.notice"))
        assert "Test delivered: the receiver answered HTTP 200" in notice.text
        assert receiver.json()["event"] == "test"
        driver.get(srv.url + "/team")
        fill(email="viewer@example.test", role="VIEWER")
        submit()
        invite = wait.until(lambda d: d.find_element(By.ID, "invite-link")).text
        driver.find_element(By.XPATH, "//button[text()='Sign out']").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Sign in")
        driver.get(invite.replace(re.match(r"http://[^/]+", invite).group(0), srv.url))
        fill(password="viewer password", confirm="viewer password")
        submit()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Overview")
        page = driver.page_source
        assert "Home site (edited)" in page and "Resume" not in page and "New monitor" not in page
        driver.get(monitor_url)
        assert not driver.find_elements(By.XPATH, "//main//button[text()!='Copy']")
        viewer = httpx.Client(base_url=srv.url, timeout=10, follow_redirects=False,
                              cookies={"statusapp_session":
                                       driver.get_cookie("statusapp_session")["value"]})
        csrf = re.search(r'name="csrf" value="([^"]+)"', viewer.get("/").text).group(1)
        refused = viewer.post(urllib.parse.urlsplit(monitor_url).path + "/pause",
                              data={"csrf": csrf})
        assert refused.status_code == 403 and "needs the MEMBER role" in refused.text
        forged = viewer.post("/signout-everywhere")
        assert forged.status_code == 403 and "CSRF" in forged.text
    finally:
        driver.quit()
        receiver.close()
        srv.stop()
        with contextlib.suppress(OSError):
            _stop(site)


def test_dashboard_channel_types_and_maintenance_in_a_real_browser(tmp_path):
    """Choosing a channel type swaps in that type's fields (NTFY's priority is a number 1-5,
    OPSGENIE's a choice of P1-P5); an assertion is chosen in a row of selects; a maintenance
    window made through its form puts a monitor in MAINTENANCE on the overview."""
    from selenium.webdriver.common.by import By
    srv = Server(tmp_path).start()
    driver = _chrome()
    wait = _waiter(driver)
    try:
        _set_up_owner(driver, srv, wait)
        driver.get(srv.url + "/monitors/new")
        assert driver.find_element(By.ID, "f-assertions-0-source").is_displayed()  # WEBSITE
        _fill(driver, type="DNS")
        assert not driver.find_element(By.ID, "f-assertions-0-source").is_displayed()
        _fill(driver, type="API", name="Database", url="http://127.0.0.1:9/", interval="3600",
              **{"assertions-0-source": "HEADERS", "assertions-0-property": "content-type",
                 "assertions-0-comparison": "CONTAINS", "assertions-0-target": "json"})
        _submit(driver)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Database")
        monitor = httpx.get(srv.url + "/api/v1/monitors", headers=_as(_owner_key(srv))).json()[
            "monitors"][0]
        assert monitor["assertions"] == [{"source": "HEADERS", "property": "content-type",
                                          "comparison": "CONTAINS", "target": "json"}]
        driver.get(srv.url + "/channels/new")
        assert not driver.find_elements(By.CSS_SELECTOR, "[name^='config.']")
        _fill(driver, type="NTFY")
        priority = wait.until(lambda d: d.find_element(By.ID, "f-config-priority"))
        assert (priority.tag_name, priority.get_attribute("type"),
                priority.get_attribute("max")) == ("input", "number", "5")
        _fill(driver, type="OPSGENIE")
        wait.until(lambda d: d.find_element(By.ID, "f-config-priority").tag_name == "select")
        options = driver.find_elements(By.CSS_SELECTOR, "#f-config-priority option")
        assert [o.text for o in options][1:] == ["P1", "P2", "P3", "P4", "P5"]
        _fill(driver, name="On call", **{"config-apiKey": "genie", "config-priority": "P2"})
        _submit(driver)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Notification channels")
        assert "OPSGENIE" in driver.find_element(By.TAG_NAME, "main").text
        driver.find_element(By.LINK_TEXT, "Maintenance").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Maintenance windows")
        driver.find_element(By.LINK_TEXT, "New maintenance window").click()
        wait.until(lambda d: d.find_element(By.ID, "f-title"))
        _fill(driver, title="Disk swap", startsAt="2020-01-01T00:00:00Z",
              endsAt="2099-01-01T00:00:00Z")
        driver.find_element(By.XPATH, "//label[.='Database (API)']/input").click()  # by name
        _submit(driver)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Maintenance windows")
        assert "Disk swap" in driver.page_source and "Running" in driver.page_source
        driver.get(srv.url + "/")
        row = wait.until(lambda d: d.find_element(By.XPATH, "//tr[.//a[text()='Database']]"))
        assert row.text.startswith("\u2692 Maintenance")
        window = httpx.get(srv.url + "/api/v1/maintenance-windows", headers=_as(_owner_key(srv))
                           ).json()["maintenanceWindows"][0]
        assert window["monitorIds"] == [monitor["id"]]
    finally:
        driver.quit()
        srv.stop()


# --- Application tests ---


def test_a_crashed_service_is_logged_and_restarted(cfg, key, monkeypatch, caplog):
    runs, up = [], threading.Event()

    async def flaky(rt) -> None:
        runs.append(time.monotonic())
        if len(runs) < 3:
            raise RuntimeError(f"crash {len(runs)}")
        up.set()
        await asyncio.Event().wait()  # the third run stays up until shutdown cancels it

    monkeypatch.setattr(statusapp, "SERVICES", (flaky,))
    monkeypatch.setattr(statusapp, "_SERVICE_RESTART_DELAY", 0.05)
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}):
        assert up.wait(60)
    assert len(runs) == 3  # the shutdown's cancel was not taken for a crash
    crashes = [r for r in caplog.records if "service flaky crashed" in r.getMessage()]
    assert len(crashes) == 2 and "crash 2" in str(crashes[1].exc_info[1])


# --- CLI tests ---


@pytest.mark.asyncio
async def test_served_main_loop_keeps_the_date_and_stops_at_once(monkeypatch):
    """serve's uvicorn main loop, which wakes once a second: the Date header is set before it
    first waits, and an exit signal itself ends the loop.  Here the loop's once-a-second
    timeout never expires, so only the signal's wake-up can end it: waits on events, no time."""
    import uvicorn
    timeout = asyncio.timeout
    monkeypatch.setattr(asyncio, "timeout", lambda delay: timeout(None))
    server = statusapp.calm_server(uvicorn.Config(app=None, date_header=True))
    server.config.load()
    ticked, tick = asyncio.Event(), server.on_tick

    async def on_tick(counter: int) -> bool:
        stop = await tick(counter)
        ticked.set()
        return stop
    server.on_tick = on_tick
    loop_task = asyncio.create_task(server.main_loop())
    await asyncio.wait_for(ticked.wait(), 60)
    (name, value), = [h for h in server.server_state.default_headers if h[0] == b"date"]
    assert email.utils.parsedate_to_datetime(value.decode()).tzinfo is not None
    server.handle_exit(signal.SIGTERM, None)
    await asyncio.wait_for(loop_task, 60)
    assert server.should_exit


def test_serve_end_to_end_first_run_key_and_client_flow(server):
    """The spec's client flow over real HTTP against `statusapp serve`, then a clean SIGTERM."""
    _owner_key(server)  # the first-run lines are all out once the key is
    output = server.output()
    assert f"StatusApp: database {server.db}\n" in output  # the absolute path, before the key
    assert output.index("StatusApp: database") < output.index("created the owner account")
    assert "created the owner account admin@localhost" in output
    key = [line for line in output.splitlines() if line.startswith("sk_live_")][0]
    api = httpx.Client(base_url=server.url + "/api/v1", headers={"X-API-Key": key}, timeout=10)
    created = api.post("/monitors", json={"name": "Production API", "url": "http://127.0.0.1:9/health",
                                          "type": "API", "interval": 300, "expectedStatusCode": 200})
    assert created.status_code == 201
    monitor_id = created.json()["id"]
    listed = api.get("/monitors", params={"status": "PENDING", "limit": 10}).json()
    assert [m["id"] for m in listed["monitors"]] == [monitor_id]
    assert api.get(f"/monitors/{monitor_id}").json()["expectedStatusCode"] == 200
    assert api.put(f"/monitors/{monitor_id}", json={"interval": 600}).json()["interval"] == 600
    assert api.post(f"/monitors/{monitor_id}/pause").json()["isPaused"] is True
    assert api.delete(f"/monitors/{monitor_id}").json()["success"] is True
    assert api.get(f"/monitors/{monitor_id}").status_code == 404
    assert api.get("/monitors").headers["X-RateLimit-Limit"] == "100000"
    assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    assert "Application shutdown complete" in server.output()
    assert "Traceback" not in server.output()
    with sqlite3.connect(server.db) as conn:  # the shutdown flushed the in-memory usage counters
        counted = dict(conn.execute("SELECT endpoint, SUM(count) FROM api_usage GROUP BY endpoint"))
    assert counted["/api/v1/monitors/{monitorId}"] == 4  # GET, PUT, DELETE, GET


def _closed_by_server(sock: socket.socket, trickle: bytes = b"") -> bool:
    """Send ``trickle`` a byte at a time (or nothing) until the server closes the connection;
    False if it is still open after 60 s."""
    sock.settimeout(0.1)
    for step in range(600):
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            pass
        except ConnectionError:
            return True
        if trickle:
            with contextlib.suppress(OSError):
                sock.sendall(trickle[step % len(trickle):][:1])
    return False


def test_serve_reaps_idle_and_slow_clients_and_caps_connections(tmp_path):
    srv = Server(tmp_path, env={"STATUSAPP_SERVER_HEADER_TIMEOUT": "1",
                                "STATUSAPP_SERVER_KEEPALIVE_TIMEOUT": "1",
                                "STATUSAPP_SERVER_MAX_CONNECTIONS": "4"}).start()
    address = ("127.0.0.1", srv.port)
    health = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        key = _owner_key(srv).encode()
        busy = []  # requests whose body does not come (yet) hold their connections
        for _ in range(3):
            sock = socket.create_connection(address)
            sock.sendall(b"POST /api/v1/monitors HTTP/1.1\r\nHost: x\r\nX-API-Key: " + key +
                         b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            busy.append(sock)
        with socket.create_connection(address) as over:
            over.sendall(health)
            assert over.recv(4096).startswith(b"HTTP/1.1 503")  # the fourth connection
        for sock in busy:
            with sock:
                assert _closed_by_server(sock, b" ")  # the body, a byte at a time
        with socket.create_connection(address) as idle:
            assert _closed_by_server(idle)  # never sent a byte
        with socket.create_connection(address) as slow:
            slow.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
            assert _closed_by_server(slow, b"X-Slow: 1\r\n")  # headers a byte at a time
        with socket.create_connection(address) as kept:
            kept.sendall(health)
            assert kept.recv(4096).startswith(b"HTTP/1.1 200")  # under the limit again
            assert _closed_by_server(kept)  # idle after its answer
    finally:
        srv.stop()


def test_readme_first_monitor_curl_line_works_when_pasted(server):
    """The README's first-run lines, run by bash as written: only the key is pasted in, and the
    port and the target are pointed at loopback."""
    readme = (HERE / "README.md").read_text()
    block = re.search(r"```bash\n(STATUSAPP_KEY=.*?\n(?:curl .*?\n)+)```", readme).group(1)
    key = _owner_key(server)
    script = (block.replace("sk_live_paste_the_key_here", key)
              .replace("http://127.0.0.1:8080", server.url)
              .replace("https://example.com", "http://127.0.0.1:9/"))
    result = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["name"] == "Example" and created["id"].startswith("mon_"), created


def test_readme_contents_list_every_section():
    readme = (HERE / "README.md").read_text()
    contents = readme[readme.index("**Contents**"):readme.index("\n## ")]
    for title in re.findall(r"^## (.+)$", readme, re.M):
        assert f"[{title}](#" in contents, title
    command = "pip install '.[test]' && python -m mypy statusapp.py && python -m pytest -q -n 4"
    assert f"python3 -m venv .venv && . .venv/bin/activate\n{command}\n" in readme
    assert command in (HERE / ".ci" / "run").read_text().splitlines()  # CI runs it exactly


def test_serve_does_not_print_a_key_on_later_starts(tmp_path):
    first = Server(tmp_path).start()
    first.stop()
    again = Server(tmp_path)
    again.port, again.url = first.port, first.url
    again.start()
    assert "sk_live_" not in again.output()
    again.stop()


def _serve_fails(tmp_path, db: str, port: int | None = None) -> str:
    """Run `serve` expecting it to stop by itself: non-zero, one line, no traceback."""
    result = subprocess.run(
        [sys.executable, str(HERE / "statusapp.py"), "serve", "--db", db,
         "--port", str(port or free_port())],
        capture_output=True, text=True, timeout=30, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("StatusApp: ")]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_serve_on_a_port_in_use_stops_before_creating_the_owner(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        line = _serve_fails(tmp_path, str(tmp_path / "new.db"), port)
    assert line == f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not (tmp_path / "new.db").exists()  # no owner created, no key printed and lost


def _unwritable(path: Path) -> None:
    """Make a file read-only even for root (immutable), or skip where that is not possible."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        if os.geteuid() == 0:
            pytest.skip("chattr +i is not available")
        path.chmod(0o444)
        path.parent.chmod(0o555)


@pytest.mark.parametrize("case", ["missing folder", "directory", "not a database", "read-only",
                                  "unreadable"])
def test_serve_with_a_bad_database_exits_with_one_line_naming_it(tmp_path, case):
    db = tmp_path / "sub" / "statusapp.db"
    expected = {"missing folder": f"the folder {db.parent} does not exist",
                "directory": "is a directory", "not a database": "file is not a database",
                "read-only": "the database is read-only", "unreadable": "cannot be read"}[case]
    if case != "missing folder":
        db.parent.mkdir()
    if case == "directory":
        db.mkdir()
    elif case == "not a database":
        db.write_text("not sqlite at all " * 100)
    elif case in ("read-only", "unreadable"):
        cli(make_cfg(tmp_path, server={"database": str(db)}), "init", "--email", "a@home.test")
        if case == "unreadable":
            if os.geteuid() == 0:
                pytest.skip("root reads every file")
            db.chmod(0)
        else:
            _unwritable(db)
    try:
        line = _serve_fails(tmp_path, str(db))
    finally:
        if db.exists():
            subprocess.run(["chattr", "-i", str(db)], capture_output=True)
            db.parent.chmod(0o755)
    assert line.startswith(f"Error: database {db}") and expected in line


def test_init_creates_the_owner_once_and_prints_a_key_last(cfg):
    first = cli(cfg, "init", "--email", "me@home.test", "--name", "Me").strip().splitlines()
    second = cli(cfg, "init", "--email", "me@home.test").strip().splitlines()
    assert first[-1].startswith("sk_live_") and second[-1].startswith("sk_live_")
    assert first[-1] != second[-1]
    assert sql(cfg, "SELECT email, name, plan FROM accounts") == [("me@home.test", "Me", "ENTERPRISE")]
    assert sql(cfg, "SELECT role, status FROM team_members") == [("OWNER", "ACCEPTED")]
    stored = [row[0] for row in sql(cfg, "SELECT key_hash FROM api_keys")]
    assert statusapp.hash_key(first[-1]) in stored and first[-1] not in stored


def test_apikey_create_list_revoke(cfg):
    new_key(cfg, "me@home.test")
    out = cli(cfg, "apikey", "create", "--email", "me@home.test", "--name", "ci", "--permissions",
              "write,read", "--expires", "2030-06-01")
    key = out.strip().splitlines()[-1]
    assert key.startswith("sk_live_")
    listing = cli(cfg, "apikey", "list")
    assert "'ci'" in listing and "read,write" in listing and "2030-06-01T00:00:00Z" in listing
    assert key not in listing and key[:12] in listing
    key_id = sql(cfg, "SELECT id FROM api_keys WHERE name = 'ci'")[0][0]
    assert cli(cfg, "apikey", "revoke", key_id).strip() == f"revoked {key_id}"
    assert "'ci'" in cli(cfg, "apikey", "list") and "revoked" in cli(cfg, "apikey", "list")


@pytest.mark.parametrize("args, message", [
    (["apikey", "create", "--email", "nobody@home.test", "--name", "x"], "no account with email"),
    (["apikey", "create", "--email", "me@home.test", "--name", "x", "--permissions", "admin"],
     "a comma-separated subset of read,write,delete"),
    (["apikey", "create", "--email", "me@home.test", "--name", "x", "--expires", "soon"],
     "use an ISO date"),
    (["apikey", "create", "--email", "me@home.test", "--name", "x", "--expires", "2001-01-01"],
     "the expiry must be in the future"),
    (["apikey", "revoke", "key_nope"], "no API key with id key_nope"),
])
def test_cli_errors_are_one_clear_line(cfg, args, message):
    new_key(cfg, "me@home.test")
    result = CliRunner().invoke(statusapp.cli, [*args, "--db", cfg["server"]["database"]])
    assert result.exit_code != 0 and message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


SETUP = """
[[channels]]
name = "phone"
type = "TELEGRAM"
config = { botToken = "${TG_TOKEN}", chatId = "42" }

[[monitors]]
name = "NAS"
url = "http://127.0.0.1:9/"
interval = 120
notifications = [{ channel = "phone" }]

[[monitors]]
name = "backup job"
type = "CRON"
interval = 3600

[[statusPages]]
name = "Home"
slug = "home"
monitorGroups = [{ name = "Core", monitors = ["NAS", "backup job"] }]
"""
TG_TOKEN = "123456:secret-token-one"
WINDOWS = """
[[maintenanceWindows]]
title = "Sunday reboot"
startsAt = "2026-01-04T03:00:00"
recurrence = "FREQ=WEEKLY;BYDAY=SU"
timezone = "Europe/Berlin"
durationMinutes = 30
monitors = ["NAS"]

[[maintenanceWindows]]
title = "Moving house"
description = "Everything is off"
startsAt = "2030-05-01T08:00:00Z"
endsAt = "2030-05-01T18:00:00Z"
suppressAlerts = false
"""


@pytest.fixture(scope="module")
def untouched_server(tmp_path_factory):
    """One server for the tests that must leave it unchanged."""
    srv = Server(tmp_path_factory.mktemp("untouched")).start()
    yield srv
    srv.stop()


def setup_cli(srv: Server, key: str, *args: str, code: int = 0, **env: str) -> str:
    """`statusapp apply|export ...` against the served team; asserts the exit code."""
    result = CliRunner().invoke(statusapp.cli, [*args, "--url", srv.url],
                                env={"STATUSAPP_API_KEY": key, "TG_TOKEN": TG_TOKEN, **env})
    assert result.exit_code == code, result.output
    return result.stdout if code == 0 else result.output


def test_apply_plans_creates_updates_prunes_and_is_idempotent(server, tmp_path):
    key = _owner_key(server)
    api = httpx.Client(base_url=server.url + "/api/v1", headers={"X-API-Key": key})
    file = tmp_path / "statusapp.toml"
    file.write_text(SETUP)
    dry = setup_cli(server, key, "apply", str(file), "--dry-run")
    assert "+ create channel 'phone'" in dry and "+ create status page 'Home'" in dry
    assert "Plan: 4 to create, 0 to update, 0 to delete." in dry and TG_TOKEN not in dry
    assert api.get("/monitors").json()["monitors"] == []
    assert "Applied." in setup_cli(server, key, "apply", str(file))
    monitors = {m["name"]: m for m in api.get("/monitors").json()["monitors"]}
    channel = api.get("/notifications").json()["channels"][0]
    assert monitors["NAS"]["interval"] == 120 and monitors["NAS"]["managed"] is True
    assert monitors["NAS"]["monitorNotifications"][0]["channelId"] == channel["id"]
    assert channel["config"] == {"botToken": statusapp.mask(TG_TOKEN), "chatId": "42"}
    page = api.get("/status-pages").json()["statusPages"][0]
    groups = api.get(f"/status-pages/{page['id']}").json()["monitorGroups"]
    assert groups[0]["monitorIds"] == [monitors["NAS"]["id"], monitors["backup job"]["id"]]
    assert setup_cli(server, key, "apply", str(file)).strip() == f"No changes: the team matches {file}."

    by_hand = api.post("/monitors", json={"name": "by hand", "url": "http://127.0.0.1:9/"}).json()
    file.write_text(SETUP.replace("interval = 120", "interval = 600").replace(
        ', "backup job"', "").split("[[monitors]]\nname = \"backup job\"")[0] + SETUP.split(
        "interval = 3600\n")[1].replace(', "backup job"', ""))
    new_token = "999999:another-secret-token"
    kept = setup_cli(server, key, "apply", str(file), TG_TOKEN=new_token)
    assert "~ update channel 'phone'\n    config.botToken: (sensitive)" in kept
    assert "~ update monitor 'NAS'\n    interval: 120 -> 600" in kept
    assert "~ update status page 'Home'" in kept and "- delete" not in kept
    assert new_token not in kept and TG_TOKEN not in kept
    pruned = setup_cli(server, key, "apply", str(file), "--prune", TG_TOKEN=new_token)
    assert pruned.splitlines()[0] == "- delete monitor 'backup job'"
    names = {m["name"] for m in api.get("/monitors").json()["monitors"]}
    assert names == {"NAS", "by hand"} and by_hand["managed"] is False
    assert api.get("/notifications").json()["channels"][0]["config"]["botToken"] == \
        statusapp.mask(new_token)
    same_tail = "555555:rotated-again-token"  # masked, it looks like new_token
    rotated = setup_cli(server, key, "apply", str(file), TG_TOKEN=same_tail)
    assert rotated.startswith("~ update channel 'phone'\n    config: (sensitive)\nPlan: 0 to")
    assert sql({"server": {"database": server.db}}, "SELECT config FROM notification_channels"
               )[0][0] == json.dumps({"botToken": same_tail, "chatId": "42"})
    assert setup_cli(server, key, "apply", str(file), TG_TOKEN=same_tail).startswith("No changes")
    api.post("/status-pages", json={"name": "by hand", "slug": "taken"})
    file.write_text(file.read_text() + '[[statusPages]]\nname = "Lab"\nslug = "taken"\n')
    failed = setup_cli(server, key, "apply", str(file), code=1, TG_TOKEN=new_token)
    assert "statusPages[1]: This slug is already in use" in failed


def test_apply_manages_maintenance_windows_by_title_with_monitors_by_name(server, tmp_path):
    key = _owner_key(server)
    api = httpx.Client(base_url=server.url + "/api/v1", headers={"X-API-Key": key})
    file = tmp_path / "statusapp.toml"
    file.write_text(SETUP + WINDOWS)
    dry = setup_cli(server, key, "apply", str(file), "--dry-run")
    assert "+ create maintenance window 'Sunday reboot'" in dry
    assert "Plan: 6 to create, 0 to update, 0 to delete." in dry
    assert api.get("/maintenance-windows").json()["maintenanceWindows"] == []
    setup_cli(server, key, "apply", str(file))
    monitors = {m["name"]: m["id"] for m in api.get("/monitors").json()["monitors"]}
    windows = {w["title"]: w for w in api.get("/maintenance-windows").json()["maintenanceWindows"]}
    reboot, moving = windows["Sunday reboot"], windows["Moving house"]
    assert reboot["monitorIds"] == [monitors["NAS"]] and reboot["managed"] is True
    assert (reboot["timezone"], reboot["durationMinutes"]) == ("Europe/Berlin", 30)
    assert moving["monitorIds"] is None and moving["suppressAlerts"] is False
    assert setup_cli(server, key, "apply", str(file)).startswith("No changes")

    by_hand = api.post("/maintenance-windows", json={
        "title": "by hand", "startsAt": "2030-01-01T00:00:00Z", "endsAt": "2030-01-02T00:00:00Z"})
    assert by_hand.json()["managed"] is False
    file.write_text(SETUP + WINDOWS.split("[[maintenanceWindows]]\ntitle = \"Moving")[0].replace(
        "durationMinutes = 30", "durationMinutes = 45").replace('["NAS"]', '["NAS", "backup job"]'))
    pruned = setup_cli(server, key, "apply", str(file), "--prune")
    assert pruned.splitlines()[:4] == [
        "~ update maintenance window 'Sunday reboot'", "    durationMinutes: 30 -> 45",
        '    monitorIds: ["NAS"] -> ["NAS", "backup job"]',
        "- delete maintenance window 'Moving house'"]
    windows = {w["title"]: w for w in api.get("/maintenance-windows").json()["maintenanceWindows"]}
    assert set(windows) == {"Sunday reboot", "by hand"}
    assert windows["Sunday reboot"]["monitorIds"] == [monitors["NAS"], monitors["backup job"]]
    assert setup_cli(server, key, "apply", str(file), "--prune").startswith("No changes")
    file.write_text(file.read_text().replace('monitors = ["NAS", "backup job"]\n',
                                             "monitors = []\n"))
    emptied = setup_cli(server, key, "apply", str(file))
    assert '    monitorIds: ["NAS", "backup job"] -> []\n' in emptied
    file.write_text(file.read_text().replace("monitors = []\n", ""))
    assert "    monitorIds: [] -> null\n" in setup_cli(server, key, "apply", str(file))
    assert api.get(f"/maintenance-windows/{reboot['id']}").json()["monitorIds"] is None


@pytest.mark.parametrize("text, lines", [
    (SETUP.replace("interval = 120", "interval = 5").replace('url = "http://127.0.0.1:9/"\n', "")
     .replace('"42"', "42.5"),
     ["channels[0].config.chatId: Expected string, received number",
      "monitors[0].url: Required",
      "monitors[0].interval: Number must be greater than or equal to 60"]),
    (SETUP.replace("${TG_TOKEN}", "${NOT_SET_ANYWHERE}") + "[[statusPages]]\nname = \"Home\"\n",
     ["channels[0].config.botToken: environment variable NOT_SET_ANYWHERE is not set"]),
    (SETUP.replace('name = "Home"', 'name = "NAS"').replace('"Core", monitors = ["NAS"',
                                                            '"Core", monitors = ["nope"'),
     ["statusPages[0].monitorGroups[0].monitorIds: Unknown monitor id(s): (unknown: nope)"]),
    (SETUP + "[[monitors]]\nname = \"NAS\"\nurl = \"http://127.0.0.1:9/\"\n",
     ["monitors[2].name: 'NAS' is named twice in the file"]),
    ("[monitors]\nname = 1\n[alerts]\n", ["alerts: unknown section", "monitors: must be an array"]),
    ('[[monitors]]\nname = ["a"]\n', ["monitors[0].name: Expected string, received array"]),
    ("[[monitors]\n", ["bad.toml: "]),
    (SETUP + WINDOWS.replace('"2030-05-01T18:00:00Z"', '"2030-05-01T07:00:00Z"').replace(
        'durationMinutes = 30\nmonitors = ["NAS"]', 'monitors = ["nope"]'),
     ["maintenanceWindows[0].monitorIds: Unknown monitor id(s): (unknown: nope)",
      "maintenanceWindows[1].endsAt: endsAt must be after startsAt"]),
    (SETUP + WINDOWS.replace('durationMinutes = 30\n', "").replace("Moving house", "Sunday reboot"),
     ["maintenanceWindows[1].title: 'Sunday reboot' is named twice in the file",
      "maintenanceWindows[0].durationMinutes: A recurring window needs durationMinutes"]),
])
def test_apply_reports_every_error_with_its_place_and_changes_nothing(untouched_server, tmp_path,
                                                                      text, lines):
    key = _owner_key(untouched_server)
    file = tmp_path / "bad.toml"
    file.write_text(text)
    output = setup_cli(untouched_server, key, "apply", str(file), code=1)
    for line in lines:
        assert line in output
    assert httpx.get(untouched_server.url + "/api/v1/monitors", headers={"X-API-Key": key}).json()[
        "monitors"] == []


def test_toml_writer_output_reads_back_as_the_same_data():
    tricky = "quote \" backslash \\ newline \n tab \t bell \x07 del \x7f ✓ 🙂"
    setup = {"monitors": [{"name": tricky, "interval": 60, "ratio": 0.5, "on": False,
                           "list": [1, "two", {"x y": {}}], "obj": {"a-b": [], "c.d": tricky}}],
             "channels": []}
    text = statusapp.to_toml(setup)
    assert tomllib.loads(text) == {"monitors": setup["monitors"]}
    assert "\x07" not in text and "\x7f" not in text  # control characters escaped

def test_export_round_trips_through_apply_in_toml_and_json(server, tmp_path):
    key = _owner_key(server)
    file = tmp_path / "statusapp.toml"
    file.write_text(SETUP + """
[[monitors]]
name = "API \\"quoted\\" ✓"
type = "API"
url = "http://127.0.0.1:9/health"
httpMethod = "POST"
requestHeaders = '{"X-Env": "lab"}'
apiAuthConfig = { type = "bearer", token = "${API_TOKEN}" }
notifications = [{ type = "WEBHOOK", config = { url = "http://127.0.0.1:9/hook" }, enabled = false }]
""" + WINDOWS + """
[[maintenanceWindows]]
title = "covers no monitor"
startsAt = "2030-06-01T08:00:00Z"
endsAt = "2030-06-01T09:00:00Z"
monitors = []
""")
    setup_cli(server, key, "apply", str(file), API_TOKEN="bearer-token-abcdef")
    api = httpx.Client(base_url=server.url + "/api/v1", headers={"X-API-Key": key})
    gone = api.post("/monitors", json={"name": "gone", "url": "http://127.0.0.1:9/"}).json()["id"]
    window = api.get("/maintenance-windows").json()["maintenanceWindows"][0]
    covered = api.put(f"/maintenance-windows/{window['id']}",
                      json={"monitorIds": [*window["monitorIds"], gone]}).json()["monitorIds"]
    api.delete(f"/monitors/{gone}")  # the window keeps its id, which covers nothing now
    assert covered[-1] == gone == api.get("/maintenance-windows").json()[
        "maintenanceWindows"][0]["monitorIds"][-1]
    exported = setup_cli(server, key, "export")
    as_json = json.loads(setup_cli(server, key, "export", "--format", "json"))
    assert tomllib.loads(exported) == as_json
    assert as_json["channels"][0]["config"]["botToken"] == "${CHANNEL_PHONE_BOT_TOKEN}"
    assert as_json["monitors"][2]["apiAuthConfig"]["token"] == "${MONITOR_API_QUOTED_TOKEN}"
    assert as_json["statusPages"][0]["monitorGroups"][0]["monitors"] == ["NAS", "backup job"]
    assert [w.get("monitors") for w in as_json["maintenanceWindows"]] == [["NAS"], None, []]
    assert as_json["maintenanceWindows"][1]["suppressAlerts"] is False
    secrets = {"CHANNEL_PHONE_BOT_TOKEN": TG_TOKEN, "MONITOR_API_QUOTED_TOKEN": "bearer-token-abcdef"}
    (tmp_path / "exported.toml").write_text(exported)
    (tmp_path / "exported.json").write_text(json.dumps(as_json))
    for name in ("exported.toml", "exported.json"):
        again = setup_cli(server, key, "apply", str(tmp_path / name), **secrets)
        assert again.startswith("No changes"), again
    (tmp_path / "other").mkdir()
    other = Server(tmp_path / "other").start()
    try:
        other_key = _owner_key(other)
        setup_cli(other, other_key, "apply", str(tmp_path / "exported.toml"), **secrets)
        assert json.loads(setup_cli(other, other_key, "export", "--format", "json")) == as_json
    finally:
        other.stop()

def _dockerfile(instruction: str) -> str:
    """The rest of the Dockerfile's (one-line) ``instruction`` line."""
    lines = (HERE / "Dockerfile").read_text().splitlines()
    return next(line.split(" ", 1)[1] for line in lines if line.startswith(instruction + " "))


def test_docker_healthcheck_command_passes_on_a_live_server_and_fails_without(server):
    """The Dockerfile's HEALTHCHECK, run as the image runs it: its ENV, the served port."""
    command = json.loads(_dockerfile("HEALTHCHECK").split(" CMD ", 1)[1])
    assert command[0] == "statusapp"
    env = dict(pair.split("=", 1) for pair in _dockerfile("ENV").split())
    env["STATUSAPP_SERVER_PORT"] = str(server.port)
    assert env["STATUSAPP_SERVER_HOST"] == "0.0.0.0"
    ok = CliRunner().invoke(statusapp.cli, command[1:], env=env)
    assert ok.exit_code == 0 and "/api/v1/health: healthy" in ok.output
    server.stop()
    down = CliRunner().invoke(statusapp.cli, command[1:], env=env)
    assert down.exit_code == 1 and f"127.0.0.1:{server.port}/api/v1/health" in down.output


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    unit = (HERE / "statusapp.service").read_text()
    assert "ExecStart=/usr/local/bin/statusapp serve" in unit
    for option in ("DynamicUser=yes", "StateDirectory=statusapp", "ProtectSystem=strict",
                   "NoNewPrivileges=yes", "PrivateTmp=yes"):
        assert option in unit.splitlines()
    (tmp_path / "statusapp.service").write_text(
        unit.replace("/usr/local/bin/statusapp", shutil.which("true") or "/bin/true"))
    verify = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "statusapp.service")],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and "statusapp.service" not in verify.stderr, verify.stderr

def test_pip_install_gives_a_statusapp_command_that_finds_its_schema(tmp_path):
    """`pip install .` into a venv; the installed command works from another directory."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The dependencies come from the environment running this suite, a venv or the system's:
    # a .pth file puts its site-packages after the new venv's own (a venv made from inside a
    # venv would otherwise see only the base interpreter's, --system-site-packages or not).
    inner = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print("
                            "sysconfig.get_path('purelib'))"], capture_output=True, text=True)
    outer = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"),
             *(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))}
    Path(inner.stdout.strip(), "outer-env.pth").write_text("\n".join(sorted(outer)) + "\n")
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps",
                              str(HERE)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([str(venv / "bin" / "statusapp"), "init", "--email", "pip@home.test",
                             "--db", "pip.db"], cwd=elsewhere, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("sk_live_")
    with sqlite3.connect(elsewhere / "pip.db") as conn:
        version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
    assert version == max(statusapp.load_migrations())
