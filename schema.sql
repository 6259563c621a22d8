-- StatusApp's SQLite schema, as numbered migrations.
--
-- A new database runs every block in order; an existing one runs the blocks above the version
-- stored in schema_version, each in its own transaction.  Never edit a released block: add one.
-- Times are INTEGER Unix milliseconds (UTC).  JSON columns hold JSON text.

-- migration 1: accounts, keys, monitors, checks, incidents, channels, webhooks, pages
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE COLLATE NOCASE,
    name TEXT,
    image TEXT,
    account_status TEXT NOT NULL DEFAULT 'ENABLED',
    plan TEXT NOT NULL,
    phone_number TEXT,
    sms_notifications_enabled INTEGER NOT NULL DEFAULT 0,
    language TEXT NOT NULL DEFAULT 'en',
    timezone TEXT NOT NULL DEFAULT 'UTC',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- A team is owned by one account (team_id); every member, the owner included, has a row.
CREATE TABLE team_members (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    account_id TEXT REFERENCES accounts(id) ON DELETE CASCADE,
    email TEXT NOT NULL COLLATE NOCASE,
    name TEXT,
    role TEXT NOT NULL,
    status TEXT NOT NULL,
    invitation_hash TEXT UNIQUE,
    invited_at INTEGER NOT NULL,
    accepted_at INTEGER,
    expires_at INTEGER,
    UNIQUE (team_id, email)
);
CREATE INDEX team_members_account ON team_members(account_id);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    permissions TEXT NOT NULL,
    expires_at INTEGER,
    is_active INTEGER NOT NULL DEFAULT 1,
    last_used_at INTEGER,
    created_at INTEGER NOT NULL
);
CREATE INDEX api_keys_account ON api_keys(account_id);

CREATE TABLE worker_regions (
    id TEXT PRIMARY KEY,
    city TEXT NOT NULL,
    country TEXT NOT NULL,
    country_code TEXT NOT NULL,
    latitude REAL NOT NULL,
    longitude REAL NOT NULL,
    is_active INTEGER NOT NULL DEFAULT 1
);

