"""The bundled demo model through the real pipeline (store -> loader -> backend -> sampler -> VAE).

Golden image: tests/golden/demo-seed1-euler-a.png, made by the torch backend; every backend must reproduce it
within 2/255 mean absolute difference (reference: that PNG; openvino runs in its default precision, bf16 on a
CPU with native bf16), and the automatic evaluator of training/ must read the prompt's scene in it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.pipeline import Engine
from engine.request import GenerationRequest
from tests.conftest import exclusive

GOLDEN = Path(__file__).parent / "golden" / "demo-seed1-euler-a.png"
PROMPT = "a large red circle in the middle on a blue background"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_demo_model_golden_image(backend, tmp_path, demo_cache):
    from training.evaluate import analyse

    # the run's shared demo export cache: the first of these tests (or of the other demo users) exports
    engine = Engine(models_dir=tmp_path / "empty-store", backend=backend, cache_dir=demo_cache)
    assert engine.default_model_name().startswith("sdengine-demo")
    with exclusive(demo_cache):
        res = engine.generate(GenerationRequest(prompt=PROMPT, steps=20, cfg_scale=1.5, seed=1,
                                                sampler_name="Euler a"))
    img = res.images[0]
    assert img.shape == (64, 64, 3) and res.info["sd_model_name"] == "sdengine-demo"
    golden = np.asarray(Image.open(GOLDEN).convert("RGB"))
    diff = float(np.abs(img.astype(np.float64) - golden).mean())
    assert diff <= 2.0, f"{backend}: mean abs diff {diff:.3f}/255 to the golden image > 2/255"
    det = analyse(img)
    assert (det.count, det.size, det.colour, det.shape, det.position, det.background) == (
        1, "large", "red", "circle", "middle", "blue")


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory, demo_cache):
    from training.evaluate import make_engine

    # one thread, as every engine of the test run (tests/conftest.py); the run's shared demo export cache
    engine = make_engine("onnxruntime", tmp_path_factory.mktemp("demo-store"), threads=1, cache_dir=demo_cache)
    with exclusive(demo_cache):  # exported here unless another test did
        engine.generate(GenerationRequest(prompt="warm-up", steps=1, seed=1))
    return engine


@pytest.mark.slow
def test_demo_model_follows_heldout_prompts(demo_engine):
    """A sample of the held-out prompts (never seen in training) through the product pipeline: the automatic
    evaluator must read every attribute right in at least 10 of 12 (the full 100: BENCHMARKS.md)."""
    from training.evaluate import evaluate_engine, heldout_scenes

    scenes = heldout_scenes()[::8][:12]
    acc, rows, _ = evaluate_engine(demo_engine, scenes=scenes, steps=20, cfg=1.5, sampler="Euler a")
    misses = [(s.caption, d) for s, d, sc in rows if not sc["all"]]
    assert acc["all"] >= 10 / 12, misses


@pytest.mark.slow
def test_demo_controlnet_puts_shapes_on_the_edges(demo_engine):
    """Prompts without a position phrase: with the canny ControlNet the shapes land where the control edges
    are (evaluator's position right in >= 7 of 8); without it (same prompts and seeds) they do not, and the
    output's edges overlap the control edges much more with it than without."""
    from training.evaluate import evaluate_engine_controlnet, heldout_scenes

    scenes = heldout_scenes()[3::12][:8]
    res = evaluate_engine_controlnet(demo_engine, scenes=scenes, steps=20, cfg=1.5, sampler="Euler a")
    with_cn, without = res["with_controlnet"], res["without_controlnet"]
    assert with_cn["position_accuracy"] >= 7 / 8, res
    assert without["position_accuracy"] <= 5 / 8, res
    assert with_cn["edge_overlap_1px"] >= without["edge_overlap_1px"] + 0.15, res


def test_demo_model_recolours_through_img2img(demo_engine):
    """img2img on the demo model: init image "a red circle on the left" (rendered), prompt "a blue circle on
    the left", strength 0.75. 24 held-out target scenes (every 4th of the 100; the init is the same scene in
    another colour): the evaluator must read the target scene (colour, shape, count, size, position,
    background) in >= 90% of them; the init's own colour must be gone."""
    from training.evaluate import evaluate_engine_img2img, heldout_scenes, recolour_pairs

    pairs = recolour_pairs(heldout_scenes()[::4][:24])
    assert len(pairs) == 24 and all(a.colour != b.colour for a, b in pairs)
    acc, rows = evaluate_engine_img2img(demo_engine, pairs=pairs, strength=0.75, steps=20, cfg=1.5,
                                        sampler="Euler a")
    misses = [(p[0].caption, s.caption, d) for p, (s, d, sc) in zip(pairs, rows) if not sc["all"]]
    assert acc["all"] >= 0.9, misses
    kept_colour = [d.colour == p[0].colour for p, (s, d, sc) in zip(pairs, rows)]
    assert sum(kept_colour) <= 2, "img2img must recolour, not copy the init image"


def test_demo_lora_paints_red_objects_blue(demo_engine):
    """The bundled demo LoRA (training/lora.py, derived from the text encoder) through the product pipeline on
    onnxruntime: prompts of red objects come out red without it and blue with <lora:sdengine-demo-red2blue:1>,
    shape and position kept (evaluator: at least 5 of 6 each); the tag stays in the infotext with its hash."""
    import random

    from training.evaluate import analyse, engine_generate
    from training.lora import NAME, red_scenes

    scenes = random.Random(0).sample(red_scenes(), 6)
    plain = [analyse(im) for im in engine_generate(demo_engine, [s.caption for s in scenes], steps=10)]
    tagged = [f"{s.caption} <lora:{NAME}:1>" for s in scenes]
    lora = [analyse(im) for im in engine_generate(demo_engine, tagged, steps=10)]
    assert sum(d.colour == "red" for d in plain) >= 5, plain
    assert sum(d.colour == "blue" for d in lora) >= 5, lora
    assert sum(d.shape == s.shape and d.position == s.position for d, s in zip(lora, scenes)) >= 5, lora
    result = demo_engine.generate(GenerationRequest(prompt=tagged[0], steps=2, cfg_scale=1.5, seed=0))
    assert result.infotexts[0].startswith(tagged[0]) and f"Lora hashes: \"{NAME}: " in result.infotexts[0]


def test_demo_tile_colorfix_takes_the_hints_colours(demo_engine):
    """tile_colorfix (engine.controlnet.colorfix) in a generation on an exported backend: the same demo ControlNet
    unit with the same map (the image itself) as module "none", plus the fix, which puts the hint's low
    frequencies into every prediction: with a hint of the model's own domain (a yellow square on white, which the
    demo VAE encodes and decodes faithfully), the prompt's red-on-blue scene comes out in the hint's colours (mean
    colour), with "none" it does not; +sharp with Sharpness 0 is the plain fix (the negative rows' mix is x0)."""
    import dataclasses

    from engine.request import ControlNetUnit
    from training import scenes as S
    from training.evaluate import _scene_of

    hint = S.render(_scene_of("a large yellow square in the middle on a white background"), 0)
    base = GenerationRequest(prompt="a large red circle in the middle on a blue background", steps=12, cfg_scale=1.5,
                             seed=3, sampler_name="Euler a")
    unit = ControlNetUnit(model="sdengine-demo-canny", image=hint, module="none", pixel_perfect=True)
    plain = demo_engine.generate(dataclasses.replace(base, controlnet_units=(unit,))).images[0].astype(float)
    fixed_res = demo_engine.generate(dataclasses.replace(base, controlnet_units=(
        dataclasses.replace(unit, module="tile_colorfix"),)))
    fixed = fixed_res.images[0].astype(float)
    target = hint.astype(float).mean(axis=(0, 1))
    far_plain = np.abs(plain.mean(axis=(0, 1)) - target).max()
    far_fixed = np.abs(fixed.mean(axis=(0, 1)) - target).max()
    assert far_plain > 100 and far_fixed < 40, (far_plain, far_fixed)
    assert "Module: tile_colorfix" in fixed_res.infotexts[0] and "Threshold A: 8" in fixed_res.infotexts[0]
    sharp0 = demo_engine.generate(dataclasses.replace(base, controlnet_units=(
        dataclasses.replace(unit, module="tile_colorfix+sharp", threshold_b=0.0),))).images[0].astype(float)
    assert np.abs(sharp0 - fixed).mean() <= 0.5
