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

# --- Page tests ---

# --- CLI tests ---
