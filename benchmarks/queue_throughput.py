"""The celery task backend (Redis + ``sdengine worker``) against the embedded one, on this machine.

    PYTHONPATH=. python -m benchmarks queue_throughput [--tasks 24] [--rounds 3] [--submits 1000] [--json PATH]

1. Throughput, demo model (``sdengine-demo``, 64x64, 20 steps Euler a, CFG 1.5), ``--tasks`` tasks queued at
   once, wall time from the first submit to the last final state; 1 worker vs 2 workers, each worker one
   engine thread (``--threads 1``, OMP_NUM_THREADS=1). Rounds: 1 worker, 2 workers, 1 worker, 2 workers ...
   (the second worker is started and warmed before its first round and stopped after it), median per count.
2. Submit latency: ``TaskService.sd_txt2img`` with the embedded backend vs the celery backend (the same
   payload and validation; check_models off in both, so that the difference is the backend: SQLite insert +
   enqueue vs Redis record + Celery publish). Nothing consumes the queues. Blocks of 100 alternate between
   the two after a warm-up; median / p90 / p99.
3. Whole task latency, one at a time (submit -> final result, demo model as in 1): embedded (engine in this
   process, one thread) vs celery with one worker (one thread). The celery wait polls Redis every 20 ms.

A ``redis-server`` is started on a free loopback port in a temp folder (AOF on, appendfsync everysec: the
recommended production setting). Prints a markdown table; --json writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.cpu import cpu_flags  # noqa: E402  (after the path set-up: run as a script too)

DEMO = {"prompt": "a large red circle in the middle on a blue background", "steps": 20, "cfg_scale": 1.5,
        "width": 64, "height": 64, "sampler_name": "Euler a"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(root: Path) -> tuple[subprocess.Popen, int]:
    import redis

    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root),
                             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc, port
        except redis.RedisError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


class Worker:
    def __init__(self, url: str, results: Path, cache: Path, models: Path, log: Path, name: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--queue", url, "--results-dir", str(results),
             "--models-dir", str(models), "--cache-dir", str(cache), "--threads", "1", "--name", name,
             "--backend", "onnxruntime", "--loglevel", "WARNING"],
            cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, client) -> None:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if any(k.decode().startswith(self.name + "@") for k in client.hkeys("sdengine:workers")):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited")
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} did not come up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def stats_ms(samples: list[float]) -> dict[str, float]:
    xs = sorted(samples)

    def q(p):
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))] * 1e3

    return {"n": len(xs), "median": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def throughput_round(svc, tasks: int, seed0: int) -> float:
    start = time.perf_counter()
    ids = [svc.sd_txt2img({**DEMO, "seed": seed0 + i})["taskId"] for i in range(tasks)]
    for t in ids:
        result = svc.wait(t, 600)
        if result["status"] != "succeeded":
            raise RuntimeError(f"task failed: {result.get('error')}")
    return tasks / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks queue_throughput")
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per worker count")
    parser.add_argument("--submits", type=int, default=1000)
    parser.add_argument("--task-repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        sys.stderr.write("redis-server is not installed (apt-get install redis-server)\n")
        return 2

    from api_compat import TaskService
    from benchmarks.submit_latency import PAYLOAD, BlockedEngine

    tmp = Path(tempfile.mkdtemp(prefix="sdengine-queue-bench-"))
    models, results, cache = tmp / "models", tmp / "results", tmp / "cache"
    for p in (models, results, cache):
        p.mkdir()
    redis_proc, port = start_redis(tmp)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis(port=port)
    workers: list[Worker] = []
    out: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                             "flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"})},
                 "date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        # ---------------------------------------------------------------------------------- throughput
        workers.append(Worker(url, results, cache, models, tmp / "w0.log", "bench0"))
        workers[0].wait_ready(client)
        svc = TaskService(models, results_dir=results, queue=url, max_queue=10000, backend="onnxruntime")
        throughput_round(svc, 2, 10**6)  # warm-up: export + load in worker 0
        rates: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            rates[1].append(throughput_round(svc, args.tasks, 1000 * r))
            second = Worker(url, results, cache, models, tmp / f"w1-{r}.log", f"bench1r{r}")
            second.wait_ready(client)
            workers.append(second)
            throughput_round(svc, 4, 10**6 + 10 * r)  # warm-up: worker 1 loads the engine (cache hit)
            rates[2].append(throughput_round(svc, args.tasks, 1000 * r + 500))
            second.stop()
            workers.remove(second)
            client.hdel("sdengine:workers", *[k for k in client.hkeys("sdengine:workers")
                                              if k.decode().startswith(second.name + "@")] or ["-"])
            print(f"round {r}: 1 worker {rates[1][-1]:.2f} tasks/s, 2 workers {rates[2][-1]:.2f} tasks/s",
                  file=sys.stderr)
        out["throughput"] = {str(k): {"rounds": v, "median": statistics.median(v)} for k, v in rates.items()}
        out["throughput"]["speedup"] = out["throughput"]["2"]["median"] / out["throughput"]["1"]["median"]

        # --------------------------------------------------------------------------- whole-task latency
        lat: dict[str, list[float]] = {"embedded": [], "celery": []}
        with TaskService(models, results_dir=tmp / "embedded", backend="onnxruntime", cache_dir=cache,
                          num_threads=1) as emb:
            emb.wait(emb.sd_txt2img({**DEMO, "seed": 1})["taskId"], 600)
            svc.wait(svc.sd_txt2img({**DEMO, "seed": 1})["taskId"], 600)
            for i in range(args.task_repeats):
                for name, s in (("embedded", emb), ("celery", svc)):
                    t0 = time.perf_counter()
                    result = s.wait(s.sd_txt2img({**DEMO, "seed": 100 + i})["taskId"], 600)
                    lat[name].append(time.perf_counter() - t0)
                    assert result["status"] == "succeeded", result
        out["task_latency_ms"] = {k: stats_ms(v) for k, v in lat.items()}
        svc.close()

        # ------------------------------------------------------------------------------ submit latency
        idle = f"redis://127.0.0.1:{port}/1"  # no worker consumes DB 1
        sub: dict[str, list[float]] = {"embedded": [], "celery": []}
        with TaskService(models, results_dir=tmp / "submit-embedded", engine_factory=BlockedEngine,
                          check_models=False, max_queue=10**6) as emb, \
                TaskService(models, results_dir=tmp / "submit-celery", check_models=False, queue=idle,
                             max_queue=10**6) as cel:
            for s in (emb, cel):
                for _ in range(100):
                    s.sd_txt2img(PAYLOAD)
            for _ in range(max(1, args.submits // 100)):
                for name, s in (("embedded", emb), ("celery", cel)):
                    for _ in range(100):
                        t0 = time.perf_counter()
                        s.sd_txt2img(PAYLOAD)
                        sub[name].append(time.perf_counter() - t0)
        out["submit_latency_ms"] = {k: stats_ms(v) for k, v in sub.items()}
    finally:
        for w in workers:
            w.stop()
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    t = out["throughput"]
    print(f"| workers | tasks/s (median of {args.rounds}) | rounds |")
    print("|---|---|---|")
    for k in ("1", "2"):
        print(f"| {k} | {t[k]['median']:.2f} | {', '.join(f'{x:.2f}' for x in t[k]['rounds'])} |")
    print(f"\n2 workers / 1 worker: {t['speedup']:.2f}x\n")
    print("| latency (ms) | backend | n | median | p90 | p99 |")
    print("|---|---|---|---|---|---|")
    for what in ("submit_latency_ms", "task_latency_ms"):
        for k, v in out[what].items():
            print(f"| {what.replace('_ms', '')} | {k} | {v['n']} | {v['median']:.2f} | {v['p90']:.2f} | "
                  f"{v['p99']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
