"""A 4x RRDB model upscaler (ESRGAN / RealESRGAN_x4plus's architecture: 64 filters, 23 blocks; random weights)
on a 512x512 image on CPU, through the product path (engine.upscalers: the file in a models folder, loaded
through spandrel, tiled as the webui's ESRGAN_tile options) beside the baseline in the same run: the same spandrel
model called on the whole image at once (what spandrel alone does, no tiles).

    PYTHONPATH=. python -m benchmarks upscaler [--size 512] [--blocks 23] [--repeats 3] [--tile 192]
                                               [--overlap 8] [--threads N] [--markdown PATH]

One warm-up pass of each on a 64x64 image, then ``--repeats`` timed passes at ``--size``; median (min) reported,
with the machine, its CPU flags and the date.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from core.cpu import cpu_flags

FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")


def _picture(size: int) -> np.ndarray:
    import torch

    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.integers(0, 256, (size // 16, size // 16, 3)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(base.permute(2, 0, 1)[None], (size, size), mode="bicubic")
    return smooth[0].permute(1, 2, 0).clamp(0, 255).round().numpy().astype(np.uint8)


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks upscaler", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=23)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=192)
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from engine import upscalers
    from engine.spandrel_loader import registry

    if args.threads:
        torch.set_num_threads(args.threads)
    registry()
    from spandrel.architectures.ESRGAN import ESRGAN

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ESRGAN" / "4x-RRDB-random.pth"
        path.parent.mkdir()
        torch.manual_seed(0)
        torch.save(ESRGAN(num_filters=64, num_blocks=args.blocks, scale=4).state_dict(), path)
        model = upscalers.load(path)
        image, warm = _picture(args.size), _picture(64)

        def whole(x):
            t = torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255
            with torch.inference_mode():
                return model.model(t)

        whole(warm)
        model(warm, tile=args.tile, overlap=args.overlap)
        baseline = _time(lambda: whole(image), args.repeats)
        tiled = _time(lambda: model(image, tile=args.tile, overlap=args.overlap), args.repeats)

    flags = sorted(f for f in cpu_flags() if f in FLAGS_SHOWN)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads {torch.get_num_threads()}",
        "cpu_flags": flags, "torch": torch.__version__, "size": args.size, "blocks": args.blocks,
        "parameters_m": round(model.parameter_bytes / 4 / 1e6, 2), "tile": args.tile, "overlap": args.overlap,
        "repeats": args.repeats,
        "baseline_whole_s": {"median": round(statistics.median(baseline), 2), "min": round(min(baseline), 2)},
        "engine_tiled_s": {"median": round(statistics.median(tiled), 2), "min": round(min(tiled), 2)},
        "output": f"{args.size * 4}x{args.size * 4}",
    }
    print(json.dumps(result, indent=2))
    if args.markdown:
        rows = [("spandrel, whole image (baseline)", result["baseline_whole_s"]),
                (f"engine.upscalers, tiles {args.tile} / overlap {args.overlap}", result["engine_tiled_s"])]
        text = (f"{result['date']}; {result['machine']}; CPU flags {', '.join(flags) or 'none of ' + str(FLAGS_SHOWN)}; "
                f"torch {result['torch']}\n\n| 4x RRDB ({args.blocks} blocks, {result['parameters_m']} M parameters), "
                f"{args.size}x{args.size} -> {result['output']} | median (min) of {args.repeats} |\n|---|---|\n"
                + "".join(f"| {name} | {v['median']} s ({v['min']}) |\n" for name, v in rows))
        args.markdown.write_text(text)
    return result
