"""Automatic evaluation of the demo model: what is in a generated image, and does it match the prompt?

:func:`analyse` reads a 64x64 RGB image with no knowledge of the prompt: the background is the median
colour of the border, object pixels are those far from it, objects are the connected components of
those pixels; colour = nearest palette colour of the object cores, shape = where each object's soft
coverage lies in its bounding box (mass in the top half: triangle; filled corners: square; else circle),
size = bounding-box side, position = nearest anchor of the group's centroid, count = number of components. :func:`score` compares that with the
:class:`~training.scenes.Scene` the prompt describes. It is calibrated on the generator's own images
(:func:`ground_truth_accuracy`, ~100%).

    PYTHONPATH=. python -m training.evaluate ground-truth
    PYTHONPATH=. python -m training.evaluate model --steps 20 --cfg 1.5         # training/out, own DDIM loop
    PYTHONPATH=. python -m training.evaluate engine --cfg 1.5 --sampler "Euler a"   # shipped model, the product
    PYTHONPATH=. python -m training.evaluate engine-controlnet --cfg 1.5            # shipped ControlNet, ditto

The ``engine*`` modes generate through :class:`engine.pipeline.Engine` (store -> loader -> backend -> sampler
-> VAE), exactly as ``sdengine txt2img`` does, on the shipped single files.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from training import scenes as S

log = logging.getLogger("training.evaluate")

ATTRIBUTES = ("count", "size", "colour", "shape", "position", "background")
OBJECT_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to an object
MIN_AREA = 12  # pixels; smaller components are noise
TRIANGLE_MAX_TOP = 0.36  # share of the mass in the top half of the box (triangle 0.25, circle/square 0.5)
CORNER, SQUARE_MIN_CORNER = 0.25, 0.46  # corner boxes of 25% of the side: square 0.6-1, circle 0.1-0.42
LARGE_MIN_SIDE = 23  # small objects are 16-20 px, large ones 25-31 px


@dataclass(frozen=True)
class Detection:
    count: int
    size: str | None
    colour: str | None
    shape: str | None
    position: str | None
    background: str


def _nearest(palette: dict[str, tuple[int, int, int]], rgb: np.ndarray) -> str:
    names = list(palette)
    d = np.linalg.norm(np.array([palette[n] for n in names], np.float32) - rgb[None], axis=1)
    return names[int(d.argmin())]


def _shape(a: np.ndarray) -> str:
    """Shape of one object from its soft coverage ``a`` over its bounding box.

    An upward triangle has a quarter of its mass in the top half of the box (circle, square: a half); a
    square fills the corners of its box, a circle leaves them empty.
    """
    h, w = a.shape
    mass = a.sum()
    if mass <= 0:
        return "circle"
    top = a[: h // 2].sum() + (a[h // 2].sum() / 2 if h % 2 else 0)
    if top / mass < TRIANGLE_MAX_TOP:
        return "triangle"
    cy, cx = max(1, round(h * CORNER)), max(1, round(w * CORNER))
    corners = np.mean([a[:cy, :cx].mean(), a[:cy, -cx:].mean(), a[-cy:, :cx].mean(), a[-cy:, -cx:].mean()])
    return "square" if corners > SQUARE_MIN_CORNER else "circle"


def analyse(image: np.ndarray) -> Detection:
    """Describe a (64, 64, 3) uint8 RGB image: background, count, colour, shape, size, position."""
    import cv2

    img = image.astype(np.float32)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(S.BACKGROUNDS, bg_rgb)
    dist = np.linalg.norm(img - bg_rgb, axis=2)
    mask = (dist > OBJECT_DISTANCE).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    comps = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= MIN_AREA]
    if comps:
        biggest = max(stats[i, cv2.CC_STAT_AREA] for i in comps)
        comps = [i for i in comps if stats[i, cv2.CC_STAT_AREA] >= 0.25 * biggest]
    if not comps:
        return Detection(0, None, None, None, None, background)
    keep = np.isin(labels, comps)
    core = keep & (dist >= 0.7 * dist[keep].max())
    obj_rgb = np.median(img[core], axis=0)
    colour = _nearest(S.COLOURS, obj_rgb)
    # soft coverage: 0 at the background colour, 1 at the object colour (robust to blurred edges)
    alpha = np.clip(dist / max(float(np.linalg.norm(obj_rgb - bg_rgb)), 1.0), 0, 1)
    shapes, sides = [], []
    for i in comps:
        x, y, w, h = (stats[i, k] for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH,
                                             cv2.CC_STAT_HEIGHT))
        a = alpha[y:y + h, x:x + w] * (labels[y:y + h, x:x + w] == i)
        shapes.append(_shape(a))
        sides.append(max(w, h))
    shape = max(set(shapes), key=shapes.count)
    if len(comps) == 1:
        size = "large" if sides[0] >= LARGE_MIN_SIDE else "small"
    else:
        size = "group"
    ys, xs = np.nonzero(keep)
    c = np.array([xs.mean(), ys.mean()])
    position = min(S.POSITIONS, key=lambda p: float(np.linalg.norm(c - np.array(S.POSITIONS[p]))))
    return Detection(len(comps), size, colour, shape, position, background)


def score(scene: S.Scene, det: Detection) -> dict[str, bool]:
    """Per-attribute agreement of a detection with the scene a prompt describes, plus ``all``."""
    out = {a: getattr(det, a) == getattr(scene, a) for a in ATTRIBUTES}
    out["all"] = all(out.values())
    return out


def accuracy(pairs) -> dict[str, float]:
    """Mean of :func:`score` over ``(scene, image)`` pairs, per attribute and ``all``."""
    rows = [score(s, analyse(im)) for s, im in pairs]
    return {k: float(np.mean([r[k] for r in rows])) for k in (*ATTRIBUTES, "all")}


def scored(scenes, images) -> tuple[dict[str, float], list]:
    """(accuracy per attribute and ``all``, rows of (scene, detection, score)); each image analysed once."""
    rows = []
    for scene, image in zip(scenes, images):
        det = analyse(image)
        rows.append((scene, det, score(scene, det)))
    acc = {k: float(np.mean([r[2][k] for r in rows])) for k in (*ATTRIBUTES, "all")}
    return acc, rows


def control_edges(scenes: list[S.Scene], seed: int = 0) -> np.ndarray:
    """Canny edges (N, 64, 64) of each scene rendered with its own seed (drawn from ``seed``): control images."""
    rng = random.Random(seed)
    return np.stack([S.canny(S.render(s, rng.randrange(2**31))) for s in scenes])


def ground_truth_accuracy(n: int = 1000, seed: int = 0, shuffled: bool = False) -> dict[str, float]:
    """Evaluator accuracy on the generator's own images (``shuffled``: against other scenes' captions)."""
    chosen, images = S.sample_batch(S.all_scenes(), n, seed)
    if shuffled:
        chosen = list(chosen)
        random.Random(seed + 1).shuffle(chosen)
    return accuracy(zip(chosen, images))


def vae_accuracy(out: Path | None = None, n: int = 500, seed: int = 0) -> dict[str, float]:
    """Evaluator accuracy on VAE round trips of generator images: the ceiling for generated images."""
    import torch
    from diffusers import AutoencoderKL

    from training.train import OUT, to_tensor

    vae = AutoencoderKL.from_pretrained(Path(out or OUT) / "vae").eval()
    chosen, images = S.sample_batch(S.all_scenes(), n, seed)
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(to_tensor(images[i:i + 100])).latent_dist.mean).sample
                         for i in range(0, n, 100)])
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return accuracy(zip(chosen, rec))


# -- sampling with the trained modules (deterministic DDIM, CFG) -------------------------------------------
def ddim_timesteps(steps: int) -> list[int]:
    """The diffusers DDIM "leading" timesteps with steps_offset=1 (e.g. 951, 901, ..., 1 for 20 steps)."""
    ratio = 1000 // steps
    return [int(t) for t in (np.arange(steps) * ratio)[::-1] + 1]


def generate(mods: dict, captions: list[str], *, steps: int = 20, cfg: float = 7.0, seed: int = 0,
             control: np.ndarray | None = None, control_scale: float = 1.0) -> np.ndarray:
    """Images (N, 64, 64, 3) uint8 for ``captions`` with deterministic DDIM (eta 0) and CFG.

    ``control``: (N, 64, 64) uint8 edge maps for the ControlNet in ``mods``.
    """
    import torch

    from training.train import alphas_cumprod, tokenize

    ac = alphas_cumprod()
    n = len(captions)
    with torch.no_grad():
        te, unet, vae = mods["text_encoder"], mods["unet"], mods["vae"]
        ctx = te(tokenize(list(captions) + [""] * n)).last_hidden_state
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((n, 4, S.SIZE // 8, S.SIZE // 8), generator=g)
        cond = None
        if control is not None:
            cond = torch.from_numpy(control).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
            cond = torch.cat([cond, cond])
        ts = ddim_timesteps(steps)
        for i, t in enumerate(ts):
            xin = torch.cat([x, x])
            tt = torch.full((2 * n,), t, dtype=torch.long)
            extra = {}
            if cond is not None:
                down, mid = mods["controlnet"](xin, tt, encoder_hidden_states=ctx, controlnet_cond=cond,
                                               conditioning_scale=control_scale, return_dict=False)
                extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            e_c, e_u = unet(xin, tt, encoder_hidden_states=ctx, **extra).sample.chunk(2)
            eps = e_u + cfg * (e_c - e_u)
            a = ac[t]
            a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        img = vae.decode(x / vae.config.scaling_factor).sample
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def heldout_scenes(n: int = 100) -> list[S.Scene]:
    """The 100 held-out prompt combinations (never seen in training)."""
    return S.split(n)[1]


def validation_scenes(n: int = 50, seed: int = 7) -> list[S.Scene]:
    """``n`` training combinations, for choosing sampler settings without looking at the held-out set."""
    return random.Random(seed).sample(S.split()[0], n)


def evaluate_model(mods: dict, *, steps: int = 20, cfg: float = 7.0, seed: int = 0, batch: int = 50,
                   scenes: list[S.Scene] | None = None) -> tuple[dict[str, float], list, np.ndarray]:
    """Generate one image per held-out prompt, return (accuracy, rows, images)."""
    scenes = scenes or heldout_scenes()
    images = np.concatenate([
        generate(mods, [s.caption for s in scenes[i:i + batch]], steps=steps, cfg=cfg, seed=seed + i)
        for i in range(0, len(scenes), batch)
    ])
    return (*scored(scenes, images), images)


def edge_iou(a: np.ndarray, b: np.ndarray, tolerance: int = 0) -> float:
    """IoU of two binary edge maps; with ``tolerance`` px, each map is dilated before intersecting."""
    import cv2

    a, b = a > 0, b > 0
    if tolerance:
        k = np.ones((2 * tolerance + 1,) * 2, np.uint8)
        ad, bd = cv2.dilate(a.astype(np.uint8), k) > 0, cv2.dilate(b.astype(np.uint8), k) > 0
        inter = (a & bd).sum() + (b & ad).sum()
        return float(inter / max(1, a.sum() + b.sum()))  # symmetric tolerant overlap (F1-like)
    return float((a & b).sum() / max(1, (a | b).sum()))


def evaluate_controlnet(mods: dict, *, steps: int = 20, cfg: float = 7.0, seed: int = 0, batch: int = 50):
    """Held-out scenes: render, take canny edges as control, generate, compare the output's canny edges."""
    scenes = heldout_scenes()
    edges = control_edges(scenes, seed)
    images = np.concatenate([
        generate(mods, [s.caption for s in scenes[i:i + batch]], steps=steps, cfg=cfg, seed=seed + i,
                 control=edges[i:i + batch])
        for i in range(0, len(scenes), batch)
    ])
    out_edges = [S.canny(im) for im in images]
    res = {
        "edge_iou": float(np.mean([edge_iou(e, o) for e, o in zip(edges, out_edges)])),
        "edge_overlap_1px": float(np.mean([edge_iou(e, o, 1) for e, o in zip(edges, out_edges)])),
        "prompt_accuracy": float(np.mean([score(s, analyse(im))["all"] for s, im in zip(scenes, images)])),
    }
    # Baseline: the same prompts and seeds without the ControlNet -- how much overlap comes from the prompt.
    base = np.concatenate([
        generate(mods, [s.caption for s in scenes[i:i + batch]], steps=steps, cfg=cfg, seed=seed + i)
        for i in range(0, len(scenes), batch)
    ])
    res["edge_iou_without_controlnet"] = float(np.mean([edge_iou(e, S.canny(o)) for e, o in zip(edges, base)]))
    res["edge_overlap_1px_without_controlnet"] = float(
        np.mean([edge_iou(e, S.canny(o), 1) for e, o in zip(edges, base)]))
    # The ControlNet's own contribution: empty prompt, so only the edges can say where the shapes go.
    for name, ctl in (("empty_prompt", edges), ("empty_prompt_without_controlnet", None)):
        out = np.concatenate([
            generate(mods, [""] * len(scenes[i:i + batch]), steps=steps, cfg=cfg, seed=seed + i,
                     control=None if ctl is None else ctl[i:i + batch])
            for i in range(0, len(scenes), batch)
        ])
        res[f"edge_overlap_1px_{name}"] = float(np.mean([edge_iou(e, S.canny(o), 1) for e, o in zip(edges, out)]))
    return res, scenes, edges, images


