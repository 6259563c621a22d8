"""StatusApp benchmarks: each scenario runs a real server on loopback and prints figures.

    python bench_statusapp.py probe --monitors 10000 --interval 60
    python bench_statusapp.py agents --agents 4 --monitors 2500 --interval 60
    python bench_statusapp.py heartbeat
    python bench_statusapp.py idle --monitors 100
    python bench_statusapp.py create --client stdlib
    python bench_statusapp.py api
    python bench_statusapp.py assertions
    python bench_statusapp.py dashboard --monitors 500

Shared helpers first, then one section per scenario.  Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import py_compile
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click
import httpx
import uvicorn
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
        """``statusapp serve`` as installed: the module imported from its compiled bytecode
        (run as a script, it would be compiled at every start: about 35 MB more peak RSS)."""
        self.err = open(self.err_path, "w")
        py_compile.compile(str(HERE / "statusapp.py"), doraise=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "statusapp", "serve", "--db", self.db,
             "--port", str(self.port)], stderr=self.err, stdout=subprocess.DEVNULL,
            env={**self.env, "PYTHONPATH": str(HERE)}, cwd=self.dir)
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


async def _create_monitors(server: Server, target_url: str, count: int, interval: int,
                           workers: int = 8) -> None:
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
        await asyncio.gather(*(worker() for _ in range(workers)))


async def _empty_check(host: str, port: int, path: str) -> None:
    """The least an HTTP check can do: connect, send a GET, read the answer, close."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        await reader.read()
    finally:
        writer.close()


