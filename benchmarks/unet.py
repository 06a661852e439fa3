"""SD1.5-architecture UNet, one denoiser call: torch eager vs onnxruntime, same process, same inputs.

    PYTHONPATH=. python -m benchmarks.unet [--sizes 32,64] [--warmup 2,1] [--repeats 5,3] [--markdown PATH]

The UNet is ``UNet2DConditionModel`` built from the real SD1.5 config with random weights (seed 0): the
speed of a network does not depend on its weight values. Both backends run through the engine's own code
(engine.backends.torch / engine.backends.onnxruntime), fp32, batch 2 (one CFG pair), 77 tokens. The ONNX
export goes through export.onnx and its manifest cache (``--cache``). Timing: ``--warmup`` untimed runs,
then the median (and min) of ``--repeats`` timed runs, per latent size, torch first, then onnxruntime.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
MACHINE = "2-core AMD EPYC Zen 4 CPU, no GPU"


def timed(fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


def main(argv=None) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from engine.backends import create_backend
    from engine.config import EngineConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32,64", help="latent sizes (pixels / 8)")
    ap.add_argument("--warmup", default="2,1", help="warm-up runs per size")
    ap.add_argument("--repeats", default="5,3", help="timed runs per size")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/sdengine-bench-cache"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--torch-bf16", action="store_true", help="also time torch eager under bf16 autocast")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sizes = [int(s) for s in args.sizes.split(",")]
    warmups = [int(s) for s in args.warmup.split(",")]
    repeats = [int(s) for s in args.repeats.split(",")]

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    modules = {"unet": unet}
    t = time.perf_counter()
    config = dict(cache_dir=args.cache, num_threads=os.cpu_count())
    backend_torch = create_backend(EngineConfig(backend="torch", **config), modules, "bench-sd15-random-seed0")
    backend_ort = create_backend(EngineConfig(backend="onnxruntime", **config), modules, "bench-sd15-random-seed0")
    backend_bf16 = (create_backend(EngineConfig(backend="torch", precision="bf16", **config), modules,
                                   "bench-sd15-random-seed0") if args.torch_bf16 else None)
    art = backend_ort.artefact("unet")
    export_s = time.perf_counter() - t
    size_bytes = sum(p.stat().st_size for p in art.directory.iterdir())
    logging.info("ONNX artefact %s (%.2f GB) ready in %.1f s", art.directory, size_bytes / 1e9, export_s)
    gc.collect()

    rows = []
    load_before = os.getloadavg()
    for size, w, r in zip(sizes, warmups, repeats):
        desc = backend_torch.descriptor("unet")
        feeds = {k: v.numpy() for k, v in desc.sample_inputs(args.batch, size, size, 77, seed=1).items()}
        res_torch = timed(lambda: backend_torch.run("unet", feeds), w, r)
        res_ort = timed(lambda: backend_ort.run("unet", feeds), w, r)
        a = backend_torch.run("unet", feeds)["model_output"]
        b = backend_ort.run("unet", feeds)["model_output"]
        rel = float(np.linalg.norm(a - b) / np.linalg.norm(a))
        row = {"latent": size, "pixels": size * 8, "batch": args.batch, "warmup": w, "repeats": r,
               "torch": res_torch, "onnxruntime": res_ort,
               "speedup": res_torch["median_s"] / res_ort["median_s"], "rel_l2": rel}
        if backend_bf16 is not None:
            row["torch_bf16"] = timed(lambda: backend_bf16.run("unet", feeds), w, r)
            c = backend_bf16.run("unet", feeds)["model_output"]
            row["torch_bf16"]["rel_l2"] = float(np.linalg.norm(c - a) / np.linalg.norm(a))
        logging.info("%dx%d: torch %.2f s, onnxruntime %.2f s, x%.2f, relL2 %.1e", size, size,
                     res_torch["median_s"], res_ort["median_s"], row["speedup"], rel)
        rows.append(row)

    import onnxruntime

    result = {
        "benchmark": "unet", "machine": MACHINE, "cpu": platform.processor() or platform.machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "threads": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "export_s": export_s, "onnx_bytes": size_bytes, "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return result


def markdown(result: dict) -> str:
    lines = [
        f"SD1.5-architecture UNet (random weights), fp32, batch {result['rows'][0]['batch']}, 77 tokens; "
        f"{result['machine']}; {result['date']}; torch {result['versions']['torch']}, "
        f"onnxruntime {result['versions']['onnxruntime']} (CPU EP, {result['threads']} threads, ORT_ENABLE_ALL).",
        "",
        "| latent (px) | warm-up + runs | torch eager median (min) | onnxruntime CPU median (min) | speed-up | relL2 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['latent']}x{r['latent']} ({r['pixels']}) | {r['warmup']} + {r['repeats']} | "
            f"{r['torch']['median_s']:.2f} s ({r['torch']['min_s']:.2f}) | "
            f"{r['onnxruntime']['median_s']:.2f} s ({r['onnxruntime']['min_s']:.2f}) | "
            f"x{r['speedup']:.2f} | {r['rel_l2']:.1e} |")
    bf16 = [r for r in result["rows"] if "torch_bf16" in r]
    if bf16:
        lines += ["", "Torch eager under bf16 autocast (this CPU has AVX512-BF16), same inputs, for reference:", "",
                  "| latent | torch bf16 median (min) | vs torch fp32 | relL2 vs fp32 |", "|---|---|---|---|"]
        for r in bf16:
            b = r["torch_bf16"]
            lines.append(f"| {r['latent']}x{r['latent']} | {b['median_s']:.2f} s ({b['min_s']:.2f}) | "
                         f"x{r['torch']['median_s'] / b['median_s']:.2f} | {b['rel_l2']:.1e} |")
    lines.append("")
    lines.append(f"Load average (1/5/15 min) before the timed runs "
                 f"{'/'.join(f'{x:.1f}' for x in result['load_avg_before'])}, after "
                 f"{'/'.join(f'{x:.1f}' for x in result['load_avg_after'])} (the machine is shared).")
    lines.append("")
    lines.append(f"Export (or manifest-cache hit) took {result['export_s']:.0f} s; ONNX artefact "
                 f"{result['onnx_bytes'] / 1e9:.2f} GB (graph + one external data file).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