# -- through the product: engine.pipeline.Engine on the shipped model -------------------------------------
def make_engine(backend: str = "onnxruntime", models_dir: Path | None = None, threads: int = 2,
                cache_dir: Path | None = None):
    """An Engine over an empty model store: its default model is the bundled demo checkpoint. Exports go to
    ``cache_dir`` (default: ``.cache`` in the store)."""
    import tempfile

    from engine.pipeline import Engine

    root = Path(models_dir or tempfile.mkdtemp(prefix="sdengine-eval-"))
    return Engine(models_dir=root, backend=backend, cache_dir=cache_dir or root / ".cache", num_threads=threads)


def engine_generate(engine, prompts: list[str], *, steps: int = 20, cfg: float = 1.5, seed: int = 0,
                    sampler: str = "Euler a", control: np.ndarray | None = None,
                    control_model: str = "sdengine-demo-canny", control_weight: float = 1.0) -> np.ndarray:
    """One image per prompt (seed ``seed + i``) through ``engine.generate``; ``control``: (N, H, W) uint8
    edge maps given as ControlNet units with module "none" (already-made canny maps, as webui users do)."""
    from engine.request import ControlNetUnit, GenerationRequest

    images = []
    for i, prompt in enumerate(prompts):
        units = ()
        if control is not None:
            rgb = np.repeat(control[i][..., None], 3, axis=2)
            units = (ControlNetUnit(model=control_model, image=rgb, module="none", weight=control_weight),)
        res = engine.generate(GenerationRequest(prompt=prompt, steps=steps, cfg_scale=cfg, seed=seed + i,
                                                sampler_name=sampler, width=S.SIZE, height=S.SIZE,
                                                controlnet_units=units))
        images.append(res.images[0])
    return np.stack(images)


