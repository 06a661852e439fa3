"""SDXL refiner requests: both checkpoints resident vs swapped per request (the engine's choice, docs/DECISIONS.md).

    PYTHONPATH=. python -m benchmarks refiner [--models-dir DIR --model NAME --refiner NAME] [--backend torch]
        [--steps 20] [--size 1024] [--switch-at 0.8] [--repeats 3] [--json PATH] [--markdown PATH]

Without ``--models-dir`` the tiny random SDXL and SDXL-refiner models (engine.models.tiny) are written to a temp
folder (a correctness run of the harness, not a figure). Timed through ``Engine.generate`` (the product path),
one process, after one warm-up request (exports, if any, are not timed):

- resident: the engine as it ships: the request's model and its refiner both held between requests;
- swap: the same requests with both checkpoints dropped before each (the engine's runtimes and the store's loaded
  models): what holding one checkpoint at a time costs per request (the refiner loaded at the switch, the model
  again for the next request: two loads each);

each ``--repeats`` times, median (min) reported, with the process's resident memory (VmRSS) after a request
without the refiner (one checkpoint held) and after one with it (two held): the memory the resident choice costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def stat(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


def markdown(r: dict) -> str:
    res, swap = r["resident"], r["swap"]
    return "\n".join([
        f"SDXL refiner, {r['model']} + {r['refiner']}, {r['backend']}, {r['size']}x{r['size']}, {r['steps']} steps, "
        f"switch at {r['switch_at']}; load average {r['loadavg']}; {r['machine']}",
        "",
        "| checkpoints | per request, median (min) | resident memory after |",
        "|---|---|---|",
        f"| both resident (the engine) | {res['median_s']:.2f} s ({res['min_s']:.2f}) | "
        f"{r['rss_two_mb']:.0f} MiB (one held: {r['rss_one_mb']:.0f} MiB) |",
        f"| swapped per request | {swap['median_s']:.2f} s ({swap['min_s']:.2f}) | one at a time |",
        "",
    ])


def main(argv=None) -> dict:
    from engine.pipeline import Engine
    from engine.request import GenerationRequest, Refiner

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--model", default="tiny-sdxl")
    ap.add_argument("--refiner", default="tiny-sdxl-refiner")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="image side (default: 1024, 64 for the tiny models)")
    ap.add_argument("--switch-at", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="sdengine-refiner-bench-"))
    try:
        models = args.models_dir
        if models is None:
            from engine.models.tiny import write_tiny_store

            models = write_tiny_store(work / "models", kinds=("sdxl", "sdxl_refiner"))
        size = args.size or (1024 if args.models_dir else 64)
        engine = Engine(models_dir=models, backend=args.backend, device="cpu",
                        cache_dir=args.cache_dir or work / "cache")
        base = dict(model=args.model, prompt="a lighthouse on a cliff at dusk", negative_prompt="blurry",
                    steps=args.steps, seed=1, width=size, height=size)
        refined = GenerationRequest(**base, refiner=Refiner(args.refiner, args.switch_at))
        engine.generate(GenerationRequest(**base))  # warm-up (exports), one checkpoint held
        gc.collect()
        rss_one = rss_mb()
        engine.generate(refined)  # warm-up with the refiner: both held from now on
        gc.collect()
        rss_two = rss_mb()
        resident = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            engine.generate(refined)
            resident.append(time.perf_counter() - t)
        swap = []
        for _ in range(args.repeats):
            engine._runtimes.clear()  # the swap: neither checkpoint kept from the last request
            engine.store.clear()
            gc.collect()
            t = time.perf_counter()
            engine.generate(refined)
            swap.append(time.perf_counter() - t)
        result = {"model": args.model, "refiner": args.refiner, "backend": args.backend, "size": size,
                  "steps": args.steps, "switch_at": args.switch_at, "resident": stat(resident), "swap": stat(swap),
                  "rss_one_mb": rss_one, "rss_two_mb": rss_two,
                  "loadavg": " ".join(f"{v:.1f}" for v in os.getloadavg()),
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        text = markdown(result)
        print(text)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        if args.markdown:
            args.markdown.write_text(text)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
