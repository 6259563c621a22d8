"""StatusApp's tests: real servers on loopback, StatusApp under TestClient and under uvicorn.

Sections follow statusapp.py: config, storage, validation, auth, probes, scheduler,
incidents, notifiers, API routes, pages, CLI.  Shared fixtures and loopback servers come first.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

import statusapp

HERE = Path(__file__).resolve().parent

# --- Fixtures and loopback servers ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def wait_for_http(url: str, proc: subprocess.Popen | None = None, seconds: float = 15) -> None:
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
        self.stderr.flush()
        return Path(self.stderr.name).read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=15)
        self.stderr.close()
        return code


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path).start()
    yield srv
    if srv.proc and srv.proc.poll() is None:
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


def test_example_config_documents_every_key_with_its_default():
    example = tomllib.loads((HERE / "config.example.toml").read_text())
    assert example == statusapp.CONFIG_DEFAULTS

# --- Storage tests ---


def test_schema_upgrades_an_older_database_in_place(tmp_path):
    """A database left at the previous schema version is migrated and keeps its data."""
    cfg = make_cfg(tmp_path)
    latest = max(statusapp.load_migrations())
    assert latest >= 2

    async def make_old():
        db = statusapp.Database(cfg["server"]["database"])
        await db.open(upto=latest - 1)
        async with db.transaction() as conn:
            await statusapp.create_account(conn, "old@example.test", "Old", "STARTER")
        await db.close()
    asyncio.run(make_old())
    assert sql(cfg, "SELECT version FROM schema_version") == [(latest - 1,)]
    key = new_key(cfg, "old@example.test")
    assert sql(cfg, "SELECT version FROM schema_version") == [(latest,)]
    with TestClient(statusapp.create_app(cfg), headers={"X-API-Key": key}) as client:
        response = client.get("/api/v1/monitors")
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "1000"  # the old account's plan survived


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

# --- API tests ---

# --- Probe tests ---

# --- Scheduler tests ---

# --- Heartbeat tests ---

# --- Incident tests ---

# --- Notifier tests ---

# --- Page tests ---

# --- CLI tests ---
