"""Peak memory per request size: the real engine, one process per (model, backend), sizes ascending; the
growth of peak RSS (ru_maxrss) over the RSS before the request, beside engine.memory's estimate.

    python -m benchmarks memory --models-dir DIR --model tiny-sd1 --backend onnxruntime --sizes 256 384 512
    python -m benchmarks memory --write-sd15 DIR    # then --models-dir DIR --model sd15-random --sizes 1024

``--write-sd15 DIR`` writes an SD1.5-architecture checkpoint with random weights (the bundled sd15.json configs,
seed 0) to DIR/Stable-diffusion/sd15-random.safetensors and exits (a separate process: building it must not
count in the measured peak).

One warm-up request (64x64) first; 1 step, CFG 7, batch 1 unless --batch. Memory, not time: no repeats needed
(the peak of a deterministic graph), but the machine's other processes do not affect ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import resource


def main(argv=None) -> dict:
    from engine.memory import architecture_of, estimate
    from engine.pipeline import Engine
    from engine.request import GenerationRequest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir")
    parser.add_argument("--cache-dir")
    parser.add_argument("--model", default=None)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--write-sd15", metavar="DIR", default=None)
    parser.add_argument("--vae-tile", type=int, default=None,
                        help="latent tile side of the tiled VAE decode (0: never tile, the decode before issue 12)")
    args = parser.parse_args(argv)
    if args.write_sd15:
        print(write_sd15(args.write_sd15), flush=True)
        return 0
    options = {k: v for k, v in (("models_dir", args.models_dir), ("cache_dir", args.cache_dir)) if v}
    from engine.tiling import VaeTiling

    tiling = VaeTiling() if args.vae_tile is None else VaeTiling(tile=args.vae_tile) if args.vae_tile else VaeTiling(0)
    engine = Engine(backend=args.backend, vae_tiling=tiling, **options)
    engine.generate(GenerationRequest(model=args.model, steps=1, width=64, height=64, seed=1))
    entry = engine.store.resolve(args.model) if args.model else engine.store.default_checkpoint()
    arch, _ = architecture_of(entry.path)
    rows = []
    for size in sorted(args.sizes):
        with open("/proc/self/statm") as f:
            before = int(f.read().split()[1]) * resource.getpagesize()
        engine.generate(GenerationRequest(model=args.model, steps=1, width=size, height=size,
                                          batch_size=args.batch, seed=1))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        est = estimate(arch, size, size, args.batch, backend=args.backend, tiling=tiling)
        rows.append({"model": entry.name, "backend": args.backend, "size": size, "batch": args.batch,
                     "rss_before_mib": round(before / 2**20), "peak_mib": round(peak / 2**20),
                     "growth_mib": round((peak - before) / 2**20), "estimated_mib": round(est.activations / 2**20),
                     "estimated_total_mib": round(est.total / 2**20), "vae_tile": tiling.tile})
        print(json.dumps(rows[-1]), flush=True)
    return 0


def write_sd15(root) -> str:
    """An SD1.5-architecture single file with random weights (bundled sd15.json configs, seed 0)."""
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models.checkpoints import bundled_config
    from engine.models.convert import save_single_file

    path = Path(root) / "Stable-diffusion" / "sd15-random.safetensors"
    if path.is_file():
        return str(path)
    cfg = bundled_config("sd15.json")
    torch.manual_seed(0)
    drop = ("_class_name", "_diffusers_version")
    components = {
        "unet": UNet2DConditionModel(**{k: v for k, v in cfg["unet"].items() if k not in drop}).eval(),
        "vae": AutoencoderKL(**{k: v for k, v in cfg["vae"].items() if k not in drop}).eval(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).eval(),
    }
    return str(save_single_file(components, path, prediction_type="epsilon", native_size=512))