@bench.command(name="empty-probe", hidden=True)
@click.option("--url", required=True)
@click.option("--rate", type=float, required=True, help="Checks per second.")
@click.option("--seconds", type=float, required=True)
def empty_probe(url: str, rate: float, seconds: float) -> None:
    """The check path's ceiling: bare asyncio HTTP GETs at ``rate`` on uvloop, no framework."""
    host, port = url.split("//")[1].split(":")

    async def run() -> None:
        tasks, started = set(), time.perf_counter()
        for n in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
            task = asyncio.create_task(_empty_check(host, int(port), f"/m/{n}"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    uvloop.run(run())


def _empty_probe_cpu_ms(url: str, rate: float, seconds: float) -> float:
    """CPU-ms per check of the empty probe at ``rate`` for ``seconds`` (the child's rusage)."""
    proc = subprocess.Popen([sys.executable, str(HERE / "bench_statusapp.py"), "empty-probe",
                             "--url", url, "--rate", str(rate), "--seconds", str(seconds)])
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return (usage.ru_utime + usage.ru_stime) * 1000 / (rate * seconds)


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


@bench.command()
@click.option("--monitors", default=10_000, show_default=True, help="HTTP monitors to create.")
@click.option("--interval", default=60, show_default=True, help="Their interval, in seconds.")
@click.option("--duration", default=120, show_default=True, help="Seconds measured.")
@click.option("--warmup", type=int, help="Seconds after creation before measuring "
                                         "[default: one interval].")
@click.option("--concurrency", default=200, show_default=True, help="[probes] max_concurrency.")
def probe(monitors: int, interval: int, duration: int, warmup: int | None,
          concurrency: int) -> None:
    """N WEBSITE monitors against a local HTTP target: throughput, lag, CPU and memory."""
    target_proc, target_url = _start_target()
    env = {"STATUSAPP_PROBES_MAX_CONCURRENCY": str(concurrency)}
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
    target_proc, target_url = _start_target()
    try:
        ceiling = _empty_probe_cpu_ms(target_url, monitors / interval, min(duration, 30))
    finally:
        target_proc.terminate()
        target_proc.wait(timeout=10)
    cpu_ms = (after["cpu_s"] - before["cpu_s"]) / max(count, 1) * 1000
    report(f"probe: {monitors} HTTP monitors every {interval} s, "
           f"uvloop+httptools, max_concurrency {concurrency}", {
               "monitors created/s": monitors / created,
               "checks/s completed": count / (t1 - t0),
               "checks/s expected": monitors / interval,
               "lag p50 (s)": lag["p50"], "lag p99 (s)": lag["p99"], "lag max (s)": lag["max"],
               "CPU-ms per check": cpu_ms,
               "empty probe CPU-ms per check (ceiling)": ceiling,
               "CPU per check / empty probe's": cpu_ms / ceiling,
               "CPU use (% of one core)": (after["cpu_s"] - before["cpu_s"]) / (t1 - t0) * 100,
               "peak RSS (MB)": after["peak_rss_mb"],
               "health status": health["status"],
               "health lag p50/p99/max (s)": "/".join(
                   str(health["scheduler"]["lag"][k]) for k in ("p50", "p99", "max")),
           })

async def _pause_all(server: Server) -> int:
    """Pause every monitor of the server's first team; the number paused."""
    async with httpx.AsyncClient(base_url=server.url + "/api/v1", timeout=30,
                                 headers={"X-API-Key": server.key}) as client:
        ids = [m["id"] for m in (await client.get("/monitors?limit=1000")).json()["monitors"]]
        for monitor_id in ids:
            (await client.post(f"/monitors/{monitor_id}/pause")).raise_for_status()
    return len(ids)


def _thread_cpu_ns(pid: int) -> int:
    """CPU time (ns) of a process's live threads, from /proc's schedstat: finer than the 10 ms
    ticks of /proc/PID/stat, which an idle server spends a few of per second."""
    return sum(int((task / "schedstat").read_text().split()[0])
               for task in Path(f"/proc/{pid}/task").iterdir())


@bench.command()
@click.option("--monitors", default=100, show_default=True, help="Paused monitors to create.")
@click.option("--seconds", default=60, show_default=True, help="Seconds measured.")
@click.option("--settle", default=10, show_default=True, help="Seconds after pausing, unmeasured.")
def idle(monitors: int, seconds: int, settle: int) -> None:
    """An idle server (every monitor paused, no requests): CPU-ms per second of its background
    services, beside an idle no-op Starlette server (uvicorn's own ticks) in the same window."""
    target_proc, target_url = _start_target()
    server, noop = Server().start(), Noop()
    try:
        asyncio.run(_create_monitors(server, target_url, monitors, 20))
        paused = asyncio.run(_pause_all(server))
        time.sleep(settle)
        pids = (server.proc.pid, noop.proc.pid)
        before, t0 = [_thread_cpu_ns(pid) for pid in pids], time.monotonic()
        time.sleep(seconds)
        after, t1 = [_thread_cpu_ns(pid) for pid in pids], time.monotonic()
        rss = server.stats()["peak_rss_mb"]
    finally:
        server.stop()
        noop.stop()
        target_proc.terminate()
        target_proc.wait(timeout=10)
    own, floor = ((b - a) / 1e6 / (t1 - t0) for a, b in zip(before, after))
    report(f"idle: {paused} paused monitors, no requests, {seconds} s", {
        "CPU-ms per second": own,
        "no-op server CPU-ms per second (floor)": floor,
        "above the floor (CPU-ms per second)": own - floor,
        "peak RSS (MB)": rss})


def _create_stdlib(server: Server, target_url: str, count: int, interval: int,
                   workers: int) -> None:
    """The same creates from a light client: one keep-alive ``http.client`` connection per
    thread, so the figure shows the server's capacity rather than httpx's cost."""
    numbers, failures = iter(range(count)), []
    headers = {"X-API-Key": server.key or "", "Content-Type": "application/json"}

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            for n in numbers:
                conn.request("POST", "/api/v1/monitors", headers=headers, body=json.dumps({
                    "name": f"bench {n}", "url": f"{target_url}/m/{n}", "type": "WEBSITE",
                    "interval": interval, "timeout": 10}))
                response = conn.getresponse()
                body = response.read()
                if response.status != 201:
                    failures.append(body.decode())
                    return
        finally:
            conn.close()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"creating a monitor failed: {failures[0]}")


def _own_cpu_s() -> float:
    usage = os.times()
    return usage.user + usage.system


def _create_run(target_url: str, monitors: int, workers: int, kind: str,
                env: dict[str, str] | None = None) -> dict[str, float]:
    """One server, ``monitors`` creates: creates/s, server and client CPU-ms per create."""
    server = Server(env=env).start()
    try:
        before, started, own = server.stats(), time.perf_counter(), _own_cpu_s()
        if kind == "httpx":
            asyncio.run(_create_monitors(server, target_url, monitors, 60, workers))
        else:
            _create_stdlib(server, target_url, monitors, 60, workers)
        elapsed, after, own = time.perf_counter() - started, server.stats(), _own_cpu_s() - own
    finally:
        server.stop()
    return {"per_s": monitors / elapsed,
            "server_ms": (after["cpu_s"] - before["cpu_s"]) * 1000 / monitors,
            "client_ms": own * 1000 / monitors}


@bench.command()
@click.option("--monitors", default=1000, show_default=True, help="Monitors to create.")
@click.option("--workers", default=8, show_default=True, help="Concurrent API clients.")
@click.option("--client", "kind", type=click.Choice(["httpx", "stdlib"]), default="httpx",
              show_default=True, help="httpx.AsyncClient, or http.client connections in threads.")
def create(monitors: int, workers: int, kind: str) -> None:
    """Creating monitors through the API from a Python client: rate, server CPU-ms each and
    the client's own CPU-ms each (this process, on the same cores); beside it the same creates
    on a server that does not probe (no first checks), in the same run."""
    target_proc, target_url = _start_target()
    try:
        run = _create_run(target_url, monitors, workers, kind)
        bare = _create_run(target_url, monitors, workers, kind, {"STATUSAPP_PROBES_LOCAL": "false"})
    finally:
        target_proc.terminate()
        target_proc.wait(timeout=10)
    report(f"create: {monitors} WEBSITE monitors, {workers} concurrent {kind} clients", {
        "monitors created/s": run["per_s"],
        "server CPU ms per create": run["server_ms"],
        "client CPU ms per create": run["client_ms"],
        "no probing: monitors created/s": bare["per_s"],
        "no probing: server CPU ms/create": bare["server_ms"],
        "no probing: client CPU ms/create": bare["client_ms"],
    })


# --- heartbeat scenario ---


# --- agents scenario ---


def _proc_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines()
                if line.startswith("VmRSS:")) / 1024


