"""StatusApp's tests: real servers on loopback, StatusApp under TestClient and under uvicorn.

Sections follow statusapp.py: config, storage, validation, auth, probes, scheduler,
incidents, notifiers, API routes, pages, CLI.  Shared fixtures and loopback servers come first.
"""

from __future__ import annotations

import statusapp

# --- Fixtures and loopback servers ---

# --- Config tests ---

# --- Storage tests ---

# --- API tests ---

# --- Probe tests ---

# --- Scheduler tests ---

# --- Heartbeat tests ---

# --- Incident tests ---

# --- Notifier tests ---

import base64  # noqa: E402 -- each test section keeps its own imports, for clean merges
import email  # noqa: E402
import email.policy  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import pytest  # noqa: E402
import pytest_asyncio  # noqa: E402
from aiosmtpd.controller import Controller  # noqa: E402
from aiosmtpd.smtp import AuthResult  # noqa: E402


class _NotifyReceiver:
    """A loopback HTTP server that records every request and answers from a script.

    ``script`` holds ``(status, body, delay_seconds)`` answers used in order; after that it
    answers 200.  Each recorded request has method, path, lower-cased headers and raw body bytes.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: list[tuple[int, bytes, float]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({
                    "method": self.command, "path": self.path, "body": body,
                    "headers": {k.lower(): v for k, v in self.headers.items()}})
                status, answer, delay = (receiver.script.pop(0) if receiver.script
                                         else (200, b'{"ok":true}', 0))
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the client gave up (timeout tests)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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


def _notify_free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        "timeout": 2,
    }})


@pytest_asyncio.fixture
async def notify_ctx(notify_cfg):
    ctx = statusapp.NotifyContext(notify_cfg)
    yield ctx
    await ctx.aclose()


def _notify_down(**changes) -> statusapp.Alert:
    alert = statusapp.Alert(
        event="monitor.down",
        monitor={"id": "mon_abc123", "name": "Café ✓", "url": "https://api.example.com",
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
        monitor={"id": "mon_abc123", "name": "Café ✓", "url": "https://api.example.com",
                 "type": "API", "status": "UP"},
        incident={"id": "inc_xyz789", "incidentNumber": "INC-2025-0042",
                  "startedAt": "2025-01-21T10:25:00Z", "resolvedAt": "2025-01-21T10:37:05Z",
                  "severity": "high", "mttr": None},
        check={"statusCode": 200, "responseTime": 120, "error": None, "region": "us-east-1"},
        timestamp="2025-01-21T10:37:05Z")


def test_notify_message_says_what_when_and_how_long():
    down = statusapp._text(_notify_down())
    for part in ("Café ✓ is DOWN", "URL: https://api.example.com",
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
    assert "*URL*\nhttps://api.example.com" in fields
    assert "*Error*\nHTTP 500 Internal Server Error" in fields
    assert context["type"] == "context"


@pytest.mark.asyncio
async def test_notify_discord_embed_colours(notify_http, notify_ctx):
    config = {"webhookUrl": f"{notify_http.url}/api/webhooks/1/tok"}
    await statusapp.send_discord(config, _notify_down(), notify_ctx)
    await statusapp.send_discord(config, _notify_up(), notify_ctx)
    down, up = (notify_http.json(i)["embeds"][0] for i in (0, 1))
    assert down["color"] == 0xE74C3C and up["color"] == 0x2ECC71
    assert down["title"] == "Café ✓ is DOWN" and down["url"] == "https://api.example.com"
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
    assert trigger["payload"]["source"] == "https://api.example.com"
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
    assert {"title": "URL", "value": "https://api.example.com"} in facts["facts"]
    assert card["actions"][0] == {"type": "Action.OpenUrl", "title": "Open monitored URL",
                                  "url": "https://api.example.com"}


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
    mailbox, port = _NotifyMailbox(), _notify_free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield mailbox, port
    controller.stop()


def _notify_smtp_cfg(port: int, **smtp) -> dict:
    cfg = statusapp.load_config(environ={}, overrides={"smtp": {
        "host": "127.0.0.1", "port": port, "security": "none", "sender": "alerts@status.test",
        **smtp}})
    cfg["notifications"]["timeout"] = 2
    return cfg


@pytest.mark.asyncio
async def test_notify_email_over_smtp(notify_smtp):
    mailbox, port = notify_smtp
    config = {"emails": ["team@example.com", "oncall@example.com"]}
    async with statusapp.NotifyContext(_notify_smtp_cfg(port)) as ctx:
        assert await statusapp.send_email(config, _notify_down(), ctx) is None
    envelope = mailbox.envelopes[0]
    assert envelope.mail_from == "alerts@status.test"
    assert envelope.rcpt_tos == config["emails"]
    message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
    assert message["To"] == "team@example.com, oncall@example.com"
    assert message["Subject"].startswith("[StatusApp] Café ✓ is DOWN - HTTP 500")
    assert message.get_content_type() == "text/plain"
    body = message.get_content()
    assert "URL: https://api.example.com" in body and "Region: us-east-1" in body


@pytest.mark.asyncio
async def test_notify_email_login_and_security(notify_smtp):
    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (auth_data.login, auth_data.password) == (b"bot", b"pw")
        return AuthResult(success=ok, handled=False)

    mailbox, port = _NotifyMailbox(), _notify_free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port,
                            authenticator=authenticator, auth_require_tls=False)
    controller.start()
    try:
        config, alert = {"emails": ["team@example.com"]}, _notify_down()
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
async def test_notify_retry_receiver_down(notify_ctx):
    url = f"http://127.0.0.1:{_notify_free_port()}/hook"
    started = time.monotonic()
    records = await statusapp.deliver(statusapp.send_webhook, {"url": url}, _notify_down(),
                                      notify_ctx, attempts=3, base_delay=0.05)
    assert [r["ok"] for r in records] == [False] * 3
    assert not any(r["permanent"] for r in records)
    assert time.monotonic() - started >= 0.05 + 0.1  # backoff: base, then twice base


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
                await statusapp.check_target(url, notify_cfg)
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

# --- Page tests ---

# --- CLI tests ---
