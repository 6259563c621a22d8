"""StatusApp: a self-hosted uptime monitor in one file, on SQLite.

Run it with ``python statusapp.py serve`` (or ``statusapp serve`` once installed).
The REST API follows the StatusApp API reference under ``/api/v1``.

Contents, in the order data flows through the program:

1. Config       -- defaults, TOML file, ``STATUSAPP_<SECTION>_<KEY>`` variables, flags.
2. Errors       -- ``ApiError`` and its subclasses, the one error shape clients see.
3. Storage      -- SQLite via aiosqlite: numbered migrations from schema.sql, one
                   group-committing writer, separate readers.
4. Validation   -- declarative field tables that validate, default and document resources.
5. Auth         -- API keys, roles and permissions, rate limits, usage counters.
6. Probes       -- one coroutine per monitor type, registered in ``PROBES``.
7. Scheduler    -- the asyncio loop that runs probes on their intervals.
8. Incidents    -- status transitions become incidents and alerts.
9. Notifiers    -- one coroutine per channel type, registered in ``NOTIFIERS``.
10. API routes  -- the ``/api/v1`` handlers.
11. Pages       -- the public status pages and badges.
12. CLI         -- the click entrypoint that runs everything in one process.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import json
import os
import re
import smtplib
import socket
import ssl
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import httpx

VERSION = "1.0.0"
API_VERSION = "v1"

# --- Config ---
#
# Every key has a default here; config.example.toml documents the same keys.  The type of
# each default is the type of the key.  Precedence: CLI flag > environment > file > default.

CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {
        "host": "127.0.0.1",
        "port": 8080,
        "database": "statusapp.db",
        "base_url": "",
        "trusted_proxies": [],
        "log_level": "info",
    },
    "account": {
        "plan": "ENTERPRISE",
    },
    "probes": {
        "min_interval": 60,
        "max_concurrency": 200,
        "confirmations": 2,
        "recoveries": 1,
        "retry_delay": 5,
        "ca_bundle": "",
        "dns_nameservers": [],
        "domain_check_hours": 6,
        "rdap_url": "https://rdap.org",
        "whois_server": "",
        "blocklists": ["zen.spamhaus.org", "dbl.spamhaus.org"],
    },
    "region": {
        "id": "local",
        "city": "Local",
        "country": "Local",
        "country_code": "ZZ",
        "latitude": 0.0,
        "longitude": 0.0,
    },
    "heartbeat": {
        "pings_per_minute": 5,
    },
    "notifications": {
        "timeout": 10,
        "attempts": 3,
        "allow_private_targets": True,
        "telegram_api_url": "https://api.telegram.org",
        "pagerduty_url": "https://events.pagerduty.com/v2/enqueue",
        "opsgenie_url": "https://api.opsgenie.com",
        "twilio_api_url": "https://api.twilio.com",
        "twilio_account_sid": "",
        "twilio_auth_token": "",
        "twilio_from": "",
    },
    "smtp": {
        "host": "",
        "port": 587,
        "security": "starttls",
        "username": "",
        "password": "",
        "sender": "statusapp@localhost",
    },
    "retention": {
        "raw_days": 30,
        "rollup_days": 400,
    },
}

PLANS = {"STARTER": 1_000, "PROFESSIONAL": 5_000, "BUSINESS": 10_000, "ENTERPRISE": 100_000}

_CONFIG_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("account", "plan"): tuple(PLANS),
    ("smtp", "security"): ("starttls", "tls", "none"),
    ("server", "log_level"): ("critical", "error", "warning", "info", "debug"),
}


class ConfigError(Exception):
    """A bad configuration value; its message is one line that names the key."""


def _coerce(section: str, key: str, value: Any, from_text: bool) -> Any:
    """Turn ``value`` into the type of the default, or raise ConfigError naming the key."""
    default = CONFIG_DEFAULTS[section][key]
    name = f"{section}.{key}"
    try:
        if isinstance(default, bool):
            if from_text:
                low = str(value).strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = low in ("1", "true", "yes", "on")
            elif not isinstance(value, bool):
                raise ValueError
        elif isinstance(default, int):
            if isinstance(value, bool) or (not from_text and not isinstance(value, int)):
                raise ValueError
            value = int(value)
        elif isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif isinstance(default, list):
            if from_text:
                value = [v.strip() for v in str(value).split(",") if v.strip()]
            elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
        elif not isinstance(value, str):
            raise ValueError
    except ValueError:
        kind = type(default).__name__
        raise ConfigError(f"config: {name} must be a {kind}, got {value!r}") from None
    choices = _CONFIG_CHOICES.get((section, key))
    if choices and value not in choices:
        raise ConfigError(f"config: {name} must be one of {', '.join(choices)}, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"config: {name} must not be negative, got {value!r}")
    return value


def load_config(path: str | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                environ: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
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
    if cfg["probes"]["min_interval"] < 1:
        raise ConfigError("config: probes.min_interval must be at least 1")
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


class PayloadTooLarge(ApiError):
    status, code = 413, "PAYLOAD_TOO_LARGE"


class RateLimited(ApiError):
    status, code = 429, "RATE_LIMIT_EXCEEDED"

# --- Storage ---

# --- Validation ---

# --- Auth ---

# --- Probes ---
#
# A probe is ``async def probe_x(monitor: dict, ctx: ProbeContext) -> CheckResult``.  It never
# raises for a failing target: a failure is a CheckResult with status DOWN, an error message and
# a root-cause category.  ``monitor`` carries the API's camelCase fields (secrets unmasked) and
# ``monitor["lastDetails"]``, the ``details`` of this monitor's previous check (or None).

ROOT_CAUSES = ("DNS_FAILURE", "NETWORK_TIMEOUT", "SERVER_ERROR", "APPLICATION_ERROR",
               "DATABASE_ISSUE", "SSL_CERTIFICATE", "CONFIGURATION_ERROR", "DEPLOYMENT_ISSUE",
               "THIRD_PARTY_SERVICE", "INFRASTRUCTURE", "DDOS_ATTACK", "MAINTENANCE", "UNKNOWN")


@dataclass
class CheckResult:
    """What one probe saw.  ``details`` is type-specific (certificate, domain data...)."""

    status: str                       # UP, DOWN or DEGRADED
    response_time: int | None = None  # milliseconds
    status_code: int | None = None
    error: str | None = None
    category: str | None = None       # one of ROOT_CAUSES when not UP
    timings: dict[str, float] | None = None
    details: dict[str, Any] | None = None

# --- Scheduler ---

# --- Incidents ---

# --- Notifiers ---
#
# The delivery layer: an ``Alert`` (what happened) becomes one request in each service's own wire
# format.  A sender is ``async def send_x(config, alert, ctx) -> int | None``, registered in
# ``NOTIFIERS``; it raises ``DeliveryError`` on failure and ``deliver`` turns that into retries and
# per-attempt records.  Senders never put a channel URL or token into an error message: webhook
# URLs and Telegram's path carry the secret.

ALERT_EVENTS = ("monitor.down", "monitor.up", "monitor.degraded", "incident.created",
                "incident.resolved", "test")
PAGERDUTY_SEVERITIES = ("critical", "error", "warning", "info")
OPSGENIE_PRIORITIES = ("P1", "P2", "P3", "P4", "P5")

# Config keys each channel type needs, and the ones API responses must mask.
CHANNEL_REQUIRED: dict[str, tuple[str, ...]] = {
    "EMAIL": ("emails",),
    "SMS": ("phoneNumbers",),
    "SLACK": ("webhookUrl",),
    "DISCORD": ("webhookUrl",),
    "TELEGRAM": ("botToken", "chatId"),
    "PAGERDUTY": ("integrationKey",),
    "OPSGENIE": ("apiKey",),
    "MICROSOFT_TEAMS": ("webhookUrl",),
    "WEBHOOK": ("url",),
}
CHANNEL_SECRETS: dict[str, tuple[str, ...]] = {
    "EMAIL": (),
    "SMS": (),
    "SLACK": ("webhookUrl",),
    "DISCORD": ("webhookUrl",),
    "TELEGRAM": ("botToken",),
    "PAGERDUTY": ("integrationKey",),
    "OPSGENIE": ("apiKey",),
    "MICROSOFT_TEAMS": ("webhookUrl",),
    "WEBHOOK": ("headers", "secret"),
}

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
_EMOJI = {"bad": "\U0001f534", "warn": "\U0001f7e0", "good": "\u2705", "info": "\u2139\ufe0f"}
_DISCORD_COLOURS = {"bad": 0xE74C3C, "warn": 0xF1C40F, "good": 0x2ECC71, "info": 0x3498DB}
_TEAMS_COLOURS = {"bad": "Attention", "warn": "Warning", "good": "Good", "info": "Accent"}


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Alert:
    """What happened, independent of any channel: every sender renders its message from this.

    ``monitor`` has id, name, url, type, status; ``incident`` id, incidentNumber, startedAt,
    resolvedAt, severity, mttr (seconds); ``check`` statusCode, responseTime (ms), error, region.
    ``note`` explains what the numbers cannot (e.g. the regression detector's baseline).
    """

    event: str
    monitor: dict[str, Any]
    incident: dict[str, Any] | None = None
    check: dict[str, Any] | None = None
    timestamp: str = field(default_factory=_now_iso)
    note: str | None = None

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
        self.timeout: float | None = cfg["notifications"]["timeout"] or None
        self.client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False,
                                        headers={"User-Agent": f"StatusApp/{VERSION}"})

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self.client.aclose()

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
    incident = alert.incident or {}
    if incident.get("mttr") is not None:
        return int(incident["mttr"])
    start = _parse_time(incident.get("startedAt"))
    end = _parse_time(incident.get("resolvedAt") or alert.timestamp)
    return max(0, int((end - start).total_seconds())) if start and end else None


def _check_result(check: dict[str, Any]) -> str:
    """Render a check as "HTTP 500 Internal Server Error", "connection refused" or "HTTP 200"."""
    code, error = check.get("statusCode"), check.get("error")
    parts = (f"HTTP {code}" if code else "", _one_line(error or ""))
    return " ".join(part for part in parts if part)


def _headline(alert: Alert) -> str:
    incident = alert.incident or {}
    number = incident.get("incidentNumber") or incident.get("id")
    name = alert.monitor.get("name") or alert.monitor.get("id") or "monitor"
    headline = _HEADLINES[alert.event].format(name=name, number=f" {number}" if number else "")
    return _one_line(headline)


def _summary(alert: Alert) -> str:
    """One ASCII-punctuated line (SMS, subjects, PagerDuty): the headline and what matters most."""
    check = alert.check or {}
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
    monitor, check, incident = alert.monitor, alert.check or {}, alert.incident or {}
    facts = [("Monitor", str(monitor.get("name") or monitor.get("id") or "")),
             ("URL", str(monitor.get("url") or "")),
             ("Status", str(monitor.get("status") or "")),
             ("Error" if check.get("error") else "Check", _check_result(check)),
             ("Region", str(check.get("region") or ""))]
    if check.get("responseTime") is not None:
        facts.append(("Response time", f"{round(check['responseTime'])} ms"))
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


def _text(alert: Alert) -> str:
    """Plain text: the headline, then one "Label: value" line per fact."""
    lines = [f"{label}: {value}" for label, value in _facts(alert)]
    footer = f"Sent by StatusApp at {_human_time(alert.timestamp)}"
    return "\n".join([_headline(alert), "", *lines, "", footer])


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
    }


# HTTP plumbing shared by every sender.


async def check_target(url: str, cfg: dict[str, dict[str, Any]]) -> None:
    """Refuse a user's URL that is not http(s) or, unless allowed, resolves inside our network.

    Channel and webhook URLs come from API users; without this guard StatusApp would POST to
    internal services for them.  The name is resolved again when connecting, so a DNS server
    that answers differently the second time can still get past this check.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeliveryError("target URL must be http:// or https:// with a host", permanent=True)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise DeliveryError("target URL has an invalid port", permanent=True) from None
    if cfg["notifications"]["allow_private_targets"]:
        return
    host = parts.hostname
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DeliveryError(f"cannot resolve {host}: {exc.strerror}") from None
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].partition("%")[0])
        address = getattr(address, "ipv4_mapped", None) or address
        if not address.is_global or address.is_multicast:
            raise DeliveryError(f"{host} resolves to non-public address {address}; "
                                "set notifications.allow_private_targets to allow it",
                                permanent=True)


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
                **request: Any) -> int:
    """POST and map the outcome onto DeliveryError; return the 2xx status."""
    if user_url:
        await check_target(url, ctx.cfg)
    try:
        async with ctx.client.stream("POST", url, **request) as response:
            if response.is_success:
                return response.status_code
            detail = await _excerpt(response)
    except httpx.TimeoutException:
        raise DeliveryError(f"{service}: timed out") from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise DeliveryError(f"{service}: invalid URL ({exc})", permanent=True) from None
    except httpx.TransportError as exc:
        raise DeliveryError(f"{service}: {type(exc).__name__}: {exc}") from None
    code = response.status_code
    raise DeliveryError(f"{service} answered HTTP {code}" + (f": {detail}" if detail else ""),
                        status_code=code, permanent=_permanent_status(code))


