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


async def _answer(reader, writer) -> None:
    """One HTTP/1.1 exchange: read the request head, answer 200 "ok", close."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


@bench.command(hidden=True)
@click.option("--port", type=int, required=True)
def target(port: int) -> None:
    """The probe scenario's HTTP target: asyncio streams, no framework, so it stays cheap."""
    async def serve() -> None:
        server = await asyncio.start_server(_answer, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()
    asyncio.run(serve())


def _start_target() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "bench_statusapp.py"), "target",
                             "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("the HTTP target did not start")


async def _create_monitors(server: Server, target_url: str, count: int, interval: int) -> None:
    """Create the monitors through the API, a few requests at a time."""
    async with httpx.AsyncClient(base_url=server.url + "/api/v1", timeout=30,
                                 headers={"X-API-Key": server.key}) as client:
        numbers = iter(range(count))

        async def worker() -> None:
            for n in numbers:
                response = await client.post("/monitors", json={
                    "name": f"bench {n}", "url": f"{target_url}/m/{n}", "type": "WEBSITE",
                    "interval": interval, "timeout": 10})
                if response.status_code != 201:
                    raise SystemExit(f"creating a monitor failed: {response.text}")
        await asyncio.gather(*(worker() for _ in range(8)))


def _lags(db: str, interval: int, since_ms: int, until_ms: int) -> tuple[int, list[float]]:
    """Checks in the window and each one's lag: its start minus its planned grid slot."""
    sys.path.insert(0, str(HERE))
    from statusapp import check_phase
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT monitor_id, checked_at FROM checks"
                            " WHERE checked_at >= ? AND checked_at < ?",
                            (since_ms, until_ms)).fetchall()
    lags = [max(0.0, (at / 1000 - check_phase(monitor_id, interval)) % interval)
            for monitor_id, at in rows]
    return len(rows), [0.0 if lag > interval - 0.01 else lag for lag in lags]  # ms rounding


def _no_uvloop_path() -> str:
    """A directory whose ``uvloop`` fails to import, so uvicorn falls back to asyncio's loop."""
    path = Path(tempfile.mkdtemp(prefix="statusapp-no-uvloop-")) / "uvloop"
    path.mkdir()
    (path / "__init__.py").write_text("raise ImportError('disabled by the benchmark')\n")
    return str(path.parent)


@bench.command()
@click.option("--monitors", default=10_000, show_default=True, help="HTTP monitors to create.")
@click.option("--interval", default=60, show_default=True, help="Their interval, in seconds.")
@click.option("--duration", default=120, show_default=True, help="Seconds measured.")
@click.option("--warmup", type=int, help="Seconds after creation before measuring "
                                         "[default: one interval].")
@click.option("--concurrency", default=200, show_default=True, help="[probes] max_concurrency.")
@click.option("--uvloop/--no-uvloop", default=True, show_default=True,
              help="Run StatusApp on uvloop (uvicorn's default when installed) or asyncio.")
def probe(monitors: int, interval: int, duration: int, warmup: int | None, concurrency: int,
          uvloop: bool) -> None:
    """N WEBSITE monitors against a local HTTP target: throughput, lag, CPU and memory."""
    target_proc, target_url = _start_target()
    env = {"STATUSAPP_PROBES_MAX_CONCURRENCY": str(concurrency)}
    if not uvloop:
        env["PYTHONPATH"] = os.pathsep.join([_no_uvloop_path(), os.environ.get("PYTHONPATH", "")])
    server = Server(tempfile.mkdtemp(prefix="statusapp-probe-"), env=env).start()
    try:
        started = time.monotonic()
        asyncio.run(_create_monitors(server, target_url, monitors, interval))
        created = time.monotonic() - started
        time.sleep(interval if warmup is None else warmup)
        before, t0 = server.stats(), time.time()
        time.sleep(duration)
        after, t1 = server.stats(), time.time()
        health = httpx.get(server.url + "/api/v1/health", timeout=10).json()
        count, lags = _lags(server.db, interval, int(t0 * 1000), int(t1 * 1000))
    finally:
        server.stop()
        target_proc.terminate()
        target_proc.wait(timeout=10)
    lag = percentiles(lags)
    report(f"probe: {monitors} HTTP monitors every {interval} s, "
           f"{'uvloop' if uvloop else 'asyncio loop'}, max_concurrency {concurrency}", {
               "monitors created/s": monitors / created,
               "checks/s completed": count / (t1 - t0),
               "checks/s expected": monitors / interval,
               "lag p50 (s)": lag["p50"], "lag p99 (s)": lag["p99"], "lag max (s)": lag["max"],
               "CPU s per 1,000 checks": (after["cpu_s"] - before["cpu_s"]) / max(count, 1) * 1000,
               "CPU use (% of one core)": (after["cpu_s"] - before["cpu_s"]) / (t1 - t0) * 100,
               "peak RSS (MB)": after["peak_rss_mb"],
               "health status": health["status"],
               "health lag p50/p99/max (s)": "/".join(
                   str(health["scheduler"]["lag"][k]) for k in ("p50", "p99", "max")),
           })

# --- heartbeat scenario ---

# --- api scenario ---


if __name__ == "__main__":
    bench()
