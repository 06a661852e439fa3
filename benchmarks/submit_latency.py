"""Submit latency of sd_txt2img: in-process (TaskService.sd_txt2img) and over HTTP (uvicorn on loopback).

    PYTHONPATH=. python benchmarks/submit_latency.py [--repeats N] [--http-rounds N] [--concurrency 200]

In-process: median/p90/p99 of one submit (validation + translation + SQLite insert + enqueue), after a
warm-up, with the parts timed alone in the same run as the baseline (parse, translate, store insert), once
with the worker idle and once with it draining the queue (a null engine that returns no images).

HTTP: `sdengine serve` in its own process (null engine), a client process opens `--concurrency` keep-alive
connections and fires one submit on each at the same instant, `--http-rounds` times after a warm-up round;
latency = request written -> response read, per request. A /health GET burst is the HTTP baseline (the
server's floor without any API work).

Prints a markdown table (and --json). The engine is a null engine: this measures the API, not generation.

``--load``: the submit latency while the worker generates (issue 25): `sdengine serve` on the real engine (the
demo model, small images), ``--threads`` client threads each submitting ``/scc/sd_txt2img`` one after another
(so the worker always has work), and ``--webui`` more clients looping synchronous ``/sdapi/v1/txt2img`` calls;
latency of each submit (request -> taskId), median/p90/p99/max. Only this mode runs then.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAYLOAD = {
    "prompt": "a photograph of an astronaut riding a horse on the moon, (highly detailed:1.2), sharp focus, "
              "dramatic lighting, 35mm, film grain",
    "negtive_prompt": "blurry, lowres, bad anatomy, watermark",
    "steps": 20, "cfg_scale": 7, "width": 512, "height": 512, "sampler_name": "DPM++ 2M Karras",
    "seed": 1234, "batch_size": 1, "clip_skip": 2,
}


class NullEngine:
    """A null engine (not an engine): returns at once with no image, so only the API is measured."""

    def __init__(self, config=None):
        pass

    def generate(self, request, *, progress=None, cancel=None):
        from engine.request import GenerationResult

        return GenerationResult(images=[], infotexts=[], info={}, seeds=[], subseeds=[], timings={})


class BlockedEngine(NullEngine):
    """Holds the worker on its first task, so the queue only grows (the worker is idle for the GIL)."""

    def generate(self, request, *, progress=None, cancel=None):
        while not cancel.is_set():
            time.sleep(0.01)
        raise __import__("core.errors", fromlist=["Cancelled"]).Cancelled("benchmark over")


def stats_ms(samples: list[float]) -> dict[str, float]:
    xs = sorted(samples)

    def q(p):
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))] * 1e3

    return {"n": len(xs), "median": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": xs[-1] * 1e3}


def time_calls(fn, repeats: int, warmup: int = 100) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_in_process(repeats: int) -> dict[str, dict[str, float]]:
    from api_compat import TaskService
    from api_compat.schema import parse_payload
    from api_compat.tasks.store import TaskStore
    from api_compat.translate import translate
    from engine.config import EngineConfig

    rows = {}
    config = EngineConfig()
    parsed = parse_payload(PAYLOAD)
    rows["parts: parse_payload (pydantic)"] = stats_ms(time_calls(lambda: parse_payload(PAYLOAD), repeats))
    rows["parts: translate"] = stats_ms(time_calls(lambda: translate(parsed, config), repeats))
    params = translate(parsed, config).parameters
    with tempfile.TemporaryDirectory() as tmp:
        store = TaskStore(tmp)
        rows["parts: SQLite insert (WAL)"] = stats_ms(
            time_calls(lambda: store.insert(uuid.uuid4().hex, "default", params), repeats))
        store.close()
    for label, factory in (("sd_txt2img, worker idle", BlockedEngine), ("sd_txt2img, worker draining", NullEngine)):
        with tempfile.TemporaryDirectory() as tmp:
            with TaskService(Path(tmp) / "models", results_dir=tmp, engine_factory=factory, check_models=False,
                              max_queue=repeats + 1000, max_tasks=None) as svc:
                rows[label] = stats_ms(time_calls(lambda: svc.sd_txt2img(PAYLOAD), repeats))
    return rows


# ------------------------------------------------------------------------------------------------- HTTP
def _request(method: str, path: str, body: bytes = b"") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(l.split(":", 1)[1]) for l in lines if l.lower().startswith("content-length:"))
    return status, await reader.readexactly(length)


async def _burst(port: int, conns, data: bytes) -> list[tuple[float, int]]:
    start = asyncio.Event()

    async def one(reader, writer):
        await start.wait()
        t0 = time.perf_counter()
        writer.write(data)
        await writer.drain()
        status, _ = await _read_response(reader)
        return time.perf_counter() - t0, status

    tasks = [asyncio.create_task(one(r, w)) for r, w in conns]
    await asyncio.sleep(0.05)
    start.set()
    return await asyncio.gather(*tasks)


async def _paced(conns, data: bytes, window: float) -> list[tuple[float, int]]:
    """One request per connection, sent at evenly spaced instants over ``window`` seconds (an open-loop
    arrival rate of len(conns)/window per second)."""
    loop = asyncio.get_running_loop()
    t_start = loop.time() + 0.05

    async def one(i, reader, writer):
        await asyncio.sleep(max(0.0, t_start + i * window / len(conns) - loop.time()))
        t0 = time.perf_counter()
        writer.write(data)
        await writer.drain()
        status, _ = await _read_response(reader)
        return time.perf_counter() - t0, status

    return await asyncio.gather(*(one(i, r, w) for i, (r, w) in enumerate(conns)))


async def _client(port: int, concurrency: int, rounds: int, windows=(1.0, 0.25)) -> dict:
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    submit = _request("POST", "/scc/sd_txt2img", json.dumps(PAYLOAD).encode())
    health = _request("GET", "/health")
    out = {"submit": [], "health": [], "statuses": {}, "burst_wall": [], "paced": {w: [] for w in windows},
           "paced_health": []}
    await _burst(port, conns, submit)  # warm-up
    await _burst(port, conns, health)
    for _ in range(rounds):
        for name, data in (("health", health), ("submit", submit)):
            t0 = time.perf_counter()
            results = await _burst(port, conns, data)
            if name == "submit":
                out["burst_wall"].append(time.perf_counter() - t0)
            out[name].extend(lat for lat, _ in results)
            for _, status in results:
                out["statuses"][str(status)] = out["statuses"].get(str(status), 0) + 1
        await asyncio.sleep(0.2)
        out["paced_health"].extend(lat for lat, _ in await _paced(conns, health, windows[0]))
        await asyncio.sleep(0.2)
        for window in windows:
            results = await _paced(conns, submit, window)
            out["paced"][window].extend(lat for lat, _ in results)
            for _, status in results:
                out["statuses"][str(status)] = out["statuses"].get(str(status), 0) + 1
            await asyncio.sleep(0.2)
    for _, w in conns:
        w.close()
    return out


def bench_http(concurrency: int, rounds: int, engine: str = "BlockedEngine", windows=(1.0, 0.25)) -> dict:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir", f"{tmp}/m",
             "--results-dir", f"{tmp}/r", "--max-queue", str(concurrency * (rounds * (1 + len(windows)) + 2) + 10),
             "--engine-factory", f"benchmarks.submit_latency:{engine}"],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            end = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > end or server.poll() is not None:
                        raise RuntimeError("the server did not start") from None
                    time.sleep(0.1)
            raw = asyncio.run(_client(port, concurrency, rounds, windows))
        finally:
            server.terminate()
            server.wait(30)
    paced = {f"HTTP POST /scc/sd_txt2img, {concurrency} clients over {w:g} s ({concurrency / w:.0f} req/s)":
             stats_ms(lat) for w, lat in raw["paced"].items()}
    return {
        f"HTTP GET /health, {concurrency} at once (baseline)": stats_ms(raw["health"]),
        f"HTTP GET /health, {concurrency} clients over {windows[0]:g} s (baseline)": stats_ms(raw["paced_health"]),
        f"HTTP POST /scc/sd_txt2img, {concurrency} at once": stats_ms(raw["submit"]),
        **paced,
        "statuses": raw["statuses"],
        "burst wall time (ms, median)": statistics.median(raw["burst_wall"]) * 1e3,
    }


LOAD_PAYLOAD = {"prompt": "a red house by a lake", "steps": 4, "width": 64, "height": 64}


def bench_load(threads: int, submits: int, webui: int, backend: str | None) -> dict:
    """Submit latency over HTTP while the real engine generates (see the module docstring)."""
    import http.client
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("SDENGINE_API_KEY", None)
    body = json.dumps(LOAD_PAYLOAD).encode()
    headers = {"Content-Type": "application/json"}
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir", f"{tmp}/m",
             "--results-dir", f"{tmp}/r", "--max-queue", str(threads * submits + webui + 10),
             *(("--backend", backend) if backend else ())],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            end = time.monotonic() + 120
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                    conn.request("POST", "/sdapi/v1/txt2img", body, headers)  # warm: the engine is loaded
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    if time.monotonic() > end or server.poll() is not None:
                        raise RuntimeError("the server did not start") from None
                    time.sleep(0.2)
            latencies: list[float] = []
            statuses: dict[str, int] = {}
            stop = threading.Event()
            lock = threading.Lock()

            def submitter():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                for _ in range(submits):
                    t0 = time.perf_counter()
                    conn.request("POST", "/scc/sd_txt2img", body, headers)
                    response = conn.getresponse()
                    response.read()
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
                    time.sleep(0.005)

            def webui_client():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                while not stop.is_set():
                    try:
                        conn.request("POST", "/sdapi/v1/txt2img", body, headers)
                        conn.getresponse().read()
                    except OSError:  # the server is gone (the end of the run)
                        return

            others = [threading.Thread(target=webui_client, daemon=True) for _ in range(webui)]
            for t in others:
                t.start()
            time.sleep(0.5 if webui else 0)
            t0 = time.perf_counter()
            workers = [threading.Thread(target=submitter) for _ in range(threads)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            wall = time.perf_counter() - t0
            stop.set()
        finally:
            server.kill()
            server.wait(30)
    return {f"HTTP POST /scc/sd_txt2img, {threads} threads, {webui} webui callers, worker generating":
            stats_ms(latencies), "statuses": statuses, "submit phase wall time (s)": wall}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3000)
    parser.add_argument("--http-rounds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--engine", default="BlockedEngine", choices=["BlockedEngine", "NullEngine"],
                        help="server's engine: BlockedEngine (worker busy in native code) or NullEngine (draining)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--load", action="store_true", help="only the submit latency while the worker generates")
    parser.add_argument("--threads", type=int, default=8, help="--load: client threads submitting")
    parser.add_argument("--submits", type=int, default=60, help="--load: submits per thread")
    parser.add_argument("--webui", type=int, default=16, help="--load: clients looping /sdapi/v1/txt2img")
    parser.add_argument("--backend", help="--load: the server's engine backend (default: serve's)")
    args = parser.parse_args(argv)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    if args.load:
        results = bench_load(args.threads, args.submits, args.webui, args.backend)
        name, s = next(iter(results.items()))
        print(f"| measurement | n | median ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n"
              f"| {name} | {s['n']} | {s['median']:.3f} | {s['p90']:.3f} | {s['p99']:.3f} | {s['max']:.3f} |\n"
              f"statuses {results['statuses']}; submit phase {results['submit phase wall time (s)']:.1f} s; "
              f"load average before: {load}; {os.cpu_count()} CPUs")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return results
    results = {"in_process": bench_in_process(args.repeats),
               "http": bench_http(args.concurrency, args.http_rounds, args.engine)}
    lines = ["| measurement | n | median ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    for group in ("in_process", "http"):
        for name, s in results[group].items():
            if isinstance(s, dict) and "median" in s:
                lines.append(f"| {name} | {s['n']} | {s['median']:.3f} | {s['p90']:.3f} | {s['p99']:.3f} | "
                             f"{s['max']:.3f} |")
    http = results["http"]
    lines.append(f"\nHTTP statuses: {http['statuses']}; a burst of {args.concurrency} submits took "
                 f"{http['burst wall time (ms, median)']:.1f} ms (median of {args.http_rounds}).")
    lines.append(f"load average before the run: {load}; server engine: {args.engine}")
    lines.append(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    text = "\n".join(lines)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