def evaluate_engine(engine, *, scenes: list[S.Scene] | None = None, **gen) -> tuple[dict[str, float], list,
                                                                                      np.ndarray]:
    """:func:`evaluate_model` through the product pipeline: (accuracy, rows, images)."""
    scenes = scenes or heldout_scenes()
    images = engine_generate(engine, [s.caption for s in scenes], **gen)
    return (*scored(scenes, images), images)


def evaluate_engine_controlnet(engine, *, scenes: list[S.Scene] | None = None, seed: int = 0, **gen) -> dict:
    """Does the shipped ControlNet put the shapes where the control edges are?

    Per held-out scene: render it (its own seed), take the canny edges as the control image. Prompts
    *without the position phrase* (only the edges can say where the shapes go): position accuracy of the
    evaluator and edge overlap, with the ControlNet and without it (same prompts and seeds: the baseline).
    Whole captions with the ControlNet: prompt accuracy (the edges must not break the prompt).
    """
    scenes = scenes or heldout_scenes()
    edges = control_edges(scenes, seed)
    nopos = [s.caption_without_position for s in scenes]
    res = {}
    for name, ctl in (("with_controlnet", edges), ("without_controlnet", None)):
        out = engine_generate(engine, nopos, seed=seed, control=ctl, **gen)
        dets = [analyse(im) for im in out]
        res[name] = {
            "position_accuracy": float(np.mean([d.position == s.position for s, d in zip(scenes, dets)])),
            "edge_iou": float(np.mean([edge_iou(e, S.canny(o)) for e, o in zip(edges, out)])),
            "edge_overlap_1px": float(np.mean([edge_iou(e, S.canny(o), 1) for e, o in zip(edges, out)])),
            "all_but_position": float(np.mean([all(v for k, v in score(s, d).items() if k not in ("position", "all"))
                                               for s, d in zip(scenes, dets)])),
        }
    full = engine_generate(engine, [s.caption for s in scenes], seed=seed, control=edges, **gen)
    res["whole_caption_with_controlnet"] = {
        "prompt_accuracy": float(np.mean([score(s, analyse(im))["all"] for s, im in zip(scenes, full)])),
        "edge_overlap_1px": float(np.mean([edge_iou(e, S.canny(o), 1) for e, o in zip(edges, full)])),
    }
    return res


