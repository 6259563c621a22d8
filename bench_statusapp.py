"""StatusApp benchmarks: each scenario runs a real server on loopback and prints figures.

    python bench_statusapp.py probe --monitors 10000 --interval 60
    python bench_statusapp.py heartbeat
    python bench_statusapp.py api

Shared helpers first, then one section per scenario.  Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx
import uvloop

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


async def _ping_connection(host: str, port: int, paths: list[str], stop_at: float,
                           latencies: list[float], errors: list[int]) -> None:
    """One keep-alive connection sending pings back to back until ``stop_at``."""
    reader, writer = await asyncio.open_connection(host, port)
    n = 0
    try:
        while time.perf_counter() < stop_at:
            body = f"run {n}".encode()
            path = paths[n % len(paths)]
            n += 1
            request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench\r\n"
                       f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
                       ).encode() + body
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 200"):
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(int(head[9:12]))
    finally:
        writer.close()


def _ping_load(url: str, paths: list[str], connections: int, seconds: float
               ) -> tuple[list[float], list[int], float]:
    """Drive ``connections`` concurrent keep-alive pingers for ``seconds`` on uvloop."""
    host, port = url.split("//")[1].split(":")
    latencies: list[float] = []
    errors: list[int] = []

    async def run() -> float:
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(_ping_connection(host, int(port), paths[i::connections] or paths,
                                                stop_at, latencies, errors)
                               for i in range(connections)))
        return time.perf_counter() - started
    elapsed = uvloop.run(run())
    return latencies, errors, elapsed


@bench.command()
@click.option("--monitors", default=500, show_default=True, help="CRON monitors pinged.")
@click.option("--connections", default=32, show_default=True, help="Concurrent connections.")
@click.option("--seconds", default=10.0, show_default=True, help="Measured duration.")
def heartbeat(monitors: int, connections: int, seconds: float) -> None:
    """Concurrent pings against one server: acknowledged (committed) pings/s, latency."""
    srv = Server(env={"STATUSAPP_HEARTBEAT_PINGS_PER_MINUTE": "0"}).start()
    try:
        api = httpx.Client(base_url=srv.url + "/api/v1", headers={"X-API-Key": srv.key})
        paths = []
        for i in range(monitors):
            monitor = api.post("/monitors", json={"name": f"job {i}", "type": "CRON",
                                                  "interval": 3600, "gracePeriod": 3600}).json()
            paths.append(monitor["heartbeatUrl"].split(srv.url, 1)[1])
        _ping_load(srv.url, paths, connections, 1.0)  # warm-up
        before = srv.stats()
        with sqlite3.connect(srv.db) as conn:
            rows_before = conn.execute("SELECT COUNT(*) FROM heartbeats").fetchone()[0]
        latencies, errors, elapsed = _ping_load(srv.url, paths, connections, seconds)
        after = srv.stats()
        with sqlite3.connect(srv.db) as conn:
            stored = conn.execute("SELECT COUNT(*) FROM heartbeats").fetchone()[0] - rows_before
    finally:
        srv.stop()
    ms = percentiles([v * 1000 for v in latencies])
    report("heartbeat", {
        "monitors": monitors, "connections": connections,
        "acknowledged pings": len(latencies), "stored pings": stored,
        "non-200 answers": len(errors),
        "acknowledged pings/s": len(latencies) / elapsed,
        "latency p50 ms": ms["p50"], "latency p99 ms": ms["p99"], "latency max ms": ms["max"],
        "server CPU s per 1000 pings": (after["cpu_s"] - before["cpu_s"]) * 1000
        / max(1, len(latencies)),
        "server peak RSS MB": after["peak_rss_mb"],
    })


# --- api scenario ---


if __name__ == "__main__":
    bench()
