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

import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

# --- API routes ---

# --- Pages ---

# --- CLI ---