def _add_region(db: str, region: str) -> str:
    out = subprocess.run([sys.executable, str(HERE / "statusapp.py"), "region", "add", region,
                          "--name", region, "--db", db], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


def _installed_copy(workdir: str) -> dict[str, str]:
    """An environment in which ``statusapp`` runs as after ``pip install .``: imported from a
    directory with its bytecode compiled (compiling the 300 KB module at start-up alone peaks
    at about 25 MB), and without ``rich`` and ``trio``, which this development environment has
    for other tools and which httpx/httpcore import when present, but StatusApp does not need."""
    site = Path(workdir) / "installed"
    site.mkdir()
    for name in ("statusapp.py", "schema.sql"):
        (site / name).write_bytes((HERE / name).read_bytes())
    subprocess.run([sys.executable, "-m", "py_compile", str(site / "statusapp.py")], check=True)
    for name in ("rich", "trio"):
        (site / name).mkdir()
        (site / name / "__init__.py").write_text("raise ImportError('not a StatusApp dependency')\n")
    return {"PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}


def _start_agent(server: Server, env: dict[str, str], token: str,
                 region: str) -> subprocess.Popen:
    state = Path(server.dir) / f"agent-{region}"
    return subprocess.Popen(
        [sys.executable, "-m", "statusapp", "agent", "--server", server.url,
         "--state", str(state)], stdout=subprocess.DEVNULL,
        stderr=open(Path(server.dir) / f"agent-{region}.err", "w"),
        env={**os.environ, **env, "STATUSAPP_AGENT_TOKEN": token,
             "STATUSAPP_SERVER_LOG_LEVEL": "warning"}, cwd=server.dir)


def _agent_window(db: str, since_ms: int, until_ms: int) -> dict[str, list[tuple[int, int]]]:
    """Per region, (checked_at, received_at) of the checks stored in the window."""
    out: dict[str, list[tuple[int, int]]] = {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        for region, at, received in conn.execute(
                "SELECT region_id, checked_at, received_at FROM checks"
                " WHERE received_at >= ? AND received_at < ?", (since_ms, until_ms)):
            out.setdefault(region, []).append((at, received))
    return out


@bench.command()
@click.option("--agents", "count", default=4, show_default=True, help="Agents (regions).")
@click.option("--monitors", default=2500, show_default=True,
              help="HTTP monitors, each probed by every agent.")
@click.option("--interval", default=60, show_default=True, help="Their interval, in seconds.")
@click.option("--duration", default=120, show_default=True, help="Seconds measured.")
def agents(count: int, monitors: int, interval: int, duration: int) -> None:
    """Remote agents: server ingest CPU per check, delivery lag, agent CPU per check and RSS.

    The server probes nothing itself; ``count`` agents probe every monitor, and one more agent
    whose region no monitor names shows an idle agent's memory."""
    server = Server(env={"STATUSAPP_PROBES_LOCAL": "false"})
    key = _init_db(server.db)
    regions = [f"r{n}" for n in range(count)]
    tokens = {r: _add_region(server.db, r) for r in [*regions, "idle"]}
    target, target_url = _start_target()
    server.start()
    procs: dict[str, subprocess.Popen] = {}
    try:
        with httpx.Client(base_url=server.url + "/api/v1", timeout=30,
                          headers={"X-API-Key": key}) as client:
            for n in range(monitors):
                client.post("/monitors", json={
                    "name": f"bench {n}", "url": f"{target_url}/m/{n}", "interval": interval,
                    "timeout": 10, "enabledWorkerRegionIds": regions}).raise_for_status()
        installed = _installed_copy(server.dir)
        procs = {r: _start_agent(server, installed, t, r) for r, t in tokens.items()}
        time.sleep(interval + 10)  # every monitor checked once; steady state from here
        before = {r: proc_stats(p.pid)["cpu_s"] for r, p in procs.items()}
        server_before = server.stats()["cpu_s"]
        since = int(time.time() * 1000)
        time.sleep(duration)
        until = int(time.time() * 1000)
        server_cpu = server.stats()["cpu_s"] - server_before
        agent_cpu = {r: proc_stats(p.pid)["cpu_s"] - before[r] for r, p in procs.items()}
        rss = {r: _proc_rss_mb(p.pid) for r, p in procs.items()}
        window = _agent_window(server.db, since, until)
        _, lags = _lags(server.db, interval, since, until - 5000)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
        server.stop()
        target.terminate()
    stored = sum(len(v) for v in window.values())
    delays = [(received - at) / 1000 for rows in window.values() for at, received in rows]
    expected = count * monitors * duration / interval
    figures: dict[str, object] = {
        "agents x monitors": f"{count} x {monitors} at {interval} s",
        "checks stored / expected": f"{stored} / {expected:.0f}",
        "server CPU ms per check (ingest)": server_cpu * 1000 / max(1, stored),
        "server CPU % of one core": server_cpu * 100 / duration}
    figures.update({f"start lag s {k}": v for k, v in percentiles(lags).items()})
    figures.update({f"check to stored s {k}": v for k, v in percentiles(delays).items()})
    for region in regions:
        checks = len(window.get(region, []))
        figures[f"agent {region} CPU ms per check"] = agent_cpu[region] * 1000 / max(1, checks)
        figures[f"agent {region} RSS MB"] = rss[region]
    figures["idle agent RSS MB"] = rss["idle"]
    figures["idle agent CPU s"] = agent_cpu["idle"]
    report("agents", figures)


async def _connection(host: str, port: int, requests: list[tuple[str, str, bytes]],
                      headers: str, stop_at: float, latencies: list[float],
                      errors: list[int]) -> None:
    """One keep-alive connection sending ``(method, path, body)`` requests back to back, in
    turn, until ``stop_at``; 2xx/3xx latencies and other statuses are recorded."""
    reader, writer = await asyncio.open_connection(host, port)
    n = 0
    try:
        while time.perf_counter() < stop_at:
            method, path, body = requests[n % len(requests)]
            n += 1
            request = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench\r\n"
                       f"{headers}Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                       f"\r\n").encode() + body
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if head[9:10] in (b"2", b"3"):
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(int(head[9:12]))
    finally:
        writer.close()


def load(url: str, requests: list[tuple[str, str, bytes]], connections: int, seconds: float,
         headers: dict[str, str] | None = None) -> tuple[list[float], list[int], float]:
    """Drive ``connections`` concurrent keep-alive clients for ``seconds`` on uvloop; each
    connection takes every ``connections``-th request of the list in turn."""
    host, port = url.split("//")[1].split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    latencies: list[float] = []
    errors: list[int] = []

    async def run() -> float:
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(_connection(host, int(port), requests[i::connections] or requests,
                                           head, stop_at, latencies, errors)
                               for i in range(connections)))
        return time.perf_counter() - started
    elapsed = uvloop.run(run())
    return latencies, errors, elapsed


def measure(pid: int, url: str, requests: list[tuple[str, str, bytes]], connections: int,
            seconds: float, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Requests/s, latency p50/p99 (ms) and the server's CPU-ms per answered request."""
    load(url, requests, connections, min(1.0, seconds))  # warm-up
    return _measured(pid, url, requests, connections, seconds, headers)


def _measured(pid: int, url: str, requests: list[tuple[str, str, bytes]], connections: int,
              seconds: float, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """measure's figures, without the warm-up; ``seconds`` and ``cpu_s`` are the totals."""
    before = proc_stats(pid)["cpu_s"]
    latencies, errors, elapsed = load(url, requests, connections, seconds, headers)
    cpu = proc_stats(pid)["cpu_s"] - before
    ms = percentiles([v * 1000 for v in latencies])
    return {"per_s": len(latencies) / elapsed, "p50": ms["p50"], "p99": ms["p99"],
            "cpu_ms": cpu * 1000 / max(1, len(latencies)), "answered": len(latencies),
            "errors": len(errors), "seconds": elapsed, "cpu_s": cpu,
            "latencies": latencies}


def interleaved(pid: int, url: str, requests: list[tuple[str, str, bytes]], ceiling: Noop,
                method: str, connections: int, seconds: float,
                slices: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The server's figures and the no-op route's, measured in ``slices`` alternating slices
    (``seconds`` in all for each side; ABBA order), so that both see the same neighbours.
    Each slice also has ``server_cpu_s``, the server's CPU time during it: in the no-op
    slices, the work its own slices left behind (WAL checkpoints, deadlines)."""
    noop = [(method, "/noop", b"run 0")]
    load(url, requests, connections, 1.0)  # warm-ups
    load(ceiling.url, noop, connections, 1.0)
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    sides = [(ours, pid, url, requests), (theirs, ceiling.proc.pid, ceiling.url, noop)]
    for n in range(slices):
        for out, side_pid, side_url, side_requests in sides if n % 2 == 0 else sides[::-1]:
            before = proc_stats(pid)["cpu_s"]
            out.append(_measured(side_pid, side_url, side_requests, connections,
                                 seconds / slices))
            out[-1]["server_cpu_s"] = proc_stats(pid)["cpu_s"] - before
    return ours, theirs


def _overall(slices: list[dict[str, Any]]) -> dict[str, float]:
    """The slices of one side taken together: requests/s, CPU-ms per request, latencies."""
    answered = sum(s["answered"] for s in slices)
    ms = percentiles([v * 1000 for s in slices for v in s["latencies"]])
    return {"per_s": answered / sum(s["seconds"] for s in slices), "answered": answered,
            "cpu_ms": sum(s["cpu_s"] for s in slices) * 1000 / max(1, answered),
            "errors": sum(s["errors"] for s in slices), "p50": ms["p50"], "p99": ms["p99"]}


# The ceiling for request paths: a no-op Starlette route served by uvicorn with the settings
# `statusapp serve` uses, measured by the same load in the same run.

@bench.command(hidden=True)
@click.option("--port", type=int, required=True)
def noop(port: int) -> None:
    """A Starlette app whose routes do nothing: GET and POST /noop answer a small JSON."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def answer(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"ok": True})
    app = Starlette(routes=[Route("/noop", answer, methods=["GET", "POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                server_header=False, lifespan="off")


def _ceiling(method: str, connections: int, seconds: float,
             env: dict[str, str] | None = None) -> dict[str, float]:
    """The no-op route's figures under the given load."""
    server = Noop(env)
    try:
        return server.measure(method, connections, seconds)
    finally:
        server.stop()


class Noop:
    """The no-op server in a subprocess."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(HERE / "bench_statusapp.py"), "noop",
                                      "--port", str(self.port)], env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/noop", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise SystemExit("the no-op server did not start")

    def measure(self, method: str, connections: int, seconds: float) -> dict[str, float]:
        return measure(self.proc.pid, self.url, [(method, "/noop", b"run 0")], connections,
                       seconds)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@bench.command()
@click.option("--monitors", default=500, show_default=True, help="CRON monitors pinged.")
@click.option("--connections", default=32, show_default=True, help="Concurrent connections.")
@click.option("--seconds", default=10.0, show_default=True,
              help="Measured duration of each side (the pings, the no-op route).")
@click.option("--slices", default=5, show_default=True,
              help="Alternating slices the two sides' seconds are cut into.")
def heartbeat(monitors: int, connections: int, seconds: float, slices: int) -> None:
    """Concurrent pings against one server: acknowledged (committed) pings/s, latency, CPU-ms
    per ping, beside a no-op POST route under the same load, the two measured in alternating
    slices of the same run (both servers up throughout)."""
    env = {"STATUSAPP_HEARTBEAT_PINGS_PER_MINUTE": "0"}
    srv, ceiling = Server(env=env).start(), Noop(env)
    try:
        api = httpx.Client(base_url=srv.url + "/api/v1", headers={"X-API-Key": srv.key})
        paths = []
        for i in range(monitors):
            monitor = api.post("/monitors", json={"name": f"job {i}", "type": "CRON",
                                                  "interval": 3600, "gracePeriod": 3600}).json()
            paths.append(monitor["heartbeatUrl"].split(srv.url, 1)[1])
        with sqlite3.connect(srv.db) as conn:
            rows_before = conn.execute("SELECT COUNT(*) FROM heartbeats").fetchone()[0]
        ours, theirs = interleaved(srv.proc.pid, srv.url, [("POST", p, b"run") for p in paths],
                                   ceiling, "POST", connections, seconds, slices)
        with sqlite3.connect(srv.db) as conn:
            stored = conn.execute("SELECT COUNT(*) FROM heartbeats").fetchone()[0] - rows_before
        rss = srv.stats()["peak_rss_mb"]
    finally:
        srv.stop()
        ceiling.stop()
    pings, noop = _overall(ours), _overall(theirs)
    report("heartbeat (uvloop+httptools)", {
        "monitors": monitors, "connections": connections,
        "slices (each side)": f"{slices} of {seconds / slices:.1f} s, alternating",
        "acknowledged pings": pings["answered"],
        "stored pings (measured + warm-up)": stored, "non-200 answers": pings["errors"],
        "acknowledged pings/s": pings["per_s"],
        "no-op POST route req/s (ceiling)": noop["per_s"],
        "pings/s as % of the ceiling": pings["per_s"] / noop["per_s"] * 100,
        "  % of the ceiling, each slice": ", ".join(f"{a['per_s'] / b['per_s'] * 100:.0f}"
                                                    for a, b in zip(ours, theirs)),
        "latency p50 / p99 ms": f"{pings['p50']:.1f} / {pings['p99']:.1f}",
        "server CPU-ms per ping": f"{pings['cpu_ms']:.3f}",
        "  each slice": ", ".join(f"{a['cpu_ms']:.3f}" for a in ours),
        "  with its CPU in the no-op slices": "%.3f" % (sum(
            s["server_cpu_s"] for s in ours + theirs) * 1000 / max(1, pings["answered"])),
        "no-op CPU-ms per request": f"{noop['cpu_ms']:.3f}",
        "server peak RSS MB": rss,
    })


# --- api scenario ---

DAY_S = 86_400


def _init_db(path: str) -> str:
    """A new database with its owner account; return the owner's API key."""
    out = subprocess.run([sys.executable, str(HERE / "statusapp.py"), "init", "--email",
                          "bench@localhost", "--db", path], capture_output=True, text=True,
                         check=True).stdout
    return out.strip().splitlines()[-1]


def _fill_api_db(path: str, monitors: int, days: int, raw_days: int,
                 down_hours: int = 50) -> dict[str, float]:
    """1,000 monitors with ``days`` of 60 s checks: synthetic hourly and daily rollups for the
    days before the last ``raw_days`` (as the rollup service leaves them), raw checks for the
    last ``raw_days`` days plus today, then the real rollup service over the raw part."""
    import asyncio

    import statusapp
    hour_ms, day_ms = statusapp.HOUR_MS, statusapp.DAY_MS
    now = int(time.time() * 1000)
    raw_start = now // day_ms * day_ms - raw_days * day_ms
    first = now // day_ms * day_ms - days * day_ms
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?)"
        " INSERT INTO monitors (id, account_id, name, url, type, interval, timeout, http_method,"
        " grace_period, ssl_cert_expiry_days, regression_enabled, regression_threshold,"
        " regression_period, performance_timings, domain_expiry_days, domain_monitor_dns,"
        " domain_monitor_blacklist, domain_monitor_whois, status, is_paused, created_at,"
        " updated_at) SELECT printf('mon_%016x', i), (SELECT id FROM accounts), 'site ' || i,"
        " 'http://127.0.0.1:9/' || i, 'WEBSITE', 60, 30, 'GET', 60, 30, 0, 50, 7, 0, 30, 0, 0,"
        " 0, CASE WHEN i % 50 = 7 THEN 'DOWN' WHEN i % 100 = 3 THEN 'DEGRADED' ELSE 'UP' END,"
        " 1, ? + i, ? + i FROM n", (monitors, now - days * day_ms, now - days * day_ms))
    for bucket, span, per in (("h", hour_ms, 60), ("d", day_ms, 1440)):
        conn.execute(
            "WITH RECURSIVE t(s) AS (SELECT ? UNION ALL SELECT s + ? FROM t WHERE s + ? < ?),"
            " r AS (SELECT m.id AS id, t.s AS s, abs(random()) % 100 < ? AS down"
            "       FROM monitors m, t"
            "       ORDER BY m.id, t.s)"
            " INSERT INTO check_rollups (monitor_id, bucket, start, region_id, up, down, degraded,"
            " rt_sum, rt_count, rt_hist) SELECT id, ?, s, 'local', ? - down, down, 0,"
            " (? - down) * 100, ? - down,"
            " json_object('93', ? / 3, '94', ? / 3, '95', ? / 3 - down) FROM r",
            (first, span, span, raw_start, down_hours, bucket, per, per, per, per, per, per))
    conn.execute("INSERT INTO rollup_progress VALUES ('h', ?), ('d', ?)", (raw_start, raw_start))
    conn.execute("INSERT INTO monitor_keys (id) SELECT id FROM monitors ORDER BY rowid")
    conn.execute("INSERT OR IGNORE INTO region_keys (id) VALUES ('local')")
    conn.execute(  # straight into the compact rows, past the view's per-row trigger
        "WITH RECURSIVE t(s) AS (SELECT ? UNION ALL SELECT s + 60000 FROM t WHERE s + 60000 < ?)"
        " INSERT INTO check_rows (monitor, region, status, response_time, status_code,"
        " checked_at) SELECT m.seq, (SELECT seq FROM region_keys WHERE id = 'local'),"
        " CASE WHEN abs(random()) % 1000 = 0 THEN 'DOWN' ELSE 'UP' END, 60 + abs(random()) % 120,"
        " 200, t.s FROM t, monitor_keys m ORDER BY t.s", (raw_start, now))
    conn.execute("INSERT INTO monitor_latest SELECT monitor_id, region_id, MAX(id) FROM checks"
                 " GROUP BY monitor_id, region_id")
    conn.execute("UPDATE monitors SET check_count = (SELECT COUNT(*) FROM checks"
                 " WHERE monitor_id = monitors.id)")
    conn.execute("COMMIT")

    async def roll() -> None:
        db = statusapp.Database(path)
        await db.open()
        try:
            await statusapp.roll_up(db)
        finally:
            await db.close()
    asyncio.run(roll())
    sizes = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    raw_monitor_days = monitors * (now - raw_start) / day_ms
    rollup_bytes = sizes.get("check_rollups", 0) / (monitors * days)
    raw_bytes = (sizes.get("check_rows", 0) + sizes.get("check_rows_monitor_time", 0)
                 ) / raw_monitor_days
    file_bytes = Path(path).stat().st_size
    return {"bytes per stored check (row + index)": raw_bytes / 1440,
            "raw bytes/monitor/day (60 s)": raw_bytes,
            "rollup bytes/monitor/day (h+d)": rollup_bytes,
            "db file MB (this mix)": file_bytes / 1e6,
            "db KB per monitor-month (this mix)": file_bytes / 1024 / monitors * 30 / days,
            "KB per monitor-month, raw 30 d kept": (raw_bytes + rollup_bytes) * 30 / 1024}


def _cold_cpu_ms(server: Server, path: str, key: str, clients: int) -> dict[str, float]:
    """``clients`` simultaneous first requests of ``path``: wall ms and server CPU-ms in all."""
    async def burst() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": key},
                                     timeout=60) as client:
            answers = await asyncio.gather(*(client.get(path) for _ in range(clients)))
            for answer in answers:
                answer.raise_for_status()
    before, started = server.stats()["cpu_s"], time.perf_counter()
    asyncio.run(burst())
    return {"wall_ms": (time.perf_counter() - started) * 1000,
            "cpu_ms": (server.stats()["cpu_s"] - before) * 1000}


@bench.command()
@click.option("--monitors", default=1000, show_default=True)
@click.option("--days", default=30, show_default=True, help="Days of history.")
@click.option("--raw-days", default=1, show_default=True,
              help="Complete days kept as raw checks (plus today); older days are rollups.")
@click.option("--down-hours", default=50, show_default=True,
              help="Percent of rolled-up hours (and days) with a failed check.")
@click.option("--clients", default=8, show_default=True, help="Concurrent keep-alive clients.")
@click.option("--seconds", default=8.0, show_default=True, help="Measured seconds per route.")
def api(monitors: int, days: int, raw_days: int, down_hours: int, clients: int,
        seconds: float) -> None:
    """Request paths on a database with a month of history for every monitor: requests/s,
    p50/p99 and server CPU-ms per request, beside a no-op GET route under the same load."""
    import statusapp
    server = Server()
    key = _init_db(server.db)
    started = time.monotonic()
    figures: dict[str, object] = {"monitors": monitors, "days of history": days,
                                  "raw days (+ today)": raw_days, "clients": clients}
    figures["% of hours with a failure"] = down_hours
    figures.update(_fill_api_db(server.db, monitors, days, raw_days, down_hours))
    figures["build s"] = time.monotonic() - started
    ceiling = _ceiling("GET", clients, seconds)
    figures["no-op GET route: req/s, CPU-ms (ceiling)"] = (
        f"{ceiling['per_s']:.0f}, {ceiling['cpu_ms']:.3f}")
    server.start()
    try:
        cold = _cold_cpu_ms(server, "/api/v1/analytics", key, clients)
        figures[f"GET /analytics cold, {clients} at once: wall ms, CPU-ms in all"] = (
            f"{cold['wall_ms']:.0f}, {cold['cpu_ms']:.0f}")
        with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=30) as client:
            client.post("/api/v1/status-pages", json={
                "name": "Bench", "slug": "bench", "monitorGroups": [
                    {"name": "All", "monitorIds": [f"mon_{i:016x}" for i in range(50)]}]}
                        ).raise_for_status()
            plain = client.get("/status/bench", headers={"Accept-Encoding": "identity"})
            zipped = client.get("/status/bench", headers={"Accept-Encoding": "gzip"})
        figures["status page KB (plain, gzip)"] = (
            f"{len(plain.content) / 1024:.0f}, {int(zipped.headers['content-length']) / 1024:.0f}")
        routes = {
            "GET /status/bench cached": ["/status/bench"],
            "GET /status/bench uncached": [f"/status/bench?n={n}" for n in range(50_000)],
            "GET /status/bench.json cached": ["/status/bench.json"],
            "GET /monitors?limit=100 cached": ["/api/v1/monitors?limit=100"],
            # never cached: 100 pages of 91-100 monitors, more than the cache keeps
            "GET /monitors?limit=100 uncached": [f"/api/v1/monitors?limit={limit}&page={page}"
                                                 for limit in range(91, 101)
                                                 for page in range(1, 11)],
            "GET /monitors uncached, every sort": [
                f"/api/v1/monitors?limit={limit}&page={page}&sort={sort}&order={order}"
                for limit in range(91, 101) for page in range(1, 10)
                for sort in statusapp.MONITOR_SORTS for order in ("asc", "desc")],
            "GET /monitors/{id}": ["/api/v1/monitors/mon_0000000000000011"],
            "GET /analytics": ["/api/v1/analytics"],
            "GET /analytics/monitors/{id}?30d":
                ["/api/v1/analytics/monitors/mon_0000000000000011?period=30d"]}
        for name, paths in routes.items():
            got = measure(server.proc.pid, server.url, [("GET", p, b"") for p in paths], clients,
                          seconds, {"X-API-Key": key, "Accept-Encoding": "gzip"})
            figures[f"{name}: req/s (% of no-op), p99 ms, CPU-ms"] = (
                f"{got['per_s']:.0f} ({got['per_s'] / ceiling['per_s'] * 100:.0f} %), "
                f"{got['p99']:.1f}, {got['cpu_ms']:.2f}" + (
                    f" [{got['errors']} errors]" if got["errors"] else ""))
        figures.update(server.stats())
    finally:
        server.stop()
    report("api", figures)


# Assertions: the probe's CPU cost per WEBSITE/API check, with and without five assertions on a
# JSON body, against a loopback HTTP server (process CPU, which includes that server's thread).

_ASSERTIONS = [
    {"source": "STATUS_CODE", "property": None, "comparison": "EQUALS", "target": "200"},
    {"source": "JSON_BODY", "property": "$.status", "comparison": "EQUALS", "target": "ok"},
    {"source": "JSON_BODY", "property": "$.items[?@.ok == false]", "comparison": "IS_EMPTY",
     "target": ""},
    {"source": "TEXT_BODY", "property": None, "comparison": "NOT_CONTAINS", "target": "error"},
    {"source": "TEXT_BODY", "property": None, "comparison": "MATCHES", "target": '"status": "ok"'},
]


async def _probe_cpu_ms(url: str, assertions: list[dict], checks: int) -> float:
    import statusapp
    ctx = statusapp.ProbeContext(statusapp.load_config(environ={}))
    monitor = {"url": url, "type": "API", "timeout": 5, "assertions": assertions}
    try:
        for _ in range(10):
            await statusapp.probe_http(monitor, ctx)
        started = time.process_time()
        for _ in range(checks):
            result = await statusapp.probe_http(monitor, ctx)
            assert result.status == "UP", result
        return (time.process_time() - started) / checks * 1000
    finally:
        await ctx.aclose()


@bench.command()
@click.option("--items", default=3000, help="Items in the JSON body (3000: about 100 KB)")
@click.option("--checks", default=200)
def assertions(items: int, checks: int) -> None:
    """CPU-ms per check, plain and with five assertions (two JSONPath, one regex)."""
    import http.server
    import json
    import threading
    body = json.dumps({"status": "ok", "items": [{"id": i, "ok": True} for i in range(items)]})

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        plain = asyncio.run(_probe_cpu_ms(url, [], checks))
        checked = asyncio.run(_probe_cpu_ms(url, _ASSERTIONS, checks))
    finally:
        server.shutdown()
    report("assertions", {"body KB": len(body) / 1024, "plain CPU-ms/check": plain,
                          "5 assertions CPU-ms/check": checked, "ratio": checked / plain})


# --- dashboard scenario ---


def _signed_in(server: Server, email: str, password: str) -> httpx.Client:
    """A client signed in to the dashboard the way a browser is (form, CSRF token, cookie)."""
    import re
    client = httpx.Client(base_url=server.url, timeout=60)
    page = client.get("/signin").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    client.post("/signin", data={"csrf": csrf, "email": email, "password": password})
    if "statusapp_session" not in client.cookies:
        raise SystemExit("signing in failed")
    return client


@bench.command()
@click.option("--monitors", default=500, show_default=True)
@click.option("--days", default=30, show_default=True, help="Days of history.")
@click.option("--requests", default=50, show_default=True, help="Timed requests per page.")
def dashboard(monitors: int, days: int, requests: int) -> None:
    """Server CPU per render of each dashboard page, with a month of history per monitor."""
    server = Server()
    _init_db(server.db)
    figures: dict[str, object] = {"monitors": monitors, "days of history": days}
    _fill_api_db(server.db, monitors, days, 1)
    subprocess.run([sys.executable, str(HERE / "statusapp.py"), "passwd", "--email",
                    "bench@localhost", "--db", server.db], input="bench password\n", text=True,
                   check=True, capture_output=True)
    server.start()
    monitor = "mon_0000000000000011"
    pages = {"overview (100 per page)": "/", "overview page 5": "/?page=5",
             "overview search": "/?search=site+1", "monitor 24h": f"/monitors/{monitor}",
             "monitor 7d": f"/monitors/{monitor}?period=7d",
             "monitor 30d": f"/monitors/{monitor}?period=30d",
             "monitor edit form": f"/monitors/{monitor}/edit", "new monitor form": "/monitors/new",
             "new channel form (NTFY)": "/channels/new?type=NTFY",
             "maintenance windows": "/maintenance",
             "new maintenance window form": "/maintenance/new",
             "incidents": "/incidents", "channels": "/channels", "team": "/team",
             "API keys": "/keys", "account": "/account"}
    try:
        client = _signed_in(server, "bench@localhost", "bench password")
        for name, path in pages.items():
            client.get(path).raise_for_status()
            before = server.stats()["cpu_s"]
            started = time.perf_counter()
            for _ in range(requests):
                client.get(path).raise_for_status()
            wall = (time.perf_counter() - started) / requests
            cpu = (server.stats()["cpu_s"] - before) / requests
            figures[f"{name} CPU ms"] = cpu * 1000
            figures[f"{name} wall ms"] = wall * 1000
        client.close()
        figures.update(server.stats())
    finally:
        server.stop()
    report("dashboard", figures)


if __name__ == "__main__":
    bench()
