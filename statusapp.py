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
import base64
import contextvars
import http.cookiejar
import ipaddress
import json
import os
import re
import socket
import ssl
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import httpcore
import httpx
import icmplib

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

_USER_AGENT = f"StatusApp/{VERSION} (uptime monitor)"
_DEFAULT_TIMEOUT = 30.0
_DEFAULT_EXPIRY_DAYS = 30  # sslCertExpiryDays / domainExpiryDays when the monitor leaves them out
_SEVERITY = {"UP": 0, "DEGRADED": 1, "DOWN": 2}


class _ProbeError(Exception):
    """A failure found outside the main network call (bad config, token endpoint, registry)."""

    def __init__(self, message: str, category: str) -> None:
        super().__init__(message)
        self.category = category


def _down(error: str, category: str, **fields: Any) -> CheckResult:
    return CheckResult(status="DOWN", error=error, category=category, **fields)


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _timeout(monitor: dict[str, Any]) -> float:
    return float(monitor.get("timeout") or _DEFAULT_TIMEOUT)


def _verdict(problems: list[tuple[str, str, str]]) -> tuple[str, str | None, str | None]:
    """Status, joined error and the worst problem's category from (status, message, category)."""
    if not problems:
        return "UP", None, None
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


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _describe_error(exc: BaseException, timeout: float) -> tuple[str, str]:
    """A short message and root cause for a network failure, read from its cause chain.

    httpx wraps httpcore, which wraps the OS error, so the useful exception is inside."""
    chain = _exception_chain(exc)

    def find(kind: type[BaseException]) -> Any:
        return next((e for e in chain if isinstance(e, kind)), None)

    if (err := find(socket.gaierror)) is not None:
        return f"DNS resolution failed: {err.strerror or err}", "DNS_FAILURE"
    if find(TimeoutError) or find(httpx.TimeoutException):
        return f"timed out after {timeout:g}s", "NETWORK_TIMEOUT"
    if (err := find(ssl.SSLCertVerificationError)) is not None:
        return f"TLS certificate rejected: {err.verify_message}", "SSL_CERTIFICATE"
    if (err := find(ssl.SSLError)) is not None:
        return f"TLS handshake failed: {err.reason or err}", "SSL_CERTIFICATE"
    if find(ConnectionRefusedError):
        return "connection refused", "INFRASTRUCTURE"
    if find(ConnectionResetError):
        return "connection reset by peer", "INFRASTRUCTURE"
    if isinstance(exc, httpx.UnsupportedProtocol):
        return f"invalid URL: {exc}", "CONFIGURATION_ERROR"
    if isinstance(exc, httpx.TooManyRedirects):
        return "too many redirects", "APPLICATION_ERROR"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"invalid HTTP answer: {exc}", "SERVER_ERROR"
    if (err := find(OSError)) is not None:
        return err.strerror or str(err) or type(err).__name__, "INFRASTRUCTURE"
    return str(exc) or type(exc).__name__, "UNKNOWN"


# HTTP timings.  httpcore's "trace" extension reports TLS, request and response phases, but
# DNS happens inside its TCP connect.  So the pool gets a network backend that resolves the
# name itself and connects to the address, timing both into the check's timings dict, which
# it finds through a context variable (each check runs in its own task).

_TIMING_PHASES = ("dns", "connect", "tls", "ttfb", "transfer")
_TRACE_PHASES = {  # phase: (trace step that starts it, trace step whose completion ends it)
    "tls": ("start_tls", "start_tls"),
    "ttfb": ("send_request_headers", "receive_response_headers"),
    "transfer": ("receive_response_body", "receive_response_body"),
}
_HTTP_TIMINGS: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "statusapp_http_timings", default=None)


