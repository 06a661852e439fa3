"""The webui's "SD upscale" img2img script (v1.9 ``scripts/sd_upscale.py``): the init image enlarged by an image
upscaler, cut into overlapping tiles of the request's width x height (``images.split_grid``), each tile an
img2img pass of the request, and the tiles pasted back with linear masks across the overlaps
(``images.combine_grid``). Each of ``n_iter`` iterations makes one image; the tiles of iteration ``n`` take the
seeds the webui gives them (tile ``k``: ``seed + n + k // batch_size + k % batch_size``), and every image carries
the first tile's infotext with "SD upscale overlap" and "SD upscale upscaler" added."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from engine.controlnet.images import as_array
from engine.noise import resolve_seed
from engine.progress import Progress
from engine.upscalers import Upscaling, upscale

SCRIPT_NAME = "sd upscale"
DEFAULT_OVERLAP, DEFAULT_SCALE = 64, 2.0  # the script's slider defaults
MAX_OVERLAP = 256


@dataclass(frozen=True)
class SdUpscale:
    """The script's arguments: the tiles' overlap (pixels), the upscaler's name, the scale factor."""

    overlap: int = DEFAULT_OVERLAP
    upscaler: str = "None"
    scale: float = DEFAULT_SCALE


@dataclass(frozen=True)
class Grid:
    """webui ``images.Grid``: rows of (y, [x, ...]) tile origins over an image of (width, height)."""

    tile_w: int
    tile_h: int
    width: int
    height: int
    overlap: int
    rows: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def count(self) -> int:
        return sum(len(xs) for _, xs in self.rows)


