"""The SDXL refiner (``refiner_checkpoint``, ``refiner_switch_at``) and the hires checkpoint (``hr_checkpoint_name``)
as the webui runs them (engine.refiner), on tiny random SDXL and SDXL-refiner models in the real classes
(engine.models.tiny: the refiner has only the OpenCLIP-G text encoder and aesthetic-score time ids), in both file
formats users have (a webui single file and a diffusers folder).

References: the webui's switch rule (modules/sd_samplers_common.apply_refiner, v1.9), written out below in torch;
the refiner's conditioning against diffusers' StableDiffusionXLImg2ImgPipeline (requires_aesthetics_score, its
encode_prompt and _get_add_time_ids) through the UNet, tolerance 1e-5 (float32 on the CPU, the same modules).
The API tests run both task backends (embedded; Celery on a real Redis with a real ``sdengine worker``) and both
faces (/scc sd_txt2img, the webui's /sdapi/v1/txt2img).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from core.errors import Cancelled, InvalidRequest, ModelNotFound, TooMuchMemory
from engine.models.family import Arch
from engine.request import GenerationRequest, Hires, Refiner
from tests.api_support import png_infotext, png_pixels
from tests.queue_support import WorkerProcess, redis_server  # noqa: F401 (fixture)

BASE = dict(model="tiny-sdxl", prompt="a red cube", negative_prompt="blurry", steps=8, seed=11, width=64, height=64,
            sampler_name="Euler")


def webui_switches(model_sigmas: torch.Tensor, sigma: torch.Tensor, refiner_switch_at) -> bool:
    """The reference: apply_refiner's rule as the webui writes it (sigma path, refiner_switch_by_sample_steps off):
    it returns False (no switch) while ``refiner_switch_at is not None and completed_ratio < refiner_switch_at``."""
    timestep = torch.argmin(torch.abs(model_sigmas - torch.max(sigma)))
    completed_ratio = (999 - timestep) / 1000
    return not (refiner_switch_at is not None and completed_ratio < refiner_switch_at)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from engine.models.tiny import write_tiny_store

    return write_tiny_store(tmp_path_factory.mktemp("refiner-models"), kinds=("sdxl", "sdxl_refiner", "sd1"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("refiner-cache")


@pytest.fixture(scope="module")
def engine(store, cache):
    from engine.pipeline import Engine

    return Engine(models_dir=store, backend="torch", device="cpu", cache_dir=cache)


def _run(engine, progress=None, cancel=None, **kw):
    return engine.generate(GenerationRequest(**{**BASE, **kw}), progress=progress, cancel=cancel)


# ------------------------------------------------------------------------------------------------ the rule
def test_switch_rule_is_the_webuis(engine):
    from engine.refiner import switches
    from engine.samplers import resolve

    family = engine.runtime("tiny-sdxl").model.family
    table = torch.tensor(np.asarray(family.schedule.sigmas, dtype=np.float32))
    checked = 0
    for sampler, scheduler in (("Euler", "Automatic"), ("DPM++ 2M", "Karras"), ("Euler a", "Exponential")):
        plan = resolve(sampler, scheduler).prepare(13, family)
        for sigma in plan.sigmas[:-1]:
            for at in (None, 0.0, 0.2, 0.5, 0.8, 0.95, 0.999, 1.0):
                ref = webui_switches(table, torch.tensor([float(sigma)], dtype=torch.float32), at)
                assert switches(family.schedule.sigmas, float(sigma), at) == ref, (sampler, float(sigma), at)
                checked += 1
    assert checked > 100


def _switch_step(engine, at: float, steps: int) -> int | None:
    """The reference switch step of an Euler run (one model call per step, at sigmas[i])."""
    from engine.samplers import resolve

    family = engine.runtime("tiny-sdxl").model.family
    table = torch.tensor(np.asarray(family.schedule.sigmas, dtype=np.float32))
    sigmas = resolve("Euler", "Automatic").prepare(steps, family).sigmas
    return next((i for i, s in enumerate(sigmas[:-1])
                 if webui_switches(table, torch.tensor([float(s)], dtype=torch.float32), at)), None)


def test_refiner_takes_over_at_the_webuis_step_with_progress_phases(engine):
    events = []
    out = _run(engine, progress=lambda p: events.append((p.phase, p.detail, p.step)),
               refiner=Refiner("tiny-sdxl-refiner", 0.5))
    k = _switch_step(engine, 0.5, 8)
    assert k is not None and 0 < k < 8
    assert ("encoding", "refiner", k) in events  # the refiner's prompts are encoded after k base steps
    first_refiner = events.index(("encoding", "refiner", k))
    assert all(d != "refiner" for _, d, _ in events[:first_refiner])
    sampled = [s for ph, d, s in events[first_refiner:] if ph == "sampling" and d == "refiner"]
    assert sampled[-1] == 8 and sampled[1] == k + 1
    entry = engine.store.resolve("tiny-sdxl-refiner")
    short = engine.store.hash_of(entry)[:10]
    assert f"Refiner: tiny-sdxl-refiner [{short}], Refiner switch at: 0.5" in out.infotexts[0]


def test_switch_at_one_is_no_refiner_and_lower_changes_the_image(engine):
    plain = _run(engine)
    never = _run(engine, refiner=Refiner("tiny-sdxl-refiner", 1.0))
    assert np.array_equal(plain.images[0], never.images[0])  # the same pixels
    assert never.infotexts == plain.infotexts  # no "Refiner" fields: the switch never happened (webui)
    refined = _run(engine, refiner=Refiner("tiny-sdxl-refiner", 0.5))
    diff = np.abs(refined.images[0].astype(int) - plain.images[0].astype(int))
    assert diff.mean() > 1.0
    # the refiner's first steps leave the early structure: less change than a refiner from the first step
    whole = _run(engine, refiner=Refiner("tiny-sdxl-refiner", None))
    assert np.abs(whole.images[0].astype(int) - plain.images[0].astype(int)).mean() > diff.mean()
    # None: switched at the first call; a None value is left out of the infotext (webui create_infotext)
    assert "Refiner: tiny-sdxl-refiner" in whole.infotexts[0] and "Refiner switch at" not in whole.infotexts[0]
    # the refiner as a diffusers folder: the same weights, the same pixels
    folder = _run(engine, refiner=Refiner("tiny-sdxl-refiner-diffusers", 0.5))
    assert np.array_equal(folder.images[0], refined.images[0])


def test_refiner_conditioning_matches_diffusers(engine):
    """Positive and negative rows through the refiner UNet: our encoding (OpenCLIP-G penultimate hidden states,
    its projected pooled output, time ids [h, w, 0, 0, 6.0] / [.., 2.5]) against diffusers' refiner pipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    from engine.conditioning import encode_request

    rt = engine.runtime("tiny-sdxl-refiner")
    assert rt.model.family.arch is Arch.SDXL_REFINER
    c = rt.model.components
    pipe = StableDiffusionXLImg2ImgPipeline(vae=c["vae"], text_encoder=None, text_encoder_2=c["text_encoder_2"],
                                            tokenizer=None, tokenizer_2=c["tokenizer_2"], unet=c["unet"],
                                            scheduler=EulerDiscreteScheduler(), requires_aesthetics_score=True)
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt("a red cube", device="cpu", do_classifier_free_guidance=True,
                                                negative_prompt="blurry")
        ids, neg_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), 6.0, 2.5, (64, 64), (0, 0), (64, 64),
                                              torch.float32, text_encoder_projection_dim=32)
    cond = encode_request(rt.backend, rt.model.family.text, ["a red cube"], ["blurry"], steps=1, width=64,
                          height=64).at(0)
    got_ids = np.asarray(cond.time_ids, dtype=np.float32)
    assert got_ids.tolist() == [ids[0].tolist(), neg_ids[0].tolist()] == [[64, 64, 0, 0, 6.0], [64, 64, 0, 0, 2.5]]
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500.0, 500.0])
    ours = rt.backend.run("unet", {"sample": x.numpy(), "timestep": t.numpy(),
                                   "encoder_hidden_states": np.asarray(cond.context, dtype=np.float32),
                                   "text_embeds": np.asarray(cond.pooled, dtype=np.float32),
                                   "time_ids": got_ids})["model_output"]
    with torch.no_grad():
        ref = c["unet"](x, t, encoder_hidden_states=torch.cat([pe, npe]),
                        added_cond_kwargs={"text_embeds": torch.cat([ppe, nppe]),
                                           "time_ids": torch.cat([ids, neg_ids])}).sample
    np.testing.assert_allclose(np.asarray(ours, dtype=np.float32), ref.numpy(), atol=1e-5, rtol=0)