def _tracer(timings: dict[str, float]) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    """An httpcore trace callback adding each phase's seconds to ``timings`` (redirects sum)."""
    started: dict[str, float] = {}

    async def trace(event: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        step, _, stage = event.partition(".")[2].rpartition(".")
        if stage == "started":
            started[step] = now
        elif stage == "complete":
            for phase, (first, last) in _TRACE_PHASES.items():
                if last == step and first in started:
                    timings[phase] += now - started.pop(first)

    return trace


class _TimedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with name resolution split out of the TCP connect."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        """Resolve, then try each address in turn (as the stdlib's create_connection does)."""
        timings = _HTTP_TIMINGS.get()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise httpcore.ConnectError(f"DNS lookup of {host} timed out") from socket.gaierror(
                socket.EAI_AGAIN, "lookup timed out")
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}") from exc
        resolved = time.perf_counter()
        remaining = None if timeout is None else max(timeout - (resolved - started), 0.001)
        error: Exception | None = None
        for address in dict.fromkeys(info[4][0] for info in infos):
            try:
                stream = await self._inner.connect_tcp(address, port, remaining, local_address,
                                                       socket_options)
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
        return await self._inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _ProbeTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a pool that uses _TimedBackend and keeps no idle connection.

    No keep-alive: every check opens its own connection, so response times and timings
    measure what a new visitor sees (DNS, connect, TLS), not a warm socket; and the pool
    never holds a large idle set, which is what makes the stock pool slow under high
    concurrency (encode/httpx#3215).  No connection cap either: the scheduler bounds
    concurrency with its own semaphore, and a second, smaller cap here would only turn
    waiting into false timeouts.  httpx takes no network backend, so ``_pool`` is replaced."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=None, max_keepalive_connections=0,
            network_backend=_TimedBackend())


def _make_resolver(nameservers: list[str]) -> dns.asyncresolver.Resolver:
    """dnspython's resolver on the configured servers, else on /etc/resolv.conf; with neither,
    127.0.0.1, which is what the C library does.  No cache: each check asks afresh."""
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        addresses = [_split_host_port(ns, 53) for ns in nameservers]
        resolver.nameservers = [dns.nameserver.Do53Nameserver(str(ipaddress.ip_address(host)),
                                                              port) for host, port in addresses]
        return resolver
    try:
        return dns.asyncresolver.Resolver()
    except dns.resolver.NoResolverConfiguration:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        return resolver


class ProbeContext:
    """What all probes share, built once per process from the config: one HTTP client, the TLS
    trust store, one DNS resolver and the OAuth2 token cache.  Close it with ``aclose``."""

    def __init__(self, cfg: dict[str, dict[str, Any]]) -> None:
        self.cfg = cfg["probes"]
        # OpenSSL's default paths, so SSL_CERT_FILE / SSL_CERT_DIR work, plus our own CA file.
        self.ssl_context = ssl.create_default_context()
        if self.cfg["ca_bundle"]:
            try:
                self.ssl_context.load_verify_locations(cafile=self.cfg["ca_bundle"])
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"config: probes.ca_bundle: cannot load "
                                  f"{self.cfg['ca_bundle']}: {exc}") from None
        # For reading a certificate that does not verify (SSL_CERT says why it fails).
        self.unverified_ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.unverified_ssl_context.check_hostname = False
        self.unverified_ssl_context.verify_mode = ssl.CERT_NONE
        try:
            self.resolver = _make_resolver(self.cfg["dns_nameservers"])
        except ValueError as exc:
            raise ConfigError(f"config: probes.dns_nameservers: {exc}") from None
        try:
            whois = self.cfg["whois_server"]
            self.whois_server = _split_host_port(whois, 43) if whois else _IANA_WHOIS
        except ValueError as exc:
            raise ConfigError(f"config: probes.whois_server: {exc}") from None
        # No cookie is kept, so no check carries state into the next one or into another
        # monitor on the same site.  No proxy from the environment: checks measure the path
        # from this host to the target.
        self.http = httpx.AsyncClient(
            transport=_ProbeTransport(self.ssl_context), headers={"User-Agent": _USER_AGENT},
            cookies=http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(
                allowed_domains=[])), trust_env=False)
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self._token_locks: dict[tuple[str, ...], asyncio.Lock] = {}

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


async def _fetch_oauth2_token(client: httpx.AsyncClient, auth: dict[str, Any],
                              timeout: float) -> tuple[str, float]:
    """POST the client credentials in the form body; if the server refuses that as
    invalid_client, try HTTP Basic (RFC 6749 section 2.3.1 allows either)."""
    url = auth.get("oauth2TokenUrl") or ""
    client_id, secret = auth.get("oauth2ClientId") or "", auth.get("oauth2ClientSecret") or ""
    form = {"grant_type": auth.get("oauth2GrantType") or "client_credentials"}
    if auth.get("oauth2Scope"):
        form["scope"] = auth["oauth2Scope"]
    attempts = [({**form, "client_id": client_id, "client_secret": secret}, None),
                (form, httpx.BasicAuth(client_id, secret))]
    try:
        for data, basic in attempts:
            async with asyncio.timeout(timeout):
                response = await client.post(url, data=data, auth=basic, timeout=timeout)
            if response.status_code not in (400, 401) or basic is not None:
                break
            if "invalid_client" not in response.text:
                break
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        message, category = _describe_error(exc, timeout)
        raise _ProbeError(f"OAuth2 token endpoint: {message}", category) from None
    if response.status_code != 200:
        raise _ProbeError(f"OAuth2 token endpoint answered HTTP {response.status_code}",
                          "CONFIGURATION_ERROR" if response.status_code < 500
                          else "THIRD_PARTY_SERVICE")
    try:
        body = response.json()
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


