"""The torch backend compiled (torch.compile, inductor) vs eager on CPU, same process, same inputs, interleaved.

    python -m benchmarks torch_compile [--models tiny,sd15] [--sd15-latent 32] [--repeats 20,5] [--markdown PATH]

One UNet call (one CFG pair: batch 2, 77 tokens) through engine.backends.torch, per model: the tiny test
UNet (engine.models.tiny, latent 8x8) and the SD1.5 architecture (bundled config, random weights: speed does
not depend on weight values) at ``--sd15-latent`` (32 = 256 px). Variants: eager and compiled in fp32, and in
bf16 where the CPU has native bf16 (AVX512-BF16/AMX; the backend runs fp32 otherwise, so those rows are left
out). The first call of a compiled variant compiles (reported as compile time); then one warm-up call each,
then the variants are timed in interleaved rounds (the machine is shared: each round runs every variant once),
median and min of the rounds. Output relL2 of each variant against eager fp32 is reported beside its time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path


def build(model: str):
    import torch

    if model == "tiny":
        from engine.models.tiny import UNET_SD1, build_unet

        return lambda: build_unet(UNET_SD1), 8
    from diffusers import UNet2DConditionModel

    from engine.models.checkpoints import bundled_config

    cfg = bundled_config("sd15.json")["unet"]

    def make():
        torch.manual_seed(0)
        return UNet2DConditionModel(**cfg).eval()

    return make, None


def main(argv=None) -> dict:
    import numpy as np
    import torch

    from engine.backends import create_backend
    from engine.config import EngineConfig
    from core.cpu import cpu_flags, native_bf16

    ap = argparse.ArgumentParser(prog="python -m benchmarks torch_compile", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,sd15")
    ap.add_argument("--sd15-latent", type=int, default=32)
    ap.add_argument("--repeats", default="20,5", help="timed rounds per model")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    models = args.models.split(",")
    repeats = [int(r) for r in args.repeats.split(",")]
    precisions = ["fp32"] + (["bf16"] if native_bf16() else [])
    threads = os.cpu_count()
    rows = []
    for model, n in zip(models, repeats):
        make, latent = build(model)
        latent = latent or args.sd15_latent
        modules = {p: make() for p in precisions}  # eager and compiled of one precision share the module
        variants = {}
        for p in precisions:
            for compiled in (False, True):
                config = EngineConfig(backend="torch", precision=p, torch_compile=compiled, num_threads=threads)
                variants[f"{'compiled' if compiled else 'eager'} {p}"] = create_backend(
                    config, {"unet": modules[p]}, f"bench-{model}", torch_options={"compile_components": ("unet",)})
        desc = next(iter(variants.values())).descriptor("unet")
        feeds = {k: v.numpy() for k, v in desc.sample_inputs(2, latent, latent, seed=1).items()}
        first, outs = {}, {}
        for name, b in variants.items():
            t = time.perf_counter()
            outs[name] = b.run("unet", feeds)["model_output"]
            first[name] = time.perf_counter() - t
            b.run("unet", feeds)  # warm-up
            logging.info("%s %s: first call %.1f s", model, name, first[name])
        times = {name: [] for name in variants}
        load_before = os.getloadavg()
        for _ in range(n):
            for name, b in variants.items():
                t = time.perf_counter()
                b.run("unet", feeds)
                times[name].append(time.perf_counter() - t)
        ref = outs["eager fp32"].astype(np.float64)
        for name in variants:
            rel = float(np.linalg.norm(outs[name] - ref) / np.linalg.norm(ref))
            rows.append({"model": model, "latent": latent, "variant": name, "first_call_s": first[name],
                         "median_s": statistics.median(times[name]), "min_s": min(times[name]), "rounds": n,
                         "rel_l2_vs_eager_fp32": rel, "load_avg_before": load_before,
                         "load_avg_after": os.getloadavg()})
            logging.info("%s %s: median %.4f s", model, name, rows[-1]["median_s"])
        del variants, modules
    result = {"benchmark": "torch_compile", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "cpu": platform.processor() or platform.machine(), "threads": threads,
              "cpu_flags": sorted(cpu_flags() & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
              "versions": {"torch": torch.__version__}, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    text = markdown(result)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return result


def markdown(result: dict) -> str:
    lines = [f"torch {result['versions']['torch']}, {result['threads']} threads, CPU flags "
             f"{' '.join(result['cpu_flags']) or '-'}; {result['date']}. One UNet call, batch 2 (a CFG pair), "
             "77 tokens; first call (compiles) reported apart; median (min) of interleaved rounds.", "",
             "| model | latent | variant | first call (s) | median (min) | vs eager same precision | relL2 vs eager fp32 |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["variant"]): r for r in result["rows"]}
    for r in result["rows"]:
        eager = by.get((r["model"], r["variant"].replace("compiled", "eager")))
        speed = f"x{eager['median_s'] / r['median_s']:.2f}" if eager else "-"
        lines.append(f"| {r['model']} | {r['latent']}x{r['latent']} | {r['variant']} | {r['first_call_s']:.1f} | "
                     f"{r['median_s']:.4f} s ({r['min_s']:.4f}) | {speed} | {r['rel_l2_vs_eager_fp32']:.1e} |")
    loads = [r["load_avg_before"][0] for r in result["rows"]]
    lines += ["", f"1-min load average before the timed rounds: {min(loads):.1f}-{max(loads):.1f} "
              "(the machine is shared with other jobs)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