def split_grid(width: int, height: int, tile_w: int, tile_h: int, overlap: int) -> Grid:
    """webui ``images.split_grid``: the tile origins (tiles evenly spread, the last flush with the edge)."""
    cols = max(1, math.ceil((width - overlap) / (tile_w - overlap)))
    rows = max(1, math.ceil((height - overlap) / (tile_h - overlap)))
    dx = (width - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (height - tile_h) / (rows - 1) if rows > 1 else 0
    out = []
    for row in range(rows):
        y = int(row * dy)
        if y + tile_h >= height:
            y = height - tile_h
        xs = []
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= width:
                x = width - tile_w
            xs.append(x)
        out.append((y, tuple(xs)))
    return Grid(tile_w, tile_h, width, height, overlap, tuple(out))


def tiles_of(image: np.ndarray, grid: Grid) -> list[np.ndarray]:
    """The tiles of ``image`` in grid order (crops of tile_w x tile_h; outside the image: black, as PIL crops)."""
    out = []
    for y, xs in grid.rows:
        for x in xs:
            tile = np.zeros((grid.tile_h, grid.tile_w, 3), np.uint8)
            part = image[max(y, 0):y + grid.tile_h, max(x, 0):x + grid.tile_w]
            tile[max(-y, 0):max(-y, 0) + part.shape[0], max(-x, 0):max(-x, 0) + part.shape[1]] = part
            out.append(tile)
    return out


def _paste(dest: np.ndarray, src: np.ndarray, x: int, y: int, mask: np.ndarray | None = None) -> None:
    """PIL ``Image.paste`` of ``src`` at (x, y), clipped to ``dest``; ``mask`` (uint8, src's size) blends as
    PIL does: dest + (src - dest) * mask / 255."""
    h, w = src.shape[:2]
    sy, sx = max(0, -y), max(0, -x)
    dy, dx = max(0, y), max(0, x)
    hh, ww = min(h - sy, dest.shape[0] - dy), min(w - sx, dest.shape[1] - dx)
    if hh <= 0 or ww <= 0:
        return
    part = src[sy:sy + hh, sx:sx + ww]
    if mask is None:
        dest[dy:dy + hh, dx:dx + ww] = part
        return
    m = mask[sy:sy + hh, sx:sx + ww, None].astype(np.int32)
    base = dest[dy:dy + hh, dx:dx + ww].astype(np.int32)
    dest[dy:dy + hh, dx:dx + ww] = (base + ((part.astype(np.int32) - base) * m + 127) // 255).astype(np.uint8)


def combine_grid(grid: Grid, tiles: list[np.ndarray]) -> np.ndarray:
    """webui ``images.combine_grid``: each tile pasted over the previous with a 0..255 ramp across the overlap
    (columns within a row, then rows)."""
    o = grid.overlap
    ramp = (np.arange(o, dtype=np.float32) * 255 / o).astype(np.uint8) if o > 0 else np.zeros(0, np.uint8)
    mask_w = np.repeat(ramp[None, :], grid.tile_h, axis=0)
    mask_h = np.repeat(ramp[:, None], grid.width, axis=1)
    combined = np.zeros((grid.height, grid.width, 3), np.uint8)
    k = 0
    for y, xs in grid.rows:
        row = np.zeros((grid.tile_h, grid.width, 3), np.uint8)
        for x in xs:
            tile = tiles[k]
            k += 1
            if x == 0 or o == 0:
                _paste(row, tile, x, 0)
                continue
            _paste(row, tile[:, :o], x, 0, mask_w)
            _paste(row, tile[:, o:], x + o, 0)
        if y == 0 or o == 0:
            _paste(combined, row, 0, y)
            continue
        _paste(combined, row[:o], 0, y, mask_h)
        _paste(combined, row[o:], 0, y + o)
    return combined


def _with_params(infotext: str, script: SdUpscale) -> str:
    extra = f"SD upscale overlap: {script.overlap}, SD upscale upscaler: {script.upscaler}"
    return f"{infotext}, {extra}" if infotext else extra


def run(engine, req, how: Upscaling, *, progress=None, cancel: threading.Event | None = None):
    """The script over ``engine.generate``: ``req`` is the img2img request with ``sd_upscale`` set; returns a
    GenerationResult of ``n_iter`` combined images."""
    from engine.progress import as_callback

    script: SdUpscale = req.sd_upscale
    width, height = req.width or 512, req.height or 512
    init = as_array(req.init.image)[..., :3]
    image = init if script.upscaler == "None" else upscale(init, script.scale, script.upscaler, how, cancel=cancel)
    grid = split_grid(image.shape[1], image.shape[0], width, height, script.overlap)
    pieces = tiles_of(image, grid)
    seed, subseed = resolve_seed(req.seed), resolve_seed(req.subseed)
    batch = max(1, req.batch_size)
    callback = as_callback(progress)
    total = grid.count * req.n_iter
    images, seeds, subseeds, first = [], [], [], None
    timings: dict[str, float] = {}
    for n in range(req.n_iter):
        done = []
        for k, piece in enumerate(pieces):
            index = n * grid.count + k
            offset = n + k // batch + k % batch

            def tile_progress(event: Progress, index=index) -> None:
                if callback is not None:
                    steps = max(event.steps, 1)
                    callback(Progress(event.phase, event.done, event.total, index * steps + event.step,
                                      total * steps, event.eta_seconds,
                                      f"tile {index + 1} of {total}" + (f": {event.detail}" if event.detail else "")))

            tile_req = replace(req, sd_upscale=None, batch_size=1, n_iter=1, width=width, height=height,
                               seed=seed + offset, subseed=subseed + offset,
                               init=replace(req.init, image=piece, resize_mode=0, mask=None))
            result = engine.generate(tile_req, progress=tile_progress, cancel=cancel)
            if first is None:
                first = result
            for key, value in result.timings.items():
                timings[key] = timings.get(key, 0.0) + value
            done.append(result.images[0])
        images.append(combine_grid(grid, done))
        seeds.append(seed + n)
        subseeds.append(subseed + n)
    infotext = _with_params(first.infotexts[0] if first.infotexts else "", script)
    info: dict[str, Any] = dict(first.info)
    info.update({"infotexts": [infotext] * len(images), "all_seeds": seeds, "all_subseeds": subseeds,
                 "seed": seeds[0], "subseed": subseeds[0], "width": image.shape[1], "height": image.shape[0],
                 "sd_upscale": {"tiles": grid.count, "overlap": script.overlap, "upscaler": script.upscaler,
                                "scale": script.scale}})
    return type(first)(images=images, infotexts=[infotext] * len(images), info=info, seeds=seeds,
                       subseeds=subseeds, timings=timings)