def test_the_refiner_unet_exports_with_five_time_ids(engine):
    """export/: the refiner's UNet is a model like any other (its descriptor: text_embeds of the pooled width, 5
    time ids); the real refiner's config (bundled) gives 2560 = 1280 + 5 x 256, SDXL's 2816 = 1280 + 6 x 256."""
    from types import SimpleNamespace

    from engine.models.checkpoints import bundled_config
    from export.descriptors import describe, time_id_count

    rt = engine.runtime("tiny-sdxl-refiner")
    spec = {s.name: s.shape for s in describe("unet", rt.model.components).inputs}
    assert spec["time_ids"] == ("B", 5) and spec["text_embeds"] == ("B", 32) and spec["encoder_hidden_states"][2] == 32
    for name, count in (("sdxl_refiner.json", 5), ("sdxl_base.json", 6)):
        unet = bundled_config(name)["unet"]
        assert time_id_count(SimpleNamespace(**unet)) == count
    real = bundled_config("sdxl_refiner.json")
    assert real["unet"]["in_channels"] == 4 and real["unet"]["projection_class_embeddings_input_dim"] == 2560
    assert set(real) >= {"unet", "vae", "text_encoder_2"} and "text_encoder" not in real


def test_real_refiner_key_layout_is_detected():
    """The webui (sgm) refiner file: UNet + OpenCLIP-G as embedders.0 (no CLIP-L), headers only."""
    from engine.models.checkpoints import detect_arch

    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
              "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
              "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280),
              "conditioner.embedders.0.model.text_projection": (1280, 1280),
              "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)}
    assert detect_arch(shapes) is Arch.SDXL_REFINER
    base = {**shapes, "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
    for key in ("token_embedding.weight", "text_projection"):
        del base[f"conditioner.embedders.0.model.{key}"]
    assert detect_arch(base) is Arch.SDXL


def test_sdxl_embeddings_give_the_refiner_their_clip_g_part():
    """The webui's refiner (FrozenOpenCLIPEmbedder2, embedding_key "clip_g") takes an SDXL embedding's clip_g
    vectors; a one-tensor embedding of another width does not fit."""
    from engine.networks.embeddings import fit_to_model, fits

    vectors = {"clip_l": torch.ones(2, 768), "clip_g": torch.full((2, 1280), 2.0)}
    fitted = fit_to_model(vectors, {"text_encoder_2": 1280})
    assert set(fitted) == {"text_encoder_2"} and float(fitted["text_encoder_2"][0, 0]) == 2.0
    assert fits({k: tuple(v.shape) for k, v in vectors.items()}, {"text_encoder_2": 1280})
    assert fit_to_model({"": torch.ones(2, 768)}, {"text_encoder_2": 1280}) is None


def test_incompatible_refiner_and_hires_checkpoint_refused_naming_the_field(engine):
    with pytest.raises(InvalidRequest) as err:
        _run(engine, refiner=Refiner("tiny-sd1", 0.5))
    assert err.value.field == "refiner.checkpoint" and "sdxl_refiner" in err.value.allowed
    with pytest.raises(InvalidRequest) as err:
        _run(engine, hires=Hires(scale=2, steps=2, checkpoint="tiny-sd1"))
    assert err.value.field == "hires.checkpoint"
    with pytest.raises(ModelNotFound) as err:
        _run(engine, refiner=Refiner("no-such-model", 0.5))
    assert err.value.field == "refiner.checkpoint"


def test_hires_checkpoint_and_refiner_in_the_second_pass(engine):
    hr = Hires(scale=2, steps=4, denoising_strength=0.6)
    plain = _run(engine, hires=hr)
    same = _run(engine, hires=Hires(scale=2, steps=4, denoising_strength=0.6, checkpoint="tiny-sdxl"))
    assert np.array_equal(plain.images[0], same.images[0]) and same.infotexts == plain.infotexts
    other = _run(engine, hires=Hires(scale=2, steps=4, denoising_strength=0.6, checkpoint="tiny-sdxl-refiner"))
    assert np.abs(other.images[0].astype(int) - plain.images[0].astype(int)).mean() > 1.0
    short = engine.store.hash_of(engine.store.resolve("tiny-sdxl-refiner"))[:10]
    assert f"Hires checkpoint: tiny-sdxl-refiner [{short}]" in other.infotexts[0]
    # with the hires fix the refiner acts in the second pass only (webui hires_fix_refiner_pass "second pass")
    events = []
    refined = _run(engine, hires=hr, refiner=Refiner("tiny-sdxl-refiner", 0.0),
                   progress=lambda p: events.append((p.phase, p.detail, p.step)))
    switch = events.index(("encoding", "refiner", 8))  # after the first pass's 8 steps, at the hires pass's first
    assert ("encoding", "hires fix", 8) in events[:switch]
    assert "Refiner: tiny-sdxl-refiner" in refined.infotexts[0]
    assert not np.array_equal(refined.images[0], plain.images[0])


def test_cancel_across_the_switch(engine):
    k = _switch_step(engine, 0.5, 8)
    cancel = threading.Event()

    def progress(p):
        if p.phase == "sampling" and p.detail == "refiner" and p.step >= k + 1:
            cancel.set()

    with pytest.raises(Cancelled):
        _run(engine, progress=progress, cancel=cancel, refiner=Refiner("tiny-sdxl-refiner", 0.5))
    after = _run(engine, refiner=Refiner("tiny-sdxl-refiner", 0.5))  # the engine serves the next one
    assert "Refiner switch at: 0.5" in after.infotexts[0]


def test_memory_budget_counts_both_checkpoints(engine, store):
    """engine.admission: the refiner's weights are held beside the model's (engine.pipeline keeps both)."""
    from engine.admission import check_request
    from engine.memory import architecture_of, estimate_request

    config = engine.config
    arch, _ = architecture_of(engine.store.resolve("tiny-sdxl").path)
    refiner_arch, _ = architecture_of(engine.store.resolve("tiny-sdxl-refiner").path)
    alone = estimate_request(arch, 64, 64, 1, backend=config.backend.value, tiling=config.vae_tiling).total
    budget = alone + refiner_arch.weights_bytes // 2
    req = GenerationRequest(**{**BASE, "steps": 3})
    check_request(engine.store, config, req, budget)  # fits alone
    with pytest.raises(TooMuchMemory) as err:  # the refiner's fault: named
        check_request(engine.store, config, GenerationRequest(**{**BASE, "steps": 3},
                                                              refiner=Refiner("tiny-sdxl-refiner", 0.8)), budget)
    assert err.value.field == "refiner.checkpoint" and "held beside the model" in err.value.message
    with pytest.raises(InvalidRequest) as err:  # at submit, from the headers
        check_request(engine.store, config, GenerationRequest(**BASE, refiner=Refiner("tiny-sd1", 0.8)))
    assert err.value.field == "refiner.checkpoint"


def test_hires_checkpoint_with_controlnet_refused_at_submit(engine):
    """A hires checkpoint beside ControlNet units cannot run (the units' models belong to the request's
    checkpoint): engine.admission refuses it at submit naming hires.checkpoint, before any model is loaded; the
    same request without the hires checkpoint passes that check."""
    from engine.admission import check_request
    from engine.request import ControlNetUnit

    unit = ControlNetUnit(model="m", image=np.zeros((64, 64, 3), np.uint8), module="none")
    hires = dict(hires=Hires(scale=2.0, steps=2, denoising_strength=0.5, checkpoint="tiny-sdxl-refiner"))
    with pytest.raises(InvalidRequest) as err:
        check_request(engine.store, engine.config, GenerationRequest(**BASE, **hires, controlnet_units=(unit,)))
    assert err.value.field == "hires.checkpoint" and "ControlNet" in err.value.message
    check_request(engine.store, engine.config, GenerationRequest(**BASE, **hires))  # no units: allowed


# ------------------------------------------------------------------------------------------------ the API
# the API runs the torch backend here (no exports: cheap); the refiner on a backend of exported graphs is
# test_refiner_on_onnxruntime's
@pytest.fixture(scope="module")
def celery_worker(redis_server, store, cache, tmp_path_factory):  # noqa: F811
    pytest.importorskip("celery")
    root = tmp_path_factory.mktemp("refiner-queue")
    url = redis_server.url(5)
    worker = WorkerProcess(url, root / "results", root / "worker.log", "--models-dir", str(store), "--cache-dir",
                           str(cache), "--backend", "torch", "--visibility-timeout", "60").start()
    client = redis_server.client(5)
    worker.wait_ready(client)
    client.close()
    yield url, root / "results"
    worker.stop()


@pytest.fixture(params=["embedded", "celery"])
def service(request, store, cache, tmp_path):
    from api_compat import TaskService

    kw = dict(models_dir=store, cache_dir=cache, backend="torch", default_model="tiny-sdxl")
    if request.param == "celery":
        url, results = request.getfixturevalue("celery_worker")
        svc = TaskService(**kw, queue=url, results_dir=results)
    else:
        svc = TaskService(**kw, results_dir=tmp_path / "results")
    yield svc
    svc.close()


def test_api_both_faces_and_backends(service, engine):
    from fastapi.testclient import TestClient

    from api_compat import ApiError
    from api_compat.http import create_app

    payload = {"prompt": "a red cube", "negative_prompt": "blurry", "seed": 11, "steps": 8, "width": 64,
               "height": 64, "sampler_name": "Euler", "refiner_checkpoint": "tiny-sdxl-refiner",
               "refiner_switch_at": 0.5}
    task = service.sd_txt2img(payload)
    result = service.wait(task["taskId"], timeout=300)
    assert result["status"] == "succeeded", result.get("error")
    text = png_infotext(result["images"][0])
    assert "Refiner: tiny-sdxl-refiner [" in text and "Refiner switch at: 0.5" in text
    direct = _run(engine, refiner=Refiner("tiny-sdxl-refiner", 0.5))  # the same engine configuration
    assert np.array_equal(png_pixels(result["images"][0]), direct.images[0])
    with TestClient(create_app(service), base_url="http://localhost") as client:
        r = client.post("/sdapi/v1/txt2img", json={**payload, "enable_hr": True, "hr_scale": 2,
                                                   "hr_second_pass_steps": 2, "denoising_strength": 0.5,
                                                   "hr_checkpoint_name": "tiny-sdxl-refiner-diffusers",
                                                   "refiner_checkpoint": "None"})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert "Hires checkpoint: tiny-sdxl-refiner-diffusers [" in info["infotexts"][0]
        assert "Refiner:" not in info["infotexts"][0]
        r = client.post("/sdapi/v1/txt2img", json={**payload, "refiner_checkpoint": "tiny-sd1"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "refiner_checkpoint"
    with pytest.raises(ApiError) as err:  # refused at submit, nothing queued
        service.sd_txt2img({**payload, "enable_hr": True, "hr_checkpoint_name": "tiny-sd1"})
    assert err.value.field == "hr_checkpoint_name"


@pytest.mark.slow
def test_refiner_on_onnxruntime(engine, tmp_path_factory):
    """The refiner's text encoder and UNet exported like any model's (ONNX Runtime, the API's default backend):
    its conditioning (5 time ids) and UNet output equal torch's within 1e-4 (float32 graphs)."""
    from engine.backends import create_backend
    from engine.conditioning import encode_request
    from engine.config import EngineConfig

    rt = engine.runtime("tiny-sdxl-refiner")
    ort = create_backend(EngineConfig(backend="onnxruntime", cache_dir=tmp_path_factory.mktemp("refiner-onnx")),
                         rt.model.components, rt.model.family.artefact_key)
    conds = [encode_request(b, rt.model.family.text, ["a red cube"], [""], steps=1, width=64, height=64).at(0)
             for b in (rt.backend, ort)]
    for name in ("context", "pooled", "time_ids"):
        np.testing.assert_allclose(*(np.asarray(getattr(c, name), dtype=np.float32) for c in conds), atol=1e-4)
    c = conds[0]
    x = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    feeds = {"sample": x, "timestep": np.array([700.0, 700.0], dtype=np.float32),
             "encoder_hidden_states": np.asarray(c.context, dtype=np.float32),
             "text_embeds": np.asarray(c.pooled, dtype=np.float32), "time_ids": np.asarray(c.time_ids, np.float32)}
    outs = [np.asarray(b.run("unet", feeds)["model_output"], dtype=np.float32) for b in (rt.backend, ort)]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)
