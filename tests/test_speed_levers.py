"""The webui's speed levers (issue 29), opt-in: NGMS (s_min_uncond) through a real generation and the API
translation, ToMe (token_merging_ratio) on the torch backend against tomesd applied directly to the diffusers
UNet (reference; fp32, max abs diff <= 1e-5), and its refusal at submit on the exported-graph backends. The NGMS
rule itself is tested against the webui's code written out in tests/test_denoiser.py."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from core.errors import InvalidRequest
from engine.admission import check_token_merging
from engine.config import EngineConfig
from engine.pipeline import Engine
from engine.request import GenerationRequest

BASE = GenerationRequest(model="tiny-sd1", prompt="a red circle", negative_prompt="blue", steps=6, seed=5,
                         sampler_name="Euler", cfg_scale=7.0)


@pytest.fixture(scope="module")
def engine(tiny_store, tmp_path_factory):
    return Engine(models_dir=tiny_store, backend="torch", cache_dir=tmp_path_factory.mktemp("artefacts"))


@pytest.fixture(scope="module")
def base(engine):
    return engine.generate(BASE)


def _feeds(rows: int = 2):
    g = np.random.default_rng(1)
    return {"sample": g.standard_normal((rows, 4, 8, 8)).astype(np.float32),
            "timestep": np.full(rows, 637.0, dtype=np.float32),
            "encoder_hidden_states": g.standard_normal((rows, 77, 32)).astype(np.float32)}


def test_ngms_changes_late_steps_only_and_says_so(engine, base):
    """s_min_uncond above every sigma of the run skips the negative prompt on every other call: a different
    image with "NGMS" in its infotext; s_min_uncond below the smallest sigma skips nothing: the same pixels."""
    skipped = engine.generate(dataclasses.replace(BASE, s_min_uncond=15.0))
    assert "NGMS: 15" in skipped.infotexts[0] and "NGMS" not in base.infotexts[0]
    assert np.abs(skipped.images[0].astype(int) - base.images[0]).max() > 0
    none = engine.generate(dataclasses.replace(BASE, s_min_uncond=0.001))
    assert np.array_equal(none.images[0], base.images[0])
    every = engine.generate(dataclasses.replace(BASE, s_min_uncond=15.0, s_min_uncond_all=True))
    assert "NGMS all steps: True" in every.infotexts[0]
    assert not np.array_equal(every.images[0], skipped.images[0])


def test_tome_matches_tomesd_on_the_diffusers_unet(engine):
    """set_token_merging(0.5): the UNet's output equals tomesd.apply_patch (the webui's arguments) on a copy of
    the same diffusers UNet; it differs from the unmerged output (tokens were merged); 0 restores the exact
    output bit for bit."""
    import tomesd
    import torch

    backend = engine.runtime("tiny-sd1").backend
    backend.set_token_merging(0.0)
    feeds = _feeds()
    exact = backend.run("unet", feeds)["model_output"]
    unet = copy.deepcopy(backend._components[backend.descriptor("unet").source])  # the same diffusers UNet
    backend.set_token_merging(0.5)
    merged = backend.run("unet", feeds)["model_output"]
    tomesd.apply_patch(unet, ratio=0.5, use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)
    with torch.inference_mode():
        ref = unet(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                   torch.from_numpy(feeds["encoder_hidden_states"]), return_dict=False)[0].float().numpy()
    assert np.abs(merged - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert np.abs(merged - exact).max() > 1e-3
    backend.set_token_merging(0.0)
    assert np.array_equal(backend.run("unet", feeds)["model_output"], exact)


def test_tome_generation_says_so(engine, base):
    out = engine.generate(dataclasses.replace(BASE, token_merging_ratio=0.5))
    assert "Token merging ratio: 0.5" in out.infotexts[0]
    assert np.abs(out.images[0].astype(int) - base.images[0]).max() > 0
    again = engine.generate(BASE)  # the next request without ToMe: the patch is gone
    assert np.array_equal(again.images[0], base.images[0])


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_tome_refused_at_submit_on_exported_graphs(backend):
    config = EngineConfig(backend=backend)
    with pytest.raises(InvalidRequest) as exc:
        check_token_merging(config, dataclasses.replace(BASE, token_merging_ratio=0.3))
    assert exc.value.field == "token_merging_ratio" and backend in exc.value.message
    check_token_merging(config, BASE)  # 0: off, fine
    check_token_merging(EngineConfig(backend="torch"), dataclasses.replace(BASE, token_merging_ratio=0.3))


def test_api_translation_of_the_levers():
    """The payload's s_min_uncond wins over the option; ToMe from the options (img2img falls back to
    token_merging_ratio_img2img, the hires pass to token_merging_ratio); errors name the option."""
    from api_compat.schema import parse_payload, parse_img2img
    from api_compat.translate import _speed_levers, field_origins

    p = parse_payload({"prompt": "x", "s_min_uncond": 2.0,
                       "override_settings": {"s_min_uncond": 5.0, "s_min_uncond_all": True,
                                             "token_merging_ratio": 0.3}})
    assert _speed_levers(p, p.override_settings) == dict(s_min_uncond=2.0, s_min_uncond_all=True,
                                                         token_merging_ratio=0.3, token_merging_ratio_hr=0.3)
    p = parse_payload({"prompt": "x", "override_settings": {"s_min_uncond": 5.0, "token_merging_ratio_hr": 0.6}})
    assert _speed_levers(p, p.override_settings)["s_min_uncond"] == 5.0
    assert _speed_levers(p, p.override_settings)["token_merging_ratio_hr"] == 0.6
    assert field_origins(p)["s_min_uncond"] == "override_settings.s_min_uncond"
    assert field_origins(p)["token_merging_ratio_hr"] == "override_settings.token_merging_ratio_hr"
    image = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
    p = parse_img2img({"init_images": [image], "override_settings": {"token_merging_ratio_img2img": 0.4}})
    assert _speed_levers(p, p.override_settings)["token_merging_ratio"] == 0.4
    assert field_origins(p)["token_merging_ratio"] == "override_settings.token_merging_ratio_img2img"


@pytest.mark.slow
def test_int8_unet_is_close_to_the_exact_path(tmp_path, demo_cache):
    """precision int8 (openvino): NNCF's hybrid quantization of the demo model's UNet, calibrated on its own
    exact-path UNet inputs; the image of a held-out-style prompt stays close to the exact path's (openvino bf16 /
    f32): mean abs pixel difference <= 6/255 (measured: see BENCHMARKS.md, speed levers) and the evaluator reads
    the same scene. The INT8 IR is an artefact: a second engine reads it from the cache (no calibration)."""
    from tests.conftest import exclusive
    from training.evaluate import analyse

    req = GenerationRequest(prompt="a large red circle in the middle on a blue background", steps=20,
                            cfg_scale=1.5, seed=1, sampler_name="Euler a")
    store = tmp_path / "empty-store"
    with exclusive(demo_cache):
        exact = Engine(models_dir=store, backend="openvino", cache_dir=demo_cache).generate(req)
        int8 = Engine(models_dir=store, backend="openvino", precision="int8", cache_dir=demo_cache)
        out = int8.generate(req)
    assert "int8 unet" in out.infotexts[0]
    diff = float(np.abs(out.images[0].astype(np.float64) - exact.images[0]).mean())
    assert diff <= 6.0, f"int8: mean abs diff {diff:.2f}/255 to the exact path"
    a, b = analyse(exact.images[0]), analyse(out.images[0])
    assert (a.count, a.size, a.colour, a.shape, a.position, a.background) == \
        (b.count, b.size, b.colour, b.shape, b.position, b.background)
    again = Engine(models_dir=store, backend="openvino", precision="int8", cache_dir=demo_cache)
    again.runtime(None).backend.calibration = None  # from the cache: no calibration needed
    assert np.array_equal(again.generate(req).images[0], out.images[0])


def test_int8_is_openvino_only():
    for backend in ("torch", "onnxruntime"):
        with pytest.raises(InvalidRequest) as exc:
            EngineConfig(backend=backend, precision="int8")
        assert exc.value.field == "precision" and "openvino" in exc.value.message