def recolour_pairs(scenes: list[S.Scene] | None = None) -> list[tuple[S.Scene, S.Scene]]:
    """(init scene, target scene) per held-out target: the same scene drawn in the first other colour that
    is not the background's (the img2img task "a red circle on the left" -> "a blue circle on the left")."""
    from dataclasses import replace

    pairs = []
    for scene in scenes or heldout_scenes():
        for colour in S.COLOURS:
            if colour != scene.colour and S.COLOURS[colour] != S.BACKGROUNDS[scene.background]:
                pairs.append((replace(scene, colour=colour), scene))
                break
    return pairs


def evaluate_engine_img2img(engine, *, pairs: list[tuple[S.Scene, S.Scene]], strength: float = 0.75,
                            steps: int = 20, cfg: float = 1.5, sampler: str = "Euler a",
                            seed: int = 0) -> tuple[dict[str, float], list]:
    """Recolouring through img2img: init image = the init scene rendered (seed ``seed + i``), prompt = the
    target scene's caption, denoising ``strength``; the evaluator must read the target scene in the result."""
    from engine.request import GenerationRequest, InitImage

    images = []
    for i, (init, target) in enumerate(pairs):
        res = engine.generate(GenerationRequest(prompt=target.caption, steps=steps, cfg_scale=cfg, seed=seed + i,
                                                sampler_name=sampler, width=S.SIZE, height=S.SIZE,
                                                init=InitImage(S.render(init, seed + i), strength)))
        images.append(res.images[0])
    return scored([t for _, t in pairs], images)


