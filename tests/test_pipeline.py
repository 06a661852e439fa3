"""The txt2img pipeline on the tiny models: backends against each other, the torch backend against diffusers'
own pipelines, seeds, batches, progress, cancellation and the info dict.

References and tolerances:
- onnxruntime backend vs torch backend: same request, images within 1/255 mean absolute difference.
- torch backend vs diffusers StableDiffusionPipeline / StableDiffusionXLPipeline with the same initial
  latents and the matching diffusers scheduler: within 2/255 mean absolute difference.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from core.errors import Cancelled, InvalidRequest
from engine.pipeline import Engine
from engine.request import GenerationRequest


@pytest.fixture(scope="module")
def engines(tiny_store, tmp_path_factory):
    cache = tmp_path_factory.mktemp("artefacts")
    made = {}

    def get(backend: str) -> Engine:
        if backend not in made:
            made[backend] = Engine(models_dir=tiny_store, backend=backend, cache_dir=cache)
        return made[backend]

    return get


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sd2v", "tiny-sdxl"])
def test_onnxruntime_matches_torch(engines, model):
    req = GenerationRequest(model=model, prompt="a red (circle:1.2), blue background", negative_prompt="green",
                            steps=6, seed=11, batch_size=2, sampler_name="DPM++ 2M", scheduler="Karras")
    ref = engines("torch").generate(req)
    ort = engines("onnxruntime").generate(req)
    assert len(ref.images) == len(ort.images) == 2
    for a, b in zip(ref.images, ort.images):
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert mad(a, b) <= 1.0, f"onnxruntime vs torch: mean abs diff {mad(a, b):.3f}/255 > 1/255"
    assert ref.seeds == ort.seeds == [11, 12]
    # the images differ between seeds: the test compares real content
    assert mad(ref.images[0], ref.images[1]) > 1.0


def _diffusers_sd_pipeline(model):
    from diffusers import StableDiffusionPipeline

    c = model.components
    return StableDiffusionPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
        scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _initial_noise(seeds, shape):
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return noise, gens


CASES = {
    # webui name, scheduler, diffusers scheduler factory
    "Euler": ("Euler", "Automatic"),
    "Euler a": ("Euler a", "Automatic"),
    "DPM++ 2M Karras": ("DPM++ 2M", "Karras"),
}


def _scheduler(case: str, model):
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    cfg = dict(model.scheduler_config)
    cfg.pop("_class_name", None)
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=model.prediction_type)
    if case == "Euler":
        return EulerDiscreteScheduler(**common, timestep_spacing="linspace")
    if case == "Euler a":
        return EulerAncestralDiscreteScheduler(**common, timestep_spacing="linspace")
    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
                                       final_sigmas_type="zero", lower_order_final=True, timestep_spacing="linspace")


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_matches_diffusers_sd1(engines, tiny_model_store, case):
    sampler, scheduler = CASES[case]
    steps, seeds, cfg = 8, [5, 6], 6.0
    prompt, negative = "a red circle", "blurry"
    engine = engines("torch")
    ours = engine.generate(GenerationRequest(model="tiny-sd1", prompt=prompt, negative_prompt=negative, steps=steps,
                                             seed=seeds[0], batch_size=2, cfg_scale=cfg, sampler_name=sampler,
                                             scheduler=scheduler))
    model = engine.runtime("tiny-sd1").model
    pipe = _diffusers_sd_pipeline(model)
    pipe.scheduler = _scheduler(case, model)
    noise, gens = _initial_noise(seeds, (4, 8, 8))
    from engine.samplers import resolve

    sigmas = resolve(sampler, scheduler).sigmas(steps, engine.runtime("tiny-sd1").model.family.schedule)
    kwargs = {}
    if case == "Euler":
        kwargs["sigmas"] = [float(s) for s in sigmas[:-1]]
    pipe.scheduler.set_timesteps(steps)
    # Euler schedulers work in sigma space (the pipeline multiplies latents by init_noise_sigma);
    # DPMSolverMultistepScheduler works in variance-preserving space: x / sqrt(sigma^2 + 1), init_noise_sigma 1
    vp = case == "DPM++ 2M Karras"
    scale = float(np.sqrt(sigmas[0] ** 2 + 1)) if vp else float(pipe.scheduler.init_noise_sigma)
    latents = noise * float(sigmas[0]) / scale
    with torch.no_grad():
        out = pipe(prompt=[prompt] * 2, negative_prompt=[negative] * 2, num_inference_steps=steps,
                   guidance_scale=cfg, latents=latents, generator=gens, output_type="np", **kwargs).images
    theirs = [np.round(np.clip(img, 0, 1) * 255).astype(np.uint8) for img in out]
    for a, b in zip(ours.images, theirs):
        assert mad(a, b) <= 2.0, f"{case}: torch backend vs diffusers mean abs diff {mad(a, b):.3f}/255 > 2/255"


def test_batch_n_iter_seeds_progress_and_info(engines):
    calls = []
    req = GenerationRequest(model="tiny-sd1", prompt="x", steps=3, seed=100, batch_size=2, n_iter=2,
                            sampler_name="Euler")
    res = engines("torch").generate(req, progress=lambda i, n: calls.append((i, n)))
    assert res.seeds == [100, 101, 102, 103] and len(res.images) == 4
    assert calls[-1] == (6, 6) and [c[0] for c in calls] == list(range(1, 7))
    info = res.info
    for key in ("prompt", "negative_prompt", "seed", "all_seeds", "subseed", "all_subseeds", "width", "height",
                "sampler_name", "scheduler", "cfg_scale", "steps", "batch_size", "clip_skip", "sd_model_name",
                "sd_model_hash", "sd_vae_name", "infotexts", "backend", "timings"):
        assert key in info, key
    assert info["all_seeds"] == [100, 101, 102, 103] and info["sd_model_name"] == "tiny-sd1"
    assert "Seed: 102" in res.infotexts[2] and "Size: 64x64" in res.infotexts[0]
    assert {"text_encoder", "sampling", "vae_decoder"} <= set(info["timings"])
    # the same seed gives the same image, in a batch or alone (per-image generators, webui CPU RNG)
    alone = engines("torch").generate(GenerationRequest(model="tiny-sd1", prompt="x", steps=3, seed=102,
                                                        sampler_name="Euler"))
    assert mad(alone.images[0], res.images[2]) <= 0.5


def test_n_iter_images_are_handed_on_per_iteration(engines):
    """With ``on_images`` (what the task writer passes), each iteration's images arrive as soon as they are decoded,
    before the next iteration samples, with their infotexts; the result holds no image, and the images and
    infotexts are exactly those of the call without it (issue 31: finished images must not pile up)."""
    req = GenerationRequest(model="tiny-sd1", prompt="x", steps=2, seed=7, batch_size=2, n_iter=3,
                            sampler_name="Euler")
    whole = engines("torch").generate(req)
    steps, got = [], []

    def progress(event):
        if event.phase == "sampling":
            steps.append(event.step)

    res = engines("torch").generate(req, progress=progress,
                                    on_images=lambda first, images, texts: got.append((first, images, texts,
                                                                                      max(steps))))
    assert res.images == [] and res.infotexts == whole.infotexts and res.seeds == whole.seeds
    assert [(first, len(images), done) for first, images, _, done in got] == [(0, 2, 2), (2, 2, 4), (4, 2, 6)]
    streamed = [img for _, images, _, _ in got for img in images]
    assert all(np.array_equal(a, b) for a, b in zip(streamed, whole.images)) and len(streamed) == 6
    assert [t for _, _, texts, _ in got for t in texts] == whole.infotexts


def test_cancel_inside_a_tiled_vae_decode(engines):
    """A cancel set while a tiled VAE decode runs stops it at the next tile (engine.tiling's check), not after
    the whole image: the real tiny VAE over 8x8 tiles of a 16x16 latent (9 tiles), counted."""
    from engine.tiling import decode

    engine = engines("torch")
    rt = engine.runtime("tiny-sd1")
    cancel = threading.Event()
    calls = []

    def run(component, feeds):
        calls.append(component)
        if len(calls) == 2:
            cancel.set()  # as a client's cancel (or --max-task-seconds) arriving during the second tile
        return rt.backend.run(component, feeds)

    def check():
        if cancel.is_set():
            raise Cancelled("generation cancelled")

    from engine.tiling import VaeTiling

    latent = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    tiling = VaeTiling(tile=8, overlap=2, above_px=64)
    assert decode(rt.backend.run, latent, tiling).shape == (1, 3, 128, 128)
    with pytest.raises(Cancelled):
        decode(run, latent, tiling, check)
    assert calls == ["vae_decoder"] * 2  # of 9 tiles


def test_random_seed_is_reported(engines):
    res = engines("torch").generate(GenerationRequest(model="tiny-sd1", steps=1, seed=-1, sampler_name="Euler"))
    assert 0 <= res.seeds[0] < 4294967294 and f"Seed: {res.seeds[0]}," in res.infotexts[0]


def test_cancel_between_steps(engines):
    cancel = threading.Event()

    def progress(i, n):
        if i == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        engines("torch").generate(GenerationRequest(model="tiny-sd1", steps=10, seed=1, sampler_name="Euler"),
                                  progress=progress, cancel=cancel)


def test_bad_size_and_unknown_sampler(engines):
    with pytest.raises(InvalidRequest, match="width"):
        engines("torch").generate(GenerationRequest(model="tiny-sd1", width=72, steps=1))
    with pytest.raises(InvalidRequest, match="sampler_name"):
        engines("torch").generate(GenerationRequest(model="tiny-sd1", sampler_name="Nope", steps=1))


def test_controlnet_unit_changes_image_and_is_reported(engines):
    from engine.request import ControlNetUnit

    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = 255
    base = GenerationRequest(model="tiny-sd1", prompt="a square", steps=4, seed=3, sampler_name="Euler")
    unit = ControlNetUnit(model="tiny-controlnet-sd1", image=img, module="canny", weight=1.5,
                          save_detected_map=True)
    plain = engines("torch").generate(base)
    import dataclasses

    ctrl = engines("torch").generate(dataclasses.replace(base, controlnet_units=(unit,)))
    ctrl_ort = engines("onnxruntime").generate(dataclasses.replace(base, controlnet_units=(unit,)))
    assert mad(plain.images[0], ctrl.images[0]) > 0.5, "the ControlNet unit did not change the image"
    assert mad(ctrl.images[0], ctrl_ort.images[0]) <= 1.0
    assert "ControlNet 0: \"Module: canny, Model: tiny-controlnet-sd1" in ctrl.infotexts[0]
    assert len(ctrl.detected_maps) == 1 and ctrl.detected_maps[0].shape == (64, 64, 3)
    # a unit outside its guidance window runs no ControlNet at all: same image as without
    off = dataclasses.replace(unit, guidance_start=1.0, guidance_end=1.0)
    late = engines("torch").generate(dataclasses.replace(base, controlnet_units=(off,), steps=4))
    assert mad(plain.images[0], late.images[0]) == 0.0
