"""StatusApp: a self-hosted uptime monitor in one file, on SQLite.

Run it with ``python statusapp.py serve`` (or ``statusapp serve`` once installed).
The REST API follows the StatusApp API reference under ``/api/v1``.

Contents, in the order data flows through the program (a section uses only the ones above it,
except through the registries and the ``Runtime`` it is handed):

1. Basics       -- the version, logging that never carries secrets, shared small helpers.
2. Config       -- defaults, TOML file, ``STATUSAPP_<SECTION>_<KEY>`` variables, flags.
3. Errors       -- ``ApiError`` and its subclasses, the one error shape clients see.
4. Storage      -- SQLite via aiosqlite: numbered migrations from schema.sql, one
                   group-committing writer, separate readers.
5. Validation   -- declarative field tables that validate, default and document resources;
                   the ``MonitorType`` and ``ChannelType`` registries; monitor records.
6. Auth         -- API keys, roles and permissions, rate limits, usage counters.
7. Probes       -- one coroutine per monitor type, each declared as a ``MonitorType``.
8. Scheduler    -- the asyncio loop that runs probes on their intervals, in the server for
                   its own region and in ``statusapp agent`` for a remote one; heartbeats.
9. Notifiers    -- one sender per channel type, declared with ``channel_type``.
10. Incidents   -- regions' verdicts combine into statuses; transitions become incidents
                   and alerts, delivered through the notifiers; maintenance windows.
11. Analytics   -- rollups, retention, regression detection, uptime and the figures behind them.
12. API routes  -- the ``/api/v1`` handlers.
13. Metrics     -- ``/metrics`` in the Prometheus text format.
14. Pages       -- the public status pages and badges.
15. Dashboard   -- the team's web UI at ``/``: sign-in, sessions, pages and forms generated
                   from the field tables, acting through the API handlers.
16. Application -- ``Runtime``, the background ``SERVICES`` and ``create_app``, which wires
                   every section's routes into one ASGI application.
17. CLI         -- the click entrypoint that runs everything in one process.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import contextvars
import copy
import dataclasses
import enum
import functools
import gc
import gzip
import hashlib
import importlib
import heapq
import hmac
import html
import http.cookiejar
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import secrets
import signal
import site
import socket
import sqlite3
import ssl
import sys
import sysconfig
import textwrap
import time
import tomllib
import urllib.parse
import zlib
import zoneinfo
from collections.abc import (AsyncIterable, AsyncIterator, Awaitable, Callable, Collection,
                             Iterator, Mapping, MutableMapping, Sequence)
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, Unpack, cast
from urllib.parse import urlsplit

import aiosqlite
import click
import cronsim
import dateutil.rrule
import httpcore
import httpx
import icmplib
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

# Imported where they are used: dnspython (DNS and DOMAIN checks), regex and the JSONPath
# package (assertions) and smtplib (EMAIL channels) are not needed by an agent that does not
# run such checks, and importing them would cost it some 7 MB of memory.
if TYPE_CHECKING:
    import dns.asyncresolver
    import jsonpath_rfc9535


# --- Basics ---
#
# The version, logging that never carries secrets, and small helpers every section shares:
# times in Unix milliseconds, percentile ranks, HTML escaping.


VERSION = "1.0.0"
API_VERSION = "v1"
API_PREFIX = "/api/v1"
_T = TypeVar("_T")
log = logging.getLogger("statusapp")

# Logs never carry secrets: a URL keeps its scheme, host and path but loses its user:password@,
# query string and fragment, and a heartbeat id in a path (the CRON monitor's ping secret) is
# hidden.  ``redact`` is applied to every formatted log line, tracebacks included.
_URL_PARTS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^/\s?#@\"'<>]*@)?([^\s?#\"'<>]*)"
                        r"(\?[^\s#\"'<>]*)?(#[^\s\"'<>]*)?")
_HEARTBEAT_PATH = re.compile(r"(/heartbeat/)[^/\s?#\"'<>]+")


def redact(text: str) -> str:
    """``text`` without URL credentials, query strings, fragments or heartbeat ids."""
    text = _URL_PARTS.sub(lambda m: m[1] + m[2] + ("?\u2026" if m[3] or m[4] else ""), text)
    return _HEARTBEAT_PATH.sub("\\1\u2026", text)


class RedactingFormatter(logging.Formatter):
    """The log format, with ``redact`` applied to the whole line."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


HOUR_MS, DAY_MS = 3_600_000, 86_400_000


def unix_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def nearest_rank(count: int, p: float) -> int:
    """The 1-based rank of the p-th percentile among ``count`` sorted values (nearest-rank)."""
    return max(1, math.ceil(p / 100 * count))


_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _esc(text: Any) -> str:
    """Text for HTML or XML: escaped, without the control characters XML forbids."""
    return html.escape(_XML_FORBIDDEN.sub("", str(text)))


# --- Config ---
#
# ``CONFIG`` is the one table of settings: each key's default (whose type is the key's type),
# its range or choices, and the line that documents it.  config.example.toml and the README's
# configuration reference are generated from it (tests keep them equal).  Precedence: CLI
# flag > environment > file > default.


@dataclass(frozen=True)
class Setting:
    """One config key: default (its type is the key's type), bounds or choices, and its doc."""

    default: Any
    doc: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()


PLANS = {"STARTER": 1_000, "PROFESSIONAL": 5_000, "BUSINESS": 10_000, "ENTERPRISE": 100_000}
_DAY = 24 * 3600

CONFIG_SECTIONS: dict[str, str] = {
    "region": "the worker region this process probes from",
    "agents": "remote agents (statusapp agent), one per worker region",
    "smtp": 'EMAIL channels; host "" disables email',
    "regression": "response-time regression detection (monitors with regressionEnabled)",
    "dashboard": "the web dashboard at /",
}

CONFIG: dict[str, dict[str, Setting]] = {
    "server": {
        "host": Setting("127.0.0.1", 'address to listen on; "0.0.0.0" to serve the network'),
        "port": Setting(8080, "TCP port to listen on", 1, 65535),
        "database": Setting("statusapp.db", "the SQLite file; created on first start"),
        "base_url": Setting("", 'public URL, used in heartbeatUrl; "" = http://host:port'),
        "trusted_proxies": Setting([], "proxy IPs whose X-Forwarded-For is believed "
                                       "(client addresses)"),
        "log_level": Setting("info", "how much the server logs",
                             choices=("critical", "error", "warning", "info", "debug")),
        "metrics_token": Setting("", 'GET /metrics also accepts "Authorization: Bearer <this>" '
                                     "when set"),
        "keepalive_timeout": Setting(5, "seconds an idle keep-alive connection stays open after "
                                        "an answer", 1, 3600),
        "header_timeout": Setting(10.0, "seconds a client has to send a request's headers (from "
                                        "connecting or from the previous answer), then as long "
                                        "again for its body; slower or silent clients are closed",
                                  0.1, 3600),
        "max_connections": Setting(1000, "open connections at most; requests beyond get 503; "
                                         "0 = no limit", 0, 1_000_000),
    },
    "account": {
        "plan": Setting("ENTERPRISE", "rate-limit plan of new accounts (API requests an hour: "
                                      "1,000, 5,000, 10,000, 100,000)", choices=tuple(PLANS)),
    },
    "team": {
        "invitation_days": Setting(7, "days an invitation token (POST /team/members) can be "
                                      "accepted", 1, 365),
    },
    "probes": {
        "min_interval": Setting(60, "smallest allowed monitor interval and gracePeriod, "
                                    "in seconds", 1, _DAY),
        "max_concurrency": Setting(200, "checks running at once, across all monitors", 1, 100_000),
        "confirmations": Setting(2, "consecutive failed checks before a monitor goes DOWN", 1, 100),
        "recoveries": Setting(1, "consecutive good checks before a DOWN monitor is UP again",
                              1, 100),
        "retry_delay": Setting(5, "seconds before re-checking after a failure", 0, 3600),
        "ca_bundle": Setting("", "extra CA file (PEM) trusted besides the system store"),
        "dns_nameservers": Setting([], '"host:port" resolvers for DNS checks; '
                                       "[] = the system resolver"),
        "domain_check_hours": Setting(6, "DOMAIN monitors query registries at most this often",
                                      1, 24 * 365),
        "rdap_url": Setting("https://rdap.org", "RDAP service: GET {rdap_url}/domain/{name}"),
        "whois_server": Setting("", 'WHOIS fallback, "host" or "host:port"; "" = none'),
        "blocklists": Setting(["dbl.spamhaus.org"], "domain-name DNS blocklists for DOMAIN "
                                                    "monitors"),
        "local": Setting(True, "false: this server probes nothing itself, only agents do"),
        "max_body_bytes": Setting(1_048_576, "WEBSITE/API checks (and RDAP answers) read at most "
                                             "this much of a body, then close the connection",
                                  1024, 1 << 30),
        "allow_private_targets": Setting(True, "false refuses monitors whose target is, or "
                                               "resolves to, a private, loopback or link-local "
                                               "address (when saved and at every connection)"),
    },
    "region": {
        "id": Setting("local", "region id shown with checks"),
        "city": Setting("Local"),
        "country": Setting("Local"),
        "country_code": Setting("ZZ"),
        "latitude": Setting(0.0, "", -90, 90),
        "longitude": Setting(0.0, "", -180, 180),
    },
    "agents": {
        "inactive_after": Setting(30, "seconds without contact before an agent's region is "
                                      "inactive", 1, _DAY),
    },
    "heartbeat": {
        "pings_per_minute": Setting(5, "per CRON monitor (sliding minute); more get 429; "
                                       "0 = no limit", 0, 1_000_000),
    },
    "notifications": {
        "timeout": Setting(10.0, "seconds per delivery attempt", 0.1, 600),
        "connect_timeout": Setting(3.0, "seconds to connect to a receiver, within timeout",
                                   0.1, 600),
        "attempts": Setting(12, "tries per alert; with the delays below, 12 span about an hour",
                            1, 1000),
        "retry_delay": Setting(10.0, "seconds before the first retry; doubles after each failure,"
                                     " plus up to 25% random jitter", 0, _DAY),
        "retry_max_delay": Setting(600.0, "the longest wait between two tries, in seconds",
                                   0, _DAY),
        "concurrency": Setting(128, "deliveries in flight at once, across all receivers",
                               1, 10_000),
        "per_host": Setting(4, "deliveries in flight at once to one host, so a hung receiver "
                               "holds few slots", 1, 10_000),
        "storm_window": Setting(5.0, "a person-facing channel's alerts are sent as one grouped "
                                     "message once this many seconds pass without another "
                                     "(at most 10 times this after the first); 0 = one message "
                                     "per alert", 0, 3600),
        "storm_names": Setting(20, "monitor names listed in a grouped message", 1, 1000),
        "allow_private_targets": Setting(True, "false refuses channel/webhook URLs that are, or "
                                               "resolve to, private, loopback or link-local "
                                               "addresses (when saved and at every connection)"),
        "telegram_api_url": Setting("https://api.telegram.org"),
        "pagerduty_url": Setting("https://events.pagerduty.com/v2/enqueue"),
        "opsgenie_url": Setting("https://api.opsgenie.com"),
        "twilio_api_url": Setting("https://api.twilio.com", "SMS goes through a "
                                                            "Twilio-compatible API"),
        "pushover_url": Setting("https://api.pushover.net", "PUSHOVER channels post to "
                                                            "{pushover_url}/1/messages.json"),
        "twilio_account_sid": Setting(""),
        "twilio_auth_token": Setting(""),
        "twilio_from": Setting(""),
    },
    "smtp": {
        "host": Setting(""),
        "port": Setting(587, "", 1, 65535),
        "security": Setting("starttls", "", choices=("starttls", "tls", "none")),
        "username": Setting(""),
        "password": Setting(""),
        "sender": Setting("statusapp@localhost"),
    },
    "retention": {
        "raw_days": Setting(7, "raw checks kept this long, then rolled up", 1, 100_000),
        "rollup_days": Setting(400, "daily rollups kept this long (90-day bars, long analytics)",
                               1, 100_000),
        "hourly_days": Setting(35, "hourly rollups kept this long (30d analytics need at "
                                   "least 31)", 1, 100_000),
    },
    "dashboard": {
        "session_days": Setting(14, "a sign-in lasts this long (signing out ends it sooner)",
                                1, 3650),
        "signin_window_minutes": Setting(15, "failed sign-ins are counted over this window...",
                                         1, 100_000),
        "signin_failures_per_account": Setting(5, "...and refused past this many for one "
                                                  "email...", 1, 1_000_000),
        "signin_failures_per_ip": Setting(20, "...or this many from one client address",
                                          1, 1_000_000),
        "refresh_seconds": Setting(30, "the overview and monitor pages refresh this often "
                                       "(JavaScript on)", 1, 86_400),
    },
    "regression": {
        "min_baseline_checks": Setting(30, "no verdict before the baseline has this many UP "
                                           "checks...", 1, 1_000_000),
        "min_current_checks": Setting(5, "...and the current window this many", 1, 1_000_000),
        "current_window_minutes": Setting(15, "the current response time is the average UP "
                                              "check over this window", 1, 100_000),
        "baseline_refresh_minutes": Setting(60, "how often the baseline is recomputed",
                                            1, 100_000),
    },
}

CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    section: {key: spec.default for key, spec in keys.items()} for section, keys in CONFIG.items()}


class ConfigError(Exception):
    """A bad configuration value; its message is one line that names the key."""


def _typed(default: Any, value: Any, from_text: bool) -> Any:
    """``value`` as the type of ``default``; ValueError when it is not one."""
    if isinstance(default, bool):
        low = str(value).strip().lower()
        if from_text and low in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            return low in ("1", "true", "yes", "on")
        if from_text or not isinstance(value, bool):
            raise ValueError
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or (not from_text and not isinstance(value, int)):
            raise ValueError
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not math.isfinite(float(value)):
            raise ValueError
        return float(value)
    if isinstance(default, list):
        if from_text:
            return [v.strip() for v in str(value).split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError
        return value
    if not isinstance(value, str):
        raise ValueError
    return value


def _coerce(section: str, key: str, value: Any, from_text: bool) -> Any:
    """Turn ``value`` into the key's type and range, or raise ConfigError naming the key."""
    spec = CONFIG[section][key]
    name = f"{section}.{key}"
    try:
        value = _typed(spec.default, value, from_text)
    except (ValueError, TypeError, OverflowError):
        kind = type(spec.default).__name__
        raise ConfigError(f"config: {name} must be a {kind}, got {value!r}") from None
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"config: {name} must be one of {', '.join(spec.choices)}, "
                          f"got {value!r}")
    if (spec.low is not None and value < spec.low) or (spec.high is not None
                                                       and value > spec.high):
        raise ConfigError(f"config: {name} must be between {_num(spec.low)} and "
                          f"{_num(spec.high)}, got {value!r}")
    return value


def _num(value: float | None) -> str:
    return f"{value:,}" if value is None or value != int(value) else f"{int(value):,}"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    """A value in TOML (the subset config.example.toml and export use: no dates, tables
    inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    pairs = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
    return "{ " + pairs + " }" if pairs else "{}"


def _setting_note(spec: Setting) -> str:
    """A key's doc with its range or choices, as the example file and README show it."""
    limits = (", ".join(spec.choices) if spec.choices else
              f"{_num(spec.low)} to {_num(spec.high)}" if spec.low is not None else "")
    return f"{spec.doc} ({limits})".strip() if limits else spec.doc


def example_config() -> str:
    """config.example.toml, generated from CONFIG."""
    lines = ["# StatusApp configuration.  Every key is optional: the values below are the "
             "defaults.",
             "# Each key can also be set from the environment as STATUSAPP_<SECTION>_<KEY>, "
             "for example",
             "# STATUSAPP_SERVER_PORT=9000; lists are comma-separated there.  Precedence:",
             "# command-line flag > environment variable > this file > default.  A value of "
             "the wrong",
             "# type or out of range stops start-up with one line naming the key.",
             "# Use it with:  statusapp serve --config config.toml   "
             "(or STATUSAPP_CONFIG=config.toml)"]
    for section, keys in CONFIG.items():
        doc = CONFIG_SECTIONS.get(section)
        lines += ["", f"[{section}]" + (f"  # {doc}" if doc else "")]
        for key, spec in keys.items():
            line, notes = f"{key} = {_toml_value(spec.default)}", _setting_note(spec)
            first, *more = textwrap.wrap(notes, 68) or [""]
            lines.append(f"{line:<29} # {first}".rstrip(" #") if len(line) < 30 or not first
                         else f"{line}  # {first}")
            lines += [f"{'':<29} # {note}" for note in more]
    return "\n".join(lines) + "\n"


def config_reference() -> str:
    """The README's configuration table, generated from CONFIG."""
    rows = ["| Key | Default | Meaning and range |", "|---|---|---|"]
    rows += [f"| `{section}.{key}` | `{_toml_value(spec.default)}` | {_setting_note(spec)} |"
             for section, keys in CONFIG.items() for key, spec in keys.items()]
    return "\n".join(rows)


def load_config(path: str | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                environ: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Merge defaults, a TOML file, ``STATUSAPP_<SECTION>_<KEY>`` variables and overrides."""
    environ = os.environ if environ is None else environ
    cfg = {section: dict(keys) for section, keys in CONFIG_DEFAULTS.items()}
    path = path or environ.get("STATUSAPP_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
        for section, keys in data.items():
            if section not in cfg or not isinstance(keys, dict):
                raise ConfigError(f"config: unknown section [{section}] in {path}")
            for key, value in keys.items():
                if key not in cfg[section]:
                    raise ConfigError(f"config: unknown key {section}.{key} in {path}")
                cfg[section][key] = _coerce(section, key, value, from_text=False)
    for section, keys in cfg.items():
        for key in keys:
            env_name = f"STATUSAPP_{section}_{key}".upper()
            if env_name in environ:
                keys[key] = _coerce(section, key, environ[env_name], from_text=True)
    for section, keys in (overrides or {}).items():
        for key, value in keys.items():
            if value is not None:
                cfg[section][key] = _coerce(section, key, value, from_text=False)
    if not cfg["server"]["base_url"]:
        cfg["server"]["base_url"] = f"http://{cfg['server']['host']}:{cfg['server']['port']}"
    cfg["server"]["base_url"] = cfg["server"]["base_url"].rstrip("/")
    return cfg


# --- Errors ---


class ApiError(Exception):
    """An error the client should see: HTTP status, spec error code, message and details."""

    status = 500
    code = "INTERNAL_SERVER_ERROR"

    def __init__(self, message: str, details: Any = None, *, status: int | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.status = status or self.status
        self.code = code or self.code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The spec's error shape: ``{"error", "code", "details"}``."""
        return {"error": self.message, "code": self.code, "details": self.details}


class BadRequest(ApiError):
    status, code = 400, "BAD_REQUEST"


class ValidationFailed(BadRequest):
    """A 400 whose ``error`` is the spec's list of field issues."""

    def __init__(self, issues: list[dict[str, Any]]) -> None:
        first = issues[0]
        where = ".".join(str(p) for p in first["path"]) or "body"
        super().__init__(f"{where}: {first['message']}", f"{len(issues)} validation issue(s)")
        self.issues = issues

    def body(self) -> dict[str, Any]:
        return {"error": self.issues, "code": self.code, "details": self.message}


class Unauthorized(ApiError):
    status, code = 401, "UNAUTHORIZED"


class Forbidden(ApiError):
    status, code = 403, "FORBIDDEN"


class NotFound(ApiError):
    status, code = 404, "NOT_FOUND"


class MethodNotAllowed(ApiError):
    status, code = 405, "METHOD_NOT_ALLOWED"


class Conflict(ApiError):
    status, code = 409, "CONFLICT"


class Gone(ApiError):
    status, code = 410, "GONE"


class PayloadTooLarge(ApiError):
    status, code = 413, "PAYLOAD_TOO_LARGE"


class RateLimited(ApiError):
    status, code = 429, "RATE_LIMIT_EXCEEDED"


class ServiceUnavailable(ApiError):
    status, code = 503, "SERVICE_UNAVAILABLE"


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# --- Storage ---
#
# One writer connection, guarded by a lock, takes every write.  Small writes from hot paths
# (check results, heartbeat pings, usage counters) are queued and group-committed: the writer
# drains the queue into one transaction, so a thousand pings cost one fsync, not a thousand.
# Reads use their own connections; in WAL mode they never wait for the writer.  A commit that
# inserted into a watched table (``wake_on_insert``) sets that table's event, however the row got
# there, so no writer has to remember to wake the service that consumes it.

_MIGRATION_HEADER = re.compile(r"^-- migration (\d+):.*$", re.MULTILINE)
Statement = tuple[str, Sequence[Any]]
_IN_IDS = "IN (SELECT value FROM json_each(?))"  # with a JSON array of ids as the parameter


def now_ms() -> int:
    """The current time as Unix milliseconds, the unit of every stored timestamp."""
    return int(time.time() * 1000)


def iso(ms: int | None) -> str | None:
    """Unix milliseconds as the API's ISO-8601 UTC form, e.g. ``2025-01-21T10:30:00Z``."""
    return None if ms is None else _iso_second(ms // 1000)


@functools.lru_cache(maxsize=16_384)
def _iso_second(second: int) -> str:
    """A Unix second as ISO-8601 UTC (cached: listings repeat the same times)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


def new_id(prefix: str) -> str:
    """A short random id with a readable prefix (``mon_``, ``inc_``...)."""
    return f"{prefix}_{secrets.token_hex(8)}"


def log_failure(message: str, *args: Any) -> None:
    """Log the exception being handled, with its traceback, unless it is a storage failure:
    the Database logs those itself, one line per cause a minute."""
    if storage_cause(sys.exc_info()[1] or Exception()) is None:
        log.exception(message, *args)


async def repeat(seconds: float, job: Callable[[], Awaitable[Any]], *, first: bool = False) -> None:
    """Run ``job`` every ``seconds`` until cancelled (at once too when ``first``); a failure is
    logged and the next round goes ahead, so one bad round never stops background work."""
    if not first:
        await asyncio.sleep(seconds)
    while True:
        try:
            await job()
        except Exception:
            log_failure("background job %s failed", getattr(job, "__name__", job))
        await asyncio.sleep(seconds)


class SingleFlight:
    """Concurrent callers asking for one key share one computation (and its error)."""

    def __init__(self) -> None:
        self._flights: dict[Any, asyncio.Future[Any]] = {}

    def running(self, key: Any) -> bool:
        return key in self._flights

    async def run(self, key: Any, compute: Callable[[], Awaitable[_T]]) -> _T:
        if key in self._flights:
            result: _T = await asyncio.shield(self._flights[key])
            return result
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        try:
            value = await compute()
        except asyncio.CancelledError:
            flight.cancel()
            raise
        except Exception as exc:
            flight.set_exception(exc)
            flight.exception()  # retrieved: waiters re-raise it, and none need not
            raise
        finally:
            del self._flights[key]
        flight.set_result(value)
        return value


def schema_path() -> Path:
    """Where schema.sql is: beside this module in a checkout, under share/ once installed."""
    candidates = [Path(__file__).with_name("schema.sql")]
    for base in {sys.prefix, sysconfig.get_path("data"), site.getuserbase()}:
        candidates.append(Path(base) / "share" / "statusapp" / "schema.sql")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError("schema.sql not found beside statusapp.py or in share/statusapp")


def load_migrations(text: str | None = None) -> dict[int, str]:
    """Split schema.sql into its numbered migration blocks."""
    text = schema_path().read_text() if text is None else text
    marks = list(_MIGRATION_HEADER.finditer(text))
    blocks = {}
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        blocks[int(mark.group(1))] = text[mark.start():end]
    if sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise RuntimeError("schema.sql migrations must be numbered 1, 2, 3... without gaps")
    return blocks


# SQLite failures that are the storage's state, not a bug: clients get 503 with Retry-After,
# the log one line per cause and minute, /health "unhealthy" until a write succeeds again.
STORAGE_CAUSES = {"SQLITE_FULL": "the disk is full", "SQLITE_BUSY": "the database is locked",
                  "SQLITE_LOCKED": "the database is locked",
                  "SQLITE_READONLY": "the database is read-only",
                  "SQLITE_IOERR": "disk I/O error", "SQLITE_CANTOPEN": "cannot open the database"}
STORAGE_LOG_EVERY = 60.0
STORAGE_RETRY_AFTER = "5"
WRITE_LINGER = 0.5  # seconds queued check results wait for company before their commit
CHECKPOINT_ROWS = 1000  # rows written between WAL checkpoints (SQLite's own: 1,000 pages)
CHECKPOINT_EVERY = 1.0  # seconds: at most one checkpoint
WAL_KEEP_BYTES = 32 * 1024 * 1024  # a WAL started over is cut back to this size (SD cards)


def storage_cause(exc: BaseException) -> str | None:
    """What is wrong with the storage when ``exc`` (or its cause) says so, else None."""
    for error in _exception_chain(exc):
        name = getattr(error, "sqlite_errorname", "") or ""
        for prefix, cause in STORAGE_CAUSES.items():
            if name == prefix or name.startswith(prefix + "_"):
                return cause
    return None


def present(row: sqlite3.Row | None) -> sqlite3.Row:
    """A row the query cannot miss; a missing one is a bug, raised as such."""
    if row is None:
        raise LookupError("a query that always returns a row returned none")
    return row


@dataclass(slots=True)
class _Queued:
    """A write waiting for the next group commit: its statements, the future its writer
    awaits (None: nobody waits), and whether it is small (see Database._commit)."""

    statements: list[Statement]
    future: asyncio.Future[None] | None
    small: bool


class Database:
    """The SQLite file: migrations on open, a group-committing writer and read connections."""

    def __init__(self, path: str, readers: int = 2) -> None:
        self.path = path
        self._reader_count = readers
        self._readers: list[aiosqlite.Connection] = []
        self._next_reader = 0
        self._writer: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._queue: list[_Queued] = []
        self._queue_event = asyncio.Event()
        self._waited_on = asyncio.Event()  # a write() is queued: commit now
        self._writer_task: asyncio.Task[None] | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._written = asyncio.Event()  # rows were written since the checkpointer looked
        self.failing: str | None = None  # why the last commit failed, until one succeeds
        self.commits = 0  # commits that changed something, by this process (a data version)
        self._logged: dict[str, float] = {}
        self._wakes: dict[str, asyncio.Event] = {}  # table -> set after a commit inserted into it
        self._inserted: set[str] = set()  # watched tables inserted into by the open transaction

    def storage_error(self, exc: BaseException) -> ServiceUnavailable | None:
        """A storage failure as the 503 clients get, logged once a minute per cause."""
        cause = storage_cause(exc)
        if cause is None:
            return None
        now = time.monotonic()
        if now - self._logged.get(cause, -STORAGE_LOG_EVERY) >= STORAGE_LOG_EVERY:
            self._logged[cause] = now
            log.error("storage: %s (%s: %s); answering 503 meanwhile", cause,
                      os.path.abspath(self.path), exc)
        return ServiceUnavailable(f"Storage unavailable: {cause}", "retry later",
                                  headers={"Retry-After": STORAGE_RETRY_AFTER})

    async def _connect(self) -> aiosqlite.Connection:
        # check_same_thread: the writer also commits small batches on the loop's thread (_commit)
        conn = await aiosqlite.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        try:
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000",
                           "foreign_keys=ON"):
                await conn.execute(f"PRAGMA {pragma}")
        except BaseException:
            await conn.close()  # its thread would otherwise keep the process alive
            raise
        return conn

    async def open(self, upto: int | None = None) -> None:
        """Connect, bring the schema up to date (or to ``upto``) and start the writer."""
        self._writer = await self._connect()
        try:
            await self.migrate(upto)
            await self._watch_inserts()
            for _ in range(self._reader_count):
                self._readers.append(await self._connect())
                await self._readers[-1].execute("PRAGMA query_only=ON")
            await self._writer.execute("PRAGMA wal_autocheckpoint=0")  # see _checkpoint_loop
            await self._writer.execute(f"PRAGMA journal_size_limit={int(WAL_KEEP_BYTES)}")
            self._checkpointer = await self._connect()
        except BaseException:
            await self.close()
            raise
        self._writer_task = asyncio.create_task(self._write_loop())
        self._checkpoint_task = asyncio.create_task(self._checkpoint_loop())

    async def close(self) -> None:
        """Commit what is queued, then close every connection."""
        if self._checkpoint_task:
            self._checkpoint_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoint_task
        if self._writer_task:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            await self._flush()
        for conn in [*self._readers, self._checkpointer, self._writer]:
            if conn is not None:
                await conn.close()
        self._readers, self._checkpointer, self._writer = [], None, None

    def wake_on_insert(self, table: str, event: asyncio.Event) -> None:
        """Set ``event`` after every commit that inserted a row into ``table`` (before open())."""
        self._wakes[table] = event

    async def _watch_inserts(self) -> None:
        """A TEMP trigger per watched table, on the writer connection only (no schema change,
        other processes unaffected), notes the insert in the writer's thread."""
        assert self._writer is not None
        if not self._wakes:
            return
        await self._writer.create_function("statusapp_inserted", 1, self._inserted.add)
        for table in self._wakes:
            await self._writer.execute(
                f"CREATE TEMP TRIGGER IF NOT EXISTS inserted_{table} AFTER INSERT ON main.{table}"
                f" BEGIN SELECT statusapp_inserted('{table}'); END")

    async def version(self) -> int:
        assert self._writer is not None
        await self._writer.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        rows = list(await self._writer.execute_fetchall("SELECT version FROM schema_version"))
        return rows[0][0] if rows else 0

    async def migrate(self, upto: int | None = None) -> int:
        """Apply the migrations above the stored version, each in its own transaction."""
        assert self._writer is not None
        blocks = load_migrations()
        current = await self.version()
        target = max(blocks) if upto is None else upto
        if current > max(blocks):
            raise RuntimeError(f"database schema version {current} is newer than this "
                               f"StatusApp ({max(blocks)}); upgrade StatusApp")
        async with self._lock:
            for number in range(current + 1, target + 1):
                script = (f"BEGIN IMMEDIATE;\n{blocks[number]}\nDELETE FROM schema_version;\n"
                          f"INSERT INTO schema_version VALUES ({int(number)});\nCOMMIT;")
                try:
                    await self._writer.executescript(script)
                except sqlite3.Error:
                    if self._writer.in_transaction:
                        await self._writer.execute("ROLLBACK")
                    raise
        return target

    # Reads

    def _reader(self) -> aiosqlite.Connection:
        self._next_reader = (self._next_reader + 1) % len(self._readers)
        return self._readers[self._next_reader]

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return list(await self._reader().execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row:
        """The first row of a query that always has one (an aggregate, or a row just written)."""
        return present(await self.fetchone(sql, params))

    async def fetchval(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else row[0]

    # Writes

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """Exclusive use of the writer for a multi-step write: BEGIN IMMEDIATE ... COMMIT."""
        assert self._writer is not None
        async with self._lock:
            changes = self._writer.total_changes
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
                yield self._writer
                await self._writer.execute("COMMIT")
            except BaseException as exc:
                # Also when cancelled while BEGIN was still running on the connection's thread.
                with contextlib.suppress(sqlite3.Error):
                    await self._writer.execute("ROLLBACK")
                self._inserted.clear()
                if self.storage_error(exc):
                    self.failing = storage_cause(exc)
                raise
            if self._writer.total_changes > changes:
                self._note_commit()

    async def write(self, statements: list[Statement], small: bool = False) -> None:
        """Queue statements for the next group commit and wait until they are durable;
        ``small``: a few rows found by key (a heartbeat ping), see _commit."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(statements, future, small))
        self._queue_event.set()
        self._waited_on.set()
        await future

    def write_later(self, statements: list[Statement]) -> None:
        """Queue statements for the next group commit without waiting (check results)."""
        self._queue.append(_Queued(statements, None, False))
        self._queue_event.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _write_loop(self) -> None:
        """Commit what is queued: for a write() someone waits on, after one more turn of the
        event loop, so that the requests read in that turn join the commit (32 clients pinging
        at once: 16 pings per commit instead of 10, each 7 % cheaper); else after
        WRITE_LINGER, so the checks of that half second share one transaction."""
        while True:
            await self._queue_event.wait()
            if not self._waited_on.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WRITE_LINGER):
                        await self._waited_on.wait()
            await asyncio.sleep(0)  # the turn: its poll reads what the clients sent meanwhile
            self._queue_event.clear()
            self._waited_on.clear()
            await self._flush()

    async def _flush(self) -> None:
        """Commit everything queued in one transaction; on failure retry item by item."""
        batch, self._queue = self._queue, []
        if not batch:
            return
        try:
            await self._commit([q.statements for q in batch], all(q.small for q in batch))
        except Exception:
            for q in batch:
                try:
                    await self._commit([q.statements], q.small)
                except Exception as exc:
                    if not self.storage_error(exc):
                        log.warning("dropped a queued write: %s", exc)
                    if q.future and not q.future.done():
                        q.future.set_exception(exc)
                else:
                    if q.future and not q.future.done():
                        q.future.set_result(None)
            return
        for q in batch:
            if q.future and not q.future.done():
                q.future.set_result(None)

    async def _commit(self, items: list[list[Statement]], small: bool = False) -> None:
        """Queued items in one transaction (BEGIN, the statements, COMMIT): when all are small,
        right here on the event loop's thread (see _commit_here); else, or when another
        process holds the write lock, by the writer's thread in one hand-off."""
        assert self._writer is not None
        async with self._lock:
            try:
                changed = self._commit_here(items) if small else None
                if changed is None:
                    # _execute: aiosqlite's own way to run a function on the connection's thread
                    changed = await self._writer._execute(_commit_grouped, self._writer._conn,
                                                          items)
            except BaseException as exc:
                self._inserted.clear()
                if self.storage_error(exc):
                    self.failing = storage_cause(exc)
                raise
            if changed:
                self._note_commit()

    def _commit_here(self, items: list[list[Statement]]) -> bool | None:
        """Commit small writes on the event loop's thread: a batch of 16 pings takes 0.7-0.9 ms,
        and handed to the writer's thread it first waited about 0.55 ms for that thread to get
        the GIL while the loop was busy answering (committed here, a ping costs about a tenth
        less CPU).  Whether anything changed; None, with nothing done, when another process
        holds the write lock, for waiting on it here would stop the whole server."""
        assert self._writer is not None
        conn = self._writer._conn
        waits = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            return _commit_grouped(conn, items)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_BUSY and not conn.in_transaction:
                return None
            raise
        finally:
            conn.execute(f"PRAGMA busy_timeout = {waits}")

    def _note_commit(self) -> None:
        """A commit changed something: the storage works, the data has a new version, the
        checkpointer may have work, and the consumers of the tables it inserted into wake."""
        self.failing = None
        self.commits += 1
        self._written.set()
        for table in self._inserted:
            self._wakes[table].set()
        self._inserted.clear()

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL back into the database file from a connection of its own (the writer's
        automatic checkpoints are off), so that no commit waits for a checkpoint and its
        fsyncs: once CHECKPOINT_ROWS rows were written, at most every CHECKPOINT_EVERY seconds;
        an idle server does nothing.  PASSIVE: it never blocks the readers, and the writer only
        while it copies what commits added during the first pass (see _CHECKPOINT)."""
        assert self._writer is not None and self._checkpointer is not None
        done = self._writer.total_changes
        while True:
            await self._written.wait()
            self._written.clear()
            if self._writer.total_changes - done < CHECKPOINT_ROWS:
                continue
            done = self._writer.total_changes
            try:
                await self._checkpointer.execute(_CHECKPOINT)
                async with self._lock:  # what the commits made meanwhile: see _CHECKPOINT
                    await self._checkpointer.execute(_CHECKPOINT)
            except sqlite3.Error as exc:
                if not self.storage_error(exc):
                    log.warning("WAL checkpoint failed: %s", exc)
            await asyncio.sleep(CHECKPOINT_EVERY)


# Under steady writes a checkpoint never copies the whole WAL (commits go on while it runs), so
# the WAL never starts over and grows without end (hundreds of MB under the heartbeat bench;
# each commit costs more as SQLite looks pages up in a larger WAL index).  So a second
# checkpoint copies what the commits added meanwhile (a few pages) while it holds the writer's
# lock, and the next commit starts the WAL over from its beginning.
_CHECKPOINT = "PRAGMA wal_checkpoint(PASSIVE)"


def grouped(items: list[list[Statement]]) -> Iterator[tuple[str, list[Sequence[Any]]]]:
    """Independent writes merged by shape: one (statement, rows) per executemany; items of one
    shape run together ahead of a later item of another shape, each item's own statements in
    their order."""
    shapes: dict[tuple[str, ...], list[list[Statement]]] = {}
    for item in items:
        shapes.setdefault(tuple(sql for sql, _ in item), []).append(item)
    for shape, group in shapes.items():
        for position, sql in enumerate(shape):
            yield sql, [item[position][1] for item in group]


def _commit_grouped(conn: sqlite3.Connection, items: list[list[Statement]]) -> bool:
    """BEGIN IMMEDIATE, the items merged by shape (``grouped``), COMMIT (ROLLBACK if anything
    fails); whether anything changed.  Run by the writer's thread, or for a batch of small
    writes by the event loop's (Database._commit)."""
    changes = conn.total_changes
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in grouped(items):
            conn.executemany(sql, rows)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return conn.total_changes > changes


class WorkerRegion(TypedDict):
    """A worker_regions row: a place checks run from (the server's own region or an agent's)."""

    id: str
    city: str
    country: str
    country_code: str
    latitude: float
    longitude: float
    is_active: int
    name: str | None
    token_hash: str | None  # an agent's; None for the server's own region
    last_seen_at: int | None
    gone_at: int | None
    created_at: int | None


def worker_region(row: sqlite3.Row) -> WorkerRegion:
    return cast(WorkerRegion, dict(row))


# Backups.  A backup is one read snapshot written by VACUUM INTO (WAL readers never block the
# writer, so the server keeps running); a restore replaces the file only while nothing holds
# the database open, after the copy passes the integrity check and has a schema we know.


class StorageError(Exception):
    """A backup or restore that cannot go ahead; the message says why."""


def check_database(path: str) -> int:
    """The schema version of the database file at ``path`` once it passes ``PRAGMA
    integrity_check`` and is not newer than this StatusApp; StorageError otherwise."""
    if not os.path.isfile(path):
        raise StorageError(f"{path}: no such file")
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            verdict = [row[0] for row in conn.execute("PRAGMA integrity_check")]
            if verdict != ["ok"]:
                raise StorageError(f"{path} fails the integrity check: {'; '.join(verdict[:3])}")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"{path} is not a StatusApp database: {exc}") from None
    latest = max(load_migrations())
    if row is None or not 1 <= row[0] <= latest:
        raise StorageError(f"{path} has schema version {row and row[0]}; this StatusApp "
                           f"knows 1 to {latest}")
    return int(row[0])


def backup_database(source: str, target: str) -> int:
    """Copy the live database at ``source`` to ``target`` (via a checked ``.part`` file renamed
    into place) and return the copy's schema version."""
    if not os.path.isfile(source):
        raise StorageError(f"{source}: no such database")
    part = f"{target}.part"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(part)
    with contextlib.closing(sqlite3.connect(source, timeout=30)) as conn:
        conn.execute("VACUUM INTO ?", (part,))
    try:
        version = check_database(part)
    except StorageError:
        os.unlink(part)
        raise
    os.replace(part, target)
    return version


def _same_owner(model: str, path: str) -> None:
    """Give ``path`` the mode and (where we may) the owner of ``model``."""
    info = os.stat(model)
    os.chmod(path, info.st_mode & 0o7777)
    with contextlib.suppress(PermissionError):
        os.chown(path, info.st_uid, info.st_gid)


def restore_database(target: str, backup: str) -> int:
    """Put the checked ``backup`` in place of ``target`` and return its schema version.

    Refused while anything (a running server) has ``target`` open: an exclusive lock needs
    every other connection closed.  The copy goes through the backup API into a ``.part``
    file beside ``target`` that takes the database file's owner and mode (a restore run as
    root must leave a file the service user can write), then one rename replaces it."""
    version = check_database(backup)
    part = f"{target}.part"
    with contextlib.closing(sqlite3.connect(target, timeout=0, isolation_level=None)) as lock:
        try:
            lock.execute("PRAGMA locking_mode=EXCLUSIVE")
            lock.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError:
            raise StorageError(f"{target} is in use: stop the server first") from None
        with contextlib.closing(sqlite3.connect(backup)) as src, \
                contextlib.closing(sqlite3.connect(part)) as dst:
            src.backup(dst)
        _same_owner(target, part)
        lock.execute("ROLLBACK")
    for stale in (f"{target}-wal", f"{target}-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    os.replace(part, target)
    return version


# --- Validation ---
#
# Each resource is described once, as a tuple of ``Field``s.  ``validate`` turns a request body
# into clean values (defaults applied) or a ValidationFailed carrying zod-style issues, the
# shape the spec shows; the same tables map fields to columns and feed the README's reference.

_KIND_OF = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}


class ValidationEnv(TypedDict, total=False):
    """What a Field's ``check`` may consult besides the record: the config, the worker regions
    and channel and monitor ids it may name, the JSON path of the value being checked, the
    stored resource an update merges into, and a monitor's stored inline channels."""

    cfg: dict[str, dict[str, Any]]
    regions: Collection[str]
    channels: Collection[str]
    monitors: Collection[str]
    path: tuple[Any, ...]
    existing: dict[str, Any]
    inline: list[dict[str, Any]]
    markers: bool  # read-only markers may be written (a request from ``statusapp apply``)


class _Issue(Exception):
    """One problem with one value, raised by a Field's ``check``."""

    def __init__(self, message: str, code: str = "custom", **extra: Any) -> None:
        super().__init__(message)
        self.issue = {"code": code, **extra, "message": message}


def _non_finite(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` for what clients send, raising ValueError for anything that could not be
    stored or echoed back: invalid UTF-8, NaN/Infinity, numbers that overflow a float, lone
    UTF-16 surrogates (SQLite and the response encoder refuse them) and runaway nesting."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        value = json.loads(text, parse_constant=_non_finite, parse_float=_finite)
        if "\\u" in text:
            json.dumps(value, ensure_ascii=False).encode()
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeEncodeError:
        raise ValueError("JSON string with an unpaired UTF-16 surrogate escape") from None
    return value


@dataclass(frozen=True)
class Field:
    """One field of a resource: its JSON kind, presence rules, default, bounds and use.

    ``required`` is True, or the values of the resource's kind field (a monitor's ``type``)
    that require it.  ``secret`` is True, or the kinds for which the value is secret.
    ``minimum``/``maximum`` bound integers, and string lengths; either may name a config key
    ("probes.min_interval").  ``check(value, record, env)`` validates what bounds cannot, and
    returns the clean value.  ``kinds`` says which resource kinds use it.  A ``read_only`` field
    is a marker only ``statusapp apply`` writes: other requests' values for it are ignored.
    ``ids_of`` says an array holds ids of the team's ``"monitors"`` (the dashboard offers them
    by name); ``unset`` says, in words, what a null or absent value means.
    """

    name: str
    kind: str
    required: bool | Collection[str] = False
    default: Any = None
    minimum: int | str | None = None
    maximum: int | str | None = None
    choices: Collection[str] | None = None
    check: Callable[[Any, dict[str, Any], ValidationEnv], Any] | None = None
    kinds: tuple[str, ...] | None = None
    doc: str = ""
    secret: bool | tuple[str, ...] = ()
    items: str | None = None  # an array's element kind
    read_only: bool = False
    ids_of: str | None = None
    unset: str = ""

    @functools.cached_property
    def column(self) -> str:
        """The field's SQL column: ``camelCase`` -> ``camel_case`` (computed once per field)."""
        return _snake_case(self.name)

    def required_for(self, kind: str | None) -> bool:
        """Whether a resource of ``kind`` must give this field."""
        if isinstance(self.required, bool):
            return self.required
        return kind is not None and kind in self.required

    def secret_for(self, kind: str | None) -> bool:
        """Whether this field's value is secret in a resource of ``kind``."""
        if isinstance(self.secret, bool):
            return self.secret
        return kind in self.secret


@functools.cache
def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _kind(value: Any) -> str:
    return _KIND_OF.get(type(value), "unknown")


def _fits(kind: str, value: Any) -> bool:
    """Whether a value is of a Field kind (an integer is a number too)."""
    return _kind(value) == kind or (kind == "number" and _kind(value) == "integer")


def zod_type(kind: str) -> str:
    """A kind as zod names it in issues: zod has no integer type, integers are numbers."""
    return "number" if kind == "integer" else kind


def type_issue(kind: str, value: Any) -> dict[str, Any]:
    """zod's invalid_type issue (without its path) for a value that is not of ``kind``."""
    expected, received = zod_type(kind), zod_type(_kind(value))
    return {"code": "invalid_type", "expected": expected, "received": received,
            "message": f"Expected {expected}, received {received}"}


def _valid_items(field: Field, value: list[Any], env: ValidationEnv) -> None:
    """An array's elements must each be of the field's ``items`` kind."""
    issues = [{**type_issue(field.items, item), "path": [*env["path"], i]}
              for i, item in enumerate(value) if field.items and not _fits(field.items, item)]
    if issues:
        raise ValidationFailed(issues)


def _bound(bound: int | str | None, cfg: dict[str, Any]) -> int | None:
    if isinstance(bound, str):
        section, key = bound.split(".")
        return cfg[section][key]
    return bound


def _validate_one(field: Field, value: Any, record: dict[str, Any], env: ValidationEnv) -> Any:
    """Validate one present value against its field; return the clean value or raise _Issue."""
    if value is None:
        return None
    if not _fits(field.kind, value):
        if field.kind == "integer" and _kind(value) == "number":
            raise _Issue("Expected integer, received float", "invalid_type",
                         expected="integer", received="float")
        issue = type_issue(field.kind, value)
        raise _Issue(issue.pop("message"), **issue)
    if field.kind == "array":
        _valid_items(field, value, env)
    if field.choices is not None and value not in field.choices:
        options = " | ".join(f"'{c}'" for c in field.choices)
        raise _Issue(f"Invalid enum value. Expected {options}, received '{value}'",
                     "invalid_enum_value", options=list(field.choices), received=value)
    cfg = env["cfg"]
    low, high = _bound(field.minimum, cfg), _bound(field.maximum, cfg)
    size = len(value) if field.kind in ("string", "array") else value
    noun = {"string": "character(s)", "array": "element(s)"}.get(field.kind)
    kind = "number" if field.kind in ("integer", "number") else field.kind
    if low is not None and size < low:
        text = (f"{field.kind.capitalize()} must contain at least {low} {noun}" if noun
                else f"Number must be greater than or equal to {low}")
        raise _Issue(text, "too_small", minimum=low, type=kind, inclusive=True, exact=False)
    if high is not None and size > high:
        text = (f"{field.kind.capitalize()} must contain at most {high} {noun}" if noun
                else f"Number must be less than or equal to {high}")
        raise _Issue(text, "too_big", maximum=high, type=kind, inclusive=True, exact=False)
    return field.check(value, record, env) if field.check else value


def validate(fields: Sequence[Field], data: Any, env: ValidationEnv, *,
             existing: dict[str, Any] | None = None, kind_field: str = "type",
             kind: str | None = None, path: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Validate ``data`` against ``fields`` and return the clean values.

    Without ``existing`` this is a create: absent fields take their defaults and required
    fields must be present.  A null sets a field to its default (None when it has none).  With
    ``existing`` (the stored record) only the given fields are returned, but presence rules are
    checked on the merged record.  Unknown keys are ignored, and so are read-only fields unless
    ``env["markers"]`` (a request from ``statusapp apply``).
    """
    if not isinstance(data, dict):
        raise ValidationFailed([{**type_issue("object", data), "path": list(path)}])
    if not env.get("markers"):  # read-only markers come only from `statusapp apply`
        ignored = {spec.name for spec in fields if spec.read_only}
        data = {k: v for k, v in data.items() if k not in ignored}
    issues: list[dict[str, Any]] = []
    clean: dict[str, Any] = {}
    for spec in fields:
        if spec.name in data and data[spec.name] is not None:
            clean[spec.name] = data[spec.name]
        elif spec.name in data or existing is None:  # null for a field with a default: that default
            clean[spec.name] = copy.deepcopy(spec.default)
    record = {**(existing or {}), **clean}
    # What checks see of the other fields: values of the wrong kind are absent (None).
    sound = {**record, **dict.fromkeys(spec.name for spec in fields if record.get(
        spec.name) is not None and not _fits(spec.kind, record[spec.name]))}
    if kind is None:
        kind = sound.get(kind_field) if isinstance(sound.get(kind_field), str) else None
    for spec in fields:
        value = record.get(spec.name)
        if value is None and spec.required_for(kind):
            received = "null" if spec.name in data else "undefined"
            issues.append({"code": "invalid_type", "expected": zod_type(spec.kind),
                           "received": received,
                           "path": [*path, spec.name], "message": "Required"})
            continue
        given = spec.name in clean
        if not given and not (spec.check and value is not None):
            continue  # unchanged, and nothing else it depends on can have changed its validity
        try:
            checked = _validate_one(spec, value, sound, {**env, "path": (*path, spec.name)})
        except _Issue as exc:
            issues.append({**exc.issue, "path": [*path, spec.name]})
        except ValidationFailed as exc:
            issues.extend(exc.issues)
        else:
            if given:
                clean[spec.name] = checked
    if issues:
        raise ValidationFailed(issues)
    return clean


def parse_query(fields: Sequence[Field], request: Request, env: ValidationEnv) -> dict[str, Any]:
    """Validate query-string parameters with the same Field tables (integers parsed first)."""
    data: dict[str, Any] = {}
    for spec in fields:
        raw = request.query_params.get(spec.name)
        if raw is None:
            continue
        if spec.kind == "integer":
            try:
                data[spec.name] = int(raw)
            except ValueError:
                data[spec.name] = raw
        else:
            data[spec.name] = raw
    return validate(fields, data, env, kind="query")


def _url(value: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise _Issue(f"Invalid url: expected an absolute {' or '.join(schemes)} URL",
                     validation="url")
    return value


def valid_url(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """An absolute http(s) URL."""
    return _url(value)


def _hostname(value: str) -> str:
    host = value.strip()
    if "://" in host:
        host = urllib.parse.urlsplit(host).hostname or ""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host.strip("[]")))
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(
            re.fullmatch(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)", label) for label in labels):
        raise _Issue("Invalid host: expected a hostname, an IP address or a URL")
    return host


def valid_monitor_url(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """What ``url`` must be depends on the monitor type (see MONITOR_TYPES)."""
    kind = record.get("type")
    declared = MONITOR_TYPES.get(kind) if isinstance(kind, str) else None
    rule = declared.url_rule if declared else "http"
    if rule == "http":
        return _url(value)
    if rule == "https":
        return _url(value, ("https",))
    if rule == "host":
        _hostname(value)
    return value.strip()


def valid_json_headers(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """``requestHeaders`` is a JSON string of an object of string values."""
    try:
        headers = parse_json(value)
    except ValueError:
        raise _Issue("requestHeaders must be a JSON string of an object") from None
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise _Issue("requestHeaders must be a JSON object of string header values")
    return value


def valid_expected_ip(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """An IP address for A/AAAA records; any answer text for the other record types."""
    if record.get("dnsRecord") in ("A", "AAAA"):
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise _Issue("expectedIp must be an IP address for A and AAAA records") from None
        if (addr.version == 4) != (record["dnsRecord"] == "A"):
            raise _Issue(f"expectedIp is not an IPv{4 if record['dnsRecord'] == 'A' else 6} "
                         "address")
        return str(addr)
    return value


def valid_regions(value: list[Any], record: dict[str, Any], env: ValidationEnv) -> list[str]:
    """Every id must name an existing worker region (active or not)."""
    unknown = [v for v in value if v not in env["regions"]]
    if unknown:
        raise _Issue(f"Unknown worker region id(s): {', '.join(map(str, unknown))}",
                     options=sorted(env["regions"]))
    return list(dict.fromkeys(value))


@functools.cache
def _timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def valid_timezone(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """An IANA zone name, as the system's tz database knows them."""
    if value not in _timezones():
        raise _Issue("Invalid timezone: expected an IANA zone such as 'Europe/London'")
    return value


_HEX_COLOR = re.compile(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")


def valid_hex_color(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """A CSS hex colour, ``#rgb`` or ``#rrggbb``, stored lowercase."""
    if not _HEX_COLOR.fullmatch(value):
        raise _Issue("Invalid colour: expected #rgb or #rrggbb", "invalid_string",
                     validation="regex")
    return value.lower()


# Tags: short labels with an optional colour.  A client may send a bare string for a tag
# without colour; responses always show objects.
TAG_FIELDS = (
    Field("name", "string", True, minimum=1, maximum=32, doc="Label"),
    Field("color", "string", check=valid_hex_color, doc="Hex colour, #rgb or #rrggbb"),
)


def valid_tags(value: list[Any], record: dict[str, Any], env: ValidationEnv) -> list[Any]:
    """Tags as objects (a string is a tag's name), each name once."""
    objects = [{"name": v} if isinstance(v, str) else v for v in value]
    clean = each(TAG_FIELDS)(objects, record, env)
    names = [tag["name"] for tag in clean]
    if len(set(names)) != len(names):
        raise _Issue("Tag names must be unique")
    return clean


# Cron schedules of CRON monitors, evaluated by cronsim (five fields, or one of these aliases).
_CRON_ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
                 "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                 "@hourly": "0 * * * *"}


def cron_times(schedule: str, zone: str | None, after: int,
               reverse: bool = False) -> Iterator[datetime]:
    """The schedule's times after (or, ``reverse``, before) Unix ms ``after``, in ``zone``."""
    text = " ".join(schedule.split())
    start = datetime.fromtimestamp(after / 1000, zoneinfo.ZoneInfo(zone or "UTC"))
    return iter(cronsim.CronSim(_CRON_ALIASES.get(text.lower(), text), start, reverse))


def valid_schedule(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """A cron expression cronsim accepts, or @yearly/@monthly/@weekly/@daily/@hourly."""
    try:
        next(cron_times(value, None, now_ms()))
    except (cronsim.CronSimError, StopIteration) as exc:
        raise _Issue(f"Invalid schedule: {exc or 'it never fires'}") from None
    return value


@dataclass(frozen=True)
class Each:
    """A ``check`` that validates every element of an array against a Field table (and
    ``then(clean, path)``, for rules across an element's fields).  The table stays readable,
    so the dashboard can edit such an array as rows of inputs."""

    fields: tuple[Field, ...]
    kind_field: str = "type"
    then: Callable[[dict[str, Any], tuple[Any, ...]], dict[str, Any]] | None = None

    def __call__(self, value: list[Any], record: dict[str, Any], env: ValidationEnv) -> Any:
        out, issues = [], []
        for i, item in enumerate(value):
            where = (*env["path"], i)
            try:
                clean = validate(self.fields, item, env, kind_field=self.kind_field, path=where)
                out.append(self.then(clean, where) if self.then else clean)
            except ValidationFailed as exc:
                issues.extend(exc.issues)
        if issues:
            raise ValidationFailed(issues)
        return out


def each(fields: Sequence[Field], kind_field: str = "type",
         then: Callable[[dict[str, Any], tuple[Any, ...]], dict[str, Any]] | None = None
         ) -> Each:
    return Each(tuple(fields), kind_field, then)


class Names(Collection[str]):
    """The names in a registry whose entry passes ``test``, read at each use: the registries
    below fill up later in the module (where each type's probe or sender is), after the Field
    tables that name them are built."""

    def __init__(self, registry: dict[str, Any], test: Callable[[Any], bool] = bool) -> None:
        self.registry, self.test = registry, test

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.registry and self.test(self.registry[name])

    def __iter__(self) -> Iterator[str]:
        return (name for name, entry in self.registry.items() if self.test(entry))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass(frozen=True)
class MonitorType:
    """One monitor type: how it reads ``url`` (``http``: an http(s) URL, ``https``, ``host``: a
    hostname/IP/URL, ``text``: free text) and its probe; None for a type that is never probed
    (CRON: its checks are the heartbeats it receives).  Its fields are the MONITOR_FIELDS whose
    ``kinds`` name it (or that have none).  ``connects``: its probe connects to the ``url``
    itself, so ``[probes] allow_private_targets`` rules it (DNS and DOMAIN ask resolvers)."""

    name: str
    url_rule: str
    probe: Probe | None
    connects: bool = True

    @property
    def fields(self) -> tuple[Field, ...]:
        """The MONITOR_FIELDS a monitor of this type uses."""
        return tuple(f for f in MONITOR_FIELDS if f.kinds is None or self.name in f.kinds)


# Every monitor type by name, in declaration order; declared next to the probes.
MONITOR_TYPES: dict[str, MonitorType] = {}


@dataclass(frozen=True)
class ChannelType:
    """One notification channel type: its config fields (which validate, mask and document a
    channel's ``config``), its sender, and whether it reaches a person (email, SMS, chat, push)
    rather than a machine (webhook, PagerDuty, Opsgenie)."""

    name: str
    fields: tuple[Field, ...]
    send: Sender
    person_facing: bool

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.required is True)

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.secret_for(self.name))


# Every channel type by name, in declaration order; declared on the senders (``@channel_type``).
CHANNEL_TYPES: dict[str, ChannelType] = {}


def channel_secrets(kind: Any) -> tuple[str, ...]:
    """The config keys a channel of ``kind`` keeps secret (none for an unknown kind)."""
    return CHANNEL_TYPES[kind].secrets if kind in CHANNEL_TYPES else ()


HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
AUTH_TYPES = ("none", "bearer", "basic", "api_key", "oauth2", "jwt")

AUTH_FIELDS = (
    Field("type", "string", True, choices=AUTH_TYPES),
    Field("token", "string", ("bearer",), minimum=1, secret=("bearer",)),
    Field("username", "string", ("basic",), minimum=1),
    Field("password", "string", ("basic",), secret=("basic",)),
    Field("apiKey", "string", ("api_key",), minimum=1, secret=("api_key",)),
    Field("apiKeyHeader", "string", minimum=1),
    Field("apiKeyName", "string", minimum=1),
    Field("apiKeyLocation", "string", choices=("header", "query")),
    Field("oauth2TokenUrl", "string", ("oauth2",), check=valid_url),
    Field("oauth2ClientId", "string", ("oauth2",), minimum=1),
    Field("oauth2ClientSecret", "string", ("oauth2",), secret=("oauth2",)),
    Field("oauth2Scope", "string"),
    Field("oauth2GrantType", "string", choices=("client_credentials",)),
    Field("jwtToken", "string", ("jwt",), minimum=1, secret=("jwt",)),
    Field("jwtHeader", "string", minimum=1),
    Field("jwtPrefix", "string"),
)


def valid_auth_config(value: dict[str, Any], record: dict[str, Any],
                      env: ValidationEnv) -> dict[str, Any]:
    """Validate ``apiAuthConfig`` by its own type; keep secrets a client echoed back masked."""
    previous = (env.get("existing") or {}).get("apiAuthConfig") or {}
    value = {k: (previous[k] if previous.get(k) is not None and v == mask(previous[k]) else v)
             for k, v in value.items()}
    clean = validate(AUTH_FIELDS, value, env, path=env["path"])
    kind = clean["type"]
    if kind == "api_key" and not (clean.get("apiKeyHeader") or clean.get("apiKeyName")):
        raise ValidationFailed([{"code": "custom", "path": [*env["path"], "apiKeyHeader"],
                                 "message": "api_key auth needs apiKeyHeader or apiKeyName"}])
    if kind == "oauth2" and not clean.get("oauth2GrantType"):
        clean["oauth2GrantType"] = "client_credentials"
    return {k: v for k, v in clean.items() if v is not None}


def mask(secret: str) -> str:
    """Show a secret's last four characters only, and only when it is long enough to hide."""
    return "****" + secret[-4:] if len(secret) >= 12 else "****"


def masked_auth(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``apiAuthConfig`` as responses show it: every secret field masked."""
    if not config:
        return config
    secret = {f.name for f in AUTH_FIELDS if f.secret_for(config.get("type"))}
    return {k: mask(v) if k in secret and isinstance(v, str) else v for k, v in config.items()}


def _unmasked(kind: str, value: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """Swap masked secrets a client echoed back for the stored values."""
    def keep(new: Any, old: Any) -> Any:
        if isinstance(new, dict) and isinstance(old, dict):
            return {k: keep(v, old.get(k)) for k, v in new.items()}
        if isinstance(new, list) and isinstance(old, list):
            return [keep(v, old[i] if i < len(old) else None) for i, v in enumerate(new)]
        return old if isinstance(old, str) and new == mask(old) else new
    return {k: keep(v, previous.get(k)) if k in CHANNEL_TYPES[kind].secrets else v
            for k, v in value.items()}


def channel_config(kind: Any, value: dict[str, Any], env: ValidationEnv) -> dict[str, Any]:
    """Validate a config by its channel type's fields; unknown keys are dropped.

    When updating a stored channel of the same type (``env["existing"]``), masked secrets
    echoed back keep the stored ones, as ``apiAuthConfig`` does."""
    if not isinstance(kind, str) or kind not in CHANNEL_TYPES:
        return value  # the type field reports the problem
    existing = env.get("existing") or {}
    if existing.get("type") == kind and isinstance(existing.get("config"), dict):
        value = _unmasked(kind, value, existing["config"])
    if isinstance(value.get("chatId"), int) and not isinstance(value["chatId"], bool):
        value = {**value, "chatId": str(value["chatId"])}
    clean = validate(CHANNEL_TYPES[kind].fields, value, env, kind=kind, path=env["path"])
    return {k: v for k, v in clean.items() if v is not None}


def valid_channel_config(value: dict[str, Any], record: dict[str, Any],
                         env: ValidationEnv) -> dict[str, Any]:
    """A channel ``config`` checked by the rules of its ``type`` (``channel_config``)."""
    return channel_config(record.get("type"), value, env)


INLINE_NOTIFICATION_FIELDS = (
    Field("channelId", "string", doc="An existing notification channel to link"),
    Field("type", "string", choices=Names(CHANNEL_TYPES)),
    Field("enabled", "boolean", default=True),
    Field("config", "object", check=valid_channel_config,
          doc="The channel configuration, as for /notifications"),
)


def valid_notifications(value: list[Any], record: dict[str, Any],
                        env: ValidationEnv) -> list[dict[str, Any]]:
    """Each entry links a channel by ``channelId`` or defines one inline by type and config.

    On an update, the n-th inline entry of a type is matched with the n-th stored one of that
    type (``env["inline"]``), so secrets echoed back masked keep their stored values."""
    stored: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for previous in env.get("inline", ()):
        stored[previous["type"]].append(previous["config"])
    entries, issues, seen = [], [], collections.Counter[str]()
    for i, item in enumerate(value):
        kind = item.get("type") if isinstance(item, dict) else None
        kind = kind if isinstance(kind, str) else ""
        config = stored[kind][seen[kind]] if seen[kind] < len(stored[kind]) else None
        seen[kind] += 1
        try:
            entries.append(validate(INLINE_NOTIFICATION_FIELDS, item,
                                    {**env, "existing": {"type": kind, "config": config}},
                                    path=(*env["path"], i)))
        except ValidationFailed as exc:
            issues.extend(exc.issues)
    if issues:
        raise ValidationFailed(issues)
    for i, entry in enumerate(entries):
        where = [*env["path"], i]
        if entry.get("channelId"):
            if entry["channelId"] not in env.get("channels", ()):
                issues.append({"code": "custom", "path": [*where, "channelId"],
                               "message": "Unknown notification channel"})
        elif not entry.get("type") or entry.get("config") is None:
            issues.append({"code": "custom", "path": where,
                           "message": "Give either channelId or both type and config"})
    if issues:
        raise ValidationFailed(issues)
    return entries


# Assertions on WEBSITE/API responses, modelled on Checkly's: each names a source, an
# optional property (a header name, or an RFC 9535 JSONPath into a JSON body), a comparison
# and a target.  Targets are strings; numeric comparisons parse both sides as numbers.

ASSERTION_SOURCES = ("STATUS_CODE", "RESPONSE_TIME", "HEADERS", "TEXT_BODY", "JSON_BODY")
ASSERTION_COMPARISONS = ("EQUALS", "NOT_EQUALS", "CONTAINS", "NOT_CONTAINS", "LESS_THAN",
                         "GREATER_THAN", "IS_EMPTY", "NOT_EMPTY", "MATCHES")
_UNARY_COMPARISONS = ("IS_EMPTY", "NOT_EMPTY")

ASSERTION_FIELDS = (
    Field("source", "string", True, choices=ASSERTION_SOURCES, doc="What to test"),
    Field("property", "string", ("HEADERS", "JSON_BODY"), minimum=1, maximum=500,
          doc="HEADERS: header name; JSON_BODY: an RFC 9535 JSONPath such as $.items[0].ok"),
    Field("comparison", "string", True, choices=ASSERTION_COMPARISONS, doc="How to compare"),
    Field("target", "string", default="", maximum=1000,
          doc="Value to compare with (a regular expression for MATCHES)"),
)


@functools.cache
def bounded_jsonpath() -> jsonpath_rfc9535.JSONPathEnvironment:
    """RFC 9535 JSONPath without the match() and search() filter functions: they run a regular
    expression with no time limit, so a runaway pattern there could hang the server.  (A
    MATCHES assertion has a limit.)  Queries using them are refused when the monitor is saved."""
    import jsonpath_rfc9535
    environment = jsonpath_rfc9535.JSONPathEnvironment()
    for name in ("match", "search"):
        del environment.function_extensions[name]
    return environment


def _assertion_issue(path: tuple[Any, ...], name: str, message: str) -> ValidationFailed:
    return ValidationFailed([{"code": "custom", "path": [*path, name], "message": message}])


def valid_assertion(clean: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    """Rules across one assertion's fields: a JSONPath that parses, a regex that compiles and
    a target for every comparison but IS_EMPTY / NOT_EMPTY."""
    import jsonpath_rfc9535
    import regex
    if clean["source"] == "JSON_BODY":
        try:
            bounded_jsonpath().compile(clean["property"])
        except jsonpath_rfc9535.JSONPathError as exc:
            raise _assertion_issue(path, "property", f"Invalid JSONPath: {exc}") from None
    if clean["comparison"] == "MATCHES":
        try:
            regex.compile(clean["target"])
        except regex.error as exc:
            raise _assertion_issue(path, "target", f"Invalid regular expression: {exc}") from None
    elif not clean["target"] and clean["comparison"] not in _UNARY_COMPARISONS:
        raise _assertion_issue(path, "target", f"{clean['comparison']} needs a target")
    return clean


ALL_TYPES = Names(MONITOR_TYPES)
APPLY_HEADER = "X-StatusApp-Apply"  # sent by `statusapp apply`: it may write read-only markers
MANAGED_FIELD = Field("managed", "boolean", default=False, read_only=True,
                      doc="Set by `statusapp apply`: its `--prune` may delete the object")
DIGEST_FIELD = Field("secretsDigest", "string", maximum=64, read_only=True,
                     doc="Set by `statusapp apply`: a digest of the secrets it applied, keyed "
                         "by its API key, so it notices a changed secret")
HTTP_TYPES = ("WEBSITE", "API")

MONITOR_FIELDS = (
    Field("name", "string", True, minimum=1, maximum=255, doc="Monitor name"),
    Field("url", "string", Names(MONITOR_TYPES, lambda t: t.url_rule != "text"), minimum=1,
          maximum=2048,
          check=valid_monitor_url,
          doc="URL, hostname or IP (CRON: optional, defaults to the heartbeat URL)"),
    Field("type", "string", default="WEBSITE", choices=ALL_TYPES, doc="Monitor type"),
    Field("interval", "integer", default=300, minimum="probes.min_interval", maximum=2_678_400,
          doc="Check interval in seconds (CRON: expected period between pings)"),
    Field("timeout", "integer", default=30, minimum=5, maximum=300, doc="Timeout in seconds"),
    Field("port", "integer", ("PORT",), minimum=1, maximum=65535, kinds=("PORT",),
          doc="Port number"),
    Field("protocol", "string", ("PORT",), choices=("TCP", "UDP"), kinds=("PORT",),
          doc="Port protocol"),
    Field("expectedStatusCode", "integer", minimum=100, maximum=599, kinds=HTTP_TYPES,
          doc="Expected HTTP status (absent: any 2xx/3xx)"),
    Field("httpMethod", "string", default="GET", choices=HTTP_METHODS, kinds=HTTP_TYPES,
          doc="HTTP method"),
    Field("requestHeaders", "string", maximum=16_384, check=valid_json_headers, kinds=HTTP_TYPES,
          doc="JSON string of custom headers"),
    Field("requestBody", "string", maximum=65_536, kinds=HTTP_TYPES, doc="Request body"),
    Field("assertions", "array", default=[], maximum=50, items="object",
          check=each(ASSERTION_FIELDS, "source", valid_assertion), kinds=HTTP_TYPES,
          doc="Checks on the response, each {source, property, comparison, target}; any"
          " failing one makes the check DOWN (see Assertions)"),
    Field("dnsRecord", "string", ("DNS",), choices=("A", "AAAA", "CNAME", "MX", "TXT"),
          kinds=("DNS",), doc="DNS record type"),
    Field("expectedIp", "string", maximum=255, check=valid_expected_ip, kinds=("DNS",),
          doc="Expected answer (an IP for A/AAAA)"),
    Field("gracePeriod", "integer", default=300, minimum="probes.min_interval", maximum=86_400,
          kinds=("CRON",), doc="Grace period in seconds after a missed ping"),
    Field("schedule", "string", maximum=200, check=valid_schedule, kinds=("CRON",),
          doc="Cron expression (e.g. 0 3 * * *) or @daily/@hourly/...; replaces interval"),
    Field("timezone", "string", maximum=64, check=valid_timezone, kinds=("CRON",),
          doc="IANA zone of schedule (absent: UTC)"),
    Field("sslCertExpiryDays", "integer", default=30, minimum=1, maximum=90,
          kinds=("SSL_CERT", *HTTP_TYPES),
          doc="Days before certificate expiry to warn (also for https WEBSITE/API monitors)"),
    Field("enabledWorkerRegionIds", "array", check=valid_regions, items="string",
          doc="Worker regions to probe from (absent or empty: every active region)"),
    Field("downQuorum", "integer", minimum=1, maximum=1000,
          doc="Regions that must fail for DOWN (absent: every active enabled region)"),
    Field("regressionEnabled", "boolean", default=False, doc="Performance regression detection"),
    Field("regressionThreshold", "integer", default=50, minimum=25, maximum=200,
          doc="Regression threshold in percent"),
    Field("regressionPeriod", "integer", default=7, minimum=1, maximum=30,
          doc="Baseline period in days"),
    Field("performanceTimings", "boolean", default=False, kinds=HTTP_TYPES,
          doc="Record dns/connect/tls/ttfb/transfer timings"),
    Field("apiAuthConfig", "object", check=valid_auth_config, kinds=HTTP_TYPES,
          doc="API authentication (secrets are masked in responses)"),
    Field("domainExpiryDays", "integer", default=30, minimum=1, maximum=365, kinds=("DOMAIN",),
          doc="Days before domain expiry to warn"),
    Field("domainMonitorDns", "boolean", default=True, kinds=("DOMAIN",),
          doc="Report NS/A record changes"),
    Field("domainMonitorBlacklist", "boolean", default=True, kinds=("DOMAIN",),
          doc="Check DNS blocklists"),
    Field("domainMonitorWhois", "boolean", default=True, kinds=("DOMAIN",),
          doc="Report registrar/status/nameserver changes"),
    Field("tags", "array", default=[], maximum=20, check=valid_tags,
          doc='Labels, each {"name", "color"} or a bare name ("prod"); list filter tag='),
    Field("group", "string", minimum=1, maximum=100,
          doc="Group name (list filter group=; status pages may show a whole group)"),
    Field("isActive", "boolean", default=True, doc="Inactive monitors are never checked"),
    Field("notifications", "array", check=valid_notifications,
          doc="Notification channels, inline or by channelId (returned as monitorNotifications)"),
    MANAGED_FIELD,
    DIGEST_FIELD,
)

# The monitor fields that are not monitor columns.
_NOT_COLUMNS = {"notifications"}
MONITOR_COLUMNS = tuple(f for f in MONITOR_FIELDS if f.name not in _NOT_COLUMNS)
REGRESSION_FIELDS = tuple(f for f in MONITOR_FIELDS if f.name.startswith("regression"))


def field_reference(fields: Sequence[Field]) -> str:
    """A Markdown table of a Field table, for the README (a test keeps the README in step)."""
    def bounds(f: Field) -> str:
        parts = [f"one of {', '.join(f'`{c}`' for c in f.choices)}"] if f.choices else []
        unit = " chars" if f.kind == "string" else ""
        if f.minimum is not None:
            low = f"`[{f.minimum}]`" if isinstance(f.minimum, str) else f.minimum
            parts.append(f"min {low}{unit}")
        if f.maximum is not None:
            parts.append(f"max {f.maximum}{unit}")
        if f.read_only:
            parts.append(f"read-only (written only with the `{APPLY_HEADER}` header)")
        return "; ".join(parts)

    def required(f: Field) -> str:
        if f.required is True:
            return "yes"
        return ", ".join(f.required) if f.required else ""

    rows = ["| Field | Type | Required | Default | Rules | Types | Description |",
            "|---|---|---|---|---|---|---|"]
    for f in fields:
        default = "" if f.default is None else f"`{json.dumps(f.default)}`"
        rows.append(f"| `{f.name}` | {f.kind} | {required(f)} | {default} | {bounds(f)} | "
                    f"{', '.join(f.kinds) if f.kinds else 'all'} | {f.doc} |")
    return "\n".join(rows)


# Response shapes.  Each function that shapes a JSON response has its shape declared beside it,
# as JSON Schema built by ``shape``; ``@api(response=...)`` hands it to the OpenAPI document.

def _prop(spec: Any) -> dict[str, Any]:
    if isinstance(spec, dict):
        return spec
    if isinstance(spec, list):
        return {"type": "array", "items": _prop(spec[0])}
    name = spec.rstrip("?")
    out: dict[str, Any] = ({} if name == "any" else {"type": "string", "format": "date-time"}
                           if name == "date-time" else {"type": name})
    return nullable(out) if spec.endswith("?") else out


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema that also admits null."""
    if "type" not in schema:
        return schema
    out = {**schema, "type": [schema["type"], "null"]}
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def shape(*bases: dict[str, Any], **props: Any) -> dict[str, Any]:
    """An object's JSON Schema, every property required, from ``bases`` (object schemas) and a
    compact form: a JSON type name (or "any", or "date-time" for ``iso`` times) with a trailing
    "?" when it may be null, a schema, or ``[item]`` for an array of item."""
    properties = {k: v for base in bases for k, v in base["properties"].items()}
    properties.update({name: _prop(spec) for name, spec in props.items()})
    return {"type": "object", "properties": properties, "required": list(properties)}


def fields_shape(fields: Sequence[Field]) -> dict[str, Any]:
    """How a Field table's values come back: its kind and choices, null when it has no
    default (absent values are null)."""
    def one(f: Field) -> dict[str, Any]:
        out: dict[str, Any] = {"type": f.kind, **({"enum": list(f.choices)} if f.choices else {})}
        if f.kind == "array" and f.items:
            out["items"] = {"type": f.items}
        return nullable(out) if f.default is None else out
    return shape(**{f.name: one(f) for f in fields})


def page_fields(sorts: Collection[str], default_sort: str, **filters: Field) -> tuple[Field, ...]:
    """The query parameters of a paged listing: page, limit, sort, order and filters."""
    return (
        Field("page", "integer", default=1, minimum=1, maximum=1_000_000),
        Field("limit", "integer", default=50, minimum=1, check=lambda v, r, e: min(v, 100)),
        Field("sort", "string", default=default_sort, choices=tuple(sorts)),
        Field("order", "string", default="desc", choices=("asc", "desc")),
        *filters.values(),
    )


PAGINATION = shape(total="integer", page="integer", limit="integer", totalPages="integer")
DELETED = shape(success="boolean", message="string")


def paginate(total: int, query: dict[str, Any]) -> dict[str, int]:
    """The spec's pagination object."""
    return {"total": total, "page": query["page"], "limit": query["limit"],
            "totalPages": max(1, -(-total // query["limit"]))}


_JSON_KINDS = ("object", "array")  # Field kinds stored as JSON text


def _json_column(value: str | None) -> Any:
    return None if value is None else json.loads(value)


# Each monitor column as (field name, column, how its stored value is read back).
_MONITOR_READERS: tuple[tuple[str, str, Callable[[Any], Any] | None], ...] = tuple(
    (spec.name, spec.column, _json_column if spec.kind in _JSON_KINDS
     else bool if spec.kind == "boolean" else None) for spec in MONITOR_COLUMNS)


_MONITOR_FIELDS = (("id", "id", None), *_MONITOR_READERS, ("status", "status", None),
                   ("isPaused", "is_paused", bool), ("heartbeatId", "heartbeat_id", None))


@functools.lru_cache(maxsize=64)
def _monitor_values(columns: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """For rows of these ``columns``: their _MONITOR_FIELDS values, then created_at and
    updated_at, by position (a Row looks a name up by comparing it with each column name)."""
    position = {name: n for n, name in enumerate(columns)}
    return operator.itemgetter(*(position[column] for _, column, _ in _MONITOR_FIELDS),
                               position["created_at"], position["updated_at"])


def _monitor_fields(values: tuple[Any, ...]) -> dict[str, Any]:
    return {name: value if read is None else read(value)
            for (name, _, read), value in zip(_MONITOR_FIELDS, values[:-2], strict=True)}


def monitor_record(row: sqlite3.Row) -> dict[str, Any]:
    """A monitors row as the API's camelCase fields, secrets in clear (for probes and merges)."""
    return _monitor_fields(_monitor_values(tuple(row.keys()))(row))


def _field_sql(column: str, read: Callable[[Any], Any] | None) -> str:
    """SQL for a monitors column (of ``m``) as monitor_record reads it, as a JSON value."""
    if read is _json_column:
        return f'json(m."{column}")'
    if read is bool:  # json() of a constant is computed once per statement, not per row
        return f"""CASE WHEN m."{column}" THEN json('true') ELSE json('false') END"""
    return f'm."{column}"'


# A monitors row's _MONITOR_FIELDS, then createdAt and updatedAt (Unix ms), as a JSON object
# built by SQLite: the same values as monitor_record, without a Python object per column.
_MONITOR_OBJECT = ("json_object(" + ", ".join(
    f"'{name}', {_field_sql(column, read)}" for name, column, read in _MONITOR_FIELDS)
    + ", 'createdAt', m.created_at, 'updatedAt', m.updated_at)")


# --- Auth ---
#
# An API key is ``sk_live_<random>``; only its SHA256 is stored.  A key belongs to a person
# (an account); the person acts within one team with one role.  The method decides the
# permission a key needs (read, write, delete); the route decides the least role.

class Role(enum.StrEnum):
    """A person's role in a team, least to most (str-valued: JSON and SQL see the name)."""

    VIEWER = "VIEWER"
    MEMBER = "MEMBER"
    ADMIN = "ADMIN"
    OWNER = "OWNER"


ROLES = tuple(Role)
PERMISSIONS = ("read", "write", "delete")
_METHOD_PERMISSION = {"GET": "read", "HEAD": "read", "POST": "write", "PUT": "write",
                      "PATCH": "write", "DELETE": "delete"}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str, str]:
    """A new key: (the key itself, its SHA256, its display prefix)."""
    key = "sk_live_" + secrets.token_urlsafe(24)
    return key, hash_key(key), key[:12] + "..."


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key, the person, the team whose resources they act on, their role."""

    key_id: str
    account_id: str
    team_id: str
    role: str
    permissions: frozenset[str]
    plan: str

    def require_role(self, least: str) -> None:
        if ROLES.index(self.role) < ROLES.index(least):
            raise Forbidden(f"This action needs the {least} role or higher",
                            f"your role is {self.role}")


def request_key(request: Request) -> str | None:
    """The API key from ``X-API-Key`` or ``Authorization: Bearer``."""
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def authenticate(db: Database, key: str | None) -> Principal:
    """Resolve a key to a Principal, or raise 401 (bad key) / 403 (disabled account)."""
    if not key:
        raise Unauthorized("Missing API key", "send X-API-Key or Authorization: Bearer")
    row = await db.fetchone(
        "SELECT k.id, k.account_id, k.permissions, k.expires_at, k.is_active, m.team_id, m.role,"
        " t.plan, t.account_status AS team_status, a.account_status"
        " FROM api_keys k JOIN accounts a ON a.id = k.account_id"
        " JOIN team_members m ON m.account_id = k.account_id AND m.status = 'ACCEPTED'"
        " JOIN accounts t ON t.id = m.team_id WHERE k.key_hash = ?", (hash_key(key),))
    if row is None or not row["is_active"]:
        raise Unauthorized("Invalid API key", "the key is unknown or has been revoked")
    if row["expires_at"] is not None and row["expires_at"] <= now_ms():
        raise Unauthorized("API key expired", f"expired at {iso(row['expires_at'])}")
    if row["account_status"] != "ENABLED" or row["team_status"] != "ENABLED":
        raise Forbidden("Account not active", "the account is disabled")
    return Principal(row["id"], row["account_id"], row["team_id"], row["role"],
                     frozenset(row["permissions"].split(",")), row["plan"])


class ClientAddresses:
    """Who a request comes from: the peer, or behind the proxies of ``server.trusted_proxies``
    the last X-Forwarded-For hop that is not one of them.  The one place that believes the
    header (serve turns uvicorn's own handling off): rate limits, ping source IPs, sign-ins."""

    def __init__(self, trusted: list[str]) -> None:
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in trusted]

    def of(self, request: Request) -> str | None:
        return self.resolve(request.scope.get("client"),
                            request.headers.get("x-forwarded-for", ""))

    def resolve(self, client: tuple[str, int] | None, forwarded: str) -> str | None:
        """The address from the peer's (host, port) and the X-Forwarded-For header's value."""
        address = client[0] if client else None
        hops = [h.strip() for h in forwarded.split(",") if h.strip()] if forwarded else []
        while address and hops and self._is_trusted(address):
            address = hops.pop()
        return address

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)


class RateLimiter:
    """Requests per window per clock hour; in memory, reset on restart.  A window is a team
    (whose plan sets the limit, shared by every key of every member) or, for requests without
    a valid key, the client's address at the default plan's limit."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[int, int]] = {}

    def hit(self, window: str, limit: int, enforce: bool = True) -> dict[str, str]:
        """Count one request and return the X-RateLimit headers; past the limit raise 429, or
        with ``enforce`` off count it anyway (what must answer even while limited)."""
        now = time.time()
        hour = int(now // 3600)
        start, used = self._windows.get(window, (hour, 0))
        if start != hour:
            used = 0
        refused = enforce and used >= limit
        if not refused:
            used += 1
            self._windows[window] = (hour, used)
        reset = (hour + 1) * 3600
        headers = {"X-RateLimit-Limit": str(limit),
                   "X-RateLimit-Remaining": str(max(0, limit - used)),
                   "X-RateLimit-Reset": str(reset)}
        if refused:
            headers["Retry-After"] = str(max(1, math.ceil(reset - now)))
            raise RateLimited("Rate limit exceeded", f"{limit} requests per hour for this plan",
                              headers=headers)
        return headers

    def used(self, window: str) -> int:
        start, used = self._windows.get(window, (0, 0))
        return used if start == int(time.time() // 3600) else 0


class UsageCounter:
    """API requests per team, endpoint template and hour, counted in memory, flushed in batches.

    Keys' ``lastUsedAt`` rides along, so a request never costs a database write.
    """

    def __init__(self) -> None:
        self._counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self._last_used: dict[str, int] = {}
        self._flushing = asyncio.Lock()

    def count(self, principal: Principal, endpoint: str) -> None:
        stamp = now_ms()
        self._counts[(principal.team_id, endpoint, stamp // 3_600_000)] += 1
        self._last_used[principal.key_id] = stamp

    def pending(self) -> list[tuple[tuple[str, str, int], int]]:
        return list(self._counts.items())

    def last_used(self, key_id: str) -> int | None:
        """A key's use not yet flushed to ``api_keys.last_used_at``, if any."""
        return self._last_used.get(key_id)

    async def totals(self, db: Database, team_id: str, since_hour: int) -> dict[str, int]:
        """A team's requests per endpoint from ``since_hour`` on: stored plus not yet flushed.

        The flush lock makes the two reads one snapshot, so a batch is never counted twice
        or missed while it is being written.
        """
        async with self._flushing:
            totals = collections.Counter({endpoint: n for endpoint, n in await db.fetchall(
                "SELECT endpoint, SUM(count) FROM api_usage WHERE account_id = ? AND hour >= ?"
                " GROUP BY endpoint", (team_id, since_hour))})
            for (team, endpoint, hour), n in self._counts.items():
                if team == team_id and hour >= since_hour:
                    totals[endpoint] += n
        return dict(totals)

    async def flush(self, db: Database) -> None:
        async with self._flushing:
            counts, self._counts = self._counts, collections.Counter()
            last_used, self._last_used = self._last_used, {}
            statements: list[Statement] = [
                ("INSERT INTO api_usage (account_id, endpoint, hour, count) VALUES (?, ?, ?, ?)"
                 " ON CONFLICT (account_id, hour, endpoint)"
                 " DO UPDATE SET count = count + excluded.count",
                 (team, endpoint, hour, n)) for (team, endpoint, hour), n in counts.items()]
            statements += [("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (stamp, key_id))
                           for key_id, stamp in last_used.items()]
            if statements:
                await db.write(statements)


async def create_account(conn: aiosqlite.Connection, email: str, name: str | None,
                         plan: str, *, owns_team: bool = True) -> str:
    """A new account owning its own team (the OWNER membership row included).

    An invitee's account is made with ``owns_team=False``: a person belongs to one team only.
    """
    account_id, stamp = new_id("user"), now_ms()
    await conn.execute(
        "INSERT INTO accounts (id, email, name, plan, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)", (account_id, email, name, plan, stamp, stamp))
    if not owns_team:
        return account_id
    await conn.execute(
        "INSERT INTO team_members (id, team_id, account_id, email, name, role, status, invited_at,"
        " accepted_at) VALUES (?, ?, ?, ?, ?, 'OWNER', 'ACCEPTED', ?, ?)",
        (new_id("tm"), account_id, account_id, email, name, stamp, stamp))
    return account_id


async def create_api_key(conn: aiosqlite.Connection, account_id: str, name: str,
                         permissions: str, expires_at: int | None = None) -> tuple[str, str]:
    """Store a new key for an account; return (key id, the key, shown this once only)."""
    key, digest, prefix = generate_key()
    key_id = new_id("key")
    await conn.execute(
        "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, permissions, expires_at,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (key_id, account_id, name, prefix, digest, permissions, expires_at, now_ms()))
    return key_id, key


# --- Probes ---
#
# A probe is ``async def probe_x(monitor: dict, ctx: ProbeContext) -> CheckResult``.  It never
# raises for a failing target: a failure is a CheckResult with status DOWN, an error message and
# a root-cause category.  ``monitor`` carries the API's camelCase fields (secrets unmasked) and
# ``monitor["lastDetails"]``, the ``details`` of this monitor's previous check (or None).

ROOT_CAUSES = ("DNS_FAILURE", "NETWORK_TIMEOUT", "SERVER_ERROR", "APPLICATION_ERROR",
               "DATABASE_ISSUE", "SSL_CERTIFICATE", "CONFIGURATION_ERROR", "DEPLOYMENT_ISSUE",
               "THIRD_PARTY_SERVICE", "INFRASTRUCTURE", "DDOS_ATTACK", "MAINTENANCE", "UNKNOWN")


class Status(enum.StrEnum):
    """A check's or a monitor's status (str-valued: JSON and SQL see the name).  A check is
    UP, DEGRADED or DOWN; a monitor is PENDING until its first check."""

    PENDING = "PENDING"
    UP = "UP"
    DOWN = "DOWN"
    DEGRADED = "DEGRADED"


# What the API, status pages and badges show for a monitor while a maintenance window covers it
# (the stored status, and so the status filter, stay the probe's).
MAINTENANCE = "MAINTENANCE"


@dataclass
class CheckResult:
    """What one probe saw.  ``details`` is type-specific (certificate, domain data...)."""

    status: str                       # a Status: UP, DOWN or DEGRADED
    response_time: int | None = None  # milliseconds
    status_code: int | None = None
    error: str | None = None
    category: str | None = None       # one of ROOT_CAUSES when not UP
    timings: dict[str, float] | None = None
    details: dict[str, Any] | None = None

_USER_AGENT = f"StatusApp/{VERSION} (uptime monitor)"
REGION_HEADER = "X-StatusApp-Region"  # HTTP checks name the region they run from
_DEFAULT_TIMEOUT = 30.0
_DEFAULT_EXPIRY_DAYS = 30  # sslCertExpiryDays / domainExpiryDays when the monitor leaves them out
_SEVERITY: dict[str, int] = {Status.UP: 0, Status.DEGRADED: 1, Status.DOWN: 2}


class _ProbeError(Exception):
    """A failure found outside the main network call (bad config, token endpoint, registry)."""

    def __init__(self, message: str, category: str) -> None:
        super().__init__(message)
        self.category = category


def _down(error: str, category: str, **fields: Any) -> CheckResult:
    return CheckResult(status=Status.DOWN, error=error, category=category, **fields)


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _timeout(monitor: dict[str, Any]) -> float:
    return float(monitor.get("timeout") or _DEFAULT_TIMEOUT)


def _verdict(problems: list[tuple[str, str, str]]) -> tuple[str, str | None, str | None]:
    """Status, joined error and the worst problem's category from (status, message, category)."""
    if not problems:
        return Status.UP, None, None
    worst = max(problems, key=lambda p: _SEVERITY[p[0]])
    return worst[0], "; ".join(p[1] for p in problems), worst[2]


def _split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address; ValueError when malformed."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"no host in {text!r}")
    return host, int(port) if port else default_port


def _target_host(url: str) -> str:
    """The host of a URL, ``host:port``, bare hostname or IP address (PORT, PING, DNS...)."""
    text = (url or "").strip()
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    return urlsplit(text if "://" in text else f"//{text}").hostname or ""


def _describe_error(exc: BaseException, timeout: float) -> tuple[str, str]:
    """A short message and root cause for a network failure, read from its cause chain.

    httpx wraps httpcore, which wraps the OS error, so the useful exception is inside."""
    chain = _exception_chain(exc)

    def find(kind: type[BaseException]) -> Any:
        return next((e for e in chain if isinstance(e, kind)), None)

    if (err := find(PrivateTargetError)) is not None:
        return str(err), "CONFIGURATION_ERROR"
    if (err := find(socket.gaierror)) is not None:
        return f"DNS resolution failed: {err.strerror or err}", "DNS_FAILURE"
    if find(TimeoutError) or find(httpx.TimeoutException) or find(httpcore.TimeoutException):
        return f"timed out after {timeout:g}s", "NETWORK_TIMEOUT"
    if (err := find(ssl.SSLCertVerificationError)) is not None:
        return f"TLS certificate rejected: {err.verify_message}", "SSL_CERTIFICATE"
    if (err := find(ssl.SSLError)) is not None:
        return f"TLS handshake failed: {err.reason or err}", "SSL_CERTIFICATE"
    if find(ConnectionRefusedError):
        return "connection refused", "INFRASTRUCTURE"
    if find(ConnectionResetError):
        return "connection reset by peer", "INFRASTRUCTURE"
    if isinstance(exc, (httpx.UnsupportedProtocol, httpcore.UnsupportedProtocol)):
        return f"invalid URL: {exc}", "CONFIGURATION_ERROR"
    if isinstance(exc, httpx.TooManyRedirects):
        return "too many redirects", "APPLICATION_ERROR"
    if isinstance(exc, (httpx.RemoteProtocolError, httpcore.RemoteProtocolError)):
        return f"invalid HTTP answer: {exc}", "SERVER_ERROR"
    if (err := find(OSError)) is not None:
        return err.strerror or str(err) or type(err).__name__, "INFRASTRUCTURE"
    return str(exc) or type(exc).__name__, "UNKNOWN"


# HTTP checks speak HTTP/1.1 through httpcore's connection class directly (no httpx client,
# pool or models per check: they were most of a check's CPU), one new connection per request.
# The probe resolves the name itself and connects to the address (see _PinnedBackend), timing
# each phase into the check's timings: DNS, connect, TLS, then time to the first byte of the
# answer's headers and the body's transfer (redirects sum).  Resolving there also lets it
# refuse private addresses and connect to exactly the address it checked.

_TIMING_PHASES = ("dns", "connect", "tls", "ttfb", "transfer")


class PrivateTargetError(httpcore.ConnectError):
    """A target that is, or resolves to, a private, loopback or link-local address where
    ``allow_private_targets`` is false."""


def is_public_address(text: str) -> bool:
    """A globally routable unicast address (an IPv4-mapped IPv6 address counts as its IPv4)."""
    address = ipaddress.ip_address(text.partition("%")[0])
    address = getattr(address, "ipv4_mapped", None) or address
    return address.is_global and not address.is_multicast


async def resolve_target(host: str, port: int, allow_private: bool) -> list[str]:
    """The addresses of ``host``, resolved once, for the caller to connect to (so what was
    checked is what is reached: no second lookup a rebinding DNS server could answer
    differently).  Unless ``allow_private``, PrivateTargetError if any is not public."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    private = None if allow_private else next(
        (a for a in addresses if not is_public_address(a)), None)
    if private is not None:
        raise PrivateTargetError(f"{host} is or resolves to {private}, a private, loopback or"
                                 f" link-local address, and allow_private_targets is false")
    return addresses


@contextlib.contextmanager
def _mapped(timeout_error: type[Exception], error: type[Exception]) -> Iterator[None]:
    """OS, TLS and timeout errors as the httpcore errors httpx expects, the original kept as
    the cause (``_describe_error`` reads the chain)."""
    try:
        yield
    except TimeoutError as exc:
        raise timeout_error(str(exc) or "timed out") from exc
    except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
        raise error(str(exc) or type(exc).__name__) from exc


class _AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection as an asyncio stream pair: httpcore's stream interface without anyio's
    task groups, cancel scopes and attribute lookups, which were most of a check's CPU."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore.ReadTimeout, httpcore.ReadError):
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:  # httpcore writes the empty body and end of a body-less request too
            return
        with _mapped(httpcore.WriteTimeout, httpcore.WriteError):
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()

    async def aclose(self) -> None:
        """Close now, as anyio does: the socket is gone when this returns, even with a body
        left unread (the loop would otherwise close it only on a later iteration)."""
        self._writer.close()
        await asyncio.sleep(0)
        self._writer.transport.abort()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        try:
            with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
                async with asyncio.timeout(timeout):
                    await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except httpcore.ConnectError:
            self._writer.transport.abort()
            raise
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "is_readable":  # an idle pooled connection the server closed or reset
            return self._reader.at_eof() or self._reader.exception() is not None
        return self._writer.get_extra_info({"ssl_object": "ssl_object", "socket": "socket"}.get(
            info, ""))


async def _open_stream(address: str, port: int, timeout: float | None) -> _AsyncioStream:
    with _mapped(httpcore.ConnectTimeout, httpcore.ConnectError):
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address, port)
    return _AsyncioStream(reader, writer)


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with name resolution split out of the TCP connect: it
    resolves once, refuses private addresses unless allowed, and connects to the addresses it
    checked (TLS still verifies and sends SNI for the URL's host name).  Its streams are plain
    asyncio streams (``_AsyncioStream``)."""

    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None, *,
                          timings: dict[str, float] | None = None) -> _AsyncioStream:
        """Resolve, then try each address in turn (as the stdlib's create_connection does);
        with ``timings``, add the seconds spent resolving and connecting to them."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                addresses = await resolve_target(host, port, self._allow_private)
        except TimeoutError:
            raise httpcore.ConnectError(f"DNS lookup of {host} timed out") from socket.gaierror(
                socket.EAI_AGAIN, "lookup timed out")
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}") from exc
        resolved = time.perf_counter()
        remaining = None if timeout is None else max(timeout - (resolved - started), 0.001)
        error: Exception | None = None
        for address in addresses:
            try:
                stream = await _open_stream(address, port, remaining)
            except httpcore.ConnectError as exc:
                error = exc
                continue
            if timings is not None:
                timings["dns"] += resolved - started
                timings["connect"] += time.perf_counter() - resolved
            return stream
        raise error or httpcore.ConnectError(f"no address for {host}")

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not probed")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a pool that uses _PinnedBackend (httpx takes no network
    backend, so ``_pool`` is replaced).

    Probes keep no idle connection (``keepalive=0``): every check opens its own connection, so
    response times and timings measure what a new visitor sees (DNS, connect, TLS), not a warm
    socket; and the pool never holds a large idle set, which is what makes the stock pool slow
    under high concurrency (encode/httpx#3215).  No connection cap either: the scheduler bounds
    concurrency with its own semaphore, and a second, smaller cap here would only turn
    waiting into false timeouts."""

    def __init__(self, ssl_context: ssl.SSLContext, allow_private: bool,
                 keepalive: int | None = 0) -> None:
        super().__init__(verify=ssl_context, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=None, max_keepalive_connections=keepalive,
            network_backend=_PinnedBackend(allow_private))


def _nameservers(configured: list[str]) -> list[tuple[str, int]]:
    """``[probes] dns_nameservers`` as (IP address, port); ValueError for anything else."""
    addresses = [_split_host_port(ns, 53) for ns in configured]
    return [(str(ipaddress.ip_address(host)), port) for host, port in addresses]


def _make_resolver(nameservers: list[tuple[str, int]]) -> dns.asyncresolver.Resolver:
    """dnspython's resolver on the configured servers, else on /etc/resolv.conf; with neither,
    127.0.0.1, which is what the C library does.  No cache: each check asks afresh."""
    import dns.asyncresolver
    import dns.nameserver
    import dns.resolver
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                for host, port in nameservers]
        return resolver
    try:
        return dns.asyncresolver.Resolver()
    except dns.resolver.NoResolverConfiguration:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        return resolver


class ProbeContext:
    """What all probes share, built once per process from the config: one HTTP client (for
    token endpoints and registries; HTTP checks use httpcore through ``backend``), the TLS
    trust store, one DNS resolver and the OAuth2 token cache.  ``settings`` is the ``[probes]``
    config section (elsewhere ``cfg`` is always the whole config).  Close it with ``aclose``."""

    def __init__(self, cfg: dict[str, dict[str, Any]]) -> None:
        self.settings = cfg["probes"]
        # OpenSSL's default paths, so SSL_CERT_FILE / SSL_CERT_DIR work, plus our own CA file.
        self.ssl_context = ssl.create_default_context()
        if self.settings["ca_bundle"]:
            try:
                self.ssl_context.load_verify_locations(cafile=self.settings["ca_bundle"])
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"config: probes.ca_bundle: cannot load "
                                  f"{self.settings['ca_bundle']}: {exc}") from None
        # For reading a certificate that does not verify (SSL_CERT says why it fails).
        self.unverified_ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.unverified_ssl_context.check_hostname = False
        self.unverified_ssl_context.verify_mode = ssl.CERT_NONE
        try:
            self.nameservers = _nameservers(self.settings["dns_nameservers"])
        except ValueError as exc:
            raise ConfigError(f"config: probes.dns_nameservers: {exc}") from None
        try:
            whois = self.settings["whois_server"]
            self.whois_server = _split_host_port(whois, 43) if whois else _IANA_WHOIS
        except ValueError as exc:
            raise ConfigError(f"config: probes.whois_server: {exc}") from None
        # No cookie is kept, so no check carries state into the next one or into another
        # monitor on the same site.  No proxy from the environment: checks measure the path
        # from this host to the target.
        self.http = httpx.AsyncClient(
            transport=_PinnedTransport(self.ssl_context, self.settings["allow_private_targets"]),
            headers={"User-Agent": _USER_AGENT}, cookies=http.cookiejar.CookieJar(
                http.cookiejar.DefaultCookiePolicy(allowed_domains=[])), trust_env=False)
        self.ssl_context.set_alpn_protocols(["http/1.1"])  # what httpcore sets on each connect
        self.backend = _PinnedBackend(self.settings["allow_private_targets"])
        self.http_headers: dict[bytes, tuple[bytes, bytes]] = {}
        self.set_region(cfg["region"]["id"])
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self._token_locks: dict[tuple[str, ...], asyncio.Lock] = {}

    def set_region(self, region: str) -> None:
        """Name ``region`` in every HTTP request (an agent learns its region from the server).
        ``http_headers`` are an HTTP check's headers, as httpx's client would send them."""
        self.http.headers[REGION_HEADER] = region
        self.http_headers = _header_table({
            "Accept": "*/*", "Accept-Encoding": "gzip, deflate", "Connection": "keep-alive",
            "User-Agent": _USER_AGENT, REGION_HEADER: region})

    @functools.cached_property
    def resolver(self) -> dns.asyncresolver.Resolver:
        """The DNS resolver, made for the first DNS or DOMAIN check."""
        return _make_resolver(self.nameservers)

    async def aclose(self) -> None:
        """Close the shared HTTP client's connections."""
        await self.http.aclose()

    async def oauth2_token(self, auth: dict[str, Any], timeout: float) -> str:
        """A client-credentials access token, fetched once and reused until ``expires_in``
        passes (less a margin), so checks do not hammer the identity provider."""
        key = _oauth2_key(auth)
        async with self._token_locks.setdefault(key, asyncio.Lock()):
            token, expires = self._tokens.get(key, ("", 0.0))
            if token and time.monotonic() < expires:
                return token
            token, lifetime = await _fetch_oauth2_token(self.http, auth, timeout)
            self._tokens[key] = (token, time.monotonic() + max(lifetime - 30, lifetime / 2))
            return token

    def forget_oauth2_token(self, auth: dict[str, Any]) -> None:
        """Drop a token the API refused, so the next check fetches a new one."""
        self._tokens.pop(_oauth2_key(auth), None)


def _oauth2_key(auth: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(auth.get(k) or "") for k in (
        "oauth2TokenUrl", "oauth2ClientId", "oauth2ClientSecret", "oauth2Scope",
        "oauth2GrantType"))


_TOKEN_MAX_BYTES = 65_536  # of a token endpoint's answer


async def _fetch_capped(client: httpx.AsyncClient, method: str, url: str, limit: int,
                        **request: Any) -> tuple[int, bytes]:
    """One request and at most ``limit`` bytes of its answer, asked for uncompressed (so the
    cap bounds what is parsed): the status code and those bytes."""
    headers = {**request.pop("headers", {}), "Accept-Encoding": "identity"}
    async with client.stream(method, url, headers=headers, **request) as response:
        return response.status_code, await _read_capped(response, limit)


async def _fetch_oauth2_token(client: httpx.AsyncClient, auth: dict[str, Any],
                              timeout: float) -> tuple[str, float]:
    """POST the client credentials in the form body; if the server refuses that as
    invalid_client, try HTTP Basic (RFC 6749 section 2.3.1 allows either)."""
    url = auth.get("oauth2TokenUrl") or ""
    client_id, secret = auth.get("oauth2ClientId") or "", auth.get("oauth2ClientSecret") or ""
    form = {"grant_type": auth.get("oauth2GrantType") or "client_credentials"}
    if auth.get("oauth2Scope"):
        form["scope"] = auth["oauth2Scope"]
    attempts: list[tuple[dict[str, str], httpx.BasicAuth | None]] = [
        ({**form, "client_id": client_id, "client_secret": secret}, None),
        (form, httpx.BasicAuth(client_id, secret))]
    try:
        for data, basic in attempts:
            async with asyncio.timeout(timeout):
                status, answer = await _fetch_capped(
                    client, "POST", url, _TOKEN_MAX_BYTES, data=data,
                    auth=basic or httpx.USE_CLIENT_DEFAULT, timeout=timeout)
            if status not in (400, 401) or basic is not None:
                break
            if b"invalid_client" not in answer:
                break
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        message, category = _describe_error(exc, timeout)
        raise _ProbeError(f"OAuth2 token endpoint: {message}", category) from None
    if status != 200:
        raise _ProbeError(f"OAuth2 token endpoint answered HTTP {status}",
                          "CONFIGURATION_ERROR" if status < 500 else "THIRD_PARTY_SERVICE")
    try:
        body = json.loads(answer)
        return str(body["access_token"]), float(body.get("expires_in") or 300)
    except (ValueError, KeyError, TypeError):
        raise _ProbeError("OAuth2 token endpoint sent no access_token",
                          "THIRD_PARTY_SERVICE") from None


async def _auth_headers(monitor: dict[str, Any], ctx: ProbeContext,
                        timeout: float) -> tuple[dict[str, str], dict[str, str]]:
    """Headers and query parameters for the monitor's ``apiAuthConfig``."""
    auth = monitor.get("apiAuthConfig") or {}
    kind = (auth.get("type") or "none").lower()
    if kind == "none":
        return {}, {}
    if kind == "bearer":
        return {"Authorization": f"Bearer {auth.get('token') or ''}"}, {}
    if kind == "basic":
        pair = f"{auth.get('username') or ''}:{auth.get('password') or ''}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}, {}
    if kind == "api_key":
        key = str(auth.get("apiKey") or "")
        if (auth.get("apiKeyLocation") or "header").lower() == "query":
            return {}, {auth.get("apiKeyName") or auth.get("apiKeyHeader") or "api_key": key}
        return {auth.get("apiKeyHeader") or auth.get("apiKeyName") or "X-API-Key": key}, {}
    if kind == "jwt":
        prefix = auth.get("jwtPrefix", "Bearer")
        value = f"{prefix} {auth.get('jwtToken') or ''}" if prefix else auth.get("jwtToken") or ""
        return {auth.get("jwtHeader") or "Authorization": value}, {}
    if kind == "oauth2":
        return {"Authorization": f"Bearer {await ctx.oauth2_token(auth, timeout)}"}, {}
    raise _ProbeError(f"unknown apiAuthConfig type {kind!r}", "CONFIGURATION_ERROR")


def _request_headers(monitor: dict[str, Any]) -> dict[str, str]:
    """The monitor's ``requestHeaders``: a JSON object, stored as a string."""
    raw = monitor.get("requestHeaders")
    if not raw:
        return {}
    try:
        headers = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise _ProbeError("requestHeaders is not valid JSON", "CONFIGURATION_ERROR") from None
    if not isinstance(headers, dict):
        raise _ProbeError("requestHeaders must be a JSON object", "CONFIGURATION_ERROR")
    return {str(k): str(v) for k, v in headers.items()}


# Assertions.  The body is read up to probes.max_body_bytes (the rest is never downloaded), so
# TEXT_BODY / JSON_BODY see at most that much.  MATCHES runs in the ``regex`` package with a
# timeout, in a worker thread (regex releases the GIL while matching), so a pattern that
# backtracks without end gives up after _REGEX_TIMEOUT seconds and never stalls the event loop.

_ACTUAL_CHARS = 200     # an assertion result shows this much of the actual value
_REGEX_TIMEOUT = 0.25   # seconds one MATCHES may run


class _AssertionProblem(Exception):
    """An assertion that cannot be judged (a body that is not JSON, a runaway regex)."""


@dataclass
class _Seen:
    """What assertions read from one response: the body as received (at most the cap),
    decoded only when an assertion reads it."""

    status_code: int
    response_time: int
    raw_headers: list[tuple[bytes, bytes]]
    raw: bytes
    cap: int

    @functools.cached_property
    def headers(self) -> httpx.Headers:
        return httpx.Headers(self.raw_headers)

    @functools.cached_property
    def text(self) -> str:
        body = _decoded(self.raw, self.headers.get("content-encoding", ""), self.cap)
        charset = httpx.Response(200, headers=self.headers).charset_encoding or "utf-8"
        try:
            return body.decode(charset, "replace")
        except LookupError:
            return body.decode("utf-8", "replace")

    @functools.cached_property
    def data(self) -> Any:
        try:
            return json.loads(self.text)
        except ValueError:
            raise _AssertionProblem("response body is not JSON") from None


def _actual(assertion: dict[str, Any], seen: _Seen) -> Any:
    """The value an assertion tests; a JSONPath matching several nodes gives their list."""
    source = assertion["source"]
    if source == "STATUS_CODE":
        return seen.status_code
    if source == "RESPONSE_TIME":
        return seen.response_time
    if source == "HEADERS":
        return seen.headers.get(assertion["property"])
    if source == "TEXT_BODY":
        return seen.text
    values = bounded_jsonpath().find(assertion["property"], seen.data).values()
    return values[0] if len(values) == 1 else (values or None)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


async def _matches(pattern: str, text: str) -> bool:
    import regex

    def search() -> bool:
        return regex.search(pattern, text, timeout=_REGEX_TIMEOUT, concurrent=True) is not None
    try:
        return await asyncio.to_thread(search)
    except TimeoutError:
        raise _AssertionProblem(f"regular expression gave up after {_REGEX_TIMEOUT} s") from None


async def _compare(comparison: str, actual: Any, target: str) -> bool:
    text, positive = _as_text(actual), comparison in ("EQUALS", "CONTAINS", "IS_EMPTY")
    if comparison in ("EQUALS", "NOT_EQUALS"):
        a, b = _number(actual), _number(target)
        return (a == b if a is not None and b is not None else text == target) == positive
    if comparison in ("CONTAINS", "NOT_CONTAINS"):
        return (target in text) == positive
    if comparison in _UNARY_COMPARISONS:
        return (actual in (None, "", [], {})) == positive
    if comparison == "MATCHES":
        return await _matches(target, text)
    a, b = _number(actual), _number(target)
    if a is None or b is None:
        raise _AssertionProblem(f"{comparison} needs numbers")
    return a < b if comparison == "LESS_THAN" else a > b


async def _assertion_result(assertion: dict[str, Any], seen: _Seen) -> dict[str, Any]:
    """One assertion judged: passed, the actual value (cut) and why it could not be judged."""
    result = {**assertion, "passed": False, "actual": None}
    try:
        actual = _actual(assertion, seen)
        result["actual"] = None if actual is None else _as_text(actual)[:_ACTUAL_CHARS]
        result["passed"] = await _compare(assertion["comparison"], actual, assertion["target"])
    except _AssertionProblem as exc:
        result["error"] = str(exc)
    return result


def _assertion_error(failed: list[dict[str, Any]]) -> str:
    first = failed[0]
    what = " ".join(p for p in (first["source"], first.get("property"), first["comparison"],
                                repr(first["target"]) if first["target"] else "") if p)
    why = first.get("error") or f"actual {first['actual']!r}"
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"assertion failed: {what}: {why}{more}"


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of the raw body: reading stops there (the caller closes the
    connection), so an endless or huge answer costs a check no more than that."""
    return await _capped(response.aiter_raw(), limit)


async def _capped(body: AsyncIterable[bytes], limit: int) -> bytes:
    """At most ``limit`` bytes of ``body`` (see _read_capped)."""
    chunks, size = [], 0
    async for chunk in body:
        chunks.append(chunk[:limit - size])
        size += len(chunks[-1])
        if size >= limit:
            break
    return b"".join(chunks)


def _decoded(raw: bytes, encoding: str, cap: int) -> bytes:
    """A body without its Content-Encoding (gzip, deflate: what the probe accepts), never more
    than ``cap`` bytes however well it compresses."""
    for coding in reversed([c.strip().lower() for c in encoding.split(",") if c.strip()]):
        if coding == "identity":
            continue
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise _AssertionProblem(f"response body has an unsupported encoding: {coding}")
        try:  # 47: gzip or zlib header; a deflate body without one is raw deflate
            raw = zlib.decompressobj(47 if coding != "deflate" or raw[:1] == b"x" else -15
                                     ).decompress(raw, cap)
        except zlib.error:
            raise _AssertionProblem(f"response body is not valid {coding}") from None
    return raw


def _certificate_details(cert: dict[str, Any]) -> dict[str, Any]:
    days = (cert["notAfter"] - datetime.now(timezone.utc)) // timedelta(days=1)
    return {"daysRemaining": days, "issuer": cert["issuer"], "subject": cert["subject"],
            "validFrom": cert["notBefore"].isoformat(), "validTo": cert["notAfter"].isoformat()}


def _expiry_days(monitor: dict[str, Any]) -> int:
    return monitor.get("sslCertExpiryDays") or _DEFAULT_EXPIRY_DAYS


async def _judge_http(monitor: dict[str, Any], result: CheckResult, seen: _Seen,
                      der: bytes | None) -> CheckResult:
    """Status code rule, then assertions, then (https) the certificate's days remaining."""
    expected, code = monitor.get("expectedStatusCode"), seen.status_code
    problems: list[tuple[str, str, str]] = []
    if not ((code == expected) if expected else (200 <= code < 400)):
        problems.append((Status.DOWN, f"HTTP {code}, expected {expected or '2xx or 3xx'}",
                         "SERVER_ERROR" if code >= 500 else "APPLICATION_ERROR"))
    assertions = monitor.get("assertions") or []
    if assertions:
        results = [await _assertion_result(a, seen) for a in assertions]
        result.details = {"assertionResults": results}
        failed = [r for r in results if not r["passed"]]
        if failed:
            problems.append((Status.DOWN, _assertion_error(failed), "APPLICATION_ERROR"))
    if der is not None:
        with contextlib.suppress(ValueError):
            cert = _certificate_details(_parse_certificate(der))
            result.details = {**(result.details or {}), "certificate": cert}
            if cert["daysRemaining"] < _expiry_days(monitor):
                problems.append((Status.DEGRADED, f"certificate expires in {cert['daysRemaining']}"
                                 " days", "SSL_CERTIFICATE"))
    result.status, result.error, result.category = _verdict(problems)
    return result


_MAX_REDIRECTS = 20  # followed by one check, as httpx's default
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HTTP_ERRORS = (httpx.HTTPError, httpcore.UnsupportedProtocol, httpcore.ProtocolError,
                httpcore.TimeoutException, httpcore.NetworkError, TimeoutError, OSError)


@functools.lru_cache(maxsize=4096)
def _probe_url(text: str, params: tuple[tuple[str, str], ...]) -> httpx.URL:
    """A monitor's URL, parsed as httpx parses it (IDNA host names, percent-encoding, the same
    errors), once per distinct URL; an auth's query parameters join the URL's own query."""
    url = httpx.URL(text)
    return url.copy_merge_params(params) if params else url


def _header_table(headers: dict[str, str]) -> dict[bytes, tuple[bytes, bytes]]:
    """Headers by lower-case name, encoded as httpx encodes them (ASCII, else ValueError)."""
    return {name.lower().encode("ascii"): (name.encode("ascii"), value.encode("ascii"))
            for name, value in headers.items()}


@dataclass
class _HttpRequest:
    """One request of an HTTP check: redirects make the next from the previous."""

    method: str
    url: httpx.URL
    headers: dict[bytes, tuple[bytes, bytes]]  # by lower-case name
    body: bytes | None

    def target(self) -> httpcore.URL:
        if self.url.is_relative_url:  # no scheme or no host
            raise httpcore.UnsupportedProtocol(
                "Request URL is missing an 'http://' or 'https://' protocol.")
        if self.url.scheme not in ("http", "https"):
            raise httpcore.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{self.url.scheme}://'.")
        return httpcore.URL(scheme=self.url.raw_scheme, host=self.url.raw_host,
                            port=self.url.port, target=self.url.raw_path)

    def redirected(self, code: int, location: str) -> _HttpRequest:
        """The request a redirect asks for, as httpx makes it: a relative Location resolved,
        303 (and 302, and 301 after a POST) turned into a body-less GET, Authorization kept
        only on the same origin (or its https upgrade), no Cookie header."""
        try:
            url = httpx.URL(location)
        except httpx.InvalidURL as exc:
            raise httpx.RemoteProtocolError(f"Invalid URL in location header: {exc}.") from None
        if url.scheme and not url.host:
            url = url.copy_with(host=self.url.host)
        if url.is_relative_url:
            url = self.url.join(url)
        if self.url.fragment and not url.fragment:
            url = url.copy_with(fragment=self.url.fragment)
        method = "GET" if (code in (302, 303) and self.method != "HEAD") or (
            code == 301 and self.method == "POST") else self.method
        headers = {k: v for k, v in self.headers.items() if k != b"cookie"}
        if _origin(url) != _origin(self.url):
            if not (url.host == self.url.host and _origin(self.url)[::2] == ("http", 80)
                    and _origin(url)[::2] == ("https", 443)):
                headers.pop(b"authorization", None)
            headers[b"host"] = (b"Host", url.netloc)
        changed = method != self.method and method == "GET"
        if changed:
            headers.pop(b"content-length", None)
            headers.pop(b"transfer-encoding", None)
        return _HttpRequest(method, url, headers, None if changed else self.body)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)


def _http_request(monitor: dict[str, Any], ctx: ProbeContext, headers: dict[str, str],
                  params: dict[str, str]) -> _HttpRequest:
    """The check's first request, with the headers httpx would send: Host, the client's,
    the monitor's and its auth's, Basic auth from the URL's user and password, and
    Content-Length with a body (0 for a POST, PUT or PATCH without one)."""
    url = _probe_url(monitor.get("url") or "", tuple(params.items()))
    text = monitor.get("requestBody")
    method, body = (monitor.get("httpMethod") or "GET").upper(), text.encode() if text else None
    table = {**ctx.http_headers, **_header_table(headers)}
    if url.username or url.password:
        pair = base64.b64encode(f"{url.username}:{url.password}".encode())
        table[b"authorization"] = (b"Authorization", b"Basic " + pair)
    if url.host and b"host" not in table:
        table = {b"host": (b"Host", url.netloc), **table}
    if body:
        table.setdefault(b"content-length", (b"Content-Length", str(len(body)).encode()))
    elif method in ("POST", "PUT", "PATCH") and not table.keys() & {b"content-length",
                                                                     b"transfer-encoding"}:
        table[b"content-length"] = (b"Content-Length", b"0")
    return _HttpRequest(method, url, table, body)


@dataclass
class _HttpAnswer:
    """What one request got back: status, headers, at most the cap of the body (none for a
    redirect that is followed) and the server certificate (https)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    der: bytes | None = None

    def location(self) -> str | None:
        """The Location header of a redirect, else None."""
        values = [v for k, v in self.headers if k.lower() == b"location"]
        if self.status not in _REDIRECTS or not values:
            return None
        raw = b", ".join(values)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return raw.decode("latin-1")


@dataclass
class _HttpExchange:
    """An HTTP check's requests, each on a connection of its own that is closed when its
    answer is read (closing the socket ends httpcore's connection too: the response is not
    closed first, which would take its anyio lock, a turn of the event loop, once more);
    ``status`` is the final answer's, for a failure after it."""

    ctx: ProbeContext
    timeout: float
    follow: bool
    timings: dict[str, float] | None
    status: int | None = None

    async def send(self, request: _HttpRequest) -> _HttpAnswer:
        """The answer, after at most _MAX_REDIRECTS redirects when ``follow``."""
        for _ in range(_MAX_REDIRECTS + 1):
            answer = await self._one(request)
            location = answer.location() if self.follow else None
            if location is None:
                return answer
            request = request.redirected(answer.status, location)
        raise httpx.TooManyRedirects("Exceeded maximum allowed redirects.")

    async def _one(self, request: _HttpRequest) -> _HttpAnswer:
        target, timings, timeout = request.target(), self.timings, self.timeout
        origin = target.origin
        host = origin.host.decode("ascii")
        stream = await self.ctx.backend.connect_tcp(host, origin.port, timeout=timeout,
                                                    timings=timings)
        try:
            started = time.perf_counter()
            if origin.scheme == b"https":
                await stream.start_tls(self.ctx.ssl_context, host, timeout)
                if timings is not None:
                    timings["tls"] += time.perf_counter() - started
            sending = time.perf_counter()
            response = await httpcore.AsyncHTTP11Connection(origin, stream).handle_async_request(
                httpcore.Request(request.method.encode(), target, headers=list(
                    request.headers.values()), content=request.body, extensions={
                    "timeout": dict.fromkeys(("connect", "read", "write", "pool"), timeout)}))
            answered = time.perf_counter()
            answer = _HttpAnswer(response.status, response.headers)
            if not (self.follow and answer.location() is not None):
                self.status = answer.status
                answer.der = _peer_der(stream)
                answer.body = await _capped(cast(AsyncIterable[bytes], response.stream),
                                            self.ctx.settings["max_body_bytes"])
            if timings is not None:
                timings["ttfb"] += answered - sending
                timings["transfer"] += time.perf_counter() - answered
            return answer
        finally:
            await stream.aclose()


def _peer_der(stream: _AsyncioStream) -> bytes | None:
    """The server certificate of an https connection (None over plain http)."""
    ssl_object = stream.get_extra_info("ssl_object")
    return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None


async def probe_http(monitor: dict[str, Any], ctx: ProbeContext) -> CheckResult:
    """WEBSITE and API: one request, body read up to probes.max_body_bytes, judged by the
    final status code, the monitor's assertions and (https) the certificate's expiry.

    Without ``expectedStatusCode`` any 2xx/3xx after following redirects is UP; an expected
    3xx is checked on the first answer, so redirects are not followed then."""
    timeout = _timeout(monitor)
    expected = monitor.get("expectedStatusCode")
    auth = monitor.get("apiAuthConfig") or {}
    try:
        headers = _request_headers(monitor)
        auth_headers, params = await _auth_headers(monitor, ctx, timeout)
    except _ProbeError as exc:
        return _down(str(exc), exc.category)
    timings = dict.fromkeys(_TIMING_PHASES, 0.0) if monitor.get("performanceTimings") else None
    try:
        request = _http_request(monitor, ctx, {**headers, **auth_headers}, params)
    except (httpx.InvalidURL, ValueError) as exc:
        return _down(f"invalid URL: {exc}", "CONFIGURATION_ERROR")
    exchange = _HttpExchange(ctx, timeout, not 300 <= (expected or 0) < 400, timings)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            answer = await exchange.send(request)
    except _HTTP_ERRORS as exc:
        message, category = _describe_error(exc, timeout)
        return _down(message, category, response_time=_elapsed_ms(started),
                     status_code=exchange.status)
    code = answer.status
    result = CheckResult(status=Status.UP, response_time=_elapsed_ms(started), status_code=code)
    if timings is not None:
        result.timings = {phase: round(seconds * 1000, 3) for phase, seconds in timings.items()}
    if code == 401 and (auth.get("type") or "").lower() == "oauth2":
        ctx.forget_oauth2_token(auth)
    seen = _Seen(code, result.response_time or 0, answer.headers, answer.body,
                 ctx.settings["max_body_bytes"])
    return await _judge_http(monitor, result, seen, answer.der)


# UDP has no handshake, so the rule is nmap's: a reply means open (UP); an ICMP port
# unreachable, which Linux reports as ECONNREFUSED on a connected socket, means closed (DOWN);
# silence until the timeout means "open|filtered" (UP), since a service that ignores our
# datagram and a firewall that drops it look the same from here.

_UDP_PAYLOAD = b"\r\n"


class _UdpProbe(asyncio.DatagramProtocol):
    """Resolves ``outcome`` with True on a reply, or the error an ICMP message raised."""

    def __init__(self) -> None:
        self.outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.outcome.done():
            self.outcome.set_result(True)

    def error_received(self, exc: Exception) -> None:
        if not self.outcome.done():
            self.outcome.set_exception(exc)


async def _udp_check(host: str, port: int, timeout: float) -> str:
    """"open" or "open|filtered"; raises ConnectionRefusedError when the port is closed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with asyncio.timeout_at(deadline):
        transport, protocol = await loop.create_datagram_endpoint(
            _UdpProbe, remote_addr=(host, port))
    try:
        transport.sendto(_UDP_PAYLOAD)
        try:
            await asyncio.wait_for(protocol.outcome, max(deadline - loop.time(), 0))
        except TimeoutError:
            return "open|filtered"
        return "open"
    finally:
        transport.close()


async def checked_host(host: str, port: int, ctx: ProbeContext) -> str:
    """What a non-HTTP probe connects to: ``host`` itself where private targets are allowed
    (resolved as usual), else its first address once resolve_target has checked them all."""
    if ctx.settings["allow_private_targets"]:
        return host
    return (await resolve_target(host, port, False))[0]


async def probe_port(monitor: dict[str, Any], ctx: ProbeContext) -> CheckResult:
    """PORT: a completed TCP handshake is UP; UDP follows the rule above."""
    host, port = _target_host(monitor.get("url") or ""), monitor.get("port")
    if not host or not port:
        return _down("a PORT monitor needs a host and a port", "CONFIGURATION_ERROR")
    timeout = _timeout(monitor)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            address = await checked_host(host, port, ctx)
        if (monitor.get("protocol") or "TCP").upper() == "UDP":
            state = await _udp_check(address, port, timeout)
            return CheckResult(status=Status.UP, response_time=_elapsed_ms(started),
                               details={"udp": state})
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(address, port)
        writer.transport.abort()
    except ConnectionRefusedError:
        return _down(f"port {port} is closed", "INFRASTRUCTURE",
                     response_time=_elapsed_ms(started))
    except (TimeoutError, OSError, PrivateTargetError) as exc:
        message, category = _describe_error(exc, timeout)
        return _down(message, category, response_time=_elapsed_ms(started))
    return CheckResult(status=Status.UP, response_time=_elapsed_ms(started))


_PING_COUNT = 3
_PING_INTERVAL = 0.2


async def probe_ping(monitor: dict[str, Any], ctx: ProbeContext) -> CheckResult:
    """PING: a few ICMP echoes; all lost is DOWN, some lost DEGRADED.  Raw sockets as root,
    else the kernel's unprivileged ICMP datagram sockets (net.ipv4.ping_group_range)."""
    host = _target_host(monitor.get("url") or "")
    if not host:
        return _down("a PING monitor needs a host", "CONFIGURATION_ERROR")
    timeout = _timeout(monitor)
    privileged = hasattr(os, "geteuid") and os.geteuid() == 0
    try:
        address = await checked_host(host, 0, ctx)
        reply = await icmplib.async_ping(address, count=_PING_COUNT, interval=_PING_INTERVAL,
                                         timeout=timeout / _PING_COUNT, privileged=privileged)
    except (icmplib.NameLookupError, socket.gaierror):
        return _down(f"cannot resolve {host}", "DNS_FAILURE")
    except PrivateTargetError as exc:
        return _down(str(exc), "CONFIGURATION_ERROR")
    except icmplib.SocketPermissionError:
        return _down("ICMP is not permitted: run as root or allow this group in "
                     "net.ipv4.ping_group_range", "CONFIGURATION_ERROR")
    except (icmplib.ICMPLibError, OSError) as exc:
        return _down(f"ping failed: {exc}", "INFRASTRUCTURE")
    details = {"address": reply.address, "packetsSent": reply.packets_sent,
               "packetsReceived": reply.packets_received,
               "packetLoss": round(reply.packet_loss * 100, 1), "rttMin": reply.min_rtt,
               "rttAvg": reply.avg_rtt, "rttMax": reply.max_rtt, "jitter": reply.jitter}
    if not reply.is_alive:
        return _down(f"no reply to {reply.packets_sent} pings", "NETWORK_TIMEOUT",
                     details=details)
    result = CheckResult(status=Status.UP, response_time=round(reply.avg_rtt), details=details)
    if reply.packet_loss:
        result.status, result.category = Status.DEGRADED, "NETWORK_TIMEOUT"
        result.error = f"{details['packetLoss']:g}% packet loss"
    return result


_DNS_RECORDS = ("A", "AAAA", "CNAME", "MX", "TXT")


def _rdata_text(rdata: Any) -> str:
    """One answer as text: the address, the target name, "preference exchange", or TXT."""
    if hasattr(rdata, "address"):
        return rdata.address
    if hasattr(rdata, "exchange"):
        return f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True)}"
    if hasattr(rdata, "target"):
        return rdata.target.to_text(omit_final_dot=True)
    if hasattr(rdata, "strings"):
        return b"".join(rdata.strings).decode("utf-8", "replace")
    return rdata.to_text()


async def _resolve(ctx: ProbeContext, name: str, rdtype: str, timeout: float) -> list[str]:
    """The answers' text; dnspython's exceptions say what went wrong."""
    answer = await ctx.resolver.resolve(name, rdtype, lifetime=timeout, search=False)
    return [_rdata_text(rdata) for rdata in answer]


def _dns_error(exc: Exception, name: str, rdtype: str) -> tuple[str, str]:
    import dns.exception
    import dns.resolver
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return f"{name} does not exist (NXDOMAIN)", "DNS_FAILURE"
    if isinstance(exc, dns.resolver.NoAnswer):
        return f"{name} has no {rdtype} record", "DNS_FAILURE"
    if isinstance(exc, dns.resolver.NoNameservers):
        return f"no nameserver could answer for {name} (SERVFAIL)", "DNS_FAILURE"
    if isinstance(exc, dns.exception.Timeout):
        return f"DNS query for {name} timed out", "NETWORK_TIMEOUT"
    return f"DNS query for {name} failed: {exc}", "DNS_FAILURE"


def _canonical(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return text.strip().lower().rstrip(".")


def _dns_matches(expected: str, answers: list[str], rdtype: str) -> bool:
    """Whether ``expected`` is among the answers: addresses compared as addresses, names
    without case or final dot (an MX matches on its exchange or on "preference exchange")."""
    if rdtype == "TXT":
        return expected.strip() in answers
    wanted = _canonical(expected)
    return any(wanted in (_canonical(a), _canonical(a.split()[-1])) for a in answers)


async def probe_dns(monitor: dict[str, Any], ctx: ProbeContext) -> CheckResult:
    """DNS: resolve one record type; with ``expectedIp``, that value must be in the answer."""
    import dns.exception
    name = _target_host(monitor.get("url") or "")
    rdtype = (monitor.get("dnsRecord") or "A").upper()
    if not name:
        return _down("a DNS monitor needs a host name", "CONFIGURATION_ERROR")
    if rdtype not in _DNS_RECORDS:
        return _down(f"unsupported DNS record type {rdtype}", "CONFIGURATION_ERROR")
    timeout = _timeout(monitor)
    started = time.perf_counter()
    try:
        answers = await _resolve(ctx, name, rdtype, timeout)
    except dns.exception.DNSException as exc:
        return _down(*_dns_error(exc, name, rdtype), response_time=_elapsed_ms(started))
    result = CheckResult(status=Status.UP, response_time=_elapsed_ms(started),
                         details={"record": rdtype, "answers": answers})
    expected = monitor.get("expectedIp")
    if expected and not _dns_matches(expected, answers, rdtype):
        result.status, result.category = Status.DOWN, "DNS_FAILURE"
        result.error = f"expected {expected} in {rdtype} answers, got {', '.join(answers)}"
    return result


# SSL_CERT.  The certificate must be read even when it does not verify, and the stdlib only
# decodes verified ones; so a small DER reader takes the validity dates and names from the
# raw certificate (RFC 5280 section 4.1).

_OID_COMMON_NAME = b"\x55\x04\x03"
_OID_ORGANIZATION = b"\x55\x04\x0a"
_DER_STRINGS = {0x1E: "utf-16-be", 0x1C: "utf-32-be", 0x14: "latin-1"}  # else UTF-8
_HOSTNAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def _der_items(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, content start, content end) of each DER element between start and end."""
    items = []
    while start < end:
        tag, length = der[start], der[start + 1]
        start += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(der[start:start + count], "big")
            start += count
        items.append((tag, start, start + length))
        start += length
    if start != end:
        raise ValueError("malformed DER")
    return items


def _der_time(der: bytes, tag: int, start: int, end: int) -> datetime:
    text = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime: two-digit year, 50-99 meaning 19xx
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)


def _der_name(der: bytes, start: int, end: int) -> str:
    """The common name of an X.501 Name, else its organization."""
    found: dict[bytes, str] = {}
    for _, set_start, set_end in _der_items(der, start, end):
        for _, attr_start, attr_end in _der_items(der, set_start, set_end):
            (_, oid_start, oid_end), (tag, value_start, value_end) = _der_items(
                der, attr_start, attr_end)
            value = der[value_start:value_end].decode(_DER_STRINGS.get(tag, "utf-8"), "replace")
            found.setdefault(der[oid_start:oid_end], value)
    return found.get(_OID_COMMON_NAME) or found.get(_OID_ORGANIZATION) or ""


def _parse_certificate(der: bytes) -> dict[str, Any]:
    """subject, issuer, notBefore and notAfter of a DER X.509 certificate."""
    try:
        (_, cert_start, cert_end), = _der_items(der, 0, len(der))
        _, tbs_start, tbs_end = _der_items(der, cert_start, cert_end)[0]
        fields = _der_items(der, tbs_start, tbs_end)
        if fields[0][0] == 0xA0:  # explicit version; v1 certificates leave it out
            fields = fields[1:]
        issuer, validity, subject = fields[2], fields[3], fields[4]
        not_before, not_after = (_der_time(der, *item)
                                 for item in _der_items(der, validity[1], validity[2]))
        return {"subject": _der_name(der, subject[1], subject[2]),
                "issuer": _der_name(der, issuer[1], issuer[2]),
                "notBefore": not_before, "notAfter": not_after}
    except (IndexError, ValueError) as exc:
        raise ValueError(f"unreadable certificate: {exc}") from None


async def _peer_certificate(host: str, address: str, port: int,
                            context: ssl.SSLContext) -> bytes:
    """The DER certificate ``address`` presents for ``host``; raises if ``context`` rejects it."""
    _, writer = await asyncio.open_connection(address, port, ssl=context, server_hostname=host)
    try:
        return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.transport.abort()


async def probe_ssl(monitor: dict[str, Any], ctx: ProbeContext) -> CheckResult:
    """SSL_CERT: handshake, read the certificate, judge dates, trust and name, in that order.

    DEGRADED when fewer than ``sslCertExpiryDays`` (default 30) days remain."""
    url = (monitor.get("url") or "").strip()
    try:
        parts = urlsplit(url if "://" in url else f"//{url}")
        host, port = parts.hostname or "", parts.port or 443
    except ValueError as exc:
        return _down(f"invalid URL: {exc}", "CONFIGURATION_ERROR")
    timeout = _timeout(monitor)
    started = time.perf_counter()
    rejected: ssl.SSLCertVerificationError | None = None
    try:
        async with asyncio.timeout(timeout):
            address = await checked_host(host, port, ctx)
            try:
                der = await _peer_certificate(host, address, port, ctx.ssl_context)
            except ssl.SSLCertVerificationError as exc:
                rejected = exc
                der = await _peer_certificate(host, address, port, ctx.unverified_ssl_context)
        cert = _parse_certificate(der)
    except (TimeoutError, OSError, PrivateTargetError) as exc:
        message, category = _describe_error(exc, timeout)
        return _down(message, category, response_time=_elapsed_ms(started))
    except ValueError as exc:
        return _down(str(exc), "SSL_CERTIFICATE", response_time=_elapsed_ms(started))
    now = datetime.now(timezone.utc)
    details = _certificate_details(cert)
    days = details["daysRemaining"]
    result = CheckResult(status=Status.DOWN, response_time=_elapsed_ms(started),
                         category="SSL_CERTIFICATE", details=details)
    if now >= cert["notAfter"]:
        result.error = f"certificate expired on {cert['notAfter']:%Y-%m-%d}"
    elif now < cert["notBefore"]:
        result.error = f"certificate is not valid before {cert['notBefore']:%Y-%m-%d}"
    elif rejected is not None and rejected.verify_code in _HOSTNAME_MISMATCH:
        result.error = f"certificate is for {cert['subject']!r}, not {host}"
    elif rejected is not None:
        result.error = f"certificate is not trusted: {rejected.verify_message}"
    elif days < _expiry_days(monitor):
        result.status, result.error = Status.DEGRADED, f"certificate expires in {days} days"
    else:
        result.status, result.category = Status.UP, None
    return result


# DOMAIN.  Registration data comes from RDAP, else WHOIS, and is fetched at most once per
# probes.domain_check_hours: until then the previous check's copy (its fetchedAt) is reused
# and only the days remaining are recomputed.  DNS and blocklist answers are asked each check.

_IANA_WHOIS = ("whois.iana.org", 43)
_REGISTRATION_KEYS = ("source", "fetchedAt", "expiresAt", "registrar", "status", "nameservers")
_WHOIS_MAX_BYTES = 256 * 1024
_WHOIS_LABELS = {
    "expiresAt": r"registry expiry date|registrar registration expiration date|expiration date"
                 r"|expiry date|expiration time|expires on|expires|expire|paid-till|renewal date",
    "registrar": r"registrar|registrar name|sponsoring registrar",
    "status": r"domain status|status|state",
    "nameservers": r"name server|nserver|nameserver|nameservers",
    "refer": r"refer|whois",
}
_WHOIS_PATTERNS = {key: re.compile(rf"^[ \t]*(?:{labels})[ \t]*:[ \t]*(\S.*?)\s*$", re.I | re.M)
                   for key, labels in _WHOIS_LABELS.items()}
_EPP_WORD = re.compile(r"(?<=[a-z])([A-Z])")  # clientHold -> client Hold: RDAP's (RFC 8056)
_DATE_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d", "%Y.%m.%d", "%Y/%m/%d", "%d-%b-%Y",
                 "%d.%m.%Y", "%d/%m/%Y", "%Y%m%d", "%d %b %Y", "%b %d %Y")


def _parse_date(text: str | None) -> datetime | None:
    """A registry date (ISO 8601 or a common WHOIS format) in UTC, or None.  WHOIS values
    may trail a time or a zone name, so the first two words and the first word are tried too."""
    words = (text or "").split()
    for candidate in dict.fromkeys((" ".join(words), " ".join(words[:2]), "".join(words[:1]))):
        for fmt in (None, *_DATE_FORMATS):
            try:
                parsed = (datetime.fromisoformat(candidate) if fmt is None
                          else datetime.strptime(candidate, fmt))
            except ValueError:
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


def _registration(source: str, expires: datetime | None, registrar: str | None,
                  status: list[str], nameservers: list[str]) -> dict[str, Any]:
    return {"source": source, "fetchedAt": datetime.now(timezone.utc).isoformat(),
            "expiresAt": expires.isoformat() if expires else None, "registrar": registrar,
            "status": sorted({s.lower() for s in status}),
            "nameservers": sorted({n.lower().rstrip(".") for n in nameservers})}


def _rdap_registrar(data: dict[str, Any]) -> str | None:
    for entity in data.get("entities") or []:
        if "registrar" in (entity.get("roles") or []):
            vcard = (entity.get("vcardArray") or [None, []])[1]
            names = [field[3] for field in vcard if field and field[0] == "fn"]
            return names[0] if names else entity.get("handle")
    return None


async def _rdap_lookup(name: str, ctx: ProbeContext, timeout: float) -> dict[str, Any]:
    url = f"{ctx.settings['rdap_url'].rstrip('/')}/domain/{name}"
    try:
        async with asyncio.timeout(timeout):
            status, answer = await _fetch_capped(
                ctx.http, "GET", url, ctx.settings["max_body_bytes"], follow_redirects=True,
                timeout=timeout, headers={"Accept": "application/rdap+json"})
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        message, category = _describe_error(exc, timeout)
        raise _ProbeError(f"RDAP: {message}", category) from None
    if status != 200:
        raise _ProbeError(f"RDAP: HTTP {status}", "THIRD_PARTY_SERVICE")
    try:
        data = json.loads(answer)
        events = {e.get("eventAction"): e.get("eventDate") for e in data.get("events") or []}
        return _registration("rdap", _parse_date(events.get("expiration")),
                             _rdap_registrar(data), list(data.get("status") or []),
                             [ns["ldhName"] for ns in data.get("nameservers") or []])
    except (ValueError, AttributeError, KeyError, TypeError, IndexError):
        raise _ProbeError("RDAP: unreadable answer", "THIRD_PARTY_SERVICE") from None


async def _whois_query(server: tuple[str, int], name: str, timeout: float) -> str:
    """RFC 3912: send the name, read until the server closes (at most _WHOIS_MAX_BYTES)."""
    answer = b""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(*server)
            try:
                writer.write(f"{name}\r\n".encode("ascii"))
                while len(answer) < _WHOIS_MAX_BYTES:
                    chunk = await reader.read(_WHOIS_MAX_BYTES - len(answer))
                    if not chunk:
                        break
                    answer += chunk
            finally:
                writer.transport.abort()
    except (TimeoutError, OSError) as exc:
        message, category = _describe_error(exc, timeout)
        raise _ProbeError(f"WHOIS {server[0]}: {message}", category) from None
    return answer.decode("utf-8", "replace")


async def _whois_lookup(name: str, ctx: ProbeContext, timeout: float) -> dict[str, Any]:
    """Ask the configured server (IANA by default) and follow one referral (refer:/whois:)
    when its answer has no expiry date, as IANA's answer points at the TLD's registry."""
    text = await _whois_query(ctx.whois_server, name, timeout)
    found = {key: pattern.findall(text) for key, pattern in _WHOIS_PATTERNS.items()}
    if not found["expiresAt"] and found["refer"]:
        try:
            server = _split_host_port(found["refer"][0], 43)
        except ValueError:
            raise _ProbeError(f"WHOIS: bad referral {found['refer'][0]!r}",
                              "THIRD_PARTY_SERVICE") from None
        text = await _whois_query(server, name, timeout)
        found = {key: pattern.findall(text) for key, pattern in _WHOIS_PATTERNS.items()}
    if not (found["expiresAt"] or found["registrar"] or found["status"]):
        raise _ProbeError(f"WHOIS: no record for {name}", "THIRD_PARTY_SERVICE")
    return _registration("whois", _parse_date(next(iter(found["expiresAt"]), None)),
                         next(iter(found["registrar"]), None),
                         [_EPP_WORD.sub(r" \1", s.split()[0]) for s in found["status"]],
                         [n.split()[0] for n in found["nameservers"]])


async def _fetch_registration(name: str, ctx: ProbeContext,
                              timeout: float) -> tuple[dict[str, Any] | None, list[str]]:
    """The first answer with an expiry date (RDAP, then WHOIS), else the first answer at all,
    plus the errors met on the way."""
    errors: list[str] = []
    fallback = None
    for lookup in (_rdap_lookup, _whois_lookup):
        try:
            record = await lookup(name, ctx, timeout)
        except _ProbeError as exc:
            errors.append(str(exc))
            continue
        if record["expiresAt"]:
            return record, errors
        fallback = fallback or record
    return fallback, errors


def _cached_registration(last: dict[str, Any], name: str, hours: int) -> dict[str, Any] | None:
    fetched = _parse_date(last.get("fetchedAt")) if last.get("domain") == name else None
    if fetched is None or datetime.now(timezone.utc) - fetched >= timedelta(hours=hours):
        return None
    return {key: last.get(key) for key in _REGISTRATION_KEYS}


def _change(label: str, old: Any, new: Any) -> list[str]:
    """A one-item list describing ``old → new``, or nothing when equal or either is unknown."""
    if old is None or new is None or old == new:
        return []
    return [f"{label} changed: {_show(old)} → {_show(new)}"]


def _show(value: Any) -> str:
    return ", ".join(value) or "none" if isinstance(value, list) else str(value)


async def _dns_answers(ctx: ProbeContext, name: str, rdtype: str,
                       timeout: float) -> list[str] | None:
    """Sorted answers; [] when the name or record does not exist; None when unknown."""
    import dns.exception
    import dns.resolver
    try:
        return sorted(_canonical(a) for a in await _resolve(ctx, name, rdtype, timeout))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException:
        return None


def _blocklist_state(answers: list[str] | None) -> str:
    """Listed when the zone answers; Spamhaus-style 127.255.255.x codes mean it refused us."""
    if answers is None:
        return "unknown"
    if not answers:
        return "clean"
    if all(a.startswith("127.255.255.") for a in answers):
        return "refused"
    return "listed"


async def probe_domain(monitor: dict[str, Any], ctx: ProbeContext) -> CheckResult:
    """DOMAIN: registration expiry (DEGRADED under ``domainExpiryDays``, default 30; DOWN when
    expired or unknown to both RDAP and WHOIS), changes in registrar/status/nameservers and
    NS/A records versus the last check, and DNS blocklist listings (DEGRADED)."""
    try:
        name = _target_host(monitor.get("url") or "").rstrip(".").encode("idna").decode("ascii")
    except UnicodeError:
        name = ""
    if not name:
        return _down(f"invalid domain name {monitor.get('url')!r}", "CONFIGURATION_ERROR")
    timeout = _timeout(monitor)
    last = monitor.get("lastDetails") or {}
    started = time.perf_counter()
    registration = _cached_registration(last, name, ctx.settings["domain_check_hours"])
    errors: list[str] = []
    if registration is None:
        registration, errors = await _fetch_registration(name, ctx, timeout)
    details: dict[str, Any] = {"domain": name, **(registration or {}), "daysRemaining": None}
    problems: list[tuple[str, str, str]] = []
    changes: list[str] = []
    expires = _parse_date(details.get("expiresAt"))
    if registration is None:
        problems.append((Status.DOWN, "; ".join(errors) or "no registration data",
                         "THIRD_PARTY_SERVICE"))
    elif expires is not None:
        days = (expires - datetime.now(timezone.utc)) // timedelta(days=1)
        details["daysRemaining"] = days
        if days < 0:
            problems.append((Status.DOWN, f"domain expired on {expires:%Y-%m-%d}",
                             "CONFIGURATION_ERROR"))
        elif days < (monitor.get("domainExpiryDays") or _DEFAULT_EXPIRY_DAYS):
            problems.append((Status.DEGRADED, f"domain expires in {days} days",
                             "CONFIGURATION_ERROR"))
    if registration is not None and monitor.get("domainMonitorWhois") is not False:
        for key in ("registrar", "status", "nameservers"):
            changes += _change(key, last.get(key), registration[key])
    if monitor.get("domainMonitorDns") is not False:
        ns, a = await asyncio.gather(_dns_answers(ctx, name, "NS", timeout),
                                     _dns_answers(ctx, name, "A", timeout))
        details["dns"] = {"NS": ns, "A": a}
        for rdtype, answers in details["dns"].items():
            changes += _change(f"{rdtype} records", (last.get("dns") or {}).get(rdtype), answers)
    if monitor.get("domainMonitorBlacklist") is not False:
        zones = ctx.settings["blocklists"]
        answers = await asyncio.gather(*(_dns_answers(ctx, f"{name}.{zone}", "A", timeout)
                                         for zone in zones))
        details["blocklists"] = {zone: _blocklist_state(found)
                                 for zone, found in zip(zones, answers, strict=True)}
        problems += [(Status.DEGRADED, f"listed on {zone}", "THIRD_PARTY_SERVICE")
                     for zone, state in details["blocklists"].items() if state == "listed"]
    details["changes"] = changes
    status, error, category = _verdict(problems)
    return CheckResult(status=status, response_time=_elapsed_ms(started), error=error,
                       category=category, details=details)


Probe = Callable[[dict[str, Any], ProbeContext], Awaitable[CheckResult]]


def declare_monitor_types(*types: MonitorType) -> None:
    """Register monitor types in MONITOR_TYPES (validation, scheduling and docs read it)."""
    MONITOR_TYPES.update((t.name, t) for t in types)


declare_monitor_types(
    MonitorType("WEBSITE", "http", probe_http),
    MonitorType("API", "http", probe_http),
    MonitorType("CRON", "text", None, connects=False),
    MonitorType("PING", "host", probe_ping),
    MonitorType("PORT", "host", probe_port),
    MonitorType("DNS", "host", probe_dns, connects=False),
    MonitorType("SSL_CERT", "https", probe_ssl),
    MonitorType("DOMAIN", "host", probe_domain, connects=False),
)


def probe_of(kind: str) -> Probe | None:
    """The probe of a monitor type; None for an unknown type or one that is never probed."""
    declared = MONITOR_TYPES.get(kind)
    return declared.probe if declared else None


def _cause(category: str | None) -> str:
    """``DNS_FAILURE`` -> ``DNS failure``."""
    words = [w if w in ("DNS", "SSL", "DDOS") else w.lower() for w in (category or "").split("_")]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


# --- Scheduler ---

# Probing
#
# Every schedulable monitor has a fixed phase within its interval, taken from a hash of its id,
# and its checks fall on the grid ``phase + k * interval``: 10,000 monitors at 60 s spread over
# the minute whatever the start time, and a restart lands each one back on its own grid.  A heap
# keyed by planned time says what runs next; nothing scans all monitors.  The dispatcher takes
# a concurrency slot BEFORE it starts a check, so a scheduler that falls behind holds a late
# heap, not a pile of waiting tasks.  A monitor goes back on the heap only when its check has
# finished, so one monitor never runs two checks at once; slots missed meanwhile are skipped.

_LAG_WINDOW = 10_000      # latest check starts kept for the lag percentiles
_LAG_WARN = 2.0           # a check starting this many seconds late counts as behind
_LAG_DEGRADED = 10.0      # lag (p99 or backlog) past this many seconds: /health says degraded
_LAG_LOG_EVERY = 60.0     # seconds between two "falling behind" log lines
_RELOAD_CHUNK = 500       # monitor ids per reload query


def check_phase(monitor_id: str, interval: float) -> float:
    """Where in its interval a monitor's checks fall: the same in every process and restart."""
    digest = hashlib.blake2b(monitor_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64 * interval


def next_slot(monitor_id: str, interval: float, after: float) -> float:
    """The first time on the monitor's grid (``phase + k * interval``) later than ``after``."""
    phase = check_phase(monitor_id, interval)
    return phase + (math.floor((after - phase) / interval) + 1) * interval


@dataclass(eq=False)
class _Scheduled:
    """One monitor in the scheduler: its record, status and confirmation counters."""

    record: dict[str, Any]
    status: str
    last_at: float | None = None  # Unix seconds when its latest check started
    failures: int = 0             # consecutive DOWN results
    successes: int = 0            # consecutive good results while DOWN
    token: int = 0                # the heap item with this token is the live one
    running: bool = False
    removed: bool = False

    @property
    def interval(self) -> float:
        return max(1, self.record["interval"])

    @property
    def confirming(self) -> bool:
        """A failure (or a recovery) seen but not yet confirmed: re-check after retry_delay."""
        return bool(self.successes if self.status == Status.DOWN else self.failures)

    def judge(self, result: CheckResult, probes: dict[str, Any]) -> str:
        """The status after ``result``: DOWN only after ``confirmations`` failures in a row (from
        PENDING too), back up after ``recoveries`` good ones, UP/DEGRADED otherwise at once."""
        if result.status == Status.DOWN:
            self.failures, self.successes = self.failures + 1, 0
            return Status.DOWN if self.failures >= probes["confirmations"] else self.status
        self.failures = 0
        if self.status != Status.DOWN:
            return result.status
        self.successes += 1
        if self.successes < probes["recoveries"]:
            return Status.DOWN
        self.successes = 0
        return result.status


def _reason(result: CheckResult) -> str:
    """Why a check changed the status: its error, else what it saw."""
    if result.error:
        return result.error
    return f"HTTP {result.status_code}" if result.status_code else "check succeeded"


def _probe_view(record: dict[str, Any]) -> dict[str, Any]:
    """The parts of a monitor that change what its probe does (not its name or status)."""
    return {k: v for k, v in record.items() if k not in ("name", "status", "lastDetails")}


# Where the scheduler's monitors come from and where its results go.  The server's own region
# uses ``LocalFeed`` (the database, the Monitors API's change notices, ``Verdicts``); an agent
# uses ``AgentFeed`` (the server's agent routes).  A feed row is a dict: ``record`` (the
# monitor), ``status`` (its confirmed status in this region), ``lastAt`` (ms) / ``lastStatus`` /
# ``lastDetails`` of its latest check in this region, or None.
FeedRecorder = Callable[[str, CheckResult, int, str, str | None], None]


# Told of a changed monitor: its id and, when the caller knows it, its type now (a listener
# that needs the type reads it when this is None).
MonitorListener = Callable[[str, str | None], None]


class Feed:
    """The interface the Scheduler uses; see the comment above."""

    region: str
    listeners: list[MonitorListener]

    async def rows(self, ids: list[str] | None) -> list[dict[str, Any]]:
        """The schedulable monitors (``None``: all of them) among ``ids``."""
        raise NotImplementedError

    def record(self, monitor_id: str, result: CheckResult, at: int, status: str,
               reason: str | None) -> None:
        """Keep one check and the region's confirmed status after it (``reason``: why it
        changed, or None when it did not)."""
        raise NotImplementedError


class Scheduler:
    """Runs every active, unpaused probing monitor of one region on its interval."""

    def __init__(self, feed: Feed, probes: dict[str, Any], ctx: ProbeContext) -> None:
        self.feed, self.ctx = feed, ctx
        self.probes = probes
        self.region = feed.region
        self.entries: dict[str, _Scheduled] = {}
        self.completed = 0
        self._heap: list[tuple[float, int, int, _Scheduled]] = []  # (due, seq, token, entry)
        self._seq = itertools.count()
        self._slots = asyncio.Semaphore(self.probes["max_concurrency"])
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lags: collections.deque[float] = collections.deque(maxlen=_LAG_WINDOW)
        self._late = 0
        self._warned = -_LAG_LOG_EVERY
        self._changed: set[str] = set()
        self._changed_event = asyncio.Event()

    def _note_change(self, monitor_id: str, kind: str | None) -> None:
        self._changed.add(monitor_id)
        self._changed_event.set()

    async def run(self) -> None:
        """Load the monitors, then dispatch checks and follow changes until cancelled."""
        self.feed.listeners.append(self._note_change)
        watcher = asyncio.create_task(self._watch())
        try:
            await self.reload(None)
            while True:
                await self._slots.acquire()
                try:
                    entry, planned = await self._next_due()
                except BaseException:
                    self._slots.release()
                    raise
                self._start(entry, planned)
        finally:
            self.feed.listeners.remove(self._note_change)
            for task in [watcher, *self._tasks]:
                task.cancel()
            await asyncio.gather(watcher, *self._tasks, return_exceptions=True)

    # Which monitors, and when

    def _eligible(self, record: dict[str, Any]) -> bool:
        regions = record.get("enabledWorkerRegionIds")
        return probe_of(record["type"]) is not None and (not regions or self.region in regions)

    async def reload(self, ids: set[str] | None) -> None:
        """Bring the schedule in line with the database: every monitor (``None``, at start) or
        the ``ids`` the API changed, which are added, updated, or dropped when deleted/paused."""
        if ids is None:
            await self._load_rows(None, initial=True)
            return
        ordered = sorted(ids)
        for start in range(0, len(ordered), _RELOAD_CHUNK):
            part = ordered[start:start + _RELOAD_CHUNK]
            seen = await self._load_rows(part, initial=False)
            for monitor_id in set(part) - seen:
                self._drop(monitor_id)

    async def _load_rows(self, ids: list[str] | None, initial: bool) -> set[str]:
        seen = set()
        now = time.time()
        for row in await self.feed.rows(ids):
            record = row["record"]
            if self._eligible(record):
                seen.add(record["id"])
                self._admit(record, row, now, initial)
        return seen

    def _admit(self, record: dict[str, Any], row: dict[str, Any], now: float,
               initial: bool) -> None:
        """Add or update one monitor.  A monitor seen at start-up resumes from its last stored
        check; one created, resumed or re-targeted while running is checked at once."""
        entry = self.entries.get(record["id"])
        if entry is not None and not entry.removed:
            record["lastDetails"] = entry.record.get("lastDetails")
            retarget = _probe_view(entry.record) != _probe_view(record)
            regrid = entry.interval != max(1, record["interval"])
            entry.record = record
            if not entry.running and (retarget or regrid):
                self._schedule(entry, now if retarget else self._planned(entry, now))
            return
        record["lastDetails"] = row["lastDetails"]
        if entry is None:
            entry = self.entries[record["id"]] = _Scheduled(record, row["status"])
        entry.record, entry.status, entry.removed = record, row["status"], False
        entry.failures = entry.successes = 0
        if row["lastAt"] is not None:
            entry.last_at = row["lastAt"] / 1000
            failed = row["lastStatus"] == Status.DOWN
            entry.failures = int(failed and entry.status != Status.DOWN)
            entry.successes = int(not failed and entry.status == Status.DOWN)
        if not entry.running:
            self._schedule(entry, self._planned(entry, now) if initial else now)

    def _drop(self, monitor_id: str) -> None:
        """Stop checking a monitor; a check in flight finishes but its result is discarded."""
        entry = self.entries.get(monitor_id)
        if entry is None:
            return
        entry.removed = True
        if not entry.running:
            del self.entries[monitor_id]

    def _planned(self, entry: _Scheduled, now: float) -> float:
        """When an idle monitor runs next, from its last check; never in the past."""
        monitor_id, interval = entry.record["id"], entry.interval
        if entry.last_at is None:
            return next_slot(monitor_id, interval, now)
        if entry.confirming:
            return max(entry.last_at + self.probes["retry_delay"], now)
        due = next_slot(monitor_id, interval, entry.last_at + interval / 2)
        return due if due > now else next_slot(monitor_id, interval, now)

    def _schedule(self, entry: _Scheduled, due: float) -> None:
        entry.token += 1
        item = (due, next(self._seq), entry.token, entry)
        heapq.heappush(self._heap, item)
        if self._heap[0] is item:
            self._wake.set()
        if len(self._heap) > 2 * len(self.entries) + 1000:
            self._heap = [i for i in self._heap if self._live(i)]
            heapq.heapify(self._heap)

    @staticmethod
    def _live(item: tuple[float, int, int, _Scheduled]) -> bool:
        entry = item[3]
        return item[2] == entry.token and not entry.removed and not entry.running

    async def _next_due(self) -> tuple[_Scheduled, float]:
        """Wait for the earliest planned check; return its monitor and planned time."""
        loop = asyncio.get_running_loop()
        while True:
            while self._heap and not self._live(self._heap[0]):
                heapq.heappop(self._heap)
            now = time.time()
            if self._heap and self._heap[0][0] <= now:
                due, _, _, entry = heapq.heappop(self._heap)
                return entry, due
            self._wake.clear()
            timer = loop.call_later(self._heap[0][0] - now, self._wake.set) if self._heap else None
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    async def _watch(self) -> None:
        """Apply the Monitors API's changes (``Runtime.monitor_changed``) as they come."""
        while True:
            await self._changed_event.wait()
            self._changed_event.clear()
            ids, self._changed = self._changed, set()
            try:
                await self.reload(ids)
            except Exception:  # keep following changes; the next edit retries the monitor
                log_failure("scheduler: reloading %d changed monitors failed", len(ids))

    # Running checks

    def _start(self, entry: _Scheduled, planned: float) -> None:
        entry.running = True
        self._note_lag(max(0.0, time.time() - planned))
        task = asyncio.create_task(self._check(entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, entry: _Scheduled) -> None:
        started = time.time()
        try:
            probe = probe_of(entry.record["type"])
            assert probe is not None, "only probed types are scheduled"
            result = await probe(entry.record, self.ctx)
        except Exception as exc:  # a probe bug must not stop the scheduler
            log.exception("probe of monitor %s failed", entry.record["id"])
            result = _down(f"internal error: {exc}", "UNKNOWN")
        finally:
            entry.running = False
            self._slots.release()
        self.completed += 1
        if entry.removed:
            self._drop(entry.record["id"])
            return
        self._record(entry, result, started)

    def _record(self, entry: _Scheduled, result: CheckResult, started: float) -> None:
        """Hand the check and the region's verdict after it to the feed; plan the next check."""
        if log.isEnabledFor(logging.DEBUG):  # the hot path: no redact() when not logging
            log.debug("check of %s (%s): %s %s", entry.record["name"],
                      redact(entry.record["url"] or ""), result.status,
                      result.error or result.status_code or "")
        status = entry.judge(result, self.probes)
        reason = _reason(result) if status != entry.status else None
        self.feed.record(entry.record["id"], result, int(started * 1000), status, reason)
        entry.status = status
        entry.record["lastDetails"] = result.details
        entry.last_at = started
        self._schedule(entry, self._planned(entry, time.time()))

    # Lag

    def _note_lag(self, lag: float) -> None:
        self._lags.append(lag)
        if lag < _LAG_WARN:
            return
        self._late += 1
        now = time.monotonic()
        if now - self._warned >= _LAG_LOG_EVERY:
            log.warning("scheduler is behind: %d checks started over %g s late since the last"
                        " warning (latest %.1f s late, %d monitors, max_concurrency %d)",
                        self._late, _LAG_WARN, lag, len(self.entries),
                        self.probes["max_concurrency"])
            self._warned, self._late = now, 0

    def stats(self) -> dict[str, Any]:
        """Lag of the latest check starts (seconds late vs plan) and the current backlog."""
        lags = sorted(self._lags)
        now = time.time()
        backlog = max((now - item[0] for item in self._heap[:1] if self._live(item)), default=0.0)
        pick = functools.partial(_percentile, lags)
        return {"monitors": sum(not e.removed for e in self.entries.values()),
                "running": len(self._tasks), "checksCompleted": self.completed,
                "lag": {"p50": pick(50), "p99": pick(99), "max": pick(100)},
                "backlog": round(max(backlog, 0.0), 3)}

    @staticmethod
    def far_behind(stats: dict[str, Any]) -> bool:
        """Recent checks, or the oldest one still waiting, later than _LAG_DEGRADED."""
        return max(stats["lag"]["p99"], stats["backlog"]) > _LAG_DEGRADED


def _percentile(ordered: list[float], point: int) -> float:
    return round(ordered[nearest_rank(len(ordered), point) - 1], 3) if ordered else 0.0


async def run_scheduler(rt: Runtime) -> None:
    """The prober service: one ProbeContext and one Scheduler for the life of the server
    (none with ``[probes] local = false``: then only agents probe)."""
    if not rt.cfg["probes"]["local"]:
        return
    ctx = ProbeContext(rt.cfg)
    rt.scheduler = Scheduler(LocalFeed(rt), rt.cfg["probes"], ctx)
    try:
        await rt.scheduler.run()
    finally:
        await ctx.aclose()


class LocalFeed(Feed):
    """The server's own region: monitors from the database, results through ``Verdicts``."""

    def __init__(self, rt: Runtime, region: str | None = None) -> None:
        self.rt, self.region = rt, region or rt.cfg["region"]["id"]
        self.listeners = rt.listeners

    async def rows(self, ids: list[str] | None) -> list[dict[str, Any]]:
        where = f" AND m.id {_IN_IDS}" if ids is not None else ""
        rows = await self.rt.db.fetchall(
            f"{_FEED_SELECT} WHERE m.is_active = 1 AND m.is_paused = 0{where}",
            [self.region, self.region, *([json.dumps(ids)] if ids is not None else [])])
        self.rt.maintenance.note_owners(rows)  # its checks are marked from the first one on
        return [feed_row(row) for row in rows]

    def record(self, monitor_id: str, result: CheckResult, at: int, status: str,
               reason: str | None) -> None:
        self.rt.db.write_later(self.rt.verdicts.statements(
            self.region, monitor_id, result, at, status, reason))


_FEED_SELECT = (
    "SELECT m.*, COALESCE(r.status, 'PENDING') AS region_status, c.status AS last_status,"
    " c.checked_at AS last_at, c.details AS last_details FROM monitors m"
    " LEFT JOIN monitor_regions r ON r.monitor_id = m.id AND r.region_id = ?"
    " LEFT JOIN monitor_latest l ON l.monitor_id = m.id AND l.region_id = ?"
    " LEFT JOIN checks c ON c.id = l.check_id")


def feed_row(row: sqlite3.Row) -> dict[str, Any]:
    """A monitor with its latest state in one region, as a Feed hands it to the Scheduler."""
    return {"record": monitor_record(row), "status": row["region_status"],
            "lastAt": row["last_at"], "lastStatus": row["last_status"],
            "lastDetails": json.loads(row["last_details"]) if row["last_details"] else None}


# Agents
#
# ``statusapp agent`` runs the same Scheduler and probes for one region on another machine,
# with an ``AgentFeed``: monitors come from the server's long-poll (GET /agent/monitors), and
# results go first to an on-disk buffer (``AgentBuffer``), then to POST /agent/results, oldest
# batch first, each removed only once the server acknowledged it.  A batch keeps its id when
# sent again (after a failure or a restart), and the server stores a batch id once, so every
# result arrives once.  The agent only ever dials out to the server.

_AGENT_FLUSH = 1.0          # seconds between two batches
_AGENT_RETRY_MAX = 2.0      # longest pause between attempts to reach the server
_AGENT_TIMEOUT = 60.0       # seconds for one request (a long-poll waits up to 30)


_AGENT_BATCH_MAX = 5000


class AgentBuffer:
    """Batches not yet acknowledged, in ``buffer.db`` under the agent's state directory; past
    ``limit`` results the oldest batches are dropped (and logged), so the disk use is bounded."""

    def __init__(self, path: Path, limit: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS batches (seq INTEGER PRIMARY KEY,"
                          " batch_id TEXT NOT NULL, size INTEGER NOT NULL, body TEXT NOT NULL)")

    def add(self, results: list[dict[str, Any]]) -> None:
        for start in range(0, len(results), _AGENT_BATCH_MAX):
            part = results[start:start + _AGENT_BATCH_MAX]
            self.conn.execute("INSERT INTO batches (batch_id, size, body) VALUES (?, ?, ?)",
                              (secrets.token_hex(12), len(part), json.dumps(part)))
        while self.pending() > self.limit:
            seq, size = self.conn.execute("SELECT seq, size FROM batches ORDER BY seq").fetchone()
            self.conn.execute("DELETE FROM batches WHERE seq = ?", (seq,))
            log.error("agent buffer full (%d results): dropped the oldest %d results",
                      self.limit, size)

    def pending(self) -> int:
        return self.conn.execute("SELECT COALESCE(SUM(size), 0) FROM batches").fetchone()[0]

    def oldest(self) -> tuple[int, str, list[dict[str, Any]]] | None:
        row = self.conn.execute("SELECT seq, batch_id, body FROM batches ORDER BY seq").fetchone()
        return None if row is None else (row[0], row[1], json.loads(row[2]))

    def done(self, seq: int) -> None:
        self.conn.execute("DELETE FROM batches WHERE seq = ?", (seq,))

    def close(self) -> None:
        self.conn.close()


class AgentFeed(Feed):
    """Monitors from the server's agent routes; results buffered, then sent in batches."""

    def __init__(self, client: httpx.AsyncClient, buffer: AgentBuffer) -> None:
        self.client, self.buffer = client, buffer
        self.region = ""
        self.listeners: list[MonitorListener] = []
        self.monitors: dict[str, dict[str, Any]] = {}
        self.version: str | None = None
        self.heartbeat = 5.0
        self.probes: dict[str, Any] = {}
        self.results: list[dict[str, Any]] = []

    async def rows(self, ids: list[str] | None) -> list[dict[str, Any]]:
        if ids is None:
            return list(self.monitors.values())
        return [self.monitors[i] for i in ids if i in self.monitors]

    def record(self, monitor_id: str, result: CheckResult, at: int, status: str,
               reason: str | None) -> None:
        self.results.append({
            "monitorId": monitor_id, "checkedAt": at, "status": result.status,
            "regionStatus": status, "reason": reason, "responseTime": result.response_time,
            "statusCode": result.status_code, "error": result.error,
            "category": result.category, "timings": result.timings, "details": result.details})

    async def sync(self, wait: int) -> None:
        """One GET /agent/monitors: apply what changed and tell the scheduler."""
        response = await self.client.get("/agent/monitors", params={
            "since": self.version or "", "wait": wait})
        response.raise_for_status()
        body = response.json()
        rows = {r["record"]["id"]: r for r in body["monitors"]}
        gone = set(self.monitors) - set(rows) if body["full"] else set(body["removed"])
        for monitor_id in gone:
            self.monitors.pop(monitor_id, None)
        self.monitors.update(rows)
        self.region, self.version = body["region"]["id"], body["version"]
        self.heartbeat, self.probes = body["heartbeat"], body["probes"]
        for monitor_id in [*rows, *gone]:
            for listener in self.listeners:
                listener(monitor_id, None)

    async def follow(self) -> None:
        """Long-poll for monitor changes until cancelled, retrying while the server is away."""
        while True:
            wait = int(self.heartbeat)
            try:
                await self.sync(wait)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                log.warning("agent: cannot sync monitors: %s", _describe_agent_error(exc))
                await asyncio.sleep(_AGENT_RETRY_MAX)
                continue
            if not wait:
                await asyncio.sleep(self.heartbeat)

    async def deliver(self) -> None:
        """Every second: buffer what was checked, then send the buffer oldest first."""
        while True:
            await asyncio.sleep(_AGENT_FLUSH)
            self.keep()
            try:
                await self.send_buffered()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("agent: %d results wait to be sent: %s", self.buffer.pending(),
                            _describe_agent_error(exc))

    def keep(self) -> None:
        """Move the checks done since the last batch into the on-disk buffer."""
        if self.results:
            self.buffer.add(self.results)
            self.results = []

    async def send_buffered(self) -> None:
        while (batch := self.buffer.oldest()) is not None:
            seq, batch_id, results = batch
            response = await self.client.post("/agent/results", json={
                "batchId": batch_id, "sentAt": now_ms(), "results": results})
            if response.status_code == 400:  # never acceptable; do not block the rest
                log.error("agent: server refused batch %s: %s", batch_id, response.text[:300])
            else:
                response.raise_for_status()
            self.buffer.done(seq)


def _describe_agent_error(exc: Exception) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} {exc.response.text[:200]}"
    return f"{type(exc).__name__}: {exc}"


async def run_agent(cfg: dict[str, dict[str, Any]], server: str, token: str, state: Path,
                    buffer_limit: int) -> None:
    """The agent process: first sync (retried until the server answers), then the shared
    Scheduler, the long-poll and the batch sender, until cancelled."""
    buffer = AgentBuffer(state / "buffer.db", buffer_limit)
    ctx = ProbeContext(cfg)  # its trust store serves the server connection too (less memory)
    try:
        async with httpx.AsyncClient(
                base_url=server.rstrip("/") + API_PREFIX, timeout=_AGENT_TIMEOUT,
                verify=ctx.ssl_context,
                headers={"Authorization": f"Bearer {token}", "User-Agent": _USER_AGENT}) as client:
            feed = AgentFeed(client, buffer)
            while feed.version is None:
                try:
                    await feed.sync(0)
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    log.warning("agent: cannot reach %s: %s", server, _describe_agent_error(exc))
                    await asyncio.sleep(_AGENT_RETRY_MAX)
            log.info("agent for region %s: %d monitors", feed.region, len(feed.monitors))
            ctx.set_region(feed.region)
            scheduler = Scheduler(feed, {**cfg["probes"], **feed.probes}, ctx)
            try:
                await asyncio.gather(scheduler.run(), feed.follow(), feed.deliver())
            finally:
                feed.keep()  # stopped (SIGTERM): the last second's checks go out next time
    finally:
        await ctx.aclose()
        buffer.close()



def check_statements(monitor_id: str, region_id: str, result: CheckResult,
                     checked_at: int, maintenance: bool = False, received_at: int | None = None,
                     agent_at: int | None = None) -> list[Statement]:
    """The writes that store one check (schema triggers keep monitor_latest and counts);
    ``maintenance``: taken inside a maintenance window, so left out of uptime.  An agent's check
    also carries when the server received it and the agent's own stamp."""
    return [(
        "INSERT INTO checks (monitor_id, region_id, status, response_time, status_code, error,"
        " category, timings, details, checked_at, maintenance, received_at, agent_checked_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (monitor_id, region_id, result.status, result.response_time, result.status_code,
         result.error, result.category, json.dumps(result.timings) if result.timings else None,
         json.dumps(result.details) if result.details else None, checked_at, int(maintenance),
         checked_at if received_at is None else received_at, agent_at))]


def transition_statements(monitor_id: str, old: str, new: str, reason: str | None,
                          at: int) -> list[Statement]:
    """Set a monitor's status and record the change, for incident logic to consume once."""
    return [("UPDATE monitors SET status = ? WHERE id = ?", (new, monitor_id)),
            ("INSERT INTO status_transitions (monitor_id, old_status, new_status, reason,"
             " created_at) VALUES (?, ?, ?, ?, ?)", (monitor_id, old, new, reason, at))]


# Heartbeat deadlines
#
# Each CRON monitor lives in memory as a ``_Beat``: its heartbeat id, status and two clocks
# (last success, running job).  Pings and the deadline service change a beat only under its
# lock and only after their write committed, so the status the next ping or deadline starts
# from is always the stored one.  Each beat keeps at most one live entry in a heap ordered by
# its next deadline; the service sleeps until the earliest (or a change), so its cost follows
# pings and deadlines, never the number of monitors.  The clocks are columns, so a deadline
# that passed while the server was down is found at start-up; acting on it makes the monitor
# DOWN, which has no deadline, so it is acted on once.

HEARTBEAT_KINDS = ("success", "start", "fail", "log")
MISSED_HEARTBEAT = "missed heartbeat"
JOB_NOT_COMPLETE = "job did not complete"
HEARTBEAT_DEADLINES = (MISSED_HEARTBEAT, JOB_NOT_COMPLETE)  # the reasons a missed deadline gives
# The columns of a beat, and the integer keys its check rows take (NULL before its first check;
# the one parameter is the server's region id).
_BEAT_COLUMNS = ("id, account_id, heartbeat_id, status, is_paused, is_active, interval,"
                 " grace_period, schedule, timezone, last_success_at, job_started_at, updated_at,"
                 " (SELECT seq FROM monitor_keys k WHERE k.id = monitors.id) AS monitor_key,"
                 " (SELECT seq FROM region_keys WHERE region_keys.id = ?) AS region_key")


@dataclass(eq=False)
class _Beat:
    """One CRON monitor as the heartbeat code needs it; ``stale`` until (re)loaded."""

    monitor_id: str
    account_id: str = ""
    token: str | None = None
    status: str = Status.PENDING
    quiet: bool = True  # paused or inactive: pings are logged, the status never changes
    period_ms: int = 0
    grace_ms: int = 0
    schedule: str | None = None  # a cron schedule replaces the period
    zone: str | None = None
    last_success_at: int | None = None
    job_started_at: int | None = None
    edited_at: int = 0
    keys: tuple[int, int] | None = None  # its check rows' monitor and region keys, once known
    stale: bool = True
    queued: int | None = None  # the due time of this beat's live heap entry
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    window: collections.deque[float] = dataclasses.field(default_factory=collections.deque)

    def load(self, row: sqlite3.Row) -> None:
        self.token, self.status = row["heartbeat_id"], row["status"]
        self.account_id = row["account_id"]
        self.quiet = bool(row["is_paused"]) or not row["is_active"]
        self.period_ms, self.grace_ms = row["interval"] * 1000, row["grace_period"] * 1000
        self.schedule, self.zone = row["schedule"], row["timezone"]
        self.last_success_at, self.job_started_at = row["last_success_at"], row["job_started_at"]
        self.edited_at, self.stale = row["updated_at"], False
        known = row["monitor_key"] is not None and row["region_key"] is not None
        self.keys = (row["monitor_key"], row["region_key"]) if known else None

    def due(self) -> tuple[int, str] | None:
        """The next deadline and what missing it means.

        Editing or resuming a monitor restarts both clocks (``edited_at``), so a deadline that
        passed while it was paused does not fire the moment it is resumed.
        """
        if self.quiet or self.status == Status.DOWN:
            return None
        dues = []
        if self.job_started_at is not None:
            dues.append((max(self.job_started_at, self.edited_at) + self.grace_ms,
                         JOB_NOT_COMPLETE))
        if self.last_success_at is not None:
            since = max(self.last_success_at, self.edited_at)
            expected = (next_scheduled_run(self.schedule, self.zone, since, self.grace_ms)
                        if self.schedule else since + self.period_ms)
            dues.append((expected + self.grace_ms, MISSED_HEARTBEAT))
        return min(dues, default=None)

    def reason(self, what: str) -> str:
        """The DOWN reason a missed deadline records (the incident's root cause)."""
        grace = self.grace_ms // 1000
        if what == JOB_NOT_COMPLETE:
            return f"{what}: no success or fail within the {grace} s grace period after start"
        if self.schedule:
            return (f"{what}: no success ping for the scheduled run ({self.schedule},"
                    f" {self.zone or 'UTC'}) + {grace} s grace period")
        return (f"{what}: no success ping within {self.period_ms // 1000} s interval"
                f" + {grace} s grace period")


def next_scheduled_run(schedule: str, zone: str | None, since: int, grace_ms: int) -> int:
    """When the next run is expected (Unix ms, before the grace), after a success at ``since``.

    A success counts for the scheduled time nearest to it: one up to ``grace_ms`` early, and
    nearer the coming time than the last, is that coming run, done early; so an early run
    does not make the monitor expect the same run again minutes later."""
    upcoming = cron_times(schedule, zone, since)
    coming = unix_ms(next(upcoming))
    previous = unix_ms(next(cron_times(schedule, zone, since + 1000, reverse=True), None)
                   or datetime.min.replace(tzinfo=timezone.utc))
    early = coming - since <= grace_ms and coming - since < since - previous
    return unix_ms(next(upcoming)) if early else coming


class Heartbeats:
    """The in-memory side of heartbeat monitoring: beats by id, ping rate windows, deadlines."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.wake = asyncio.Event()
        self.clock = time.monotonic  # the rate windows' clock (tests move it)
        self._by_token: dict[str, _Beat] = {}
        self._by_monitor: dict[str, _Beat] = {}
        self._heap: list[tuple[int, str]] = []
        self._dirty: set[str] = set()
        self._keyless: set[str] = set()  # beats whose check keys are to be read (want_keys)
        rt.listeners.append(self.changed)

    def changed(self, monitor_id: str, kind: str | None) -> None:
        """A monitor was created, edited or deleted: reload it before its next use.  One known
        (``kind``, its type now) to be no CRON monitor, and not one before, needs nothing."""
        if kind not in (None, "CRON") and monitor_id not in self._by_monitor:
            return
        beat = self._by_monitor.get(monitor_id)
        if beat is not None:
            beat.stale = True
        self._dirty.add(monitor_id)
        self.wake.set()

    def _beat(self, monitor_id: str) -> _Beat:
        return self._by_monitor.setdefault(monitor_id, _Beat(monitor_id))

    def _load(self, beat: _Beat, row: sqlite3.Row | None) -> bool:
        """Store a monitors row in its beat (None: no longer a CRON monitor) and schedule it."""
        if beat.token is not None and (row is None or row["heartbeat_id"] != beat.token):
            self._by_token.pop(beat.token, None)
        if row is None:
            self._by_monitor.pop(beat.monitor_id, None)
            beat.quiet = True
            return False
        beat.load(row)
        self._by_token[row["heartbeat_id"]] = beat
        self.schedule(beat)
        return True

    async def fresh(self, beat: _Beat) -> bool:
        """Reload a stale beat (the caller holds its lock); False once it is not a CRON monitor."""
        if not beat.stale:
            return True
        row = await self.rt.db.fetchone(
            f"SELECT {_BEAT_COLUMNS} FROM monitors WHERE id = ? AND type = 'CRON'"
            " AND heartbeat_id IS NOT NULL", (self.rt.cfg["region"]["id"], beat.monitor_id))
        return self._load(beat, row)

    async def find(self, token: str) -> _Beat:
        """The beat a heartbeat id names, or 404 (a non-CRON monitor has no heartbeat id)."""
        beat = self._by_token.get(token)
        if beat is None:
            monitor_id = await self.rt.db.fetchval(
                "SELECT id FROM monitors WHERE heartbeat_id = ? AND type = 'CRON'", (token,))
            if monitor_id is None:
                raise NotFound("Heartbeat not found", "no CRON monitor has this heartbeat id")
            beat = self._beat(monitor_id)
        return beat

    def want_keys(self, beat: _Beat) -> None:
        """A beat's first check, through the view, made its key: the service reads it (no ping
        waits for that), and the beat's later checks go past the view."""
        self._keyless.add(beat.monitor_id)
        self.wake.set()

    async def learn_keys(self) -> None:
        """Read the keys of the beats whose first checks made them (see want_keys)."""
        if not self._keyless:
            return
        wanted, self._keyless = self._keyless, set()
        try:
            rows = await self.rt.db.fetchall(
                "SELECT k.id, k.seq, (SELECT seq FROM region_keys WHERE id = ?) FROM monitor_keys k"
                f" WHERE k.id {_IN_IDS}",
                (self.rt.cfg["region"]["id"], json.dumps(sorted(wanted))))
        except BaseException:
            self._keyless |= wanted
            raise
        for monitor_id, monitor_key, region_key in rows:
            beat = self._by_monitor.get(monitor_id)
            if beat is not None and region_key is not None:
                beat.keys = (monitor_key, region_key)

    def known(self, token: str) -> _Beat | None:
        """The beat a heartbeat id names when it is in memory and current, else None."""
        beat = self._by_token.get(token)
        return None if beat is None or beat.stale else beat

    async def preload(self) -> None:
        """Load every CRON monitor at start-up, so deadlines missed while down are found."""
        for row in await self.rt.db.fetchall(
                f"SELECT {_BEAT_COLUMNS} FROM monitors WHERE type = 'CRON'"
                " AND heartbeat_id IS NOT NULL", (self.rt.cfg["region"]["id"],)):
            beat = self._beat(row["id"])
            if beat.stale and not beat.lock.locked():
                self._load(beat, row)

    def admit(self, beat: _Beat) -> tuple[bool, dict[str, str]]:
        """Count a ping in its monitor's one-minute sliding window: whether it goes into the
        ping log (the limit throttles the log, never what the monitor learns) and the
        X-RateLimit headers that say so."""
        limit = self.rt.cfg["heartbeat"]["pings_per_minute"]
        if not limit:
            return True, {}
        now, window = self.clock(), beat.window
        while window and now - window[0] >= 60:
            window.popleft()
        logged = len(window) < limit
        if logged:
            window.append(now)
        wait = 60 - (now - window[0])
        return logged, {"X-RateLimit-Limit": str(limit),
                        "X-RateLimit-Remaining": str(limit - len(window)),
                        "X-RateLimit-Reset": str(math.ceil(time.time() + wait)),
                        **({} if logged else {"Retry-After": str(max(1, math.ceil(wait)))})}

    def schedule(self, beat: _Beat) -> None:
        """Queue the beat's next deadline unless an earlier entry of it is already queued."""
        due = beat.due()
        if due is None or (beat.queued is not None and beat.queued <= due[0]):
            return
        beat.queued = due[0]
        heapq.heappush(self._heap, (due[0], beat.monitor_id))
        if self._heap[0][0] == due[0]:
            self.wake.set()

    async def reload_changed(self) -> None:
        """Reload the monitors edited since last time (a deleted one is forgotten).  One query
        finds the CRON monitors among them; another is read only if it was one, so creating or
        editing other monitors costs no query each."""
        if not self._dirty:
            return
        changed, self._dirty = self._dirty, set()  # what changes meanwhile is for next time
        try:
            cron = {row[0] for row in await self.rt.db.fetchall(
                f"SELECT id FROM monitors WHERE id {_IN_IDS} AND type = 'CRON'",
                (json.dumps(sorted(changed)),))}
        except BaseException:
            self._dirty |= changed
            raise
        for monitor_id in changed:
            if monitor_id in cron or monitor_id in self._by_monitor:
                beat = self._beat(monitor_id)
                async with beat.lock:
                    await self.fresh(beat)

    async def expire_due(self) -> None:
        """Mark DOWN every monitor whose deadline has passed."""
        while self._heap and self._heap[0][0] <= now_ms():
            due_at, monitor_id = heapq.heappop(self._heap)
            beat = self._by_monitor.get(monitor_id)
            if beat is None or beat.queued != due_at:
                continue  # superseded by an earlier entry, or forgotten
            beat.queued = None
            async with beat.lock:
                try:
                    if await self.fresh(beat):
                        due = beat.due()
                        if due is not None and due[0] <= now_ms():
                            await self._miss(beat, *due)
                finally:
                    self.schedule(beat)  # after a failed write the same deadline is retried

    async def _miss(self, beat: _Beat, due_at: int, what: str) -> None:
        """Record a missed deadline: a DOWN check and transition, at the deadline's time."""
        reason = beat.reason(what)
        result = CheckResult(Status.DOWN, error=reason, category="UNKNOWN",
                             details={"heartbeat": what})
        statements = check_statements(
            beat.monitor_id, self.rt.cfg["region"]["id"], result, due_at,
            self.rt.maintenance.active(beat.account_id, beat.monitor_id, due_at))
        statements += transition_statements(beat.monitor_id, beat.status, Status.DOWN, reason,
                                            due_at)
        if what == JOB_NOT_COMPLETE:
            statements.append(("UPDATE monitors SET job_started_at = NULL WHERE id = ?",
                               (beat.monitor_id,)))
        await self.rt.db.write(statements)
        beat.status = Status.DOWN
        if what == JOB_NOT_COMPLETE:
            beat.job_started_at = None

    async def sleep(self) -> None:
        """Wait for the earliest deadline, a ping that brings one closer, or a monitor edit."""
        timeout = max(0.0, (self._heap[0][0] - now_ms()) / 1000) if self._heap else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)


async def run_heartbeats(rt: Runtime) -> None:
    """The deadline service: CRON monitors that miss a ping or a job's end go DOWN."""
    hb = rt.heartbeats
    await hb.preload()
    while True:
        hb.wake.clear()
        try:
            await hb.reload_changed()
            await hb.learn_keys()
            await hb.expire_due()
        except Exception:
            log_failure("heartbeat deadlines failed; retrying in 1 s")
            await asyncio.sleep(1)
            hb.wake.set()
        await hb.sleep()


# --- Notifiers ---
#
# The delivery layer: an ``Alert`` (what happened) becomes one request in each service's own wire
# format.  A sender is ``async def send_x(config, alert, ctx) -> int | None``, declared with its
# config fields by ``@channel_type`` in ``CHANNEL_TYPES``; it raises ``DeliveryError`` on failure
# and ``deliver`` turns that into retries and per-attempt records.  Senders never put a channel
# URL or token into an error message: webhook URLs and Telegram's path carry the secret.

ALERT_EVENTS = ("monitor.down", "monitor.up", "monitor.degraded", "incident.created",
                "incident.resolved", "test")
PAGERDUTY_SEVERITIES = ("critical", "error", "warning", "info")
OPSGENIE_PRIORITIES = ("P1", "P2", "P3", "P4", "P5")

# 4xx means the request or the credentials are wrong and a retry cannot help, except these.
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
# Headers post_webhook sets itself; a user-configured header must not override or corrupt them.
_MANAGED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding",
                              "x-webhook-signature"})
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")
_SURROGATE = re.compile("[\ud800-\udfff]")

_TONES = {"monitor.down": "bad", "incident.created": "bad", "monitor.degraded": "warn",
          "monitor.up": "good", "incident.resolved": "good", "test": "info"}
_HEADLINES = {
    "monitor.down": "{name} is DOWN",
    "monitor.up": "{name} is back UP",
    "monitor.degraded": "{name} is DEGRADED",
    "incident.created": "Incident{number} opened: {name}",
    "incident.resolved": "Incident{number} resolved: {name}",
    "test": "Test notification for {name}",
}
_GROUP_HEADLINES = {"monitor.down": "{count} monitors DOWN", "monitor.up": "{count} monitors back UP",
                    "monitor.degraded": "{count} monitors DEGRADED",
                    "incident.created": "{count} incidents opened",
                    "incident.resolved": "{count} incidents resolved"}
_EMOJI = {"bad": "\U0001f534", "warn": "\U0001f7e0", "good": "\u2705", "info": "\u2139\ufe0f"}
_DISCORD_COLOURS = {"bad": 0xE74C3C, "warn": 0xF1C40F, "good": 0x2ECC71, "info": 0x3498DB}
_TEAMS_COLOURS = {"bad": "Attention", "warn": "Warning", "good": "Good", "info": "Accent"}
_NTFY_TAGS = {"bad": "rotating_light", "warn": "warning", "good": "white_check_mark",
              "info": "information_source"}
APPRISE_MISSING = "the Apprise library is not installed: pip install 'statusapp[apprise]'"


class AlertMonitor(TypedDict, total=False):
    """The monitor an alert is about (a grouped alert's has only name and status)."""

    id: str
    name: str
    url: str | None  # None for CRON: its ping URL is a secret
    type: str
    status: str | None


class AlertIncident(TypedDict, total=False):
    """The incident an alert reports; ``mttr`` in seconds once resolved."""

    id: str
    incidentNumber: str
    startedAt: str | None
    resolvedAt: str | None
    severity: str
    mttr: int | None


class AlertCheck(TypedDict, total=False):
    """The check an alert reports: HTTP status, response time (ms), error, region."""

    statusCode: int | None
    responseTime: int | None
    error: str | None
    region: str | None


class AlertGroup(TypedDict):
    """A storm's alerts as one: how many, and the first monitors' names."""

    count: int
    names: list[str]


@dataclass
class Alert:
    """What happened, independent of any channel: every sender renders its message from this.

    ``note`` explains what the numbers cannot (e.g. the regression detector's baseline).
    ``group`` makes it stand for ``count`` monitors' alerts (``names`` lists the first ones).
    """

    event: str
    monitor: AlertMonitor
    incident: AlertIncident | None = None
    check: AlertCheck | None = None
    timestamp: str = dataclasses.field(default_factory=lambda: str(iso(now_ms())))
    note: str | None = None
    group: AlertGroup | None = None  # a storm's alerts as one message

    def __post_init__(self) -> None:
        if self.event not in ALERT_EVENTS:
            raise ValueError(f"unknown alert event {self.event!r}")


class DeliveryError(Exception):
    """A failed delivery; ``permanent`` tells ``deliver`` that retrying cannot help."""

    def __init__(self, message: str, status_code: int | None = None,
                 permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.permanent = permanent


class NotifyContext:
    """Shared state for deliveries: the config and one pooled HTTP client for every sender."""

    def __init__(self, cfg: dict[str, dict[str, Any]]) -> None:
        self.cfg = cfg
        notify = cfg["notifications"]
        self.timeout: float = notify["timeout"]
        timeout = httpx.Timeout(self.timeout, connect=min(notify["connect_timeout"], self.timeout))
        # The delivery loop's slots bound connections (httpx's own pool of 100 would be a
        # second, shared limit that hung receivers could fill).
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False,
                                        limits=httpx.Limits(max_connections=None),
                                        headers={"User-Agent": f"StatusApp/{VERSION}"})
        # URLs from API users (webhooks, chat webhooks) go through a client of their own, which
        # connects only to addresses it has checked (see _PinnedBackend).
        self.user_client = httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, headers=self.client.headers,
            transport=_PinnedTransport(httpx.create_ssl_context(), keepalive=None,
                                       allow_private=notify["allow_private_targets"]))

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self.client.aclose()
        await self.user_client.aclose()

    async def __aenter__(self) -> NotifyContext:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


# Message text shared by all channels.


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _parse_time(value: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _human_time(value: Any) -> str:
    parsed = _parse_time(value)
    if parsed is None:
        return str(value)
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def human_duration(seconds: float) -> str:
    """The two largest non-zero units ("12m 5s", "3h 4m", "2d 1h"): precise enough for an alert."""
    remaining, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts[:2]) or "0s"


def _recovered(alert: Alert) -> bool:
    return _TONES[alert.event] == "good"


def _downtime(alert: Alert) -> int | None:
    """Seconds down: the incident's mttr, else resolvedAt (or the alert's time) minus startedAt."""
    incident: AlertIncident = alert.incident or {}
    if (mttr := incident.get("mttr")) is not None:
        return int(mttr)
    start = _parse_time(incident.get("startedAt"))
    end = _parse_time(incident.get("resolvedAt") or alert.timestamp)
    return max(0, int((end - start).total_seconds())) if start and end else None


def _check_result(check: AlertCheck) -> str:
    """Render a check as "HTTP 500 Internal Server Error", "connection refused" or "HTTP 200"."""
    code, error = check.get("statusCode"), check.get("error")
    parts = (f"HTTP {code}" if code else "", _one_line(error or ""))
    return " ".join(part for part in parts if part)


def _group_names(group: AlertGroup) -> str:
    more = group["count"] - len(group["names"])
    return ", ".join(group["names"]) + (f" and {more} more" if more > 0 else "")


def _headline(alert: Alert) -> str:
    if alert.group:
        return _GROUP_HEADLINES[alert.event].format(count=alert.group["count"])
    incident: AlertIncident = alert.incident or {}
    number = incident.get("incidentNumber") or incident.get("id")
    name = alert.monitor.get("name") or alert.monitor.get("id") or "monitor"
    headline = _HEADLINES[alert.event].format(name=name, number=f" {number}" if number else "")
    return _one_line(headline)


def _summary(alert: Alert) -> str:
    """One ASCII-punctuated line (SMS, subjects, PagerDuty): the headline and what matters most."""
    check: AlertCheck = alert.check or {}
    if alert.group:
        return _one_line(f"{_headline(alert)}: {_group_names(alert.group)}")
    if _recovered(alert):
        downtime = _downtime(alert)
        detail = f"down for {human_duration(downtime)}" if downtime is not None else ""
    elif alert.event == "test":
        detail = "StatusApp can deliver to this channel"
    else:
        detail = _check_result(check)
        detail += f" from {check['region']}" if detail and check.get("region") else ""
        detail = alert.note or detail
    return _one_line(f"{_headline(alert)} - {detail}" if detail else _headline(alert))


def _facts(alert: Alert) -> list[tuple[str, str]]:
    """Labelled details for a person on call: what, where, how it failed, since when, how long."""
    monitor = alert.monitor
    check: AlertCheck = alert.check or {}
    incident: AlertIncident = alert.incident or {}
    if alert.group:
        return [("Monitors", _group_names(alert.group)), ("Since", _human_time(alert.timestamp))]
    facts = [("Monitor", str(monitor.get("name") or monitor.get("id") or "")),
             ("URL", str(monitor.get("url") or "")),
             ("Status", str(monitor.get("status") or "")),
             ("Error" if check.get("error") else "Check", _check_result(check)),
             ("Region", str(check.get("region") or ""))]
    if (took := check.get("responseTime")) is not None:
        facts.append(("Response time", f"{round(took)} ms"))
    if _recovered(alert):
        downtime = _downtime(alert)
        facts.append(("Down for", human_duration(downtime) if downtime is not None else ""))
        started = incident.get("startedAt")
        facts.append(("Down since", _human_time(started) if started else ""))
    elif alert.event != "test":
        facts.append(("Since", _human_time(incident.get("startedAt") or alert.timestamp)))
    if incident:
        number = str(incident.get("incidentNumber") or incident.get("id") or "")
        severity = incident.get("severity")
        facts.append(("Incident", f"{number} (severity {severity})" if severity else number))
    facts.append(("Note", _one_line(alert.note or "")))
    return [(label, value) for label, value in facts if value]


def _details(alert: Alert) -> str:
    """One "Label: value" line per fact (the body under a separate title)."""
    return "\n".join(f"{label}: {value}" for label, value in _facts(alert))


def _text(alert: Alert) -> str:
    """Plain text: the headline, then the facts."""
    footer = f"Sent by StatusApp at {_human_time(alert.timestamp)}"
    return "\n".join([_headline(alert), "", _details(alert), "", footer])


def _urgency(alert: Alert, high: int, normal: int, low: int) -> int:
    """A service's priority for the alert: ``high`` for trouble, ``normal`` for degraded,
    ``low`` for recoveries and tests."""
    return {"bad": high, "warn": normal}.get(_TONES[alert.event], low)


def _web_url(alert: Alert) -> str | None:
    """The monitor URL when a chat client can link it (DNS and ping monitors have bare hosts)."""
    url = str(alert.monitor.get("url") or "")
    return url if url.startswith(("http://", "https://")) else None


def _dedup_key(alert: Alert) -> str:
    """One key per monitor, so "down" and its later "up" (or incident events) hit the same alert."""
    return f"statusapp-monitor-{alert.monitor.get('id')}"


# JSON exactly as JavaScript writes it, so receivers can verify a signature over JSON.stringify.


def _js_number(value: float) -> str:
    """ECMAScript Number::toString: shortest round-trip digits, JS's exponent thresholds."""
    if value != value or value in (float("inf"), float("-inf")):
        return "null"
    if value == 0:
        return "0"
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits, point = whole + fraction, len(whole) + int(exponent or 0)
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        fraction = "." + digits[1:] if k > 1 else ""
        text = f"{digits[0]}{fraction}e{'+' if n > 0 else '-'}{abs(n - 1)}"
    return "-" + text if value < 0 else text


def _js_string(value: str) -> str:
    paired = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    text = json.dumps(paired, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _js_value(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        if abs(value) <= 2 ** 53:
            return str(value)
        try:
            return _js_number(float(value))
        except OverflowError:
            return "null"
    if isinstance(value, float):
        return _js_number(value)
    if isinstance(value, str):
        return _js_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_js_value(item) for item in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("js_json: object keys must be strings")
        index_keys = sorted((k for k in value if _ARRAY_INDEX.fullmatch(k) and int(k) < 2**32 - 1),
                            key=int)
        keys = index_keys + [k for k in value if k not in set(index_keys)]
        return "{" + ",".join(f"{_js_string(k)}:{_js_value(value[k])}" for k in keys) + "}"
    raise TypeError(f"js_json: cannot serialise {type(value).__name__}")


def js_json(obj: Any) -> bytes:
    """UTF-8 bytes equal to JSON.stringify(JSON.parse(them)) in JavaScript.

    The spec's verifier recomputes the HMAC over ``JSON.stringify(req.body)``, so the bytes we
    sign must survive that round trip: compact separators, raw UTF-8 (U+2028 included), lone
    surrogates as ``\\udxxx``, 1.0 as ``1``, 1e21 as ``1e+21``, NaN as ``null``, integers
    beyond 2**53 rounded to a double, and integer-like keys first in ascending order as JS
    objects hold them.  Other keys keep their order.
    """
    return _js_value(obj).encode("utf-8")


def sign_body(body: bytes, secret: str) -> str:
    """Hex HMAC-SHA256 of the exact bytes sent, as ``X-Webhook-Signature``."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def webhook_payload(alert: Alert) -> dict[str, Any]:
    """The spec's "Webhook Payload Format", key for key and in its order."""
    monitor, incident, check = alert.monitor, alert.incident, alert.check
    return {
        "event": alert.event,
        "timestamp": alert.timestamp,
        "monitor": {key: monitor.get(key) for key in ("id", "name", "url", "type", "status")},
        "incident": None if incident is None else {
            key: incident.get(key) for key in ("id", "incidentNumber", "startedAt", "severity")},
        "check": None if check is None else {
            key: check.get(key) for key in ("statusCode", "responseTime", "error", "region")},
        **_delivery_fields(),
    }


# The delivery being attempted: (delivery id, send time in ms).  Every HTTP request carries them
# as X-StatusApp-Delivery and X-StatusApp-Timestamp, webhook payloads as deliveryId and sentAt,
# so a receiver can drop a repeat (the same id arrives again only as a retry).
_DELIVERY: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "delivery", default=None)


def _delivery_fields() -> dict[str, Any]:
    current = _DELIVERY.get()
    return {} if current is None else {"deliveryId": current[0], "sentAt": current[1]}


def _delivery_headers() -> dict[str, str]:
    current = _DELIVERY.get()
    return {} if current is None else {"X-StatusApp-Delivery": current[0],
                                       "X-StatusApp-Timestamp": str(current[1])}


# HTTP plumbing shared by every sender.


def check_target(url: str) -> None:
    """Refuse a user's URL that is not http(s) with a host and a valid port.

    Channel and webhook URLs come from API users; without ``notifications.allow_private_targets``
    the user client's backend also refuses any that resolve inside our network, at connect
    time, on the very address it connects to.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeliveryError("target URL must be http:// or https:// with a host", permanent=True)
    try:
        parts.port
    except ValueError:
        raise DeliveryError("target URL has an invalid port", permanent=True) from None


def _permanent_status(code: int) -> bool:
    return code < 500 and code not in _RETRYABLE_STATUSES


async def _excerpt(response: httpx.Response) -> str:
    """The start of an error body: services explain themselves there ("channel_not_found")."""
    head = b""
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= 2048:
            break
    return _cut(_one_line(head.decode("utf-8", "replace")), 200)


async def _post(ctx: NotifyContext, service: str, url: str, *, user_url: bool = False,
                method: str = "POST", **request: Any) -> int:
    """POST (or ``method``) and map the outcome onto DeliveryError; return the 2xx status."""
    if user_url:
        check_target(url)
    request["headers"] = {**request.get("headers", {}), **_delivery_headers()}
    try:
        async with (ctx.user_client if user_url else ctx.client).stream(
                method, url, **request) as response:
            if response.is_success:
                return response.status_code
            detail = await _excerpt(response)
    except httpx.TimeoutException:
        raise DeliveryError(f"{service}: timed out") from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise DeliveryError(f"{service}: invalid URL ({exc})", permanent=True) from None
    except httpx.TransportError as exc:
        if isinstance(exc.__cause__, PrivateTargetError):
            raise DeliveryError(f"{service}: {exc.__cause__}", permanent=True) from None
        raise DeliveryError(f"{service}: {type(exc).__name__}: {exc}") from None
    code = response.status_code
    raise DeliveryError(f"{service} answered HTTP {code}" + (f": {detail}" if detail else ""),
                        status_code=code, permanent=_permanent_status(code))


async def _post_json(ctx: NotifyContext, service: str, url: str, payload: Any, *,
                     user_url: bool = False, headers: dict[str, str] | None = None,
                     **request: Any) -> int:
    body_headers = {**(headers or {}), "Content-Type": "application/json"}
    return await _post(ctx, service, url, user_url=user_url, content=js_json(payload),
                       headers=body_headers, **request)


def _user_headers(headers: Any) -> dict[str, str]:
    """Configured webhook headers, checked so a typo fails permanently instead of retrying."""
    if not headers:
        return {}
    if not isinstance(headers, dict):
        raise DeliveryError("webhook headers must be an object", permanent=True)
    clean = {}
    for name, value in headers.items():
        if not (isinstance(name, str) and _HEADER_NAME.fullmatch(name) and isinstance(value, str)
                and not set(value) & {"\r", "\n", "\0"}):
            raise DeliveryError(f"invalid webhook header {name!r}", permanent=True)
        if name.lower() not in _MANAGED_HEADERS:
            clean[name] = value
    return clean


async def post_webhook(url: str, payload: dict[str, Any], secret: str | None,
                       headers: dict[str, str] | None, ctx: NotifyContext) -> int:
    """POST ``payload`` as JavaScript-compatible JSON, signing exactly the bytes on the wire."""
    body = js_json(payload)
    sent = {**_user_headers(headers), "Content-Type": "application/json"}
    if secret:
        sent["X-Webhook-Signature"] = sign_body(body, secret)
    return await _post(ctx, "Webhook", url, user_url=True, content=body, headers=sent)


def _choice(config: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = config.get(key) or default
    if value not in allowed:
        raise DeliveryError(f"{key} must be one of {', '.join(allowed)}, got {value!r}",
                            permanent=True)
    return value


def _recipients(config: dict[str, Any], key: str) -> list[str]:
    values = config[key]
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise DeliveryError(f"{key} must be a list of non-empty strings", permanent=True)
    return [v.strip() for v in values]


Sender = Callable[[dict[str, Any], Alert, NotifyContext], Awaitable[int | None]]
def channel_type(name: str, *fields: Field, person_facing: bool) -> Callable[[Sender], Sender]:
    """Declare a channel type on its sender: its config ``fields`` (``required=True`` for the
    keys it needs, ``secret=True`` for those responses mask) and whether it reaches a person.

    The registered sender refuses, permanently, a config that lacks a required key.
    """
    def wrap(send: Sender) -> Sender:
        @functools.wraps(send)
        async def checked(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int | None:
            missing = [key for key in declared.required if not config.get(key)]
            if missing:
                raise DeliveryError(f"{name} channel config lacks {', '.join(missing)}",
                                    permanent=True)
            return await send(config, alert, ctx)
        declared = ChannelType(name, fields, checked, person_facing)
        CHANNEL_TYPES[name] = declared
        return checked
    return wrap


# What the channel types' config fields check beyond kinds and bounds.


def _strings(pattern: str, what: str) -> Callable[..., list[str]]:
    """A ``check`` for an array of strings that must each match ``pattern``."""
    regex = re.compile(pattern)

    def check(value: list[Any], record: dict[str, Any], env: ValidationEnv) -> list[str]:
        bad = [v for v in value if not isinstance(v, str) or not regex.fullmatch(v.strip())]
        if bad:
            raise _Issue(f"Invalid {what}: {', '.join(map(str, bad))}")
        return list(dict.fromkeys(v.strip() for v in value))
    return check


def _pattern(pattern: str, what: str) -> Callable[..., str]:
    regex = re.compile(pattern)

    def check(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
        if not regex.fullmatch(value):
            raise _Issue(f"Invalid {what}")
        return value
    return check


def _valid_headers(value: dict[str, Any], record: dict[str, Any],
                   env: ValidationEnv) -> dict[str, Any]:
    """Header names must be tokens and values single-line strings, as post_webhook requires."""
    try:
        _user_headers(value)
    except DeliveryError as exc:
        raise _Issue(exc.message) from None
    return value


_CHAT_WEBHOOK_URL = Field("webhookUrl", "string", True, maximum=2048, check=valid_url,
                          secret=True, doc="Incoming webhook URL (secret)")


# The senders, one per channel type.


def _smtp_send(smtp: dict[str, Any], message: EmailMessage, recipients: list[str],
               timeout: float | None) -> None:
    """Blocking SMTP conversation (run in a thread), with SMTP replies mapped to DeliveryError."""
    import smtplib
    security = smtp["security"]
    context = ssl.create_default_context()
    # typeshed says float, but smtplib passes the timeout to socket, where None means no limit.
    limit: Any = timeout
    client: smtplib.SMTP
    try:
        if security == "tls":
            client = smtplib.SMTP_SSL(smtp["host"], smtp["port"], timeout=limit, context=context)
        else:
            client = smtplib.SMTP(smtp["host"], smtp["port"], timeout=limit)
        with client:
            if security == "starttls":
                client.starttls(context=context)
            if smtp["username"]:
                client.login(smtp["username"], smtp["password"])
            refused = client.send_message(message, smtp["sender"], recipients)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        who = ", ".join(f"{addr} ({code})" for addr, (code, _) in exc.recipients.items())
        raise DeliveryError(f"SMTP refused every recipient: {who}",
                            status_code=codes[0], permanent=min(codes) >= 500) from None
    except smtplib.SMTPResponseException as exc:
        reply = exc.smtp_error
        reply = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
        raise DeliveryError(f"SMTP {exc.smtp_code}: {_one_line(reply)}",
                            status_code=exc.smtp_code, permanent=exc.smtp_code >= 500) from None
    except smtplib.SMTPNotSupportedError as exc:
        raise DeliveryError(f"SMTP server: {exc}", permanent=True) from None
    except ssl.SSLCertVerificationError as exc:
        raise DeliveryError(f"SMTP TLS certificate rejected: {exc.verify_message}",
                            permanent=True) from None
    except (smtplib.SMTPException, OSError) as exc:
        where = f"{smtp['host']}:{smtp['port']}"
        raise DeliveryError(f"SMTP {where}: {type(exc).__name__}: {exc}") from None
    if refused:
        raise DeliveryError(f"SMTP delivered to {len(recipients) - len(refused)} of "
                            f"{len(recipients)}; refused {sorted(refused)}", permanent=True)


@channel_type("EMAIL", Field("emails", "array", True, minimum=1, maximum=50,
                             check=_strings(r"[^@\s]+@[^@\s]+\.[^@\s]+", "email address"),
                             doc="Recipients"), person_facing=True)
async def send_email(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> None:
    """One plain-text message to every address in ``emails``, through the configured SMTP relay."""
    smtp = ctx.cfg["smtp"]
    if not smtp["host"]:
        raise DeliveryError("EMAIL needs smtp.host in the server config", permanent=True)
    recipients = _recipients(config, "emails")
    message = EmailMessage()
    message["Subject"] = _cut(f"[StatusApp] {_summary(alert)}", 200)
    message["From"] = smtp["sender"]
    message["To"] = ", ".join(recipients)
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain=smtp["sender"].rpartition("@")[2] or "statusapp")
    for name, value in _delivery_headers().items():
        message[name] = value
    message.set_content(_text(alert))
    await asyncio.to_thread(_smtp_send, smtp, message, recipients, ctx.timeout)


@channel_type("SMS", Field("phoneNumbers", "array", True, minimum=1, maximum=20,
                           check=_strings(r"\+[1-9][0-9]{6,14}", "E.164 phone number"),
                           doc="Recipients in E.164 form (+15551234567)"), person_facing=True)
async def send_sms(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """Twilio Messages API, one message per number; every number is tried even if one fails."""
    notify = ctx.cfg["notifications"]
    sid, token, sender = (notify[f"twilio_{key}"] for key in ("account_sid", "auth_token", "from"))
    if not (sid and token and sender):
        raise DeliveryError("SMS needs notifications.twilio_account_sid, twilio_auth_token and "
                            "twilio_from in the server config", permanent=True)
    url = (f"{notify['twilio_api_url'].rstrip('/')}/2010-04-01/Accounts/"
           f"{urllib.parse.quote(sid, safe='')}/Messages.json")
    body = _cut(f"[StatusApp] {_summary(alert)}", 320)
    numbers = _recipients(config, "phoneNumbers")
    statuses, failures = [], []
    for number in numbers:
        try:
            statuses.append(await _post(ctx, "Twilio", url, auth=(sid, token),
                                        data={"To": number, "From": sender, "Body": body}))
        except DeliveryError as exc:
            failures.append((number, exc))
    if failures:
        raise DeliveryError(
            f"SMS to {len(failures)} of {len(numbers)} numbers failed: "
            + "; ".join(f"{number}: {exc.message}" for number, exc in failures),
            status_code=failures[0][1].status_code,
            permanent=all(exc.permanent for _, exc in failures))
    return statuses[-1]


@channel_type("SLACK", _CHAT_WEBHOOK_URL,
              Field("channel", "string", minimum=1, maximum=80,
                    doc="Channel override, e.g. #alerts"),
              person_facing=True)
async def send_slack(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """Slack incoming webhook: ``text`` for notifications, ``blocks`` for the message itself."""
    def mrkdwn(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    tone = _TONES[alert.event]
    fields = [{"type": "mrkdwn", "text": _cut(f"*{label}*\n{mrkdwn(value)}", 2000)}
              for label, value in _facts(alert)[:10]]
    payload: dict[str, Any] = {
        "text": mrkdwn(_summary(alert)),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "emoji": True,
                                        "text": _cut(f"{_EMOJI[tone]} {_headline(alert)}", 150)}},
            {"type": "section", "fields": fields},
            {"type": "context", "elements": [
                {"type": "mrkdwn", "text": f"StatusApp \u00b7 {_human_time(alert.timestamp)}"}]},
        ],
    }
    if config.get("channel"):
        payload["channel"] = config["channel"]
    return await _post_json(ctx, "Slack", config["webhookUrl"], payload, user_url=True)


@channel_type("DISCORD", _CHAT_WEBHOOK_URL, person_facing=True)
async def send_discord(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """Discord webhook with one embed, coloured red, amber, green or blue by the event."""
    embed: dict[str, Any] = {
        "title": _cut(_headline(alert), 256),
        "color": _DISCORD_COLOURS[_TONES[alert.event]],
        "fields": [{"name": label, "value": _cut(value, 1024), "inline": len(value) <= 40}
                   for label, value in _facts(alert)],
        "timestamp": alert.timestamp,
        "footer": {"text": "StatusApp"},
    }
    if _web_url(alert):
        embed["url"] = _web_url(alert)
    payload = {"username": "StatusApp", "embeds": [embed], "allowed_mentions": {"parse": []}}
    return await _post_json(ctx, "Discord", config["webhookUrl"], payload, user_url=True)


@channel_type(
    "TELEGRAM",
    Field("botToken", "string", True, secret=True, doc="Bot API token (secret)",
          check=_pattern(r"[0-9]+:\S+", "bot token (expected 123456:ABC...)")),
    Field("chatId", "string", True, minimum=1, maximum=64, doc="Chat, group or channel id"),
    person_facing=True)
async def send_telegram(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """Bot API sendMessage in plain text (no parse_mode, so names need no escaping)."""
    base = ctx.cfg["notifications"]["telegram_api_url"].rstrip("/")
    url = f"{base}/bot{config['botToken']}/sendMessage"
    text = f"{_EMOJI[_TONES[alert.event]]} {_text(alert)}"
    payload = {"chat_id": config["chatId"], "text": _cut(text, 4096),
               "link_preview_options": {"is_disabled": True}}
    return await _post_json(ctx, "Telegram", url, payload)


@channel_type(
    "PAGERDUTY",
    Field("integrationKey", "string", True, minimum=1, maximum=128, secret=True,
          doc="Events API v2 routing key (secret)"),
    Field("severity", "string", choices=PAGERDUTY_SEVERITIES,
          doc="Trigger severity (default critical)"),
    person_facing=False)
async def send_pagerduty(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """Events API v2: trigger on trouble, resolve on recovery, both with the monitor's dedup_key."""
    event: dict[str, Any] = {"routing_key": config["integrationKey"]}
    if _recovered(alert):
        event |= {"event_action": "resolve", "dedup_key": _dedup_key(alert)}
    else:
        event |= {
            "event_action": "trigger",
            "dedup_key": _dedup_key(alert),
            "payload": {
                "summary": _cut(_summary(alert), 1024),
                "source": str(alert.monitor.get("url") or alert.monitor.get("name")),
                "severity": _choice(config, "severity", PAGERDUTY_SEVERITIES, "critical"),
                "timestamp": alert.timestamp,
                "component": str(alert.monitor.get("name")),
                "group": str(alert.monitor.get("type")),
                "custom_details": dict(_facts(alert)),
            },
            "client": "StatusApp",
        }
        if _web_url(alert):
            event["links"] = [{"href": _web_url(alert), "text": "Monitored URL"}]
    return await _post_json(ctx, "PagerDuty", ctx.cfg["notifications"]["pagerduty_url"], event)


@channel_type(
    "OPSGENIE",
    Field("apiKey", "string", True, minimum=1, maximum=128, secret=True,
          doc="API integration key (secret)"),
    Field("priority", "string", choices=OPSGENIE_PRIORITIES, doc="Alert priority (default P3)"),
    person_facing=False)
async def send_opsgenie(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """Alert API: create on trouble, close by alias on recovery (the alias deduplicates)."""
    base = ctx.cfg["notifications"]["opsgenie_url"].rstrip("/") + "/v2/alerts"
    auth = {"Authorization": f"GenieKey {config['apiKey']}"}
    alias = _dedup_key(alert)
    if _recovered(alert):
        url = f"{base}/{urllib.parse.quote(alias, safe='')}/close"
        note = {"source": "StatusApp", "note": _summary(alert)}
        return await _post_json(ctx, "OpsGenie", url, note, headers=auth,
                                params={"identifierType": "alias"})
    payload = {
        "message": _cut(_headline(alert), 130),
        "alias": alias,
        "description": _cut(_text(alert), 15000),
        "priority": _choice(config, "priority", OPSGENIE_PRIORITIES, "P3"),
        "source": "StatusApp",
        "entity": _cut(str(alert.monitor.get("name")), 512),
        "tags": ["statusapp"],
        "details": dict(_facts(alert)),
    }
    return await _post_json(ctx, "OpsGenie", base, payload, headers=auth)


@channel_type("MICROSOFT_TEAMS", _CHAT_WEBHOOK_URL, person_facing=True)
async def send_teams(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """An Adaptive Card message: accepted by Teams Workflows webhooks and classic connectors."""
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": _headline(alert), "weight": "Bolder", "size": "Medium",
             "color": _TEAMS_COLOURS[_TONES[alert.event]], "wrap": True},
            {"type": "FactSet", "facts": [{"title": label, "value": value}
                                          for label, value in _facts(alert)]},
        ],
        "msteams": {"width": "Full"},
    }
    if _web_url(alert):
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Open monitored URL",
                            "url": _web_url(alert)}]
    payload = {"type": "message", "attachments": [
        {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None,
         "content": card}]}
    return await _post_json(ctx, "Teams", config["webhookUrl"], payload, user_url=True)


@channel_type(
    "WEBHOOK",
    Field("url", "string", True, maximum=2048, check=valid_url,
          doc="Endpoint that receives the webhook payload"),
    Field("headers", "object", check=_valid_headers, secret=True,
          doc="Extra request headers (values are secret)"),
    Field("secret", "string", minimum=1, maximum=255, secret=True,
          doc="Signs the body as X-Webhook-Signature (secret)"),
    person_facing=False)
async def send_webhook(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """The spec's webhook payload to ``url`` with the configured ``headers`` (signed if ``secret``).

    The Webhooks API delivers through this too: ``{"url": ..., "secret": ...}`` as the config.
    """
    return await post_webhook(config["url"], webhook_payload(alert), config.get("secret"),
                              config.get("headers"), ctx)



# The homelab channels: push services people run themselves or keep on their phones.

_SERVER_URL = Field("serverUrl", "string", True, maximum=2048, check=valid_url,
                    doc="Server URL, e.g. https://ntfy.sh")
_APP_TOKEN = Field("appToken", "string", True, minimum=1, maximum=255, secret=True,
                   doc="Application token (secret)")


@channel_type(
    "NTFY", _SERVER_URL,
    Field("topic", "string", True, doc="Topic",
          check=_pattern(r"[-_A-Za-z0-9]{1,64}", "ntfy topic (1-64 of A-Z, a-z, 0-9, _, -)")),
    Field("token", "string", minimum=1, maximum=255, secret=True, doc="Access token (secret)"),
    Field("username", "string", minimum=1, maximum=255,
          doc="User name, with password (when no token)"),
    Field("password", "string", maximum=255, secret=True, doc="Password (secret)"),
    Field("priority", "integer", minimum=1, maximum=5,
          doc="Priority of trouble alerts, 1-5 (default 5)"),
    person_facing=True)
async def send_ntfy(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """ntfy's JSON publishing: POST to the server root, the topic in the body; the priority
    (``priority`` for trouble, default 5) and an emoji tag follow the event; a click opens
    the monitored URL.  ``token`` is sent as a Bearer token, else ``username``/``password``."""
    top = config.get("priority", 5)
    payload: dict[str, Any] = {
        "topic": config["topic"], "title": _cut(_headline(alert), 250),
        "message": _cut(_details(alert), 4096),
        "priority": _urgency(alert, top, min(top, 4), min(top, 3)),
        "tags": [_NTFY_TAGS[_TONES[alert.event]]]}
    if _web_url(alert):
        payload["click"] = _web_url(alert)
    request: dict[str, Any] = {}
    if config.get("token"):
        request["headers"] = {"Authorization": f"Bearer {config['token']}"}
    elif config.get("username"):
        request["auth"] = (config["username"], config.get("password", ""))
    return await _post_json(ctx, "ntfy", config["serverUrl"].rstrip("/") + "/", payload,
                            user_url=True, **request)


@channel_type(
    "GOTIFY", _SERVER_URL, _APP_TOKEN,
    Field("priority", "integer", minimum=0, maximum=10,
          doc="Priority of trouble alerts, 0-10 (default 8)"),
    person_facing=True)
async def send_gotify(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """Gotify's POST /message with the application token in X-Gotify-Key; ``priority`` for
    trouble (default 8), at most 5 when degraded and 2 for recoveries and tests."""
    top = config.get("priority", 8)
    payload: dict[str, Any] = {
        "title": _cut(_headline(alert), 250), "message": _details(alert),
        "priority": _urgency(alert, top, min(top, 5), min(top, 2)),
        "extras": {"client::display": {"contentType": "text/plain"}}}
    if _web_url(alert):
        payload["extras"]["client::notification"] = {"click": {"url": _web_url(alert)}}
    return await _post_json(ctx, "Gotify", config["serverUrl"].rstrip("/") + "/message",
                            payload, user_url=True, headers={"X-Gotify-Key": config["appToken"]})


@channel_type(
    "PUSHOVER",
    Field("userKey", "string", True, secret=True, doc="User or group key (secret)",
          check=_pattern(r"[A-Za-z0-9]{30}", "Pushover user or group key (30 letters/digits)")),
    _APP_TOKEN,
    Field("priority", "integer", minimum=-2, maximum=2,
          doc="Priority of trouble alerts, -2 to 2 (default 2: emergency)"),
    Field("retry", "integer", minimum=30, maximum=10_800,
          doc="Emergency: seconds between repeats (default 60)"),
    Field("expire", "integer", minimum=30, maximum=10_800,
          doc="Emergency: seconds until repeats stop (default 3600)"),
    person_facing=True)
async def send_pushover(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """Pushover's POST /1/messages.json (form-encoded): ``priority`` for trouble (default 2,
    emergency: repeated every ``retry`` seconds until acknowledged or ``expire`` passes),
    normal priority 0 for degraded, -1 (quiet) for recoveries and tests."""
    top = config.get("priority", 2)
    priority = _urgency(alert, top, min(top, 0), min(top, -1))
    when = _parse_time(alert.timestamp)
    form = {"token": config["appToken"], "user": config["userKey"],
            "title": _cut(_headline(alert), 250), "message": _cut(_details(alert), 1024),
            "priority": str(priority)}
    if when is not None:
        form["timestamp"] = str(int(when.timestamp()))
    if _web_url(alert):
        form |= {"url": _web_url(alert) or "", "url_title": "Monitored URL"}
    if priority == 2:
        form |= {"retry": str(config.get("retry", 60)), "expire": str(config.get("expire", 3600))}
    url = ctx.cfg["notifications"]["pushover_url"].rstrip("/") + "/1/messages.json"
    return await _post(ctx, "Pushover", url, data=form)


@channel_type(
    "MATRIX",
    Field("homeserver", "string", True, maximum=2048, check=valid_url,
          doc="Homeserver URL, e.g. https://matrix.org"),
    Field("accessToken", "string", True, minimum=1, maximum=1024, secret=True,
          doc="Access token of the sending user (secret)"),
    Field("roomId", "string", True, doc="Room id (not an alias)",
          check=_pattern(r"![^:\s]+:\S+", "room id (expected !abc:example.org)")),
    person_facing=True)
async def send_matrix(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """A Matrix room message (client-server API v3): a plain ``body`` and an HTML
    ``formatted_body``.  The transaction id comes from the alert, so a retry of the same alert
    is one message even when the homeserver had accepted the first try."""
    facts = "".join(f"<br><b>{_esc(label)}</b>: {_esc(value)}" for label, value in _facts(alert))
    html_body = f"<b>{_esc(_EMOJI[_TONES[alert.event]] + ' ' + _headline(alert))}</b>{facts}"
    txn = hashlib.sha256(f"{alert.event}|{alert.monitor.get('id')}|{alert.timestamp}"
                         .encode()).hexdigest()[:32]
    room = urllib.parse.quote(config["roomId"], safe="")
    url = (f"{config['homeserver'].rstrip('/')}/_matrix/client/v3/rooms/{room}"
           f"/send/m.room.message/{txn}")
    payload = {"msgtype": "m.text", "body": _text(alert), "format": "org.matrix.custom.html",
               "formatted_body": html_body}
    return await _post_json(ctx, "Matrix", url, payload, user_url=True, method="PUT",
                            headers={"Authorization": f"Bearer {config['accessToken']}"})


def apprise_module() -> Any:
    """The optional Apprise library, or None when the ``apprise`` extra is not installed."""
    try:
        return importlib.import_module("apprise")
    except ImportError:
        return None


def valid_apprise_urls(value: list[Any], record: dict[str, Any],
                       env: ValidationEnv) -> list[str]:
    """URLs the installed Apprise understands (never echoed: they hold tokens); without the
    library, a 400 naming the extra to install."""
    library = apprise_module()
    if library is None:
        raise _Issue(APPRISE_MISSING)
    bad = [str(i) for i, url in enumerate(value)
           if not isinstance(url, str) or not library.Apprise().add(url)]
    if bad:
        raise _Issue(f"Not an Apprise URL Apprise supports: entry {', '.join(bad)}")
    return value


@channel_type(
    "APPRISE",
    Field("urls", "array", True, minimum=1, maximum=20, check=valid_apprise_urls, secret=True,
          doc="Apprise URLs (secret)"),
    person_facing=True)
async def send_apprise(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> None:
    """Every Apprise URL in ``urls`` (Apprise speaks to each service itself, in a thread)."""
    library = apprise_module()
    if library is None:
        raise DeliveryError(APPRISE_MISSING, permanent=True)
    notifier = library.Apprise()
    for url in config["urls"]:
        notifier.add(url)
    kind = {"bad": library.NotifyType.FAILURE, "warn": library.NotifyType.WARNING,
            "good": library.NotifyType.SUCCESS}.get(_TONES[alert.event], library.NotifyType.INFO)
    if not await asyncio.to_thread(notifier.notify, body=_details(alert),
                                   title=_headline(alert), notify_type=kind):
        raise DeliveryError(f"Apprise could not deliver to every one of its "
                            f"{len(config['urls'])} URL(s)")


class DeliveryAttempt(TypedDict):
    """One try at delivering one alert to one target, as ``deliver`` reports and the outbox,
    the delivery logs and the webhook delivery history record it."""

    attempt: int
    ok: bool
    statusCode: int | None
    error: str | None
    permanent: bool
    durationMs: int


async def attempt_delivery(send: Sender, config: dict[str, Any], alert: Alert,
                           ctx: NotifyContext, delivery_id: str, attempt: int) -> DeliveryAttempt:
    """One attempt of ``send``, bounded by ``notifications.timeout``; never raises, it reports.

    An unexpected exception is a bug a retry will not fix, so it counts as permanent."""
    started = time.monotonic()
    status, error, permanent = None, None, False
    token = _DELIVERY.set((delivery_id, now_ms()))
    try:
        status = await asyncio.wait_for(send(config, alert, ctx), ctx.timeout)
    except DeliveryError as exc:
        status, error, permanent = exc.status_code, exc.message, exc.permanent
    except asyncio.TimeoutError:
        error = f"timed out after {ctx.timeout:g}s"
    except Exception as exc:  # noqa: BLE001 -- deliver must report, not raise
        error, permanent = f"internal error: {type(exc).__name__}: {exc}", True
    finally:
        _DELIVERY.reset(token)
    return {"attempt": attempt, "ok": error is None, "statusCode": status, "error": error,
            "permanent": permanent, "durationMs": round((time.monotonic() - started) * 1000)}


async def deliver(send: Sender, config: dict[str, Any], alert: Alert, ctx: NotifyContext,
                  attempts: int | None = None, base_delay: float = 1.0,
                  delivery_id: str | None = None) -> list[DeliveryAttempt]:
    """Run ``send`` with in-process retries (the outbox retries durably instead) and report
    every attempt, all under one delivery id.  Transient failures are retried after
    base_delay, 2x, 4x...; a permanent one (bad credentials, gone, bad config) stops at once.
    """
    total = max(1, ctx.cfg["notifications"]["attempts"] if attempts is None else attempts)
    delivery_id = delivery_id or new_id("dlv")
    records: list[DeliveryAttempt] = []
    for attempt in range(1, total + 1):
        records.append(await attempt_delivery(send, config, alert, ctx, delivery_id, attempt))
        if records[-1]["ok"] or records[-1]["permanent"]:
            break
        if attempt < total:
            await asyncio.sleep(base_delay * 2 ** (attempt - 1))
    return records


# --- Incidents ---


# Regions.  Each region's scheduler (the server's own, or an agent's) confirms a status per
# monitor; ``Verdicts`` keeps those in monitor_regions and combines them into the monitor's
# status: DOWN when at least ``downQuorum`` (default: all) of its active enabled regions are
# DOWN, DEGRADED while fewer are (or one is DEGRADED), else UP.  A region that stopped reporting
# is inactive and left out, so its silence never makes a monitor DOWN.  Only a change of a
# region's verdict (or of the regions) leads to a combine, which runs in its own transaction.


def combined_status(statuses: Sequence[str], regions: int, quorum: int | None) -> str | None:
    """The monitor's status from its active enabled regions' verdicts (``regions`` of them,
    some maybe without one yet); None while no region has a verdict."""
    known = [s for s in statuses if s != Status.PENDING]
    if not known:
        return None
    down = known.count(Status.DOWN)
    if down and down >= min(quorum or regions, regions):
        return Status.DOWN
    return Status.DEGRADED if down or Status.DEGRADED in known else Status.UP


class Verdicts:
    """Per-region verdicts in memory and in monitor_regions; see the comment above."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.statuses: dict[str, dict[str, str]] = collections.defaultdict(dict)
        self.changes: dict[str, tuple[int, str]] = {}  # each monitor's latest verdict change
        self.pending: dict[str, tuple[int, str | None]] = {}
        self.wake = asyncio.Event()
        rt.listeners.append(self._changed)

    def _changed(self, monitor_id: str, kind: str | None) -> None:
        """An edit may change a monitor's regions or quorum; one with no verdict yet (a new
        monitor) has no status to combine."""
        if self.statuses.get(monitor_id):
            self.touch(monitor_id, now_ms(), None)

    async def load(self) -> None:
        for monitor_id, region, status in await self.rt.db.fetchall(
                "SELECT monitor_id, region_id, status FROM monitor_regions"):
            self.statuses[monitor_id][region] = status

    def touch(self, monitor_id: str, at: int, reason: str | None) -> None:
        """Combine this monitor's verdicts again soon."""
        self.pending[monitor_id] = (at, reason)
        self.wake.set()

    def statements(self, region: str, monitor_id: str, result: CheckResult, at: int,
                   status: str, reason: str | None, received_at: int | None = None,
                   agent_at: int | None = None) -> list[Statement]:
        """The writes for one check of ``region`` whose verdict is then ``status``."""
        statements = check_statements(monitor_id, region, result, at,
                                      self.rt.maintenance.active_monitor(monitor_id, at),
                                      received_at, agent_at)
        if self.statuses[monitor_id].get(region, Status.PENDING) != status:
            self.statuses[monitor_id][region] = status
            statements.append((
                "INSERT INTO monitor_regions (monitor_id, region_id, status, changed_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (monitor_id, region_id) DO UPDATE SET"
                " status = excluded.status, changed_at = excluded.changed_at",
                (monitor_id, region, status, at)))
            self.changes[monitor_id] = (at, reason or status)
            self.touch(monitor_id, at, reason)
        return statements

    async def combine_pending(self) -> None:
        """Combine every touched monitor, once the writes queued before are committed."""
        self.wake.clear()
        pending, self.pending = self.pending, {}
        try:
            if pending:
                await self.rt.db.write([])
                async with self.rt.db.transaction() as conn:
                    monitors = {m["id"]: m for m in await conn.execute_fetchall(
                        "SELECT id, status, enabled_worker_region_ids AS regions, down_quorum,"
                        " regression_active, is_active, is_paused FROM monitors"
                        f" WHERE id {_IN_IDS}",
                        (json.dumps(sorted(pending)),))}
                    for sql, rows in grouped([
                            self._combined(monitor_id, monitors.get(monitor_id), at, reason)
                            for monitor_id, (at, reason) in pending.items()]):
                        await conn.executemany(sql, rows)
        except BaseException:
            self.pending = {**pending, **self.pending}  # nothing was written: retry them all
            self.wake.set()
            raise

    def _combined(self, monitor_id: str, monitor: sqlite3.Row | None, at: int,
                  reason: str | None) -> list[Statement]:
        """The transition (if any) that combining the monitor's verdicts now makes."""
        if monitor is None:
            self.statuses.pop(monitor_id, None)
            self.changes.pop(monitor_id, None)
            return []
        if monitor["is_paused"] or not monitor["is_active"]:
            return []
        enabled = set(json.loads(monitor["regions"] or "[]"))
        regions = [r for r, info in self.rt.regions.items()
                   if info["is_active"] and (not enabled or r in enabled)]
        mine = self.statuses.get(monitor_id, {})
        new = combined_status([mine.get(r, Status.PENDING) for r in regions], len(regions),
                              monitor["down_quorum"])
        if new == Status.UP and monitor["regression_active"]:
            new = Status.DEGRADED  # the worse of the probes' verdict and the regression detector's
        if reason is None:  # touched by an edit: the status follows the latest verdict change
            at, reason = self.changes.get(monitor_id, (at, "monitor settings changed"))
        if new is None or new == monitor["status"]:
            return []
        return transition_statements(monitor_id, monitor["status"], new, reason, at)


async def run_verdicts(rt: Runtime) -> None:
    """Combine regions' verdicts into monitor statuses as they change."""
    while True:
        await rt.verdicts.wake.wait()
        try:
            await rt.verdicts.combine_pending()
        except Exception:
            log_failure("combining region verdicts failed; retrying in 1 s")
            await asyncio.sleep(1)


# Region liveness.  An agent's region is active while the agent has been in touch within
# ``[agents] inactive_after`` seconds.  Going silent and coming back each alert once, on the
# server owner's default channels.  Regions belong to the server, not to a team, so their owner
# is the server's: the account owning the first team (made on the first run or by the first
# ``statusapp init``); its default channels are its team's active shared notification channels
# (inline monitor notifications are about one monitor, so they are left out).  Other teams'
# channels never hear of regions.  ``gone_at`` makes the pair exactly-once: the alert and the
# flag are written in one transaction.

_SERVER_OWNER = ("SELECT a.id FROM accounts a JOIN team_members m ON m.team_id = a.id"
                 " AND m.account_id = a.id AND m.role = 'OWNER' ORDER BY a.created_at, a.id"
                 " LIMIT 1")


def _region_alert(region: WorkerRegion, alive: bool, at: int, seconds: int) -> dict[str, Any]:
    return {"event": "monitor.up" if alive else "monitor.down",
            "monitor": {"id": region["id"], "url": "", "type": "REGION",
                        "name": f"Worker region {region['name'] or region['id']}",
                        "status": Status.UP if alive else Status.DOWN},
            "timestamp": iso(at),
            "note": "Its agent reports again." if alive else
                    f"Its agent has not reported for {seconds} s; its monitors are judged by the"
                    " other regions until it is back."}


async def _set_liveness(conn: aiosqlite.Connection, region: WorkerRegion, alive: bool,
                        at: int, inactive_after: int) -> None:
    """Flip a region's liveness; alert on the owner's default channels when it goes and
    comes back."""
    alert = (not alive and region["gone_at"] is None) or (alive and region["gone_at"] is not None)
    await conn.execute("UPDATE worker_regions SET is_active = ?, gone_at = ? WHERE id = ?",
                       (int(alive), None if alive else region["gone_at"] or at, region["id"]))
    if not alert:
        return
    body = _region_alert(region, alive, at, inactive_after)
    channels = await conn.execute_fetchall(
        "SELECT id, account_id, type, config FROM notification_channels WHERE is_active = 1"
        f" AND account_id = ({_SERVER_OWNER}) ORDER BY created_at, id")
    await conn.executemany(
        "INSERT INTO alert_outbox (account_id, monitor_id, target_key, channel_id, delivery_id,"
        " channel_type, config, event, alert, created_at, next_attempt_at)"
        " VALUES (?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(c["account_id"], f"{c['id']}:{region['id']}", c["id"], new_id("dlv"), c["type"],
          c["config"], body["event"], json.dumps(body), at, at) for c in channels])


async def sweep_regions(rt: Runtime) -> None:
    """Mark agents' regions active or inactive from when they last reported (an active one
    counts as heard when this server started, so a server restart is no agent outage)."""
    now, limit = now_ms(), rt.cfg["agents"]["inactive_after"]
    flipped = []
    for region in await rt.load_regions():
        seen = region["last_seen_at"]
        if seen is not None and region["is_active"]:
            seen = max(seen, rt.started_at)
        alive = seen is not None and now - seen < limit * 1000
        if region["token_hash"] is not None and alive != bool(region["is_active"]):
            flipped.append((region, alive))
    for region, alive in flipped:
        async with rt.db.transaction() as conn:
            await _set_liveness(conn, region, alive, now, limit)
        log.warning("worker region %s is %s", region["id"], "back" if alive else "silent")
    if flipped:
        await rt.load_regions()
        reason = ", ".join(f"worker region {r['id']} {'is back' if a else 'went silent'}"
                           for r, a in flipped)
        for monitor_id in list(rt.verdicts.statuses):
            rt.verdicts.touch(monitor_id, now, reason)


async def run_regions(rt: Runtime) -> None:
    """The liveness sweep, a few times per ``inactive_after``."""
    await repeat(min(1.0, rt.cfg["agents"]["inactive_after"] / 4), lambda: sweep_regions(rt))


# The engine.  Each status transition is consumed in the transaction (one per batch of pending
# transitions) that opens or resolves the monitor's incident, writes its status update, queues
# every alert in alert_outbox and sets processed_at: a crash leaves all of that or none of it,
# so no alert is lost or queued twice.  Delivery workers then drain the outbox off the probe
# path, one task per target.
#
# Both wait for work rather than poll: a commit that inserted a transition sets
# ``Runtime.engine_wake``, one that queued an alert ``Runtime.outbox_wake`` (the Database
# derives both from the tables written, ``Database.wake_on_insert``, so no writer has to
# remember), and delivery sleeps until the earliest queued retry or storm group is due.  The
# work is in the database before the wake-up, so a restart finds it; INCIDENT_SAFETY_POLL is the
# longest either waits anyway, for a wake-up missed (a write by another process: nothing in
# StatusApp writes transitions or alerts outside the server, but a second server could share
# the file).

INCIDENT_SAFETY_POLL = 5.0  # seconds: the longest the engine and the outbox wait without a look
_ENGINE_BATCH = 100        # transitions consumed in one transaction
INCIDENT_CHECKS = 100      # check results shown with one incident (the newest)
STORM_HOLD_LIMIT = 10      # a storm's grouped message waits at most this many storm windows
WEBHOOK_EVENTS = ("monitor.down", "monitor.up", "incident.created", "incident.resolved")
INCIDENT_STATUSES = ("investigating", "identified", "monitoring", "resolved")

_INCIDENT_STATS_SQL = (
    "SELECT COUNT(*) AS total, COALESCE(SUM(status = 'DOWN'), 0) AS failed,"
    " group_concat(DISTINCT CASE WHEN status = 'DOWN' THEN region_id END) AS regions"
    " FROM checks WHERE monitor_id = ? AND checked_at BETWEEN ? AND ?")


def incident_number(year: int, number: int) -> str:
    """``INC-2025-0042``: the sequence restarts each year for each account."""
    return f"INC-{year}-{number:04d}"


def transition_events(old: str, new: str, opened: bool, resolved: bool
                      ) -> tuple[list[str], list[str]]:
    """The alerts one transition sends: (events for channels, events for webhooks).

    Channels get one message per crossing (a DOWN carries its incident); webhooks get each
    event they subscribe to.  DEGRADED warns channels only and never opens an incident.
    """
    channels: list[str] = []
    webhooks: list[str] = []
    if old == new and not opened:
        return channels, webhooks  # a repeated status is no crossing
    recovered = old == Status.DOWN or resolved
    if new == Status.DOWN:
        channels.append("monitor.down")
        webhooks += ["monitor.down", *(["incident.created"] if opened else [])]
    elif new == Status.UP and (recovered or old == Status.DEGRADED):
        channels.append("monitor.up")
    elif new == Status.DEGRADED:
        channels += [*(["incident.resolved"] if resolved else []), "monitor.degraded"]
    if new in (Status.UP, Status.DEGRADED):
        webhooks += [*(["monitor.up"] if recovered else []),
                     *(["incident.resolved"] if resolved else [])]
    return channels, webhooks


async def _row(conn: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
    rows = list(await conn.execute_fetchall(sql, params))
    return rows[0] if rows else None


def incident_alert(incident: sqlite3.Row) -> AlertIncident:
    """An incident as an Alert carries it."""
    resolved = incident["resolved_at"]
    return {"id": incident["id"],
            "incidentNumber": incident_number(incident["year"], incident["number"]),
            "startedAt": iso(incident["started_at"]), "resolvedAt": iso(resolved),
            "severity": incident["severity"],
            "mttr": None if resolved is None else (resolved - incident["started_at"]) // 1000}


def _check_alert(check: sqlite3.Row | None, error: str | None) -> AlertCheck | None:
    """The check an alert reports; ``error`` (the transition's reason) fills in a missing one."""
    if check is None:
        return None if error is None else {"statusCode": None, "responseTime": None,
                                           "error": error, "region": None}
    return {"statusCode": check["status_code"], "responseTime": check["response_time"],
            "error": check["error"] or (error if check["status"] != Status.UP else None),
            "region": check["region_id"]}


async def _open_incident(conn: aiosqlite.Connection, monitor: sqlite3.Row,
                         transition: sqlite3.Row) -> sqlite3.Row:
    """A new incident: severity high when every active enabled region is down (medium when
    some are), affected regions those down, cause from the newest failing check."""
    latest = list(await conn.execute_fetchall(
        "SELECT c.*, COALESCE(r.status, c.status) AS verdict FROM monitor_latest l"
        " JOIN checks c ON c.id = l.check_id JOIN worker_regions w ON w.id = l.region_id"
        " LEFT JOIN monitor_regions r ON r.monitor_id = l.monitor_id AND r.region_id = l.region_id"
        " WHERE l.monitor_id = ? AND (w.is_active = 1 OR w.token_hash IS NULL)"
        " ORDER BY c.checked_at DESC, c.id DESC", (monitor["id"],)))
    enabled = set(json.loads(monitor["enabled_worker_region_ids"] or "[]"))
    latest = [c for c in latest if not enabled or c["region_id"] in enabled]
    down = [c for c in latest if c["verdict"] == Status.DOWN]
    severity = "high" if len(down) == len(latest) else "medium" if down else "low"
    cause = down[0] if down else None
    category = cause["category"] if cause and cause["category"] in ROOT_CAUSES else "UNKNOWN"
    root_cause = transition["reason"] or (cause and cause["error"]) or "Monitor is down"
    at = transition["created_at"]
    year = datetime.fromtimestamp(at / 1000, timezone.utc).year
    number = present(await _row(conn, "SELECT COALESCE(MAX(number), 0) + 1 FROM incidents"
                                      " WHERE account_id = ? AND year = ?",
                                (monitor["account_id"], year)))[0]
    incident_id = new_id("inc")
    await conn.execute(
        "INSERT INTO incidents (id, account_id, monitor_id, year, number, started_at, severity,"
        " status, root_cause, root_cause_category, affected_regions)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, ?)",
        (incident_id, monitor["account_id"], monitor["id"], year, number, at, severity,
         root_cause, category, json.dumps(sorted(c["region_id"] for c in down))))
    await add_incident_update(conn, incident_id, "investigating",
                              automatic_update(monitor["name"], category), at)
    return present(await _row(conn, "SELECT * FROM incidents WHERE id = ?", (incident_id,)))


def automatic_update(name: str, category: str) -> str:
    """The update an incident opens with.  Updates are public (status pages, feeds), so it
    names the cause's category only, never the check's error or a heartbeat's text, which can
    hold URLs, addresses or a job's secrets; ``rootCause`` keeps those for the team."""
    return f"{name} is down (cause: {_cause(category)})"


async def add_incident_update(conn: aiosqlite.Connection, incident_id: str, status: str,
                              message: str, at: int) -> None:
    """One entry of an incident's status history."""
    await conn.execute("INSERT INTO incident_updates (id, incident_id, status, message, created_at)"
                       " VALUES (?, ?, ?, ?, ?)", (new_id("iu"), incident_id, status, message, at))


async def resolve_incident(conn: aiosqlite.Connection, incident: sqlite3.Row, at: int,
                           message: str) -> sqlite3.Row:
    """Close an incident, freezing its check counts and affected regions."""
    stats = present(await _row(conn, _INCIDENT_STATS_SQL,
                               (incident["monitor_id"], incident["started_at"], at)))
    regions = set(json.loads(incident["affected_regions"]))
    regions.update((stats["regions"] or "").split(",") if stats["regions"] else ())
    await conn.execute(
        "UPDATE incidents SET resolved_at = ?, status = 'resolved', checks_failed = ?,"
        " checks_total = ?, affected_regions = ? WHERE id = ?",
        (at, stats["failed"], stats["total"], json.dumps(sorted(regions)), incident["id"]))
    await add_incident_update(conn, incident["id"], "resolved", message, at)
    return present(await _row(conn, "SELECT * FROM incidents WHERE id = ?", (incident["id"],)))


def _group_key(kind: str, config: str, event: str) -> str | None:
    """Rows a person-facing channel may send as one message: same type, config and event."""
    if kind not in CHANNEL_TYPES or not CHANNEL_TYPES[kind].person_facing:
        return None
    return hashlib.sha256(f"{kind}\n{config}\n{event}".encode()).hexdigest()[:32]


async def _first_attempt_at(conn: aiosqlite.Connection, group: str | None, stamp: int,
                            hold_ms: int) -> int:
    """When a new row is first tried: at once, or with the group a storm is gathering.  A
    group is sent once ``hold_ms`` passes without a new alert joining, at most
    STORM_HOLD_LIMIT windows after its first alert."""
    if group is None or hold_ms <= 0:
        return stamp
    first = present(await _row(conn, "SELECT MIN(created_at) FROM alert_outbox WHERE"
                                     " group_key = ? AND done_at IS NULL AND attempts = 0"
                                     " AND next_attempt_at > ?", (group, stamp)))[0]
    if first is None:
        return stamp + hold_ms
    due = min(stamp + hold_ms, first + STORM_HOLD_LIMIT * hold_ms)
    await conn.execute("UPDATE alert_outbox SET next_attempt_at = ? WHERE group_key = ?"
                       " AND done_at IS NULL AND attempts = 0 AND next_attempt_at > ?",
                       (due, group, stamp))
    return due


async def enqueue_alerts(conn: aiosqlite.Connection, monitor: sqlite3.Row, status: str,
                         channel_events: Sequence[str], webhook_events: Sequence[str],
                         hold_ms: int = 0, **alert: Any) -> int:
    """Queue one outbox row per event and target: the monitor's enabled notifications (inline,
    or linked active channels) and the account's active webhooks subscribed to the event.
    Person-facing channels wait ``hold_ms`` for other monitors' alerts to group with."""
    # A CRON monitor's url is its ping URL, whose path is the secret that reports its job.
    url = None if monitor["type"] == "CRON" else monitor["url"]
    alert["monitor"] = {"id": monitor["id"], "name": monitor["name"], "url": url,
                        "type": monitor["type"], "status": status}
    stamp = now_ms()
    rows: list[tuple[str, str | None, str | None, str | None, str, str, str]] = []
    targets = await conn.execute_fetchall(
        "SELECT n.id, n.channel_id, COALESCE(n.type, c.type) AS type,"
        " COALESCE(n.config, c.config) AS config FROM monitor_notifications n"
        " LEFT JOIN notification_channels c ON c.id = n.channel_id"
        " WHERE n.monitor_id = ? AND n.enabled = 1 AND (n.channel_id IS NULL OR c.is_active = 1)"
        " ORDER BY n.created_at, n.id", (monitor["id"],))
    for event in channel_events:
        for target in targets:
            rows.append((f"{target['channel_id'] or target['id']}:{monitor['id']}",
                         target["channel_id"], None, new_id("dlv"), target["type"],
                         target["config"], event))
    hooks = await conn.execute_fetchall(
        "SELECT id, url, secret, events FROM webhooks WHERE account_id = ? AND is_active = 1"
        " ORDER BY created_at, id", (monitor["account_id"],))
    for event in webhook_events:
        for hook in hooks:
            if event in hook["events"].split(","):
                delivery = new_id("wd")
                await conn.execute("INSERT INTO webhook_deliveries (id, webhook_id, event,"
                                   " created_at) VALUES (?, ?, ?, ?)",
                                   (delivery, hook["id"], event, stamp))
                config = json.dumps({"url": hook["url"], "secret": hook["secret"]})
                rows.append((f"{hook['id']}:{monitor['id']}", None, hook["id"], delivery,
                             "WEBHOOK", config, event))
    for key, channel_id, hook_id, delivery_id, kind, config_text, event in rows:
        group = _group_key(kind, config_text, event)
        await conn.execute(
            "INSERT INTO alert_outbox (account_id, monitor_id, target_key, channel_id, webhook_id,"
            " delivery_id, channel_type, config, event, alert, created_at, next_attempt_at,"
            " group_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (monitor["account_id"], monitor["id"], key, channel_id, hook_id, delivery_id, kind,
             config_text, event, json.dumps({"event": event, **alert}), stamp,
             await _first_attempt_at(conn, group, stamp, hold_ms), group))
    return len(rows)


async def _consume_transition(conn: aiosqlite.Connection, transition: sqlite3.Row,
                              monitor: sqlite3.Row, incidents: dict[str, sqlite3.Row],
                              hold_ms: int, calendar: Maintenance | None = None) -> None:
    """Act on one status transition (see the comment above INCIDENT_SAFETY_POLL); ``incidents``
    (open ones, by monitor) is kept current for the batch's next transitions.  Inside a
    suppressing maintenance window no incident opens and no alert is queued (an open one may
    still resolve, silently)."""
    old, new, at = transition["old_status"], transition["new_status"], transition["created_at"]
    incident = incidents.get(monitor["id"])
    opened = resolved = False
    quiet = calendar is not None and calendar.suppressing(monitor["account_id"], monitor["id"], at)
    if new == Status.DOWN and incident is None:
        if quiet:
            return
        incident, opened = await _open_incident(conn, monitor, transition), True
        incidents[monitor["id"]] = incident
    elif new in (Status.UP, Status.DEGRADED) and incident is not None:
        took = human_duration((at - incident["started_at"]) / 1000)
        incident = await resolve_incident(conn, incident, at,
                                          f"{monitor['name']} is {new} again after {took}")
        resolved = True
        del incidents[monitor["id"]]
    if quiet:
        return
    log.info("monitor %s (%s): %s \u2192 %s (%s)", monitor["name"], monitor["id"], old, new,
             _logged_reason(monitor, transition["reason"]))
    channel_events, webhook_events = transition_events(old, new, opened, resolved)
    if not channel_events and not webhook_events:
        return  # e.g. a new monitor's first PENDING -> UP: nobody to tell
    check = await _row(conn, "SELECT * FROM checks WHERE monitor_id = ? AND checked_at <= ?"
                             " ORDER BY checked_at DESC, id DESC LIMIT 1", (monitor["id"], at))
    await enqueue_alerts(
        conn, monitor, new, channel_events, webhook_events, hold_ms, timestamp=iso(at),
        incident=(incident_alert(incident) if incident and (new == Status.DOWN or resolved)
                  else None),
        check=_check_alert(check, transition["reason"]))


def _logged_reason(monitor: sqlite3.Row, reason: str | None) -> str:
    """A status change's reason as logged: a heartbeat's text is a job's output, which can hold
    its secrets, so CRON monitors log only what kind of signal it was."""
    if monitor["type"] == "CRON" and not (reason or "").startswith(HEARTBEAT_DEADLINES):
        return "heartbeat ping"
    return _cut(_one_line(reason or "no reason given"), 300)


async def process_transitions(rt: Runtime, limit: int = _ENGINE_BATCH) -> int:
    """Consume pending status transitions in order, a batch of up to ``limit`` in one
    transaction (after a failure, one at a time, so those before a bad one still go through);
    return the count."""
    pending = [row[0] for row in await rt.db.fetchall(
        "SELECT id FROM status_transitions WHERE processed_at IS NULL ORDER BY id LIMIT ?",
        (limit,))]
    hold_ms = round(rt.cfg["notifications"]["storm_window"] * 1000)
    try:
        await _consume_transitions(rt, pending, hold_ms)
    except Exception:
        if len(pending) == 1:
            raise
        for transition_id in pending:
            await _consume_transitions(rt, [transition_id], hold_ms)
    return len(pending)


async def _consume_transitions(rt: Runtime, ids: list[int], hold_ms: int) -> None:
    """Consume the transitions ``ids`` not yet processed, exactly once, in one transaction:
    their monitors and open incidents are read once for the batch."""
    if not ids:
        return
    async with rt.db.transaction() as conn:
        batch = await conn.execute_fetchall(
            f"SELECT * FROM status_transitions WHERE id {_IN_IDS} AND processed_at IS NULL"
            " ORDER BY id", (json.dumps(ids),))
        if not batch:
            return
        await conn.execute(f"UPDATE status_transitions SET processed_at = ? WHERE id {_IN_IDS}",
                           (now_ms(), json.dumps([t["id"] for t in batch])))
        monitor_ids = json.dumps(sorted({t["monitor_id"] for t in batch}))
        monitors = {m["id"]: m for m in await conn.execute_fetchall(
            f"SELECT * FROM monitors WHERE id {_IN_IDS}", (monitor_ids,))}
        incidents = {i["monitor_id"]: i for i in await conn.execute_fetchall(
            f"SELECT * FROM incidents WHERE resolved_at IS NULL AND monitor_id {_IN_IDS}",
            (monitor_ids,))}
        for transition in batch:
            if transition["monitor_id"] in monitors:
                await _consume_transition(conn, transition, monitors[transition["monitor_id"]],
                                          incidents, hold_ms, rt.maintenance)


def webhook_result_statements(webhook_id: str, delivery_id: str | None,
                              records: list[DeliveryAttempt], at: int) -> list[Statement]:
    """Record a webhook delivery's outcome: its delivery row, lastStatus and lastTriggeredAt."""
    last = records[-1]
    statements: list[Statement] = [(
        "UPDATE webhooks SET last_status = ?, last_triggered_at = ? WHERE id = ?",
        (last["statusCode"], at, webhook_id))]
    if delivery_id:
        statements.append((
            "UPDATE webhook_deliveries SET status_code = ?, attempts = ?, error = ?,"
            " delivered_at = ? WHERE id = ?",
            (last["statusCode"], len(records), last["error"], at if last["ok"] else None,
             delivery_id)))
    return statements


def retry_delay(attempt: int, cfg: dict[str, dict[str, Any]]) -> float:
    """Seconds to wait after failed attempt number ``attempt``: ``retry_delay`` doubling up to
    ``retry_max_delay``, plus up to 25% jitter so receivers that come back are not stampeded."""
    notify = cfg["notifications"]
    delay = min(notify["retry_delay"] * 2 ** min(attempt - 1, 60), notify["retry_max_delay"])
    return delay * (1 + random.random() / 4)


def _outcome_statements(row: sqlite3.Row, records: list[DeliveryAttempt], at: int,
                        retry_at: int, cfg: dict[str, dict[str, Any]]) -> list[Statement]:
    """Record an attempt on its outbox row: done (delivered, permanently failed or out of
    attempts) or pending until the next attempt's time.  Mark the channel (shared, or a
    monitor's inline one) failing after a permanent error or healthy after a success."""
    last = records[-1]
    done = delivery_done(last, len(records), cfg)
    statements: list[Statement] = [(
        "UPDATE alert_outbox SET done_at = ?, status = ?, attempts = ?, status_code = ?,"
        " last_error = ?, attempt_log = ?, next_attempt_at = ? WHERE id = ?",
        (at if done else None, ("delivered" if last["ok"] else "failed") if done else "pending",
         len(records), last["statusCode"], last["error"], json.dumps(records),
         at if done else retry_at, row["id"]))]
    if row["webhook_id"]:
        return statements + webhook_result_statements(row["webhook_id"], row["delivery_id"],
                                                      records, at)
    table, target = (("notification_channels", row["channel_id"]) if row["channel_id"] else
                     ("monitor_notifications", row["target_key"].split(":")[0]))
    if last["ok"] or last["permanent"]:
        statements.append((f"UPDATE {table} SET failing = ?, last_error = ? WHERE id = ?",
                           (int(not last["ok"]), last["error"], target)))
    else:
        statements.append((f"UPDATE {table} SET last_error = ? WHERE id = ?",
                           (last["error"], target)))
    return statements


def grouped_alert(alerts: Sequence[Alert], names: int) -> Alert:
    """One alert standing for several monitors' alerts of the same event (an alert storm)."""
    first = alerts[0]
    listed = [str(a.monitor.get("name") or a.monitor.get("id")) for a in alerts]
    return Alert(event=first.event, timestamp=first.timestamp,
                 monitor={"name": f"{len(alerts)} monitors", "status": first.monitor.get("status")},
                 group={"count": len(alerts), "names": listed[:names]})


async def _deliver_queued(rt: Runtime, ctx: NotifyContext,
                          rows: list[sqlite3.Row]) -> DeliveryAttempt:
    """One attempt at one outbox row, or at a group of rows as one message; log and record it."""
    head = rows[0]
    alerts = [Alert(**json.loads(row["alert"])) for row in rows]
    alert = alerts[0] if len(rows) == 1 else grouped_alert(
        alerts, rt.cfg["notifications"]["storm_names"])
    send = CHANNEL_TYPES[head["channel_type"]].send
    record = await attempt_delivery(send, json.loads(head["config"]), alert, ctx,
                                    head["delivery_id"], head["attempts"] + 1)
    await _log_delivery(rt, head, alert, record, len(rows))
    at = now_ms()
    retry_at = at + round(retry_delay(record["attempt"], rt.cfg) * 1000)  # a group stays one
    await rt.db.write([statement for row in rows for statement in _outcome_statements(
        row, [*json.loads(row["attempt_log"] or "[]"), record], at, retry_at, rt.cfg)])
    return record


_SERVICE_URL_KEYS = {"TELEGRAM": "telegram_api_url", "PAGERDUTY": "pagerduty_url",
                     "OPSGENIE": "opsgenie_url", "SMS": "twilio_api_url",
                     "PUSHOVER": "pushover_url"}
_TARGET_URL_KEYS = ("url", "webhookUrl", "serverUrl", "homeserver")  # in a channel's config


def delivery_host(row: sqlite3.Row, cfg: dict[str, dict[str, Any]]) -> str:
    """The host and port a delivery talks to: the unit of the per-host limit on slots."""
    if row["channel_type"] == "EMAIL":
        return f"smtp:{cfg['smtp']['host']}"
    config = json.loads(row["config"])
    key = _SERVICE_URL_KEYS.get(row["channel_type"])
    url = cfg["notifications"][key] if key else next(
        (config[k] for k in _TARGET_URL_KEYS if config.get(k)), None)
    try:
        parts = urlsplit(str(url))
        return f"{(parts.hostname or '').lower()}:{parts.port or parts.scheme}"
    except ValueError:
        return ""


class _Slots:
    """Delivery slots in use, in all and per host, and the lanes (targets, groups) busy.

    A host whose last attempt got no answer (timed out, refused, unreachable) is a suspect:
    it gets one slot at a time, and all suspects together a quarter of the slots, so hung
    receivers retrying for an hour never crowd out the healthy ones."""

    def __init__(self, cfg: dict[str, dict[str, Any]]) -> None:
        self.total, self.per_host = (cfg["notifications"][key] for key in ("concurrency",
                                                                          "per_host"))
        self.hosts: collections.Counter[str] = collections.Counter()
        self.lanes: set[str] = set()
        self.suspects: set[str] = set()

    def free(self, host: str, lanes: set[str]) -> bool:
        if host in self.suspects and (self.hosts[host] or sum(
                self.hosts[h] for h in self.suspects) >= max(1, self.total // 4)):
            return False
        return (self.hosts.total() < self.total and self.hosts[host] < self.per_host
                and not lanes & self.lanes)

    def judge(self, host: str, record: DeliveryAttempt) -> None:
        """Note whether ``host`` answered its latest attempt."""
        if record["ok"] or record["statusCode"] is not None or record["permanent"]:
            self.suspects.discard(host)
        else:
            self.suspects.add(host)

    def take(self, host: str, lanes: set[str]) -> None:
        self.hosts[host] += 1
        self.lanes |= lanes

    def give_back(self, host: str, lanes: set[str]) -> None:
        self.hosts[host] -= 1
        if not self.hosts[host]:
            del self.hosts[host]
        self.lanes -= lanes


# Due rows that are the oldest undone row of their target (a target's alerts go in order).
_DUE_SQL = ("SELECT * FROM alert_outbox o WHERE done_at IS NULL AND next_attempt_at <= ?"
            " AND NOT EXISTS (SELECT 1 FROM alert_outbox p WHERE p.target_key = o.target_key"
            " AND p.done_at IS NULL AND p.id < o.id) ORDER BY next_attempt_at, id LIMIT 1000")


def _batches(rows: list[sqlite3.Row]) -> list[list[sqlite3.Row]]:
    """Due rows as delivery units: a person-facing group's rows together, others alone."""
    groups: dict[str, list[sqlite3.Row]] = {}
    units: list[list[sqlite3.Row]] = []
    for row in rows:
        if row["group_key"] in groups:
            groups[row["group_key"]].append(row)
            continue
        units.append([row])
        if row["group_key"]:
            groups[row["group_key"]] = units[-1]
    return units


def delivery_done(last: DeliveryAttempt, count: int, cfg: dict[str, dict[str, Any]]) -> bool:
    """Whether an outbox row is finished after its ``count``-th attempt ``last``."""
    return last["ok"] or last["permanent"] or count >= cfg["notifications"]["attempts"]


async def _log_delivery(rt: Runtime, head: sqlite3.Row, alert: Alert, record: DeliveryAttempt,
                        monitors: int) -> None:
    """One line per alert outcome (delivered, or failed for good); attempts before at debug."""
    done = delivery_done(record, record["attempt"], rt.cfg)
    level = logging.DEBUG if not done else logging.INFO if record["ok"] else logging.WARNING
    if not log.isEnabledFor(level):
        return
    outcome = ("delivered" if record["ok"] else f"failed after {record['attempt']} attempt(s): "
               f"{record['error']}" if done else f"attempt {record['attempt']} failed, will "
               f"retry: {record['error']}")
    log.log(level, "alert %s for %s via %s: %s", head["event"],
            f"monitor {alert.monitor.get('name')}" if monitors == 1 else alert.monitor["name"],
            await _target_name(rt, head), outcome)


async def _target_name(rt: Runtime, row: sqlite3.Row) -> str:
    """How a log line names an alert's target: the channel's or webhook's name and type."""
    table, ident = (("notification_channels", row["channel_id"]) if row["channel_id"] else
                    ("webhooks", row["webhook_id"]))
    if not ident:
        return f"inline {row['channel_type']}"
    name = await rt.db.fetchval(f"SELECT name FROM {table} WHERE id = ?", (ident,))
    return f"{row['channel_type']} {name!r}" if name is not None else f"deleted {ident}"


async def _delivery_loop(rt: Runtime) -> None:
    """Drain the outbox: targets in parallel within the slot limits (in all and per host), each
    target's alerts in order, one attempt at a time; failed attempts wait in the outbox.  It
    sleeps until woken (an alert queued, an attempt finished) or the next row is due.

    The outbox is read on a reader connection, whose answer can predate the commit of a
    delivery that finished meanwhile; ``started`` (row ids and attempt counts taken in hand,
    until seen changed) keeps such a stale answer from sending an attempt twice."""
    slots, started, wake = _Slots(rt.cfg), set[tuple[int, int]](), rt.outbox_wake
    running: set[asyncio.Task[DeliveryAttempt]] = set()

    def finished(host: str, lanes: set[str], task: asyncio.Task[DeliveryAttempt]) -> None:
        slots.give_back(host, lanes)
        running.discard(task)
        error = None if task.cancelled() else task.exception()
        if error and storage_cause(error) is None:  # storage failures: the Database logs them
            log.error("alert delivery failed", exc_info=error)
        elif not task.cancelled() and not error:
            slots.judge(host, task.result())
        wake.set()

    async with NotifyContext(rt.cfg) as ctx:
        try:
            while True:
                wake.clear()
                now = now_ms()
                rows = await rt.db.fetchall(_DUE_SQL, (now,))
                state = {(row["id"], row["attempts"]): row for row in rows}
                started &= set(state)  # the others are done or were tried again
                for unit in _batches([row for at, row in state.items() if at not in started]):
                    host = delivery_host(unit[0], rt.cfg)
                    lanes = {unit[0]["group_key"] or "", *(row["target_key"] for row in unit)}
                    if not slots.free(host, lanes - {""}):
                        continue
                    slots.take(host, lanes - {""})
                    started.update((row["id"], row["attempts"]) for row in unit)
                    task = asyncio.create_task(_deliver_queued(rt, ctx, unit))
                    running.add(task)
                    task.add_done_callback(functools.partial(finished, host, lanes - {""}))
                await _sleep_until_due(rt, wake, now)
        finally:
            tasks = list(running)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _sleep_until_due(rt: Runtime, wake: asyncio.Event, now: int) -> None:
    """Wait for ``wake``, the next outbox row not yet due at ``now``, or the safety poll."""
    due = await rt.db.fetchval("SELECT MIN(next_attempt_at) FROM alert_outbox"
                               " WHERE done_at IS NULL AND next_attempt_at > ?", (now,))
    timeout = INCIDENT_SAFETY_POLL if due is None else min(
        INCIDENT_SAFETY_POLL, max(0.0, (due - now_ms()) / 1000) + 0.005)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout)


async def run_incidents(rt: Runtime) -> None:
    """The incident engine and the alert delivery workers, until cancelled; both look at
    start-up, so work queued before a restart is found at once."""
    async def engine() -> None:
        while True:
            rt.engine_wake.clear()
            try:
                count = await process_transitions(rt, _ENGINE_BATCH)
                if count:
                    rt.public_cache.invalidate()
                if count == _ENGINE_BATCH:
                    continue  # more may wait; fewer: a later one set engine_wake when committed
            except Exception:
                log_failure("incident engine failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rt.engine_wake.wait(), INCIDENT_SAFETY_POLL)

    await asyncio.gather(engine(), _delivery_loop(rt))


# Maintenance windows
#
# A window is one-off (startsAt..endsAt) or recurring: an RFC 5545 RRULE, evaluated by
# python-dateutil, whose occurrences start at startsAt's wall-clock time in ``timezone`` and
# last durationMinutes, so "every Sunday 03:00" stays 03:00 local across daylight-saving
# changes.  Every window lives in memory (``Maintenance``), reloaded when the API changes one.
# The prober and heartbeats ask it whether a check falls in a window (stored with
# checks.maintenance = 1 and left out of uptime), the incident engine whether a transition's
# incident and alerts are suppressed, and the window-end service opens, once, the incident of a
# monitor still DOWN when a suppressing window ends (ends_handled_at makes "once" durable).

MAINTENANCE_LOOKAHEAD_DAYS = 7  # status pages show windows starting this soon as scheduled
_MAINTENANCE_IDLE = 60.0        # seconds the window-end service sleeps at most
_RRULE_FREQS = ("DAILY", "WEEKLY", "MONTHLY", "YEARLY")


def parse_moment(text: str, zone: zoneinfo.ZoneInfo) -> datetime:
    """An ISO 8601 time, as a time in ``zone``; one without an offset is wall-clock time there."""
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=zone)).astimezone(zone)


def _wall(ms: int, zone: zoneinfo.ZoneInfo) -> datetime:
    """Naive wall-clock time in ``zone`` of a Unix ms time (what the rrule iterates over)."""
    return datetime.fromtimestamp(ms / 1000, zone).replace(tzinfo=None)


def parse_rrule(text: str, start: datetime) -> dateutil.rrule.rrule:
    """An RRULE whose occurrences begin at ``start`` (aware), iterated in its wall-clock time;
    ValueError for anything but DAILY/WEEKLY/MONTHLY/YEARLY rules dateutil accepts."""
    body = text.strip().removeprefix("RRULE:")
    freq = re.search(r"(?:^|;)FREQ=([A-Z]+)", body.upper())
    if not freq or freq.group(1) not in _RRULE_FREQS:
        raise ValueError(f"FREQ must be one of {', '.join(_RRULE_FREQS)}")
    until = re.search(r"UNTIL=(\d{8}T\d{6})Z", body, re.IGNORECASE)
    if until:  # RFC 5545: UNTIL is UTC when DTSTART has a zone; the rule runs on wall-clock time
        utc = datetime.strptime(until.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
        body = body.replace(until.group(0), f"UNTIL={utc.astimezone(start.tzinfo):%Y%m%dT%H%M%S}")
    rule = dateutil.rrule.rrulestr(body, dtstart=start.replace(tzinfo=None), forceset=False)
    if not isinstance(rule, dateutil.rrule.rrule):
        raise ValueError("expected one RRULE")
    return rule


@dataclass
class Window:
    """One maintenance window, ready to answer "does it cover this monitor at this time"."""

    id: str
    account_id: str
    title: str
    description: str | None
    monitor_ids: frozenset[str] | None  # None: all the team's monitors
    suppress: bool
    start: datetime
    end: datetime | None
    rule: dateutil.rrule.rrule | None
    duration: timedelta
    zone: zoneinfo.ZoneInfo
    handled: int
    updated_at: int
    _day: tuple[int, int, list[tuple[int, int]]] = (0, 0, [])  # [lo, hi) and its occurrences

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Window:
        zone = zoneinfo.ZoneInfo(row["timezone"])
        start = parse_moment(row["starts_at"], zone)
        end = parse_moment(row["ends_at"], zone) if row["ends_at"] else None
        rule = parse_rrule(row["recurrence"], start) if row["recurrence"] else None
        duration = (timedelta(minutes=row["duration_minutes"]) if rule is not None
                    else (end or start) - start)
        ids = json.loads(row["monitor_ids"]) if row["monitor_ids"] else None
        return cls(row["id"], row["account_id"], row["title"], row["description"],
                   None if ids is None else frozenset(ids), bool(row["suppress_alerts"]),
                   start, end, rule, duration, zone, row["ends_handled_at"], row["updated_at"])

    def covers(self, account_id: str, monitor_id: str) -> bool:
        return account_id == self.account_id and (self.monitor_ids is None
                                                  or monitor_id in self.monitor_ids)

    def occurrences(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """(start, end) in Unix ms of each occurrence overlapping [lo, hi), in order."""
        if self.rule is None:
            starts = [self.start]
        else:  # a day's margin on each side absorbs any UTC offset; then filtered exactly
            span = self.duration + timedelta(days=1)
            starts = [t.replace(tzinfo=self.zone) for t in self.rule.between(
                _wall(lo, self.zone) - span, _wall(hi, self.zone) + timedelta(days=1), inc=True)]
        width = int(self.duration.total_seconds() * 1000)
        spans = [(unix_ms(t), unix_ms(t) + width) for t in starts]
        return [(a, b) for a, b in spans if a < hi and b > lo]

    def running(self, at: int) -> bool:
        """Whether an occurrence runs at ``at``; a day of occurrences is kept, so the prober's
        many questions do not each walk the rule from its start."""
        lo, hi, spans = self._day
        if not lo <= at < hi:
            lo, hi = at, at + DAY_MS
            spans = self.occurrences(lo, hi)
            self._day = (lo, hi, spans)
        return any(a <= at < b for a, b in spans)


class Maintenance:
    """All maintenance windows in memory, and the clock they are judged by (tests move it)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.clock: Callable[[], int] = now_ms
        self.windows: dict[str, Window] = {}
        self.owners: dict[str, str] = {}  # monitor id -> its team, for checks that name none
        self.wake = asyncio.Event()

    async def reload(self) -> None:
        rows = await self.rt.db.fetchall("SELECT * FROM maintenance_windows")
        self.windows = {row["id"]: Window.from_row(row) for row in rows}
        self.note_owners(await self.rt.db.fetchall("SELECT id, account_id FROM monitors"))
        self.wake.set()

    def note_owners(self, rows: Collection[sqlite3.Row]) -> None:
        """Learn the team of each monitor in ``rows`` (a monitor never changes team).  The
        feeds note the monitors they hand out, so a new monitor's team is known before its
        first check, with nothing to wait for."""
        self.owners.update((row["id"], row["account_id"]) for row in rows)

    def active_monitor(self, monitor_id: str, at: int) -> bool:
        """Whether a window covers the monitor at ``at``, by its id alone (probes, agents)."""
        account = self.owners.get(monitor_id)
        return account is not None and self.active(account, monitor_id, at)

    def covering(self, account_id: str, monitor_id: str, at: int) -> list[Window]:
        """The windows covering the monitor at ``at``."""
        return [w for w in self.windows.values()
                if w.covers(account_id, monitor_id) and w.running(at)]

    def active(self, account_id: str, monitor_id: str, at: int | None = None) -> bool:
        return bool(self.covering(account_id, monitor_id, self.clock() if at is None else at))

    def running(self, account_id: str) -> list[Window]:
        """The team's windows running now (whether one covers a monitor: ``covers``)."""
        now = self.clock()
        return [w for w in self.windows.values() if w.account_id == account_id and w.running(now)]

    def suppressing(self, account_id: str, monitor_id: str, at: int) -> bool:
        return any(w.suppress for w in self.covering(account_id, monitor_id, at))

    async def settle_ends(self) -> None:
        """Act once on each occurrence that ended since its window was last looked at."""
        now = self.clock()
        for window in list(self.windows.values()):
            ends = [b for _, b in window.occurrences(window.handled, now)
                    if window.handled < b <= now]
            if ends:
                await self.ended(window, ends[-1], now)

    async def ended(self, window: Window, end: int, now: int) -> None:
        """Act on the end of an occurrence of ``window`` (``end_statements``; the transitions
        it writes wake the incident engine)."""
        await self.rt.db.write(await self.end_statements(window, end, now))
        window.handled = now

    async def end_statements(self, window: Window, end: int, now: int) -> list[Statement]:
        """Open the incident of every covered monitor still DOWN with none open (as a DOWN ->
        DOWN transition at the window's end, for the incident engine); mark the end handled."""
        statements: list[Statement] = []
        if window.suppress:
            rows = await self.rt.db.fetchall(
                "SELECT id FROM monitors m WHERE account_id = ? AND status = 'DOWN'"
                " AND is_paused = 0 AND NOT EXISTS (SELECT 1 FROM incidents i"
                " WHERE i.monitor_id = m.id AND i.resolved_at IS NULL)", (window.account_id,))
            reason = f"still down when maintenance window {window.title!r} ended"
            statements = [("INSERT INTO status_transitions (monitor_id, old_status, new_status,"
                           " reason, created_at) VALUES (?, 'DOWN', 'DOWN', ?, ?)",
                           (row["id"], reason, end)) for row in rows
                          if window.covers(window.account_id, row["id"])
                          and not self._held(window, row["id"], end)]
        statements.append(("UPDATE maintenance_windows SET ends_handled_at = ? WHERE id = ?",
                           (now, window.id)))
        return statements

    def _held(self, ending: Window, monitor_id: str, at: int) -> bool:
        """Whether another suppressing window still covers the monitor (its end will act)."""
        return any(w.suppress and w is not ending
                   for w in self.covering(ending.account_id, monitor_id, at))

    def next_boundary(self, now: int) -> int | None:
        """The earliest start or end, after now, of an occurrence running now or starting soon."""
        times = [t for w in self.windows.values()
                 for span in w.occurrences(now, now + int(_MAINTENANCE_IDLE * 1000))
                 for t in span if t > now]
        return min(times, default=None)


async def run_maintenance(rt: Runtime) -> None:
    """The window service: wakes when a window starts or ends (or is edited), acts on ends, and
    lets public pages show the change (their cache is dropped)."""
    calendar = rt.maintenance
    while True:
        calendar.wake.clear()
        try:
            await calendar.settle_ends()
        except Exception:
            log.exception("maintenance window ends failed; retrying")
        rt.public_cache.invalidate()
        now = calendar.clock()
        end = calendar.next_boundary(now)
        timeout = _MAINTENANCE_IDLE if end is None else min(_MAINTENANCE_IDLE,
                                                            (end - now) / 1000 + 0.01)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(calendar.wake.wait(), timeout)


# --- Analytics ---
#
# Check figures have three sources with one meaning: raw checks, hourly rollups ('h') and daily
# rollups ('d').  ``plan_window`` splits a window so complete days come from daily rows,
# complete hours from hourly rows and only the recent rest from raw checks: long windows never
# scan raw rows.  Response-time figures cover UP and DEGRADED checks that have a response
# time.  Rollups keep a log-scale histogram (buckets 5% wide), so a percentile read from
# rollups is within 2.5% (plus 1 ms of rounding) of the exact nearest-rank value.

HIST_RATIO = 1.05
ROLLUP_GRACE_MS = 300_000  # an hour is rolled up 5 minutes after it ends, for late writes
RETENTION_BATCH = 500      # rows per write transaction when rolling up or pruning
_RETENTION_PAUSE = 0.02    # seconds between batches, so probes and the API get the writer
_HIST_INDEX = "CAST(ceil(ln(max(response_time, 1)) / ln(1.05)) AS INTEGER)"
_GROUPS = {"monitor": "monitor_id", "region": "region_id", "day": "{t} - {t} % 86400000",
           "hour": "{t} - {t} % 3600000"}


@dataclass(frozen=True)
class _Source:
    """How to read status counts and histogram buckets from raw checks or one rollup level."""

    table: str
    time: str
    where: str
    counts: str
    hist_table: str
    hist_where: str
    hist_key: str
    hist_count: str


def _rollup_source(bucket: str) -> _Source:
    return _Source("check_rollups", "start", f"bucket = '{bucket}'",
                   "SUM(up), SUM(down), SUM(degraded), SUM(rt_sum), SUM(rt_count)",
                   "check_rollups, json_each(check_rollups.rt_hist) AS j", f"bucket = '{bucket}'",
                   "CAST(j.key AS INTEGER)", "SUM(j.value)")


SOURCES = {
    "raw": _Source("checks", "checked_at", "maintenance = 0",
                   "SUM(status = 'UP'), SUM(status = 'DOWN'), SUM(status = 'DEGRADED'),"
                   " SUM(CASE WHEN status != 'DOWN' THEN response_time END),"
                   " COUNT(CASE WHEN status != 'DOWN' THEN response_time END)",
                   "checks", "status != 'DOWN' AND response_time IS NOT NULL AND maintenance = 0",
                   _HIST_INDEX,
                   "COUNT(*)"),
    "h": _rollup_source("h"),
    "d": _rollup_source("d"),
}


def _query(kind: str, ids: Sequence[str], lo: int, hi: int, group: Sequence[str],
           hist: bool) -> Statement:
    """Counts (or histogram buckets) of one source over [lo, hi), grouped by ``group``."""
    src = SOURCES[kind]
    keys = [_GROUPS[g].format(t=src.time) for g in group]
    if hist:
        keys.append(src.hist_key)
    values = src.hist_count if hist else src.counts
    table, where = (src.hist_table, src.hist_where) if hist else (src.table, src.where)
    grouping = f" GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}" if keys else ""
    marks = ",".join("?" * len(ids))
    return (f"SELECT {', '.join([*keys, values])} FROM {table} WHERE monitor_id IN ({marks})"
            f" AND {where} AND {src.time} >= ? AND {src.time} < ?{grouping}", [*ids, lo, hi])


def plan_window(lo: int, hi: int, hours_done: int, days_done: int) -> list[tuple[str, int, int]]:
    """Split [lo, hi) into daily, hourly and raw segments; only an hour-aligned ``lo`` uses
    rollups, and only periods the rollups already cover (``*_done``)."""
    segments, t = [], lo
    if t % HOUR_MS == 0:
        first_day = -(-t // DAY_MS) * DAY_MS
        last_day = min(hi // DAY_MS * DAY_MS, days_done)
        if first_day < last_day:
            if t < first_day:
                segments.append(("h", t, first_day))
            segments.append(("d", first_day, last_day))
            t = last_day
        hour_end = min(hi // HOUR_MS * HOUR_MS, hours_done)
        if t < hour_end:
            segments.append(("h", t, hour_end))
            t = hour_end
    if t < hi:
        segments.append(("raw", t, hi))
    return segments


async def rollup_progress(db: Database) -> tuple[int, int]:
    """Where hourly and daily rollups end (0 before the first roll-up)."""
    done: dict[str, int] = {bucket: until for bucket, until in await db.fetchall(
        "SELECT bucket, done_until FROM rollup_progress")}
    return done.get("h", 0), done.get("d", 0)


async def collect(db: Database, ids: Sequence[str], lo: int, hi: int, group: Sequence[str],
                  hist: bool = False) -> dict[tuple[Any, ...], list[int]]:
    """Sum counts ``[up, down, degraded, rt_sum, rt_count]`` (or ``[count]`` per histogram
    bucket, the bucket index last in the key) per ``group`` key over [lo, hi)."""
    out: dict[tuple[Any, ...], list[int]] = {}
    if not ids:
        return out
    width = len(group) + hist
    for kind, a, b in plan_window(lo, hi, *await rollup_progress(db)):
        for row in await db.fetchall(*_query(kind, ids, a, b, group, hist)):
            values = [v or 0 for v in tuple(row)[width:]]
            acc = out.setdefault(tuple(row)[:width], [0] * len(values))
            for i, value in enumerate(values):
                acc[i] += value
    return out


def hist_value(index: int) -> int:
    """The value a histogram bucket stands for: its geometric middle, in ms."""
    return max(1, round(HIST_RATIO ** (index - 0.5)))


def uptime_percent(up: int, total: int) -> float | None:
    """Uptime % rounded DOWN to 2 decimals, so any downtime never shows as 100%."""
    if not total:
        return None
    return math.floor(round(up * 10_000 / total, 6)) / 100


@dataclass
class WindowStats:
    """Check figures of one window: exact response times when known, else a histogram."""

    up: int = 0
    down: int = 0
    degraded: int = 0
    rt_sum: int = 0
    rt_count: int = 0
    values: list[int] | None = None
    hist: dict[int, int] = dataclasses.field(default_factory=dict)

    def add(self, counts: Sequence[int]) -> None:
        self.up += counts[0]
        self.down += counts[1]
        self.degraded += counts[2]
        self.rt_sum += counts[3]
        self.rt_count += counts[4]

    @property
    def total(self) -> int:
        return self.up + self.down + self.degraded

    def uptime(self) -> float | None:
        """(UP + DEGRADED) / all checks * 100, rounded down to 2 decimals (100 means no
        failure at all); None without checks."""
        return uptime_percent(self.up + self.degraded, self.total)

    def average(self) -> int | None:
        return round(self.rt_sum / self.rt_count) if self.rt_count else None

    def percentile(self, p: float) -> int | None:
        """Nearest rank: the value at rank ceil(p/100 * n) of the n sorted response times."""
        if self.values is not None:
            ordered = sorted(self.values)
            return ordered[nearest_rank(len(ordered), p) - 1] if ordered else None
        count = sum(self.hist.values())
        if not count:
            return None
        rank, seen = nearest_rank(count, p), 0
        for index in sorted(self.hist):
            seen += self.hist[index]
            if seen >= rank:
                return hist_value(index)
        return None


def _ceil_hour(ms: int) -> int:
    return -(-ms // HOUR_MS) * HOUR_MS


async def window_stats(db: Database, ids: Sequence[str], lo: int, hi: int,
                       exact: bool | None = None) -> tuple[WindowStats, dict[str, list[int]]]:
    """Figures of ``ids`` over [lo, hi) and ``[rt_sum, rt_count]`` per region.

    Exact windows (by default those up to 24 hours) read raw checks; the others start at the
    first full hour and read rollups (percentiles from the histogram).
    """
    regions: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    if hi - lo <= DAY_MS if exact is None else exact:
        values: list[int] = []
        stats = WindowStats(values=values)
        marks = ",".join("?" * len(ids))
        for region, status, rt in await db.fetchall(
                f"SELECT region_id, status, response_time FROM checks WHERE monitor_id IN"
                f" ({marks}) AND checked_at >= ? AND checked_at < ? AND maintenance = 0",
                [*ids, lo, hi]):
            timed = status != Status.DOWN and rt is not None
            stats.add((status == Status.UP, status == Status.DOWN, status == Status.DEGRADED,
                       rt if timed else 0, timed))
            if timed:
                values.append(rt)
                regions[region][0] += rt
                regions[region][1] += 1
        return stats, regions
    lo = _ceil_hour(lo)
    stats = WindowStats()
    for (region,), counts in (await collect(db, ids, lo, hi, ("region",))).items():
        stats.add(counts)
        regions[region][0] += counts[3]
        regions[region][1] += counts[4]
    stats.hist = {key[0]: value[0] for key, value in
                  (await collect(db, ids, lo, hi, (), hist=True)).items()}
    return stats, regions


# The entries of days the daily rollups cover never change, so callers may keep them in a
# ``SettledDays`` memo: keyed by the monitors, the first day and where the rollups end, each
# monitor's entries of those days. Entries are shared between calls: read-only for callers.
DayEntries = dict[str, list[dict[str, Any]]]
SettledDays = dict[tuple[tuple[str, ...], int, int], DayEntries]
_SETTLED_MEMO_MONITORS = 250  # monitors held in all: about 40 KB each with 89 days of data


def _day_entries(ids: Sequence[str], starts: range,
                 counts: dict[tuple[Any, ...], list[int]]) -> DayEntries:
    """Per monitor, one entry per day of ``starts``; days without data share one entry."""
    labels = [datetime.fromtimestamp(day / 1000, timezone.utc).strftime("%Y-%m-%d")
              for day in starts]
    empty: dict[str, dict[str, Any]] = {label: {"day": label, "up": 0, "down": 0, "degraded": 0, "total": 0,
                                         "uptime": None} for label in labels}
    out: DayEntries = {}
    for monitor_id in ids:
        out[monitor_id] = entries = []
        for day, label in zip(starts, labels, strict=True):
            got = counts.get((monitor_id, day))
            if got is None:
                entries.append(empty[label])
                continue
            up, down, degraded = got[:3]
            total = up + down + degraded
            entries.append({"day": label, "up": up, "down": down, "degraded": degraded,
                            "total": total, "uptime": uptime_percent(up + degraded, total)})
    return out


async def _settled_entries(db: Database, ids: list[str], first: int, settled: int,
                           memo: SettledDays | None) -> DayEntries:
    """The entries of [first, settled), from ``memo`` when it has them (least recently used
    dropped first once it holds more than _SETTLED_MEMO_MONITORS monitors)."""
    key = (tuple(ids), first, settled)
    past = memo.pop(key, None) if memo is not None else None
    if past is None:
        past = _day_entries(ids, range(first, settled, DAY_MS),
                            await collect(db, ids, first, settled, ("monitor", "day")))
    if memo is not None:
        while memo and sum(map(len, memo.values())) + len(ids) > _SETTLED_MEMO_MONITORS:
            del memo[next(iter(memo))]
        memo[key] = past
    return past


async def daily_stats(db: Database, monitor_ids: Sequence[str], days: int,
                      memo: SettledDays | None = None) -> DayEntries:
    """Per monitor, one entry per UTC day of the last ``days`` days (today last), from
    daily rollups plus hourly and raw rows for the days not rolled up yet."""
    now = now_ms()
    today = now // DAY_MS * DAY_MS
    first = today - (days - 1) * DAY_MS
    ids = list(monitor_ids)
    settled = max(first, min(today, (await rollup_progress(db))[1]))
    past = await _settled_entries(db, ids, first, settled, memo)
    fresh = _day_entries(ids, range(settled, now + 1, DAY_MS),
                         await collect(db, ids, settled, now + 1, ("monitor", "day")))
    return {monitor_id: past[monitor_id] + fresh[monitor_id] for monitor_id in ids}


# Rollups and pruning

async def _roll(db: Database, source: str, bucket: str, ids: Sequence[str], lo: int) -> None:
    """Aggregate [lo, lo + one bucket) of ``source`` into ``bucket`` rows, a chunk of
    monitors per transaction, and advance the progress mark with the last chunk."""
    span = HOUR_MS if bucket == "h" else DAY_MS
    chunks = [ids[i:i + RETENTION_BATCH] for i in range(0, len(ids), RETENTION_BATCH)] or [[]]
    for position, chunk in enumerate(chunks):
        rows = await db.fetchall(*_query(source, chunk, lo, lo + span, ("monitor", "region"),
                                         False))
        hists: dict[tuple[str, str], dict[str, int]] = collections.defaultdict(dict)
        for monitor_id, region, index, count in await db.fetchall(
                *_query(source, chunk, lo, lo + span, ("monitor", "region"), True)):
            hists[(monitor_id, region)][str(index)] = count
        statements: list[Statement] = [(
            "INSERT OR REPLACE INTO check_rollups (monitor_id, bucket, start, region_id, up,"
            " down, degraded, rt_sum, rt_count, rt_hist) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r[0], bucket, lo, r[1], *(v or 0 for v in tuple(r)[2:]),
             json.dumps(hists[(r[0], r[1])], separators=(",", ":")))) for r in rows]
        if position == len(chunks) - 1:
            statements.append(_progress_statement(bucket, lo + span))
        await db.write(statements)
        await asyncio.sleep(_RETENTION_PAUSE)


# A team's hourly row: the sums of its monitors' hourly rows, histograms merged by bucket.
_TEAM_ROLLUP = (
    "INSERT OR REPLACE INTO team_rollups (account_id, start, up, down, degraded, rt_sum,"
    " rt_count, rt_hist) SELECT t.account_id, t.start, t.up, t.down, t.degraded, t.rt_sum,"
    " t.rt_count, COALESCE((SELECT json_group_object(k, n) FROM (SELECT j.key AS k,"
    " SUM(j.value) AS n FROM monitors m2 JOIN check_rollups r2 ON r2.monitor_id = m2.id"
    " AND r2.bucket = 'h' AND r2.start = t.start, json_each(r2.rt_hist) AS j"
    " WHERE m2.account_id = t.account_id GROUP BY j.key)), '{}')"
    " FROM (SELECT m.account_id, r.start, SUM(r.up) AS up, SUM(r.down) AS down,"
    " SUM(r.degraded) AS degraded, SUM(r.rt_sum) AS rt_sum, SUM(r.rt_count) AS rt_count"
    " FROM monitors m JOIN check_rollups r ON r.monitor_id = m.id AND r.bucket = 'h'"
    " AND r.start >= ? AND r.start < ? GROUP BY m.account_id, r.start) AS t")


def _progress_statement(bucket: str, done_until: int) -> Statement:
    return ("INSERT INTO rollup_progress (bucket, done_until) VALUES (?, ?) ON CONFLICT (bucket)"
            " DO UPDATE SET done_until = excluded.done_until", (bucket, done_until))


async def _roll_teams(db: Database, hours_done: int) -> None:
    """Sum the hourly rows not yet summed per team (a day per transaction)."""
    teams_done = await db.fetchval("SELECT done_until FROM rollup_progress WHERE bucket = 't'")
    if teams_done is None:
        teams_done = await db.fetchval("SELECT MIN(start) FROM check_rollups WHERE bucket = 'h'"
                                       ) or hours_done
    while teams_done < hours_done:
        until = min(hours_done, teams_done + DAY_MS)
        await db.write([(_TEAM_ROLLUP, (teams_done, until)), _progress_statement("t", until)])
        teams_done = until
        await asyncio.sleep(_RETENTION_PAUSE)


async def roll_up(db: Database, now: int | None = None) -> tuple[int, int]:
    """Roll every complete hour into hourly rows (per monitor, then per team) and every
    complete day into daily rows (built from the hourly ones); return the progress marks."""
    now = now_ms() if now is None else now
    hours_done, days_done = await rollup_progress(db)
    if not hours_done:
        oldest = await db.fetchval("SELECT checked_at FROM checks ORDER BY id LIMIT 1")
        hours_done = (now if oldest is None else oldest) // HOUR_MS * HOUR_MS
        days_done = hours_done // DAY_MS * DAY_MS
    ids = [r[0] for r in await db.fetchall("SELECT id FROM monitors ORDER BY id")]
    while hours_done + HOUR_MS <= now - ROLLUP_GRACE_MS:
        await _roll(db, "raw", "h", ids, hours_done)
        hours_done += HOUR_MS
        while days_done + DAY_MS <= hours_done:
            await _roll(db, "h", "d", ids, days_done)
            days_done += DAY_MS
    await _roll_teams(db, hours_done)
    return hours_done, days_done


async def _delete_in_batches(db: Database, sql: str, params: Sequence[Any]) -> int:
    """Run a batched DELETE (limited to RETENTION_BATCH rows) until it deletes nothing."""
    total = 0
    while True:
        async with db.transaction() as conn:
            deleted = (await conn.execute(sql, params)).rowcount
        total += deleted
        if not deleted:
            return total
        await asyncio.sleep(_RETENTION_PAUSE)


async def prune(db: Database, cfg: dict[str, dict[str, Any]], now: int | None = None
                ) -> dict[str, int]:
    """Delete raw checks, heartbeat pings, delivered alerts and agents' batch ids past
    ``raw_days`` (never checks not rolled up yet, nor a monitor's latest check), hourly rollups
    past ``hourly_days`` and daily ones past ``rollup_days``."""
    now = now_ms() if now is None else now
    keep = cfg["retention"]
    hours_done, _ = await rollup_progress(db)
    raw_cut = min(now - keep["raw_days"] * DAY_MS, hours_done)
    deleted = {"raw": await _delete_in_batches(
        db, "DELETE FROM check_rows WHERE id IN (SELECT id FROM (SELECT id, checked_at FROM"
            " check_rows"
            " WHERE id NOT IN (SELECT check_id FROM monitor_latest) ORDER BY id LIMIT ?)"
            " WHERE checked_at < ?)", (RETENTION_BATCH, raw_cut))}
    deleted["pings"] = await _delete_in_batches(
        db, "DELETE FROM heartbeats WHERE id IN (SELECT id FROM heartbeats WHERE received_at < ?"
            " ORDER BY id LIMIT ?)", (now - keep["raw_days"] * DAY_MS, RETENTION_BATCH))
    deleted["alerts"] = await _delete_in_batches(
        db, "DELETE FROM alert_outbox WHERE id IN (SELECT id FROM alert_outbox WHERE done_at < ?"
            " ORDER BY id LIMIT ?)", (now - keep["raw_days"] * DAY_MS, RETENTION_BATCH))
    deleted["batches"] = await _delete_in_batches(  # agents' batch ids, as long as raw checks
        db, "DELETE FROM agent_batches WHERE rowid IN (SELECT rowid FROM agent_batches"
            " WHERE received_at < ? LIMIT ?)", (now - keep["raw_days"] * DAY_MS, RETENTION_BATCH))
    deleted["teams"] = await _delete_in_batches(
        db, "DELETE FROM team_rollups WHERE (account_id, start) IN (SELECT account_id, start"
            " FROM team_rollups WHERE start < ? LIMIT ?)",
        (now - keep["hourly_days"] * DAY_MS, RETENTION_BATCH))
    ids = [r[0] for r in await db.fetchall("SELECT id FROM monitors ORDER BY id")]
    per_chunk = max(1, RETENTION_BATCH // 25)  # about a day of hourly rows per monitor
    for bucket, days in (("h", keep["hourly_days"]), ("d", keep["rollup_days"])):
        deleted[bucket] = 0
        for i in range(0, len(ids), per_chunk):
            chunk = ids[i:i + per_chunk]
            deleted[bucket] += await _delete_in_batches(
                db, f"DELETE FROM check_rollups WHERE (monitor_id, bucket, start, region_id) IN"
                    f" (SELECT monitor_id, bucket, start, region_id FROM check_rollups"
                    f" WHERE monitor_id IN ({','.join('?' * len(chunk))}) AND bucket = ?"
                    f" AND start < ? LIMIT ?)",
                (*chunk, bucket, now - days * DAY_MS, RETENTION_BATCH))
    return deleted


async def run_retention(rt: Runtime) -> None:
    """Roll up and prune once a minute, in small batches that leave the writer free."""
    async def retention() -> None:
        await roll_up(rt.db)
        await prune(rt.db, rt.cfg)
    await repeat(60, retention, first=True)


# Regression detection.  A monitor with regressionEnabled is compared with itself: the
# baseline is the average response time of its UP checks over regressionPeriod days (before
# the current window), the current value the average of its UP checks in the last
# current_window_minutes.  The verdict is kept in monitors.regression_active, apart from the
# probe-driven status, and shown as DEGRADED through transition_statements.

def _regression_reason(current: int, baseline: int, threshold: int, slow: bool) -> str:
    if slow:
        above = round((current / baseline - 1) * 100)
        return (f"response time {current} ms is {above}% above the {baseline} ms baseline"
                f" (threshold {threshold}%)")
    return f"response time {current} ms is back within {threshold}% of the {baseline} ms baseline"


async def _up_average(db: Database, monitor_id: str, lo: int, hi: int) -> sqlite3.Row:
    return await db.fetchrow(
        "SELECT AVG(response_time) AS avg, COUNT(*) AS n, MIN(checked_at) AS first,"
        " MAX(checked_at) AS last FROM checks WHERE monitor_id = ? AND checked_at >= ?"
        " AND checked_at < ? AND status = 'UP' AND response_time IS NOT NULL",
        (monitor_id, lo, hi))


async def _baseline(db: Database, cfg: dict[str, dict[str, Any]], monitor: sqlite3.Row,
                    window_lo: int, now: int) -> int | None:
    """The stored baseline, recomputed (and stored) when older than the refresh interval;
    None until there are enough UP checks spanning at least an hour."""
    rules = cfg["regression"]
    fresh = now - rules["baseline_refresh_minutes"] * 60_000
    if monitor["baseline_calculated_at"] and monitor["baseline_calculated_at"] > fresh:
        return monitor["baseline_response_time"]
    row = await _up_average(db, monitor["id"], now - monitor["regression_period"] * DAY_MS,
                            window_lo)
    if row["n"] < rules["min_baseline_checks"] or row["last"] - row["first"] < HOUR_MS:
        return None
    baseline = max(1, round(row["avg"]))
    await db.write([("UPDATE monitors SET baseline_response_time = ?, baseline_calculated_at = ?"
                     " WHERE id = ?", (baseline, now, monitor["id"]))])
    return baseline


async def detect_regressions(db: Database, cfg: dict[str, dict[str, Any]],
                             now: int | None = None) -> list[str]:
    """Mark UP monitors whose current response time exceeds the baseline by more than their
    threshold DEGRADED, and put them back to UP once it falls back.  Returns the monitors
    whose verdict changed, for the scheduler to pick up."""
    now = now_ms() if now is None else now
    changed = []
    rules = cfg["regression"]
    window_lo = now - rules["current_window_minutes"] * 60_000
    for monitor in await db.fetchall(
            "SELECT * FROM monitors WHERE regression_enabled = 1 AND is_paused = 0"
            " AND (status = 'UP' OR regression_active = 1)"):
        baseline = await _baseline(db, cfg, monitor, window_lo, now)
        current = await _up_average(db, monitor["id"], window_lo, now + 1)
        if baseline is None or current["n"] < rules["min_current_checks"]:
            continue
        average, threshold = round(current["avg"]), monitor["regression_threshold"]
        slow = average > baseline * (1 + threshold / 100)
        if slow != bool(monitor["regression_active"]):
            await _set_regression(db, monitor["id"], slow,
                                  _regression_reason(average, baseline, threshold, slow), now)
            changed.append(monitor["id"])
    return changed


async def _set_regression(db: Database, monitor_id: str, slow: bool, reason: str,
                          now: int) -> None:
    """Record the verdict and move the status, re-reading it under the write lock so a
    probe's newer verdict (DOWN, or DEGRADED for another cause) is never overwritten."""
    async with db.transaction() as conn:
        status = (await (await conn.execute("SELECT status FROM monitors WHERE id = ?",
                                            (monitor_id,))).fetchone() or [None])[0]
        await conn.execute("UPDATE monitors SET regression_active = ? WHERE id = ?",
                           (int(slow), monitor_id))
        latest = {r[0] for r in await (await conn.execute(
            "SELECT c.status FROM monitor_latest l JOIN checks c ON c.id = l.check_id"
            " WHERE l.monitor_id = ?", (monitor_id,))).fetchall()}
        old, new = (Status.UP, Status.DEGRADED) if slow else (Status.DEGRADED, Status.UP)
        if status == old and (slow or latest <= {Status.UP}):
            for sql, params in transition_statements(monitor_id, old, new, reason, now):
                await conn.execute(sql, params)


async def run_regression(rt: Runtime) -> None:
    """Evaluate regression detection once a minute."""
    async def regressions() -> None:
        for monitor_id in await detect_regressions(rt.db, rt.cfg):
            rt.monitor_changed(monitor_id)
    await repeat(60, regressions)


# Team performance over the last 24 hours reads the team's hourly rollups (24 rows) plus the raw
# checks since they end.  The figures are kept a minute in ``Runtime.performance``; after that
# the kept figures are still answered while one background computation refreshes them, and
# concurrent first requests share one computation.
_PERFORMANCE_TTL_MS = 60_000


_TEAM_SUMS = ("SELECT COALESCE(SUM(up), 0), COALESCE(SUM(down), 0), COALESCE(SUM(degraded), 0),"
              " COALESCE(SUM(rt_sum), 0), COALESCE(SUM(rt_count), 0) FROM team_rollups"
              " WHERE account_id = ? AND start >= ? AND start < ?")


_TEAM_HIST = ("SELECT CAST(j.key AS INTEGER), SUM(j.value) FROM team_rollups,"
              " json_each(team_rollups.rt_hist) AS j WHERE account_id = ? AND start >= ?"
              " AND start < ? GROUP BY 1")


async def _team_window(db: Database, team: str, lo: int, hi: int) -> WindowStats:
    """The team's figures over [lo, hi): team rollups as far as they go, then raw checks."""
    teams_done = await db.fetchval("SELECT done_until FROM rollup_progress WHERE bucket = 't'")
    split = min(max(lo, teams_done or lo), hi)
    stats = WindowStats()
    stats.add(tuple(await db.fetchrow(_TEAM_SUMS, (team, lo, split))))
    stats.hist = {index: count for index, count in await db.fetchall(_TEAM_HIST, (team, lo, split))}
    ids = [r[0] for r in await db.fetchall("SELECT id FROM monitors WHERE account_id = ?",
                                           (team,))]
    tail, _ = await window_stats(db, ids, split, hi, exact=False)
    stats.add((tail.up, tail.down, tail.degraded, tail.rt_sum, tail.rt_count))
    for index, count in tail.hist.items():
        stats.hist[index] = stats.hist.get(index, 0) + count
    return stats


async def _compute_performance(rt: Runtime, team: str) -> dict[str, Any]:
    now = now_ms()
    stats = await _team_window(rt.db, team, _ceil_hour(now - DAY_MS), now)
    figures = {"avgResponseTime": stats.average(), "p95ResponseTime": stats.percentile(95),
               "overallUptime": stats.uptime()}
    rt.performance[team] = (now, figures)
    return figures


async def _team_performance(rt: Runtime, team: str, now: int) -> dict[str, Any]:
    key = ("performance", team)
    cached = rt.performance.get(team)
    if cached is None:
        return await rt.flights.run(key, lambda: _compute_performance(rt, team))
    if now - cached[0] >= _PERFORMANCE_TTL_MS and not rt.flights.running(key):
        rt.background(rt.flights.run(key, lambda: _compute_performance(rt, team)))
    return cached[1]


# --- API routes ---
#
# Handlers are ``async def handler(call: Call) -> dict | Response``, registered with ``@api``,
# which authenticates, checks permission and role, applies the rate limit and counts usage.
# Handlers raise ApiError subclasses; ``on_api_error`` is the one place errors become JSON.

MAX_BODY = 1_048_576
ROUTES: list[Route] = []
MONITOR_STATUSES = tuple(Status)


@dataclass
class Call:
    """One API request as a handler sees it."""

    request: Request
    rt: Runtime
    who: Principal | None
    region: WorkerRegion | None = None  # the calling agent's region, on agent routes
    body: Any = None  # a body already parsed (the dashboard's forms), else read from request
    query: dict[str, Any] = dataclasses.field(default_factory=dict)  # the route's query table

    @property
    def team(self) -> str:
        assert self.who is not None
        return self.who.team_id

    def param(self, name: str) -> str:
        return self.request.path_params[name]

    async def json(self, limit: int = MAX_BODY) -> Any:
        """The JSON body; 413 past ``limit``, 400 for another content type or bad JSON."""
        if self.body is not None:
            return self.body
        body = await read_body(self.request, limit)
        if not body.strip():
            raise BadRequest("Request body required", "send a JSON object")
        ctype = self.request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise BadRequest("Content-Type must be application/json",
                             f"got {ctype or 'no content type'}")
        try:
            return parse_json(body)
        except ValueError as exc:
            raise BadRequest("Malformed JSON body", str(exc)) from None

    def env(self, **extra: Unpack[ValidationEnv]) -> ValidationEnv:
        """What validation checks need to know: config, the known worker regions, and whether
        read-only markers may be written (a request from ``statusapp apply``)."""
        return {"cfg": self.rt.cfg, "regions": self.rt.regions,
                "markers": self.request.headers.get(APPLY_HEADER) == "1", **extra}


async def paged_rows(call: Call, table: str, query: dict[str, Any], filters: Sequence[str],
                     order: str) -> tuple[int, list[sqlite3.Row]]:
    """The count of the team's rows of ``table`` matching the query's ``filters`` (named as
    the API names the columns) and the query's page of them, in ``order`` ({d}: asc/desc)."""
    where, params = ["account_id = ?"], [call.team]
    for name in filters:
        if query[name]:
            where.append(f"{Field(name, 'string').column} = ?")
            params.append(query[name])
    clause = " AND ".join(where)
    total = await call.rt.db.fetchval(f"SELECT COUNT(*) FROM {table} WHERE {clause}", params)
    rows = await call.rt.db.fetchall(
        f"SELECT * FROM {table} WHERE {clause} ORDER BY {order.format(d=query['order'].upper())}"
        " LIMIT ? OFFSET ?", [*params, query["limit"], (query["page"] - 1) * query["limit"]])
    return total, rows


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer: no error worth a log line
        raise _disconnected() from None
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge("Request body too large", f"the limit is {limit} bytes")


def _disconnected() -> BadRequest:
    return BadRequest("Client disconnected", "the body ended early")


@dataclass(frozen=True)
class RouteDoc:
    """What the OpenAPI document says of one route and method."""

    path: str
    method: str
    summary: str
    role: str | None
    body: tuple[Field, ...]
    query: tuple[Field, ...]
    operation_id: str
    response: dict[str, Any] | Callable[[], dict[str, Any]]  # a callable: shapes defined later
    status: tuple[int, ...]


API_DOCS: list[RouteDoc] = []
# (method, path) -> (handler, public, role, query table): the routes for callers other than HTTP
# (the dashboard)
API_HANDLERS: dict[tuple[str, str], tuple[Callable[[Call], Awaitable[Any]], bool, str | None,
                                          tuple[Field, ...]]] = {}


def least_role(method: str, role: str | None) -> str:
    """The role a route needs: its own, else VIEWER to read and MEMBER to change."""
    return role or (Role.VIEWER if _METHOD_PERMISSION[method] == "read" else Role.MEMBER)


def authorize(who: Principal, method: str, role: str | None) -> None:
    """The one permission check: the key's permission for the method, then the route's role."""
    needed = _METHOD_PERMISSION[method]
    if needed not in who.permissions:
        raise Forbidden(f"This API key lacks the '{needed}' permission",
                        f"key permissions: {','.join(sorted(who.permissions))}")
    who.require_role(least_role(method, role))


def rate_limit(request: Request, who: Principal | None, enforce: bool = True) -> None:
    """Count a request in its window and keep the X-RateLimit headers for the response (a 429
    carries them itself): the team's window, or without a valid key the client address's, at
    the server's default plan."""
    rt: Runtime = request.app.state.statusapp
    if who is not None:
        window, limit = who.team_id, PLANS[who.plan]
    else:
        window = "ip:" + (rt.clients.of(request) or "")
        limit = PLANS[rt.cfg["account"]["plan"]]
    request.state.headers = {}  # counted (a refusal carries its own headers)
    request.state.headers = rt.limiter.hit(window, limit, enforce)


def api(path: str, *methods: str, public: bool = False, role: str | None = None,
        body: Sequence[Field] = (), query: Sequence[Field] = (), limit: bool | None = True,
        response: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
        status: tuple[int, ...] = (200,), agent: bool = False
        ) -> Callable[[Callable[[Call], Awaitable[Any]]], Callable[[Call], Awaitable[Any]]]:
    """Register an ``/api/v1`` route.  Writes need MEMBER and reads VIEWER unless ``role``.
    ``body`` and ``query`` name the Field tables the handler validates, ``response`` the shape
    of what it answers with a ``status``, for the OpenAPI document.  ``limit``: True refuses
    requests past the rate limit, False counts them but answers, None leaves the window to the
    handler (heartbeats have their own).  An ``agent`` route takes an agent token instead of an
    API key (and only that), outside the plans' rate limits."""
    def register(handler: Callable[[Call], Awaitable[Any]]) -> Callable[[Call], Awaitable[Any]]:
        async def endpoint(request: Request) -> Response:
            rt: Runtime = request.app.state.statusapp
            who = region = None
            if agent:
                region = await authenticate_agent(rt, request_key(request))
            else:
                try:
                    if not public:
                        who = await authenticate(rt.db, request_key(request))
                finally:  # a request with a bad key counts in its address's window
                    if limit is not None:
                        rate_limit(request, who, limit)
            if who is not None:
                rt.usage.count(who, API_PREFIX + path)
                authorize(who, request.method, role)
            call = Call(request, rt, who, region)
            call.query = parse_query(query, request, call.env())
            try:
                result = await handler(call)
            except (ApiError, asyncio.CancelledError):
                raise
            except Exception as exc:
                if unavailable := rt.db.storage_error(exc):
                    raise unavailable from None
                log.exception("unhandled error in %s %s", request.method, request.url.path)
                raise ApiError("Internal server error", "the error has been logged") from exc
            if request.method != "GET" and not public:
                rt.public_cache.invalidate()
            response = result if isinstance(result, Response) else JSONResponse(result)
            response.headers.update(getattr(request.state, "headers", {}))
            return response
        ROUTES.append(Route(API_PREFIX + path, endpoint, methods=list(methods)))
        summary = (handler.__doc__ or handler.__name__.replace("_", " ")).strip().splitlines()[0]
        plain = re.sub(r":\w+}", "}", path)
        API_DOCS.extend(RouteDoc(
            plain, method, summary,
            None if public else "AGENT" if agent else least_role(method, role),
            tuple(body), tuple(query), handler.__name__ + (
                f"_{method.lower()}" if len(methods) > 1 else ""), response or shape(), status)
            for method in methods)
        API_HANDLERS.update({(method, plain): (handler, public, role, tuple(query))
                             for method in methods})
        return handler
    return register


# Starlette's routing errors as our ApiError classes (any other HTTPException: BadRequest's code).
_ROUTING_ERRORS = {404: (NotFound, "Not found"), 405: (MethodNotAllowed, "Method not allowed")}


async def _routing_rate_limit(request: Request) -> None:
    """An API request that reached no route (404, 405) is counted like any other: in its key's
    team window when the key is valid, else its address's; it is answered all the same."""
    who = None
    with contextlib.suppress(ApiError, sqlite3.Error):
        who = await authenticate(request.app.state.statusapp.db, request_key(request))
    rate_limit(request, who, enforce=False)


async def on_api_error(request: Request, exc: Exception) -> Response:
    """The one place an error becomes the spec's JSON shape (with rate-limit headers)."""
    if isinstance(exc, HTTPException):
        kind, text = _ROUTING_ERRORS.get(exc.status_code, (BadRequest, str(exc.detail)))
        exc = kind(text, f"{request.method} {request.url.path}", status=exc.status_code,
                   headers=dict(exc.headers or {}))
    elif not isinstance(exc, ApiError):
        exc = _unhandled(request, exc)
    if request.url.path.startswith(API_PREFIX) and not hasattr(request.state, "headers"):
        await _routing_rate_limit(request)
    headers = {**getattr(request.state, "headers", {}), **exc.headers}
    return JSONResponse(exc.body(), exc.status, headers=headers)


def _unhandled(request: Request, exc: Exception) -> ApiError:
    """An exception no handler turned into an ApiError: a storage failure's 503, else a 500."""
    rt: Runtime | None = getattr(request.app.state, "statusapp", None)
    unavailable = rt.db.storage_error(exc) if rt else None
    if unavailable:
        return unavailable
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError("Internal server error", "the error has been logged")


class Cors:
    """The spec's CORS headers on every response; OPTIONS answered as a preflight."""

    HEADERS = [(b"access-control-allow-origin", b"*"),
               (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS"),
               (b"access-control-allow-headers", b"Content-Type, Authorization, X-API-Key"),
               (b"access-control-max-age", b"86400")]

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 204,
                        "headers": [*self.HEADERS, (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)
        await self.app(scope, receive, send_with_cors)


# Monitors

MONITOR_SORTS = {"createdAt": "created_at", "updatedAt": "updated_at", "name": "name",
                 "status": "status", "type": "type", "interval": "interval", "url": "url"}
MONITOR_QUERY = page_fields(
    MONITOR_SORTS, "createdAt",
    status=Field("status", "string", choices=MONITOR_STATUSES, doc="Status"),
    type=Field("type", "string", choices=ALL_TYPES, doc="Type"),
    search=Field("search", "string", maximum=200, doc="Search names and URLs"),
    tag=Field("tag", "string", maximum=32, doc="Only monitors with this tag"),
    group=Field("group", "string", maximum=100, doc="Only monitors in this group"))

# Which monitors a tag or group filter selects (list filters, bulk pause/resume, status pages).
_TAG_MATCH = ("EXISTS (SELECT 1 FROM json_each(tags)"
              " WHERE json_extract(json_each.value, '$.name') = ?)")
_GROUP_MATCH = '"group" = ?'


def selection(query: dict[str, Any]) -> tuple[list[str], list[Any]]:
    """SQL conditions and parameters for the ``tag`` and ``group`` in ``query``."""
    where, params = [], []
    for name, condition in (("tag", _TAG_MATCH), ("group", _GROUP_MATCH)):
        if query.get(name):
            where.append(condition)
            params.append(query[name])
    return where, params


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, with its own wildcards escaped."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"


# A stored check as the API shows it: (field, column of ``checks``, how it is shown: a prefix
# for the id, "time" for Unix ms shown as ISO, "" as stored), its region's fields (by
# worker_regions column), and the JSON text columns shown only when set.  check_json and the
# SQL of _CHECK_OBJECT both follow these tables.
_CHECK_API = (("id", "id", "chk_"), ("status", "status", ""),
              ("responseTime", "response_time", ""), ("statusCode", "status_code", ""),
              ("checkedAt", "checked_at", "time"), ("receivedAt", "received_at", "time"),
              ("error", "error", ""), ("rootCauseCategory", "category", ""))
_CHECK_REGION_API = (("country", "country"), ("countryCode", "country_code"), ("city", "city"))
_CHECK_JSON_TEXT = ("timings", "details")


def _check_value(value: Any, how: str) -> Any:
    """A check's column value as _CHECK_API shows it."""
    if how == "time":
        return iso(value)
    return f"{how}{value}" if how else value


def check_json(row: sqlite3.Row, regions: dict[str, WorkerRegion]) -> dict[str, Any]:
    """A stored check as the API shows it, with its worker region."""
    region: Mapping[str, object] = regions.get(row["region_id"]) or {}
    out = {name: _check_value(row[column], how) for name, column, how in _CHECK_API}
    out["workerRegion"] = {"id": row["region_id"], **{
        name: region.get(column) for name, column in _CHECK_REGION_API}}
    for column in _CHECK_JSON_TEXT:
        if row[column]:
            out[column] = json.loads(row[column])
    return out


CHECK_SHAPE = shape(
    id="string", status="string", responseTime="integer?", statusCode="integer?",
    checkedAt="date-time", receivedAt="date-time?", error="string?", rootCauseCategory="string?",
    workerRegion=shape(id="string", country="string?", countryCode="string?", city="string?"))


async def latest_checks(db: Database, ids: Sequence[str]) -> list[sqlite3.Row]:
    """Each monitor's latest check per region (the monitor_latest trigger keeps them), by region."""
    if not ids:
        return []
    return await db.fetchall(
        f"SELECT c.* FROM monitor_latest l JOIN checks c ON c.id = l.check_id"
        f" WHERE l.monitor_id IN ({','.join('?' * len(ids))}) ORDER BY l.region_id, c.id", ids)


def _iso_sql(column: str) -> str:
    """SQL for ``iso`` of a column of Unix milliseconds."""
    return f"strftime('%Y-%m-%dT%H:%M:%SZ', {column} / 1000, 'unixepoch')"


def _with_json_key(obj: str, key: str, column: str) -> str:
    """SQL adding ``key`` to the JSON object ``obj`` when the JSON text ``column`` is set."""
    return (f"CASE WHEN {column} <> '' THEN json_insert({obj}, '$.{key}', json({column}))"
            f" ELSE {obj} END")


def _check_value_sql(column: str, how: str) -> str:
    """SQL for a column of the checks row ``c`` as _CHECK_API shows it."""
    if how == "time":
        return _iso_sql(f"c.{column}")
    return f"'{how}' || c.{column}" if how else f"c.{column}"


# A check as check_json shows it, built by SQLite (``c`` a checks row, ``w`` its region).
_CHECK_OBJECT = functools.reduce(
    lambda obj, column: _with_json_key(obj, column, f"c.{column}"), _CHECK_JSON_TEXT,
    "json_object(" + ", ".join(f"'{name}', {_check_value_sql(column, how)}"
                               for name, column, how in _CHECK_API)
    + ", 'workerRegion', json_object('id', c.region_id, "
    + ", ".join(f"'{name}', w.{column}" for name, column in _CHECK_REGION_API) + "))")

# Link rows as notification_link_json reads them, built by SQLite (``n`` a monitor's link).
_LINK_OBJECT = (
    "json_object('id', n.id, 'channel_id', n.channel_id, 'type', n.type, 'enabled', n.enabled,"
    " 'config', n.config, 'created_at', n.created_at, 'channel_name', c.name, 'channel_type',"
    " c.type, 'target_failing', COALESCE(c.failing, n.failing), 'target_error',"
    " COALESCE(c.last_error, n.last_error))")

# The JSON objects ``j`` of a subquery as one JSON array, in the subquery's order: joined as
# text (json_group_array would parse each object again).
_JSON_ARRAY = "'[' || COALESCE(group_concat(j), '') || ']'"

# A monitors row ``m`` with its latest check per region (a JSON array, by region), its number
# of incidents and its notification links (JSON, as _LINK_OBJECT): read by one statement, so
# the status and the check that set it come from one snapshot.
_MONITOR_SELECT = (
    f"m.id, m.account_id, m.check_count, {_MONITOR_OBJECT} AS fields,"
    f" (SELECT {_JSON_ARRAY} FROM (SELECT {_CHECK_OBJECT} AS j"
    " FROM monitor_latest l JOIN checks c ON c.id = l.check_id"
    " LEFT JOIN worker_regions w ON w.id = c.region_id WHERE l.monitor_id = m.id"
    " ORDER BY l.region_id, c.id)) AS latest_checks,"
    " (SELECT COUNT(*) FROM incidents i WHERE i.monitor_id = m.id) AS incident_count,"
    f" (SELECT {_JSON_ARRAY} FROM (SELECT {_LINK_OBJECT} AS j"
    " FROM monitor_notifications n LEFT JOIN notification_channels c ON c.id = n.channel_id"
    " WHERE n.monitor_id = m.id ORDER BY n.created_at, n.id)) AS links")


async def read_monitor(db: Database, team: str, monitor_id: str) -> sqlite3.Row | None:
    """The team's monitor as _MONITOR_SELECT reads it, if it exists."""
    return await db.fetchone(f"SELECT {_MONITOR_SELECT} FROM monitors m"
                             f" WHERE m.id = ? AND m.account_id = ?", (monitor_id, team))


def _links_json(links: str) -> str:
    """A monitor's links (JSON from _MONITOR_SELECT) as the API shows them, secrets masked."""
    return links if links == "[]" else json_text(
        [notification_link_json(link) for link in json.loads(links)])


def monitors_body(rt: Runtime, rows: Sequence[sqlite3.Row]) -> str:
    """Monitors (of one team, as _MONITOR_SELECT reads them) as the API returns them, as a
    JSON array: each one's own fields (encoded once per version of its row, see
    _monitor_fields_json), then what SQLite built: latest check per region, counts and links."""
    if not rows:
        return "[]"
    base, team = rt.cfg["server"]["base_url"], rows[0]["account_id"]
    windows = rt.maintenance.running(team)
    out = []
    for row in rows:
        fields = _monitor_fields_json(row["fields"], base,
                                      any(w.covers(team, row["id"]) for w in windows))
        out.append(f'{fields},"checks":{row["latest_checks"]},"_count":{{"checks":'
                   f'{row["check_count"]},"incidents":{row["incident_count"]}}},'
                   f'"monitorNotifications":{_links_json(row["links"])}}}')
    return f"[{','.join(out)}]"


_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def json_text(value: Any) -> str:
    """JSON as responses carry it (as Starlette's JSONResponse encodes it), by one encoder
    (``json.dumps`` with options makes a new one each call)."""
    return _JSON_ENCODER.encode(value)


@functools.lru_cache(maxsize=2048)
def _monitor_fields_json(fields: str, base: str, maintenance: bool) -> str:
    """A monitor's own fields as the API shows them (secrets masked), as a JSON object left
    open for the rest, from its _MONITOR_OBJECT; cached, as list pages repeat the same rows
    (and any change to a row changes its _MONITOR_OBJECT)."""
    record = json.loads(fields)
    if maintenance:
        record["status"] = MAINTENANCE
    heartbeat = record.pop("heartbeatId")
    record["apiAuthConfig"] = masked_auth(record["apiAuthConfig"])
    created, updated = record.pop("createdAt"), record.pop("updatedAt")
    record.update({
        "heartbeatUrl": f"{base}{API_PREFIX}/heartbeat/{heartbeat}" if heartbeat else None,
        "createdAt": iso(created), "updatedAt": iso(updated)})
    return json_text(record)[:-1]


def notification_link_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """One of a monitor's notification targets: an inline channel or a linked one."""
    config = json.loads(row["config"]) if row["config"] else None
    return {"id": row["id"], "channelId": row["channel_id"],
            "name": row["channel_name"], "type": row["type"] or row["channel_type"],
            "enabled": bool(row["enabled"]), "config": masked_channel_config(row["type"], config),
            "failing": bool(row["target_failing"]), "lastError": row["target_error"],
            "createdAt": iso(row["created_at"])}


LINK_SHAPE = shape(id="string", channelId="string?", name="string?", type="string?",
                   enabled="boolean", config="object?", failing="boolean", lastError="string?",
                   createdAt="date-time")


MONITOR_SHAPE = shape(
    fields_shape(MONITOR_COLUMNS), id="string", status="string", isPaused="boolean",
    heartbeatUrl="string?", createdAt="date-time", updatedAt="date-time", checks=[CHECK_SHAPE],
    _count=shape(checks="integer", incidents="integer"), monitorNotifications=[LINK_SHAPE])


def masked_channel_config(kind: str | None, config: dict[str, Any] | None) -> Any:
    """A channel config as responses show it: its secret keys masked (each header's value)."""
    if not config:
        return config
    secret = channel_secrets(kind)
    return {k: _masked_value(v) if k in secret else v for k, v in config.items()}


def _masked_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _masked_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked_value(v) for v in value]
    return mask(value) if isinstance(value, str) else value


# The team-owned tables a path id can name: table -> (path parameter, what errors call it).
OWNED = {"monitors": ("monitorId", "Monitor"), "incidents": ("incidentId", "Incident"),
         "notification_channels": ("channelId", "Notification channel"),
         "webhooks": ("webhookId", "Webhook"), "status_pages": ("statusPageId", "Status page"),
         "maintenance_windows": ("windowId", "Maintenance window")}


# Private targets.  With ``allow_private_targets = false`` ([probes] for monitors,
# [notifications] for channels and webhooks) a target that is, or resolves to, a private,
# loopback or link-local address is refused when it is saved, and again at every connection
# (resolve_target), so a DNS answer that changes in between cannot get past.

_PRIVATE_CHECK_SECONDS = 5.0  # a name slower to resolve when saved is checked at connect only


def url_targets(fields: Sequence[Field], values: Any,
                path: list[Any]) -> list[tuple[list[Any], str]]:
    """The URLs among ``values`` (the ``fields`` validated as URLs), with their field paths."""
    if not isinstance(values, dict):
        return []
    return [([*path, f.name], values[f.name]) for f in fields
            if f.check is valid_url and isinstance(values.get(f.name), str)]


def channel_targets(kind: Any, config: Any, path: list[Any]) -> list[tuple[list[Any], str]]:
    """The URLs a channel of type ``kind`` sends to (chat webhooks, WEBHOOK's url)."""
    spec = CHANNEL_TYPES.get(kind) if isinstance(kind, str) else None
    return url_targets(spec.fields, config, path) if spec else []


def monitor_targets(clean: dict[str, Any], existing: dict[str, Any] | None
                    ) -> dict[str, list[tuple[list[Any], str]]]:
    """A monitor's targets that this change sets, by the config section that rules them."""
    record = {**(existing or {}), **clean}
    name = record.get("type")
    kind = MONITOR_TYPES.get(name) if isinstance(name, str) else None
    probes = url_targets(AUTH_FIELDS, clean.get("apiAuthConfig"), ["apiAuthConfig"])
    if ("url" in clean or "type" in clean) and kind is not None and kind.connects:
        probes.append((["url"], record.get("url") or ""))
    inline = [target for i, entry in enumerate(clean.get("notifications") or [])
              for target in channel_targets(entry.get("type"), entry.get("config"),
                                            ["notifications", i, "config"])]
    return {"probes": probes, "notifications": inline}


async def _private_issue(path: list[Any], target: str, section: str) -> dict[str, Any] | None:
    host = _target_host(target)
    if not host:
        return None
    try:
        async with asyncio.timeout(_PRIVATE_CHECK_SECONDS):
            await resolve_target(host, 0, False)
    except PrivateTargetError as exc:
        return {"code": "custom", "path": path, "message": f"{exc} in [{section}]"}
    except (OSError, TimeoutError):
        pass  # unresolvable now: the connection is checked when it is made
    return None


async def refuse_private_targets(cfg: dict[str, dict[str, Any]],
                                 targets: dict[str, list[tuple[list[Any], str]]]) -> None:
    """400 naming each target that is private where its section does not allow that."""
    issues = [issue for section, found in targets.items()
              if not cfg[section]["allow_private_targets"] for path, target in found
              if (issue := await _private_issue(path, target, section))]
    if issues:
        raise ValidationFailed(issues)


async def load_owned(call: Call, table: str, ident: str | None = None) -> sqlite3.Row:
    """The team's row of ``table`` named by the path (or ``ident``), or 404: another team's
    resource does not exist for the caller."""
    ident = ident or call.param(OWNED[table][0])
    row = await call.rt.db.fetchone(f"SELECT * FROM {table} WHERE id = ? AND account_id = ?",
                                    (ident, call.team))
    if row is None:
        raise not_found(table, ident)
    return row


def not_found(table: str, ident: str) -> NotFound:
    """The 404 for a missing (or another team's) row of one of the OWNED tables."""
    noun = OWNED[table][1]
    return NotFound(f"{noun} not found", f"no {noun.lower()} with id {ident}")


async def _channel_ids(call: Call, body: Any) -> set[str]:
    """The team's channel ids, for validating the channels ``body`` links (read only if any)."""
    links = body.get("notifications") if isinstance(body, dict) else None
    if not isinstance(links, list) or not any(isinstance(n, dict) and n.get("channelId")
                                               for n in links):
        return set()
    return {r[0] for r in await call.rt.db.fetchall(
        "SELECT id FROM notification_channels WHERE account_id = ?", (call.team,))}


def column_values(fields: Sequence[Field], clean: dict[str, Any]) -> dict[str, Any]:
    """The clean values ``fields`` name, as columns: booleans 0/1, objects and arrays JSON."""
    def stored(spec: Field, value: Any) -> Any:
        if value is not None and spec.kind in _JSON_KINDS:
            return json.dumps(value)
        return int(value) if isinstance(value, bool) else value
    return {f.column: stored(f, clean[f.name]) for f in fields if f.name in clean}


def _quoted(column: str) -> str:
    """A column name as an SQL identifier (``group`` is a keyword)."""
    return f'"{column}"'


def insert_statement(table: str, values: dict[str, Any]) -> Statement:
    """An INSERT of ``values`` (column names from the Field tables, never from a client)."""
    return (f"INSERT INTO {table} ({', '.join(map(_quoted, values))})"
            f" VALUES ({', '.join('?' * len(values))})", list(values.values()))


def update_statement(table: str, row_id: str, values: dict[str, Any]) -> Statement:
    """An UPDATE of ``values`` on one row, stamping ``updated_at``."""
    values = {**values, "updated_at": now_ms()}
    return (f"UPDATE {table} SET {', '.join(f'{_quoted(c)} = ?' for c in values)} WHERE id = ?",
            [*values.values(), row_id])


async def create_owned(call: Call, table: str, prefix: str,
                       values: dict[str, Any]) -> sqlite3.Row:
    """Insert a new row of the team's ``table`` and read it back."""
    row_id, stamp = new_id(prefix), now_ms()
    await call.rt.db.write([insert_statement(table, {
        "id": row_id, "account_id": call.team, "created_at": stamp, "updated_at": stamp,
        **values})])
    return await load_owned(call, table, row_id)


def notification_statements(monitor_id: str, entries: list[dict[str, Any]]) -> list[Statement]:
    """Replace a monitor's notification targets with ``entries``."""
    stamp = now_ms()
    return [("DELETE FROM monitor_notifications WHERE monitor_id = ?", (monitor_id,)),
            *(("INSERT INTO monitor_notifications (id, monitor_id, channel_id, type, enabled,"
               " config, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
               (new_id("mn"), monitor_id, e.get("channelId"),
                None if e.get("channelId") else e["type"], int(e["enabled"]),
                None if e.get("channelId") else json.dumps(e["config"]), stamp + i))
              for i, e in enumerate(entries))]


async def _monitor_response(call: Call, monitor_id: str | None = None,
                            status: int = 200) -> Response:
    """The team's monitor named by the path (or ``monitor_id``) as the API shows it, or 404:
    monitors_body's text, not decoded and encoded again."""
    ident = monitor_id or call.param("monitorId")
    row = await read_monitor(call.rt.db, call.team, ident)
    if row is None:
        raise not_found("monitors", ident)
    return Response(monitors_body(call.rt, [row])[1:-1], status, media_type="application/json")


MONITOR_LIST_SHAPE = shape(monitors=[MONITOR_SHAPE], pagination=PAGINATION)

# Monitor list pages are kept in memory while nothing changed: keyed by the team, the query,
# the writer's commits and the public cache's generation (API writes, status changes,
# maintenance windows starting or ending), for at most LIST_CACHE_SECONDS (changes made by
# another process, such as `statusapp region remove`, show after that).
LIST_CACHE_ENTRIES = 32
LIST_CACHE_SECONDS = 5.0


@api("/monitors", "GET", query=MONITOR_QUERY, response=MONITOR_LIST_SHAPE)
async def list_monitors(call: Call) -> Response:
    rt = call.rt
    key = json_text([call.team, rt.db.commits, rt.public_cache.generation, call.query])
    entry = await rt.list_pages.get(key, lambda: _monitor_page(call))
    return Response(entry.body, entry.status, media_type="application/json")


async def _monitor_page(call: Call) -> Response:
    """A page of the team's monitors, read by one statement: the page's ids first (sorting only
    them), then their rows, and the total."""
    query = call.query
    where, params = ["account_id = ?"], [call.team]
    if query["status"]:
        where.append("status = ?")
        params.append(query["status"])
    if query["type"]:
        where.append("type = ?")
        params.append(query["type"])
    if query["search"]:
        where.append("(name LIKE ? ESCAPE '\\' OR url LIKE ? ESCAPE '\\')")
        params += [_like(query["search"])] * 2
    chosen, values = selection(query)
    where, params = where + chosen, params + values
    clause = " AND ".join(where)
    column, way = MONITOR_SORTS[query["sort"]], query["order"].upper()
    rows = await call.rt.db.fetchall(
        f"WITH page AS MATERIALIZED (SELECT id FROM monitors WHERE {clause}"
        f" ORDER BY {column} {way}, id {way} LIMIT ? OFFSET ?)"
        f" SELECT {_MONITOR_SELECT}, (SELECT COUNT(*) FROM monitors WHERE {clause}) AS total"
        f" FROM page JOIN monitors m ON m.id = page.id ORDER BY m.{column} {way}, m.id {way}",
        [*params, query["limit"], (query["page"] - 1) * query["limit"], *params])
    total = rows[0]["total"] if rows else await call.rt.db.fetchval(
        f"SELECT COUNT(*) FROM monitors WHERE {clause}", params)
    return Response(f'{{"monitors":{monitors_body(call.rt, rows)},"pagination":'
                    f'{json_text(paginate(total, query))}}}', media_type="application/json")


@api("/monitors/{monitorId}", "GET", response=MONITOR_SHAPE)
async def get_monitor(call: Call) -> Response:
    return await _monitor_response(call)


@api("/monitors", "POST", body=MONITOR_FIELDS, response=MONITOR_SHAPE, status=(201,))
async def create_monitor(call: Call) -> Response:
    body = await call.json()
    clean = validate(MONITOR_FIELDS, body, call.env(channels=await _channel_ids(call, body)))
    await refuse_private_targets(call.rt.cfg, monitor_targets(clean, None))
    monitor_id, stamp = new_id("mon"), now_ms()
    heartbeat = secrets.token_urlsafe(18) if clean["type"] == "CRON" else None
    if clean["type"] == "CRON" and not clean["url"]:
        clean["url"] = f"{call.rt.cfg['server']['base_url']}{API_PREFIX}/heartbeat/{heartbeat}"
    await call.rt.db.write([  # group commit: concurrent creates share one transaction
        insert_statement("monitors", {
            "id": monitor_id, "account_id": call.team, "heartbeat_id": heartbeat,
            "created_at": stamp, "updated_at": stamp, **column_values(MONITOR_COLUMNS, clean)}),
        *notification_statements(monitor_id, clean["notifications"] or [])])
    call.rt.monitor_changed(monitor_id, clean["type"])
    return await _monitor_response(call, monitor_id, 201)


async def update_monitor_fields(call: Call, fields: Sequence[Field]) -> sqlite3.Row:
    """Validate a partial update of ``fields`` against the stored monitor and apply it."""
    row = await load_owned(call, "monitors")
    existing = monitor_record(row)
    body = await call.json()
    inline = [{"type": r["type"], "config": json.loads(r["config"])}
              for r in await call.rt.db.fetchall(
                  "SELECT type, config FROM monitor_notifications WHERE monitor_id = ?"
                  " AND channel_id IS NULL ORDER BY created_at, id", (row["id"],))]
    env = call.env(channels=await _channel_ids(call, body), existing=existing, inline=inline)
    clean = validate(fields, body, env, existing=existing)
    await refuse_private_targets(call.rt.cfg, monitor_targets(clean, existing))
    columns = column_values([f for f in fields if f.name not in _NOT_COLUMNS], clean)
    kind = clean.get("type", existing["type"])
    if kind == "CRON" and not row["heartbeat_id"]:
        columns["heartbeat_id"] = secrets.token_urlsafe(18)
    elif kind != "CRON" and row["heartbeat_id"]:
        columns["heartbeat_id"] = None
    await call.rt.db.write([update_statement("monitors", row["id"], columns), *(
        notification_statements(row["id"], clean["notifications"] or [])
        if "notifications" in clean else ())])
    call.rt.monitor_changed(row["id"], kind)
    return row


@api("/monitors/{monitorId}", "PUT", body=MONITOR_FIELDS, response=MONITOR_SHAPE)
async def update_monitor(call: Call) -> Response:
    row = await update_monitor_fields(call, MONITOR_FIELDS)
    return await _monitor_response(call, row["id"])


@api("/monitors/{monitorId}", "DELETE", response=DELETED)
async def delete_monitor(call: Call) -> dict[str, Any]:
    row = await load_owned(call, "monitors")
    async with call.rt.db.transaction() as conn:
        await conn.execute("DELETE FROM monitors WHERE id = ?", (row["id"],))
    call.rt.monitor_changed(row["id"])
    return {"success": True, "message": "Monitor deleted successfully"}


@api("/monitors/{monitorId}/pause", "POST", response=shape(id="string", isPaused="boolean"))
async def pause_monitor(call: Call) -> dict[str, Any]:
    row = await load_owned(call, "monitors")
    async with call.rt.db.transaction() as conn:
        await conn.execute("UPDATE monitors SET is_paused = 1 - is_paused, updated_at = ?"
                           " WHERE id = ?", (now_ms(), row["id"]))
    call.rt.monitor_changed(row["id"])
    return {"id": row["id"], "isPaused": not row["is_paused"]}


MONITOR_FILTER_FIELDS = (
    Field("tag", "string", minimum=1, maximum=32, doc="Every monitor with this tag"),
    Field("group", "string", minimum=1, maximum=100, doc="Every monitor in this group"),
    Field("monitorIds", "array", maximum=1000, items="string", doc="These monitors"),
)


async def _pause_many(call: Call, paused: bool) -> dict[str, Any]:
    """Pause or resume the team's monitors the body's filter selects (all filters given must
    match); an empty filter is refused rather than taken as "everything"."""
    query = validate(MONITOR_FILTER_FIELDS, await call.json(), call.env())
    where, params = selection(query)
    if query.get("monitorIds") is not None:
        ids = [str(i) for i in query["monitorIds"]]
        where.append(f"id IN ({','.join('?' * len(ids))})")
        params += ids
    if not where:
        raise ValidationFailed([{"code": "custom", "path": [],
                                 "message": "Give tag, group or monitorIds"}])
    rows = await call.rt.db.fetchall(f"SELECT id FROM monitors WHERE account_id = ? AND"
                                     f" {' AND '.join(where)} ORDER BY id", [call.team, *params])
    ids = [row["id"] for row in rows]
    await call.rt.db.write([(f"UPDATE monitors SET is_paused = ?, updated_at = ? WHERE id IN"
                             f" ({','.join('?' * len(ids))})", (int(paused), now_ms(), *ids))])
    for monitor_id in ids:
        call.rt.monitor_changed(monitor_id)
    return {"monitorIds": ids, "isPaused": paused}


PAUSED_SHAPE = shape(monitorIds=["string"], isPaused="boolean")


@api("/monitors/pause", "POST", body=MONITOR_FILTER_FIELDS, response=PAUSED_SHAPE)
async def pause_monitors(call: Call) -> dict[str, Any]:
    """Pause every monitor a tag, group or id list selects"""
    return await _pause_many(call, True)


@api("/monitors/resume", "POST", body=MONITOR_FILTER_FIELDS, response=PAUSED_SHAPE)
async def resume_monitors(call: Call) -> dict[str, Any]:
    """Resume every monitor a tag, group or id list selects"""
    return await _pause_many(call, False)


def regression_json(row: sqlite3.Row) -> dict[str, Any]:
    return {"regressionEnabled": bool(row["regression_enabled"]),
            "regressionThreshold": row["regression_threshold"],
            "regressionPeriod": row["regression_period"],
            "baselineResponseTime": row["baseline_response_time"],
            "baselineCalculatedAt": iso(row["baseline_calculated_at"])}


REGRESSION_SHAPE = shape(regressionEnabled="boolean", regressionThreshold="integer",
                         regressionPeriod="integer", baselineResponseTime="number?",
                         baselineCalculatedAt="date-time?")


@api("/monitors/{monitorId}/regression", "GET", response=REGRESSION_SHAPE)
async def get_regression(call: Call) -> dict[str, Any]:
    return regression_json(await load_owned(call, "monitors"))


@api("/monitors/{monitorId}/regression", "PUT", body=REGRESSION_FIELDS, response=REGRESSION_SHAPE)
async def update_regression(call: Call) -> dict[str, Any]:
    row = await update_monitor_fields(call, REGRESSION_FIELDS)
    return regression_json(await load_owned(call, "monitors", row["id"]))


# Heartbeats (CRON pings)
#
# The heartbeat id in the URL is the secret, so these routes are public.  A ping is answered
# only once its write is committed; concurrent pings share one group commit.

HEARTBEAT_MAX_BODY = 10_240
_AGENT_MAX = 200
_AT = object()  # in a ping's clock updates: "the ping's time"
_OK = b'{"message":"OK"}'
_OK_NOT_LOGGED = b'{"message":"OK","logged":false}'
PING_SHAPE = shape(message="string")


@dataclass(frozen=True)
class PingKind:
    """What one kind of ping means: the status it reports, its text key, its clock updates."""

    status: str | None  # a check with this status, or None (not a check, no status change)
    keys: tuple[str, ...]  # JSON keys that hold its text, best first
    clocks: dict[str, Any]  # monitors columns it sets: _AT or None
    category: str | None = None

    @functools.cached_property
    def clock_sql(self) -> tuple[str, str]:
        """The update of its clocks, and the same counting a check stored past the view."""
        sets = ", ".join(f"{column} = ?" for column in self.clocks)
        return (f"UPDATE monitors SET {sets} WHERE id = ?",
                f"UPDATE monitors SET {sets}, check_count = check_count + 1 WHERE id = ?")


PING_KINDS = {
    "success": PingKind(Status.UP, ("message", "error"),
                        {"last_success_at": _AT, "job_started_at": None}),
    "start": PingKind(None, ("message", "error"), {"job_started_at": _AT}),
    "fail": PingKind(Status.DOWN, ("error", "message"), {"job_started_at": None},
                     "APPLICATION_ERROR"),
    "log": PingKind(None, ("message", "error"), {}),
}
_FAIL_TEXT = "job reported failure"


def ping_message(body: bytes, keys: tuple[str, ...]) -> str | None:
    """A ping's text: the first of ``keys`` in a JSON object, else the whole body as text.

    Cron scripts send what they send (curl -d posts form-encoded JSON), so the content type
    is ignored and malformed JSON is kept as text rather than refused.
    """
    text = body.decode("utf-8", "replace").strip()
    if not text.startswith("{"):  # not a JSON object: kept as it is (None if empty)
        return text or None
    try:
        data = parse_json(text)
    except ValueError:
        return text
    if not isinstance(data, dict):
        return text
    for key in keys:
        if key in data:
            value = data[key]
            return value if isinstance(value, str) or value is None else json.dumps(value)
    return text


@dataclass(frozen=True)
class Ping:
    """One received ping: its kind, text, exit code, sender, time, whether it is logged, and
    whether it came inside a maintenance window (its check is then left out of uptime)."""

    kind: str
    message: str | None
    exit_code: int | None
    source_ip: str | None
    agent: str | None
    at: int
    logged: bool
    maintenance: bool = False


def ping_statements(beat: _Beat, ping: Ping, region: str) -> list[Statement]:
    """The writes of one ping: its log row (unless throttled), the monitor's clocks, and unless
    the monitor is paused, a check (when logged, or when the status changes) and a transition."""
    spec, at = PING_KINDS[ping.kind], ping.at
    duration = (at - beat.job_started_at
                if spec.status and beat.job_started_at is not None else None)
    statements: list[Statement] = [(
        _PING_LOG, (beat.monitor_id, ping.kind, ping.message, duration, ping.source_ip,
                    ping.agent, at, ping.exit_code))] if ping.logged else []
    status, changes = spec.status, beat.status != spec.status
    check = status is not None and not beat.quiet and (ping.logged or changes)
    direct = check and beat.keys is not None  # the check row straight into check_rows
    if spec.clocks:
        statements.append((spec.clock_sql[direct], (
            *(at if v is _AT else v for v in spec.clocks.values()), beat.monitor_id)))
    if status is not None and check:
        error = _fail_text(ping) if status == Status.DOWN else None
        if direct:
            statements += _ping_check(beat, ping, region, error,
                                      _ping_details(ping.kind, duration, ping.exit_code))
        else:  # through the checks view, whose trigger makes the monitor's key
            details = {"heartbeat": ping.kind, "duration": duration, "exitCode": ping.exit_code}
            statements += check_statements(
                beat.monitor_id, region, CheckResult(status, error=error,
                                                     category=spec.category, details=details),
                at, ping.maintenance)
        if changes:
            statements += transition_statements(beat.monitor_id, beat.status, status, error, at)
    return statements


_PING_LOG = ("INSERT INTO heartbeats (monitor_id, kind, message, duration, source_ip, user_agent,"
             " received_at, exit_code) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_PING_CHECK = ("INSERT INTO check_rows (monitor, region, status, error, category, details,"
               " checked_at, maintenance) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
# The check just stored is its monitor's latest in the region (as the checks view's trigger
# keeps it): found by the monitor and time it was stored with, so that pings of several
# monitors share one executemany per statement.
_PING_LATEST = ("INSERT INTO monitor_latest (monitor_id, region_id, check_id)"
                " SELECT ?, ?, max(id) FROM check_rows WHERE monitor = ? AND checked_at = ?"
                " ON CONFLICT (monitor_id, region_id) DO UPDATE SET check_id = excluded.check_id"
                " WHERE excluded.check_id > monitor_latest.check_id")


@functools.lru_cache(maxsize=256)
def _ping_details(kind: str, duration: int | None, exit_code: int | None) -> str:
    """A ping check's details as stored (most pings share a few: no duration, no exit code)."""
    return json.dumps({"heartbeat": kind, "duration": duration, "exitCode": exit_code})


def _ping_check(beat: _Beat, ping: Ping, region: str, error: str | None,
                details: str) -> list[Statement]:
    """A ping's check written past the checks view, with the monitor's and region's integer
    keys (the monitor's check count is kept by its clock update, ``PingKind.clock_sql``)."""
    spec = PING_KINDS[ping.kind]
    assert beat.keys is not None
    monitor_key, region_key = beat.keys
    return [(_PING_CHECK, (monitor_key, region_key, spec.status, error, spec.category, details,
                           ping.at, int(ping.maintenance))),
            (_PING_LATEST, (beat.monitor_id, region, monitor_key, ping.at))]


def _fail_text(ping: Ping) -> str:
    """What a failure records: the job's own text, else its exit code, else a plain phrase."""
    if ping.message:
        return ping.message
    return f"job exited with code {ping.exit_code}" if ping.exit_code else _FAIL_TEXT


def _apply_ping(beat: _Beat, kind: str, at: int) -> None:
    """After the commit: the beat takes the state the ping wrote."""
    spec = PING_KINDS[kind]
    for column, value in spec.clocks.items():
        setattr(beat, column, at if value is _AT else value)
    if spec.status and not beat.quiet:
        beat.status = spec.status


async def _ping(call: Call, kind: str, exit_code: int | None = None) -> Response:
    """The heartbeat routes: record one ping once it is committed; 404 unknown id (pings of
    the monitors already in memory are answered by ``answer_ping`` before routing)."""
    token = call.param("heartbeatId")
    beat = await call.rt.heartbeats.find(token)
    body = await record_ping(call.rt, call.request.scope,
                             await read_body(call.request, HEARTBEAT_MAX_BODY), beat,
                             (token, kind, exit_code))
    if call.request.method == "HEAD":
        return Response(status_code=200, headers={"content-type": "application/json"})
    return Response(body, media_type="application/json")


async def record_ping(rt: Runtime, scope: MutableMapping[str, Any], body: bytes, beat: _Beat,
                      target: tuple[str, str, int | None]) -> bytes:
    """Record one ping (``target``: the heartbeat id, kind and exit code; ``body``: what it
    sent) once it is committed and return the answer's body; 404 if the beat is no longer
    this heartbeat id's.  Past the rate limit a success, start or fail still updates the
    monitor (status, clocks, deadline) but is not logged (answered ``"logged": false``); a
    throttled log message is refused with 429.  The X-RateLimit headers are left in the
    request's state (``request.state.headers``)."""
    hb, (token, kind, exit_code) = rt.heartbeats, target
    message = ping_message(body, PING_KINDS[kind].keys)
    logged, headers = hb.admit(beat)
    scope.setdefault("state", {})["headers"] = headers
    if not logged and kind == "log":
        raise RateLimited("Rate limit exceeded", f"at most {headers['X-RateLimit-Limit']} pings"
                          " per minute per monitor are logged", headers=headers)
    agent, forwarded = _ping_headers(scope["headers"])
    async with beat.lock:
        if not await hb.fresh(beat) or beat.token != token:
            raise NotFound("Heartbeat not found", "no CRON monitor has this heartbeat id")
        at = now_ms()
        ping = Ping(kind, message, exit_code, rt.clients.resolve(scope.get("client"), forwarded),
                    agent, at, logged, rt.maintenance.active(beat.account_id, beat.monitor_id, at))
        await rt.db.write(ping_statements(beat, ping, rt.cfg["region"]["id"]), small=True)
        _apply_ping(beat, kind, ping.at)
        if beat.keys is None and PING_KINDS[kind].status and not beat.quiet:
            hb.want_keys(beat)
    hb.schedule(beat)
    return _OK if logged else _OK_NOT_LOGGED


def _ping_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str]:
    """A ping's User-Agent (at most _AGENT_MAX characters; None if empty) and X-Forwarded-For,
    in one pass over the raw headers (the first of each, as ``request.headers`` reads them)."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in _PING_HEADER_NAMES:
            found.setdefault(name, value)
    agent = found.get(b"user-agent", b"")[:_AGENT_MAX].decode("latin-1") or None
    return agent, found.get(b"x-forwarded-for", b"").decode("latin-1")


_PING_HEADER_NAMES = frozenset((b"user-agent", b"x-forwarded-for"))


# The heartbeat routes' path suffixes, each with its kind of ping and methods; a suffix of
# digits is an exit code.
PING_ROUTES = {"": ("success", ("GET", "POST", "HEAD")), "start": ("start", ("GET", "POST")),
               "fail": ("fail", ("GET", "POST")), "log": ("log", ("POST",))}
_EXIT_CODE_METHODS = ("GET", "POST")
_PING_PREFIX = API_PREFIX + "/heartbeat/"
_JSON_TYPE = (b"content-type", b"application/json")


def ping_target(path: str, method: str) -> tuple[str, str, int | None] | None:
    """The heartbeat id, kind and exit code of a ping the direct path answers (a GET or POST
    naming a route and an exit code 0-255), else None."""
    token, slash, suffix = path[len(_PING_PREFIX):].partition("/")
    if slash and not suffix:
        return None
    if suffix.isascii() and suffix.isdigit() and len(suffix) < 4 and method in _EXIT_CODE_METHODS:
        code = int(suffix)
        return (token, "success" if code == 0 else "fail", code) if code <= 255 else None
    kind, methods = PING_ROUTES.get(suffix, ("", ()))
    return (token, kind, None) if token and method in methods and method != "HEAD" else None


async def answer_ping(app: Starlette, scope: dict[str, Any], receive: Any, send: Any) -> bool:
    """Answer a ping of a heartbeat monitor already in memory without routing or middleware
    (the heartbeat routes' work and answers, CORS headers included); False (nothing sent) for
    every other request, which goes through the application as usual."""
    target = ping_target(scope["path"], scope["method"])
    rt: Runtime | None = getattr(app.state, "statusapp", None)
    beat = rt.heartbeats.known(target[0]) if target and rt else None
    if beat is None or target is None or rt is None:
        return False
    scope["app"] = app
    try:
        body = await record_ping(rt, scope, await _ping_body(receive), beat, target)
    except Exception as exc:
        request = Request(scope, receive)
        response = await on_api_error(request, exc)
        response.raw_headers.extend(Cors.HEADERS)
        await response(scope, receive, send)
        return True
    limits = scope["state"]["headers"]
    await send({"type": "http.response.start", "status": 200, "headers": [
        *_PING_ANSWER_HEADERS[body],
        *((name.lower().encode(), value.encode()) for name, value in limits.items())]
        if limits else _PING_ANSWER_HEADERS[body]})
    await send({"type": "http.response.body", "body": body})
    return True


async def _ping_body(receive: Any) -> bytes:
    """A ping's body straight from the server's messages (``read_body`` for the direct path):
    413 once past HEARTBEAT_MAX_BODY, 400 if the client went away."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _disconnected()
        body += message.get("body", b"")
        if len(body) > HEARTBEAT_MAX_BODY:
            raise _too_large(HEARTBEAT_MAX_BODY)
        if not message.get("more_body"):
            return body


# The direct path's answer headers for each body (the rate-limit headers follow, if any).
_PING_ANSWER_HEADERS = {body: [_JSON_TYPE, (b"content-length", b"%d" % len(body)), *Cors.HEADERS]
                        for body in (_OK, _OK_NOT_LOGGED)}


def _ping_route(suffix: str, kind: str, methods: tuple[str, ...]) -> None:
    async def handler(call: Call) -> Response:
        return await _ping(call, kind)
    handler.__name__ = f"heartbeat_{kind}"
    api("/heartbeat/{heartbeatId}" + (suffix and "/" + suffix), *methods, public=True,
        limit=None, response=PING_SHAPE)(handler)


def _ping_routes() -> None:
    for suffix, (kind, methods) in PING_ROUTES.items():
        _ping_route(suffix, kind, methods)


_ping_routes()


@api("/heartbeat/{heartbeatId}/{exitCode:int}", *_EXIT_CODE_METHODS, public=True, limit=None,
      response=PING_SHAPE)
async def heartbeat_exit_code(call: Call) -> Response:
    """Report a job's exit status: 0 is a success, 1-255 a failure (``curl .../$?``)."""
    code = call.request.path_params["exitCode"]
    if code > 255:
        raise NotFound("Not found", "an exit code is 0-255")
    return await _ping(call, "success" if code == 0 else "fail", code)


HEARTBEAT_QUERY = page_fields(("receivedAt",), "receivedAt",
                              kind=Field("kind", "string", choices=HEARTBEAT_KINDS))


def heartbeat_json(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": f"hb_{row['id']}", "kind": row["kind"], "message": row["message"],
            "exitCode": row["exit_code"], "duration": row["duration"],
            "sourceIp": row["source_ip"],
            "userAgent": row["user_agent"], "receivedAt": iso(row["received_at"])}


def check_time(value: str, record: dict[str, Any], env: ValidationEnv) -> int:
    """An ISO 8601 time, as Unix milliseconds (no zone: UTC)."""
    when = _parse_time(value)
    if when is None:
        raise _Issue("Invalid datetime: expected ISO 8601", "invalid_string", validation="datetime")
    return int(when.timestamp() * 1000)


CHECK_QUERY = page_fields(
    ("checkedAt",), "checkedAt",
    **{"from": Field("from", "string", check=check_time, doc="Checks at or after this time"),
       "to": Field("to", "string", check=check_time, doc="Checks before this time"),
       "region": Field("region", "string", maximum=100, doc="Worker region id"),
       "status": Field("status", "string", choices=MONITOR_STATUSES[1:], doc="Check status")})


CHECKS_SHAPE = shape(checks=[CHECK_SHAPE], pagination=PAGINATION)


@api("/monitors/{monitorId}/checks", "GET", query=CHECK_QUERY, response=CHECKS_SHAPE)
async def list_checks(call: Call) -> dict[str, Any]:
    """A monitor's raw checks, newest first, filtered by time, region and status."""
    monitor = await load_owned(call, "monitors")
    query = call.query
    where, params = ["monitor_id = ?"], [monitor["id"]]
    for name, condition in (("from", "checked_at >= ?"), ("to", "checked_at < ?"),
                            ("region", "region_id = ?"), ("status", "status = ?")):
        if query[name] is not None:
            where.append(condition)
            params.append(query[name])
    clause = " AND ".join(where)
    total = await call.rt.db.fetchval(f"SELECT COUNT(*) FROM checks WHERE {clause}", params)
    order = "ASC" if query["order"] == "asc" else "DESC"
    rows = await call.rt.db.fetchall(
        f"SELECT * FROM checks WHERE {clause} ORDER BY checked_at {order}, id {order}"
        " LIMIT ? OFFSET ?", [*params, query["limit"], (query["page"] - 1) * query["limit"]])
    return {"checks": [check_json(r, call.rt.regions) for r in rows],
            "pagination": paginate(total, query)}


HEARTBEAT_SHAPE = shape(id="string", kind="string", message="string?", exitCode="integer?",
                        duration="integer?", sourceIp="string?", userAgent="string?",
                        receivedAt="date-time")


HEARTBEATS_SHAPE = shape(heartbeats=[HEARTBEAT_SHAPE], pagination=PAGINATION)


@api("/monitors/{monitorId}/heartbeats", "GET", query=HEARTBEAT_QUERY, response=HEARTBEATS_SHAPE)
async def list_heartbeats(call: Call) -> dict[str, Any]:
    """A monitor's pings, newest first (our addition to the spec)."""
    monitor = await load_owned(call, "monitors")
    query = call.query
    where, params = "monitor_id = ?", [monitor["id"]]
    if query["kind"]:
        where += " AND kind = ?"
        params.append(query["kind"])
    total = await call.rt.db.fetchval(f"SELECT COUNT(*) FROM heartbeats WHERE {where}", params)
    order = "ASC" if query["order"] == "asc" else "DESC"
    rows = await call.rt.db.fetchall(
        f"SELECT * FROM heartbeats WHERE {where} ORDER BY received_at {order}, id {order}"
        " LIMIT ? OFFSET ?", [*params, query["limit"], (query["page"] - 1) * query["limit"]])
    return {"heartbeats": [heartbeat_json(r) for r in rows], "pagination": paginate(total, query)}


# Incidents

INCIDENT_SORTS = {"startedAt": "started_at", "resolvedAt": "resolved_at",
                  "severity": "CASE severity WHEN 'high' THEN 3 WHEN 'medium' THEN 2 ELSE 1 END",
                  "incidentNumber": "year * 1000000 + number", "mttr": "resolved_at - started_at"}
INCIDENT_QUERY = page_fields(
    INCIDENT_SORTS, "startedAt",
    monitorId=Field("monitorId", "string", maximum=100),
    status=Field("status", "string", choices=("open", "resolved")))
INCIDENT_UPDATE_FIELDS = (
    Field("status", "string", True, choices=INCIDENT_STATUSES,
          doc="investigating, identified, monitoring or resolved (resolves the incident)"),
    Field("message", "string", True, minimum=1, maximum=5000, doc="What people should know"),
)


async def incident_json(rt: Runtime, row: sqlite3.Row) -> dict[str, Any]:
    """An incident as the API shows it; an open one's counts run up to now."""
    resolved = row["resolved_at"]
    regions = json.loads(row["affected_regions"])
    failed, total = row["checks_failed"], row["checks_total"]
    if resolved is None:
        stats = await rt.db.fetchrow(_INCIDENT_STATS_SQL,
                                     (row["monitor_id"], row["started_at"], now_ms()))
        failed, total = stats["failed"], stats["total"]
        regions = sorted({*regions, *((stats["regions"] or "").split(",") if stats["regions"]
                                      else ())})
    alert = incident_alert(row)
    return {"id": row["id"], "incidentNumber": alert["incidentNumber"],
            "monitorId": row["monitor_id"], "startedAt": alert["startedAt"],
            "resolvedAt": alert["resolvedAt"], "isResolved": resolved is not None,
            "severity": row["severity"], "status": row["status"], "rootCause": row["root_cause"],
            "rootCauseCategory": row["root_cause_category"], "affectedRegions": regions,
            "checksFailed": failed, "checksTotal": total, "mttr": alert["mttr"]}


INCIDENT_SHAPE = shape(
    id="string", incidentNumber="string", monitorId="string?", startedAt="date-time",
    resolvedAt="date-time?", isResolved="boolean", severity="string", status="string",
    rootCause="string?", rootCauseCategory="string?", affectedRegions=["string"],
    checksFailed="integer", checksTotal="integer", mttr="integer?")


async def _incident_detail(rt: Runtime, row: sqlite3.Row) -> dict[str, Any]:
    """The incident with its monitor, status history and newest INCIDENT_CHECKS checks."""
    monitor = await rt.db.fetchone("SELECT id, name, url, type, status FROM monitors WHERE id = ?",
                                   (row["monitor_id"],))
    updates = await rt.db.fetchall("SELECT * FROM incident_updates WHERE incident_id = ?"
                                   " ORDER BY created_at, rowid", (row["id"],))
    checks = await rt.db.fetchall(
        "SELECT * FROM checks WHERE monitor_id = ? AND checked_at BETWEEN ? AND ?"
        " ORDER BY checked_at DESC, id DESC LIMIT ?",
        (row["monitor_id"], row["started_at"], row["resolved_at"] or now_ms(), INCIDENT_CHECKS))
    return {**await incident_json(rt, row), "monitor": dict(monitor) if monitor else None,
            "updates": [{"id": u["id"], "status": u["status"], "message": u["message"],
                         "createdAt": iso(u["created_at"])} for u in updates],
            "checks": [check_json(c, rt.regions) for c in checks]}


INCIDENT_DETAIL_SHAPE = shape(
    INCIDENT_SHAPE, checks=[CHECK_SHAPE],
    monitor=nullable(shape(id="string", name="string", url="string?", type="string",
                           status="string")),
    updates=[shape(id="string", status="string", message="string", createdAt="date-time")])


INCIDENTS_SHAPE = shape(incidents=[INCIDENT_SHAPE], pagination=PAGINATION)


@api("/incidents", "GET", query=INCIDENT_QUERY, response=INCIDENTS_SHAPE)
async def list_incidents(call: Call) -> dict[str, Any]:
    query = call.query
    order = INCIDENT_SORTS[query["sort"]] + " {d}, started_at {d}, id {d}"
    total, rows = await paged_rows(call, "incidents", query, ("monitorId", "status"), order)
    return {"incidents": [await incident_json(call.rt, row) for row in rows],
            "pagination": paginate(total, query)}


@api("/incidents/{incidentId}", "GET", response=INCIDENT_DETAIL_SHAPE)
async def get_incident(call: Call) -> dict[str, Any]:
    return await _incident_detail(call.rt, await load_owned(call, "incidents"))


@api("/incidents/{incidentId}/updates", "POST", body=INCIDENT_UPDATE_FIELDS,
      response=INCIDENT_DETAIL_SHAPE, status=(201,))
async def post_incident_update(call: Call) -> Response:
    """A person's status update; ``resolved`` closes the incident and sends its alerts."""
    row = await load_owned(call, "incidents")
    clean = validate(INCIDENT_UPDATE_FIELDS, await call.json(), call.env())
    async with call.rt.db.transaction() as conn:
        current = present(await _row(conn, "SELECT * FROM incidents WHERE id = ?", (row["id"],)))
        if current["resolved_at"] is not None:
            raise Conflict("Incident is already resolved", "updates go to open incidents only")
        if clean["status"] == "resolved":
            resolved = await resolve_incident(conn, current, now_ms(), clean["message"])
            monitor = present(await _row(conn, "SELECT * FROM monitors WHERE id = ?",
                                         (row["monitor_id"],)))
            await enqueue_alerts(conn, monitor, monitor["status"], ["incident.resolved"],
                                 ["incident.resolved"], incident=incident_alert(resolved),
                                 check=None, timestamp=iso(resolved["resolved_at"]),
                                 note=clean["message"])
        else:
            await add_incident_update(conn, row["id"], clean["status"], clean["message"], now_ms())
    return JSONResponse(await _incident_detail(call.rt, await load_owned(call, "incidents")), 201)


# Notification channels


CHANNEL_FIELDS = (
    Field("name", "string", True, minimum=1, maximum=255, doc="Channel name"),
    Field("type", "string", True, choices=Names(CHANNEL_TYPES), doc="Channel type"),
    Field("config", "object", True, check=valid_channel_config,
          doc="Type-specific configuration (see the channel types)"),
    Field("isActive", "boolean", default=True, doc="Inactive channels receive nothing"),
    MANAGED_FIELD,
    DIGEST_FIELD,
)


def channel_json(row: sqlite3.Row) -> dict[str, Any]:
    """A channel as the API shows it, secrets masked, with its delivery health."""
    return {"id": row["id"], "name": row["name"], "type": row["type"],
            "config": masked_channel_config(row["type"], json.loads(row["config"])),
            "isActive": bool(row["is_active"]), "managed": bool(row["managed"]),
            "secretsDigest": row["secrets_digest"],
            "failing": bool(row["failing"]),
            "lastError": row["last_error"], "createdAt": iso(row["created_at"]),
            "updatedAt": iso(row["updated_at"])}


CHANNEL_SHAPE = shape(id="string", name="string", type="string", config="object",
                      isActive="boolean", failing="boolean", lastError="string?",
                      createdAt="date-time", updatedAt="date-time")


@api("/notifications", "GET", response=shape(channels=[CHANNEL_SHAPE]))
async def list_channels(call: Call) -> dict[str, Any]:
    rows = await call.rt.db.fetchall("SELECT * FROM notification_channels WHERE account_id = ?"
                                     " ORDER BY created_at, id", (call.team,))
    return {"channels": [channel_json(row) for row in rows]}


@api("/notifications/{channelId}", "GET", response=CHANNEL_SHAPE)
async def get_channel(call: Call) -> dict[str, Any]:
    return channel_json(await load_owned(call, "notification_channels"))


@api("/notifications", "POST", body=CHANNEL_FIELDS, response=CHANNEL_SHAPE, status=(201,))
async def create_channel(call: Call) -> Response:
    clean = validate(CHANNEL_FIELDS, await call.json(), call.env())
    await refuse_private_targets(call.rt.cfg, {
        "notifications": channel_targets(clean["type"], clean["config"], ["config"])})
    row = await create_owned(call, "notification_channels", "nc",
                             column_values(CHANNEL_FIELDS, clean))
    return JSONResponse(channel_json(row), 201)


@api("/notifications/{channelId}", "PUT", body=CHANNEL_FIELDS, response=CHANNEL_SHAPE)
async def update_channel(call: Call) -> dict[str, Any]:
    """A partial update; a new config clears the failing mark (it may fix the channel)."""
    row = await load_owned(call, "notification_channels")
    existing = {"name": row["name"], "type": row["type"], "config": json.loads(row["config"]),
                "isActive": bool(row["is_active"])}
    clean = validate(CHANNEL_FIELDS, await call.json(), call.env(existing=existing),
                     existing=existing)
    await refuse_private_targets(call.rt.cfg, {"notifications": channel_targets(
        clean.get("type", existing["type"]), clean.get("config"), ["config"])})
    columns = column_values(CHANNEL_FIELDS, clean)
    if "config" in clean:
        columns |= {"failing": 0, "last_error": None}
    await call.rt.db.write([update_statement("notification_channels", row["id"], columns)])
    return channel_json(await load_owned(call, "notification_channels"))


@api("/notifications/{channelId}", "DELETE", response=DELETED)
async def delete_channel(call: Call) -> dict[str, Any]:
    """Delete a channel, its links to monitors and the alerts still queued for it."""
    row = await load_owned(call, "notification_channels")
    await call.rt.db.write([
        ("DELETE FROM alert_outbox WHERE channel_id = ? AND done_at IS NULL", (row["id"],)),
        ("DELETE FROM notification_channels WHERE id = ?", (row["id"],))])
    return {"success": True, "message": "Notification channel deleted successfully"}


# Webhooks


def valid_events(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """A comma-separated list of WEBHOOK_EVENTS, returned normalised (no spaces, no repeats)."""
    events = [e.strip() for e in value.split(",") if e.strip()]
    unknown = [e for e in events if e not in WEBHOOK_EVENTS]
    if unknown or not events:
        raise _Issue(f"Unknown event(s): {', '.join(unknown) or '(none given)'}; expected a"
                     f" comma-separated list of {', '.join(WEBHOOK_EVENTS)}",
                     options=list(WEBHOOK_EVENTS))
    return ",".join(dict.fromkeys(events))


WEBHOOK_FIELDS = (
    Field("name", "string", True, minimum=1, maximum=255, doc="Webhook name"),
    Field("url", "string", True, maximum=2048, check=valid_url, doc="Endpoint URL"),
    Field("events", "string", True, maximum=255, check=valid_events,
          doc="Comma-separated event types"),
    Field("secret", "string", minimum=1, maximum=255,
          doc="Signs each body as X-Webhook-Signature; never returned (see hasSecret)"),
    Field("isActive", "boolean", default=True, doc="Inactive webhooks receive nothing"),
)


def webhook_json(row: sqlite3.Row) -> dict[str, Any]:
    """A webhook as the API shows it; the secret itself is never returned."""
    return {"id": row["id"], "name": row["name"], "url": row["url"], "events": row["events"],
            "isActive": bool(row["is_active"]), "hasSecret": bool(row["secret"]),
            "lastStatus": row["last_status"], "lastTriggeredAt": iso(row["last_triggered_at"]),
            "createdAt": iso(row["created_at"]), "updatedAt": iso(row["updated_at"])}


WEBHOOK_SHAPE = shape(id="string", name="string", url="string", events="string",
                      isActive="boolean", hasSecret="boolean", lastStatus="integer?",
                      lastTriggeredAt="date-time?", createdAt="date-time", updatedAt="date-time")


@api("/webhooks", "GET", response=shape(webhooks=[WEBHOOK_SHAPE]))
async def list_webhooks(call: Call) -> dict[str, Any]:
    rows = await call.rt.db.fetchall("SELECT * FROM webhooks WHERE account_id = ?"
                                     " ORDER BY created_at, id", (call.team,))
    return {"webhooks": [webhook_json(row) for row in rows]}


@api("/webhooks/{webhookId}", "GET", response=WEBHOOK_SHAPE)
async def get_webhook(call: Call) -> dict[str, Any]:
    return webhook_json(await load_owned(call, "webhooks"))


@api("/webhooks", "POST", body=WEBHOOK_FIELDS, response=WEBHOOK_SHAPE, status=(201,))
async def create_webhook(call: Call) -> Response:
    clean = validate(WEBHOOK_FIELDS, await call.json(), call.env())
    await refuse_private_targets(call.rt.cfg, {
        "notifications": url_targets(WEBHOOK_FIELDS, clean, [])})
    row = await create_owned(call, "webhooks", "wh", column_values(WEBHOOK_FIELDS, clean))
    return JSONResponse(webhook_json(row), 201)


@api("/webhooks/{webhookId}", "PUT", body=WEBHOOK_FIELDS, response=WEBHOOK_SHAPE)
async def update_webhook(call: Call) -> dict[str, Any]:
    """A partial update; ``"secret": null`` removes the secret, leaving it out keeps it."""
    row = await load_owned(call, "webhooks")
    existing = {"name": row["name"], "url": row["url"], "events": row["events"],
                "secret": row["secret"], "isActive": bool(row["is_active"])}
    clean = validate(WEBHOOK_FIELDS, await call.json(), call.env(), existing=existing)
    await refuse_private_targets(call.rt.cfg, {
        "notifications": url_targets(WEBHOOK_FIELDS, clean, [])})
    await call.rt.db.write([update_statement("webhooks", row["id"],
                                             column_values(WEBHOOK_FIELDS, clean))])
    return webhook_json(await load_owned(call, "webhooks"))


@api("/webhooks/{webhookId}", "DELETE", response=DELETED)
async def delete_webhook(call: Call) -> dict[str, Any]:
    row = await load_owned(call, "webhooks")
    await call.rt.db.write([
        ("DELETE FROM alert_outbox WHERE webhook_id = ? AND done_at IS NULL", (row["id"],)),
        ("DELETE FROM webhooks WHERE id = ?", (row["id"],))])
    return {"success": True, "message": "Webhook deleted successfully"}


TEST_WEBHOOK_SHAPE = shape(
    success="boolean", statusCode="integer?", responseTime="integer?", error="string?")


async def send_test(rt: Runtime, kind: str, config: dict[str, Any],
                    delivery_id: str | None = None) -> list[DeliveryAttempt]:
    """Deliver one ``test`` alert through a channel type now (a single attempt)."""
    alert = Alert(event="test", monitor={"id": "mon_test", "name": "StatusApp test",
                                         "url": rt.cfg["server"]["base_url"],
                                         "type": "WEBSITE", "status": "UP"})
    async with NotifyContext(rt.cfg) as ctx:
        return await deliver(CHANNEL_TYPES[kind].send, config, alert, ctx, attempts=1,
                             delivery_id=delivery_id)


def delivery_answer(records: list[DeliveryAttempt]) -> dict[str, Any]:
    """How the receiver answered the last attempt of a test delivery."""
    result = records[-1]
    return {"success": result["ok"], "statusCode": result["statusCode"],
            "responseTime": result["durationMs"], "error": result["error"]}


@api("/notifications/{channelId}/test", "POST", response=TEST_WEBHOOK_SHAPE)
async def test_channel(call: Call) -> dict[str, Any]:
    """Send one ``test`` alert through the channel now and report how the receiver answered."""
    row = await load_owned(call, "notification_channels")
    return delivery_answer(await send_test(call.rt, row["type"], json.loads(row["config"])))


@api("/webhooks/{webhookId}/test", "POST", response=TEST_WEBHOOK_SHAPE)
async def test_webhook(call: Call) -> dict[str, Any]:
    """Send one ``test`` event now (a single attempt) and report how the endpoint answered."""
    row = await load_owned(call, "webhooks")
    delivery = new_id("wd")
    records = await send_test(call.rt, "WEBHOOK", {"url": row["url"], "secret": row["secret"]},
                              delivery)
    stamp = now_ms()
    await call.rt.db.write([
        ("INSERT INTO webhook_deliveries (id, webhook_id, event, created_at) VALUES (?, ?, ?, ?)",
         (delivery, row["id"], "test", stamp)),
        *webhook_result_statements(row["id"], delivery, records, stamp)])
    return delivery_answer(records)


WEBHOOK_DELIVERIES_SHAPE = shape(
    deliveries=[shape(id="string", event="string", statusCode="integer?", attempts="integer",
                      deliveredAt="date-time?", error="string?", createdAt="date-time")])


@api("/webhooks/{webhookId}/deliveries", "GET", response=WEBHOOK_DELIVERIES_SHAPE)
async def list_webhook_deliveries(call: Call) -> dict[str, Any]:
    """The newest 100 deliveries; ``deliveredAt`` is null while queued or after failing."""
    row = await load_owned(call, "webhooks")
    rows = await call.rt.db.fetchall("SELECT * FROM webhook_deliveries WHERE webhook_id = ?"
                                     " ORDER BY created_at DESC, rowid DESC LIMIT 100",
                                     (row["id"],))
    return {"deliveries": [{"id": d["id"], "event": d["event"], "statusCode": d["status_code"],
                            "attempts": d["attempts"], "deliveredAt": iso(d["delivered_at"]),
                            "error": d["error"], "createdAt": iso(d["created_at"])}
                           for d in rows]}



# Alert deliveries (the outbox): pending ones with their next attempt, delivered, failed

DELIVERY_STATUSES = ("pending", "delivered", "failed")
DELIVERY_QUERY = page_fields(
    {"createdAt": "created_at"}, "createdAt",
    status=Field("status", "string", choices=DELIVERY_STATUSES),
    monitorId=Field("monitorId", "string", maximum=100),
    webhookId=Field("webhookId", "string", maximum=100),
    channelId=Field("channelId", "string", maximum=100))


def delivery_json(row: sqlite3.Row) -> dict[str, Any]:
    pending = row["done_at"] is None
    return {"id": row["delivery_id"], "event": row["event"], "channelType": row["channel_type"],
            "channelId": row["channel_id"], "webhookId": row["webhook_id"],
            "monitorId": row["monitor_id"], "status": row["status"], "attempts": row["attempts"],
            "statusCode": row["status_code"], "lastError": row["last_error"],
            "nextAttemptAt": iso(row["next_attempt_at"]) if pending else None,
            "createdAt": iso(row["created_at"]), "finishedAt": iso(row["done_at"])}


async def _deliveries(call: Call, **fixed: str) -> dict[str, Any]:
    query = {**call.query, **fixed}
    total, rows = await paged_rows(call, "alert_outbox", query,
                                   ("status", "monitorId", "webhookId", "channelId"),
                                   "created_at {d}, id {d}")
    return {"deliveries": [delivery_json(row) for row in rows],
            "pagination": paginate(total, query)}


DELIVERIES_SHAPE = shape(pagination=PAGINATION, deliveries=[shape(
    id="string", event="string", channelType="string", channelId="string?", webhookId="string?",
    monitorId="string?", status={"type": "string", "enum": list(DELIVERY_STATUSES)},
    attempts="integer", statusCode="integer?", lastError="string?", nextAttemptAt="date-time?",
    createdAt="date-time", finishedAt="date-time?")])


@api("/deliveries", "GET", query=DELIVERY_QUERY, response=DELIVERIES_SHAPE)
async def list_deliveries(call: Call) -> dict[str, Any]:
    """Alert deliveries to channels and webhooks: pending (with the next attempt's time),
    delivered or failed."""
    return await _deliveries(call)


@api("/notifications/{channelId}/deliveries", "GET", query=DELIVERY_QUERY,
     response=DELIVERIES_SHAPE)
async def list_channel_deliveries(call: Call) -> dict[str, Any]:
    """One channel's alert deliveries, newest first."""
    row = await load_owned(call, "notification_channels")
    return await _deliveries(call, channelId=row["id"])


# Status pages

_SLUG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def valid_slug(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """Lowercase letters, digits and inner hyphens: safe in a URL path as it is."""
    if not _SLUG.fullmatch(value):
        raise _Issue("Invalid slug: use 1-64 lowercase letters, digits and hyphens, not starting"
                     " or ending with a hyphen", "invalid_string", validation="regex")
    return value


def valid_custom_domain(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """A DNS hostname (no scheme, port or path; not an IP address), stored lowercase."""
    host = value.strip().lower().rstrip(".")
    labels = host.split(".")
    if (len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise _Issue("Invalid customDomain: expected a hostname such as status.home.test")
    return host


def valid_page_monitor_ids(value: list[Any], record: dict[str, Any],
                           env: ValidationEnv) -> list[str]:
    """Every id must name one of the team's monitors; duplicates are dropped, order kept."""
    unknown = [str(v) for v in value if not isinstance(v, str) or v not in env["monitors"]]
    if unknown:
        raise _Issue(f"Unknown monitor id(s): {', '.join(unknown)}")
    return list(dict.fromkeys(value))


def valid_page_selector(clean: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    """A page group lists monitorIds, or names one monitor group or tag, not both."""
    if (clean.get("monitorGroup") or clean.get("monitorTag")) and (
            clean.get("monitorIds") or (clean.get("monitorGroup") and clean.get("monitorTag"))):
        raise ValidationFailed([{"code": "custom", "path": list(path),
                                 "message": "Give monitorIds, monitorGroup or monitorTag"}])
    return clean


MONITOR_GROUP_FIELDS = (
    Field("name", "string", True, minimum=1, maximum=255, doc="Group heading"),
    Field("monitorIds", "array", default=[], maximum=500, check=valid_page_monitor_ids,
          items="string", ids_of="monitors",
          doc="The team's monitors in display order"),
    Field("monitorGroup", "string", minimum=1, maximum=100,
          doc="Instead of monitorIds: every monitor of this group, by name, as it is when shown"),
    Field("monitorTag", "string", minimum=1, maximum=32,
          doc="Instead of monitorIds: every monitor with this tag, by name, as it is when shown"),
)

STATUS_PAGE_FIELDS = (
    Field("name", "string", True, minimum=1, maximum=255, doc="Status page name"),
    Field("slug", "string", True, minimum=1, maximum=64, check=valid_slug,
          doc="URL slug, unique across the server (409 when taken)"),
    Field("description", "string", maximum=2000, doc="Page description"),
    Field("isPublic", "boolean", default=True, doc="Private pages are 404 to the public"),
    Field("brandColor", "string", check=valid_hex_color, doc="Hex colour, #rgb or #rrggbb"),
    Field("logoUrl", "string", maximum=2048, check=valid_url, doc="http(s) URL of the logo"),
    Field("faviconUrl", "string", maximum=2048, check=valid_url, doc="http(s) URL of the favicon"),
    Field("customDomain", "string", maximum=253, check=valid_custom_domain,
          doc="Hostname that serves the page at / (unique; 409 when taken)"),
    Field("monitorGroups", "array", default=[], maximum=100,
          check=each(MONITOR_GROUP_FIELDS, then=valid_page_selector),
          doc="Groups of monitors, in display order"),
    MANAGED_FIELD,
)
_PAGE_COLUMNS = tuple(f for f in STATUS_PAGE_FIELDS if f.name != "monitorGroups")


def status_page_json(row: sqlite3.Row, base_url: str) -> dict[str, Any]:
    """A status_pages row as the API shows it, with its public URL."""
    out: dict[str, Any] = {"id": row["id"]}
    for field in _PAGE_COLUMNS:
        value = row[field.column]
        out[field.name] = bool(value) if field.kind == "boolean" else value
    out.update({"url": f"{base_url}/status/{row['slug']}", "createdAt": iso(row["created_at"]),
                "updatedAt": iso(row["updated_at"])})
    return out


PAGE_ROW_SHAPE = shape(fields_shape(_PAGE_COLUMNS), id="string", url="string",
                       createdAt="date-time", updatedAt="date-time")
_PAGE_MONITOR_COLUMNS = "m.id, m.name, m.type, m.status, m.is_paused, m.is_active"


def _page_monitor(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "type": row["type"], "status": row["status"],
            "paused": bool(row["is_paused"]) or not row["is_active"]}


async def page_groups(db: Database, page_id: str) -> list[dict[str, Any]]:
    """A page's groups in order, each with its monitors (id, name, type, state) in order; a
    group naming a monitor group or tag gets that group's or tag's monitors now, by name."""
    groups: dict[str, dict[str, Any]] = {}
    for row in await db.fetchall(
            f"SELECT g.id AS group_id, g.name AS group_name, g.monitor_group, g.monitor_tag,"
            f" p.account_id, {_PAGE_MONITOR_COLUMNS} FROM status_page_groups g"
            f" JOIN status_pages p ON p.id = g.status_page_id"
            f" LEFT JOIN status_page_monitors s ON s.group_id = g.id"
            f" LEFT JOIN monitors m ON m.id = s.monitor_id"
            f" WHERE g.status_page_id = ? ORDER BY g.position, s.position", (page_id,)):
        group = groups.setdefault(row["group_id"], {
            "name": row["group_name"], "monitorGroup": row["monitor_group"],
            "monitorTag": row["monitor_tag"], "account": row["account_id"], "monitors": []})
        if row["id"] is not None:
            group["monitors"].append(_page_monitor(row))
    for group in groups.values():
        account = group.pop("account")
        where, params = selection({"group": group["monitorGroup"], "tag": group["monitorTag"]})
        if where:
            group["monitors"] = [_page_monitor(row) for row in await db.fetchall(
                f"SELECT {_PAGE_MONITOR_COLUMNS} FROM monitors m WHERE account_id = ? AND"
                f" {where[0]} ORDER BY name, id", [account, *params])]
    return list(groups.values())


def _group_selector(group: dict[str, Any]) -> dict[str, Any]:
    """A page group as it was set: its name and monitorIds, or its monitorGroup / monitorTag."""
    dynamic = group["monitorGroup"] or group["monitorTag"]
    return {"name": group["name"],
            "monitorIds": [] if dynamic else [m["id"] for m in group["monitors"]],
            "monitorGroup": group["monitorGroup"], "monitorTag": group["monitorTag"]}


async def _status_page_response(call: Call, row: sqlite3.Row) -> dict[str, Any]:
    out = status_page_json(row, call.rt.cfg["server"]["base_url"])
    out["monitorGroups"] = [
        {**_group_selector(g),
         "monitors": [{k: m[k] for k in ("id", "name", "type", "status")} for m in g["monitors"]]}
        for g in await page_groups(call.rt.db, row["id"])]
    return out


PAGE_SHAPE = shape(PAGE_ROW_SHAPE, monitorGroups=[shape(
    name="string", monitorIds=["string"],
    monitors=[shape(id="string", name="string", type="string", status="string")])])


async def _page_env(call: Call) -> ValidationEnv:
    monitors = {r[0] for r in await call.rt.db.fetchall(
        "SELECT id FROM monitors WHERE account_id = ?", (call.team,))}
    return call.env(monitors=monitors)


async def _save_page(conn: aiosqlite.Connection, page_id: str, clean: dict[str, Any]) -> None:
    """Write the given page columns and, when given, replace the groups; 409 on taken names."""
    for name, column in (("slug", "slug"), ("customDomain", "custom_domain")):
        if clean.get(name) is not None and await (await conn.execute(
                f"SELECT 1 FROM status_pages WHERE {column} = ? AND id != ?",
                (clean[name], page_id))).fetchone():
            raise Conflict(f"This {name} is already in use", f"{name} {clean[name]!r} is taken")
    await conn.execute(*update_statement("status_pages", page_id,
                                         column_values(_PAGE_COLUMNS, clean)))
    if "monitorGroups" not in clean:
        return
    await conn.execute("DELETE FROM status_page_groups WHERE status_page_id = ?", (page_id,))
    for position, group in enumerate(clean["monitorGroups"] or []):
        group_id = new_id("spg")
        await conn.execute("INSERT INTO status_page_groups (id, status_page_id, name, position,"
                           " monitor_group, monitor_tag) VALUES (?, ?, ?, ?, ?, ?)",
                           (group_id, page_id, group["name"], position, group.get("monitorGroup"),
                            group.get("monitorTag")))
        await conn.executemany(
            "INSERT INTO status_page_monitors (group_id, monitor_id, position) VALUES (?, ?, ?)",
            [(group_id, monitor_id, i) for i, monitor_id in enumerate(group["monitorIds"] or [])])


@api("/status-pages", "GET", response=shape(statusPages=[PAGE_ROW_SHAPE]))
async def list_status_pages(call: Call) -> dict[str, Any]:
    rows = await call.rt.db.fetchall(
        "SELECT * FROM status_pages WHERE account_id = ? ORDER BY created_at, id", (call.team,))
    base = call.rt.cfg["server"]["base_url"]
    return {"statusPages": [status_page_json(row, base) for row in rows]}


@api("/status-pages/{statusPageId}", "GET", response=PAGE_SHAPE)
async def get_status_page(call: Call) -> dict[str, Any]:
    return await _status_page_response(call, await load_owned(call, "status_pages"))


@api("/status-pages", "POST", body=STATUS_PAGE_FIELDS, response=PAGE_SHAPE, status=(201,))
async def create_status_page(call: Call) -> Response:
    body = await call.json()
    clean = validate(STATUS_PAGE_FIELDS, body, await _page_env(call))
    page_id, stamp = new_id("sp"), now_ms()
    async with call.rt.db.transaction() as conn:  # inserted bare, then written as an update
        await conn.execute("INSERT INTO status_pages (id, account_id, name, slug, created_at,"
                           " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                           (page_id, call.team, page_id, page_id, stamp, stamp))
        await _save_page(conn, page_id, clean)
    row = await call.rt.db.fetchrow("SELECT * FROM status_pages WHERE id = ?", (page_id,))
    return JSONResponse(await _status_page_response(call, row), 201)


@api("/status-pages/{statusPageId}", "PUT", body=STATUS_PAGE_FIELDS, response=PAGE_SHAPE)
async def update_status_page(call: Call) -> dict[str, Any]:
    row = await load_owned(call, "status_pages")
    existing = status_page_json(row, "")
    existing["monitorGroups"] = [_group_selector(g)
                                 for g in await page_groups(call.rt.db, row["id"])]
    body = await call.json()
    clean = validate(STATUS_PAGE_FIELDS, body, await _page_env(call), existing=existing)
    async with call.rt.db.transaction() as conn:
        await _save_page(conn, row["id"], clean)
    return await _status_page_response(call, await load_owned(call, "status_pages"))


@api("/status-pages/{statusPageId}", "DELETE", response=DELETED)
async def delete_status_page(call: Call) -> dict[str, Any]:
    row = await load_owned(call, "status_pages")
    async with call.rt.db.transaction() as conn:
        await conn.execute("DELETE FROM status_pages WHERE id = ?", (row["id"],))
    return {"success": True, "message": "Status page deleted successfully"}


# Maintenance windows (see "Maintenance windows" under Incidents for what they do)

def valid_moment(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """An ISO 8601 date-time; one without an offset is wall-clock time in ``timezone``."""
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise _Issue("Invalid datetime: expected ISO 8601 such as 2026-01-04T03:00:00Z",
                     "invalid_string", validation="datetime") from None
    return value


def valid_recurrence(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """An RFC 5545 RRULE (DAILY, WEEKLY, MONTHLY or YEARLY) that python-dateutil accepts."""
    try:
        zone = zoneinfo.ZoneInfo(record.get("timezone") or "UTC")
        parse_rrule(value, parse_moment(record.get("startsAt") or "", zone))
    except (ValueError, KeyError, TypeError) as exc:
        raise _Issue(f"Invalid recurrence: {exc}") from None
    return value


MAINTENANCE_FIELDS = (
    Field("title", "string", True, minimum=1, maximum=255, doc="Shown on status pages"),
    Field("description", "string", maximum=2000, doc="Shown on status pages"),
    Field("startsAt", "string", True, maximum=64, check=valid_moment,
          doc="ISO 8601 start (recurring: the first occurrence; no offset = local in timezone)"),
    Field("endsAt", "string", maximum=64, check=valid_moment,
          doc="ISO 8601 end of a one-off window (give endsAt or recurrence)"),
    Field("recurrence", "string", maximum=500, check=valid_recurrence,
          doc="RFC 5545 RRULE, e.g. FREQ=WEEKLY;BYDAY=SU (FREQ DAILY/WEEKLY/MONTHLY/YEARLY)"),
    Field("timezone", "string", default="UTC", check=valid_timezone,
          doc="IANA zone the recurrence (and offset-less times) follow"),
    Field("durationMinutes", "integer", minimum=1, maximum=10_080,
          doc="Length of each occurrence of a recurring window"),
    Field("monitorIds", "array", maximum=1000, check=valid_page_monitor_ids, items="string",
          doc="Monitors it covers (null or absent: all the team's monitors)", ids_of="monitors",
          unset="all the team's monitors"),
    Field("suppressAlerts", "boolean", default=True,
          doc="No incident and no alert while it runs (false: only status and uptime change)"),
    MANAGED_FIELD,
)


def window_rules(record: dict[str, Any]) -> None:
    """One-off windows need an end after their start; recurring ones a duration."""
    problem = None
    if record.get("recurrence"):
        if not record.get("durationMinutes"):
            problem = ("durationMinutes", "A recurring window needs durationMinutes")
    elif not record.get("endsAt"):
        problem = ("endsAt", "Give endsAt, or recurrence with durationMinutes")
    else:
        zone = zoneinfo.ZoneInfo(record.get("timezone") or "UTC")
        if parse_moment(record["endsAt"], zone) <= parse_moment(record["startsAt"], zone):
            problem = ("endsAt", "endsAt must be after startsAt")
    if problem:
        raise ValidationFailed([{"code": "custom", "path": [problem[0]], "message": problem[1]}])


def window_json(rt: Runtime, row: sqlite3.Row) -> dict[str, Any]:
    """A window as the API shows it, with whether it runs now and its current or next
    occurrence (within a year)."""
    out: dict[str, Any] = {"id": row["id"]}
    for field in MAINTENANCE_FIELDS:
        value = row[field.column]
        if field.kind in _JSON_KINDS and value is not None:
            value = json.loads(value)
        out[field.name] = bool(value) if field.kind == "boolean" else value
    now = rt.maintenance.clock()
    spans = Window.from_row(row).occurrences(now, now + 366 * DAY_MS)[:1]
    out.update({"active": bool(spans) and spans[0][0] <= now,
                "nextOccurrence": {"startsAt": iso(spans[0][0]), "endsAt": iso(spans[0][1])}
                if spans else None,
                "createdAt": iso(row["created_at"]), "updatedAt": iso(row["updated_at"])})
    return out


WINDOW_SHAPE = shape(
    fields_shape(MAINTENANCE_FIELDS), id="string", active="boolean",
    nextOccurrence=nullable(shape(startsAt="date-time", endsAt="date-time")),
    createdAt="date-time", updatedAt="date-time")


async def _window_response(call: Call, window_id: str | None = None) -> dict[str, Any]:
    return window_json(call.rt, await load_owned(call, "maintenance_windows", window_id))


@api("/maintenance-windows", "GET", response=shape(maintenanceWindows=[WINDOW_SHAPE]))
async def list_maintenance_windows(call: Call) -> dict[str, Any]:
    rows = await call.rt.db.fetchall("SELECT * FROM maintenance_windows WHERE account_id = ?"
                                     " ORDER BY created_at, id", (call.team,))
    return {"maintenanceWindows": [window_json(call.rt, row) for row in rows]}


@api("/maintenance-windows/{windowId}", "GET", response=WINDOW_SHAPE)
async def get_maintenance_window(call: Call) -> dict[str, Any]:
    return await _window_response(call)


@api("/maintenance-windows", "POST", body=MAINTENANCE_FIELDS, response=WINDOW_SHAPE,
     status=(201,))
async def create_maintenance_window(call: Call) -> Response:
    clean = validate(MAINTENANCE_FIELDS, await call.json(), await _page_env(call))
    window_rules(clean)
    row = await create_owned(call, "maintenance_windows", "mw", {
        **column_values(MAINTENANCE_FIELDS, clean), "ends_handled_at": call.rt.maintenance.clock()})
    await call.rt.maintenance.reload()
    return JSONResponse(window_json(call.rt, row), 201)


@api("/maintenance-windows/{windowId}", "PUT", body=MAINTENANCE_FIELDS, response=WINDOW_SHAPE)
async def update_maintenance_window(call: Call) -> dict[str, Any]:
    row = await load_owned(call, "maintenance_windows")
    existing = {k: v for k, v in window_json(call.rt, row).items()
                if k in {f.name for f in MAINTENANCE_FIELDS}}
    clean = validate(MAINTENANCE_FIELDS, await call.json(), await _page_env(call),
                     existing=existing)
    window_rules({**existing, **clean})
    await call.rt.db.write([update_statement("maintenance_windows", row["id"],
                                             column_values(MAINTENANCE_FIELDS, clean))])
    await call.rt.maintenance.reload()
    return await _window_response(call, row["id"])


@api("/maintenance-windows/{windowId}", "DELETE", response=DELETED)
async def delete_maintenance_window(call: Call) -> dict[str, Any]:
    row = await load_owned(call, "maintenance_windows")
    calendar, now = call.rt.maintenance, call.rt.maintenance.clock()
    # Out of the calendar first, so the engine never sees the window suppress what its end opens.
    window = calendar.windows.pop(row["id"], None)
    try:
        ending = (await calendar.end_statements(window, now, now)  # a running window ends now
                  if window is not None and window.running(now) else [])
        await call.rt.db.write([*ending, ("DELETE FROM maintenance_windows WHERE id = ?",
                                          (row["id"],))])
    finally:
        await calendar.reload()
    return {"success": True, "message": "Maintenance window deleted successfully"}


# Analytics

ANALYTICS_PERIODS = {"1h": HOUR_MS, "24h": DAY_MS, "7d": 7 * DAY_MS, "30d": 30 * DAY_MS}
ANALYTICS_QUERY = (Field("period", "string", default="24h", choices=tuple(ANALYTICS_PERIODS)),)


DASHBOARD_SHAPE = shape(
    monitors=shape(total="integer", active="integer", paused="integer", up="integer",
                   down="integer", degraded="integer"),
    incidents=shape(open="integer", resolvedToday="integer", resolvedThisWeek="integer",
                    avgMttr="integer?"),
    performance=shape(avgResponseTime="integer?", p95ResponseTime="integer?",
                      overallUptime="number?"))
MONITOR_ANALYTICS_SHAPE = shape(
    monitorId="string", period="string", uptime="number?", avgResponseTime="integer?",
    p50ResponseTime="integer?", p95ResponseTime="integer?", p99ResponseTime="integer?",
    totalChecks="integer", checksUp="integer", checksDown="integer", checksDegraded="integer",
    incidents="integer", mttr="integer?", responseTimeByRegion="object")


def _seconds(ms: float | None) -> int | None:
    return None if ms is None else round(ms / 1000)


@api("/analytics", "GET", response=DASHBOARD_SHAPE)
async def dashboard_analytics(call: Call) -> dict[str, Any]:
    """Team-wide counts now, incidents, and check performance over the last 24 hours.

    ``active`` monitors are the ones being checked; ``paused`` counts paused and inactive
    (``isActive: false``) ones, so the two add up to ``total``."""
    db, now = call.rt.db, now_ms()
    counts = await db.fetchrow(
        "SELECT COUNT(*), SUM(is_paused = 0 AND is_active = 1),"
        " SUM(is_paused = 1 OR is_active = 0), SUM(status = 'UP'),"
        " SUM(status = 'DOWN'), SUM(status = 'DEGRADED') FROM monitors WHERE account_id = ?",
        (call.team,))
    incidents = await db.fetchrow(
        "SELECT SUM(resolved_at IS NULL), SUM(resolved_at >= ?), SUM(resolved_at >= ?),"
        " AVG(CASE WHEN resolved_at >= ? THEN resolved_at - started_at END)"
        " FROM incidents WHERE account_id = ?",
        (now // DAY_MS * DAY_MS, now - 7 * DAY_MS, now - 30 * DAY_MS, call.team))
    names = ("total", "active", "paused", "up", "down", "degraded")
    return {"monitors": {name: value or 0 for name, value in zip(names, counts)},
            "incidents": {"open": incidents[0] or 0, "resolvedToday": incidents[1] or 0,
                          "resolvedThisWeek": incidents[2] or 0,
                          "avgMttr": _seconds(incidents[3])},
            "performance": await _team_performance(call.rt, call.team, now)}


@api("/analytics/monitors/{monitorId}", "GET", query=ANALYTICS_QUERY,
      response=MONITOR_ANALYTICS_SHAPE)
async def monitor_analytics(call: Call) -> dict[str, Any]:
    query = call.query
    row = await load_owned(call, "monitors")
    hi = now_ms()
    lo = hi - ANALYTICS_PERIODS[query["period"]]
    stats, regions = await window_stats(call.rt.db, [row["id"]], lo, hi)
    incidents = await call.rt.db.fetchrow(
        "SELECT SUM(started_at >= ?), AVG(CASE WHEN resolved_at >= ? THEN resolved_at - started_at"
        " END) FROM incidents WHERE monitor_id = ? AND (started_at >= ? OR resolved_at >= ?)",
        (lo, lo, row["id"], lo, lo))
    return {"monitorId": row["id"], "period": query["period"], "uptime": stats.uptime(),
            "avgResponseTime": stats.average(), "p50ResponseTime": stats.percentile(50),
            "p95ResponseTime": stats.percentile(95), "p99ResponseTime": stats.percentile(99),
            "totalChecks": stats.total, "checksUp": stats.up, "checksDown": stats.down,
            "checksDegraded": stats.degraded, "incidents": incidents[0] or 0,
            "mttr": _seconds(incidents[1]),
            "responseTimeByRegion": {region: round(total / count) for region, (total, count)
                                     in sorted(regions.items()) if count}}


# Team
#
# The team is its owner's account: ``call.team`` is the owner's id, and every member's row in
# team_members points at it.  An invitation is a PENDING row holding the SHA256 of a one-time
# token; accepting it makes the row ACCEPTED, creates (or reuses) the invitee's account and
# hands out a first key.  A person belongs to one team only, and a team has one OWNER.

# The roles an invitation or a role change can give.
TEAM_ROLES = (Role.ADMIN, Role.MEMBER, Role.VIEWER)


def valid_email(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """``local@domain`` without spaces; compared without case (the columns are NOCASE)."""
    value = value.strip()
    if not re.fullmatch(r"[^@\s]+@[^@\s]+", value):
        raise _Issue("Invalid email", "invalid_string", validation="email")
    return value


MEMBER_FIELDS = (
    Field("email", "string", True, minimum=3, maximum=254, check=valid_email,
          doc="The invitee's email address"),
    Field("name", "string", maximum=255, doc="The invitee's name"),
    Field("role", "string", True, choices=TEAM_ROLES,
          doc="ADMIN, MEMBER or VIEWER; OWNER is never assignable"),
)
MEMBER_UPDATE_FIELDS = tuple(f for f in MEMBER_FIELDS if f.name == "role")

_MEMBER_SELECT = ("SELECT m.*, COALESCE(a.name, m.name) AS shown_name FROM team_members m"
                  " LEFT JOIN accounts a ON a.id = m.account_id")


def role_permissions(role: str) -> tuple[str, ...]:
    """The most a key of someone with ``role`` may hold: a VIEWER's keys only read."""
    return ("read",) if role == Role.VIEWER else PERMISSIONS


def member_json(row: sqlite3.Row) -> dict[str, Any]:
    """A team_members row as the spec shows it (the accepted person's current name)."""
    return {"id": row["id"], "email": row["email"], "name": row["shown_name"],
            "role": row["role"], "status": row["status"], "acceptedAt": iso(row["accepted_at"]),
            "invitedAt": iso(row["invited_at"])}


MEMBER_SHAPE = shape(id="string", email="string", name="string?", role="string",
                     status="string", acceptedAt="date-time?", invitedAt="date-time?")


def invitation_json(row: sqlite3.Row) -> dict[str, Any]:
    return {**member_json(row), "expiresAt": iso(row["expires_at"]),
            "isExpired": row["expires_at"] <= now_ms()}


INVITATION_SHAPE = shape(MEMBER_SHAPE, expiresAt="date-time?", isExpired="boolean")


async def _member(call: Call, member_id: str) -> sqlite3.Row:
    """A member (or invitation) of the caller's team, or 404."""
    row = await call.rt.db.fetchone(f"{_MEMBER_SELECT} WHERE m.id = ? AND m.team_id = ?",
                                    (member_id, call.team))
    if row is None:
        raise NotFound("Team member not found", f"no team member with id {member_id}")
    return row


def _not_owner(row: sqlite3.Row, action: str) -> None:
    if row["role"] == Role.OWNER:
        raise Forbidden(f"The team owner cannot be {action}", "a team always has exactly one OWNER")


async def _team_of(conn: aiosqlite.Connection, email: str) -> str | None:
    """The team ``email`` has joined, if any."""
    row = await (await conn.execute(
        "SELECT team_id FROM team_members WHERE email = ? AND status = 'ACCEPTED'",
        (email,))).fetchone()
    return row[0] if row else None


async def _free_for_invitation(conn: aiosqlite.Connection, team: str, email: str) -> None:
    """409 unless ``email`` may be invited; an expired invitation to it is dropped for the new."""
    joined = await _team_of(conn, email)
    if joined is not None:
        raise Conflict("This email is already a team member" if joined == team
                       else "This email already belongs to another team",
                       "a person belongs to exactly one team")
    pending = await (await conn.execute(
        "SELECT expires_at FROM team_members WHERE team_id = ? AND email = ?",
        (team, email))).fetchone()
    if pending is not None and pending[0] > now_ms():
        raise Conflict("This email already has a pending invitation",
                       f"it expires at {iso(pending[0])}; delete it to invite again")
    await conn.execute("DELETE FROM team_members WHERE team_id = ? AND email = ?", (team, email))


async def _email_invitation(call: Call, invite: sqlite3.Row, token: str) -> bool:
    """Mail the token when SMTP is set up.  The response carries the token anyway, so a
    failed delivery is logged and reported as ``emailSent: false``, not an error."""
    smtp = call.rt.cfg["smtp"]
    if not smtp["host"]:
        return False
    owner = await call.rt.db.fetchrow("SELECT email, name FROM accounts WHERE id = ?",
                                      (call.team,))
    url = f"{call.rt.cfg['server']['base_url']}{API_PREFIX}/team/invitations/{token}/accept"
    message = EmailMessage()
    inviter = _one_line(owner["name"] or owner["email"])
    message["Subject"] = _cut(f"[StatusApp] {inviter} invited you to their team", 200)
    message["From"] = smtp["sender"]
    message["To"] = invite["email"]
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain=smtp["sender"].rpartition("@")[2] or "statusapp")
    message.set_content(
        f"You are invited to join the StatusApp team of {owner['email']} as {invite['role']}.\n\n"
        f"Invitation token: {token}\n\nAccept it before {iso(invite['expires_at'])} with:\n\n"
        f"    curl -X POST {url}\n\nThe answer holds your API key, shown only once.\n\n"
        f"Or open {call.rt.cfg['server']['base_url']}/invite?token={token} in a browser to"
        f" choose a password and use the dashboard.\n")
    try:
        await asyncio.to_thread(_smtp_send, smtp, message, [invite["email"]],
                                call.rt.cfg["notifications"]["timeout"])
    except DeliveryError as exc:
        log.warning("invitation email to %s failed: %s", invite["email"], exc.message)
        return False
    return True


@api("/team/members", "GET", response=shape(members=[MEMBER_SHAPE]))
async def list_team_members(call: Call) -> dict[str, Any]:
    rows = await call.rt.db.fetchall(
        f"{_MEMBER_SELECT} WHERE m.team_id = ? ORDER BY m.invited_at, m.id", (call.team,))
    return {"members": [member_json(row) for row in rows]}


@api("/team/members/{memberId}", "GET", response=MEMBER_SHAPE)
async def get_team_member(call: Call) -> dict[str, Any]:
    return member_json(await _member(call, call.param("memberId")))


INVITE_TEAM_MEMBER_SHAPE = shape(INVITATION_SHAPE, invitationToken="string", emailSent="boolean")


@api("/team/members", "POST", role="ADMIN", body=MEMBER_FIELDS,
      response=INVITE_TEAM_MEMBER_SHAPE, status=(201,))
async def invite_team_member(call: Call) -> Response:
    """A PENDING invitation, answered with its one-time token (only the SHA256 is kept)."""
    clean = validate(MEMBER_FIELDS, await call.json(), call.env())
    token, member_id, stamp = "inv_" + secrets.token_urlsafe(24), new_id("tm"), now_ms()
    expires = stamp + call.rt.cfg["team"]["invitation_days"] * 86_400_000
    async with call.rt.db.transaction() as conn:
        await _free_for_invitation(conn, call.team, clean["email"])
        await conn.execute(
            "INSERT INTO team_members (id, team_id, email, name, role, status, invitation_hash,"
            " invited_at, expires_at) VALUES (?, ?, ?, ?, ?, 'PENDING', ?, ?, ?)",
            (member_id, call.team, clean["email"], clean["name"], clean["role"], hash_key(token),
             stamp, expires))
    invite = await _member(call, member_id)
    sent = await _email_invitation(call, invite, token)
    return JSONResponse({**invitation_json(invite), "invitationToken": token, "emailSent": sent},
                        201)


@api("/team/members/{memberId}", "PUT", role="ADMIN",
     body=MEMBER_UPDATE_FIELDS, response=MEMBER_SHAPE)
async def update_team_member(call: Call) -> dict[str, Any]:
    """Change a member's role (or an invitation's); the owner is never demoted."""
    row = await _member(call, call.param("memberId"))
    _not_owner(row, "demoted")
    clean = validate(MEMBER_UPDATE_FIELDS, await call.json(), call.env(),
                     existing={"role": row["role"]})
    if "role" in clean:
        await call.rt.db.write([("UPDATE team_members SET role = ? WHERE id = ?",
                                 (clean["role"], row["id"]))])
    return member_json(await _member(call, row["id"]))


@api("/team/members/{memberId}", "DELETE", role="ADMIN", response=DELETED)
async def remove_team_member(call: Call) -> dict[str, Any]:
    """Remove a member (or cancel an invitation); their keys stop working at once."""
    row = await _member(call, call.param("memberId"))
    _not_owner(row, "removed")
    statements: list[Statement] = [("DELETE FROM team_members WHERE id = ?", (row["id"],))]
    if row["account_id"]:
        statements.append(("UPDATE api_keys SET is_active = 0 WHERE account_id = ?",
                           (row["account_id"],)))
    await call.rt.db.write(statements)
    return {"success": True, "message": "Team member removed successfully"}


@api("/team/invitations", "GET", response=shape(invitations=[INVITATION_SHAPE]))
async def list_invitations(call: Call) -> dict[str, Any]:
    rows = await call.rt.db.fetchall(
        f"{_MEMBER_SELECT} WHERE m.team_id = ? AND m.status = 'PENDING'"
        f" ORDER BY m.invited_at, m.id", (call.team,))
    return {"invitations": [invitation_json(row) for row in rows]}


@api("/team/invitations/{token}/accept", "POST", public=True,
      response=lambda: shape(member=MEMBER_SHAPE, apiKey=shape(KEY_SHAPE, key="string")),
      status=(201,))
async def accept_invitation(call: Call) -> Response:
    """Join the team: the token is the credential, used once; the answer holds a first key."""
    stamp = now_ms()
    async with call.rt.db.transaction() as conn:
        invite = await (await conn.execute(
            "SELECT m.*, t.plan FROM team_members m JOIN accounts t ON t.id = m.team_id"
            " WHERE m.invitation_hash = ? AND m.status = 'PENDING'",
            (hash_key(call.param("token")),))).fetchone()
        if invite is None:
            raise NotFound("Invitation not found", "the token is unknown or was already used")
        if invite["expires_at"] <= stamp:
            raise Gone("Invitation expired",
                       f"it expired at {iso(invite['expires_at'])}; ask for a new invitation")
        if await _team_of(conn, invite["email"]) is not None:
            raise Conflict("This email already belongs to a team",
                           "a person belongs to exactly one team")
        account = await (await conn.execute("SELECT id FROM accounts WHERE email = ?",
                                            (invite["email"],))).fetchone()
        account_id = account[0] if account else await create_account(
            conn, invite["email"], invite["name"], invite["plan"], owns_team=False)
        await conn.execute(
            "UPDATE team_members SET account_id = ?, status = 'ACCEPTED', accepted_at = ?,"
            " invitation_hash = NULL WHERE id = ?", (account_id, stamp, invite["id"]))
        key_id, key = await create_api_key(conn, account_id, "first key",
                                           ",".join(role_permissions(invite["role"])))
    member = await call.rt.db.fetchrow(f"{_MEMBER_SELECT} WHERE m.id = ?", (invite["id"],))
    return JSONResponse({"member": member_json(member),
                         "apiKey": {**await _key(call.rt, key_id), "key": key}}, 201)


# Account
#
# ``/account`` is the calling person; ``plan`` and ``accountStatus`` are their team's, set only
# from the CLI.  ``/account/api-keys`` are the caller's own keys (ADMIN+ may list and revoke
# other members'); ``/account/usage`` is the team's request count per endpoint template.

LANGUAGES = tuple(
    "aa ab ae af ak am an ar as av ay az ba be bg bi bm bn bo br bs ca ce ch co cr cs cu cv cy "
    "da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht "
    "hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky "
    "la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny "
    "oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss "
    "st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo "
    "za zh zu".split())  # ISO 639-1


def valid_phone(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    """E.164: a plus, a non-zero digit, at most 15 digits in all."""
    if not re.fullmatch(r"\+[1-9]\d{1,14}", value):
        raise _Issue("Invalid phone number: expected E.164 such as +14155550123",
                     "invalid_string", validation="regex")
    return value


def valid_language(value: str, record: dict[str, Any], env: ValidationEnv) -> str:
    if value not in LANGUAGES:
        raise _Issue("Invalid language: expected an ISO 639-1 code such as 'en'")
    return value


def valid_sms(value: bool, record: dict[str, Any], env: ValidationEnv) -> bool:
    """SMS notifications need somewhere to go."""
    if value and not record.get("phoneNumber"):
        raise _Issue("smsNotificationsEnabled needs a phoneNumber")
    return value


def valid_read_only(value: Any, record: dict[str, Any], env: ValidationEnv) -> Any:
    """Read-only through the API: a value sent back unchanged passes, a change is refused."""
    name = env["path"][-1]
    if value != env["existing"][name]:
        raise _Issue(f"{name} cannot be changed through the API"
                     + (" (use the statusapp account CLI)" if name != "email" else ""))
    return value


ACCOUNT_FIELDS = (
    Field("name", "string", minimum=1, maximum=255, doc="Display name"),
    Field("image", "string", maximum=2048, check=valid_url, doc="Avatar URL (http or https)"),
    Field("phoneNumber", "string", check=valid_phone, doc="E.164 phone number"),
    Field("smsNotificationsEnabled", "boolean", True, check=valid_sms,
          doc="SMS notifications (needs phoneNumber)"),
    Field("language", "string", True, check=valid_language, doc="ISO 639-1 language code"),
    Field("timezone", "string", True, check=valid_timezone, doc="IANA time zone"),
)
_ACCOUNT_READ_ONLY = tuple(Field(name, "string", check=valid_read_only)
                           for name in ("email", "plan", "accountStatus"))


async def _account(call: Call) -> dict[str, Any]:
    """The calling person, with their team's plan and status, in the spec's field order."""
    assert call.who is not None
    row = await call.rt.db.fetchrow(
        "SELECT a.*, t.plan AS team_plan, t.account_status AS team_status FROM accounts a"
        " JOIN accounts t ON t.id = ? WHERE a.id = ?", (call.team, call.who.account_id))
    fields = {f.name: bool(row[f.column]) if f.kind == "boolean" else row[f.column]
              for f in ACCOUNT_FIELDS}
    return {"id": row["id"], "email": row["email"], "name": fields["name"],
            "image": fields["image"], "accountStatus": row["team_status"],
            "plan": row["team_plan"], "phoneNumber": fields["phoneNumber"],
            "smsNotificationsEnabled": fields["smsNotificationsEnabled"],
            "language": fields["language"], "timezone": fields["timezone"],
            "createdAt": iso(row["created_at"]), "role": call.who.role, "teamId": call.team}


ACCOUNT_SHAPE = shape(fields_shape(ACCOUNT_FIELDS), id="string", email="string",
                      accountStatus="string", plan="string", createdAt="date-time", role="string",
                      teamId="string")


@api("/account", "GET", response=ACCOUNT_SHAPE)
async def get_account(call: Call) -> dict[str, Any]:
    return await _account(call)


@api("/account", "PUT", body=ACCOUNT_FIELDS, response=ACCOUNT_SHAPE)
async def update_account(call: Call) -> dict[str, Any]:
    existing = await _account(call)
    clean = validate((*ACCOUNT_FIELDS, *_ACCOUNT_READ_ONLY), await call.json(),
                     call.env(existing=existing), existing=existing)
    columns = column_values(ACCOUNT_FIELDS, clean)
    if columns:
        await call.rt.db.write([update_statement("accounts", existing["id"], columns)])
    return await _account(call)


# API keys

KEY_FIELDS = (
    Field("name", "string", True, minimum=1, maximum=100, doc="A name for the key"),
    Field("permissions", "string", check=lambda v, r, e: _permission_list(v),
          doc="Comma-separated read, write, delete (default: the creating key's, within the role)"),
    Field("expiresAt", "string", check=lambda v, r, e: _future_ms(v),
          doc="ISO 8601 expiry; absent or null: the key never expires"),
)
KEY_QUERY = (Field("memberId", "string", doc="ADMIN+: list this team member's keys instead"),)


def _permission_list(value: str) -> str:
    perms = {p.strip() for p in value.split(",")}
    if not perms <= set(PERMISSIONS) or perms == {""}:
        raise _Issue(f"Invalid permissions: a comma-separated subset of {','.join(PERMISSIONS)}")
    return ",".join(p for p in PERMISSIONS if p in perms)


def _future_ms(value: str) -> int:
    when = _parse_time(value)
    if when is None:
        raise _Issue("Invalid datetime: expected ISO 8601", "invalid_string", validation="datetime")
    if when.timestamp() <= time.time():
        raise _Issue("expiresAt must be in the future")
    return int(when.timestamp() * 1000)


def key_json(row: sqlite3.Row, last_used: int | None = None) -> dict[str, Any]:
    """A key as the spec lists it; isActive is false once revoked or expired."""
    expired = row["expires_at"] is not None and row["expires_at"] <= now_ms()
    return {"id": row["id"], "name": row["name"], "prefix": row["prefix"],
            "permissions": row["permissions"],
            "lastUsedAt": iso(last_used or row["last_used_at"]),
            "expiresAt": iso(row["expires_at"]), "isActive": bool(row["is_active"]) and not expired,
            "createdAt": iso(row["created_at"])}


KEY_SHAPE: dict[str, Any] = shape(
    id="string", name="string", prefix="string", permissions="string", lastUsedAt="date-time?",
    expiresAt="date-time?", isActive="boolean", createdAt="date-time")


async def _key(rt: Runtime, key_id: str) -> dict[str, Any]:
    row = await rt.db.fetchrow("SELECT * FROM api_keys WHERE id = ?", (key_id,))
    return key_json(row, rt.usage.last_used(key_id))


@api("/account/api-keys", "GET", query=KEY_QUERY, response=shape(apiKeys=[KEY_SHAPE]))
async def list_api_keys(call: Call) -> dict[str, Any]:
    assert call.who is not None
    query = call.query
    account = call.who.account_id
    if query["memberId"]:
        member = await _member(call, query["memberId"])
        if member["account_id"] != account:
            call.who.require_role(Role.ADMIN)
        account = member["account_id"]
    rows = await call.rt.db.fetchall(
        "SELECT * FROM api_keys WHERE account_id = ? ORDER BY created_at DESC, id", (account,))
    return {"apiKeys": [key_json(row, call.rt.usage.last_used(row["id"])) for row in rows]}


CREATE_ACCOUNT_API_KEY_SHAPE = shape(KEY_SHAPE, key="string")


@api("/account/api-keys", "POST", body=KEY_FIELDS,
      response=CREATE_ACCOUNT_API_KEY_SHAPE, status=(201,))
async def create_account_api_key(call: Call) -> Response:
    """A key for the caller, shown once; never more than the role and the creating key allow."""
    assert call.who is not None
    clean = validate(KEY_FIELDS, await call.json(), call.env())
    allowed = [p for p in role_permissions(call.who.role) if p in call.who.permissions]
    wanted = clean["permissions"].split(",") if clean["permissions"] else allowed
    excess = [p for p in wanted if p not in allowed]
    if excess:
        holds = ",".join(p for p in PERMISSIONS if p in call.who.permissions)
        raise Forbidden(f"This key cannot grant {','.join(excess)}",
                        f"a {call.who.role} using a key with {holds} may grant at most "
                        f"{','.join(allowed)}")
    async with call.rt.db.transaction() as conn:
        key_id, key = await create_api_key(conn, call.who.account_id, clean["name"],
                                           ",".join(wanted), clean["expiresAt"])
    return JSONResponse({**await _key(call.rt, key_id), "key": key}, 201)


@api("/account/api-keys/{keyId}", "DELETE", response=DELETED)
async def revoke_account_api_key(call: Call) -> dict[str, Any]:
    """Revoke one's own key; ADMIN+ also a team member's (only the OWNER the owner's)."""
    assert call.who is not None
    row = await call.rt.db.fetchone(
        "SELECT k.id, k.account_id, m.role FROM api_keys k JOIN team_members m"
        " ON m.account_id = k.account_id AND m.status = 'ACCEPTED'"
        " WHERE k.id = ? AND m.team_id = ?", (call.param("keyId"), call.team))
    if row is None:
        raise NotFound("API key not found", f"no API key with id {call.param('keyId')}")
    if row["account_id"] != call.who.account_id:
        call.who.require_role(Role.ADMIN)
        call.who.require_role(row["role"])
    await call.rt.db.write([("UPDATE api_keys SET is_active = 0 WHERE id = ?", (row["id"],))])
    return {"success": True, "message": "API key revoked successfully"}


# Usage

USAGE_HOURS = {"1h": 1, "24h": 24, "7d": 7 * 24, "30d": 30 * 24}
USAGE_QUERY = (Field("period", "string", default="24h", choices=tuple(USAGE_HOURS),
                     doc="Clock hours counted, the current one included"),)


ACCOUNT_USAGE_SHAPE = shape(
    period="string", totalRequests="integer", requestsByEndpoint="object",
    rateLimit=shape(limit="integer", used="integer", remaining="integer"))


@api("/account/usage", "GET", query=USAGE_QUERY, limit=False, response=ACCOUNT_USAGE_SHAPE)
async def account_usage(call: Call) -> dict[str, Any]:
    """The team's requests per endpoint template and its rate-limit window (answered even
    while the team is over its limit)."""
    assert call.who is not None
    query = call.query
    since = now_ms() // 3_600_000 - USAGE_HOURS[query["period"]] + 1
    counts = await call.rt.usage.totals(call.rt.db, call.team, since)
    limit, used = PLANS[call.who.plan], call.rt.limiter.used(call.team)
    return {"period": query["period"], "totalRequests": sum(counts.values()),
            "requestsByEndpoint": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "rateLimit": {"limit": limit, "used": used, "remaining": max(0, limit - used)}}


# Server

HEALTH_SHAPE = shape(
    status="string", version="string", uptime="integer", checks="object", timestamp="date-time")


@api("/health", "GET", public=True, response=HEALTH_SHAPE, status=(200, 503), limit=False)
async def health(call: Call) -> Response:
    """Check the database for real (a read and a commit through the writer; unhealthy while
    the last real write failed, e.g. disk full) and report how far behind its plan the
    scheduler is; far behind makes the status degraded."""
    checks = {}
    try:
        await asyncio.wait_for(call.rt.db.fetchval("SELECT COUNT(*) FROM schema_version"), 2)
        await asyncio.wait_for(call.rt.db.write([]), 2)
        checks["database"] = "unhealthy" if call.rt.db.failing else "healthy"
    except Exception:  # whatever broke, the answer is the same: the database is not usable
        checks["database"] = "unhealthy"
    scheduler = call.rt.scheduler.stats() if call.rt.scheduler else None
    if scheduler is not None:
        checks["scheduler"] = "degraded" if Scheduler.far_behind(scheduler) else "healthy"
    status = "unhealthy" if "unhealthy" in checks.values() else (
        "degraded" if "degraded" in checks.values() else "healthy")
    body = {"status": status, "version": VERSION,
            "uptime": int(time.monotonic() - call.rt.started), "checks": checks,
            "timestamp": iso(now_ms())}
    if scheduler is not None:
        body["scheduler"] = scheduler
    return JSONResponse(body, 503 if status == "unhealthy" else 200)


def _schema(spec: Field, cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A Field as JSON Schema: its kind, choices, bounds, default and description."""
    out: dict[str, Any] = {"type": spec.kind}
    if spec.choices:
        out["enum"] = list(spec.choices)
    names = {"string": ("minLength", "maxLength"), "array": ("minItems", "maxItems")}
    for key, bound in zip(names.get(spec.kind, ("minimum", "maximum")),
                          (spec.minimum, spec.maximum)):
        if bound is not None:
            out[key] = _bound(bound, cfg)
    if spec.default is not None:
        out["default"] = spec.default
    if spec.read_only:
        out["readOnly"] = True
    doc = spec.doc
    if not isinstance(spec.required, bool):
        doc = f"{doc} (required for {', '.join(spec.required)})".strip()
    if doc:
        out["description"] = doc
    return out


_API_TAGS = {"health": "server", "openapi.json": "server", "worker-regions": "server",
             "heartbeat": "heartbeats"}


def _path_schema(name: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0} if name == "exitCode" else {"type": "string"}


def _responses(doc: RouteDoc) -> dict[str, Any]:
    """An operation's success statuses with their shape, then the errors it can answer."""
    schema = doc.response() if callable(doc.response) else doc.response
    content = {} if doc.method == "HEAD" else {
        "content": {"application/json": {"schema": schema}}}
    out: dict[str, Any] = {str(code): {"description": HTTPStatus(code).phrase, **content}
                           for code in doc.status}
    errors = [400, *((401, 403) if doc.role else ()), *((404,) if "{" in doc.path else ()),
              *((413,) if doc.body else ()), 429]
    out.update({str(code): {"$ref": "#/components/responses/Error"} for code in errors})
    out["default"] = {"$ref": "#/components/responses/Error"}
    return out


def _link_creations(paths: dict[str, dict[str, Any]]) -> None:
    """OpenAPI links from each creation (``POST /things`` answering 201) to the operations on
    what it created (``/things/{thingId}...``), whose id is the new resource's ``id``: clients
    and stateful fuzzers can follow them."""
    for path, item in paths.items():
        created = item.get("post", {}).get("responses", {}).get("201")
        if created is None or "{" in path:
            continue
        links: dict[str, Any] = {}
        for other, ops in paths.items():
            found = re.fullmatch(rf"{re.escape(path)}/{{(\w+)}}(/[\w-]+)?", other)
            if found:
                links.update({op["operationId"]: {
                    "operationId": op["operationId"],
                    "parameters": {found.group(1): "$response.body#/id"}} for op in ops.values()})
        created["links"] = links


def openapi_document(cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The OpenAPI 3.1 description of /api/v1, generated from the routes and the same Field
    tables that validate requests, so it cannot drift from what the server accepts."""
    paths: dict[str, dict[str, Any]] = {}
    for doc in API_DOCS:
        operation: dict[str, Any] = {
            "operationId": doc.operation_id,
            "summary": doc.summary,
            "tags": [_API_TAGS.get(doc.path.split("/")[1], doc.path.split("/")[1])],
            "parameters": [
                *({"name": name, "in": "path", "required": True, "schema": _path_schema(name)}
                  for name in re.findall(r"{(\w+)}", doc.path)),
                *({"name": f.name, "in": "query", "schema": _schema(f, cfg)} for f in doc.query)],
            "responses": _responses(doc)}
        if doc.body:
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"type": "object",
                           "properties": {f.name: _schema(f, cfg) for f in doc.body},
                           "required": [f.name for f in doc.body if f.required is True]}}}}
        if doc.role:  # agent routes take only a bearer agent token
            operation["security"] = [{"bearer": []}] if doc.role == "AGENT" else [
                {"apiKey": []}, {"bearer": []}]
            operation["x-statusapp-least-role"] = doc.role
        else:
            operation["security"] = []
        paths.setdefault(doc.path, {})[doc.method.lower()] = operation
    _link_creations(paths)
    error = {"type": "object", "required": ["error", "code"], "properties": {
        "error": {"description": "A message, or for validation errors the list of issues"},
        "code": {"type": "string"}, "details": {}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "StatusApp API", "version": VERSION},
        "servers": [{"url": cfg["server"]["base_url"] + API_PREFIX}],
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                                "bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "The spec's error shape", "content": {
                "application/json": {"schema": error}}}}},
    }


OPENAPI_SHAPE = shape(openapi="string", info="object", paths="object")


@api("/openapi.json", "GET", public=True, response=OPENAPI_SHAPE)
async def openapi(call: Call) -> dict[str, Any]:
    """This API's OpenAPI 3.1 document."""
    return openapi_document(call.rt.cfg)


@api("/server/version", "GET", public=True, response=shape(version="string", apiVersion="string"))
async def server_version(call: Call) -> dict[str, Any]:
    return {"version": VERSION, "apiVersion": API_VERSION}


def region_json(row: WorkerRegion) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"] or row["city"], "city": row["city"],
            "country": row["country"], "countryCode": row["country_code"],
            "latitude": row["latitude"], "longitude": row["longitude"],
            "isActive": bool(row["is_active"]), "isAgent": row["token_hash"] is not None,
            "lastSeenAt": iso(row["last_seen_at"])}


REGION_SHAPE = shape(id="string", name="string?", city="string?", country="string?",
                     countryCode="string?", latitude="number?", longitude="number?",
                     isActive="boolean", isAgent="boolean", lastSeenAt="date-time?")
WORKER_REGIONS_SHAPE = shape(regions=[REGION_SHAPE])


@api("/worker-regions", "GET", response=WORKER_REGIONS_SHAPE)
async def worker_regions(call: Call) -> dict[str, Any]:
    """Every worker region: the server's own and the agents', with liveness."""
    rows = await call.rt.db.fetchall("SELECT * FROM worker_regions ORDER BY id")
    return {"regions": [region_json(worker_region(r)) for r in rows]}


# Agents
#
# An agent (``statusapp agent``) probes for one region.  It authenticates with its region's
# token (``statusapp region add``), which is stored hashed and is no API key: agent routes
# take only agent tokens and the API only API keys.  It follows its monitors with a long-poll
# on a version (an epoch for this server process, then a change counter) and posts results
# in batches with ids the server remembers, so a batch sent twice is stored once.

AGENT_TOKEN_PREFIX = "sa_agent_"
_AGENT_WAIT_MAX = 30   # seconds a long-poll may wait for a change


def generate_agent_token() -> tuple[str, str]:
    """A new agent token and its SHA256."""
    token = AGENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, hash_key(token)


async def authenticate_agent(rt: Runtime, token: str | None) -> WorkerRegion:
    """The region whose agent holds ``token``, noting the contact; 401 otherwise."""
    if not token:
        raise Unauthorized("Missing agent token", "send Authorization: Bearer <agent token>")
    row = await rt.db.fetchone("SELECT * FROM worker_regions WHERE token_hash = ?",
                               (hash_key(token),))
    if row is None:
        raise Unauthorized("Invalid agent token",
                           "the token is unknown, rotated, or its region was removed")
    rt.db.write_later([("UPDATE worker_regions SET last_seen_at = ? WHERE id = ?",
                        (now_ms(), row["id"]))])
    return worker_region(row)


class AgentSync:
    """Monitor change versions that agents long-poll on."""

    def __init__(self, rt: Runtime) -> None:
        self.epoch = secrets.token_hex(4)
        self.version = 0
        self.changed: dict[str, int] = {}
        self.event = asyncio.Event()
        rt.listeners.append(self._note)

    def _note(self, monitor_id: str, kind: str | None) -> None:
        self.version += 1
        self.changed[monitor_id] = self.version
        self.event.set()
        self.event = asyncio.Event()

    def since(self, version: str | None) -> list[str] | None:
        """Monitors changed after ``version`` (None: the agent must take everything)."""
        epoch, _, number = (version or "").partition(".")
        if epoch != self.epoch or not number.isdigit() or int(number) > self.version:
            return None
        return [m for m, v in self.changed.items() if v > int(number)]

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), seconds)


AGENT_SYNC_QUERY = (
    Field("since", "string", maximum=64, doc="The version of the agent's last sync"),
    Field("wait", "integer", default=0, minimum=0, maximum=_AGENT_WAIT_MAX,
          doc="Seconds to wait for a change before answering"),
)


def _for_region(record: dict[str, Any], region: str) -> bool:
    regions = record.get("enabledWorkerRegionIds")
    return probe_of(record["type"]) is not None and (not regions or region in regions)


AGENT_MONITORS_SHAPE = shape(
    version="string", full="boolean", region=REGION_SHAPE,
    monitors=[shape(record="object", status="string", lastAt="integer?", lastStatus="string?",
                    lastDetails="object?")],
    removed=["string"], heartbeat="number", probes="object")


@api("/agent/monitors", "GET", agent=True, query=AGENT_SYNC_QUERY, response=AGENT_MONITORS_SHAPE)
async def agent_monitors(call: Call) -> dict[str, Any]:
    """The monitors this agent's region probes: all of them, or those changed since a version."""
    assert call.region is not None
    query, sync = call.query, call.rt.agent_sync
    changed = sync.since(query["since"])
    if changed == [] and query["wait"]:
        await sync.wait(query["wait"])
        changed = sync.since(query["since"])
    version = f"{sync.epoch}.{sync.version}"
    feed = LocalFeed(call.rt, call.region["id"])
    rows = [r for r in await feed.rows(changed) if _for_region(r["record"], feed.region)]
    probes = call.rt.cfg["probes"]
    return {"version": version, "full": changed is None, "region": region_json(call.region),
            "monitors": rows,
            "removed": sorted(set(changed or ()) - {r["record"]["id"] for r in rows}),
            "heartbeat": call.rt.cfg["agents"]["inactive_after"] / 4,
            "probes": {k: probes[k] for k in ("confirmations", "recoveries", "retry_delay")}}


AGENT_RESULT_FIELDS = (
    Field("monitorId", "string", True, minimum=1, maximum=100),
    Field("checkedAt", "integer", True, minimum=0, doc="When the check started (agent clock, ms)"),
    Field("status", "string", True, choices=(Status.UP, Status.DOWN, Status.DEGRADED)),
    Field("regionStatus", "string", True, choices=MONITOR_STATUSES,
          doc="The region's confirmed status after this check"),
    Field("reason", "string", maximum=10_000, doc="Why the region's status changed"),
    Field("responseTime", "integer", minimum=0),
    Field("statusCode", "integer", minimum=0, maximum=999),
    Field("error", "string", maximum=10_000),
    Field("category", "string", maximum=64),
    Field("timings", "object"),
    Field("details", "object"),
)
AGENT_BATCH_FIELDS = (
    Field("batchId", "string", True, minimum=8, maximum=100),
    Field("sentAt", "integer", True, minimum=0, doc="When the agent sent it (agent clock, ms)"),
    Field("results", "array", default=[], maximum=_AGENT_BATCH_MAX,
          check=each(AGENT_RESULT_FIELDS)),
)


def agent_check_time(checked_at: int, sent_at: int, received_at: int) -> int:
    """An agent's check time on the server's clock: the agent's own reading moved by the
    offset this batch shows (server receipt minus agent send time), never after receipt.  A
    skewed agent clock shifts both readings alike, so it neither misdates nor reorders."""
    return min(checked_at + received_at - sent_at, received_at)


async def ingest_batch(rt: Runtime, region: str, batch: dict[str, Any], received: int) -> int:
    """Store one batch once (its id is remembered in the same transaction); the count stored."""
    async with rt.agent_locks[region]:
        if await rt.db.fetchval("SELECT 1 FROM agent_batches WHERE region_id = ? AND"
                                " batch_id = ?", (region, batch["batchId"])):
            return 0
        ids = sorted({r["monitorId"] for r in batch["results"]})
        known = {row[0] for row in await rt.db.fetchall(
            f"SELECT id FROM monitors WHERE id {_IN_IDS}", (json.dumps(ids),))}
        statements: list[Statement] = [(
            "INSERT INTO agent_batches (region_id, batch_id, received_at) VALUES (?, ?, ?)",
            (region, batch["batchId"], received))] if batch["results"] else []
        stored = [r for r in batch["results"] if r["monitorId"] in known]
        for r in stored:
            result = CheckResult(r["status"], r["responseTime"], r["statusCode"], r["error"],
                                 r["category"], r["timings"], r["details"])
            at = agent_check_time(r["checkedAt"], batch["sentAt"], received)
            statements += rt.verdicts.statements(region, r["monitorId"], result, at,
                                                 r["regionStatus"], r["reason"], received,
                                                 r["checkedAt"])
        await rt.db.write(statements)
        return len(stored)


@api("/agent/results", "POST", agent=True, body=AGENT_BATCH_FIELDS,
     response=shape(batchId="string", stored="integer"))
async def agent_results(call: Call) -> dict[str, Any]:
    """Store a batch of this agent's check results, once per batch id."""
    assert call.region is not None
    received = now_ms()
    batch = validate(AGENT_BATCH_FIELDS, await call.json(8 * MAX_BODY), call.env())
    stored = await ingest_batch(call.rt, call.region["id"], batch, received)
    return {"batchId": batch["batchId"], "stored": stored}


# --- Metrics ---
#
# ``/metrics``: the team's monitors in the Prometheus text format.


def _prometheus_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exposition:
    """Prometheus text format (0.0.4): HELP and TYPE once per metric, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str,
               samples: Sequence[tuple[dict[str, Any], float | int | None]]) -> None:
        self.lines += [f"# HELP statusapp_{name} {help_text}", f"# TYPE statusapp_{name} {kind}"]
        for labels, value in samples:
            if value is None:
                continue
            text = ",".join(f'{k}="{_prometheus_label(v)}"' for k, v in labels.items())
            self.lines.append(f"statusapp_{name}{{{text}}} {value!r}" if text
                              else f"statusapp_{name} {value!r}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


async def render_metrics(rt: Runtime, team: str | None) -> str:
    """Per-monitor figures (the team's, or every monitor's for the metrics token) and
    process figures."""
    where, params = ("WHERE account_id = ?", (team,)) if team else ("", ())
    monitors = await rt.db.fetchall(f"SELECT * FROM monitors {where} ORDER BY id", params)
    ids = [m["id"] for m in monitors]
    # The newest check of each monitor, whatever its region.
    latest = {c["monitor_id"]: c for c in sorted(await latest_checks(rt.db, ids),
                                                 key=lambda c: c["id"])}
    now = now_ms()
    uptime = {window: await collect(rt.db, ids, _ceil_hour(now - span), now, ("monitor",))
              for window, span in (("24h", DAY_MS), ("30d", 30 * DAY_MS))}
    out = Exposition()
    labels = {m["id"]: {"id": m["id"], "name": m["name"], "type": m["type"]} for m in monitors}
    out.metric("monitor_status", "gauge", "1 for the monitor's current status, 0 for the others.",
               [({**labels[m["id"]], "status": s}, int(m["status"] == s))
                for m in monitors for s in MONITOR_STATUSES])
    out.metric("monitor_paused", "gauge", "1 when the monitor is paused.",
               [(labels[m["id"]], m["is_paused"]) for m in monitors])
    out.metric("monitor_response_time_seconds", "gauge", "Response time of the latest check.",
               [(labels[i], None if c["response_time"] is None else c["response_time"] / 1000)
                for i, c in latest.items()])
    ratios = []
    for window, counts in uptime.items():
        for monitor_id in ids:
            stats = WindowStats()
            stats.add(counts.get((monitor_id,), [0] * 5))
            ratio = None if not stats.total else (stats.up + stats.degraded) / stats.total
            ratios.append(({**labels[monitor_id], "window": window}, ratio))
    out.metric("monitor_uptime_ratio", "gauge", "(UP + DEGRADED checks) / all checks.", ratios)
    for kind, name, what in (("SSL_CERT", "certificate", "the certificate expires"),
                             ("DOMAIN", "domain", "the domain registration expires")):
        days = [(labels[i], json.loads(c["details"]).get("daysRemaining"))
                for i, c in latest.items() if labels[i]["type"] == kind and c["details"]]
        out.metric(f"{name}_days_remaining", "gauge", f"Days until {what}.", days)
    out.metric("monitor_checks_total", "counter", "Checks recorded for the monitor.",
               [(labels[m["id"]], m["check_count"]) for m in monitors])
    out.metric("write_queue_depth", "gauge", "Writes queued for the next group commit.",
               [({}, rt.db.queued)])
    out.metric("scheduler_lag_seconds", "gauge", "How late the scheduler runs due checks.",
               [({}, getattr(rt, "scheduler_lag", None))])
    out.metric("process_uptime_seconds", "gauge", "Seconds since the server started.",
               [({}, round(time.monotonic() - rt.started, 3))])
    return out.text()


async def metrics(request: Request) -> Response:
    """GET /metrics: an API key with read permission, or ``Bearer <server.metrics_token>``."""
    rt: Runtime = request.app.state.statusapp
    token = rt.cfg["server"]["metrics_token"]
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    team = None
    if not (token and scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode(), token.encode())):
        who = await authenticate(rt.db, request_key(request))
        if "read" not in who.permissions:
            raise Forbidden("This API key lacks the 'read' permission",
                            f"key permissions: {','.join(sorted(who.permissions))}")
        team = who.team_id
    return Response(await render_metrics(rt, team),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


METRICS_ROUTES = [Route("/metrics", metrics, methods=["GET"])]


# --- Pages ---
#
# The public face of a team: a server-rendered page (no JavaScript; nothing loaded from elsewhere
# but the owner's logo and favicon), its JSON and Atom companions and SVG badges.  Private pages,
# and monitors on no public page, are 404 to the public.

UPTIME_DAYS = 90
PAST_INCIDENT_DAYS = 14
FEED_ENTRIES = 50

# The overall banner, worst first: indicator -> (text, background with white text >= 4.5:1).
BANNERS = {"major_outage": ("Major outage", "#b91c1c"),
           "partial_outage": ("Partial outage", "#c2410c"),
           "degraded": ("Degraded performance", "#b45309"),
           "operational": ("All systems operational", "#15803d")}

# A monitor's current state as text and a colour class (PAUSED: paused or inactive).
MONITOR_STATES = {"UP": ("Operational", "up"), "DEGRADED": ("Degraded performance", "degraded"),
                  "DOWN": ("Outage", "down"), "PENDING": ("No data yet", "none"),
                  "PAUSED": ("Paused", "none"), "MAINTENANCE": ("Under maintenance", "none")}

# A day's bar cell by its uptime: (lowest uptime %, class, colour, label); colours are >= 3:1
# against white.  Days without checks are NO_DATA.
DAY_LEVELS = ((100.0, "ok", "#16a34a", "no downtime"),
              (99.0, "minor", "#a16207", "minor downtime"),
              (95.0, "partial", "#ea580c", "partial outage"),
              (0.0, "major", "#dc2626", "major outage"))
NO_DATA = ("none", "#cbd5e1", "no data")


def monitor_state(monitor: dict[str, Any]) -> str:
    return "PAUSED" if monitor["paused"] else monitor["status"]


def overall_status(monitors: Sequence[dict[str, Any]]) -> str:
    """The banner's indicator.  Only reporting monitors (not paused, PENDING or in maintenance)
    count: more
    than half DOWN is a major outage, any DOWN a partial outage, any DEGRADED degraded."""
    states = [monitor_state(m) for m in monitors
              if monitor_state(m) not in ("PAUSED", "PENDING", "MAINTENANCE")]
    down = states.count("DOWN")
    if down and down * 2 > len(states):
        return "major_outage"
    if down:
        return "partial_outage"
    return "degraded" if "DEGRADED" in states else "operational"


_LEVELS = tuple((level[0], level[1:]) for level in DAY_LEVELS)


def day_level(uptime: float | None) -> tuple[str, str, str]:
    """A day's (class, colour, label) by its uptime %."""
    if uptime is None:
        return NO_DATA
    for low, level in _LEVELS:
        if uptime >= low:
            return level
    return _LEVELS[-1][1]


def _days_uptime(days: Sequence[dict[str, Any]]) -> float | None:
    up = total = 0
    for day in days:
        up += day["up"] + day["degraded"]
        total += day["total"]
    return uptime_percent(up, total)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _duration(ms: int) -> str:
    minutes = max(ms // 60_000, 1)
    days, hours, minutes = minutes // 1440, minutes // 60 % 24, minutes % 60
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else "",
             f"{minutes} min" if minutes and not days else ""]
    return " ".join(p for p in parts if p)


async def _public_page(rt: Runtime, column: str, value: str) -> sqlite3.Row:
    """A public page by slug or custom_domain; private and unknown pages are both 404."""
    row = await rt.db.fetchone(f"SELECT * FROM status_pages WHERE {column} = ? AND is_public = 1",
                               (value,))
    if row is None:
        raise NotFound("Status page not found", "no such public status page")
    return row


class PageIncidentUpdate(TypedDict):
    status: str
    message: str
    createdAt: int


class PageIncident(TypedDict):
    """An incident as a status page, its JSON and its feed show it (times in Unix ms)."""

    id: str
    incidentNumber: str
    monitorId: str
    monitorName: str
    severity: str
    startedAt: int
    resolvedAt: int | None
    rootCauseCategory: str | None
    updates: list[PageIncidentUpdate]


class PageMaintenance(TypedDict):
    """A maintenance window's next occurrence as a page shows it (times in Unix ms)."""

    id: str
    title: str
    description: str | None
    startsAt: int
    endsAt: int
    state: str  # "in_progress" or "scheduled"
    updatedAt: int


class PageView(TypedDict):
    """Everything a public page and its JSON show, read once by ``page_view``."""

    page: sqlite3.Row
    groups: list[dict[str, Any]]
    status: str
    maintenance: list[PageMaintenance]
    active: list[PageIncident]
    past: list[PageIncident]


async def page_incidents(db: Database, monitor_ids: Sequence[str], condition: str,
                         params: Sequence[Any], limit: int = -1) -> list[PageIncident]:
    """The monitors' incidents matching ``condition``, newest first, each with its updates."""
    if not monitor_ids:
        return []
    marks = ",".join("?" * len(monitor_ids))
    rows = await db.fetchall(
        f"SELECT i.*, m.name AS monitor_name FROM incidents i JOIN monitors m"
        f" ON m.id = i.monitor_id WHERE i.monitor_id IN ({marks}) AND ({condition})"
        f" ORDER BY i.started_at DESC, i.id LIMIT ?", [*monitor_ids, *params, limit])
    updates: dict[str, list[PageIncidentUpdate]] = collections.defaultdict(list)
    ids = [row["id"] for row in rows]
    for update in await db.fetchall(
            f"SELECT * FROM incident_updates WHERE incident_id IN ({','.join('?' * len(ids))})"
            f" ORDER BY created_at DESC, id", ids):
        updates[update["incident_id"]].append({"status": update["status"],
                                               "message": update["message"],
                                               "createdAt": update["created_at"]})
    return [{"id": row["id"], "incidentNumber": f"INC-{row['year']}-{row['number']:04d}",
             "monitorId": row["monitor_id"], "monitorName": row["monitor_name"],
             "severity": row["severity"], "startedAt": row["started_at"],
             "resolvedAt": row["resolved_at"], "rootCauseCategory": row["root_cause_category"],
             "updates": updates[row["id"]]} for row in rows]


def page_maintenance(rt: Runtime, account_id: str, monitor_ids: Sequence[str]
                     ) -> list[PageMaintenance]:
    """The maintenance windows covering any of ``monitor_ids`` that run now or start within
    MAINTENANCE_LOOKAHEAD_DAYS (their next occurrence), soonest first."""
    now, out = rt.maintenance.clock(), list[PageMaintenance]()
    for window in rt.maintenance.windows.values():
        if not any(window.covers(account_id, m) for m in monitor_ids):
            continue
        for start, end in window.occurrences(now, now + MAINTENANCE_LOOKAHEAD_DAYS * DAY_MS)[:1]:
            out.append({"id": window.id, "title": window.title,
                        "description": window.description, "startsAt": start, "endsAt": end,
                        "state": "in_progress" if start <= now else "scheduled",
                        "updatedAt": window.updated_at})
    return sorted(out, key=lambda w: (w["startsAt"], w["id"]))


async def page_view(rt: Runtime, page: sqlite3.Row) -> PageView:
    """Everything the page and its JSON show, read once: groups with 90-day days, incidents,
    maintenance."""
    groups = await page_groups(rt.db, page["id"])
    monitors = {m["id"]: m for g in groups for m in g["monitors"]}
    for monitor in monitors.values():
        if rt.maintenance.active(page["account_id"], monitor["id"]):
            monitor["status"] = MAINTENANCE
    stats = await daily_stats(rt.db, list(monitors), UPTIME_DAYS, rt.settled_days)
    regions = await region_verdicts(rt.db, list(monitors))
    for monitor in (m for g in groups for m in g["monitors"]):
        days = stats[monitor["id"]]
        monitor["days"] = days
        monitor["uptime"] = _days_uptime(days)
        monitor["regions"] = regions.get(monitor["id"], [])
    incidents = await page_incidents(rt.db, list(monitors),
                                     "i.resolved_at IS NULL OR i.resolved_at >= ?",
                                     [now_ms() - PAST_INCIDENT_DAYS * DAY_MS])
    return {"page": page, "groups": groups, "status": overall_status(list(monitors.values())),
            "maintenance": page_maintenance(rt, page["account_id"], list(monitors)),
            "active": [i for i in incidents if i["resolvedAt"] is None],
            "past": [i for i in incidents if i["resolvedAt"] is not None]}


async def region_verdicts(db: Database, monitor_ids: Sequence[str]
                         ) -> dict[str, list[dict[str, str]]]:
    """Each monitor's status in each active region, by region name (no address or error)."""
    out: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    for row in await db.fetchall(
            "SELECT r.monitor_id, COALESCE(w.name, w.city) AS name, r.status"
            " FROM monitor_regions r JOIN worker_regions w ON w.id = r.region_id"
            f" WHERE w.is_active = 1 AND r.monitor_id {_IN_IDS}"
            " ORDER BY name", (json.dumps(list(monitor_ids)),)):
        out[row["monitor_id"]].append({"region": row["name"], "status": row["status"]})
    return out


def _page_base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _maintenance_json(window: PageMaintenance) -> dict[str, Any]:
    return {**window, "startsAt": iso(window["startsAt"]), "endsAt": iso(window["endsAt"]),
            "updatedAt": iso(window["updatedAt"])}


def _incident_json(incident: PageIncident) -> dict[str, Any]:
    return {**incident, "status": "open" if incident["resolvedAt"] is None else "resolved",
            "startedAt": iso(incident["startedAt"]), "resolvedAt": iso(incident["resolvedAt"]),
            "updates": [{**u, "createdAt": iso(u["createdAt"])} for u in incident["updates"]]}


# Colours of the page: the brand colour with black or white text, whichever contrasts more.

def _luminance(colour: str) -> float:
    digits = colour[1:] if len(colour) == 7 else "".join(c * 2 for c in colour[1:])
    channels = [int(digits[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    r, g, b = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """The WCAG contrast ratio of two hex colours."""
    light, dark = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


DEFAULT_BRAND = "#1d4ed8"
_PAGE_CSS = """
*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:#111827;background:#f3f4f6}
.wrap{max-width:56rem;margin:0 auto;padding:0 1rem}
.skip,.sr{position:absolute;left:-999rem}.skip:focus{left:1rem;top:1rem;background:#fff;padding:.5rem}
header.top{background:var(--brand);color:var(--on-brand);padding:1.5rem 0}
header.top .wrap{display:flex;align-items:center;gap:1rem;flex-wrap:wrap}
header.top img{height:2.5rem;width:auto;max-width:12rem}
h1{margin:0;font-size:1.5rem;line-height:1.2;overflow-wrap:anywhere}
header.top p{margin:.25rem 0 0}
main.wrap{display:block;padding-top:1.5rem;padding-bottom:1rem}
h2{font-size:1.25rem;margin:1.5rem 0 .75rem}
.banner{border-radius:.5rem;padding:1rem 1.25rem;color:#fff;font-weight:600;font-size:1.125rem;
margin:0}
.card{background:#fff;border:1px solid #d1d5db;border-radius:.5rem;margin:0 0 1rem}
.card h3{margin:0;padding:.75rem 1rem;border-bottom:1px solid #e5e7eb;font-size:1rem;
overflow-wrap:anywhere}
.monitors{list-style:none;margin:0;padding:0}
.monitors li{padding:.75rem 1rem}
.monitors li+li{border-top:1px solid #e5e7eb}
.mrow{display:flex;justify-content:space-between;gap:.5rem;flex-wrap:wrap;align-items:baseline}
.mname{font-weight:600;overflow-wrap:anywhere}
.state{font-size:.875rem;font-weight:600;white-space:nowrap}
.dot{display:inline-block;width:.625rem;height:.625rem;border-radius:50%;margin-right:.375rem;
background:currentColor}
.s-up{color:#15803d}.s-degraded{color:#a16207}.s-down{color:#b91c1c}.s-none{color:#4b5563}
svg.bars{display:block;width:100%;height:2.125rem;margin:.5rem 0 .25rem}
svg.bars path:hover{opacity:.7}
.axis{display:flex;justify-content:space-between;gap:.5rem;font-size:.75rem;color:#4b5563}
.axis strong{color:#111827}
.regions{font-size:.75rem;color:#4b5563;margin:.25rem 0}
.legend{display:flex;flex-wrap:wrap;gap:.25rem 1rem;font-size:.875rem;list-style:none;
padding:0;margin:0 0 .75rem;color:#374151}
.sw{display:inline-block;width:.75rem;height:.75rem;border-radius:2px;margin-right:.375rem;
vertical-align:-.0625rem}
.incident{padding:1rem;border-left:.375rem solid #b91c1c}
.incident.resolved{border-left-color:#15803d}
.incident h3{padding:0;border:0;margin:0 0 .25rem}
.meta{margin:0 0 .5rem;font-size:.875rem;color:#4b5563}
.updates{list-style:none;margin:0;padding:0}
.updates li{padding:.375rem 0;border-top:1px solid #e5e7eb;overflow-wrap:anywhere}
time{color:#4b5563;font-size:.875rem;white-space:nowrap}
.empty{color:#4b5563;margin:0 0 1rem}
footer{padding:1rem 1rem 2rem;color:#4b5563;font-size:.875rem;text-align:center}
footer p{margin:.25rem 0}
a{color:var(--link)}
@media (max-width:30rem){h1{font-size:1.25rem}.banner{font-size:1rem}h2{font-size:1.125rem}}
"""
_BAR_CSS = "".join(f".d-{level}{{fill:{colour}}}" for level, colour, _ in
                   (*(level[1:] for level in DAY_LEVELS), NO_DATA))
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline';"
                " img-src http: https: data:; base-uri 'none'; form-action 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache"}


def _day_text(days: Sequence[dict[str, Any]]) -> str:
    """The hover text of a day, or of a run of days at one level: its uptime (the level is the
    cell's colour, named in the legend); a run of days without downtime or without data says
    just that."""
    span = days[0]["day"] if len(days) == 1 else f"{days[0]['day']} to {days[-1]['day']}"
    uptime = _days_uptime(days)
    level, _, label = day_level(uptime)
    if uptime is None or (level == "ok" and len(days) > 1):
        return f"{span}: {label}"
    return f"{span}: {uptime:.2f}% uptime"


def _day_runs(days: Sequence[dict[str, Any]]) -> list[tuple[int, int, str, str]]:
    """The bar's cells as ``(first index, day count, level, hover text)``: one per run of days
    at the same level (with downtime: the run's uptime and failed checks in all)."""
    runs: list[tuple[int, int, str, str]] = []
    first = 0
    for level, run in itertools.groupby(days, key=lambda day: day_level(day["uptime"])[0]):
        members = list(run)
        runs.append((first, len(members), level, _day_text(members)))
        first += len(members)
    return runs


def _bars(monitor: dict[str, Any]) -> str:
    """The 90-day bar as one small SVG: a cell per run of days at the same level, each with
    its hover text, the cells of a level in one group that gives their colour (50 monitors
    that had downtime every other day: under 100 KB)."""
    days = monitor["days"]
    levels: dict[str, list[str]] = {}
    for first, count, level, text in _day_runs(days):
        width = count * 10 - 2
        levels.setdefault(level, []).append(  # our own text
            f'<path d="M{first * 10} 0h{width}v34h-{width}"><title>{text}</title></path>')
    cells = "".join(f'<g class="d-{level}">{"".join(rects)}</g>'
                    for level, rects in levels.items())
    summary = (f"{len(days)}-day uptime bar of {monitor['name']}: " +
               ("no data" if monitor["uptime"] is None else f"{monitor['uptime']:.2f}%"))
    return (f'<svg class="bars" viewBox="0 0 {len(days) * 10 - 2} 34" preserveAspectRatio="none"'
            f' role="img" aria-label="{_esc(summary)}">{cells}</svg>')


def _monitor_html(monitor: dict[str, Any]) -> str:
    label, level = MONITOR_STATES[monitor_state(monitor)]
    uptime = "No data" if monitor["uptime"] is None else f"{monitor['uptime']:.2f}% uptime"
    return (f'<li><div class="mrow"><span class="mname">{_esc(monitor["name"])}</span>'
            f'<span class="state s-{level}"><span class="dot" aria-hidden="true"></span>{label}'
            f'</span></div>{_regions_html(monitor)}{_bars(monitor)}<div class="axis"><span>'
            f'{UPTIME_DAYS} days ago</span><strong>{uptime}</strong><span>Today</span></div></li>')


def _regions_html(monitor: dict[str, Any]) -> str:
    """Per-region status under a monitor probed from more than one region."""
    if len(monitor["regions"]) < 2:
        return ""
    parts = [f'{_esc(r["region"])}: {_esc(MONITOR_STATES[r["status"]][0])}'
             for r in monitor["regions"]]
    return f'<div class="regions">{" &middot; ".join(parts)}</div>'


def _incident_html(incident: PageIncident) -> str:
    now = now_ms()
    started, resolved = incident["startedAt"], incident["resolvedAt"]
    meta = [f"{_esc(str(incident['severity']).capitalize())} severity",
            f"Started {_when(started)}",
            f"Resolved {_when(resolved)} after {_duration(resolved - started)}" if resolved
            else f"Ongoing for {_duration(now - started)}"]
    if incident["rootCauseCategory"]:
        meta.append(f"Cause: {_esc(_cause(incident['rootCauseCategory']))}")
    updates = "".join(
        f'<li><strong>{_esc(str(u["status"]).capitalize())}</strong> &ndash; {_esc(u["message"])}'
        f' <time datetime="{iso(u["createdAt"])}">{_when(u["createdAt"])}</time></li>'
        for u in incident["updates"])
    state = "resolved" if resolved else "open"
    return (f'<article class="card incident {state}"><h3>{_esc(incident["incidentNumber"])}: '
            f'{_esc(incident["monitorName"])} ({state})</h3><p class="meta">'
            f'{" &middot; ".join(meta)}</p>' +
            (f'<ol class="updates">{updates}</ol>' if updates else "") + "</article>")


def _maintenance_html(window: PageMaintenance) -> str:
    state = "In progress" if window["state"] == "in_progress" else "Scheduled"
    description = f'<p>{_esc(window["description"])}</p>' if window["description"] else ""
    return (f'<article class="card maintenance"><h3>{_esc(window["title"])} ({state.lower()})'
            f'</h3><p class="meta">{state}: {_when(window["startsAt"])} to '
            f'{_when(window["endsAt"])}</p>{description}</article>')


def render_page(view: PageView) -> str:
    """The public status page as one HTML document (inline CSS, no scripts)."""
    page = view["page"]
    brand = page["brand_color"] or DEFAULT_BRAND
    on_brand = max(("#ffffff", "#111827"), key=lambda c: contrast(brand, c))
    link = brand if contrast(brand, "#ffffff") >= 4.5 else DEFAULT_BRAND
    name, slug = _esc(page["name"]), page["slug"]
    banner_text, banner_colour = BANNERS[view["status"]]
    favicon = (f'<link rel="icon" href="{_esc(page["favicon_url"])}">' if page["favicon_url"]
               else "")
    logo = (f'<img src="{_esc(page["logo_url"])}" alt="{name} logo">' if page["logo_url"]
            else "")
    description = f'<p>{_esc(page["description"])}</p>' if page["description"] else ""
    groups = "".join(
        f'<section class="card" aria-label="{_esc(g["name"])}"><h3>{_esc(g["name"])}</h3>'
        f'<ul class="monitors">{"".join(_monitor_html(m) for m in g["monitors"])}</ul></section>'
        for g in view["groups"]) or '<p class="empty">No monitors on this page yet.</p>'
    ranges = ("100%", *(f"&ge; {low:g}%" for low, *_ in DAY_LEVELS[1:-1]),
              f"&lt; {DAY_LEVELS[-2][0]:g}%", "No data")
    legend = "".join(f'<li><span class="sw" style="background:{colour}" aria-hidden="true">'
                     f'</span>{text}</li>' for text, colour in zip(
                         ranges, [*(level[2] for level in DAY_LEVELS), NO_DATA[1]]))
    active = "".join(_incident_html(i) for i in view["active"])
    past = ("".join(_incident_html(i) for i in view["past"])
            or f'<p class="empty">No incidents in the last {PAST_INCIDENT_DAYS} days.</p>')
    active_section = (f'<section aria-labelledby="active-h"><h2 id="active-h">Active incidents'
                      f'</h2>{active}</section>' if active else "")
    maintenance = "".join(_maintenance_html(w) for w in view["maintenance"])
    if maintenance:
        active_section += (f'<section aria-labelledby="maint-h"><h2 id="maint-h">Scheduled'
                           f' maintenance</h2>{maintenance}</section>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{name} status</title>{favicon}
<meta name="description" content="{_esc(page["description"] or f"Status of {page['name']}")}">
<link rel="alternate" type="application/atom+xml" title="{name} incidents"
 href="/status/{slug}/feed.atom">
<style>:root{{--brand:{brand};--on-brand:{on_brand};--link:{link}}}{_PAGE_CSS}{_BAR_CSS}</style>
</head><body><a class="skip" href="#main">Skip to content</a>
<header class="top"><div class="wrap">{logo}<div><h1>{name}</h1>{description}</div></div></header>
<main id="main" class="wrap">
<section aria-label="Overall status">
<p class="banner" style="background:{banner_colour}">{banner_text}</p></section>
{active_section}
<section aria-labelledby="status-h"><h2 id="status-h">Current status</h2>
<ul class="legend" aria-label="Bar colours by daily uptime">{legend}</ul>{groups}</section>
<section aria-labelledby="past-h">
<h2 id="past-h">Past incidents (last {PAST_INCIDENT_DAYS} days)</h2>{past}</section>
</main>
<footer><p>Updated {_when(now_ms())}. Hover a day for its uptime; days are UTC.</p>
<p><a href="/status/{slug}.json">JSON</a> &middot; <a href="/status/{slug}/feed.atom">Atom feed</a>
&middot; Powered by StatusApp</p></footer>
</body></html>"""


_NOT_FOUND_HTML = ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
                   '<meta name="viewport" content="width=device-width, initial-scale=1">'
                   '<title>Not found</title></head>'
                   '<body><main><h1>Status page not found</h1><p>There is no public status page'
                   ' at this address.</p></main></body></html>')


# Public responses are rendered once and then served from memory until the data behind them
# changes (any API write or status change calls ``invalidate``) or PUBLIC_CACHE_SECONDS pass
# (new checks only move the uptime figures), with an ETag for 304s and gzip when accepted.
# Concurrent first requests for one address wait for a single render.
PUBLIC_CACHE_SECONDS = 30.0
PUBLIC_CACHE_ENTRIES = 1000
_GZIP_MIN_BYTES = 1024


@dataclass
class CachedResponse:
    """One rendered public response, with its gzip form made on first demand."""

    status: int
    body: bytes
    headers: dict[str, str]
    born: float
    generation: int
    gzipped: bytes | None = None

    @functools.cached_property
    def etag(self) -> str:
        return f'"{hashlib.sha256(self.body).hexdigest()[:20]}"'

    def gzip_body(self) -> bytes:
        if self.gzipped is None:
            self.gzipped = gzip.compress(self.body, 6)
        return self.gzipped


class PublicCache:
    """Rendered responses by key (a public page's full URL; a monitor list's query and data
    version), valid for one data generation and a TTL."""

    def __init__(self, entries: int = PUBLIC_CACHE_ENTRIES,
                 seconds: float = PUBLIC_CACHE_SECONDS) -> None:
        self.entries, self.seconds = entries, seconds
        self.generation = 0
        self.renders = 0
        self._entries: dict[str, CachedResponse] = {}
        self._flights = SingleFlight()

    def invalidate(self) -> None:
        """The data changed: every entry is stale from now on."""
        self.generation += 1

    def _fresh(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry and entry.generation == self.generation and (
                time.monotonic() - entry.born < self.seconds):
            return entry
        return None

    async def get(self, key: str, render: Callable[[], Awaitable[Response]]) -> CachedResponse:
        """The fresh entry for ``key``, rendering it once however many requests wait for it."""
        entry = self._fresh(key)
        if entry is not None:
            return entry
        return await self._flights.run(key, lambda: self._render(key, render))

    async def _render(self, key: str, render: Callable[[], Awaitable[Response]]
                      ) -> CachedResponse:
        generation = self.generation
        response = await render()
        self.renders += 1
        body = bytes(response.body)
        headers = {k: v for k, v in response.headers.items() if k != "content-length"}
        entry = CachedResponse(response.status_code, body, headers, time.monotonic(), generation)
        if entry.status == 200:
            self._entries.pop(key, None)
            self._entries[key] = entry
            if len(self._entries) > self.entries:
                del self._entries[next(iter(self._entries))]
        return entry


def _cached_answer(request: Request, entry: CachedResponse) -> Response:
    """A cached response as this client gets it: 304 for its ETag, gzip if it accepts it."""
    headers = {**entry.headers, "ETag": entry.etag, "Vary": "Accept-Encoding"}
    if entry.status == 200 and entry.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers={k: v for k, v in headers.items()
                                                  if k != "content-type"})
    body = entry.body
    if len(body) >= _GZIP_MIN_BYTES and "gzip" in request.headers.get("accept-encoding", ""):
        body, headers["Content-Encoding"] = entry.gzip_body(), "gzip"
    return Response(body, entry.status, headers)


def cached_public(handler: Callable[[Request], Awaitable[Response]]
                  ) -> Callable[[Request], Awaitable[Response]]:
    """Serve a public route from the runtime's PublicCache."""
    @functools.wraps(handler)
    async def serve(request: Request) -> Response:
        rt: Runtime = request.app.state.statusapp
        entry = await rt.public_cache.get(str(request.url), lambda: handler(request))
        return _cached_answer(request, entry)
    return serve


def _html_response(text: str, status: int) -> Response:
    return Response(text, status, PAGE_HEADERS, "text/html; charset=utf-8")


async def _html_page(request: Request, column: str, value: str) -> Response:
    rt: Runtime = request.app.state.statusapp
    try:
        page = await _public_page(rt, column, value)
    except NotFound:
        return _html_response(_NOT_FOUND_HTML, 404)
    return _html_response(render_page(await page_view(rt, page)), 200)


async def page_by_slug(request: Request) -> Response:
    return await _html_page(request, "slug", request.path_params["slug"])


def _host(request: Request) -> str:
    """The Host header without port, trailing dot or case."""
    host = request.headers.get("host", "").lower()
    host = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
    return host.rstrip(".")


async def page_by_domain(request: Request) -> Response:
    """``/`` on a page's customDomain (the Host header, port and trailing dot ignored)."""
    return await _html_page(request, "custom_domain", _host(request))


async def root(request: Request) -> Response:
    """``/``: a host that is a status page's customDomain gets that page (from the public
    cache); any other host, the dashboard (never cached: it is a person's view)."""
    rt: Runtime = request.app.state.statusapp
    if await rt.db.fetchval("SELECT 1 FROM status_pages WHERE custom_domain = ?",
                            (_host(request),)) is None:
        return await DASHBOARD_PAGES["/"](request)
    return await _page_by_domain_cached(request)


async def page_summary(request: Request) -> Response:
    """``/status/{slug}.json``: the page, overall status, monitors and incidents."""
    rt: Runtime = request.app.state.statusapp
    view = await page_view(rt, await _public_page(rt, "slug", request.path_params["slug"]))
    page = view["page"]
    indicator = view["status"]
    return JSONResponse({
        "page": {"id": page["id"], "name": page["name"], "slug": page["slug"],
                 "description": page["description"], "brandColor": page["brand_color"],
                 "logoUrl": page["logo_url"], "faviconUrl": page["favicon_url"],
                 "url": f"{_page_base(request)}/status/{page['slug']}"},
        "status": {"indicator": indicator, "description": BANNERS[indicator][0]},
        "groups": [{"name": g["name"], "monitors": [
            {"id": m["id"], "name": m["name"], "status": monitor_state(m),
             "uptime90d": m["uptime"], "regions": m["regions"]}
            for m in g["monitors"]]} for g in view["groups"]],
        "maintenance": [_maintenance_json(w) for w in view["maintenance"]],
        "activeIncidents": [_incident_json(i) for i in view["active"]],
        "recentIncidents": [_incident_json(i) for i in view["past"]],
        "updatedAt": iso(now_ms())})


def _maintenance_entry(window: PageMaintenance, url: str) -> str:
    """A maintenance window's occurrence as an Atom entry (scheduled, or in progress)."""
    state = "in progress" if window["state"] == "in_progress" else "scheduled"
    lines = [f"Maintenance {state}: {_when(window['startsAt'])} to {_when(window['endsAt'])}.",
             *([window["description"]] if window["description"] else [])]
    return (f"<entry><id>urn:statusapp:maintenance:{_esc(window['id'])}:{window['startsAt']}"
            f"</id><title>Maintenance: {_esc(window['title'])} ({state})</title>"
            f"<updated>{iso(window['updatedAt'])}</updated>"
            f'<link rel="alternate" href="{_esc(url)}"/>'
            f'<content type="text">{_esc(chr(10).join(lines))}</content></entry>')


async def page_feed(request: Request) -> Response:
    """``/status/{slug}/feed.atom``: the newest incidents of the page's monitors, and its
    scheduled and running maintenance windows, as Atom."""
    rt: Runtime = request.app.state.statusapp
    page = await _public_page(rt, "slug", request.path_params["slug"])
    monitor_ids = list(dict.fromkeys(m["id"] for g in await page_groups(rt.db, page["id"])
                                     for m in g["monitors"]))
    incidents = await page_incidents(rt.db, monitor_ids, "1", [], FEED_ENTRIES)
    url = f"{_page_base(request)}/status/{page['slug']}"
    windows = page_maintenance(rt, page["account_id"], monitor_ids)
    entries = [_maintenance_entry(window, url) for window in windows]
    for incident in incidents:
        times = [incident["startedAt"], incident["resolvedAt"] or 0,
                 *(u["createdAt"] for u in incident["updates"])]
        state = "resolved" if incident["resolvedAt"] else "open"
        lines = [f"{incident['monitorName']}: {incident['severity']} severity, {state}.",
                 f"Started {_when(incident['startedAt'])}."]
        if incident["resolvedAt"]:
            lines.append(f"Resolved {_when(incident['resolvedAt'])}.")
        lines += [f"{_when(u['createdAt'])} {u['status']}: {u['message']}"
                  for u in reversed(incident["updates"])]
        entries.append(
            f"<entry><id>urn:statusapp:incident:{_esc(incident['id'])}</id>"
            f"<title>{_esc(incident['incidentNumber'])}: {_esc(incident['monitorName'])} ({state})"
            f"</title><updated>{iso(max(times))}</updated>"
            f"<published>{iso(incident['startedAt'])}</published>"
            f'<link rel="alternate" href="{_esc(url)}"/>'
            f'<content type="text">{_esc(chr(10).join(lines))}</content></entry>')
    updated = max([page["updated_at"], *(w["updatedAt"] for w in windows),
                   *(i["startedAt"] for i in incidents),
                   *(i["resolvedAt"] or 0 for i in incidents),
                   *(u["createdAt"] for i in incidents for u in i["updates"])])
    body = (f'<?xml version="1.0" encoding="utf-8"?>\n'
            f'<feed xmlns="http://www.w3.org/2005/Atom">'
            f"<id>urn:statusapp:status-page:{_esc(page['id'])}</id>"
            f"<title>{_esc(page['name'])} incidents</title><updated>{iso(updated)}</updated>"
            f"<author><name>{_esc(page['name'])}</name></author>"
            f'<link rel="alternate" type="text/html" href="{_esc(url)}"/>'
            f'<link rel="self" href="{_esc(url)}/feed.atom"/>{"".join(entries)}</feed>')
    return Response(body, 200, media_type="application/atom+xml; charset=utf-8")


# Badges, in shields.io's flat style.  Text widths approximate Verdana 11px.

BADGE_QUERY = (Field("period", "string", default="30d", choices=("1h", "24h", "7d", "30d", "90d")),)
_BADGE_HOURS = {"1h": 1, "24h": 24}
BADGE_STATES = {"UP": ("up", "#4c1"), "DEGRADED": ("degraded", "#dfb317"),
                "DOWN": ("down", "#e05d44"), "PENDING": ("pending", "#9f9f9f"),
                "PAUSED": ("paused", "#9f9f9f"), "MAINTENANCE": ("maintenance", "#007ec6")}
# The uptime badge's colour: (lowest uptime %, colour).
BADGE_UPTIME = ((99.9, "#4c1"), (99.0, "#97ca00"), (95.0, "#dfb317"), (90.0, "#fe7d37"),
                (0.0, "#e05d44"))
_CHAR_WIDTHS = {**dict.fromkeys("fijlrtI.,:;|!'()[] ", 4.0), **dict.fromkeys("mwMW%@", 10.0),
                **dict.fromkeys("ABCDEFGHJKLNOPQRSTUVXYZ0123456789", 7.5)}


def _text_width(text: str) -> int:
    return round(sum(_CHAR_WIDTHS.get(c, 6.5) for c in text))


def badge_svg(label: str, message: str, colour: str, title: str) -> str:
    """A two-part flat badge, ``label | message``, with ``title`` as its text equivalent."""
    left, right = _text_width(label) + 10, _text_width(message) + 10
    width = left + right
    text = "".join(
        f'<text x="{x * 10}" y="150" fill="#010101" fill-opacity=".3" transform="scale(.1)"'
        f' textLength="{(w - 10) * 10}">{_esc(t)}</text><text x="{x * 10}" y="140"'
        f' transform="scale(.1)" fill="#fff" textLength="{(w - 10) * 10}">{_esc(t)}</text>'
        for t, x, w in ((label, left / 2, left), (message, left + right / 2, right)))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img"'
            f' aria-label="{_esc(title)}"><title>{_esc(title)}</title>'
            f'<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb"'
            f' stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient>'
            f'<clipPath id="r"><rect width="{width}" height="20" rx="3" fill="#fff"/></clipPath>'
            f'<g clip-path="url(#r)"><rect width="{left}" height="20" fill="#555"/>'
            f'<rect x="{left}" width="{right}" height="20" fill="{colour}"/>'
            f'<rect width="{width}" height="20" fill="url(#s)"/></g>'
            f'<g text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif"'
            f' text-rendering="geometricPrecision" font-size="110">{text}</g></svg>')


async def _badge_monitor(request: Request) -> sqlite3.Row:
    """The monitor, if it is on at least one public page (listed, or in a group or tag a page
    shows); else 404."""
    rt: Runtime = request.app.state.statusapp
    row = await rt.db.fetchone(
        "SELECT * FROM monitors m WHERE id = ? AND (EXISTS (SELECT 1 FROM status_page_monitors s"
        " JOIN status_page_groups g ON g.id = s.group_id JOIN status_pages p"
        " ON p.id = g.status_page_id WHERE s.monitor_id = m.id AND p.is_public = 1)"
        " OR EXISTS (SELECT 1 FROM status_page_groups g JOIN status_pages p"
        " ON p.id = g.status_page_id WHERE p.is_public = 1 AND p.account_id = m.account_id"
        " AND (g.monitor_group = m.\"group\" OR g.monitor_tag IN"
        " (SELECT json_extract(value, '$.name') FROM json_each(m.tags)))))",
        (request.path_params["monitorId"],))
    if row is None:
        raise NotFound("Badge not found", "the monitor is on no public status page")
    return row


def _badge_response(svg: str) -> Response:
    return Response(svg, 200, {"Cache-Control": "max-age=60"}, "image/svg+xml; charset=utf-8")


async def badge_status(request: Request) -> Response:
    row = await _badge_monitor(request)
    rt: Runtime = request.app.state.statusapp
    state = ("PAUSED" if row["is_paused"] or not row["is_active"] else "MAINTENANCE"
             if rt.maintenance.active(row["account_id"], row["id"]) else row["status"])
    message, colour = BADGE_STATES[state]
    return _badge_response(badge_svg("status", message, colour, f"{row['name']}: {message}"))


async def badge_uptime(request: Request) -> Response:
    """Uptime over 1h/24h (raw checks) or 7d/30d/90d (UTC days, today included)."""
    rt: Runtime = request.app.state.statusapp
    row = await _badge_monitor(request)
    period = parse_query(BADGE_QUERY, request, {"cfg": rt.cfg, "regions": rt.regions})["period"]
    if period in _BADGE_HOURS:
        counts = await rt.db.fetchrow(
            "SELECT COALESCE(SUM(status IN ('UP', 'DEGRADED')), 0), COUNT(*) FROM checks"
            " WHERE monitor_id = ? AND checked_at >= ? AND maintenance = 0",
            (row["id"], now_ms() - _BADGE_HOURS[period] * 3_600_000))
        uptime = uptime_percent(counts[0], counts[1])
    else:
        days = (await daily_stats(rt.db, [row["id"]], int(period[:-1]), rt.settled_days))[row["id"]]
        uptime = _days_uptime(days)
    message = "no data" if uptime is None else f"{uptime:.2f}%"
    colour = "#9f9f9f" if uptime is None else next(c for low, c in BADGE_UPTIME if uptime >= low)
    return _badge_response(badge_svg(f"uptime {period}", message, colour,
                                     f"{row['name']}: {message} uptime over {period}"))


_page_by_domain_cached = cached_public(page_by_domain)

PAGE_ROUTES = [
    Route("/", root, methods=["GET"]),
    Route("/status/{slug}.json", cached_public(page_summary), methods=["GET"]),
    Route("/status/{slug}/feed.atom", cached_public(page_feed), methods=["GET"]),
    Route("/status/{slug}", cached_public(page_by_slug), methods=["GET"]),
    Route("/badge/{monitorId}/status.svg", cached_public(badge_status), methods=["GET"]),
    Route("/badge/{monitorId}/uptime.svg", cached_public(badge_uptime), methods=["GET"]),
]


# --- Dashboard ---
#
# The team's web UI at ``/``: server-rendered HTML through ``_esc``, one cached stylesheet and
# a few lines of progressive JavaScript that the CSP allows by hash (everything works without
# it).  People sign in with email and password (scrypt, per-user salt); the session cookie is
# a random token signed with the server's secret and names a ``sessions`` row, so deleting rows
# signs browsers out.  Every change goes through the API's own handlers via ``act`` (the same
# ``authorize``, validation and role checks), and every form carries a CSRF token.

SESSION_COOKIE = "statusapp_session"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
SETUP_LINK_MS = HOUR_MS
SIGNIN_FORM_MS = 2 * HOUR_MS  # how long a sign-in form's CSRF token stays valid
OVERVIEW_LIMIT = 100
PASSWORD_FIELDS = (
    Field("password", "string", True, minimum=10, maximum=1024, doc="New password"),
    Field("confirm", "string", True, maximum=1024, doc="The same password again",
          check=lambda v, r, e: _same_password(v, r)),
)
SIGNIN_FIELDS = (
    Field("email", "string", True, minimum=3, maximum=254, check=valid_email, doc="Email"),
    Field("password", "string", True, minimum=1, maximum=1024, doc="Password"),
)


def _same_password(value: str, record: dict[str, Any]) -> str:
    if value != record.get("password"):
        raise _Issue("The two passwords differ")
    return value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=256 * n * r * p)


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash`` with a fresh 16-byte salt."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    """Whether ``password`` matches; without a stored hash it costs the same and fails."""
    if not stored:
        hash_password(password)
        return False
    _, n, r, p, salt, digest = stored.split("$")
    return hmac.compare_digest(_scrypt(password, _unb64(salt), int(n), int(r), int(p)),
                               _unb64(digest))


def sign(secret: str, token: str) -> str:
    """``token.signature``: the HMAC-SHA256 of the token under the server's secret."""
    return f"{token}.{hmac.new(secret.encode(), token.encode(), 'sha256').hexdigest()}"


def unsign(secret: str, value: str) -> str | None:
    """The token of a signed value, or None when the signature does not match."""
    token = value.rpartition(".")[0]
    return token if token and hmac.compare_digest(sign(secret, token), value) else None


async def server_secret(db: Database) -> str:
    """The secret that signs cookies and sign-in forms, made on first start."""
    await db.write([("INSERT OR IGNORE INTO server_secrets (name, value) VALUES ('session', ?)",
                     (secrets.token_urlsafe(32),))])
    return await db.fetchval("SELECT value FROM server_secrets WHERE name = 'session'")


async def create_setup_token(conn: aiosqlite.Connection, account_id: str) -> str:
    """A one-time token that lets the account choose a password within SETUP_LINK_MS."""
    token = "setup_" + secrets.token_urlsafe(24)
    await conn.execute("INSERT INTO setup_tokens (token_hash, account_id, expires_at)"
                       " VALUES (?, ?, ?)", (hash_key(token), account_id, now_ms() + SETUP_LINK_MS))
    return token


async def set_password(db: Database, account_id: str, password: str) -> None:
    """Store a new password hash and end every session of the account."""
    digest = await asyncio.to_thread(hash_password, password)
    await db.write([("UPDATE accounts SET password_hash = ?, updated_at = ? WHERE id = ?",
                     (digest, now_ms(), account_id)),
                    ("DELETE FROM sessions WHERE account_id = ?", (account_id,))])


@dataclass(frozen=True)
class Session:
    """A signed-in browser: its row id, CSRF token, the person and their team role."""

    id: str
    csrf: str
    who: Principal
    email: str
    name: str | None


async def create_session(rt: Runtime, account_id: str) -> str:
    """A new session row; returns the signed cookie value."""
    token, stamp = secrets.token_urlsafe(32), now_ms()
    await rt.db.write([
        ("DELETE FROM sessions WHERE expires_at <= ?", (stamp,)),
        ("INSERT INTO sessions (id, account_id, csrf, created_at, expires_at)"
         " VALUES (?, ?, ?, ?, ?)", (hash_key(token), account_id, secrets.token_urlsafe(24),
                                     stamp, stamp + rt.cfg["dashboard"]["session_days"] * DAY_MS))])
    return sign(rt.secret, token)


async def session_of(rt: Runtime, request: Request) -> Session | None:
    """The request's session: a correctly signed, unexpired cookie of an enabled member."""
    token = unsign(rt.secret, request.cookies.get(SESSION_COOKIE, ""))
    if token is None:
        return None
    row = await rt.db.fetchone(
        "SELECT s.id, s.csrf, s.account_id, a.email, a.name, m.team_id, m.role, t.plan"
        " FROM sessions s JOIN accounts a ON a.id = s.account_id"
        " JOIN team_members m ON m.account_id = a.id AND m.status = 'ACCEPTED'"
        " JOIN accounts t ON t.id = m.team_id WHERE s.id = ? AND s.expires_at > ?"
        " AND a.account_status = 'ENABLED' AND t.account_status = 'ENABLED'",
        (hash_key(token), now_ms()))
    if row is None:
        return None
    who = Principal("session", row["account_id"], row["team_id"], row["role"],
                    frozenset(PERMISSIONS), row["plan"])
    return Session(row["id"], row["csrf"], who, row["email"], row["name"])


def session_cookie(rt: Runtime, request: Request, response: Response, value: str) -> None:
    """Set (or with ``value`` "" clear) the session cookie: HttpOnly, SameSite=Lax, and
    Secure when the dashboard is reached over HTTPS."""
    secure = request.url.scheme == "https" or rt.cfg["server"]["base_url"].startswith("https:")
    response.set_cookie(SESSION_COOKIE, value, max_age=rt.cfg["dashboard"]["session_days"] * 86400
                        if value else 0, httponly=True, samesite="lax", secure=secure, path="/")


def signin_token(secret: str, stamp: int | None = None) -> str:
    """The CSRF token of the forms used before signing in: a signed timestamp."""
    return sign(secret, f"pre{now_ms() if stamp is None else stamp}")


def _signin_token_ok(secret: str, value: str) -> bool:
    token = unsign(secret, value) or ""
    return token[3:].isdigit() and now_ms() - int(token[3:]) < SIGNIN_FORM_MS


async def signin_allowed(rt: Runtime, email: str, ip: str) -> None:
    """Refuse with 429 while the account or the address has too many recent failures."""
    limits = rt.cfg["dashboard"]
    since = now_ms() - limits["signin_window_minutes"] * 60_000
    for column, value, limit, whom in (("email", email, limits["signin_failures_per_account"],
                                        "this account"),
                                       ("ip", ip, limits["signin_failures_per_ip"],
                                        "your address")):
        failures = await rt.db.fetchval(
            f"SELECT COUNT(*) FROM signin_failures WHERE {column} = ? AND at >= ?", (value, since))
        if failures >= limit:
            raise RateLimited(f"Too many failed sign-ins for {whom}; try again in "
                              f"{limits['signin_window_minutes']} minutes",
                              f"{failures} failures in {limits['signin_window_minutes']} min")


async def signin_failed(rt: Runtime, email: str, ip: str) -> None:
    window = rt.cfg["dashboard"]["signin_window_minutes"] * 60_000
    await rt.db.write([("DELETE FROM signin_failures WHERE at < ?", (now_ms() - window,)),
                       ("INSERT INTO signin_failures (email, ip, at) VALUES (?, ?, ?)",
                        (email, ip, now_ms()))])


# Requests: ``@dash`` registers a page; ``Visit`` is what a page handler sees; ``act`` calls an
# API handler as the signed-in person.

DASHBOARD_ROUTES: list[Route] = []
DASHBOARD_PAGES: dict[str, Callable[[Request], Awaitable[Response]]] = {}  # path -> endpoint


@dataclass
class Visit:
    """One dashboard request: the runtime, the session (None before signing in), the form (a
    name's last value) and every value of each name (a list of checkboxes sends one each)."""

    request: Request
    rt: Runtime
    session: Session | None
    form: dict[str, str]
    every: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def who(self) -> Principal:
        if self.session is None:
            raise Unauthorized("Sign in first", "no session")
        return self.session.who

    def require(self, method: str, path: str) -> None:
        """Refuse, with the API's own check and message, a person who may not call the API
        route ``method path``."""
        _, public, role, _ = API_HANDLERS[(method, path)]
        if not public:
            authorize(self.who, method, role)

    def may(self, method: str, path: str) -> bool:
        """Whether the person may call an API route (what decides which buttons show)."""
        try:
            self.require(method, path)
        except ApiError:
            return False
        return True

    def query(self, name: str, default: str = "") -> str:
        return self.request.query_params.get(name, default)


async def act(v: Visit, method: str, path: str, params: dict[str, str] | None = None,
              body: Any = None, query: dict[str, Any] | None = None) -> Any:
    """Call the API handler of ``method path`` as the signed-in person (public routes as
    anyone), with the API's own permission check; returns its JSON answer."""
    handler, public, _, table = API_HANDLERS[(method, path)]
    v.require(method, path)
    who = None if public else v.who
    query_string = urllib.parse.urlencode({k: val for k, val in (query or {}).items()
                                           if val not in (None, "")})
    scope = {**v.request.scope, "method": method, "path_params": params or {},
             "query_string": query_string.encode()}
    call = Call(Request(scope), v.rt, who, body={} if body is None else body)
    call.query = parse_query(table, call.request, call.env())
    result = await handler(call)
    if method != "GET" and not public:
        v.rt.public_cache.invalidate()
    return json.loads(bytes(result.body)) if isinstance(result, Response) else result


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


async def _visit(request: Request) -> Visit:
    """Read the session and, for a POST, the form, refusing a missing or wrong CSRF token."""
    rt: Runtime = request.app.state.statusapp
    session = await session_of(rt, request)
    form: dict[str, str] = {}
    every: dict[str, list[str]] = collections.defaultdict(list)
    if request.method == "POST":
        body = await read_body(request, MAX_BODY)
        for name, value in urllib.parse.parse_qsl(body.decode("utf-8", "replace"),
                                                  keep_blank_values=True):
            form[name] = value
            every[name].append(value)
        token = form.pop("csrf", "")
        valid = (hmac.compare_digest(token, session.csrf) if session
                 else _signin_token_ok(rt.secret, token))
        if not valid or not _same_origin(request):
            raise Forbidden("This form has expired or did not come from this dashboard",
                            "missing or wrong CSRF token; reload the page and try again")
    return Visit(request, rt, session, form, dict(every))


def dash(path: str, *methods: str, signed_in: bool = True
         ) -> Callable[[Callable[[Visit], Awaitable[Response]]],
                       Callable[[Visit], Awaitable[Response]]]:
    """Register a dashboard page.  Errors become an HTML page with the error's status; a
    signed-out GET of a private page is sent to the sign-in form."""
    def register(handler: Callable[[Visit], Awaitable[Response]]
                 ) -> Callable[[Visit], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                v = await _visit(request)
                if signed_in and v.session is None and request.method == "GET":
                    target = urllib.parse.quote(request.url.path + (
                        f"?{request.url.query}" if request.url.query else ""))
                    return RedirectResponse(f"/signin?next={target}", 303)
                return await handler(v)
            except ApiError as exc:
                return error_page(request, exc)
        DASHBOARD_ROUTES.append(Route(path, endpoint, methods=list(methods)))
        DASHBOARD_PAGES[path] = endpoint
        return handler
    return register


def redirect(to: str) -> Response:
    return RedirectResponse(to, 303)


# Rendering: one document shape, one stylesheet, one script.

DASHBOARD_CSS = """
:root{--bg:#f3f4f6;--card:#fff;--text:#111827;--muted:#4b5563;--line:#d1d5db;--link:#1d4ed8;
--up:#15803d;--down:#b91c1c;--warn:#a16207;--none:#4b5563;--accent:#1d4ed8;--on-accent:#fff;
--p50:#1d4ed8;--p95:#c2410c;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#0f172a;--card:#1e293b;--text:#f1f5f9;
--muted:#cbd5e1;--line:#475569;--link:#93c5fd;--up:#4ade80;--down:#fca5a5;--warn:#fcd34d;
--none:#cbd5e1;--accent:#93c5fd;--on-accent:#0f172a;--p50:#93c5fd;--p95:#fdba74}}
*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--text);background:var(--bg)}
a{color:var(--link)}
:focus-visible{outline:3px solid var(--accent);outline-offset:2px}
.skip,.sr{position:absolute;left:-999rem}.skip:focus{left:1rem;top:1rem;background:var(--card);
padding:.5rem;z-index:2}
header.bar{background:var(--card);border-bottom:1px solid var(--line)}
header.bar nav{max-width:72rem;margin:0 auto;padding:.5rem 1rem;display:flex;flex-wrap:wrap;
gap:.25rem 1rem;align-items:center}
header.bar .brand{font-weight:700;text-decoration:none;color:var(--text);margin-right:auto}
header.bar a{text-decoration:none;padding:.25rem 0}
header.bar a[aria-current]{font-weight:700;text-decoration:underline}
main a[aria-current]{font-weight:700;color:var(--text);text-decoration:none}
main{max-width:72rem;margin:0 auto;padding:1rem}
h1{font-size:1.5rem;margin:.5rem 0 1rem;overflow-wrap:anywhere}
h2{font-size:1.2rem;margin:1.5rem 0 .5rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:.5rem;padding:1rem;
margin:0 0 1rem;overflow-x:auto}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.4rem .5rem;border-bottom:1px solid var(--line);
vertical-align:middle}
th{font-size:.875rem;color:var(--muted)}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.st{font-weight:600;white-space:nowrap}
.st-up{color:var(--up)}.st-down{color:var(--down)}.st-degraded{color:var(--warn)}
.st-none{color:var(--none)}
.muted,.hint{color:var(--muted);font-size:.875rem}
.row{display:flex;flex-wrap:wrap;gap:.5rem;align-items:end;margin:0 0 1rem}
form.inline{display:inline}
button,.button{font:inherit;border:1px solid var(--accent);background:var(--accent);
color:var(--on-accent);border-radius:.375rem;padding:.35rem .8rem;cursor:pointer;
text-decoration:none;display:inline-block}
button.quiet{background:transparent;color:var(--link)}
button.danger{background:var(--down);border-color:var(--down);color:#fff}
label{display:block;font-weight:600;margin:.75rem 0 .25rem}
input,select,textarea{font:inherit;color:var(--text);background:var(--bg);
border:1px solid var(--line);border-radius:.375rem;padding:.4rem;width:100%;max-width:36rem}
input[type=checkbox],input[type=radio]{width:auto;margin-right:.5rem}
.picks{max-height:16rem;overflow-y:auto;border:1px solid var(--line);border-radius:.375rem;
padding:.25rem .5rem}label.pick{display:flex;align-items:center;font-weight:400;margin:.2rem 0;
overflow-wrap:anywhere}
label.check{display:flex;align-items:center;font-weight:600}
.row label{margin:0}.row input,.row select{width:auto}
fieldset{border:1px solid var(--line);border-radius:.5rem;margin:1rem 0;max-width:38rem}
fieldset.rows{max-width:60rem}.scroll{overflow-x:auto}.rows td{padding:.2rem}
.rows input,.rows select{min-width:7rem}
.err{color:var(--down);font-weight:600;margin:.25rem 0}
[aria-invalid=true]{border-color:var(--down);border-width:2px}
.notice{border-left:.3rem solid var(--accent);padding:.5rem 1rem;background:var(--card);
margin:0 0 1rem}
.notice.bad{border-left-color:var(--down)}
.incident{border-left:.3rem solid var(--down)}
svg.spark{width:8rem;height:1.75rem;display:block}
svg.spark polyline,svg.chart polyline{fill:none;stroke-width:2;vector-effect:non-scaling-stroke}
svg.chart{width:100%;height:auto;display:block}
.p50{stroke:var(--p50)}.p95{stroke:var(--p95);stroke-dasharray:6 3}
circle.p50{fill:var(--p50)}circle.p95{fill:var(--p95)}
svg text{fill:var(--muted);font-size:11px}
svg line{stroke:var(--line)}
code,pre{font-family:ui-monospace,monospace;overflow-wrap:anywhere}
pre{white-space:pre-wrap;background:var(--bg);padding:.5rem;border-radius:.375rem}
.keys{display:grid;grid-template-columns:repeat(auto-fit,minmax(10rem,1fr));gap:.5rem}
.keys div{background:var(--card);border:1px solid var(--line);border-radius:.5rem;padding:.5rem}
.keys dt{font-size:.875rem;color:var(--muted)}.keys dd{margin:0;font-weight:600}
@media (max-width:40rem){.wide{display:none}main{padding:.5rem}h1{font-size:1.25rem}
th,td{padding:.3rem}}
"""
DASHBOARD_CSS_URL = f"/dashboard.css?v={hashlib.sha256(DASHBOARD_CSS.encode()).hexdigest()[:12]}"
# Copy buttons, the form's type switch, checking a box choosing "only" of its scope choice,
# submitting a type chooser on change and live refresh; the page works without it.
DASHBOARD_JS = """
function wire(root){root.querySelectorAll("[data-copy]").forEach(function(b){b.hidden=false;
b.onclick=function(){navigator.clipboard.writeText(document.getElementById(b.dataset.copy)
.textContent.trim());b.textContent="Copied";};});}
wire(document);
var kind=document.querySelector("[data-kind-select]");
function showKinds(){document.querySelectorAll("[data-kinds]").forEach(function(e){
e.hidden=e.dataset.kinds.split(" ").indexOf(kind.value)<0;});}
if(kind){kind.addEventListener("change",showKinds);showKinds();}
document.querySelectorAll("[data-only]").forEach(function(r){r.closest("fieldset")
.querySelectorAll("input[type=checkbox]").forEach(function(c){c.addEventListener("change",
function(){if(c.checked){r.checked=true;}});});});
document.querySelectorAll("form[data-autosubmit] select").forEach(function(s){
s.addEventListener("change",function(){s.form.submit();});});
var every=document.body.dataset.refresh;
if(every){setInterval(function(){fetch(location.href,{credentials:"same-origin"})
.then(function(r){return r.text();}).then(function(t){var d=new DOMParser()
.parseFromString(t,"text/html").getElementById("live"),o=document.getElementById("live");
if(d&&o){o.replaceWith(d);wire(d);}});},every*1000);}
"""
_JS_HASH = base64.b64encode(hashlib.sha256(DASHBOARD_JS.encode()).digest()).decode()
DASHBOARD_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; style-src 'self'; script-src "
                               f"'sha256-{_JS_HASH}'; connect-src 'self'; img-src 'self' data:;"
                               f" form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store", "X-Frame-Options": "DENY"}

# A state as text and an icon (never colour alone): state -> (icon, label, class)
STATE_LOOK = {"UP": ("\u2714", "Up", "up"), "DOWN": ("\u2716", "Down", "down"),
              "DEGRADED": ("\u26a0", "Degraded", "degraded"), "PENDING": ("\u2026", "Pending", "none"),
              "PAUSED": ("\u23f8", "Paused", "none"),
              MAINTENANCE: ("\u2692", "Maintenance", "none")}
NAV = (("/", "Overview"), ("/incidents", "Incidents"), ("/channels", "Channels"),
       ("/webhooks", "Webhooks"), ("/pages", "Status pages"), ("/maintenance", "Maintenance"),
       ("/team", "Team"), ("/keys", "API keys"), ("/account", "Account"))


def state_html(state: str) -> str:
    icon, label, level = STATE_LOOK[state]
    return f'<span class="st st-{level}"><span aria-hidden="true">{icon}</span> {label}</span>'


def csrf_input(v: Visit) -> str:
    token = v.session.csrf if v.session else signin_token(v.rt.secret)
    return f'<input type="hidden" name="csrf" value="{_esc(token)}">'


def button(v: Visit, action: str, text: str, style: str = "", **hidden: str) -> str:
    """A one-button POST form (with the CSRF token)."""
    fields = "".join(f'<input type="hidden" name="{_esc(k)}" value="{_esc(val)}">'
                     for k, val in hidden.items())
    return (f'<form class="inline" method="post" action="{_esc(action)}">{csrf_input(v)}'
            f'{fields}<button class="{style}">{_esc(text)}</button></form>')


def copyable(ident: str, text: str) -> str:
    """Text with a copy button (shown by the script; select the text without it)."""
    return (f'<pre id="{ident}">{_esc(text)}</pre>'
            f'<button type="button" class="quiet" data-copy="{ident}" hidden>Copy</button>')


def document(v: Visit, title: str, body: str, status: int = 200, refresh: bool = False
             ) -> HTMLResponse:
    """A dashboard page: navigation (when signed in), the body, the stylesheet and script."""
    nav = ""
    if v.session:
        here = v.request.url.path
        links = "".join(
            f'<a href="{href}"{" aria-current=page" if here == href else ""}>{text}</a>'
            for href, text in NAV[1:])
        nav = (f'<header class="bar"><nav aria-label="Main"><a class="brand" href="/">StatusApp'
               f'</a>{links}{button(v, "/signout", "Sign out", "quiet")}</nav></header>')
    every = f' data-refresh="{v.rt.cfg["dashboard"]["refresh_seconds"]}"' if refresh else ""
    html_text = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
                 f'<meta name="viewport" content="width=device-width,initial-scale=1">'
                 f'<title>{_esc(title)} - StatusApp</title>'
                 f'<link rel="stylesheet" href="{DASHBOARD_CSS_URL}"></head><body{every}>'
                 f'<a class="skip" href="#main">Skip to content</a>{nav}<main id="main">'
                 f'<h1>{_esc(title)}</h1>{body}</main><script>{DASHBOARD_JS}</script>'
                 f'</body></html>')
    return HTMLResponse(html_text, status, headers=DASHBOARD_HEADERS)


def error_page(request: Request, exc: ApiError) -> Response:
    rt: Runtime = request.app.state.statusapp
    v = Visit(request, rt, None, {})
    detail = exc.details if isinstance(exc.details, str) else ""
    body = (f'<p class="notice bad" role="alert">{_esc(exc.message)}'
            f'{"<br>" + _esc(detail) if detail else ""}</p><p><a href="/">Back to the overview'
            f'</a></p>')
    return document(v, f"Error {exc.status}", body, exc.status)


def table(head: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    """An HTML table of cells already escaped; ``empty`` when there are no rows."""
    if not rows:
        return f'<p class="muted">{_esc(empty)}</p>'
    cells = "".join(f"<th scope=col>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="card"><table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table></div>'


def pager(v: Visit, pagination: dict[str, int]) -> str:
    """Previous/next links keeping the other query parameters."""
    links = []
    for page, text, rel in ((pagination["page"] - 1, "Previous", "prev"),
                            (pagination["page"] + 1, "Next", "next")):
        if 1 <= page <= pagination["totalPages"]:
            query = urllib.parse.urlencode({**v.request.query_params, "page": page})
            links.append(f'<a href="?{_esc(query)}" rel="{rel}">{text}</a>')
    return (f'<p class="row"><span class="muted">Page {pagination["page"]} of '
            f'{pagination["totalPages"]} ({pagination["total"]} in all)</span>'
            f'{" ".join(links)}</p>')


def _ms(value: Any) -> str:
    return "&ndash;" if value is None else f"{value} ms"


def _pct(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.2f}%"


def _line(values: Sequence[int | None], width: float, height: float, top: float,
          name: str, dot: int = 2) -> str:
    """A line through the known values scaled so ``top`` is the chart's top, with a dot at
    each value when some are missing (so lone values show too)."""
    step = width / max(len(values) - 1, 1)
    points = [(i * step, height - value / top * height)
              for i, value in enumerate(values) if value is not None]
    dots = "".join(f'<circle class="{name}" cx="{x:.0f}" cy="{y:.0f}" r="{dot}"/>'
                   for x, y in points) if len(points) < len(values) or len(points) == 1 else ""
    line = " ".join(f"{x:.0f},{y:.0f}" for x, y in points)
    return f'<polyline class="{name}" points="{line}"/>{dots}'



def sparkline(values: Sequence[int | None], name: str) -> str:
    """A 24-hour response-time sparkline, hourly averages, drawn on the server."""
    known = [x for x in values if x is not None]
    if not known:
        return '<span class="muted">No data</span>'
    label = f"{name}: hourly average response time, {min(known)} to {max(known)} ms"
    return (f'<svg class="spark" viewBox="-8 -8 416 120" role="img" aria-label="{_esc(label)}">'
            f'{_line(values, 400, 104, max(known) * 1.1, "p50", 8)}</svg>')


def chart(series: dict[str, list[int | None]], labels: Sequence[str], title: str) -> str:
    """A response-time chart of p50 and p95 lines with a scale, as server-side SVG."""
    known = [x for values in series.values() for x in values if x is not None]
    if not known:
        return '<p class="muted">No response times in this period yet.</p>'
    top = max(known) * 1.1
    grid = "".join(f'<line x1="50" x2="610" y1="{y + 10}" y2="{y + 10}"/>'
                   f'<text x="0" y="{y + 14}">{round(top * (1 - y / 200))} ms</text>'
                   for y in (0, 100, 200))
    lines = "".join(f'<g transform="translate(50 10)">{_line(values, 560, 200, top, name)}</g>'
                    for name, values in series.items())
    ticks = "".join(f'<text x="{50 + i * 560 / max(len(labels) - 1, 1):.0f}" y="230"'
                    f' text-anchor="middle">{_esc(text)}</text>'
                    for i, text in enumerate(labels) if text)
    return (f'<svg class="chart" viewBox="0 0 640 236" role="img" aria-label="{_esc(title)}">'
            f'{grid}{lines}{ticks}</svg><p class="hint">Solid line: p50 (median); dashed line:'
            f' p95.</p>')


# Forms, generated from the API's Field tables: a field's kind picks the input, its bounds
# and choices become attributes, ``kinds`` shows it only for the resource types that use it,
# and ``validate`` (through the API handler) judges what was typed.

_PASSWORD_NAMES = ("password", "confirm", "current")


def form_text(field: Field, value: Any) -> str:
    """A stored value as an input shows it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if field.kind == "array" and field.items in (None, "string") and all(
            isinstance(x, str) for x in value):
        return "\n".join(value)
    if field.kind in _JSON_KINDS:
        return json.dumps(value, indent=1)
    return str(value)


def form_value(field: Field, raw: str) -> Any:
    """What was typed as the field's JSON kind; left as typed when it does not parse, so
    ``validate`` reports it next to the field."""
    raw = raw.replace("\r\n", "\n")
    if field.kind == "boolean":
        return raw == "true"
    if not raw.strip():
        return None
    kinds: dict[str, Callable[[str], Any]] = {"integer": int, "number": float,
                                              "object": parse_json}
    if field.kind == "array":
        if field.items in (None, "string") and not raw.lstrip().startswith("["):
            return [line.strip() for line in raw.split("\n") if line.strip()]
        kinds["array"] = parse_json
    try:
        return kinds[field.kind](raw) if field.kind in kinds else raw
    except ValueError:
        return raw


# An array of flat objects (an Each check over fields of these kinds, such as a monitor's
# assertions) is edited as rows of inputs, ROW_SPARE empty rows below to add to it.
_ROW_KINDS = ("string", "integer", "number")
ROW_SPARE = 3


def row_fields(field: Field) -> tuple[Field, ...] | None:
    """The element table of an array edited as rows; None for other fields."""
    check = field.check
    if field.kind == "array" and isinstance(check, Each) and all(
            f.kind in _ROW_KINDS for f in check.fields):
        return check.fields
    return None


def _row_numbers(name: str, form: dict[str, str]) -> list[int]:
    """The row numbers of the inputs ``name.N.sub`` that hold text."""
    return [int(parts[1]) for key, text in form.items()
            if text.strip() and len(parts := key.split(".")) == 3 and parts[0] == name
            and parts[1].isdigit()]


def rows_value(name: str, subs: Sequence[Field], form: dict[str, str]) -> list[dict[str, Any]]:
    """The rows typed for an array of objects; a row left blank is no element."""
    out = []
    for i in sorted(set(_row_numbers(name, form))):
        row = {sub.name: form_value(sub, form.get(f"{name}.{i}.{sub.name}", "")) for sub in subs}
        out.append({k: x for k, x in row.items() if x is not None})
    return out


def form_rows(field: Field, subs: Sequence[Field], values: dict[str, str],
              errors: dict[str, str], cfg: dict[str, Any]) -> str:
    """An array of objects as a table: a row of inputs per element (each with its error),
    then empty rows."""
    words = {sub.name: _snake_case(sub.name).replace("_", " ").capitalize() for sub in subs}
    head = "".join(f"<th scope=col>{_esc(words[sub.name])}</th>" for sub in subs)
    rows = []
    for i in range(max(_row_numbers(field.name, values), default=-1) + 1 + ROW_SPARE):
        cells = []
        for sub in subs:  # any input may be left blank: a blank row is no element
            name = f"{field.name}.{i}.{sub.name}"
            ident, wrong = _ident(name), errors.get(name)
            extra = f' aria-invalid="true" aria-describedby="{ident}-err"' if wrong else ""
            control = _input(dataclasses.replace(sub, required=False), name, ident,
                             values.get(name, ""), extra, cfg)
            cells.append(f'<td><label class="sr" for="{ident}">{_esc(words[sub.name])} of row '
                         f'{i + 1}</label>{control}' + (f'<p class="err" id="{ident}-err">'
                                                        f'{_esc(wrong)}</p>' if wrong else "")
                         + "</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    notes = "".join(f"<li>{_esc(words[sub.name])}: {_esc(sub.doc)}</li>" for sub in subs)
    shown = f' data-kinds="{" ".join(field.kinds)}"' if field.kinds else ""
    error = errors.get(field.name)  # said in its row's cell when it is an element's
    cells_say = any(k.startswith(f"{field.name}.") for k in errors)
    err = f'<p class="err">{_esc(error)}</p>' if error and not cells_say else ""
    return (f'<fieldset class="rows"{shown}><legend>{_esc(field.doc or field.name)}</legend>'
            f'{err}<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>'
            f'{"".join(rows)}</tbody></table></div><ul class="hint">{notes}<li>Leave a row '
            f'blank to remove it; save to get more empty rows.</li></ul></fieldset>')


# An array of the team's ids (``Field.ids_of``, such as a maintenance window's monitorIds) is a
# checkbox per item, labelled with its name and type, in a box that scrolls when the list is
# long; the browser sends one value of the field's name per checked box.  When null means
# something of its own (``Field.unset``: all the team's monitors), two radio buttons named
# ``<field>.scope`` come first: "all" (null) or "only" (the checked ones, possibly none).
SCOPE = ".scope"
ID_CHOICES = {"monitors": "SELECT id, name || ' (' || type || ')' FROM monitors"
                          " WHERE account_id = ? ORDER BY name COLLATE NOCASE, id"}


async def id_choices(v: Visit, fields: Sequence[Field]) -> dict[str, list[tuple[str, str]]]:
    """(id, label) of every item of the team that the form's ``ids_of`` fields offer."""
    kinds = {f.ids_of for f in fields if f.ids_of}
    return {kind: [(row[0], row[1]) for row in await v.rt.db.fetchall(
        ID_CHOICES[kind], (v.who.team_id,))] for kind in kinds}


def picked_form(v: Visit, fields: Sequence[Field]) -> dict[str, str]:
    """The posted form, each ``ids_of`` field's checked values one per line (as ``form_text``
    shows a stored list, and ``form_value`` reads it)."""
    return {**v.form, **{f.name: "\n".join(v.every[f.name]) for f in fields
                         if f.ids_of and f.name in v.every}}


def scoped_ids(field: Field, form: dict[str, str]) -> list[str] | None:
    """The value of an ``ids_of`` field with a scope choice: "all" is null, "only" the checked
    ids ([] when none is); "all" with boxes checked is refused rather than guessed."""
    checked = form_value(field, form.get(field.name, ""))
    if form[field.name + SCOPE] != "all":
        return checked or []
    if checked:
        raise ValidationFailed([{"path": [field.name], "message": (
            f'some are checked, but "{field.unset}" is chosen: choose '
            f'"{_only_words(field)}" or uncheck them')}])
    return None


def _only_words(field: Field) -> str:
    return f"Only the {field.ids_of} checked below"


def form_scope(field: Field, scope: str) -> str:
    """The "all" / "only" radio buttons of an ``ids_of`` field with ``unset`` words."""
    ident, name = _ident(field.name), _esc(field.name + SCOPE)
    return "".join(
        f'<label class="pick"><input type="radio" id="{ident}-{value}" name="{name}" '
        f'value="{value}"{" checked" if value == scope else ""}{extra}>{_esc(words)}</label>'
        for value, words, extra in (("all", field.unset[:1].upper() + field.unset[1:], ""),
                                    ("only", _only_words(field), " data-only")))


def form_ids(field: Field, choices: Sequence[tuple[str, str]], values: dict[str, str],
             error: str | None) -> str:
    """A fieldset of checkboxes, one per choice, those in the values checked (after the scope
    choice, when the field has one).  A checked id that is no choice (a deleted monitor) stays
    shown, so saving never drops it unseen; the hidden empty value makes "none checked" a value
    too."""
    ident, name, text = _ident(field.name), _esc(field.name), values.get(field.name, "")
    checked = {line for line in text.split("\n") if line}
    known = {value for value, _ in choices}
    rows = [*choices, *((x, f"{x} (unknown id)") for x in sorted(checked - known))]
    boxes = "".join(f'<label class="pick"><input type="checkbox" id="{ident}-{i}" name="{name}" '
                    f'value="{_esc(value)}"{" checked" if value in checked else ""}>'
                    f'{_esc(label)}</label>' for i, (value, label) in enumerate(rows))
    hint = ("" if rows else f"No {field.ids_of} yet. ") + "Check any number."
    scope = form_scope(field, values.get(field.name + SCOPE, "all")) if field.unset else ""
    described = f"{ident}-hint" + (f" {ident}-err" if error else "")
    shown = f' data-kinds="{" ".join(field.kinds)}"' if field.kinds else ""
    err = f'<p class="err" id="{ident}-err">{_esc(error)}</p>' if error else ""
    return (f'<fieldset id="{ident}" aria-describedby="{described}"{shown}><legend>'
            f'{_esc(field.doc or field.name)}</legend><p class="hint" id="{ident}-hint">'
            f'{_esc(hint)}</p>{err}{scope}<input type="hidden" name="{name}" value="">'
            f'<div class="picks">{boxes}</div></fieldset>')


def form_body(fields: Sequence[Field], nested: dict[str, tuple[Field, ...]],
              form: dict[str, str], existing: dict[str, Any] | None) -> dict[str, Any]:
    """A request body from a submitted form.  On an edit, an empty input of a field that had
    no value is left out (a secret the API never shows stays as it is)."""
    body: dict[str, Any] = {}
    for field in fields:
        subs = row_fields(field)
        value: Any
        if subs is not None and any(k.startswith(f"{field.name}.") for k in form):
            value = rows_value(field.name, subs, form)
        elif field.name in nested:
            parts = {sub.name: form_value(sub, form.get(f"{field.name}.{sub.name}", ""))
                     for sub in nested[field.name] if f"{field.name}.{sub.name}" in form}
            value = {k: x for k, x in parts.items() if x is not None} or None
        elif field.ids_of and field.unset and field.name + SCOPE in form:
            value = scoped_ids(field, form)
        elif field.name in form:
            value = form_value(field, form[field.name])
        else:
            continue
        if value is None and existing is not None and existing.get(field.name) is None:
            continue
        body[field.name] = value
    return body


def _hint(field: Field, cfg: dict[str, Any]) -> str:
    parts = ["required" if field.required is True else ""]
    if not isinstance(field.required, bool) and field.required:
        parts.append(f"required for {', '.join(field.required)}")
    low, high = _bound(field.minimum, cfg), _bound(field.maximum, cfg)
    unit = " characters" if field.kind == "string" else " items" if field.kind == "array" else ""
    if low is not None and high is not None:
        parts.append(f"{low} to {high}{unit}")
    elif low is not None:
        parts.append(f"at least {low}{unit}")
    elif high is not None and field.kind != "string":
        parts.append(f"at most {high}{unit}")
    if field.kind == "boolean":
        parts.append(field.doc)
    if field.kind == "array":
        parts.append("one per line, or a JSON array" if field.items in (None, "string")
                     else "a JSON array")
    elif field.kind == "object":
        parts.append("JSON object")
    return "; ".join(p for p in parts if p)


def _input(field: Field, name: str, ident: str, text: str, extra: str,
           cfg: dict[str, Any]) -> str:
    """The control of one field, by its kind, choices and bounds."""
    attrs = f'id="{ident}" name="{_esc(name)}"{extra}'
    if field.choices is not None:
        blank = "" if field.required is True or field.default is not None else \
            '<option value="">&ndash;</option>'
        options = "".join(f'<option{" selected" if c == text else ""}>{_esc(c)}</option>'
                          for c in field.choices)
        return f"<select {attrs}>{blank}{options}</select>"
    if field.kind == "boolean":
        return (f'<input type="hidden" name="{_esc(name)}" value="false"><input type="checkbox"'
                f' {attrs} value="true"{" checked" if text == "true" else ""}>')
    if field.kind in ("array", "object") or (
            field.kind == "string" and (_bound(field.maximum, cfg) or 0) > 2048):
        return f'<textarea {attrs} rows="4">{_esc(text)}</textarea>'
    kind = ("number" if field.kind in ("integer", "number") else
            "password" if field.name in _PASSWORD_NAMES else
            "email" if field.check is valid_email else "text")
    bounds = "".join(f' {attr}="{_bound(b, cfg)}"' for attr, b in
                     (("min", field.minimum), ("max", field.maximum)) if b is not None
                     ) if kind == "number" else ""
    step = ' step="any"' if field.kind == "number" else ""
    return f'<input type="{kind}" {attrs} value="{_esc(text)}"{bounds}{step} autocomplete="off">'


def _ident(name: str) -> str:
    """The element id of an input name."""
    return "f-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def form_field(field: Field, name: str, text: str, error: str | None, cfg: dict[str, Any],
               kinds: tuple[str, ...] | None, kind_select: bool) -> str:
    """One labelled control with its hint and its error (announced and linked)."""
    ident = _ident(name)
    described = f"{ident}-hint" + (f" {ident}-err" if error else "")
    extra = f' aria-describedby="{described}"' + (' aria-invalid="true"' if error else "")
    if kind_select:
        extra += " data-kind-select"
    if field.required is True and field.kind != "boolean":
        extra += " required"
    words = _snake_case(field.name).replace("_", " ")
    label = _esc(words.capitalize() if field.kind == "boolean" or not field.doc else field.doc)
    control = _input(field, name, ident, text, extra, cfg)
    head = (f'<label class="check">{control}{label}</label>' if field.kind == "boolean" else
            f'<label for="{ident}">{label}</label>{control}')
    shown = f' data-kinds="{" ".join(kinds)}"' if kinds else ""
    used = f" (for {', '.join(kinds)})" if kinds else ""
    err = f'<p class="err" id="{ident}-err">{_esc(error)}</p>' if error else ""
    return (f'<div{shown}>{head}<p class="hint" id="{ident}-hint">{_esc(_hint(field, cfg))}'
            f'{_esc(used)}</p>{err}</div>')


def form_fields(fields: Sequence[Field], nested: dict[str, tuple[Field, ...]],
                values: dict[str, str], errors: dict[str, str], cfg: dict[str, Any],
                choices: Mapping[str, Sequence[tuple[str, str]]] | None = None) -> str:
    """Every field of a table (and of its nested tables) as labelled controls; ``choices``
    are the items (id, label) ``ids_of`` fields offer, by kind (``id_choices``)."""
    switch = any(f.kinds for f in fields) or any(
        s.kinds for table in nested.values() for s in table)
    out = []
    for field in fields:
        subs = row_fields(field)
        if field.ids_of:
            out.append(form_ids(field, (choices or {}).get(field.ids_of, ()), values,
                                errors.get(field.name)))
        elif subs is not None:
            out.append(form_rows(field, subs, values, errors, cfg))
        elif field.name not in nested:
            out.append(form_field(field, field.name, values.get(field.name, ""),
                                  errors.get(field.name), cfg, field.kinds,
                                  switch and field.name == "type"))
        else:
            out.append(form_nested(field, nested[field.name], values, errors, cfg))
    return "".join(out)


def form_nested(field: Field, subs: Sequence[Field], values: dict[str, str],
                errors: dict[str, str], cfg: dict[str, Any]) -> str:
    """An object field (``apiAuthConfig``, a channel's ``config``) as a fieldset of its own
    table's controls."""
    inner = "".join(form_field(sub, f"{field.name}.{sub.name}",
                               values.get(f"{field.name}.{sub.name}", ""),
                               errors.get(f"{field.name}.{sub.name}"), cfg, sub.kinds, False)
                    for sub in subs)
    err = errors.get(field.name)
    shown = f' data-kinds="{" ".join(field.kinds)}"' if field.kinds else ""
    return (f'<fieldset{shown}><legend>{_esc(field.doc or field.name)}</legend>'
            f'{"<p class=err>" + _esc(err) + "</p>" if err else ""}{inner}</fieldset>')


def form_values(fields: Sequence[Field], nested: dict[str, tuple[Field, ...]],
                record: dict[str, Any]) -> dict[str, str]:
    """A record as the texts of the form's inputs (defaults for a new one)."""
    values = {}
    for field in fields:
        value = record.get(field.name, field.default)
        subs = row_fields(field)
        if subs is not None:
            values.update({f"{field.name}.{i}.{sub.name}": form_text(sub, item.get(sub.name))
                           for i, item in enumerate(value or []) for sub in subs})
        elif field.name in nested:
            for sub in nested[field.name]:
                values[f"{field.name}.{sub.name}"] = form_text(sub, (value or {}).get(sub.name))
        else:
            values[field.name] = form_text(field, value)
        if field.ids_of and field.unset:
            values[field.name + SCOPE] = "all" if value is None else "only"
    return values


def issue_errors(exc: ValidationFailed) -> dict[str, str]:
    """Validation issues by input name (``config.emails``; deeper paths by their field, and
    an element's field also by its row input's name, ``assertions.0.target``)."""
    errors: dict[str, str] = {}
    for issue in exc.issues:
        path = [str(p) for p in issue["path"]]
        where = ".".join(path[:2]) if len(path) > 1 and not path[1].isdigit() else \
            ".".join(path[:1])
        message = issue["message"] + (f" (at {'.'.join(path[1:])})" if len(path) > 2 else "")
        errors.setdefault(where or "", message)
        if _is_cell(path):
            errors.setdefault(".".join(path), issue["message"])
    return errors


def _is_cell(path: Sequence[str]) -> bool:
    """Whether a path names a field of an array's element: ``[array, N, field]``."""
    return len(path) == 3 and path[1].isdigit()


def render_form(v: Visit, action: str, fields: Sequence[Field],
                nested: dict[str, tuple[Field, ...]], values: dict[str, str],
                errors: dict[str, str], submit: str, extra: str = "",
                choices: Mapping[str, Sequence[tuple[str, str]]] | None = None) -> str:
    """A whole form: CSRF token, the generated fields, errors no field owns, a button."""
    names = {f.name for f in fields} | {f"{k}.{s.name}" for k, t in nested.items() for s in t}
    stray = [f"{k}: {m}" if k else m for k, m in errors.items()
             if k not in names and not _is_cell(k.split("."))]
    summary = ("".join(f'<p class="notice bad" role="alert">{_esc(m)}</p>' for m in stray) +
               ('<p class="notice bad" role="alert">Please correct the fields marked below.</p>'
                if any(k in names for k in errors) else ""))
    return (f'{summary}<form method="post" action="{_esc(action)}" novalidate>{csrf_input(v)}'
            f'{extra}{form_fields(fields, nested, values, errors, v.rt.cfg, choices)}'
            f'<p><button>{_esc(submit)}</button></p></form>')


def editable(fields: Sequence[Field]) -> tuple[Field, ...]:
    """A resource's Field table without its read-only markers (``managed``, ``secretsDigest``:
    only `statusapp apply` writes them; a note says so): what its form lets a person edit."""
    return tuple(f for f in fields if not f.read_only)


@dataclass(frozen=True)
class Resource:
    """A team resource the dashboard lists and edits through its API routes.

    ``by_type`` gives, per value of the ``type`` field, the nested tables of that type (a
    channel's ``config`` fields from its ChannelType): the form is then one per type, the type
    chosen first.  ``title`` is the key of an item's name."""

    noun: str
    api: str
    param: str
    fields: tuple[Field, ...]
    items: str
    nested: dict[str, tuple[Field, ...]] = dataclasses.field(default_factory=dict)
    test: bool = False
    by_type: dict[str, dict[str, tuple[Field, ...]]] | None = None
    title: str = "name"


RESOURCES = {
    "monitors": Resource("Monitor", "/monitors", "monitorId", editable(MONITOR_FIELDS),
                         "monitors", {"apiAuthConfig": AUTH_FIELDS}),
    "channels": Resource("Notification channel", "/notifications", "channelId",
                         editable(CHANNEL_FIELDS), "channels", test=True,
                         by_type={name: {"config": channel.fields}
                                  for name, channel in CHANNEL_TYPES.items()}),
    "webhooks": Resource("Webhook", "/webhooks", "webhookId", editable(WEBHOOK_FIELDS),
                         "webhooks", test=True),
    "pages": Resource("Status page", "/status-pages", "statusPageId",
                      editable(STATUS_PAGE_FIELDS), "statusPages"),
    "maintenance": Resource("Maintenance window", "/maintenance-windows", "windowId",
                            editable(MAINTENANCE_FIELDS), "maintenanceWindows", title="title"),
}


def _resource(v: Visit) -> tuple[str, Resource]:
    key = v.request.url.path.split("/")[1]
    return key, RESOURCES[key]


@dataclass(frozen=True)
class FormShape:
    """What one resource form shows: its fields, nested tables, and for a per-type form the
    chosen type (sent as a hidden input) with the form that changes it."""

    fields: tuple[Field, ...]
    nested: dict[str, tuple[Field, ...]]
    hidden: str = ""
    chooser: str = ""


def _type_chooser(v: Visit, res: Resource, chosen: str | None) -> str:
    """A GET form choosing the type of a per-type form (the script submits it on change)."""
    field = next(f for f in res.fields if f.name == "type")
    control = form_field(field, "type", chosen or "", None, v.rt.cfg, None, False)
    return (f'<form method="get" action="{_esc(v.request.url.path)}" class="card" '
            f'data-autosubmit>{control}<p><button>{"Change type" if chosen else "Continue"}'
            f'</button></p></form>')


def form_shape(v: Visit, res: Resource, existing: dict[str, Any] | None) -> FormShape | None:
    """The form of ``res`` for this visit; None while a per-type form has no type chosen
    (posted, asked for with ``?type=``, or the stored item's own)."""
    if res.by_type is None:
        return FormShape(res.fields, res.nested)
    chosen = v.form.get("type") or v.query("type") or (existing or {}).get("type")
    if chosen not in res.by_type:
        return None
    return FormShape(tuple(f for f in res.fields if f.name != "type"), res.by_type[chosen],
                     f'<input type="hidden" name="type" value="{_esc(chosen)}">'
                     f'<p>Type: <strong>{_esc(chosen)}</strong></p>',
                     _type_chooser(v, res, chosen))


def _write_route(res: Resource, ident: str | None) -> tuple[str, str]:
    """The API route a form saves through: PUT of the item, or POST of a new one."""
    return ("PUT", f"{res.api}/{{{res.param}}}") if ident else ("POST", res.api)


async def _save(v: Visit, res: Resource, form: FormShape, ident: str | None,
                existing: dict[str, Any] | None) -> tuple[Any, dict[str, str]]:
    """Submit the form through the API handler: (its answer, {}) or (None, field errors)."""
    method, path = _write_route(res, ident)
    try:
        body = form_body(res.fields, form.nested, picked_form(v, res.fields), existing)
        return await act(v, method, path, {res.param: ident} if ident else {}, body), {}
    except ValidationFailed as exc:
        return None, issue_errors(exc)


def managed_note(res: Resource, item: dict[str, Any] | None) -> str:
    if not (item or {}).get(MANAGED_FIELD.name):
        return ""
    return (f'<p class="notice" role="note">This {_esc(res.noun.lower())} is managed by '
            f'<code>statusapp apply</code>: the next apply puts back what its file says.</p>')


async def resource_form(v: Visit) -> Response:
    """``/{kind}/new`` and ``/{kind}/{id}/edit``: the generated form; a POST saves it."""
    key, res = _resource(v)
    ident = v.request.path_params.get("ident")
    v.require(*_write_route(res, ident))  # a person who may not save gets no form
    existing = (await act(v, "GET", f"{res.api}/{{{res.param}}}", {res.param: ident})
                if ident else None)
    title = f"Edit {existing[res.title]}" if existing else f"New {res.noun.lower()}"
    form = form_shape(v, res, existing)
    if form is None:
        return document(v, title, managed_note(res, existing) + _type_chooser(v, res, None))
    errors: dict[str, str] = {}
    if v.request.method == "POST":
        saved, errors = await _save(v, res, form, ident, existing)
        if saved is not None:
            return redirect(f"/monitors/{saved['id']}" if key == "monitors" else f"/{key}")
    values = (picked_form(v, res.fields) if v.request.method == "POST" else
              form_values(res.fields, form.nested, existing or dict(v.request.query_params)))
    return document(v, title, managed_note(res, existing) + form.chooser + render_form(
        v, v.request.url.path, form.fields, form.nested, values, errors, "Save", form.hidden,
        await id_choices(v, form.fields)), 400 if errors else 200)


async def resource_delete(v: Visit) -> Response:
    key, res = _resource(v)
    await act(v, "DELETE", f"{res.api}/{{{res.param}}}", {res.param: v.request.path_params["ident"]})
    return redirect("/" if key == "monitors" else f"/{key}")


def _answer_text(answer: dict[str, Any]) -> str:
    code = f"HTTP {answer['statusCode']}" if answer["statusCode"] else "no HTTP answer"
    took = f" in {answer['responseTime']} ms" if answer["responseTime"] is not None else ""
    if answer["success"]:
        return f"Test delivered: the receiver answered {code}{took}."
    return f"Test failed ({code}{took}): {answer['error']}"


def item_facts(item: dict[str, Any]) -> tuple[str, str]:
    """An item's detail and state in its list: a channel's type, a webhook's URL, a page's
    slug, a maintenance window's current or next occurrence."""
    if "nextOccurrence" in item:
        span = item["nextOccurrence"]
        detail = (f"{span['startsAt']} to {span['endsAt']}" if span else "none ahead") + (
            f" ({item['recurrence']}, {item['timezone']})" if item["recurrence"] else "")
        return detail, ("Running" if item["active"] else "Scheduled" if span else
                        "No occurrence within a year")
    state = "Failing" if item.get("failing") else "Active" if item.get(
        "isActive", item.get("isPublic", True)) else "Inactive"
    return item.get("type") or item.get("url") or item.get("slug", ""), state


async def resource_list(v: Visit, notice: str = "", bad: bool = False) -> Response:
    """``/channels``, ``/webhooks``, ``/pages``, ``/maintenance``: the team's items with their
    actions."""
    key, res = _resource(v)
    items = (await act(v, "GET", res.api))[res.items]
    item_path = f"{res.api}/{{{res.param}}}"
    rows = []
    for item in items:
        actions = []
        if v.may("PUT", item_path):
            actions.append(f'<a href="/{key}/{_esc(item["id"])}/edit">Edit</a>')
        if res.test and v.may("POST", f"{item_path}/test"):
            actions.append(button(v, f"/{key}/{item['id']}/test", "Send a test", "quiet"))
        if v.may("DELETE", item_path):
            actions.append(button(v, f"/{key}/{item['id']}/delete", "Delete", "danger"))
        detail, state = item_facts(item)
        managed = (' <span class="muted">(managed by statusapp apply)</span>'
                   if item.get(MANAGED_FIELD.name) else "")
        rows.append([_esc(item[res.title]) + managed, _esc(detail), _esc(state),
                     " ".join(actions)])
    add = (f'<p><a class="button" href="/{key}/new">New {_esc(res.noun.lower())}</a></p>'
           if v.may("POST", res.api) else "")
    message = (f'<p class="notice{" bad" if bad else ""}" role="status">{_esc(notice)}</p>'
               if notice else "")
    return document(v, res.noun + "s", message + add + table(
        ("Name", {"channels": "Type", "maintenance": "When"}.get(key, "Detail"), "State",
         "Actions"), rows,
        f"No {res.noun.lower()}s yet."))


async def resource_test(v: Visit) -> Response:
    """Send a test through a channel or webhook and show the receiver's answer."""
    _, res = _resource(v)
    answer = await act(v, "POST", f"{res.api}/{{{res.param}}}/test",
                       {res.param: v.request.path_params["ident"]})
    return await resource_list(v, _answer_text(answer), not answer["success"])


for _segment, _res in RESOURCES.items():
    dash(f"/{_segment}/new", "GET", "POST")(resource_form)
    dash(f"/{_segment}/{{ident}}/edit", "GET", "POST")(resource_form)
    dash(f"/{_segment}/{{ident}}/delete", "POST")(resource_delete)
    if _segment != "monitors":
        dash(f"/{_segment}", "GET")(resource_list)
    if _res.test:
        dash(f"/{_segment}/{{ident}}/test", "POST")(resource_test)


# Overview and monitor pages.

CHART_PERIODS = {"24h": (DAY_MS, HOUR_MS, "hour"), "7d": (7 * DAY_MS, HOUR_MS, "hour"),
                 "30d": (30 * DAY_MS, DAY_MS, "day")}


def _steps(step: int, count: int) -> list[int]:
    """The starts of the last ``count`` periods of ``step`` ms, the current one last."""
    last = now_ms() // step * step
    return [last - (count - 1 - i) * step for i in range(count)]


async def overview_figures(db: Database, ids: Sequence[str]
                           ) -> dict[str, tuple[list[int | None], float | None, float | None]]:
    """Per monitor: hourly average response times over 24 h, 24 h and 30 d uptime."""
    hours = _steps(HOUR_MS, 24)
    hourly = await collect(db, ids, hours[0], now_ms() + 1, ("monitor", "hour"))
    month = await collect(db, ids, hours[-1] - 30 * DAY_MS + HOUR_MS, now_ms() + 1, ("monitor",))
    none = [0] * 5
    out = {}
    for ident in ids:
        counts = [hourly.get((ident, hour), none) for hour in hours]
        spark = [round(c[3] / c[4]) if c[4] else None for c in counts]
        total = month.get((ident,), none)
        out[ident] = (spark, uptime_percent(sum(c[0] + c[2] for c in counts),
                                            sum(c[0] + c[1] + c[2] for c in counts)),
                      uptime_percent(total[0] + total[2], sum(total[:3])))
    return out


def _state(monitor: dict[str, Any]) -> str:
    return "PAUSED" if monitor["isPaused"] or not monitor["isActive"] else monitor["status"]


def _latest(monitor: dict[str, Any]) -> dict[str, Any] | None:
    return max(monitor["checks"], key=lambda c: c["checkedAt"], default=None)


def _pause_button(v: Visit, monitor: dict[str, Any]) -> str:
    if not v.may("POST", "/monitors/{monitorId}/pause"):
        return ""
    return button(v, f"/monitors/{monitor['id']}/pause",
                  "Resume" if monitor["isPaused"] else "Pause", "quiet")


def _monitor_row(v: Visit, monitor: dict[str, Any],
                 figures: tuple[list[int | None], float | None, float | None]) -> list[str]:
    spark, day, month = figures
    latest = _latest(monitor)
    return [state_html(_state(monitor)),
            f'<a href="/monitors/{_esc(monitor["id"])}">{_esc(monitor["name"])}</a>'
            f'<br><span class="muted">{_esc(monitor["type"])}</span>',
            f'<span class="num">{_ms(latest and latest["responseTime"])}</span>',
            sparkline(spark, monitor["name"]), f'<span class="num">{_pct(day)}</span>',
            f'<span class="num">{_pct(month)}</span>', _pause_button(v, monitor)]


def _filters(v: Visit) -> str:
    """The overview's filter form, generated from the monitor listing's query fields."""
    wanted = [f for f in MONITOR_QUERY if f.name in ("status", "type", "search")]
    controls = "".join(form_field(f, f.name, v.query(f.name), None, v.rt.cfg, None, False)
                       for f in wanted)
    return (f'<form method="get" action="/" class="row card" role="search">{controls}'
            f'<p><button>Filter</button> <a href="/">Clear</a></p></form>')


async def _open_incidents(v: Visit) -> str:
    incidents = (await act(v, "GET", "/incidents", query={"status": "open", "limit": 100}))
    names = await monitor_names(v)
    items = "".join(
        f'<li><a href="/incidents/{_esc(i["id"])}">{_esc(i["incidentNumber"])}</a>: '
        f'{_esc(names.get(i["monitorId"], i["monitorId"]))} &ndash; {_esc(i["severity"])}, '
        f'since {_when(_ms_of(i["startedAt"]))}</li>' for i in incidents["incidents"])
    return (f'<section class="card incident" aria-labelledby="open-h"><h2 id="open-h">'
            f'<span aria-hidden="true">\u2716</span> Open incidents</h2><ul>{items}</ul></section>'
            if items else "")


async def monitor_names(v: Visit) -> dict[str, str]:
    return {row[0]: row[1] for row in await v.rt.db.fetchall(
        "SELECT id, name FROM monitors WHERE account_id = ?", (v.who.team_id,))}


def _ms_of(text: str) -> int:
    parsed = _parse_time(text)
    return int(parsed.timestamp() * 1000) if parsed else 0


@dash("/", "GET")
async def overview(v: Visit) -> Response:
    """Every monitor with its status, response time, sparkline and uptime; incidents first."""
    query = {**v.request.query_params, "limit": OVERVIEW_LIMIT, "sort": "name", "order": "asc"}
    listing = await act(v, "GET", "/monitors", query=query)
    monitors = listing["monitors"]
    figures = await overview_figures(v.rt.db, [m["id"] for m in monitors])
    rows = [_monitor_row(v, m, figures[m["id"]]) for m in monitors]
    add = ('<p><a class="button" href="/monitors/new">New monitor</a></p>'
           if v.may("POST", "/monitors") else "")
    body = (f'<div id="live">{await _open_incidents(v)}' +
            table(("Status", "Monitor", "Last response", "24 h response time", "24 h uptime",
                   "30 d uptime", ""), rows,
                  "No monitors match." if v.request.query_params else "No monitors yet.") +
            f'{pager(v, listing["pagination"])}</div>')
    return document(v, "Overview", add + _filters(v) + body, refresh=True)


async def percentile_series(db: Database, monitor_id: str, period: str
                            ) -> tuple[dict[str, list[int | None]], list[str]]:
    """p50 and p95 response time per hour (24 h, 7 d) or day (30 d), from the rollups."""
    span, step, group = CHART_PERIODS[period]
    starts = _steps(step, span // step)
    buckets: dict[int, dict[int, int]] = collections.defaultdict(dict)
    for (start, index), (count,) in (await collect(db, [monitor_id], starts[0], now_ms() + 1,
                                                   (group,), hist=True)).items():
        buckets[start][index] = count
    series: dict[str, list[int | None]] = {"p50": [], "p95": []}
    for start in starts:
        stats = WindowStats(hist=buckets[start])
        series["p50"].append(stats.percentile(50))
        series["p95"].append(stats.percentile(95))
    fmt = "%H:%M" if period == "24h" else "%m-%d"
    labels = [datetime.fromtimestamp(s / 1000, timezone.utc).strftime(fmt)
              if i % max(len(starts) // 6, 1) == 0 else "" for i, s in enumerate(starts)]
    return series, labels


async def status_since(db: Database, monitor: dict[str, Any]) -> int | None:
    """When the monitor's current status began: its first check since the last other one."""
    return await db.fetchval(
        "SELECT MIN(checked_at) FROM checks WHERE monitor_id = ? AND checked_at > COALESCE("
        "(SELECT MAX(checked_at) FROM checks WHERE monitor_id = ? AND status != ?), 0)",
        (monitor["id"], monitor["id"], monitor["status"]))


def _timings(check: dict[str, Any]) -> str:
    timings = check.get("timings") or {}
    return " ".join(f"{_esc(k)} {_esc(val)}" for k, val in timings.items() if val is not None)


def _checks_table(checks: Sequence[dict[str, Any]]) -> str:
    rows = [[state_html(c["status"]), _esc(c["statusCode"] or "&ndash;"),
             f'<time datetime="{_esc(c["checkedAt"])}">{_when(_ms_of(c["checkedAt"]))}</time>',
             f'<span class="num">{_ms(c["responseTime"])}</span>', _esc(c["workerRegion"]["id"]),
             f'<span class="muted">{_timings(c)}</span>', _esc(c["error"] or "")]
            for c in checks]
    return table(("Status", "Code", "Time", "Response", "Region", "Timings (ms)", "Error"),
                 rows, "No checks yet.")


async def _cron_section(v: Visit, monitor: dict[str, Any]) -> str:
    """A CRON monitor's ping URL, a crontab line and its ping log."""
    url = monitor["heartbeatUrl"]
    snippet = f"*/5 * * * * /path/to/job.sh && curl -fsS -m 10 --retry 3 {url}"
    pings = await act(v, "GET", "/monitors/{monitorId}/heartbeats", {"monitorId": monitor["id"]},
                      query={"limit": 20})
    rows = [[_esc(p["kind"]), f'<time>{_when(_ms_of(p["receivedAt"]))}</time>',
             _esc(p["duration"] if p["duration"] is not None else ""),
             _esc(p["message"] or ""), _esc(p["sourceIp"] or "")] for p in pings["heartbeats"]]
    return (f'<h2>Heartbeat</h2><p>Ping this URL when the job succeeds (append /start, /fail):'
            f'</p>{copyable("ping-url", url)}<p>For example, in a crontab:</p>'
            f'{copyable("cron-line", snippet)}<h3>Recent pings</h3>' +
            table(("Kind", "Received", "Duration (ms)", "Message", "From"), rows, "No pings yet."))


def _regression_text(reg: dict[str, Any], active: bool) -> str:
    if not reg["regressionEnabled"]:
        return "Regression detection is off."
    base = (f"baseline {reg['baselineResponseTime']} ms" if reg["baselineResponseTime"]
            else "no baseline yet")
    state = "responses are slower than the baseline" if active else "no regression"
    return (f"Regression detection on: {state}; {base}, threshold {reg['regressionThreshold']}%"
            f" over {reg['regressionPeriod']} days.")


def _monitor_actions(v: Visit, monitor: dict[str, Any]) -> str:
    """Edit, pause/resume and delete, each only when the person's role allows it."""
    actions = [f'<a class="button" href="/monitors/{_esc(monitor["id"])}/edit">Edit</a>'
               if v.may("PUT", "/monitors/{monitorId}") else "", _pause_button(v, monitor),
               button(v, f"/monitors/{monitor['id']}/delete", "Delete", "danger")
               if v.may("DELETE", "/monitors/{monitorId}") else ""]
    return f'<div class="row">{" ".join(a for a in actions if a)}</div>'


async def _chart_section(v: Visit, monitor: dict[str, Any]) -> str:
    """The p50/p95 chart of the chosen period, with links to the other periods."""
    period = v.query("period") if v.query("period") in CHART_PERIODS else "24h"
    series, labels = await percentile_series(v.rt.db, monitor["id"], period)
    periods = " ".join(f'<a href="?period={p}"{" aria-current=true" if p == period else ""}>'
                       f'{p}</a>' for p in CHART_PERIODS)
    return (f'<h2>Response time</h2><p>Period: {periods}</p><div class="card">'
            f'{chart(series, labels, f"p50 and p95 response time, {period}")}</div>')


def _regions_table(monitor: dict[str, Any]) -> str:
    rows = [[_esc(c["workerRegion"]["city"] or c["workerRegion"]["id"]),
             state_html(c["status"]), f'<span class="num">{_ms(c["responseTime"])}</span>',
             f'<time>{_when(_ms_of(c["checkedAt"]))}</time>'] for c in monitor["checks"]]
    return "<h2>Regions</h2>" + table(("Region", "Status", "Response", "Checked"), rows,
                                      "No checks yet.")


async def _incidents_section(v: Visit, monitor: dict[str, Any]) -> str:
    incidents = await act(v, "GET", "/incidents", query={"monitorId": monitor["id"], "limit": 10})
    rows = [[f'<a href="/incidents/{_esc(i["id"])}">{_esc(i["incidentNumber"])}</a>',
             _esc(i["severity"]), "Resolved" if i["isResolved"] else "Open",
             f'<time>{_when(_ms_of(i["startedAt"]))}</time>'] for i in incidents["incidents"]]
    return "<h2>Incidents</h2>" + table(("Incident", "Severity", "State", "Started"), rows,
                                        "No incidents.")


async def _regression_section(v: Visit, monitor: dict[str, Any]) -> str:
    regression = await act(v, "GET", "/monitors/{monitorId}/regression",
                           {"monitorId": monitor["id"]})
    active = await v.rt.db.fetchval("SELECT regression_active FROM monitors WHERE id = ?",
                                    (monitor["id"],))
    return (f"<h2>Performance regression</h2>"
            f"<p>{_esc(_regression_text(regression, active))}</p>")


@dash("/monitors/{monitorId}", "GET")
async def monitor_page(v: Visit) -> Response:
    """One monitor: status since, p50/p95 chart, regions, checks, incidents, pings, regression."""
    params = {"monitorId": v.request.path_params["monitorId"]}
    monitor = await act(v, "GET", "/monitors/{monitorId}", params)
    since = await status_since(v.rt.db, monitor)
    checks = await act(v, "GET", "/monitors/{monitorId}/checks", params,
                       query={"page": v.query("page", "1"), "limit": 20})
    body = (_monitor_actions(v, monitor) +
            f'<div id="live"><p class="card">{state_html(_state(monitor))} '
            f'{"since " + _when(since) if since else ""} &middot; {_esc(monitor["type"])} '
            f'&middot; <code>{_esc(monitor["url"])}</code> &middot; every '
            f'{monitor["interval"]} s</p>{await _chart_section(v, monitor)}'
            f'{_regions_table(monitor)}<h2>Recent checks</h2>{_checks_table(checks["checks"])}'
            f'{pager(v, checks["pagination"])}</div>{await _incidents_section(v, monitor)}' +
            (await _cron_section(v, monitor) if monitor["type"] == "CRON" else "") +
            await _regression_section(v, monitor))
    return document(v, monitor["name"], body, refresh=True)


@dash("/monitors/{monitorId}/pause", "POST")
async def monitor_pause(v: Visit) -> Response:
    monitor_id = v.request.path_params["monitorId"]
    await act(v, "POST", "/monitors/{monitorId}/pause", {"monitorId": monitor_id})
    back = urlsplit(v.request.headers.get("referer", ""))
    same = back.netloc == v.request.headers.get("host")
    return redirect(f"{back.path}?{back.query}" if same and back.path else "/")


# Incidents.

@dash("/incidents", "GET")
async def incidents_page(v: Visit) -> Response:
    state = v.query("status") if v.query("status") in ("open", "resolved") else ""
    listing = await act(v, "GET", "/incidents", query={"status": state, "page": v.query("page"),
                                                       "limit": 50})
    names = await monitor_names(v)
    rows = [[f'<a href="/incidents/{_esc(i["id"])}">{_esc(i["incidentNumber"])}</a>',
             _esc(names.get(i["monitorId"], "")), _esc(i["severity"]),
             state_html("UP") if i["isResolved"] else state_html("DOWN"),
             f'<time>{_when(_ms_of(i["startedAt"]))}</time>',
             f'<time>{_when(_ms_of(i["resolvedAt"]))}</time>' if i["resolvedAt"] else ""]
            for i in listing["incidents"]]
    tabs = " ".join(f'<a href="/incidents{"?status=" + s if s else ""}"'
                    f'{" aria-current=true" if s == state else ""}>{label}</a>'
                    for s, label in (("", "All"), ("open", "Open"), ("resolved", "Resolved")))
    return document(v, "Incidents", f'<p class="row">{tabs}</p>' + table(
        ("Incident", "Monitor", "Severity", "State", "Started", "Resolved"), rows,
        "No incidents.") + pager(v, listing["pagination"]))


@dash("/incidents/{incidentId}", "GET", "POST")
async def incident_page(v: Visit) -> Response:
    """An incident with its updates; post an update or resolve it."""
    params = {"incidentId": v.request.path_params["incidentId"]}
    errors: dict[str, str] = {}
    if v.request.method == "POST":
        body = form_body(INCIDENT_UPDATE_FIELDS, {}, v.form, None)
        try:
            await act(v, "POST", "/incidents/{incidentId}/updates", params, body)
            return redirect(v.request.url.path)
        except ValidationFailed as exc:
            errors = issue_errors(exc)
    incident = await act(v, "GET", "/incidents/{incidentId}", params)
    monitor = incident["monitor"] or {"id": "", "name": "(deleted)"}
    updates = "".join(f'<li><strong>{_esc(u["status"])}</strong> &ndash; {_esc(u["message"])} '
                      f'<time>{_when(_ms_of(u["createdAt"]))}</time></li>'
                      for u in incident["updates"]) or "<li>No updates yet.</li>"
    facts = (f'<p class="card">{state_html("UP" if incident["isResolved"] else "DOWN")} '
             f'{"Resolved" if incident["isResolved"] else "Open"} &middot; '
             f'<a href="/monitors/{_esc(monitor["id"])}">{_esc(monitor["name"])}</a> &middot; '
             f'severity {_esc(incident["severity"])} &middot; started '
             f'{_when(_ms_of(incident["startedAt"]))} &middot; cause '
             f'{_esc(incident["rootCause"] or _cause(incident["rootCauseCategory"]) or "unknown")}'
             f'</p>')
    form = ""
    if v.may("POST", "/incidents/{incidentId}/updates"):
        values = dict(v.form) if errors else {"status": "resolved" if v.query("resolve") else ""}
        form = ("<h2>Post an update</h2>" + render_form(
            v, v.request.url.path, INCIDENT_UPDATE_FIELDS, {}, values, errors, "Post update"))
        if not incident["isResolved"]:
            form += button(v, v.request.url.path, "Resolve now", status="resolved",
                           message="Resolved from the dashboard.")
    return document(v, incident["incidentNumber"], facts + f"<h2>Updates</h2><ol>{updates}</ol>" +
                    _checks_table(incident["checks"]) + form, 400 if errors else 200)


# Team, API keys and account.

async def _created(v: Visit, path: str, fields: Sequence[Field],
                   shown: Callable[[dict[str, Any]], str]) -> tuple[str, dict[str, str]]:
    """On a POST, create through the API route: (the notice ``shown`` makes of its answer,
    no errors) or ("", the field errors)."""
    if v.request.method != "POST":
        return "", {}
    try:
        return shown(await act(v, "POST", path, body=form_body(fields, {}, v.form, None))), {}
    except ValidationFailed as exc:
        return "", issue_errors(exc)

@dash("/team", "GET", "POST")
async def team_page(v: Visit) -> Response:
    """Members with their roles, pending invitations and the invitation form."""
    def shown(invite: dict[str, Any]) -> str:
        link = f"{v.rt.cfg['server']['base_url']}/invite?token={invite['invitationToken']}"
        return (f'<div class="notice" role="status"><p>Invitation created. Send this link to '
                f'{_esc(invite["email"])} (shown once):</p>{copyable("invite-link", link)}</div>')
    notice, errors = await _created(v, "/team/members", MEMBER_FIELDS, shown)
    members = (await act(v, "GET", "/team/members"))["members"]
    path = "/team/members/{memberId}"
    rows = []
    for m in members:
        change = ""
        if v.may("PUT", path) and m["role"] != "OWNER":
            options = "".join(f'<option{" selected" if r == m["role"] else ""}>{r}</option>'
                              for r in TEAM_ROLES)
            change = (f'<form class="inline row" method="post" action="/team/{_esc(m["id"])}/role">'
                      f'{csrf_input(v)}<label class="sr" for="role-{_esc(m["id"])}">Role of '
                      f'{_esc(m["email"])}</label><select id="role-{_esc(m["id"])}" name="role">'
                      f'{options}</select><button class="quiet">Change role</button></form> '
                      + button(v, f"/team/{m['id']}/remove", "Remove", "danger"))
        rows.append([_esc(m["email"]), _esc(m["name"] or ""), _esc(m["role"]),
                     _esc(m["status"]), change])
    form = ("<h2>Invite someone</h2>" + render_form(
        v, "/team", MEMBER_FIELDS, {}, dict(v.form) if errors else {"role": "MEMBER"}, errors,
        "Invite") if v.may("POST", "/team/members") else "")
    return document(v, "Team", notice + table(("Email", "Name", "Role", "Status", ""), rows,
                                              "No members.") + form, 400 if errors else 200)


@dash("/team/{memberId}/role", "POST")
async def team_role(v: Visit) -> Response:
    await act(v, "PUT", "/team/members/{memberId}", dict(v.request.path_params),
              {"role": v.form.get("role")})
    return redirect("/team")


@dash("/team/{memberId}/remove", "POST")
async def team_remove(v: Visit) -> Response:
    await act(v, "DELETE", "/team/members/{memberId}", dict(v.request.path_params))
    return redirect("/team")


@dash("/keys", "GET", "POST")
async def keys_page(v: Visit) -> Response:
    """The person's API keys; a new key is shown once, with a copy button."""
    notice, errors = await _created(
        v, "/account/api-keys", KEY_FIELDS,
        lambda key: f'<div class="notice" role="status"><p>Your new key {_esc(key["name"])}, '
                    f'shown only this once:</p>{copyable("new-key", key["key"])}</div>')
    keys = (await act(v, "GET", "/account/api-keys"))["apiKeys"]
    rows = [[_esc(k["name"]), f'<code>{_esc(k["prefix"])}</code>', _esc(k["permissions"]),
             "Active" if k["isActive"] else "Revoked or expired",
             _esc(k["lastUsedAt"] or "never"), _esc(k["expiresAt"] or "never"),
             button(v, f"/keys/{k['id']}/revoke", "Revoke", "danger")
             if k["isActive"] and v.may("DELETE", "/account/api-keys/{keyId}") else ""]
            for k in keys]
    form = "<h2>Create a key</h2>" + render_form(
        v, "/keys", KEY_FIELDS, {}, dict(v.form) if errors else {}, errors, "Create"
    ) if v.may("POST", "/account/api-keys") else ""
    return document(v, "API keys", notice + table(
        ("Name", "Prefix", "Permissions", "State", "Last used", "Expires", ""), rows,
        "No keys.") + form, 400 if errors else 200)


@dash("/keys/{keyId}/revoke", "POST")
async def key_revoke(v: Visit) -> Response:
    await act(v, "DELETE", "/account/api-keys/{keyId}", dict(v.request.path_params))
    return redirect("/keys")


CHANGE_PASSWORD_FIELDS = (Field("current", "string", True, maximum=1024,
                                doc="Current password"), *PASSWORD_FIELDS)


async def _account_forms(v: Visit) -> tuple[dict[str, str], dict[str, str], str]:
    """Handle a POST of the account page: (settings errors, password errors, notice)."""
    if v.form.get("form") == "password":
        try:
            clean = validate(CHANGE_PASSWORD_FIELDS, form_body(
                CHANGE_PASSWORD_FIELDS, {}, v.form, None), {"cfg": v.rt.cfg})
        except ValidationFailed as exc:
            return {}, issue_errors(exc), ""
        stored = await v.rt.db.fetchval("SELECT password_hash FROM accounts WHERE id = ?",
                                        (v.who.account_id,))
        if not await asyncio.to_thread(verify_password, clean["current"], stored):
            return {}, {"current": "Wrong password"}, ""
        await set_password(v.rt.db, v.who.account_id, clean["password"])
        return {}, {}, "Password changed; every session was signed out."
    try:
        await act(v, "PUT", "/account", body=form_body(ACCOUNT_FIELDS, {}, v.form, {}))
    except ValidationFailed as exc:
        return issue_errors(exc), {}, ""
    return {}, {}, "Settings saved."


@dash("/account", "GET", "POST")
async def account_page(v: Visit) -> Response:
    """Settings, password, signing out everywhere and the team's API usage per endpoint."""
    errors: dict[str, str] = {}
    password_errors: dict[str, str] = {}
    notice = ""
    if v.request.method == "POST":
        errors, password_errors, notice = await _account_forms(v)
        if notice.startswith("Password"):
            return redirect("/signin")
    account = await act(v, "GET", "/account")
    usage = await act(v, "GET", "/account/usage", query={"period": v.query("period", "24h")})
    values = dict(v.form) if errors else form_values(ACCOUNT_FIELDS, {}, account)
    rows = [[f"<code>{_esc(endpoint)}</code>", f'<span class="num">{count}</span>']
            for endpoint, count in usage["requestsByEndpoint"].items()]
    body = (
        (f'<p class="notice" role="status">{_esc(notice)}</p>' if notice else "") +
        f'<p>Signed in as <strong>{_esc(account["email"])}</strong> ({_esc(v.who.role)}).</p>'
        + (render_form(v, "/account", ACCOUNT_FIELDS, {}, values, errors, "Save settings")
           if v.may("PUT", "/account") else "") +
        "<h2>Password</h2>" + render_form(
            v, "/account", CHANGE_PASSWORD_FIELDS, {}, {}, password_errors, "Change password",
            '<input type="hidden" name="form" value="password">') +
        "<h2>Sessions</h2><p>Sign out of every browser, this one included.</p>" +
        button(v, "/signout-everywhere", "Sign out everywhere", "danger") +
        f"<h2>API usage ({_esc(usage['period'])})</h2>" +
        table(("Endpoint", "Requests"), rows, "No API requests in this period."))
    return document(v, "Account", body, 400 if errors or password_errors else 200)


# Signing in, first setup, invitations and signing out.

def _next(v: Visit) -> str:
    """Where to go after signing in: a path on this site only."""
    target = v.form.get("next") or v.query("next") or "/"
    return target if target.startswith("/") and not target.startswith(("//", "/\\")) else "/"


def client_ip(v: Visit) -> str:
    return v.rt.clients.of(v.request) or "unknown"


async def _signed_in(v: Visit, account_id: str) -> Response:
    response = redirect(_next(v))
    session_cookie(v.rt, v.request, response, await create_session(v.rt, account_id))
    return response


async def _signin(v: Visit) -> tuple[Response | None, dict[str, str]]:
    try:
        clean = validate(SIGNIN_FIELDS, form_body(SIGNIN_FIELDS, {}, v.form, None),
                         {"cfg": v.rt.cfg})
    except ValidationFailed as exc:
        return None, issue_errors(exc)
    await signin_allowed(v.rt, clean["email"], client_ip(v))
    row = await v.rt.db.fetchone("SELECT id, password_hash FROM accounts WHERE email = ?",
                                 (clean["email"],))
    if not await asyncio.to_thread(verify_password, clean["password"],
                                   row["password_hash"] if row else None) or row is None:
        await signin_failed(v.rt, clean["email"], client_ip(v))
        return None, {"": "Wrong email or password."}
    return await _signed_in(v, row["id"]), {}


@dash("/signin", "GET", "POST", signed_in=False)
async def signin_page(v: Visit) -> Response:
    errors: dict[str, str] = {}
    if v.request.method == "POST":
        response, errors = await _signin(v)
        if response is not None:
            return response
    values = {"email": v.form.get("email", "")}
    hidden = f'<input type="hidden" name="next" value="{_esc(_next(v))}">'
    return document(v, "Sign in", render_form(v, "/signin", SIGNIN_FIELDS, {}, values, errors,
                                              "Sign in", hidden), 401 if errors else 200)


async def _choose_password(v: Visit, action: str, title: str, intro: str,
                           done: Callable[[str], Awaitable[Response]]) -> Response:
    """The password form of ``/setup`` and ``/invite``; a valid POST calls ``done``."""
    errors: dict[str, str] = {}
    if v.request.method == "POST":
        try:
            clean = validate(PASSWORD_FIELDS, form_body(PASSWORD_FIELDS, {}, v.form, None),
                             {"cfg": v.rt.cfg})
            return await done(clean["password"])
        except ValidationFailed as exc:
            errors = issue_errors(exc)
    token = _esc(v.query("token") or v.form.get("token", ""))
    hidden = f'<input type="hidden" name="token" value="{token}">'
    return document(v, title, f"<p>{_esc(intro)}</p>" + render_form(
        v, action, PASSWORD_FIELDS, {}, {}, errors, "Set password", hidden),
        400 if errors else 200)


@dash("/setup", "GET", "POST", signed_in=False)
async def setup_page(v: Visit) -> Response:
    """The first owner's one-time link: choose a password, then you are signed in."""
    token = v.query("token") or v.form.get("token", "")
    row = await v.rt.db.fetchone(
        "SELECT s.account_id, a.email FROM setup_tokens s JOIN accounts a ON a.id = s.account_id"
        " WHERE s.token_hash = ? AND s.expires_at > ?", (hash_key(token), now_ms()))
    if row is None:
        raise NotFound("This setup link is unknown, used or expired",
                       "run 'statusapp passwd --email EMAIL' to set a password instead")

    async def done(password: str) -> Response:
        await set_password(v.rt.db, row["account_id"], password)
        await v.rt.db.write([("DELETE FROM setup_tokens WHERE account_id = ?",
                              (row["account_id"],))])
        return await _signed_in(v, row["account_id"])
    return await _choose_password(v, "/setup", "Welcome to StatusApp",
                                  f"Choose the password of {row['email']}.", done)


@dash("/invite", "GET", "POST", signed_in=False)
async def invite_page(v: Visit) -> Response:
    """Accept a team invitation in the browser: choose a password and join."""
    token = v.query("token") or v.form.get("token", "")

    async def done(password: str) -> Response:
        joined = await act(v, "POST", "/team/invitations/{token}/accept", {"token": token})
        account = await v.rt.db.fetchrow("SELECT id, password_hash FROM accounts WHERE email = ?",
                                         (joined["member"]["email"],))
        if account["password_hash"]:  # an existing person keeps the password they have
            return redirect("/signin")
        await set_password(v.rt.db, account["id"], password)
        return await _signed_in(v, account["id"])
    return await _choose_password(v, "/invite", "Join the team",
                                  "Choose a password to accept the invitation.", done)


@dash("/signout", "POST", signed_in=False)
async def signout(v: Visit) -> Response:
    if v.session:
        await v.rt.db.write([("DELETE FROM sessions WHERE id = ?", (v.session.id,))])
    response = redirect("/signin")
    session_cookie(v.rt, v.request, response, "")
    return response


@dash("/signout-everywhere", "POST")
async def signout_everywhere(v: Visit) -> Response:
    await v.rt.db.write([("DELETE FROM sessions WHERE account_id = ?", (v.who.account_id,))])
    response = redirect("/signin")
    session_cookie(v.rt, v.request, response, "")
    return response


async def dashboard_css(request: Request) -> Response:
    return Response(DASHBOARD_CSS, 200, {"Cache-Control": "public, max-age=31536000, immutable"},
                    "text/css; charset=utf-8")


DASHBOARD_ROUTES.append(Route("/dashboard.css", dashboard_css, methods=["GET"]))


# --- Application ---
#
# The application object: ``Runtime`` holds one running StatusApp, ``SERVICES`` are its
# background loops and ``create_app`` wires the routes of every section together.


# Long-running background coroutines, each ``async def run_x(rt: Runtime) -> None``, started
# with the server and cancelled at shutdown.
_SERVICE_RESTART_DELAY = 5.0


SERVICES: tuple[Callable[[Runtime], Awaitable[None]], ...] = (
    run_scheduler, run_heartbeats, run_incidents, run_retention, run_regression, run_verdicts,
    run_regions, run_maintenance)


class Runtime:
    """Everything one running StatusApp holds: config, database, limiter, counters, tasks."""

    def __init__(self, cfg: dict[str, dict[str, Any]]) -> None:
        self.cfg = cfg
        self.db = Database(cfg["server"]["database"])
        self.limiter = RateLimiter()
        self.clients = ClientAddresses(cfg["server"]["trusted_proxies"])
        self.usage = UsageCounter()
        self.started = time.monotonic()
        self.started_at = now_ms()
        self.regions: dict[str, WorkerRegion] = {}
        self.listeners: list[MonitorListener] = []
        self.public_cache = PublicCache()
        self.list_pages = PublicCache(LIST_CACHE_ENTRIES, LIST_CACHE_SECONDS)
        self.flights = SingleFlight()
        self._background: set[asyncio.Task[Any]] = set()
        self.settled_days: SettledDays = {}
        self.heartbeats = Heartbeats(self)
        self.maintenance = Maintenance(self)
        self.verdicts = Verdicts(self)
        self.agent_sync = AgentSync(self)
        self.agent_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock)
        self.scheduler: Scheduler | None = None
        self.engine_wake = asyncio.Event()  # set after a status transition is committed
        self.outbox_wake = asyncio.Event()  # set after an alert is queued (or by delivery)
        self.db.wake_on_insert("status_transitions", self.engine_wake)
        self.db.wake_on_insert("alert_outbox", self.outbox_wake)
        self.performance: dict[str, tuple[int, dict[str, Any]]] = {}  # team -> (at, figures)
        self.secret = ""  # signs dashboard session cookies (server_secrets)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Open the database, register the local region, create the owner on first run."""
        await self.db.open()
        await prepare_database(self.db, self.cfg)
        self.secret = await server_secret(self.db)
        await self.load_regions()
        await self.verdicts.load()
        await self.maintenance.reload()
        self._tasks.append(asyncio.create_task(repeat(5.0, lambda: self.usage.flush(self.db))))
        self._tasks += [asyncio.create_task(self._supervise(service)) for service in SERVICES]

    async def _supervise(self, service: Callable[[Runtime], Awaitable[None]]) -> None:
        """Run a background service for the server's life; if it crashes, log why and start
        it again, so no failure silently stops probing, deadlines or alerts."""
        while True:
            try:
                await service(self)
                return
            except Exception:
                log_failure("service %s crashed; restarting it in %s s", service.__name__,
                              _SERVICE_RESTART_DELAY)
                await asyncio.sleep(_SERVICE_RESTART_DELAY)

    async def load_regions(self) -> list[WorkerRegion]:
        """Every worker region (active or not), as ``regions`` keeps them."""
        rows = [worker_region(r) for r in await self.db.fetchall("SELECT * FROM worker_regions")]
        self.regions = {r["id"]: r for r in rows}
        return rows

    def background(self, work: Awaitable[Any]) -> None:
        """Run ``work`` without waiting for it; a failure is logged."""
        async def guarded() -> None:
            try:
                await work
            except Exception:
                log_failure("background work failed")
        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def monitor_changed(self, monitor_id: str, kind: str | None = None) -> None:
        """Tell the background services that a monitor was created, edited or deleted
        (``kind``: its type now, when the caller knows it; spares the heartbeat service a read)."""
        for listener in self.listeners:
            listener(monitor_id, kind)

    async def stop(self) -> None:
        """Stop background work, write what is pending and close the database."""
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await self.usage.flush(self.db)
        await self.db.close()


async def prepare_database(db: Database, cfg: dict[str, dict[str, Any]]) -> None:
    """Register the local region (a real write) and, on first run, create the owner and print
    its key once."""
    region = cfg["region"]
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO worker_regions (id, city, country, country_code, latitude, longitude,"
            " is_active, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE"
            " SET city = excluded.city, country = excluded.country,"
            " country_code = excluded.country_code, latitude = excluded.latitude,"
            " longitude = excluded.longitude, is_active = excluded.is_active",
            (region["id"], region["city"], region["country"], region["country_code"],
             region["latitude"], region["longitude"], int(cfg["probes"]["local"]), now_ms()))
        first_run = not await (await conn.execute("SELECT 1 FROM accounts")).fetchone()
        if first_run:
            account = await create_account(conn, "admin@localhost", "Admin",
                                           cfg["account"]["plan"])
            _, key = await create_api_key(conn, account, "first-run key", "read,write,delete")
            setup = await create_setup_token(conn, account)
    if first_run:
        print(f"StatusApp: created the owner account admin@localhost. Its API key, shown "
              f"only this once:\n{key}\nOpen this link within an hour to choose its "
              f"dashboard password:\n{cfg['server']['base_url']}/setup?token={setup}",
              file=sys.stderr, flush=True)


class StatusApp(Starlette):
    """The ASGI application: heartbeat pings of known monitors are answered first (see
    answer_ping), everything else by Starlette's middleware and routes."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not (scope["type"] == "http" and scope["path"].startswith(_PING_PREFIX)
                and await answer_ping(self, scope, receive, send)):
            await super().__call__(scope, receive, send)


def create_app(cfg: dict[str, dict[str, Any]]) -> Starlette:
    """The ASGI application: every route, the error handler, CORS and the runtime's lifespan."""
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        rt = Runtime(cfg)
        try:
            await rt.start()
            app.state.statusapp = rt
            yield
        finally:  # after a failed start too: open connections would keep the process alive
            await rt.stop()

    return StatusApp(routes=[*ROUTES, *PAGE_ROUTES, *METRICS_ROUTES, *DASHBOARD_ROUTES],
                     lifespan=lifespan,
                     middleware=[Middleware(Cors)],
                     exception_handlers={ApiError: on_api_error, HTTPException: on_api_error,
                                         Exception: on_api_error})


class _Reaping:
    """Mixed into uvicorn's HTTP protocol (see serving_http): deadlines for each request's
    headers and body.

    uvicorn closes a keep-alive connection idle after a response (``timeout_keep_alive``) but
    gives a new connection, or one sending its headers or body a byte at a time, all the time
    in the world.  Here, whenever the connection waits for a request (on opening and after each
    response), the request's headers must be complete within ``header_timeout`` seconds, and
    then its body within as long again, or the connection is closed.  One timer per connection
    follows the latest deadline (re-armed when it fires early), rather than a new timer for each
    request."""

    header_timeout = 10.0
    _deadline: asyncio.TimerHandle | None = None
    _due = 0.0  # loop time of the latest deadline
    _awaited: tuple[Any, bool] = (None, False)  # its (cycle, body), as _expire takes them
    cycle: Any  # uvicorn's request-response cycle of the current request
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._set_deadline(body=False)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()  # type: ignore[misc]
        self._set_deadline(body=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._set_deadline(body=False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def _set_deadline(self, body: bool) -> None:
        self._due, self._awaited = self.loop.time() + self.header_timeout, (self.cycle, body)
        if self._deadline is None and not self.transport.is_closing():
            self._deadline = self.loop.call_at(self._due, self._on_timer)

    def _on_timer(self) -> None:
        self._deadline = None
        if self.loop.time() < self._due:
            self._deadline = self.loop.call_at(self._due, self._on_timer)
        else:
            self._expire(*self._awaited)

    def _expire(self, cycle: Any, body: bool) -> None:
        """Close if what was awaited never came: a new request's headers (``cycle``, the
        request current when the deadline was set, is still current and answered), or
        (``body``) the rest of ``cycle``'s request, still unanswered."""
        if self.cycle is not cycle or self.transport.is_closing():
            return
        busy = cycle is not None and not cycle.response_complete
        if (busy and cycle.more_body) if body else not busy:
            self.transport.close()


class _OneSegment:
    """Mixed into uvicorn's HTTP protocol (see serving_http): the writes of one turn of the
    event loop go out together.  uvicorn writes a response's head and its body separately, so
    a small answer costs two sends, two TCP segments and two wake-ups of the client; joined, a
    heartbeat's answer costs one."""

    transport: Any
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.transport = _JoinedWrites(self.transport, self.loop)


class _JoinedWrites:
    """A transport whose writes wait for the end of the event loop's turn and are then sent as
    one; everything else is the wrapped transport's (closing sends what waits first)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._waiting: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._waiting:
            self._loop.call_soon(self._send)
        self._waiting.append(data)

    def _send(self) -> None:
        data, self._waiting = b"".join(self._waiting), []
        if data and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._send()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def serving_http(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with _Reaping's deadlines and _OneSegment's joined writes,
    for ``uvicorn.Config(http=...)`` (uvicorn is imported here, as in serve: an agent never
    serves)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    return type("ServingHTTP", (_Reaping, _OneSegment, HttpToolsProtocol),
                {"header_timeout": header_timeout})


class _OnTheSecond:
    """Mixed into uvicorn.Server (see calm_server): its main loop wakes once a second, just
    after the second turns, instead of ten times a second, so an idle server costs next to
    nothing; the Date header it keeps is still right to the second, and a signal to stop wakes
    it at once, so shutting down stays prompt."""

    should_exit: bool
    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        while not await self.on_tick(0):  # type: ignore[attr-defined]  # 0: update the Date
            now = time.time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.002 - now % 1):
                    await self._wake.wait()

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)  # type: ignore[misc]
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)


def calm_server(config: Any) -> Any:
    """A uvicorn.Server with _OnTheSecond's main loop (uvicorn is imported here, as in serve)."""
    import uvicorn
    return type("CalmServer", (_OnTheSecond, uvicorn.Server), {})(config)


# --- CLI ---


# Loggers kept at WARNING whatever the level: httpx's per-request INFO line (method and full
# URL; probes log at debug instead) and aiosqlite's debug lines (every statement with its
# parameters: key hashes, auth configs, heartbeat bodies).
_QUIET_LOGGERS = ("httpx", "aiosqlite")


def setup_logging(level: str) -> None:
    """One stderr handler for every logger (uvicorn's too), each line redacted."""
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--config`` and ``--db``, which every command takes."""
    command = click.option("--db", help="SQLite database file (server.database).")(command)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        help="TOML config file (or STATUSAPP_CONFIG).")(command)


def _config(config_path: str | None, db: str | None, **server: Any) -> dict[str, dict[str, Any]]:
    try:
        return load_config(config_path, {"server": {"database": db, **server}})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


async def _with_db(cfg: dict[str, dict[str, Any]],
                   job: Callable[[Database], Awaitable[Any]]) -> Any:
    db = Database(cfg["server"]["database"], readers=1)
    await db.open()
    try:
        return await job(db)
    finally:
        await db.close()


def _run(cfg: dict[str, dict[str, Any]], job: Callable[[Database], Awaitable[Any]]) -> Any:
    """Run one database job to completion from a synchronous command."""
    try:
        return asyncio.run(_with_db(cfg, job))
    except (sqlite3.Error, RuntimeError) as exc:
        raise click.ClickException(f"database {cfg['server']['database']}: {exc}") from None


def _write_one(cfg: dict[str, dict[str, Any]], sql: str, params: Sequence[Any]) -> int:
    """Run one write statement; the rows it changed."""
    async def job(database: Database) -> int:
        async with database.transaction() as conn:
            return (await conn.execute(sql, params)).rowcount
    return _run(cfg, job)


@click.group()
@click.version_option(VERSION, prog_name="statusapp")
def cli() -> None:
    """StatusApp: a self-hosted uptime monitor on SQLite."""


@cli.command()
@_options
@click.option("--host", help="Address to listen on (server.host).")
@click.option("--port", type=int, help="Port to listen on (server.port).")
def serve(config_path: str | None, db: str | None, host: str | None, port: int | None) -> None:
    """Run the API, the prober and the notifiers in one process.

    The port is bound and the database opened and written to before anything else happens
    (before the first-run key is printed), so a start that cannot work stops at once, with
    one line naming the cause."""
    import uvicorn  # here, not at the top: an agent never serves, and saves its memory
    cfg = _config(config_path, db, host=host, port=port)
    server = cfg["server"]
    sock = _listen(server["host"], server["port"])
    try:
        _preflight(cfg)
    except click.ClickException:
        sock.close()
        raise
    setup_logging(server["log_level"])
    runner = calm_server(uvicorn.Config(
        create_app(cfg), host=server["host"], port=server["port"], log_level=server["log_level"],
        lifespan="on", access_log=False, server_header=False, log_config=None, proxy_headers=False,
        http=serving_http(server["header_timeout"]), timeout_keep_alive=server["keepalive_timeout"],
        limit_concurrency=server["max_connections"] or None))
    gc.freeze()  # what start-up made lives for good: kept out of the collector's full passes
    runner.run(sockets=[sock])
    if not runner.started:
        raise click.ClickException("start-up failed (see the log above)")


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a port in use is one line, before any other work."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise click.ClickException(f"cannot listen on {host}:{port}: {reason}") from None


def _database_problem(path: Path) -> str | None:
    """What is wrong with a --db path that SQLite would report less clearly, if anything."""
    if path.is_dir():
        return "is a directory, not a database file"
    if not path.parent.is_dir():
        return f"cannot be created: the folder {path.parent} does not exist"
    if path.exists() and not os.access(path, os.R_OK):
        return "cannot be read: permission denied"
    return None


def _preflight(cfg: dict[str, dict[str, Any]]) -> None:
    """Open, migrate and write to the database as the server will, printing its absolute path
    (and the first-run key); any failure is a ClickException naming the path and the cause."""
    path = Path(cfg["server"]["database"]).absolute()
    problem = _database_problem(path)
    if problem:
        raise click.ClickException(f"database {path} {problem}")
    print(f"StatusApp: database {path}", file=sys.stderr, flush=True)
    log.disabled = True  # the one line below says it; no storage log line besides
    try:
        asyncio.run(_with_db(cfg, lambda db: prepare_database(db, cfg)))
    except (sqlite3.Error, OSError, RuntimeError) as exc:
        cause = storage_cause(exc) or (exc.strerror if isinstance(exc, OSError) else str(exc))
        raise click.ClickException(f"database {path}: {cause}") from None
    finally:
        log.disabled = False


@cli.command()
@_options
@click.option("--email", required=True, help="The owner's email address.")
@click.option("--name", help="The owner's name.")
def init(config_path: str | None, db: str | None, email: str, name: str | None) -> None:
    """Create the owner account if absent and print a new full-access API key."""
    cfg = _config(config_path, db)

    async def job(database: Database) -> tuple[bool, str]:
        async with database.transaction() as conn:
            row = await (await conn.execute("SELECT id FROM accounts WHERE email = ?",
                                            (email,))).fetchone()
            account = row[0] if row else await create_account(conn, email, name,
                                                               cfg["account"]["plan"])
            _, key = await create_api_key(conn, account, "init", "read,write,delete")
        return row is None, key

    created, key = _run(cfg, job)
    click.echo(f"{'Created' if created else 'Found'} account {email}; new API key:")
    click.echo(key)


@cli.command()
@_options
@click.option("--email", required=True, help="The account whose password to set.")
def passwd(config_path: str | None, db: str | None, email: str) -> None:
    """Set the dashboard password of EMAIL: read from stdin (one line), or prompted on a
    terminal.  Every session of the account is signed out."""
    cfg = _config(config_path, db)
    password = (click.prompt("New password", hide_input=True, confirmation_prompt=True)
                if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n"))
    try:
        validate(PASSWORD_FIELDS[:1], {"password": password}, {"cfg": cfg})
    except ValidationFailed as exc:
        raise click.ClickException(f"password: {exc.issues[0]['message']}") from None

    async def job(database: Database) -> bool:
        account = await database.fetchval("SELECT id FROM accounts WHERE email = ?", (email,))
        if account is not None:
            await set_password(database, account, password)
        return account is not None

    if not _run(cfg, job):
        raise click.ClickException(f"no account with email {email}")
    click.echo(f"password set for {email}")


@cli.group()
def apikey() -> None:
    """Create, list and revoke API keys."""


def _expiry(value: str | None) -> int | None:
    if value is None:
        return None
    when = _parse_time(value)
    if when is None:
        raise click.BadParameter("use an ISO date such as 2027-01-31 or 2027-01-31T12:00:00Z",
                                 param_hint="--expires")
    if when.timestamp() <= time.time():
        raise click.BadParameter("the expiry must be in the future", param_hint="--expires")
    return int(when.timestamp() * 1000)


def _permissions(value: str) -> str:
    perms = [p.strip() for p in value.split(",") if p.strip()]
    if not perms or any(p not in PERMISSIONS for p in perms):
        raise click.BadParameter(f"a comma-separated subset of {','.join(PERMISSIONS)}",
                                 param_hint="--permissions")
    return ",".join(p for p in PERMISSIONS if p in perms)


@apikey.command("create")
@_options
@click.option("--email", required=True, help="The account the key belongs to.")
@click.option("--name", required=True, help="A name for the key.")
@click.option("--permissions", default="read,write", show_default=True,
              help="Comma-separated: read, write, delete.")
@click.option("--expires", help="Expiry date (ISO 8601); none for a permanent key.")
def apikey_create(config_path: str | None, db: str | None, email: str, name: str,
                  permissions: str, expires: str | None) -> None:
    """Create a key; it is printed once, as the last line."""
    cfg = _config(config_path, db)
    perms, expires_at = _permissions(permissions), _expiry(expires)

    async def job(database: Database) -> str | None:
        async with database.transaction() as conn:
            row = await (await conn.execute("SELECT id FROM accounts WHERE email = ?",
                                            (email,))).fetchone()
            if row is None:
                return None
            return (await create_api_key(conn, row[0], name, perms, expires_at))[1]

    key = _run(cfg, job)
    if key is None:
        raise click.ClickException(f"no account with email {email}; run 'statusapp init' first")
    click.echo(f"API key '{name}' ({perms}) for {email}:")
    click.echo(key)


@apikey.command("list")
@_options
def apikey_list(config_path: str | None, db: str | None) -> None:
    """List every key (never the key itself)."""
    cfg = _config(config_path, db)
    rows = _run(cfg, lambda database: database.fetchall(
        "SELECT k.*, a.email FROM api_keys k JOIN accounts a ON a.id = k.account_id"
        " ORDER BY k.created_at"))
    for r in rows:
        state = "active" if r["is_active"] else "revoked"
        click.echo(f"{r['id']}  {r['email']}  {r['name']!r}  {r['prefix']}  {r['permissions']}  "
                   f"{state}  expires={iso(r['expires_at']) or 'never'}  "
                   f"last_used={iso(r['last_used_at']) or 'never'}")


@apikey.command("revoke")
@_options
@click.argument("key_id")
def apikey_revoke(config_path: str | None, db: str | None, key_id: str) -> None:
    """Revoke a key by id; it stops working at once."""
    cfg = _config(config_path, db)
    if not _write_one(cfg, "UPDATE api_keys SET is_active = 0 WHERE id = ?", (key_id,)):
        raise click.ClickException(f"no API key with id {key_id}")
    click.echo(f"revoked {key_id}")


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML config file for probe settings ([probes]); optional.")
@click.option("--server", required=True, help="The StatusApp server's base URL (https://...).")
@click.option("--token", required=True, envvar="STATUSAPP_AGENT_TOKEN",
              help="The region's agent token (or STATUSAPP_AGENT_TOKEN).")
@click.option("--state", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the unsent-results buffer.")
@click.option("--buffer-limit", default=200_000, show_default=True, type=click.IntRange(1),
              help="Results kept on disk while the server is unreachable.")
def agent(config_path: str | None, server: str, token: str, state: str,
          buffer_limit: int) -> None:
    """Probe one worker region's monitors for a StatusApp server (dials out only)."""
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    setup_logging(cfg["server"]["log_level"])  # redacted; no httpx line per poll and batch
    asyncio.run(_until_signalled(run_agent(cfg, server, token, Path(state), buffer_limit)))


async def _until_signalled(job: Awaitable[None]) -> None:
    """Run ``job`` until SIGTERM or SIGINT cancels it (so its clean-up runs)."""
    task = asyncio.ensure_future(job)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


@cli.group()
def region() -> None:
    """Register worker regions for agents; list, remove them and rotate their tokens."""


@region.command("add")
@_options
@click.argument("region_id")
@click.option("--name", required=True, help="A display name, e.g. 'Home (Berlin)'.")
@click.option("--city", help="City (default: the name).")
@click.option("--country", default="", help="Country name.")
@click.option("--country-code", default="ZZ", show_default=True, help="ISO 3166 alpha-2 code.")
@click.option("--lat", type=float, default=0.0, help="Latitude.")
@click.option("--lon", type=float, default=0.0, help="Longitude.")
def region_add(config_path: str | None, db: str | None, region_id: str, name: str,
               city: str | None, country: str, country_code: str, lat: float, lon: float) -> None:
    """Register a region probed by an agent; its token is printed once, as the last line."""
    cfg = _config(config_path, db)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", region_id):
        raise click.BadParameter("letters, digits, '_', '.', '-' (at most 64)",
                                 param_hint="REGION_ID")
    token, digest = generate_agent_token()
    try:
        _write_one(cfg, "INSERT INTO worker_regions (id, name, city, country, country_code,"
                           " latitude, longitude, is_active, token_hash, created_at)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                      (region_id, name, city or name, country, country_code.upper(), lat, lon,
                       digest, now_ms()))
    except click.ClickException:
        raise click.ClickException(f"region {region_id} already exists") from None
    click.echo(f"Region {region_id} ({name}) added. Run its agent with\n  STATUSAPP_AGENT_TOKEN="
               f"<token> statusapp agent --server {cfg['server']['base_url']}\nIts token:\n{token}")


@region.command("list")
@_options
def region_list(config_path: str | None, db: str | None) -> None:
    """List every region with its liveness (never a token)."""
    cfg = _config(config_path, db)
    for row in _run(cfg, lambda d: d.fetchall("SELECT * FROM worker_regions ORDER BY id")):
        r = region_json(worker_region(row))
        kind = "agent" if r["isAgent"] else "server"
        state = "active" if r["isActive"] else "inactive"
        click.echo(f"{r['id']}  {r['name']!r}  {r['city']}, {r['countryCode']}  {kind}  {state}"
                   f"  last_seen={r['lastSeenAt'] or 'never'}")


@region.command("remove")
@_options
@click.argument("region_id")
def region_remove(config_path: str | None, db: str | None, region_id: str) -> None:
    """Remove an agent's region: its token stops working at once; its checks are kept, and
    monitors naming it in enabledWorkerRegionIds no longer do.  Refused while a monitor names
    it as its only region (removing it there would mean every region): edit those first."""
    cfg = _config(config_path, db)

    async def job(database: Database) -> list[str]:
        async with database.transaction() as conn:
            naming = await conn.execute_fetchall(
                "SELECT id, name, enabled_worker_region_ids AS ids FROM monitors WHERE ? IN"
                " (SELECT value FROM json_each(enabled_worker_region_ids)) ORDER BY id",
                (region_id,))
            if not (await conn.execute("DELETE FROM worker_regions WHERE id = ? AND token_hash"
                                       " IS NOT NULL", (region_id,))).rowcount:
                raise click.ClickException(f"no agent region with id {region_id}")
            only = [f"{m['id']} ({m['name']})" for m in naming
                    if json.loads(m["ids"]) == [region_id]]
            if only:
                raise click.ClickException(
                    f"region {region_id} is the only enabled region of {len(only)} monitor(s):"
                    f" {', '.join(only)}. Give them other enabledWorkerRegionIds (or [] for"
                    " every region) first; nothing was removed.")
            await conn.executemany(
                "UPDATE monitors SET enabled_worker_region_ids = ? WHERE id = ?",
                [(json.dumps([r for r in json.loads(m["ids"]) if r != region_id]), m["id"])
                 for m in naming])
        return [m["id"] for m in naming]

    edited = _run(cfg, job)
    click.echo(f"removed {region_id}" + (f"; dropped from the enabledWorkerRegionIds of"
                                         f" {', '.join(edited)}" if edited else ""))


@region.command("rotate-token")
@_options
@click.argument("region_id")
def region_rotate_token(config_path: str | None, db: str | None, region_id: str) -> None:
    """Give a region a new agent token (printed as the last line); the old one stops working."""
    cfg = _config(config_path, db)
    token, digest = generate_agent_token()
    if not _write_one(cfg, "UPDATE worker_regions SET token_hash = ? WHERE id = ? AND"
                              " token_hash IS NOT NULL", (digest, region_id)):
        raise click.ClickException(f"no agent region with id {region_id}")
    click.echo(f"New agent token for {region_id}:")
    click.echo(token)


@cli.group()
def account() -> None:
    """Set a team's plan; disable or enable an account (the API cannot change these)."""


_TEAM_OWNER = "id IN (SELECT team_id FROM team_members WHERE role = 'OWNER')"


def _set_account(config_path: str | None, db: str | None, email: str, column: str, value: str,
                 where: str = "1") -> int:
    """Set one column of the account(s) with ``email`` matching ``where``; the rows changed."""
    cfg = _config(config_path, db)

    async def job(database: Database) -> int:
        async with database.transaction() as conn:
            cursor = await conn.execute(
                f"UPDATE accounts SET {column} = ?, updated_at = ? WHERE email = ? AND {where}",
                (value, now_ms(), email))
            return cursor.rowcount

    return _run(cfg, job)


@account.command("set-plan")
@_options
@click.argument("email")
@click.argument("plan", type=click.Choice(tuple(PLANS), case_sensitive=False))
def account_set_plan(config_path: str | None, db: str | None, email: str, plan: str) -> None:
    """Set the plan (the hourly rate limit) of the team EMAIL owns; it applies at once."""
    if not _set_account(config_path, db, email, "plan", plan.upper(), _TEAM_OWNER):
        raise click.ClickException(f"no team owner with email {email} (a plan belongs to a "
                                   "team: give its owner's email)")
    click.echo(f"team of {email}: plan {plan.upper()} ({PLANS[plan.upper()]:,} requests/hour)")


def _status_command(verb: str, status: str, doc: str) -> None:
    """``statusapp account disable|enable EMAIL``: the account status authenticate checks."""
    @account.command(verb, help=doc)
    @_options
    @click.argument("email")
    def command(config_path: str | None, db: str | None, email: str) -> None:
        if not _set_account(config_path, db, email, "account_status", status):
            raise click.ClickException(f"no account with email {email}")
        click.echo(f"{verb}d {email}")


_status_command("disable", "DISABLED", "Refuse EMAIL's keys with 403; disabling a team owner "
                                       "stops the whole team.")
_status_command("enable", "ENABLED", "Let EMAIL's keys work again.")



def _storage_command(name: str, job: Callable[[str, str], int], doc: str, done: str) -> None:
    """``statusapp backup|restore FILE``: ``job(database, FILE)`` and one line saying so."""
    @cli.command(name, help=doc)
    @_options
    @click.argument("file", type=click.Path(dir_okay=False))
    def command(config_path: str | None, db: str | None, file: str) -> None:
        database = _config(config_path, db)["server"]["database"]
        try:
            version = job(database, file)
        except (StorageError, sqlite3.Error, OSError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(done.format(database=database, file=file, version=version))


_storage_command("backup", backup_database,
                 "Copy the database to FILE while the server runs (a consistent, checked copy).",
                 "backed up {database} to {file} (schema version {version}, integrity ok)")
_storage_command("restore", restore_database,
                 "Replace the database with the backup FILE (stop the server first).",
                 "restored {file} to {database} (schema version {version}); start the server")

# Monitors as code.  ``statusapp apply FILE`` makes the team of an API key match a TOML (or
# JSON) file through the running server's own API, so the server's validation, storage and
# schedule updates are the ones that run.  The file is validated here first with the same Field
# tables, so every error is reported with its place before anything changes.  Objects match by
# name (a maintenance window by title) within their kind, and refer to monitors and channels by
# name; those apply creates or adopts are marked ``managed``, and ``--prune``
# deletes only managed objects the file no longer names.  ``export`` writes the same format,
# every secret as a ``${NAME}`` reference to the environment (the API never shows secrets).

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HIDDEN = "(sensitive)"


@dataclass(frozen=True)
class SetupKind:
    """One kind of object a setup file holds; apply creates them in this order."""

    key: str
    noun: str
    path: str
    fields: tuple[Field, ...]
    title: str = "name"  # the field that names an object of this kind
    rules: Callable[[dict[str, Any]], None] | None = None  # checks across fields, after validate
    empty_differs: tuple[str, ...] = ()  # fields where [] is not null (elsewhere they are alike)


SETUP_KINDS = (SetupKind("channels", "channel", "/notifications", CHANNEL_FIELDS),
               SetupKind("monitors", "monitor", "/monitors", MONITOR_FIELDS),
               SetupKind("statusPages", "status page", "/status-pages", STATUS_PAGE_FIELDS),
               SetupKind("maintenanceWindows", "maintenance window", "/maintenance-windows",
                         MAINTENANCE_FIELDS, "title", window_rules, ("monitorIds",)))


class SetupError(Exception):
    """A setup file that cannot be applied: every problem, each with its place."""


def _place(parts: Sequence[Any]) -> str:
    """``monitors[3].interval`` from ``("monitors", 3, "interval")``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _issue_lines(where: tuple[Any, ...], exc: ApiError) -> list[str]:
    """An API error as lines naming places in the file."""
    if isinstance(exc, ValidationFailed):
        return [f"{_place((*where, *i['path']))}: {i['message']}" for i in exc.issues]
    return [f"{_place(where)}: {exc.message}"]


def _expand(value: Any, where: tuple[Any, ...], problems: list[str],
            sensitive: set[tuple[Any, ...]]) -> Any:
    """``value`` with each ``${NAME}`` taken from the environment; the places that held one go
    into ``sensitive``, so the plan never prints them."""
    if isinstance(value, dict):
        return {k: _expand(v, (*where, k), problems, sensitive) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*where, i), problems, sensitive) for i, v in enumerate(value)]
    if not isinstance(value, str) or not _ENV_REF.search(value):
        return value
    sensitive.add(where)
    missing = [name for name in _ENV_REF.findall(value) if name not in os.environ]
    problems += [f"{_place(where)}: environment variable {name} is not set" for name in missing]
    return _ENV_REF.sub(lambda match: os.environ.get(match[1], ""), value)


def read_setup(path: str) -> tuple[dict[str, list[dict[str, Any]]], set[tuple[Any, ...]]]:
    """A setup file's entries per kind, environment references filled in, and the places that
    held secrets from the environment; SetupError lists every problem of shape."""
    try:
        text = Path(path).read_text()
        data = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise SetupError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise SetupError(f"{path}: expected a table (a JSON object) of arrays")
    known = {kind.key for kind in SETUP_KINDS}
    problems = [f"{key}: unknown section (use {', '.join(sorted(known))})"
                for key in data if key not in known]
    for key in known & set(data):
        if not isinstance(data[key], list) or not all(isinstance(e, dict) for e in data[key]):
            problems.append(f"{key}: must be an array of tables ([[{key}]])")
    if problems:
        raise SetupError("\n".join(problems))
    sensitive: set[tuple[Any, ...]] = set()
    setup = {key: _expand(data.get(key, []), (key,), problems, sensitive) for key in known}
    if problems:
        raise SetupError("\n".join(problems))
    return setup, sensitive


class SetupApi:
    """The running server's API, as apply and export use it."""

    def __init__(self, url: str, key: str) -> None:
        self.key = key
        self.http = httpx.Client(base_url=url.rstrip("/") + API_PREFIX, timeout=30,
                                 headers={"X-API-Key": key, APPLY_HEADER: "1"})

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; an API error comes back as the ApiError it was."""
        try:
            response = self.http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise SetupError(f"{self.http.base_url}: {exc}") from None
        data = response.json() if response.content else {}
        if response.status_code < 400:
            return data
        if isinstance(data.get("error"), list):
            raise ValidationFailed(data["error"])
        raise ApiError(str(data.get("error", response.reason_phrase)), status=response.status_code)

    def objects(self, kind: SetupKind) -> list[dict[str, Any]]:
        """Every object of ``kind`` the team has, oldest first, as the API shows one."""
        if kind.key == "monitors":
            rows, page, pages = [], 1, 1
            while page <= pages:
                data = self.call("GET", f"/monitors?limit=100&page={page}&sort=createdAt&order=asc")
                rows += data["monitors"]
                page, pages = page + 1, data["pagination"]["totalPages"]
            return rows
        if kind.key == "statusPages":
            return [self.call("GET", f"{kind.path}/{page['id']}")
                    for page in self.call("GET", kind.path)["statusPages"]]
        return self.call("GET", kind.path)[kind.key]


def _record(kind: SetupKind, obj: dict[str, Any], names: dict[str, dict[str, str]]
            ) -> dict[str, Any]:
    """An object as the API shows it, reduced to its kind's fields (in the API's terms, but a
    maintenance window's monitors by name, as ``names`` has them)."""
    record = _window_monitor_names(kind, {f.name: obj.get(f.name) for f in kind.fields}, names)
    if kind.key == "monitors":
        record["notifications"] = [
            {"channelId": n["channelId"], "type": None if n["channelId"] else n["type"],
             "enabled": n["enabled"], "config": None if n["channelId"] else n["config"]}
            for n in obj["monitorNotifications"]]
    if kind.key == "statusPages":
        record["monitorGroups"] = [{f.name: g.get(f.name) for f in MONITOR_GROUP_FIELDS}
                                   for g in obj["monitorGroups"]]
    return record


def _window_monitor_names(kind: SetupKind, record: dict[str, Any],
                          names: dict[str, dict[str, str]]) -> dict[str, Any]:
    """A maintenance window's record with its monitorIds as the names they stand for (the ids
    of monitors deleted since, which cover nothing, left out)."""
    if kind.key != "maintenanceWindows" or record.get("monitorIds") is None:
        return record
    return {**record, "monitorIds": [names["monitors"][m] for m in record["monitorIds"]
                                     if m in names["monitors"]]}


def _to_api(kind: SetupKind, entry: dict[str, Any], ids: dict[str, dict[str, str]]
            ) -> dict[str, Any]:
    """A file entry in the API's terms: channels and monitors named by name get their ids."""
    body = {**entry, "managed": True}
    if kind.key == "maintenanceWindows":
        body = _monitors_by_id(body, ids)
    if kind.key == "monitors" and isinstance(body.get("notifications"), list):
        body["notifications"] = [
            {**{k: v for k, v in n.items() if k != "channel"},
             "channelId": ids["channels"].get(str(n["channel"]), f"(unknown: {n['channel']})")}
            if isinstance(n, dict) and "channel" in n else n for n in body["notifications"]]
    if kind.key == "statusPages" and isinstance(body.get("monitorGroups"), list):
        body["monitorGroups"] = [_monitors_by_id(g, ids) for g in body["monitorGroups"]]
    return body


def _monitors_by_id(holder: Any, ids: dict[str, dict[str, str]]) -> Any:
    """A page group or window naming its ``monitors`` by name, as ``monitorIds`` (anything
    but a list of names passed on, for validation to report)."""
    if not isinstance(holder, dict) or "monitors" not in holder:
        return holder
    names = holder["monitors"]
    return {**{k: v for k, v in holder.items() if k != "monitors"}, "monitorIds": [
        ids["monitors"].get(str(m), f"(unknown: {m})") for m in names]
        if isinstance(names, list) else names}


def _shown(name: str, value: Any, record: dict[str, Any]) -> Any:
    """A value as the API would show it back: secrets masked."""
    if name == "config":
        return masked_channel_config(record.get("type"), value)
    if name == "apiAuthConfig":
        return masked_auth(value)
    if name == "notifications":
        return [{**n, "config": masked_channel_config(n["type"], n["config"])}
                for n in value or []]
    return value


_SECRET_HOLDERS = ("config", "apiAuthConfig", "notifications")  # the fields _shown masks


def _secret_values(raw: Any, shown: Any) -> list[Any]:
    """The values masking hides: where ``raw`` differs from how the API shows it."""
    if isinstance(raw, dict) and isinstance(shown, dict):
        return [v for k in raw for v in _secret_values(raw[k], shown.get(k))]
    if isinstance(raw, list) and isinstance(shown, list) and len(raw) == len(shown):
        return [v for r, s in zip(raw, shown) for v in _secret_values(r, s)]
    return [] if raw == shown else [raw]


def secrets_digest(clean: dict[str, Any], key: str) -> str | None:
    """A digest of the secrets in ``clean``, keyed by the API key so that the stored digest
    tells a team member nothing about them; None when there are none."""
    hidden = [v for name in _SECRET_HOLDERS if clean.get(name)
              for v in _secret_values(clean[name], _shown(name, clean[name], clean))]
    if not hidden:
        return None
    return hmac.new(key.encode(), json.dumps(hidden).encode(), hashlib.sha256).hexdigest()[:32]


def _changed(kind: SetupKind, clean: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields whose wanted value differs from the stored one (a secret by its masked form;
    a CRON monitor's url left out is the server's heartbeat URL, not a change)."""
    def same(name: str) -> bool:
        if name in kind.empty_differs:
            return bool(clean[name] == current[name])
        want, have = clean[name] or None, current[name] or None  # [] and null alike
        return want == have or (_shown(name, want, clean) or None) == have or (
            name == "url" and want is None and clean.get("type") == "CRON")
    return [f.name for f in kind.fields if not same(f.name)]


def _shown_change(where: tuple[Any, ...], old: Any, new: Any,
                  sensitive: set[tuple[Any, ...]]) -> list[str]:
    """Plan lines for one changed value: objects key by key, secrets never printed."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in dict.fromkeys([*old, *new]) if old.get(key) != new.get(key)
                for line in _shown_change((*where, key), old.get(key), new.get(key), sensitive)]
    hidden = any(place[:len(where)] == where for place in sensitive) or any(
        isinstance(value, str) and value.startswith("****") for value in (old, new))
    if hidden:
        return [f"    {_place(where[2:])}: {_HIDDEN}"]
    if isinstance(new, list) and any(isinstance(v, dict) for v in [*new, *(old or [])]):
        return [f"    {_place(where[2:])}: {len(old or [])} -> {len(new)} entries, changed"]
    return [f"    {_place(where[2:])}: {json.dumps(old)} -> {json.dumps(new)}"]


@dataclass
class Step:
    """One change of the plan: ``+`` create, ``~`` update (these fields), ``-`` delete."""

    sign: str
    kind: SetupKind
    name: str
    ident: str | None = None
    index: int = 0
    entry: dict[str, Any] | None = None
    fields: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()
    digest: str | None = None

    def text(self) -> str:
        verb = {"+": "create", "~": "update", "-": "delete"}[self.sign]
        return "\n".join([f"{self.sign} {verb} {self.kind.noun} {self.name!r}", *self.lines])


def _stored_matches(kind: SetupKind, entries: list[dict[str, Any]], objects: list[dict[str, Any]]
             ) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Each entry's stored object: the managed one of its name, else an unmanaged one to adopt;
    and the problems (a name given twice)."""
    taken: dict[str, dict[str, Any]] = {}
    for obj in sorted(objects, key=lambda o: not o.get("managed")):
        taken.setdefault(obj[kind.title], obj)
    found, problems, seen = {}, [], set()
    for i, entry in enumerate(entries):
        name = entry.get(kind.title)
        if not isinstance(name, str):
            continue  # validation reports it
        if name in seen:
            problems.append(f"{kind.key}[{i}].{kind.title}: {name!r} is named twice in the file")
        seen.add(name)
        if name in taken:
            found[i] = taken[name]
    return found, problems


def _resolve_names(setup: dict[str, list[dict[str, Any]]],
                   stored: dict[str, list[dict[str, Any]]]
                   ) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, dict[str, str]],
                              list[str]]:
    """Per kind: each entry's stored object, the id each name stands for (a placeholder for
    an object still to create), and the problems (names given twice)."""
    ids = {kind.key: {o[kind.title]: o["id"] for o in stored[kind.key]} for kind in SETUP_KINDS}
    matched, problems = {}, []
    for kind in SETUP_KINDS:
        matched[kind.key], found_problems = _stored_matches(kind, setup[kind.key], stored[kind.key])
        problems += found_problems
        for i, entry in enumerate(setup[kind.key]):
            name = entry.get(kind.title)
            if i in matched[kind.key]:
                ids[kind.key][name] = matched[kind.key][i]["id"]
            elif isinstance(name, str):
                ids[kind.key][name] = f"(new: {name})"
    return matched, ids, problems


def _names(stored: dict[str, list[dict[str, Any]]], ids: dict[str, dict[str, str]]
           ) -> dict[str, dict[str, str]]:
    """Per kind, the name each id (or placeholder of an object to create) stands for."""
    names = {kind.key: {o["id"]: o[kind.title] for o in stored[kind.key]} for kind in SETUP_KINDS}
    for key, by_name in ids.items():
        names[key].update({ident: name for name, ident in by_name.items()})
    return names


def plan_setup(api: SetupApi, setup: dict[str, list[dict[str, Any]]],
               sensitive: set[tuple[Any, ...]], cfg: dict[str, dict[str, Any]],
               prune: bool) -> tuple[list[Step], dict[str, dict[str, str]]]:
    """The steps that make the team match ``setup``, validated in full first, and the ids
    the file's names stand for (placeholders for objects still to create)."""
    stored = {kind.key: api.objects(kind) for kind in SETUP_KINDS}
    matched, ids, problems = _resolve_names(setup, stored)
    names = _names(stored, ids)
    env: ValidationEnv = {"cfg": cfg, "markers": True, "channels": set(ids["channels"].values()),
           "monitors": set(ids["monitors"].values()),
           "regions": {r["id"] for r in api.call("GET", "/worker-regions")["regions"]}}
    steps: list[Step] = []
    for kind in SETUP_KINDS:
        for i, entry in enumerate(setup[kind.key]):
            try:
                clean = validate(kind.fields, _to_api(kind, entry, ids), env)
                if kind.rules:
                    kind.rules(clean)
            except ValidationFailed as exc:
                problems += _issue_lines((kind.key, i), exc)
                continue
            if DIGEST_FIELD in kind.fields:
                clean[DIGEST_FIELD.name] = secrets_digest(clean, api.key)
            steps += _entry_step(kind, i, entry, clean, matched[kind.key].get(i), sensitive,
                                 names)
    if problems:
        raise SetupError("\n".join(problems))
    if prune:
        named = {kind.key: {o["id"] for o in matched[kind.key].values()} for kind in SETUP_KINDS}
        steps += [Step("-", kind, o[kind.title], o["id"]) for kind in reversed(SETUP_KINDS)
                  for o in stored[kind.key] if o.get("managed") and o["id"] not in named[kind.key]]
    return steps, ids


def _entry_step(kind: SetupKind, i: int, entry: dict[str, Any], clean: dict[str, Any],
                obj: dict[str, Any] | None, sensitive: set[tuple[Any, ...]],
                names: dict[str, dict[str, str]]) -> list[Step]:
    """The step one valid file entry needs: create, update, or none (compared, and shown, with
    a window's monitors by name)."""
    digest = clean.get(DIGEST_FIELD.name)
    if obj is None:
        return [Step("+", kind, entry[kind.title], index=i, entry=entry, digest=digest)]
    current = _record(kind, obj, names)
    clean = _window_monitor_names(kind, clean, names)
    fields = _changed(kind, clean, current)
    if DIGEST_FIELD.name in fields:  # a secret changed, though its masked form may not show it
        fields += [name for name in _SECRET_HOLDERS if clean.get(name) and name not in fields]
    if not fields:
        return []
    lines = [line for name in fields if name != DIGEST_FIELD.name
             for line in _shown_change((kind.key, i, name), current[name],
                                       _shown(name, clean[name], clean), sensitive)
             or [f"    {name}: {_HIDDEN}"]]
    return [Step("~", kind, entry[kind.title], obj["id"], i, entry, tuple(fields), tuple(lines),
                 digest)]


def apply_steps(api: SetupApi, steps: list[Step], ids: dict[str, dict[str, str]]) -> None:
    """Carry out the plan: creates and updates in kind order (channels, monitors, pages,
    windows, so names resolve to the ids just made), then deletes."""
    for step in [s for s in steps if s.sign != "-"]:
        assert step.entry is not None
        body = _to_api(step.kind, step.entry, ids)
        if DIGEST_FIELD in step.kind.fields:
            body[DIGEST_FIELD.name] = step.digest
        where = (step.kind.key, step.index)
        try:
            if step.sign == "+":
                ids[step.kind.key][step.name] = api.call("POST", step.kind.path, body)["id"]
            else:
                api.call("PUT", f"{step.kind.path}/{step.ident}",
                         {name: body.get(name) for name in step.fields})
        except ApiError as exc:
            problems = "\n".join(_issue_lines(where, exc))
            raise SetupError(f"{problems}\n(the steps before this one were applied)") from None
    for step in [s for s in steps if s.sign == "-"]:
        api.call("DELETE", f"{step.kind.path}/{step.ident}")


# Export: the stored objects in the file's terms, defaults left out, secrets as ${NAME}.


def _env_name(*parts: Any) -> str:
    words = [re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(p)) for p in parts]
    return re.sub(r"[^A-Z0-9]+", "_", "_".join(words).upper()).strip("_")


def _secret_refs(value: Any, secret: Sequence[str], parts: tuple[Any, ...]) -> Any:
    """A config with each secret value (every value of a secret object) as ``${NAME}``."""
    def ref(item: Any, where: tuple[Any, ...]) -> Any:
        if isinstance(item, dict):
            return {k: ref(v, (*where, k)) for k, v in item.items()}
        return f"${{{_env_name(*where)}}}" if isinstance(item, str) else item
    return {k: ref(v, (*parts, k)) if k in secret else v for k, v in (value or {}).items()}


def _exported(kind: SetupKind, obj: dict[str, Any], names: dict[str, dict[str, str]]
              ) -> dict[str, Any]:
    """One stored object as a file entry."""
    record = _record(kind, obj, names)
    label = (kind.noun.split()[-1], obj[kind.title])
    if kind.key == "channels":
        record["config"] = _secret_refs(record["config"], channel_secrets(obj["type"]),
                                        label)
    if kind.key == "monitors":
        auth = record["apiAuthConfig"] or {}
        record["apiAuthConfig"] = _secret_refs(
            auth, [f.name for f in AUTH_FIELDS if f.secret_for(auth.get("type"))], label) or None
        record["notifications"] = [_exported_link(n, names, (*label, i))
                                   for i, n in enumerate(record["notifications"])]
        if record["type"] == "CRON" and record["url"] == obj.get("heartbeatUrl"):
            record["url"] = None
    if kind.key == "statusPages":
        record["monitorGroups"] = [_exported_group(g, names) for g in record["monitorGroups"]]
    defaults = {f.name: f.default for f in kind.fields}
    entry = {k: v for k, v in record.items() if v not in (None, []) and v != defaults[k]
             and k not in (MANAGED_FIELD.name, DIGEST_FIELD.name)}
    if kind.key == "maintenanceWindows" and record["monitorIds"] is not None:
        entry = {("monitors" if k == "monitorIds" else k): v for k, v in entry.items()}
        entry["monitors"] = record["monitorIds"]  # [] (no monitor) differs from absent (all)
    return entry


def _exported_group(group: dict[str, Any], names: dict[str, dict[str, str]]) -> dict[str, Any]:
    """A status page group as a file entry: its monitors by name (other ways of choosing
    them, if any, as they are)."""
    out = {k: v for k, v in group.items() if k != "monitorIds" and v is not None}
    monitors = [names["monitors"][m] for m in group.get("monitorIds") or []]
    return {**out, "monitors": monitors} if monitors else out


def _exported_link(link: dict[str, Any], names: dict[str, dict[str, str]],
                   label: tuple[Any, ...]) -> dict[str, Any]:
    """A monitor's notification as a file entry: a channel by name, or inline."""
    out = ({"channel": names["channels"][link["channelId"]]} if link["channelId"] else
           {"type": link["type"], "config": _secret_refs(
               link["config"], channel_secrets(link["type"]), label)})
    return out if link["enabled"] else {**out, "enabled": False}


def export_setup(api: SetupApi) -> dict[str, list[dict[str, Any]]]:
    """The team's channels, monitors, status pages and maintenance windows in the setup file's
    terms."""
    stored = {kind.key: api.objects(kind) for kind in SETUP_KINDS}
    names = _names(stored, {})
    return {kind.key: [_exported(kind, o, names) for o in stored[kind.key]]
            for kind in SETUP_KINDS}


def to_toml(setup: dict[str, list[dict[str, Any]]]) -> str:
    """A setup as a TOML document of ``[[kind]]`` tables."""
    return "\n".join(f"[[{key}]]\n" + "".join(f"{_toml_key(k)} = {_toml_value(v)}\n"
                                              for k, v in entry.items())
                     for key, entries in setup.items() for entry in entries)



def _server_url(cfg: dict[str, dict[str, Any]], url: str | None) -> str:
    """``--url``, else the configured server on this machine: ``http://host:port`` (a
    wildcard host meaning loopback)."""
    server = cfg["server"]
    host = "127.0.0.1" if server["host"] in ("0.0.0.0", "::", "") else server["host"]
    host = f"[{host}]" if ":" in host else host
    return url or f"http://{host}:{server['port']}"


def _setup_api(cfg: dict[str, dict[str, Any]], url: str | None, api_key: str | None
               ) -> SetupApi:
    """The server to talk to, with an API key of the team."""
    if not api_key:
        raise click.UsageError("give --api-key or set STATUSAPP_API_KEY")
    return SetupApi(_server_url(cfg, url), api_key)


@cli.command()
@_options
@click.option("--url", help="The server (default: http://server.host:server.port).")
def healthcheck(config_path: str | None, db: str | None, url: str | None) -> None:
    """Exit 0 when the server's /api/v1/health answers 200 (healthy or degraded), else 1:
    the Docker HEALTHCHECK, needing nothing but StatusApp itself."""
    target = _server_url(_config(config_path, db), url).rstrip("/") + API_PREFIX + "/health"
    try:
        response = httpx.get(target, timeout=10)
        status = response.json().get("status")
    except (httpx.HTTPError, ValueError) as exc:
        raise click.ClickException(f"{target}: {exc}") from None
    if response.status_code != 200:
        raise click.ClickException(f"{target}: {response.status_code} {status}")
    click.echo(f"{target}: {status}")


def _remote(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--url`` and ``--api-key``: the running server apply and export talk to."""
    command = click.option("--api-key", envvar="STATUSAPP_API_KEY",
                           help="An API key of the team (or STATUSAPP_API_KEY).")(command)
    return click.option("--url", help="The server (default: "
                                      "http://server.host:server.port).")(command)


@cli.command("apply")
@_options
@_remote
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--prune", is_flag=True, help="Delete managed objects the file no longer names.")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
def apply_command(config_path: str | None, db: str | None, url: str | None,
                  api_key: str | None, file: str, prune: bool, dry_run: bool) -> None:
    """Make the team's channels, monitors, status pages and maintenance windows match the TOML
    (or .json) FILE."""
    cfg = _config(config_path, db)
    api = _setup_api(cfg, url, api_key)
    try:
        setup, sensitive = read_setup(file)
        steps, ids = plan_setup(api, setup, sensitive, cfg, prune)
        for step in steps:
            click.echo(step.text())
        if not steps:
            click.echo(f"No changes: the team matches {file}.")
            return
        counts = collections.Counter(step.sign for step in steps)
        click.echo(f"Plan: {counts['+']} to create, {counts['~']} to update, "
                   f"{counts['-']} to delete.")
        if dry_run:
            click.echo("Dry run: nothing changed.")
            return
        apply_steps(api, steps, ids)
    except (SetupError, ApiError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("Applied.")


@cli.command("export")
@_options
@_remote
@click.option("--format", "form", type=click.Choice(("toml", "json")), default="toml",
              show_default=True, help="The file format.")
def export_command(config_path: str | None, db: str | None, url: str | None,
                   api_key: str | None, form: str) -> None:
    """Write the team's channels, monitors, status pages and maintenance windows in apply's
    format to stdout."""
    api = _setup_api(_config(config_path, db), url, api_key)
    try:
        setup = export_setup(api)
    except (SetupError, ApiError) as exc:
        raise click.ClickException(str(exc)) from None
    text = to_toml(setup) if form == "toml" else json.dumps(setup, indent=2) + "\n"
    click.echo(text, nl=False)
    needed = sorted(set(_ENV_REF.findall(json.dumps(setup))))
    if needed:
        click.echo(f"Secrets are written as ${{NAME}}: set {', '.join(needed)} before applying.",
                   err=True)

if __name__ == "__main__":
    cli()