def save_grid(images: np.ndarray, path: Path, cols: int = 10, scale: int = 2) -> None:
    import cv2

    n = len(images)
    rows = (n + cols - 1) // cols
    pad = np.zeros((rows * cols - n, *images.shape[1:]), np.uint8)
    allim = np.concatenate([images, pad])
    grid = np.concatenate([np.concatenate(list(allim[r * cols:(r + 1) * cols]), 1) for r in range(rows)], 0)
    grid = cv2.resize(grid, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(path), grid[:, :, ::-1])


DEMO_PROMPTS = (
    "a large red circle in the middle on a blue background",
    "two green squares at the top on a black background",
    "three yellow triangles on the left on a gray background",
    "a small purple square at the bottom on a white background",
    "a large yellow triangle on the right on a black background",
    "three blue circles at the bottom on a white background",
)


def write_samples(engine, dest: Path, *, steps: int = 20, cfg: float = 1.5, seed: int = 1,
                  sampler: str = "Euler a", scale: int = 4) -> list[Path]:
    """PNGs of :data:`DEMO_PROMPTS` through the product pipeline (upscaled ``scale``x, nearest), a ControlNet
    pair (control edges, output of a position-free prompt), and a README with prompt beside picture."""
    import cv2

    dest.mkdir(parents=True, exist_ok=True)
    for old in [*dest.glob("0*.png"), *dest.glob("cn-*.png")]:  # not the held-out grid
        old.unlink()

    def put(name: str, im: np.ndarray) -> Path:
        path = dest / name
        big = cv2.resize(im, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(path), big if big.ndim == 2 else big[:, :, ::-1])
        return path

    images = engine_generate(engine, list(DEMO_PROMPTS), steps=steps, cfg=cfg, seed=seed, sampler=sampler)
    paths = []
    lines = ["# Demo model samples", "",
             f"64x64 outputs of `sdengine-demo`, shown {scale}x (nearest), made through the engine exactly as "
             f"`sdengine txt2img` makes them: {sampler}, {steps} steps, CFG {cfg}, seed {seed} + row "
             "(`python -m training.evaluate samples`). The evaluator's verdict is the automatic one.", "",
             "| prompt | image | evaluator |", "|---|---|---|"]
    for i, (prompt, im) in enumerate(zip(DEMO_PROMPTS, images)):
        path = put(f"{i:02d}-{prompt.replace(' ', '-')}.png", im)
        ok = score(_scene_of(prompt), analyse(im))["all"]
        lines.append(f"| {prompt} | ![{prompt}]({path.name}) | {'right' if ok else 'wrong'} |")
        paths.append(path)
    scene = S.Scene(3, "group", "red", "square", "left", "white")
    edges = S.canny(S.render(scene, 5))
    prompt = scene.caption_without_position
    out = engine_generate(engine, [prompt], steps=steps, cfg=cfg, seed=seed, sampler=sampler, control=edges[None])[0]
    plain = engine_generate(engine, [prompt], steps=steps, cfg=cfg, seed=seed, sampler=sampler)[0]
    paths += [put("cn-control-edges.png", edges), put("cn-with-controlnet.png", out),
              put("cn-without-controlnet.png", plain)]
    lines += ["", f"ControlNet `sdengine-demo-canny`, prompt \"{prompt}\" (no position in it), control image: "
              f"canny edges of a scene with the squares on the left, module `none`, weight 1:", "",
              "| control image | with the ControlNet | without (same seed) |", "|---|---|---|",
              "| ![edges](cn-control-edges.png) | ![with](cn-with-controlnet.png) | "
              "![without](cn-without-controlnet.png) |"]
    (dest / "README.md").write_text("\n".join(lines) + "\n")
    return paths


