"""``python -m benchmarks readme_picture``: the picture that opens the README (docs/img/readme-demo.png).

A grid of the bundled demo model's images, each with the prompt that made it: generated here, through the
engine (engine.pipeline.Engine on the bundled ``sdengine-demo``, the torch backend: no export needed), 20 steps
Euler a, CFG 1.5 (the model's best settings), one seed per prompt. Prompts are combinations of the
model's vocabulary (README, "What it knows"). Not a benchmark: it lives here beside ``plot`` because both draw
the repository's pictures from what the code produces.

    python -m benchmarks readme_picture [--out docs/img/readme-demo.png] [--backend torch]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img" / "readme-demo.png"
PROMPTS = (  # (prompt, seed)
    ("a large red circle in the middle on a blue background", 1),
    ("two green squares at the top on a black background", 2),
    ("three yellow triangles on the left on a gray background", 3),
    ("a small purple circle on the right on a white background", 4),
    ("a large blue triangle at the bottom on a white background", 5),
    ("two red circles on the right on a gray background", 6),
    ("a small yellow square in the middle on a black background", 7),
    ("three purple squares at the bottom on a blue background", 8),
)
TILE, COLS, CAPTION = 176, 4, 52  # tile pixels, tiles per row, caption height in pixels

log = logging.getLogger(__name__)


def generate(backend: str = "torch") -> list[tuple[str, int, np.ndarray]]:
    """(prompt, seed, 64x64x3 uint8 image) for every prompt of :data:`PROMPTS`, on the bundled demo model."""
    from engine.pipeline import Engine
    from engine.request import GenerationRequest

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(models_dir=Path(tmp) / "store", backend=backend, cache_dir=Path(tmp) / "cache")
        if not engine.default_model_name().startswith("sdengine-demo"):
            raise RuntimeError("the bundled demo model is not in this checkout (engine/models/bundled/)")
        out = []
        for prompt, seed in PROMPTS:
            result = engine.generate(GenerationRequest(prompt=prompt, steps=20, cfg_scale=1.5, seed=seed,
                                                       sampler_name="Euler a"))
            out.append((prompt, seed, result.images[0]))
            log.info("%s (seed %d)", prompt, seed)
        return out


def compose(items: list[tuple[str, int, np.ndarray]]):
    """The grid as a PIL image: each image scaled to TILE pixels, its prompt below it."""
    from PIL import Image, ImageDraw, ImageFont

    rows = (len(items) + COLS - 1) // COLS
    pad = 8
    sheet = Image.new("RGB", (COLS * (TILE + pad) + pad, rows * (TILE + CAPTION + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for i, (prompt, _seed, image) in enumerate(items):
        x, y = pad + (i % COLS) * (TILE + pad), pad + (i // COLS) * (TILE + CAPTION + pad)
        sheet.paste(Image.fromarray(image).resize((TILE, TILE), Image.Resampling.BICUBIC), (x, y))
        for j, line in enumerate(textwrap.wrap(prompt, 30)[:3]):
            draw.text((x, y + TILE + 3 + 15 * j), line, fill=(40, 40, 48), font=font)
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks readme_picture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--backend", default="torch", help="engine backend (torch needs no export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sheet = compose(generate(args.backend))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.png")
    sheet.save(tmp, format="PNG", optimize=True)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB, {len(PROMPTS)} prompts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
