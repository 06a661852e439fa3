"""End-to-end request latency on a tiny model, split by stage, for each backend side by side.

The same GenerationRequest runs through Engine.generate on the torch backend (the baseline) and on
onnxruntime (CPU EP), after one warm-up request each (which also exports the ONNX artefacts); the table
reports the median of the repeats for the whole request and for every stage the pipeline times.

    python -m benchmarks pipeline_e2e [--model tiny-sd1] [--steps 20] [--repeats 5] [--models-dir DIR] [--out FILE.md]

Without --models-dir a tiny store (random weights) is written to a temporary folder first.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time


def run(models_dir: str, model: str, steps: int, repeats: int, backends: list[str]) -> dict[str, dict]:
    from engine.pipeline import Engine
    from engine.request import GenerationRequest

    req = GenerationRequest(model=model, prompt="a red circle on a blue background", negative_prompt="blurry",
                            steps=steps, seed=1, sampler_name="Euler a")
    out: dict[str, dict] = {}
    for backend in backends:
        engine = Engine(models_dir=models_dir, backend=backend, cache_dir=f"{models_dir}/cache-bench")
        engine.generate(req)  # warm-up: load, export, session creation
        totals, stages = [], {}
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = engine.generate(req)
            totals.append(time.perf_counter() - t0)
            for k, v in res.timings.items():
                stages.setdefault(k, []).append(v)
        out[backend] = {"total": statistics.median(totals), **{k: statistics.median(v) for k, v in stages.items()}}
    return out


def table(results: dict[str, dict], model: str, steps: int, repeats: int) -> str:
    stages = ["total", "text_encoder", "sampling", "vae_decoder", "load"]
    base = results.get("torch", {}).get("total")
    lines = [f"Model {model}, 64x64, {steps} steps Euler a, CFG 7 (batch of 2 rows), median of {repeats} after warm-up.",
             "", "| backend | " + " | ".join(f"{s} (s)" for s in stages) + " | vs torch |",
             "|---|" + "---|" * (len(stages) + 1)]
    for backend, r in results.items():
        speed = f"{base / r['total']:.2f}x" if base else "-"
        lines.append(f"| {backend} | " + " | ".join(f"{r.get(s, 0.0):.4f}" for s in stages) + f" | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks pipeline_e2e")
    p.add_argument("--model", default="tiny-sd1")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models-dir")
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument("--out")
    args = p.parse_args(argv)
    models_dir = args.models_dir
    if models_dir is None:
        from engine.models.tiny import write_tiny_store

        models_dir = tempfile.mkdtemp(prefix="sdengine-bench-")
        write_tiny_store(models_dir, kinds=("sd1", "sdxl"))
    results = run(models_dir, args.model, args.steps, args.repeats, args.backends.split(","))
    text = (f"## pipeline_e2e ({datetime.date.today()}, {platform.machine()}, "
            f"`python -m benchmarks pipeline_e2e --model {args.model} --steps {args.steps} --repeats {args.repeats}`)\n\n"
            + table(results, args.model, args.steps, args.repeats) + "\n")
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0
