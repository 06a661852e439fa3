"""The webui's speed levers, each measured for quality and for speed (issue 29).

    python -m benchmarks levers quality [--n 100] [--steps 20] [--cfg 1.5] [--levers a,b,...] [--out FILE.json]
    python -m benchmarks levers speed [--workdir DIR] [--size 256] [--steps 10] [--runs 3] [--levers a,b,...]
                                      [--out FILE.json]

Levers (each against the exact path of its own backend, same seeds):

- ``ngms-S``: ``s_min_uncond`` S (NGMS, every other call below sigma S); ``ngms-all-S``: every call;
- ``tome-R``: ``token_merging_ratio`` R (torch backend; its exact path is torch fp32 / bf16 as configured);
- ``taesd``: TAESD decode (``sd_vae_decode_method``);
- ``int8``: the OpenVINO INT8 UNet (``precision="int8"``, engine.backends.int8) against openvino bf16/f32.

*quality*: the bundled demo model on the evaluator's 100 held-out prompts (training.evaluate: attribute
accuracy, "all attributes right"), 64x64, Euler a; and the mean absolute pixel difference (0-255) to the exact
path's image of the same prompt and seed. *speed*: the SD1.5 architecture with random weights (the peers
workload: benchmarks/peers.py writes the model), one prompt, Euler a, CFG 7: one warm-up generation, then the
median of ``--runs``; the exact path timed in the same process, interleaved with the lever (ratios within one
run). Prints a markdown table and writes JSON (with CPU flags, load average and date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

DEFAULT_QUALITY = "ngms-1,ngms-3,ngms-all-1,taesd,int8,tome-0.3,tome-0.5"
DEFAULT_SPEED = "ngms-1,ngms-3,ngms-all-1,tome-0.3,tome-0.5,int8"


def lever(name: str) -> tuple[str, str | None, dict]:
    """A lever's (backend, precision, request fields)."""
    if name.startswith("ngms-all-"):
        return "openvino", None, {"s_min_uncond": float(name.rsplit("-", 1)[1]), "s_min_uncond_all": True}
    if name.startswith("ngms-"):
        return "openvino", None, {"s_min_uncond": float(name.rsplit("-", 1)[1])}
    if name.startswith("tome-"):
        return "torch", None, {"token_merging_ratio": float(name.rsplit("-", 1)[1])}
    if name == "taesd":
        return "openvino", None, {"vae_decode_method": "TAESD"}
    if name == "int8":
        return "openvino", "int8", {}
    raise SystemExit(f"unknown lever {name!r}: ngms-S, ngms-all-S, tome-R, taesd, int8")


def _engines(root: Path, cache: Path, models_dir: Path | None = None):
    from engine.pipeline import Engine

    made = {}

    def get(backend: str, precision: str | None):
        key = (backend, precision)
        if key not in made:
            made[key] = Engine(models_dir=models_dir or root, backend=backend, precision=precision, cache_dir=cache)
        return made[key]

    return get


def environment() -> dict:
    from benchmarks.peers import cpu_flags, cpu_model

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "loadavg": os.getloadavg()}


# ------------------------------------------------------------------------------------------------ quality
def _write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def quality(levers: list[str], n: int, steps: int, cfg: float, workdir: Path, out: Path | None = None) -> dict:
    from engine.request import GenerationRequest
    from training import evaluate as E
    from training import scenes as S

    scenes = E.heldout_scenes(n)
    get = _engines(workdir / "models", workdir / "cache")
    (workdir / "models").mkdir(parents=True, exist_ok=True)  # an empty store: the bundled demo model

    def images(backend, precision, fields):
        engine = get(backend, precision)
        out = []
        for i, scene in enumerate(scenes):
            req = GenerationRequest(prompt=scene.caption, steps=steps, cfg_scale=cfg, seed=i, sampler_name="Euler a",
                                    width=S.SIZE, height=S.SIZE, **fields)
            out.append(engine.generate(req).images[0])
        return np.stack(out)

    exact: dict[tuple, np.ndarray] = {}
    rows = []
    order = []
    for name in levers:  # each backend's exact path just before its first lever
        backend = lever(name)[0]
        if f"exact-{backend}" not in order:
            order.append(f"exact-{backend}")
        order.append(name)
    for name in order:
        backend, precision, fields = (name[len("exact-"):], None, {}) if name.startswith("exact-") else lever(name)
        t = time.perf_counter()
        imgs = images(backend, precision, fields)
        acc, _ = E.scored(scenes, imgs)
        if name.startswith("exact-"):
            exact[backend] = imgs
        diff = float(np.abs(imgs.astype(np.float64) - exact[backend]).mean())
        rows.append({"lever": name, "backend": backend, "precision": precision or "default",
                     "accuracy_all": acc["all"], "accuracy": acc, "mean_abs_px_diff": diff,
                     "seconds": time.perf_counter() - t})
        print(f"{name}: all right {acc['all']:.0%}, mean |px diff| {diff:.2f}", flush=True)
        if out is not None:  # what is done so far survives an interrupted run
            _write(out, {"part": "quality", "n": n, "steps": steps, "cfg": cfg, "rows": rows, **environment()})
    return {"part": "quality", "n": n, "steps": steps, "cfg": cfg, "rows": rows, **environment()}