def _scene_of(caption: str) -> S.Scene:
    for s in S.all_scenes():
        if s.caption == caption:
            return s
    raise ValueError(f"not a scene caption: {caption!r}")


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(description="Evaluate the demo model")
    p.add_argument("what", choices=["ground-truth", "vae", "model", "controlnet", "samples", "engine",
                                    "engine-controlnet"])
    p.add_argument("--sampler", default="Euler a", help="engine modes: webui sampler name")
    p.add_argument("--backend", default="onnxruntime", help="engine modes: onnxruntime | torch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, nargs="+", default=[1.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="training output folder (default training/out)")
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the generated images")
    p.add_argument("--shipped", action="store_true",
                   help="evaluate the shipped single files (engine/models/bundled) through the engine's loaders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--validation", action="store_true",
                   help="model: score 50 training combinations instead of the held-out ones (to pick --cfg)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.what == "ground-truth":
        res = {"ground_truth": ground_truth_accuracy(), "shuffled": ground_truth_accuracy(shuffled=True)}
        print(json.dumps(res, indent=1))
        return
    if args.what == "vae":
        print(json.dumps({"vae_reconstruction": vae_accuracy(args.out)}, indent=1))
        return
    if args.what == "samples":
        engine = make_engine(args.backend, threads=args.threads)
        for path in write_samples(engine, args.grid or Path("docs/demo"), steps=args.steps, cfg=args.cfg[0],
                                  seed=args.seed or 1, sampler=args.sampler):
            log.info("wrote %s", path)
        return
    if args.what in ("engine", "engine-controlnet"):
        engine = make_engine(args.backend, threads=args.threads)
        for cfg in args.cfg:
            gen = dict(steps=args.steps, cfg=cfg, sampler=args.sampler)
            if args.what == "engine":
                scenes = validation_scenes() if args.validation else heldout_scenes()
                acc, rows, images = evaluate_engine(engine, scenes=scenes, seed=args.seed, **gen)
                print(json.dumps({"set": "validation" if args.validation else "held-out", "backend": args.backend,
                                  "sampler": args.sampler, "steps": args.steps, "cfg": cfg, **acc}))
                for s, det, sc in rows:
                    if not sc["all"]:
                        log.info("miss: %r -> %s", s.caption, asdict(det))
                if args.grid:
                    save_grid(images, args.grid)
            else:
                res = evaluate_engine_controlnet(engine, seed=args.seed, **gen)
                print(json.dumps({"backend": args.backend, "sampler": args.sampler, "steps": args.steps,
                                  "cfg": cfg, **res}))
        return
    if args.shipped:
        from training.export import CHECKPOINT, CONTROLNET, load_shipped

        mods = load_shipped(CHECKPOINT, CONTROLNET if args.what == "controlnet" else None)
    else:
        from training.export import load_modules

        mods = load_modules(args.out, controlnet=args.what == "controlnet")
    for cfg in args.cfg:
        if args.what == "model":
            scenes = validation_scenes() if args.validation else heldout_scenes()
            acc, rows, images = evaluate_model(mods, steps=args.steps, cfg=cfg, seed=args.seed, scenes=scenes)
            print(json.dumps({"set": "validation" if args.validation else "held-out", "steps": args.steps,
                              "cfg": cfg, **acc}))
            for s, det, sc in rows:
                if not sc["all"]:
                    log.info("miss: %r -> %s", s.caption, asdict(det))
        else:
            res, _, _, images = evaluate_controlnet(mods, steps=args.steps, cfg=cfg, seed=args.seed)
            print(json.dumps({"steps": args.steps, "cfg": cfg, **res}))
        if args.grid:
            save_grid(images, args.grid)


if __name__ == "__main__":
    main()
