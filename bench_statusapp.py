"""StatusApp benchmarks: each scenario runs a real server on loopback and prints figures.

    python bench_statusapp.py probe --monitors 10000 --interval 60
    python bench_statusapp.py heartbeat
    python bench_statusapp.py api

Shared helpers first, then one section per scenario.  Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentiles(values: list[float], points: tuple[int, ...] = (50, 99)) -> dict[str, float]:
    """Nearest-rank percentiles plus the maximum (empty input gives zeros)."""
    if not values:
        return {**{f"p{p}": 0.0 for p in points}, "max": 0.0}
    ordered = sorted(values)
    out = {f"p{p}": ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))]
           for p in points}
    out["max"] = ordered[-1]
    return out


def proc_stats(pid: int) -> dict[str, float]:
    """Peak RSS (MB) and CPU seconds (user + system) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kb = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"peak_rss_mb": peak_kb / 1024, "cpu_s": (int(fields[11]) + int(fields[12])) / ticks}


class Server:
    """`statusapp serve` in a subprocess on a free port, with its first-run API key."""

    def __init__(self, workdir: str | None = None, env: dict[str, str] | None = None) -> None:
        self.dir = workdir or tempfile.mkdtemp(prefix="statusapp-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = str(Path(self.dir) / "bench.db")
        self.env = {**os.environ, "STATUSAPP_PROBES_MIN_INTERVAL": "1",
                    "STATUSAPP_SERVER_LOG_LEVEL": "warning", **(env or {})}
        self.err_path = Path(self.dir) / "serve.err"

    def start(self) -> "Server":
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "statusapp.py"), "serve", "--db", self.db,
             "--port", str(self.port)], stderr=self.err, stdout=subprocess.DEVNULL,
            env=self.env, cwd=self.dir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/api/v1/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit(f"server did not start: {self.err_path.read_text()}")
        keys = [line for line in self.err_path.read_text().splitlines()
                if line.startswith("sk_live_")]
        self.key = keys[-1] if keys else None
        return self

    def stats(self) -> dict[str, float]:
        return proc_stats(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.err.close()


def report(title: str, figures: dict[str, object]) -> None:
    """Print one scenario's figures, one per line, for the README."""
    click.echo(f"== {title} ({os.cpu_count()} cores, Python {sys.version.split()[0]})")
    for name, value in figures.items():
        click.echo(f"  {name:<32} {value:.2f}" if isinstance(value, float)
                   else f"  {name:<32} {value}")


@click.group()
def bench() -> None:
    """StatusApp benchmarks."""


# --- probe scenario ---

# --- heartbeat scenario ---

# --- api scenario ---


if __name__ == "__main__":
    bench()