# ------------------------------------------------------------------------------------------------ speed
def speed(levers: list[str], workdir: Path, size: int, steps: int, runs: int) -> dict:
    from benchmarks.peers import CFG, MODEL, PROMPT, SEED, write_model
    from engine.request import GenerationRequest

    folder = workdir / "models" / "Stable-diffusion" / MODEL
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_model(folder)
    get = _engines(workdir / "models", workdir / "cache")
    base = GenerationRequest(model=MODEL, prompt=PROMPT, negative_prompt="", steps=steps, width=size, height=size,
                             cfg_scale=CFG, seed=SEED, sampler_name="Euler a")
    rows = []
    for name in levers:
        backend, precision, fields = lever(name)
        exact_engine = get(backend, None)
        lever_engine = get(backend, precision)
        req = replace(base, **fields)
        exact_img = exact_engine.generate(base).images[0]  # warm-up (compiles) of both
        lever_img = lever_engine.generate(req).images[0]
        t_exact, t_lever = [], []
        for _ in range(runs):  # interleaved
            t = time.perf_counter()
            exact_engine.generate(base)
            t_exact.append(time.perf_counter() - t)
            t = time.perf_counter()
            lever_engine.generate(req)
            t_lever.append(time.perf_counter() - t)
        e, v = statistics.median(t_exact), statistics.median(t_lever)
        rows.append({"lever": name, "backend": backend, "exact_s": e, "lever_s": v, "speedup": e / v,
                     "exact_runs_s": t_exact, "lever_runs_s": t_lever, "label": lever_engine.config.precision.value,
                     "mean_abs_px_diff_random_weights": float(np.abs(exact_img.astype(float) - lever_img).mean())})
        print(f"{name} ({backend}): exact {e:.2f} s, lever {v:.2f} s, x{e / v:.2f}", flush=True)
    return {"part": "speed", "size": size, "steps": steps, "runs": runs, "rows": rows, **environment()}


def markdown(result: dict) -> str:
    env = f"{result['cpu']} ({result['cores']} cores; {', '.join(result['cpu_flags'])}), " \
          f"{result['date']}, load average {result['loadavg'][0]:.1f}"
    if result["part"] == "quality":
        lines = [f"Quality: demo model, {result['n']} held-out prompts, {result['steps']} steps Euler a, CFG "
                 f"{result['cfg']}; {env}", "", "| lever | backend | all attributes right | mean abs px diff to "
                 "exact |", "|---|---|---|---|"]
        lines += [f"| {r['lever']} | {r['backend']} {r['precision']} | {r['accuracy_all']:.0%} | "
                  f"{r['mean_abs_px_diff']:.2f} |" for r in result["rows"]]
    else:
        lines = [f"Speed: SD1.5 architecture (random weights), {result['size']}², {result['steps']} steps Euler a, "
                 f"CFG 7, median of {result['runs']} after a warm-up; {env}", "",
                 "| lever | backend | exact s | lever s | speed-up |", "|---|---|---|---|---|"]
        lines += [f"| {r['lever']} | {r['backend']} | {r['exact_s']:.2f} | {r['lever_s']:.2f} | "
                  f"{r['speedup']:.2f}x |" for r in result["rows"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks levers", description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("quality", "speed"))
    ap.add_argument("--levers", default=None)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=None, help="default: 20 (quality), 10 (speed)")
    ap.add_argument("--cfg", type=float, default=1.5, help="quality: the demo model's CFG scale")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sdengine-levers-"))
    if args.part == "quality":
        levers = (args.levers or DEFAULT_QUALITY).split(",")
        result = quality(levers, args.n, args.steps or 20, args.cfg, workdir, args.out)
    else:
        levers = (args.levers or DEFAULT_SPEED).split(",")
        result = speed(levers, workdir, args.size, args.steps or 10, args.runs)
    print(markdown(result))
    if args.out:
        _write(args.out, result)
    return 0
