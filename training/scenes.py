"""Captioned synthetic scenes: coloured shapes on plain backgrounds, drawn at 64x64.

A scene is a frozen :class:`Scene` (count, size, colour, shape, position, background). Its caption is a
fixed English rendering ("a large red circle at the top on a blue background", "two green squares on the
left on a black background"); :func:`render` draws it with a small seeded jitter, antialiased (drawn at 4x
and area-downsampled). Every combination is enumerated by :func:`all_scenes`; :func:`split` holds out a
fixed, seeded set of combinations that training never sees (the evaluation prompts).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

SIZE = 64
_SS = 4  # supersampling factor for antialiased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 50),
    "purple": (150, 60, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "blue": (40, 80, 230),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = (1, 2, 3)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
SIZES = ("small", "large")  # only single objects have a size word; groups are drawn small
POSITIONS: dict[str, tuple[int, int]] = {  # name -> (x, y) anchor of the group's centre
    "left": (16, 32),
    "right": (48, 32),
    "top": (32, 16),
    "bottom": (32, 48),
    "middle": (32, 32),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
# Object extents in pixels (bounding-box side): single objects span >= 2 latent pixels of the x8 VAE (8x8
# latents), group members ~1.75. The first demo model drew 14 px singles and 12 px group members: their shape
# was at the edge of what the VAE keeps (round-trip ceiling 97%, shape the only miss of the model).
EXTENT = {"small": 18, "large": 28, "group": 14}
GROUP_SPACING = {2: 24, 3: 22}
JITTER = 2


@dataclass(frozen=True, order=True)
class Scene:
    count: int
    size: str  # "small" / "large" for count 1, "group" otherwise
    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        size = f"{self.size} " if self.count == 1 else ""
        return (f"{COUNT_WORDS[self.count]} {size}{self.colour} {noun} {POSITION_PHRASES[self.position]} "
                f"on a {self.background} background")

    @property
    def caption_without_position(self) -> str:
        """The caption with the position phrase left out (where the shapes go is then up to the model,
        or to a ControlNet's edges)."""
        return self.caption.replace(f" {POSITION_PHRASES[self.position]}", "")


def all_scenes() -> list[Scene]:
    """Every valid combination (an object is never the colour of its background), in a fixed order."""
    out = []
    for count, colour, shape, position, background in itertools.product(
        COUNTS, COLOURS, SHAPES, POSITIONS, BACKGROUNDS
    ):
        if COLOURS[colour] == BACKGROUNDS[background]:
            continue
        for size in (SIZES if count == 1 else ("group",)):
            out.append(Scene(count, size, colour, shape, position, background))
    return out


def split(n_heldout: int = 100, seed: int = 1234) -> tuple[list[Scene], list[Scene]]:
    """(train, held-out) combinations; the held-out set is a fixed seeded sample of ``n_heldout``."""
    scenes = all_scenes()
    rng = random.Random(seed)
    held = set(rng.sample(range(len(scenes)), n_heldout))
    train = [s for i, s in enumerate(scenes) if i not in held]
    heldout = [s for i, s in enumerate(scenes) if i in held]
    return train, heldout


def object_centres(scene: Scene, rng: random.Random) -> list[tuple[float, float]]:
    """Centres of the scene's objects: the group laid out around its position anchor, jittered."""
    ax, ay = POSITIONS[scene.position]
    ax += rng.uniform(-JITTER, JITTER)
    ay += rng.uniform(-JITTER, JITTER)
    if scene.count == 1:
        return [(ax, ay)]
    step = GROUP_SPACING[scene.count]
    offsets = [(i - (scene.count - 1) / 2) * step for i in range(scene.count)]
    vertical = scene.position in ("left", "right")  # groups on the sides stand in a column, else in a row
    return [(ax, ay + o) if vertical else (ax + o, ay) for o in offsets]


def _draw_shape(img: np.ndarray, shape: str, cx: float, cy: float, extent: float, colour) -> None:
    import cv2

    s, h = _SS, extent / 2
    if shape == "circle":
        cv2.circle(img, (round(cx * s), round(cy * s)), round(h * s), colour, -1, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(img, (round((cx - h) * s), round((cy - h) * s)),
                      (round((cx + h) * s) - 1, round((cy + h) * s) - 1), colour, -1)
    elif shape == "triangle":
        pts = np.array([[(cx - h) * s, (cy + h) * s], [(cx + h) * s, (cy + h) * s], [cx * s, (cy - h) * s]])
        cv2.fillPoly(img, [np.round(pts).astype(np.int32)], colour, cv2.LINE_AA)
    else:
        raise ValueError(f"unknown shape {shape!r} (allowed: {', '.join(SHAPES)})")


def render(scene: Scene, seed: int) -> np.ndarray:
    """Draw ``scene`` as a (64, 64, 3) uint8 RGB image; the same ``seed`` gives the same pixels."""
    import cv2

    rng = random.Random(seed)
    big = np.empty((SIZE * _SS, SIZE * _SS, 3), np.uint8)
    big[:] = BACKGROUNDS[scene.background]
    extent = EXTENT[scene.size] * rng.uniform(0.9, 1.1)
    for cx, cy in object_centres(scene, rng):
        _draw_shape(big, scene.shape, cx, cy, extent, COLOURS[scene.colour])
    return cv2.resize(big, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def canny(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges of an RGB uint8 image as (H, W) uint8 {0, 255} (the webui "canny" preprocessor)."""
    import cv2

    return cv2.Canny(image, low, high)


def sample_batch(scenes: list[Scene], n: int, seed: int) -> tuple[list[Scene], np.ndarray]:
    """``n`` scenes drawn uniformly from ``scenes`` and rendered: (scenes, uint8 array (n, 64, 64, 3))."""
    rng = random.Random(seed)
    chosen = [scenes[rng.randrange(len(scenes))] for _ in range(n)]
    images = np.stack([render(s, rng.randrange(2**31)) for s in chosen])
    return chosen, images


# the demo model's best settings (what training/evaluate.py scores the shipped model with; README, BENCHMARKS.md)
BEST_SETTINGS = {"sampler_name": "Euler a", "steps": 20, "cfg_scale": 1.5}


def vocabulary() -> dict:
    """What the captions say, as the model file carries it (``sdengine models info``): every word list with
    its template, the rules of the scene generator, and examples."""
    return {
        "counts": [COUNT_WORDS[c] for c in COUNTS],
        "sizes": list(SIZES),
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "positions": [POSITION_PHRASES[p] for p in POSITIONS],
        "backgrounds": list(BACKGROUNDS),
        "template": "{count} [{size}] {colour} {shape}[s] {position} on a {background} background",
        "rules": [
            "a size word only with a single object (groups of two or three are drawn small)",
            "an object is never the colour of its background (no blue on blue)",
            "the position phrase may be left out (a ControlNet then decides where the shapes go)",
            f"{SIZE}x{SIZE} pixels: the native size; other sizes are served but paint badly",
        ],
        "examples": [Scene(1, "large", "red", "circle", "middle", "blue").caption,
                     Scene(2, "group", "green", "square", "top", "black").caption,
                     Scene(3, "group", "yellow", "triangle", "left", "gray").caption],
    }
