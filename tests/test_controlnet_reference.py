"""sd-webui-controlnet's ``advanced_weighting`` and ``reference_only`` in the engine, and both through the webui API
of a real server on the default backend.

References and tolerances:
- advanced weighting vs the residuals scaled by hand (the ControlNet's unscaled residuals times each weight, fed to
  ``unet_control``): relL2 <= 1e-6 (float32, the same modules and operations);
- the reference write pass vs the attn1 inputs of a plain UNet run on the same noised reference latent: equal to
  1e-6 (the same modules on the same input);
- style fidelity 1 ("ControlNet is more important"): the negative prompt's rows get plain self-attention, so their
  model output equals the output without the unit (1e-5), while the positive rows differ.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from core.errors import InvalidRequest
from engine.controlnet import prepare_unit
from engine.controlnet.reference import ReferenceInjection, attention_weights, style_fidelity
from engine.controlnet.units import ControlMode, PreparedUnit, controlnet_residuals, residual_names
from engine.pipeline import Engine
from engine.request import ControlNetUnit, GenerationRequest
from tests.api_support import wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CN = "tiny-controlnet-sd1"


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def picture(h: int = 96, w: int = 64) -> np.ndarray:
    """A picture with edges and colours (a disc on a gradient)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    img[(y - h // 2) ** 2 + (x - w // 2) ** 2 < (min(h, w) // 3) ** 2] = (230, 40, 40)
    return img


@pytest.fixture(scope="module")
def engine(tiny_store, tmp_path_factory):
    return Engine(models_dir=tiny_store, backend="torch", cache_dir=tmp_path_factory.mktemp("artefacts"))


BASE = GenerationRequest(model="tiny-sd1", prompt="a red circle", negative_prompt="blue", steps=4, seed=5,
                         sampler_name="Euler")


# ------------------------------------------------------------------------------------------ advanced weighting
def _feeds(rows: int = 2):
    g = np.random.default_rng(1)
    return {"sample": g.standard_normal((rows, 4, 8, 8)).astype(np.float32),
            "timestep": np.full(rows, 637.0, dtype=np.float32),
            "encoder_hidden_states": g.standard_normal((rows, 77, 32)).astype(np.float32)}


@pytest.mark.parametrize("mode", [ControlMode.BALANCED, ControlMode.PROMPT, ControlMode.CONTROL])
def test_advanced_weighting_is_the_residuals_scaled_by_hand(engine, mode):
    rt = engine.runtime("tiny-sd1")
    engine._controlnet(rt, CN, "controlnet_units[0].model")
    run = engine._run_fn(rt)
    weights = (0.2, 1.3, 0.5, 0.9, 1.7)  # tiny SD1 ControlNet: 4 down residuals + middle block
    image = prepare_unit(ControlNetUnit(model=CN, image=picture(), module="canny"), 64, 64).image
    # weight and the control mode are replaced by the weights (the extension's rule); the cond mark stays
    unit = PreparedUnit(model=CN, image=image, weight=0.4, control_mode=mode, advanced_weighting=weights)
    feeds, mask = _feeds(), np.array([1.0, 0.0], dtype=np.float32)
    ours = controlnet_residuals(run, [unit], 0, 10, feeds, mask)
    raw = run(unit.component, {**feeds, "controlnet_cond": np.repeat(image, 2, axis=0)})
    rows = mask.reshape(-1, 1, 1, 1) if mode is ControlMode.CONTROL else 1.0
    by_hand = {name: raw[name] * w * rows for name, w in zip(residual_names(5), weights)}
    for name in by_hand:
        assert rel_l2(ours[name], by_hand[name]) <= 1e-6, name
    out = run("unet_control", {**feeds, **ours})["model_output"]
    ref = run("unet_control", {**feeds, **by_hand})["model_output"]
    assert rel_l2(out, ref) <= 1e-6


def test_advanced_weighting_in_generation(engine):
    img = picture()
    unit = ControlNetUnit(model=CN, image=img, module="canny")
    plain = engine.generate(dataclasses.replace(BASE, controlnet_units=(unit,))).images[0]
    ones = engine.generate(dataclasses.replace(
        BASE, controlnet_units=(dataclasses.replace(unit, advanced_weighting=(1.0,) * 5),))).images[0]
    assert np.array_equal(plain, ones)  # all ones is the balanced weight 1
    low = (0.1, 0.1, 0.1, 0.1, 0.0)
    lowered = engine.generate(dataclasses.replace(
        BASE, controlnet_units=(dataclasses.replace(unit, advanced_weighting=low),))).images[0]
    assert mad(plain, lowered) > 0.5  # the weights change the image
    # the extension's 13-long SD1.5 list on a ControlNet with 5 residuals: its first 5 pair with them (zip)
    thirteen = engine.generate(dataclasses.replace(
        BASE, controlnet_units=(dataclasses.replace(unit, advanced_weighting=low + (2.0,) * 8),))).images[0]
    assert np.array_equal(lowered, thirteen)
    # weight 0 with advanced weights still runs the unit (the weights replace the weight)
    zero = engine.generate(dataclasses.replace(
        BASE, controlnet_units=(dataclasses.replace(unit, weight=0.0, advanced_weighting=low),))).images[0]
    assert np.array_equal(lowered, zero)


@pytest.mark.parametrize("weights", [(1.0,) * 7, (1.0,) * 4, (1.0, 1.0, 1.0, 1.0, 2.5)])
def test_advanced_weighting_refused_names_the_field(engine, weights):
    unit = ControlNetUnit(model=CN, image=picture(), module="canny", advanced_weighting=weights)
    with pytest.raises(InvalidRequest) as err:
        engine.generate(dataclasses.replace(BASE, controlnet_units=(ControlNetUnit(
            model=CN, image=picture(), module="canny"), unit)))
    assert err.value.field == "controlnet_units[1].advanced_weighting"
    assert "5 or 13 numbers from 0 to 2" in err.value.allowed


# ------------------------------------------------------------------------------------------------ reference
def test_style_fidelity_and_layer_weights_follow_the_extension():
    unit = PreparedUnit(model="None", image=np.zeros((1, 3, 8, 8), np.float32), module="reference_only",
                        threshold_a=0.5)
    assert style_fidelity(unit) == 0.5
    assert style_fidelity(unit, sdxl=True) == 0.125
    assert style_fidelity(unit, hires=True) == 0.0
    assert style_fidelity(dataclasses.replace(unit, control_mode=ControlMode.CONTROL)) == 1.0
    assert style_fidelity(dataclasses.replace(unit, control_mode=ControlMode.PROMPT)) == 0.0
    assert style_fidelity(dataclasses.replace(unit, threshold_a=3.0)) == 1.0
    # SD1.5's 16 blocks: 1280 channels first (down 2, middle 1, up 3), then 640, then 320, stable
    channels = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
    w = attention_weights(channels)
    assert [w[k] * 16 for k in (4, 5, 6, 7, 8, 9)] == [0, 1, 2, 3, 4, 5]
    assert [w[k] * 16 for k in (2, 3, 10, 11, 12)] == [6, 7, 8, 9, 10]
    assert [w[k] * 16 for k in (0, 1, 13, 14, 15)] == [11, 12, 13, 14, 15]


def _reference_unit(weight=1.0, mode=ControlMode.BALANCED, fidelity=0.5) -> PreparedUnit:
    image = prepare_unit(ControlNetUnit(model="None", image=picture(), module="reference_only"), 64, 64).image
    return PreparedUnit(model="None", image=image, module="reference_only", weight=weight, control_mode=mode,
                        threshold_a=fidelity)


def _injection(engine, unit, seed=3):
    rt = engine.runtime("tiny-sd1")
    return rt, ReferenceInjection(rt.backend, [unit], 10, rt.model.family.schedule.alphas_cumprod,
                                  lambda px: engine._encode(rt, px), seed=seed)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_write_pass_stores_exactly_the_attn1_inputs(engine, weight):
    import torch

    unit = _reference_unit(weight)
    rt, inj = _injection(engine, unit)
    run, feeds = engine._run_fn(rt), _feeds()
    layers = rt.backend.self_attention_layers()
    assert [c for _, c in layers] == [32, 64, 32, 32]  # the tiny UNet: down, middle, up, up
    with inj.inject(run, feeds, 0, np.array([1.0, 0.0], dtype=np.float32)):
        banks = [[b.clone() for b in attn.processor.bank] for attn, _ in layers]
    # the same q_sample draw by hand, then a plain UNet run recording every attn1 input
    a = float(rt.model.family.schedule.alphas_cumprod[637])
    noise = np.random.default_rng(3).standard_normal((2, 4, 8, 8))
    ref = (np.sqrt(a) * inj.latent(0) + np.sqrt(1 - a) * noise).astype(np.float32)
    seen: dict[int, torch.Tensor] = {}
    hooks = [attn.register_forward_pre_hook(lambda m, args, k=k: seen.__setitem__(k, args[0].clone()))
             for k, (attn, _) in enumerate(layers)]
    try:
        run("unet", {**feeds, "sample": ref})
    finally:
        for h in hooks:
            h.remove()
    weights = attention_weights([c for _, c in layers])
    for k, bank in enumerate(banks):
        if weight > weights[k]:
            assert len(bank) == 1 and rel_l2(bank[0].float(), seen[k].float()) <= 1e-6, k
        else:
            assert bank == [], k
    assert any(not b for b in banks) == (weight < 1.0)


def test_full_style_fidelity_leaves_negative_rows_plain(engine):
    rt = engine.runtime("tiny-sd1")
    run, feeds, mask = engine._run_fn(rt), _feeds(), np.array([1.0, 0.0], dtype=np.float32)
    plain = run("unet", feeds)["model_output"]
    outputs = {}
    for fidelity in (1.0, 0.0):
        _, inj = _injection(engine, _reference_unit(fidelity=fidelity))
        with inj.inject(run, feeds, 0, mask):
            outputs[fidelity] = run("unet", feeds)["model_output"]
    # style 1: the negative row runs plain self-attention, the positive one attends to the reference
    assert rel_l2(outputs[1.0][1], plain[1]) <= 1e-5
    assert rel_l2(outputs[1.0][0], plain[0]) > 1e-3
    # style 0: every row attends to the reference
    assert rel_l2(outputs[0.0][1], plain[1]) > 1e-3
    assert rel_l2(outputs[0.0][0], outputs[1.0][0]) <= 1e-5
    # the processors are removed after the evaluation
    assert rel_l2(run("unet", feeds)["model_output"], plain) == 0.0


def test_reference_changes_the_image_and_returns_its_map(engine):
    plain = engine.generate(BASE)
    unit = ControlNetUnit(model="None", image=picture(), module="reference_only", save_detected_map=True)
    ref = engine.generate(dataclasses.replace(BASE, controlnet_units=(unit,)))
    assert mad(plain.images[0], ref.images[0]) > 0.5
    assert len(ref.detected_maps) == 1 and ref.detected_maps[0].shape == (64, 64, 3)
    assert "Module: reference_only, Model: None" in ref.infotexts[0]
    assert "Threshold A: 0.5" in ref.infotexts[0]  # the style fidelity's default
    again = engine.generate(dataclasses.replace(BASE, controlnet_units=(unit,)))
    assert np.array_equal(ref.images[0], again.images[0])  # seeded: reproducible
    # outside its guidance window the unit does nothing
    late = dataclasses.replace(unit, guidance_start=1.0, guidance_end=1.0)
    off = engine.generate(dataclasses.replace(BASE, controlnet_units=(late,), steps=3))
    assert np.array_equal(off.images[0], engine.generate(dataclasses.replace(BASE, steps=3)).images[0])


def test_exported_graph_backend_serves_reference_on_torch(engine, tiny_store, tmp_path):
    ort = Engine(models_dir=tiny_store, backend="onnxruntime", cache_dir=tmp_path)
    unit = ControlNetUnit(model="None", image=picture(), module="reference_only")
    req = dataclasses.replace(BASE, controlnet_units=(unit,))
    served = ort.generate(req)
    assert np.array_equal(served.images[0], engine.generate(req).images[0])
    assert "Backend: torch" in served.infotexts[0]
    assert any("controlnet_units[0] (reference_only): served on the torch backend" in w
               for w in served.info["warnings"])


def test_adain_variants_are_refused_naming_the_module(engine):
    unit = ControlNetUnit(model="None", image=picture(), module="reference_adain")
    with pytest.raises(InvalidRequest) as err:
        engine.generate(dataclasses.replace(BASE, controlnet_units=(unit,)))
    assert err.value.field == "controlnet_units[0].module" and "reference_only" in err.value.allowed


# --------------------------------------------------------------------------------------------------- HTTP
def _png_b64(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_cache):
    """``python -m cli serve`` on the default backend, the demo canny ControlNet stored under the name the
    extension's CI downloads."""
    root = tmp_path_factory.mktemp("reference-server")
    (root / "models" / "ControlNet").mkdir(parents=True)
    shutil.copyfile(ROOT / "engine" / "models" / "bundled" / "ControlNet" / "sdengine-demo-canny.safetensors",
                    root / "models" / "ControlNet" / "control_v11p_sd15_canny.safetensors")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # OMP_NUM_THREADS: the test run's (tests/conftest.py)
    env["SDENGINE_CACHE_DIR"] = str(demo_cache)  # the run's demo exports
    env.pop("SDENGINE_API_KEY", None)
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir",
                             str(root / "models"), "--results-dir", str(root / "results")],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 90
    wait_healthy(url, proc, lambda: (root / "server.log").read_text()[-3000:], timeout=end - time.monotonic())
    yield url, root
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    log.close()


def _extension_payload(unit: dict) -> dict:
    """The extension's web-API test payload in its CI mode (64x64, 3 steps) with one unit (its unknown top-level
    field seed_enable_extras left out: the leniency policy, not these features, decides it)."""
    base_unit = {"control_mode": "Balanced", "enabled": True, "guidance_end": 1, "guidance_start": 0,
                 "pixel_perfect": True, "processor_res": 512, "resize_mode": "Crop and Resize", "threshold_a": -1,
                 "threshold_b": -1, "weight": 1, "module": "canny", "model": "control_v11p_sd15_canny",
                 "image": _png_b64(picture(768, 512))}
    return {"alwayson_scripts": {"ControlNet": {"args": [{**base_unit, **unit}]}}, "batch_size": 1,
            "cfg_scale": 7, "comments": {}, "disable_extra_networks": False, "do_not_save_grid": False,
            "do_not_save_samples": False, "enable_hr": False, "height": 64, "width": 64, "n_iter": 1,
            "negative_prompt": "", "prompt": "(masterpiece: 1.3), (highres: 1.3), best quality,",
            "sampler_name": "Euler a", "seed": 42, "steps": 3, "subseed": -1,
            "subseed_strength": 0, "override_settings": {}, "override_settings_restore_afterwards": False}


def test_http_reference_only_with_model_none(server):
    url, root = server
    r = requests.post(url + "/sdapi/v1/txt2img", json=_extension_payload(
        {"module": "reference_only", "model": "None"}), timeout=600)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2  # the image and the unit's detected map (the reference image)
    info = body["info"]
    assert "reference_only" in info and "Model: None" in info


def test_http_advanced_weighting(server):
    url, _ = server
    r = requests.post(url + "/sdapi/v1/txt2img", json=_extension_payload({"advanced_weighting": [0.75] * 13}),
                      timeout=600)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2
    bad = requests.post(url + "/sdapi/v1/txt2img", json=_extension_payload({"advanced_weighting": [0.75] * 7}),
                        timeout=600)
    assert bad.status_code == 422, bad.text
    assert "advanced_weighting" in bad.text and "5 or 13" in bad.text