async def probe_http(monitor: dict[str, Any], ctx: ProbeContext) -> CheckResult:
    """WEBSITE and API: one request, body read to the end, judged by the final status code.

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
    body = monitor.get("requestBody")
    try:
        request = ctx.http.build_request(
            (monitor.get("httpMethod") or "GET").upper(), monitor.get("url") or "",
            headers={**headers, **auth_headers}, params=params or None,
            content=body.encode() if body else None, timeout=timeout,
            extensions={"trace": _tracer(timings)} if timings is not None else None)
    except (httpx.InvalidURL, ValueError) as exc:
        return _down(f"invalid URL: {exc}", "CONFIGURATION_ERROR")
    token = _HTTP_TIMINGS.set(timings)
    started = time.perf_counter()
    response = None
    try:
        async with asyncio.timeout(timeout):
            response = await ctx.http.send(request, stream=True,
                                           follow_redirects=not 300 <= (expected or 0) < 400)
            try:
                async for _ in response.aiter_raw():
                    pass
            finally:
                await response.aclose()
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        message, category = _describe_error(exc, timeout)
        return _down(message, category, response_time=_elapsed_ms(started),
                     status_code=response.status_code if response is not None else None)
    finally:
        _HTTP_TIMINGS.reset(token)
    code = response.status_code
    result = CheckResult(status="UP", response_time=_elapsed_ms(started), status_code=code)
    if timings is not None:
        result.timings = {phase: round(seconds * 1000, 3) for phase, seconds in timings.items()}
    if code == 401 and (auth.get("type") or "").lower() == "oauth2":
        ctx.forget_oauth2_token(auth)
    if (code == expected) if expected else (200 <= code < 400):
        return result
    result.status = "DOWN"
    result.error = f"HTTP {code}, expected {expected or '2xx or 3xx'}"
    result.category = "SERVER_ERROR" if code >= 500 else "APPLICATION_ERROR"
    return result


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


async def probe_port(monitor: dict[str, Any], ctx: ProbeContext) -> CheckResult:
    """PORT: a completed TCP handshake is UP; UDP follows the rule above."""
    host, port = _target_host(monitor.get("url") or ""), monitor.get("port")
    if not host or not port:
        return _down("a PORT monitor needs a host and a port", "CONFIGURATION_ERROR")
    timeout = _timeout(monitor)
    started = time.perf_counter()
    try:
        if (monitor.get("protocol") or "TCP").upper() == "UDP":
            state = await _udp_check(host, port, timeout)
            return CheckResult(status="UP", response_time=_elapsed_ms(started),
                               details={"udp": state})
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
        writer.transport.abort()
    except ConnectionRefusedError:
        return _down(f"port {port} is closed", "INFRASTRUCTURE",
                     response_time=_elapsed_ms(started))
    except (TimeoutError, OSError) as exc:
        message, category = _describe_error(exc, timeout)
        return _down(message, category, response_time=_elapsed_ms(started))
    return CheckResult(status="UP", response_time=_elapsed_ms(started))


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
        reply = await icmplib.async_ping(host, count=_PING_COUNT, interval=_PING_INTERVAL,
                                         timeout=timeout / _PING_COUNT, privileged=privileged)
    except icmplib.NameLookupError:
        return _down(f"cannot resolve {host}", "DNS_FAILURE")
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
    result = CheckResult(status="UP", response_time=round(reply.avg_rtt), details=details)
    if reply.packet_loss:
        result.status, result.category = "DEGRADED", "NETWORK_TIMEOUT"
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
    result = CheckResult(status="UP", response_time=_elapsed_ms(started),
                         details={"record": rdtype, "answers": answers})
    expected = monitor.get("expectedIp")
    if expected and not _dns_matches(expected, answers, rdtype):
        result.status, result.category = "DOWN", "DNS_FAILURE"
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


async def _peer_certificate(host: str, port: int, context: ssl.SSLContext) -> bytes:
    """The DER certificate the server presents; raises if ``context`` rejects it."""
    _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
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
            try:
                der = await _peer_certificate(host, port, ctx.ssl_context)
            except ssl.SSLCertVerificationError as exc:
                rejected = exc
                der = await _peer_certificate(host, port, ctx.unverified_ssl_context)
        cert = _parse_certificate(der)
    except (TimeoutError, OSError) as exc:
        message, category = _describe_error(exc, timeout)
        return _down(message, category, response_time=_elapsed_ms(started))
    except ValueError as exc:
        return _down(str(exc), "SSL_CERTIFICATE", response_time=_elapsed_ms(started))
    now = datetime.now(timezone.utc)
    days = (cert["notAfter"] - now) // timedelta(days=1)
    details = {"daysRemaining": days, "issuer": cert["issuer"], "subject": cert["subject"],
               "validFrom": cert["notBefore"].isoformat(), "validTo": cert["notAfter"].isoformat()}
    result = CheckResult(status="DOWN", response_time=_elapsed_ms(started),
                         category="SSL_CERTIFICATE", details=details)
    if now >= cert["notAfter"]:
        result.error = f"certificate expired on {cert['notAfter']:%Y-%m-%d}"
    elif now < cert["notBefore"]:
        result.error = f"certificate is not valid before {cert['notBefore']:%Y-%m-%d}"
    elif rejected is not None and rejected.verify_code in _HOSTNAME_MISMATCH:
        result.error = f"certificate is for {cert['subject']!r}, not {host}"
    elif rejected is not None:
        result.error = f"certificate is not trusted: {rejected.verify_message}"
    elif days < (monitor.get("sslCertExpiryDays") or _DEFAULT_EXPIRY_DAYS):
        result.status, result.error = "DEGRADED", f"certificate expires in {days} days"
    else:
        result.status, result.category = "UP", None
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
    url = f"{ctx.cfg['rdap_url'].rstrip('/')}/domain/{name}"
    try:
        async with asyncio.timeout(timeout):
            response = await ctx.http.get(url, follow_redirects=True, timeout=timeout,
                                          headers={"Accept": "application/rdap+json"})
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        message, category = _describe_error(exc, timeout)
        raise _ProbeError(f"RDAP: {message}", category) from None
    if response.status_code != 200:
        raise _ProbeError(f"RDAP: HTTP {response.status_code}", "THIRD_PARTY_SERVICE")
    try:
        data = response.json()
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
    registration = _cached_registration(last, name, ctx.cfg["domain_check_hours"])
    errors: list[str] = []
    if registration is None:
        registration, errors = await _fetch_registration(name, ctx, timeout)
    details: dict[str, Any] = {"domain": name, **(registration or {}), "daysRemaining": None}
    problems: list[tuple[str, str, str]] = []
    changes: list[str] = []
    expires = _parse_date(details.get("expiresAt"))
    if registration is None:
        problems.append(("DOWN", "; ".join(errors) or "no registration data",
                         "THIRD_PARTY_SERVICE"))
    elif expires is not None:
        days = (expires - datetime.now(timezone.utc)) // timedelta(days=1)
        details["daysRemaining"] = days
        if days < 0:
            problems.append(("DOWN", f"domain expired on {expires:%Y-%m-%d}",
                             "CONFIGURATION_ERROR"))
        elif days < (monitor.get("domainExpiryDays") or _DEFAULT_EXPIRY_DAYS):
            problems.append(("DEGRADED", f"domain expires in {days} days", "CONFIGURATION_ERROR"))
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
        zones = ctx.cfg["blocklists"]
        answers = await asyncio.gather(*(_dns_answers(ctx, f"{name}.{zone}", "A", timeout)
                                         for zone in zones))
        details["blocklists"] = {zone: _blocklist_state(found)
                                 for zone, found in zip(zones, answers, strict=True)}
        problems += [("DEGRADED", f"listed on {zone}", "THIRD_PARTY_SERVICE")
                     for zone, state in details["blocklists"].items() if state == "listed"]
    details["changes"] = changes
    status, error, category = _verdict(problems)
    return CheckResult(status=status, response_time=_elapsed_ms(started), error=error,
                       category=category, details=details)


PROBES: dict[str, Callable[[dict[str, Any], ProbeContext], Awaitable[CheckResult]]] = {
    "WEBSITE": probe_http, "API": probe_http, "PING": probe_ping, "PORT": probe_port,
    "DNS": probe_dns, "SSL_CERT": probe_ssl, "DOMAIN": probe_domain,
}

# --- Scheduler ---

# --- Incidents ---

# --- Notifiers ---

# --- API routes ---

# --- Pages ---

# --- CLI ---