async def _post_json(ctx: NotifyContext, service: str, url: str, payload: Any, *,
                     user_url: bool = False, headers: dict[str, str] | None = None,
                     params: dict[str, str] | None = None) -> int:
    body_headers = {**(headers or {}), "Content-Type": "application/json"}
    return await _post(ctx, service, url, user_url=user_url, content=js_json(payload),
                       headers=body_headers, params=params)


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


def _channel(kind: str) -> Callable[[Sender], Sender]:
    """Make a sender refuse, permanently, a config that lacks the keys its type requires."""
    def wrap(send: Sender) -> Sender:
        @functools.wraps(send)
        async def checked(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int | None:
            missing = [key for key in CHANNEL_REQUIRED[kind] if not config.get(key)]
            if missing:
                raise DeliveryError(f"{kind} channel config lacks {', '.join(missing)}",
                                    permanent=True)
            return await send(config, alert, ctx)
        return checked
    return wrap


# The senders, one per channel type.


def _smtp_send(smtp: dict[str, Any], message: EmailMessage, recipients: list[str],
               timeout: float | None) -> None:
    """Blocking SMTP conversation (run in a thread), with SMTP replies mapped to DeliveryError."""
    security = smtp["security"]
    context = ssl.create_default_context()
    try:
        if security == "tls":
            client = smtplib.SMTP_SSL(smtp["host"], smtp["port"], timeout=timeout, context=context)
        else:
            client = smtplib.SMTP(smtp["host"], smtp["port"], timeout=timeout)
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


@_channel("EMAIL")
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
    message.set_content(_text(alert))
    await asyncio.to_thread(_smtp_send, smtp, message, recipients, ctx.timeout)


@_channel("SMS")
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


@_channel("SLACK")
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


@_channel("DISCORD")
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


@_channel("TELEGRAM")
async def send_telegram(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """Bot API sendMessage in plain text (no parse_mode, so names need no escaping)."""
    base = ctx.cfg["notifications"]["telegram_api_url"].rstrip("/")
    url = f"{base}/bot{config['botToken']}/sendMessage"
    text = f"{_EMOJI[_TONES[alert.event]]} {_text(alert)}"
    payload = {"chat_id": config["chatId"], "text": _cut(text, 4096),
               "link_preview_options": {"is_disabled": True}}
    return await _post_json(ctx, "Telegram", url, payload)


@_channel("PAGERDUTY")
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


@_channel("OPSGENIE")
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


@_channel("MICROSOFT_TEAMS")
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


@_channel("WEBHOOK")
async def send_webhook(config: dict[str, Any], alert: Alert, ctx: NotifyContext) -> int:
    """The spec's webhook payload to ``url`` with the configured ``headers`` (signed if ``secret``).

    The Webhooks API delivers through this too: ``{"url": ..., "secret": ...}`` as the config.
    """
    return await post_webhook(config["url"], webhook_payload(alert), config.get("secret"),
                              config.get("headers"), ctx)


NOTIFIERS: dict[str, Sender] = {
    "EMAIL": send_email,
    "SMS": send_sms,
    "SLACK": send_slack,
    "DISCORD": send_discord,
    "TELEGRAM": send_telegram,
    "PAGERDUTY": send_pagerduty,
    "OPSGENIE": send_opsgenie,
    "MICROSOFT_TEAMS": send_teams,
    "WEBHOOK": send_webhook,
}


async def deliver(send: Sender, config: dict[str, Any], alert: Alert, ctx: NotifyContext,
                  attempts: int | None = None, base_delay: float = 1.0) -> list[dict[str, Any]]:
    """Run ``send`` with retries and report every attempt; never raises, so callers can record.

    Each attempt is bounded by ``notifications.timeout``.  Transient failures are retried after
    base_delay, 2x, 4x...; a permanent one (bad credentials, gone, bad config) stops at once.
    An unexpected exception is a bug a retry will not fix, so it counts as permanent too.
    """
    total = max(1, ctx.cfg["notifications"]["attempts"] if attempts is None else attempts)
    records: list[dict[str, Any]] = []
    for attempt in range(1, total + 1):
        started = time.monotonic()
        status, error, permanent = None, None, False
        try:
            status = await asyncio.wait_for(send(config, alert, ctx), ctx.timeout)
        except DeliveryError as exc:
            status, error, permanent = exc.status_code, exc.message, exc.permanent
        except asyncio.TimeoutError:
            error = f"timed out after {ctx.timeout:g}s"
        except Exception as exc:  # noqa: BLE001 -- deliver must report, not raise
            error, permanent = f"internal error: {type(exc).__name__}: {exc}", True
        records.append({"attempt": attempt, "ok": error is None, "statusCode": status,
                        "error": error, "permanent": permanent,
                        "durationMs": round((time.monotonic() - started) * 1000)})
        if error is None or permanent:
            break
        if attempt < total:
            await asyncio.sleep(base_delay * 2 ** (attempt - 1))
    return records

# --- API routes ---

# --- Pages ---

# --- CLI ---