CREATE TABLE monitors (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    url TEXT NOT NULL,
    type TEXT NOT NULL,
    interval INTEGER NOT NULL,
    timeout INTEGER NOT NULL,
    port INTEGER,
    protocol TEXT,
    expected_status_code INTEGER,
    http_method TEXT NOT NULL,
    request_headers TEXT,
    request_body TEXT,
    dns_record TEXT,
    expected_ip TEXT,
    grace_period INTEGER NOT NULL,
    ssl_cert_expiry_days INTEGER NOT NULL,
    enabled_worker_region_ids TEXT,
    regression_enabled INTEGER NOT NULL,
    regression_threshold INTEGER NOT NULL,
    regression_period INTEGER NOT NULL,
    performance_timings INTEGER NOT NULL,
    api_auth_config TEXT,
    domain_expiry_days INTEGER NOT NULL,
    domain_monitor_dns INTEGER NOT NULL,
    domain_monitor_blacklist INTEGER NOT NULL,
    domain_monitor_whois INTEGER NOT NULL,
    heartbeat_id TEXT UNIQUE,
    status TEXT NOT NULL DEFAULT 'PENDING',
    is_paused INTEGER NOT NULL DEFAULT 0,
    is_active INTEGER NOT NULL DEFAULT 1,
    check_count INTEGER NOT NULL DEFAULT 0,
    baseline_response_time INTEGER,
    baseline_calculated_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX monitors_account_created ON monitors(account_id, created_at);
CREATE INDEX monitors_account_status ON monitors(account_id, status);
CREATE INDEX monitors_account_type ON monitors(account_id, type);

CREATE TABLE notification_channels (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    config TEXT NOT NULL,
    is_active INTEGER NOT NULL DEFAULT 1,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX notification_channels_account ON notification_channels(account_id);

-- A monitor's alert targets: an inline channel (type + config) or a link to a shared channel.
CREATE TABLE monitor_notifications (
    id TEXT PRIMARY KEY,
    monitor_id TEXT NOT NULL REFERENCES monitors(id) ON DELETE CASCADE,
    channel_id TEXT REFERENCES notification_channels(id) ON DELETE CASCADE,
    type TEXT,
    enabled INTEGER NOT NULL DEFAULT 1,
    config TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX monitor_notifications_monitor ON monitor_notifications(monitor_id);
CREATE INDEX monitor_notifications_channel ON monitor_notifications(channel_id);

CREATE TABLE checks (
    id INTEGER PRIMARY KEY,
    monitor_id TEXT NOT NULL REFERENCES monitors(id) ON DELETE CASCADE,
    region_id TEXT NOT NULL,
    status TEXT NOT NULL,
    response_time INTEGER,
    status_code INTEGER,
    error TEXT,
    category TEXT,
    timings TEXT,
    details TEXT,
    checked_at INTEGER NOT NULL
);
CREATE INDEX checks_monitor_time ON checks(monitor_id, checked_at);

-- The newest check of each monitor in each region, so listings never scan checks.
CREATE TABLE monitor_latest (
    monitor_id TEXT NOT NULL REFERENCES monitors(id) ON DELETE CASCADE,
    region_id TEXT NOT NULL,
    check_id INTEGER NOT NULL,
    PRIMARY KEY (monitor_id, region_id)
) WITHOUT ROWID;

-- Status changes, consumed exactly once by incident logic (processed_at set in the same
-- transaction that acts on them).
CREATE TABLE status_transitions (
    id INTEGER PRIMARY KEY,
    monitor_id TEXT NOT NULL REFERENCES monitors(id) ON DELETE CASCADE,
    old_status TEXT NOT NULL,
    new_status TEXT NOT NULL,
    reason TEXT,
    check_id INTEGER,
    created_at INTEGER NOT NULL,
    processed_at INTEGER
);
CREATE INDEX status_transitions_pending ON status_transitions(processed_at) WHERE processed_at IS NULL;
CREATE INDEX status_transitions_monitor ON status_transitions(monitor_id, created_at);

CREATE TABLE incidents (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    monitor_id TEXT NOT NULL REFERENCES monitors(id) ON DELETE CASCADE,
    year INTEGER NOT NULL,
    number INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    resolved_at INTEGER,
    severity TEXT NOT NULL,
    status TEXT NOT NULL,
    root_cause TEXT,
    root_cause_category TEXT,
    affected_regions TEXT NOT NULL DEFAULT '[]',
    checks_failed INTEGER NOT NULL DEFAULT 0,
    checks_total INTEGER NOT NULL DEFAULT 0,
    UNIQUE (account_id, year, number)
);
CREATE INDEX incidents_account_started ON incidents(account_id, started_at);
CREATE INDEX incidents_monitor ON incidents(monitor_id, resolved_at);

CREATE TABLE incident_updates (
    id TEXT PRIMARY KEY,
    incident_id TEXT NOT NULL REFERENCES incidents(id) ON DELETE CASCADE,
    status TEXT NOT NULL,
    message TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX incident_updates_incident ON incident_updates(incident_id, created_at);

CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    secret TEXT,
    is_active INTEGER NOT NULL DEFAULT 1,
    last_status INTEGER,
    last_triggered_at INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX webhooks_account ON webhooks(account_id);

CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event TEXT NOT NULL,
    status_code INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    delivered_at INTEGER,
    created_at INTEGER NOT NULL
);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries(webhook_id, created_at);

CREATE TABLE status_pages (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    slug TEXT NOT NULL UNIQUE,
    description TEXT,
    custom_domain TEXT UNIQUE COLLATE NOCASE,
    is_public INTEGER NOT NULL DEFAULT 1,
    brand_color TEXT,
    logo_url TEXT,
    favicon_url TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX status_pages_account ON status_pages(account_id);

-- migration 2: API usage counters, one row per account, endpoint template and hour
CREATE TABLE api_usage (
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    endpoint TEXT NOT NULL,
    hour INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (account_id, hour, endpoint)
) WITHOUT ROWID;

-- migration 3: triggers that keep monitor_latest and check_count current as checks arrive
CREATE TRIGGER checks_track_latest AFTER INSERT ON checks BEGIN
    INSERT INTO monitor_latest (monitor_id, region_id, check_id)
    VALUES (NEW.monitor_id, NEW.region_id, NEW.id)
    ON CONFLICT (monitor_id, region_id) DO UPDATE SET check_id = excluded.check_id
    WHERE excluded.check_id > monitor_latest.check_id;
    UPDATE monitors SET check_count = check_count + 1 WHERE id = NEW.monitor_id;
END;

-- migration 4: status page monitor groups, in display order
CREATE TABLE status_page_groups (
    id TEXT PRIMARY KEY,
    status_page_id TEXT NOT NULL REFERENCES status_pages(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    position INTEGER NOT NULL
);
CREATE INDEX status_page_groups_page ON status_page_groups(status_page_id, position);

CREATE TABLE status_page_monitors (
    group_id TEXT NOT NULL REFERENCES status_page_groups(id) ON DELETE CASCADE,
    monitor_id TEXT NOT NULL REFERENCES monitors(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    PRIMARY KEY (group_id, monitor_id)
) WITHOUT ROWID;
CREATE INDEX status_page_monitors_monitor ON status_page_monitors(monitor_id);

-- migration 5: hourly and daily check rollups, rollup progress, regression state
-- One row per monitor, region and UTC hour ('h') or day ('d').  rt_sum/rt_count cover the
-- UP and DEGRADED checks that have a response time; rt_hist is a JSON object mapping a
-- log-scale bucket index (ceil(ln(ms) / ln(1.05))) to a count, for percentiles.
CREATE TABLE check_rollups (
    monitor_id TEXT NOT NULL REFERENCES monitors(id) ON DELETE CASCADE,
    bucket TEXT NOT NULL,
    start INTEGER NOT NULL,
    region_id TEXT NOT NULL,
    up INTEGER NOT NULL,
    down INTEGER NOT NULL,
    degraded INTEGER NOT NULL,
    rt_sum INTEGER NOT NULL,
    rt_count INTEGER NOT NULL,
    rt_hist TEXT NOT NULL,
    PRIMARY KEY (monitor_id, bucket, start, region_id)
) WITHOUT ROWID;

-- Rollups of bucket 'h' / 'd' are complete for every period that ends at or before done_until.
CREATE TABLE rollup_progress (
    bucket TEXT PRIMARY KEY,
    done_until INTEGER NOT NULL
) WITHOUT ROWID;

-- 1 while the regression detector holds the monitor DEGRADED for slow responses.
ALTER TABLE monitors ADD COLUMN regression_active INTEGER NOT NULL DEFAULT 0;

-- migration 6: heartbeat pings, and each CRON monitor's last success and running job
-- A ping log row per accepted ping (kind: success, start, fail, log); duration is the job's
-- run time in ms when a start preceded the success or fail.  last_success_at starts the
-- missed-heartbeat clock, job_started_at the job-did-not-complete clock; both survive restarts.
CREATE TABLE heartbeats (
    id INTEGER PRIMARY KEY,
    monitor_id TEXT NOT NULL REFERENCES monitors(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    message TEXT,
    duration INTEGER,
    source_ip TEXT,
    user_agent TEXT,
    received_at INTEGER NOT NULL
);
CREATE INDEX heartbeats_monitor_time ON heartbeats(monitor_id, received_at);
ALTER TABLE monitors ADD COLUMN last_success_at INTEGER;
ALTER TABLE monitors ADD COLUMN job_started_at INTEGER;

-- migration 7: durable alert outbox, failing channels, one open incident per monitor
-- One row per alert and target (a monitor's notification or a webhook), written in the same
-- transaction that consumes the status transition; done_at is set once delivery ends.
CREATE TABLE alert_outbox (
    id INTEGER PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    monitor_id TEXT,
    target_key TEXT NOT NULL,
    channel_id TEXT,
    webhook_id TEXT,
    delivery_id TEXT,
    channel_type TEXT NOT NULL,
    config TEXT NOT NULL,
    event TEXT NOT NULL,
    alert TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    status_code INTEGER,
    last_error TEXT,
    attempt_log TEXT,
    created_at INTEGER NOT NULL,
    done_at INTEGER
);
CREATE INDEX alert_outbox_pending ON alert_outbox(id) WHERE done_at IS NULL;
ALTER TABLE notification_channels ADD COLUMN failing INTEGER NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX incidents_one_open ON incidents(monitor_id) WHERE resolved_at IS NULL;

-- migration 8: inline monitor notifications are marked failing like shared channels
ALTER TABLE monitor_notifications ADD COLUMN failing INTEGER NOT NULL DEFAULT 0;
ALTER TABLE monitor_notifications ADD COLUMN last_error TEXT;

-- migration 9: team-wide hourly rollups, so team figures read 24 rows instead of every monitor's
-- One row per team (the owner's account) and UTC hour, summed from that hour's monitor rollups;
-- rollup_progress bucket 't' says how far they go.
CREATE TABLE team_rollups (
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    start INTEGER NOT NULL,
    up INTEGER NOT NULL,
    down INTEGER NOT NULL,
    degraded INTEGER NOT NULL,
    rt_sum INTEGER NOT NULL,
    rt_count INTEGER NOT NULL,
    rt_hist TEXT NOT NULL,
    PRIMARY KEY (account_id, start)
) WITHOUT ROWID;

-- migration 10: exit-code pings (/heartbeat/{id}/{code}) keep the job's exit status
ALTER TABLE heartbeats ADD COLUMN exit_code INTEGER;

-- migration 11: durable retries and grouped alerts
-- A failed attempt that may succeed later leaves its row pending with next_attempt_at set by the
-- backoff schedule; every row has a delivery_id receivers see on every attempt.  group_key joins
-- the rows a person-facing channel sends as one message (same channel config and event).
ALTER TABLE alert_outbox ADD COLUMN next_attempt_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE alert_outbox ADD COLUMN group_key TEXT;
UPDATE alert_outbox SET delivery_id = 'dlv_' || id WHERE delivery_id IS NULL;
DROP INDEX alert_outbox_pending;
CREATE INDEX alert_outbox_pending ON alert_outbox(next_attempt_at, id) WHERE done_at IS NULL;
CREATE INDEX alert_outbox_target ON alert_outbox(target_key, id) WHERE done_at IS NULL;
CREATE INDEX alert_outbox_group ON alert_outbox(group_key, next_attempt_at) WHERE done_at IS NULL;
CREATE INDEX alert_outbox_channel ON alert_outbox(channel_id, created_at);

-- migration 12: worker regions run by remote agents; per-region verdicts; agent batches
-- A region with a token_hash is probed by an agent (``statusapp region add``); is_active is its
-- liveness, kept by the server from last_seen_at; gone_at is set once its "gone" alert is sent.
ALTER TABLE worker_regions ADD COLUMN name TEXT;
ALTER TABLE worker_regions ADD COLUMN token_hash TEXT;
ALTER TABLE worker_regions ADD COLUMN last_seen_at INTEGER;
ALTER TABLE worker_regions ADD COLUMN gone_at INTEGER;
ALTER TABLE worker_regions ADD COLUMN created_at INTEGER;
CREATE UNIQUE INDEX worker_regions_token ON worker_regions(token_hash);
-- Each monitor's confirmed status in each region; the monitor's status combines them.
CREATE TABLE monitor_regions (
    monitor_id TEXT NOT NULL REFERENCES monitors(id) ON DELETE CASCADE,
    region_id TEXT NOT NULL,
    status TEXT NOT NULL,
    changed_at INTEGER NOT NULL,
    PRIMARY KEY (monitor_id, region_id)
);
INSERT INTO monitor_regions (monitor_id, region_id, status, changed_at)
    SELECT m.id, w.id, m.status, m.updated_at FROM monitors m, worker_regions w
    WHERE m.status != 'PENDING' AND m.type != 'CRON';
-- How many active enabled regions must fail for DOWN (NULL: all of them).
ALTER TABLE monitors ADD COLUMN down_quorum INTEGER;
-- When the server received a check, and the agent's own clock reading for it.
ALTER TABLE checks ADD COLUMN received_at INTEGER;
ALTER TABLE checks ADD COLUMN agent_checked_at INTEGER;
-- Result batches already stored, so a batch an agent sends again is stored once.
CREATE TABLE agent_batches (
    region_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (region_id, batch_id)
);

-- migration 13: dashboard sign-in: password hashes, sessions, setup links, sign-in attempts
-- password_hash is "scrypt$n$r$p$salt$hash" (base64); NULL: the person cannot sign in yet.
ALTER TABLE accounts ADD COLUMN password_hash TEXT;
-- The secret that signs session cookies, made on first start.
CREATE TABLE server_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
-- A signed-in browser: id is the SHA256 of the cookie's token; deleting the row signs it out.
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX sessions_account ON sessions(account_id);
-- One-time links that let a person choose a password (the first owner's /setup link).
CREATE TABLE setup_tokens (
    token_hash TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL
);
-- Failed sign-ins, counted per email and per client address over a sliding window.
CREATE TABLE signin_failures (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL COLLATE NOCASE,
    ip TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX signin_failures_email ON signin_failures(email, at);
CREATE INDEX signin_failures_ip ON signin_failures(ip, at);

-- migration 14: opening incident updates name the cause's category, not the check's error text
-- Updates are public (status pages, feeds); older ones carried the error, which can hold URLs,
-- addresses or a heartbeat job's output.  People's updates are never written at started_at.
UPDATE incident_updates SET message = COALESCE((
    SELECT m.name || ' is down (cause: ' || lower(replace(i.root_cause_category, '_', ' ')) || ')'
    FROM incidents i JOIN monitors m ON m.id = i.monitor_id
    WHERE i.id = incident_updates.incident_id), 'Monitor is down')
WHERE status = 'investigating' AND message LIKE '% is down: %'
  AND created_at = (SELECT started_at FROM incidents i WHERE i.id = incident_updates.incident_id);

-- migration 15: response assertions, cron schedules, tags and groups, maintenance windows
ALTER TABLE monitors ADD COLUMN assertions TEXT;
ALTER TABLE monitors ADD COLUMN schedule TEXT;
ALTER TABLE monitors ADD COLUMN timezone TEXT;
ALTER TABLE monitors ADD COLUMN tags TEXT;
ALTER TABLE monitors ADD COLUMN "group" TEXT;
CREATE INDEX monitors_account_group ON monitors(account_id, "group");
-- 1 for a check taken while a maintenance window covered its monitor: stored and shown, but
-- left out of uptime and response-time figures.
ALTER TABLE checks ADD COLUMN maintenance INTEGER NOT NULL DEFAULT 0;
-- A one-off window (starts_at..ends_at) or a recurring one (recurrence, an RFC 5545 RRULE, from
-- starts_at in timezone, each occurrence lasting duration_minutes).  monitor_ids is a JSON
-- array, NULL for all the team's monitors.  ends_handled_at: occurrences ending at or before it
-- have had their end acted on (an incident opened for a monitor still down).
CREATE TABLE maintenance_windows (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    title TEXT NOT NULL,
    description TEXT,
    starts_at TEXT NOT NULL,
    ends_at TEXT,
    recurrence TEXT,
    timezone TEXT NOT NULL,
    duration_minutes INTEGER,
    monitor_ids TEXT,
    suppress_alerts INTEGER NOT NULL,
    ends_handled_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX maintenance_windows_account ON maintenance_windows(account_id);
ALTER TABLE status_page_groups ADD COLUMN monitor_group TEXT;
ALTER TABLE status_page_groups ADD COLUMN monitor_tag TEXT;

-- migration 16: compact checks (about 50 bytes a check with its index, from 96)
-- Checks name their monitor and region by small integer keys instead of repeating the text ids
-- in every row and index entry.  The view ``checks`` shows the old columns, so reads are
-- unchanged; inserting into it stores a compact row and keeps monitor_latest and check_count
-- current (as the triggers of migration 3 did).  Upgrading rewrites the checks table.
CREATE TABLE monitor_keys (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE REFERENCES monitors(id) ON DELETE CASCADE
);
INSERT INTO monitor_keys (id) SELECT id FROM monitors ORDER BY rowid;
CREATE TABLE region_keys (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE
);
INSERT INTO region_keys (id) SELECT DISTINCT region_id FROM checks;
CREATE TABLE check_rows (
    id INTEGER PRIMARY KEY,
    monitor INTEGER NOT NULL REFERENCES monitor_keys(seq) ON DELETE CASCADE,
    region INTEGER NOT NULL REFERENCES region_keys(seq),
    status TEXT NOT NULL,
    response_time INTEGER,
    status_code INTEGER,
    error TEXT,
    category TEXT,
    timings TEXT,
    details TEXT,
    checked_at INTEGER NOT NULL,
    received_at INTEGER,  -- NULL: received when checked (the server's own checks)
    agent_checked_at INTEGER,
    maintenance INTEGER NOT NULL DEFAULT 0
);
INSERT INTO check_rows SELECT c.id, m.seq, r.seq, c.status, c.response_time, c.status_code,
    c.error, c.category, c.timings, c.details, c.checked_at, NULLIF(c.received_at, c.checked_at),
    c.agent_checked_at, c.maintenance
    FROM checks c JOIN monitor_keys m ON m.id = c.monitor_id JOIN region_keys r ON r.id = c.region_id
    ORDER BY c.id;
DROP TRIGGER checks_track_latest;
DROP TABLE checks;
CREATE INDEX check_rows_monitor_time ON check_rows(monitor, checked_at);
CREATE VIEW checks AS SELECT c.id AS id, m.id AS monitor_id, r.id AS region_id,
    c.status AS status, c.response_time AS response_time, c.status_code AS status_code,
    c.error AS error, c.category AS category, c.timings AS timings, c.details AS details,
    c.checked_at AS checked_at, COALESCE(c.received_at, c.checked_at) AS received_at,
    c.agent_checked_at AS agent_checked_at, c.maintenance AS maintenance
    FROM check_rows c JOIN monitor_keys m ON m.seq = c.monitor JOIN region_keys r ON r.seq = c.region;
CREATE TRIGGER checks_insert INSTEAD OF INSERT ON checks BEGIN
    INSERT OR IGNORE INTO monitor_keys (id) VALUES (NEW.monitor_id);
    INSERT OR IGNORE INTO region_keys (id) VALUES (NEW.region_id);
    INSERT INTO check_rows (monitor, region, status, response_time, status_code, error, category,
        timings, details, checked_at, received_at, agent_checked_at, maintenance)
    VALUES ((SELECT seq FROM monitor_keys WHERE id = NEW.monitor_id),
        (SELECT seq FROM region_keys WHERE id = NEW.region_id), NEW.status, NEW.response_time,
        NEW.status_code, NEW.error, NEW.category, NEW.timings, NEW.details, NEW.checked_at,
        NULLIF(NEW.received_at, NEW.checked_at), NEW.agent_checked_at,
        COALESCE(NEW.maintenance, 0));
    INSERT INTO monitor_latest (monitor_id, region_id, check_id)
    VALUES (NEW.monitor_id, NEW.region_id, last_insert_rowid())
    ON CONFLICT (monitor_id, region_id) DO UPDATE SET check_id = excluded.check_id
    WHERE excluded.check_id > monitor_latest.check_id;
    UPDATE monitors SET check_count = check_count + 1 WHERE id = NEW.monitor_id;
END;

-- migration 17: objects `statusapp apply` manages (only these may be pruned), and a keyed digest
-- of the secrets it applied to each (masked secrets alone cannot show that one changed)
ALTER TABLE monitors ADD COLUMN managed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE notification_channels ADD COLUMN managed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE status_pages ADD COLUMN managed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE monitors ADD COLUMN secrets_digest TEXT;
ALTER TABLE notification_channels ADD COLUMN secrets_digest TEXT;

-- migration 18: maintenance windows `statusapp apply` manages (only these may be pruned)
ALTER TABLE maintenance_windows ADD COLUMN managed INTEGER NOT NULL DEFAULT 0;

-- migration 19: a team's monitors by creation time with the id that breaks ties (the list's
-- default order), so a page of ids is read from the index alone, without a sort
DROP INDEX monitors_account_created;
CREATE INDEX monitors_account_created ON monitors(account_id, created_at, id);
