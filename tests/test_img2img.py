"""img2img, inpainting and the hires fix through the real pipeline (tiny models, torch backend).

References and tolerances:
- img2img vs diffusers ``StableDiffusionImg2ImgPipeline`` (same init latents given as 4-channel ``image``, the
  same per-image noise generators, EulerDiscreteScheduler / EulerAncestralDiscreteScheduler on our sigmas):
  within 2/255 mean absolute difference. Strength mapping: the webui runs the last ``int(s * steps) + 1`` of
  ``steps`` steps, diffusers the last ``int(s' * steps)``: s' = (int(s * steps) + 1) / steps.
- inpainting vs a reference written here from the webui rules (encode the init image, latent mask from the mask
  resized to the latent and rounded, x = init + noise * sigma_0, Euler where every prediction is blended
  ``init * (1 - nmask) + nmask * denoised``, the same blend after the last step, decode, the original pixels
  pasted over the kept region): within 2/255 mean absolute difference; kept pixels equal exactly.
- resize modes: against PIL computations of the webui's images.resize_image (exact).
- hires fix: the first pass equals plain txt2img's latent bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import InvalidRequest
from engine.img2img import prepare_init, resize_image, upscale_latent
from engine.pipeline import Engine
from engine.request import GenerationRequest, Hires, InitImage

MODEL = "tiny-sd1"


@pytest.fixture(scope="module")
def engine(tiny_store, tmp_path_factory):
    return Engine(models_dir=tiny_store, backend="torch", cache_dir=tmp_path_factory.mktemp("artefacts"))


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful test image (gradients and a disc), so that resizes and VAEs act on structure."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.RandomState(seed)
    a, b, c = rng.uniform(0.5, 2.0, 3)
    img = np.stack([127 + 120 * np.sin(x / w * 3 * a), 127 + 120 * np.cos(y / h * 3 * b),
                    127 + 120 * np.sin((x + y) / (w + h) * 4 * c)], axis=-1)
    disc = (x - w * 0.6) ** 2 + (y - h * 0.4) ** 2 < (min(h, w) * 0.2) ** 2
    img[disc] = (230, 30, 30)
    return img.clip(0, 255).astype(np.uint8)


def encode_reference(vae, image: np.ndarray) -> torch.Tensor:
    """diffusers: the posterior mean of the VAE for an (H, W, 3) uint8 image, times the scaling factor."""
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


# ---------------------------------------------------------------------------------------- img2img vs diffusers
@pytest.mark.parametrize("sampler", ["Euler", "Euler a"])
def test_img2img_matches_diffusers(engine, sampler):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    steps, strength, seeds, cfg = 8, 0.75, [5, 6], 6.0
    prompt, negative = "a red circle", "blurry"
    init = smooth_image(64, 64)
    ours = engine.generate(GenerationRequest(model=MODEL, prompt=prompt, negative_prompt=negative, steps=steps,
                                             seed=seeds[0], batch_size=2, cfg_scale=cfg, sampler_name=sampler,
                                             init=InitImage(init, strength)))
    model = engine.runtime(MODEL).model
    c = model.components
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=model.prediction_type, timestep_spacing="linspace")
    scheduler = (EulerDiscreteScheduler if sampler == "Euler" else EulerAncestralDiscreteScheduler)(**common)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"], scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    latents = encode_reference(c["vae"], init).repeat(2, 1, 1, 1)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    diffusers_strength = (int(strength * steps) + 1) / steps  # the webui's t_enc + 1 steps of `steps`
    kwargs = {}
    if sampler == "Euler":  # diffusers' Euler takes explicit sigmas; ours are the model's (Uniform) ones
        from engine.samplers import resolve

        sigmas = resolve(sampler).sigmas(steps, model.family.schedule)
        kwargs["sigmas"] = [float(s) for s in sigmas[:-1]]
    with torch.no_grad():
        out = pipe(prompt=[prompt] * 2, negative_prompt=[negative] * 2, image=latents, strength=diffusers_strength,
                   num_inference_steps=steps, guidance_scale=cfg, generator=gens, output_type="np", **kwargs).images
    theirs = [np.round(np.clip(img, 0, 1) * 255).astype(np.uint8) for img in out]
    for a, b in zip(ours.images, theirs):
        assert mad(a, b) <= 2.0, f"{sampler}: img2img vs diffusers mean abs diff {mad(a, b):.3f}/255 > 2/255"
    # the result depends on the init image (the tiny random VAE maps most inputs near one image: not equal)
    other = engine.generate(GenerationRequest(model=MODEL, prompt=prompt, negative_prompt=negative, steps=steps,
                                              seed=seeds[0], cfg_scale=cfg, sampler_name=sampler,
                                              init=InitImage(255 - init, strength)))
    assert not np.array_equal(other.images[0], ours.images[0])
    assert "Denoising strength: 0.75" in ours.infotexts[0] and "Steps: 8" in ours.infotexts[0]


def test_img2img_steps_follow_the_webui(engine):
    """steps x strength: int(0.5 * 10) + 1 = 6 steps; img2img_fix_steps: exactly 10."""
    calls = []
    init = InitImage(smooth_image(64, 64), 0.5)
    engine.generate(GenerationRequest(model=MODEL, prompt="x", steps=10, seed=1, sampler_name="Euler", init=init),
                    progress=lambda i, n: calls.append(n))
    assert calls[-1] == 6
    calls.clear()
    fixed = InitImage(smooth_image(64, 64), 0.5, fix_steps=True)
    engine.generate(GenerationRequest(model=MODEL, prompt="x", steps=10, seed=1, sampler_name="Euler", init=fixed),
                    progress=lambda i, n: calls.append(n))
    assert calls[-1] == 10


def test_img2img_is_deterministic_and_refuses_timestep_samplers(engine):
    req = GenerationRequest(model=MODEL, prompt="a cat", steps=6, seed=3, sampler_name="DPM++ 2M SDE",
                            init=InitImage(smooth_image(64, 64), 0.6, initial_noise_multiplier=0.9))
    a, b = engine.generate(req), engine.generate(req)
    assert np.array_equal(a.images[0], b.images[0])
    assert "Noise multiplier: 0.9" in a.infotexts[0]
    with pytest.raises(InvalidRequest) as exc:
        engine.generate(GenerationRequest(model=MODEL, prompt="a cat", steps=6, seed=3, sampler_name="DDIM",
                                          init=InitImage(smooth_image(64, 64), 0.6)))
    assert exc.value.field == "sampler_name" and "Euler a" in exc.value.allowed


# ---------------------------------------------------------------------------------------- inpainting
def test_inpainting_matches_the_webui_rules(engine):
    from engine.schedule import SD_SCHEDULER, alphas_cumprod

    steps, strength, seed, cfg = 6, 0.8, 21, 5.0
    prompt, negative = "a blue square", ""
    init = smooth_image(64, 64, seed=2)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 24:56] = 255
    ours = engine.generate(GenerationRequest(
        model=MODEL, prompt=prompt, negative_prompt=negative, steps=steps, seed=seed, cfg_scale=cfg,
        sampler_name="Euler", init=InitImage(init, strength, mask=mask, mask_blur_x=0, mask_blur_y=0,
                                             inpainting_fill=1, inpaint_full_res=False)))

    # the reference, from the webui rules, on the diffusers modules
    model = engine.runtime(MODEL).model
    c = model.components
    init_latent = encode_reference(c["vae"], init)
    h, w = init_latent.shape[2:]
    latmask = np.asarray(Image.fromarray(mask).convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / 255
    nmask = torch.from_numpy(np.around(latmask))[None, None].expand_as(init_latent)
    keep = 1.0 - nmask
    ac = alphas_cumprod(SD_SCHEDULER)
    train_sigmas = ((1 - ac) / ac) ** 0.5
    log_sigmas = np.log(train_sigmas)
    t_enc = int(strength * steps)
    # k-diffusion get_sigmas: t evenly from 999 to 0, sigma interpolated in log space
    full = np.exp(np.interp(np.linspace(999, 0, steps), np.arange(1000), log_sigmas))
    full = np.append(full, 0.0)
    sigmas = full[steps - t_enc - 1:]
    tok = c["tokenizer"]

    def embed(text):
        ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return c["text_encoder"](ids)[0]

    context = torch.cat([embed(negative), embed(prompt)])

    def denoise(x, sigma):
        t = float(np.interp(np.log(sigma), log_sigmas, np.arange(1000)))
        x_in = torch.cat([x, x]) / (sigma ** 2 + 1) ** 0.5
        with torch.no_grad():
            eps = c["unet"](x_in, torch.tensor([t, t], dtype=torch.float32), context).sample
        uncond, cond = (torch.cat([x, x]) - eps * sigma).chunk(2)
        denoised = uncond + (cond - uncond) * cfg
        return init_latent * keep + nmask * denoised

    noise = torch.randn((4, h, w), generator=torch.Generator("cpu").manual_seed(seed))[None]
    x = init_latent + noise * float(sigmas[0])
    for i in range(len(sigmas) - 1):
        d = (x - denoise(x, float(sigmas[i]))) / float(sigmas[i])
        x = x + d * float(sigmas[i + 1] - sigmas[i])
    x = x * nmask + init_latent * keep
    with torch.no_grad():
        decoded = c["vae"].decode(x / c["vae"].config.scaling_factor).sample
    ref = np.round(((decoded[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1) * 255).astype(np.uint8)
    overlay = mask == 0  # mask_for_overlay = mask * 2 (hard mask): the original where the mask is 0
    ref[overlay] = init[overlay]

    img = ours.images[0]
    assert np.array_equal(img[overlay], init[overlay]), "kept pixels must be the init image's"
    assert mad(img, ref) <= 2.0, f"inpainting vs webui-rule reference: {mad(img, ref):.3f}/255 > 2/255"
    assert mad(img[~overlay], init[~overlay]) > 2.0, "the masked region must be repainted"


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpainting_fills_and_only_masked(engine, fill):
    init = smooth_image(48, 96)
    mask = np.zeros((48, 96), np.uint8)
    mask[10:30, 50:80] = 255
    req = dict(model=MODEL, prompt="a cat", steps=4, seed=2, sampler_name="Euler a", width=64, height=64)
    res = engine.generate(GenerationRequest(**req, init=InitImage(init, 0.75, mask=mask, inpainting_fill=fill,
                                                                   inpaint_full_res=True, inpaint_full_res_padding=4)))
    img = res.images[0]
    assert img.shape == init.shape, "only masked: the result is the init image's size, the region pasted back"
    far = np.ones((48, 96), bool)
    far[0:40, 38:92] = False  # the padded, blurred, aspect-grown region around the mask
    assert np.array_equal(img[far], init[far])
    assert mad(img[10:30, 50:80], init[10:30, 50:80]) > 2.0
    text = res.infotexts[0]
    assert "Inpaint area: Only masked" in text and "Masked area padding: 4" in text
    label = {0: "fill", 2: "latent noise", 3: "latent nothing"}.get(fill)
    assert (f"Masked content: {label}" in text) if label else "Masked content" not in text


def test_inverted_mask_keeps_the_masked_region(engine):
    init = smooth_image(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    res = engine.generate(GenerationRequest(model=MODEL, prompt="x", steps=4, seed=2, sampler_name="Euler",
                                            init=InitImage(init, 0.75, mask=mask, inpainting_mask_invert=True,
                                                           mask_blur_x=0, mask_blur_y=0, inpaint_full_res=False)))
    img = res.images[0]
    assert np.array_equal(img[16:48, 16:48], init[16:48, 16:48])
    assert mad(img[:8], init[:8]) > 2.0


# ---------------------------------------------------------------------------------------- resize modes
def test_resize_modes_on_other_aspect_ratios():
    """The webui's four modes for an 96x48 image into 64x64 (and a 48x96 one), against PIL directly."""
    wide = smooth_image(48, 96)
    lanczos = Image.Resampling.LANCZOS
    pil = Image.fromarray(wide)
    # 0 Just resize: stretched
    out = np.asarray(resize_image(0, pil, 64, 64))
    assert np.array_equal(out, np.asarray(pil.resize((64, 64), resample=lanczos)))
    # 1 Crop and resize: scaled to cover (128x64), centre-cropped
    scaled = np.asarray(pil.resize((128, 64), resample=lanczos))
    assert np.array_equal(np.asarray(resize_image(1, pil, 64, 64)), scaled[:, 32:96])
    # 2 Resize and fill: scaled to fit (64x32), centred, the borders stretched from the first/last rows
    fit = np.asarray(pil.resize((64, 32), resample=lanczos))
    out = np.asarray(resize_image(2, pil, 64, 64))
    assert np.array_equal(out[16:48], fit)
    # the borders: one row stretched from the fitted image's top/bottom edge (PIL's zero-height box resample)
    assert (out[:16] == out[:1]).all() and (out[48:] == out[48:49]).all()
    assert np.abs(out[:16].astype(int) - fit[:1].astype(int)).max() <= 3
    assert np.abs(out[48:].astype(int) - fit[-1:].astype(int)).max() <= 3
    tall = Image.fromarray(smooth_image(96, 48))
    out = np.asarray(resize_image(2, tall, 64, 64))
    assert np.array_equal(out[:, 16:48], np.asarray(tall.resize((32, 64), resample=lanczos)))
    # 3 Just resize (latent upscale): the image is encoded at its own size
    plan = prepare_init(InitImage(wide, 0.5, resize_mode=3), 64, 64)
    assert plan.pixels.shape == (1, 3, 48, 96) and plan.resize_latent and plan.latent_size == (8, 8)


def test_all_resize_modes_through_the_engine(engine):
    init = smooth_image(48, 96)
    images = []
    for mode in range(4):
        req = GenerationRequest(model=MODEL, prompt="a cat", steps=4, seed=2, sampler_name="Euler", width=64,
                                height=64, init=InitImage(init, 0.3, resize_mode=mode))
        a, b = engine.generate(req), engine.generate(req)
        assert a.images[0].shape == (64, 64, 3) and np.array_equal(a.images[0], b.images[0])
        images.append(a.images[0])
    for i in range(4):
        for j in range(i + 1, 4):
            assert mad(images[i], images[j]) > 0.5, f"resize modes {i} and {j} gave the same image"


def test_latent_upscale_mode_resizes_the_encoded_latent(engine):
    """Mode 3: the latent of the image at its own size, resized bilinearly to the generation's latent."""
    from engine.img2img import upscale_latent

    rt = engine.runtime(MODEL)
    init = smooth_image(48, 96)
    source = engine._init_latents(request_context(
        rt, GenerationRequest(model=MODEL, init=InitImage(init, 0.5, resize_mode=3)), 64, 64, [1]))
    own = encode_reference(rt.model.components["vae"], init).numpy()
    expected = upscale_latent(own, 8, 8, "Latent")
    assert np.abs(np.asarray(source.latent) - expected).max() < 1e-4


def request_context(rt, req, width, height, seeds):
    from engine.pipeline import _Context, _Timer
    from engine.progress import ProgressReporter

    return _Context(req, rt, ProgressReporter(None, None, 1), _Timer(), width, height, seeds=seeds)


# ---------------------------------------------------------------------------------------- hires fix
class _Recorder:
    """Wraps a runtime's backend to record every VAE decoder input."""

    def __init__(self, engine):
        self.rt = engine.runtime(MODEL)
        self.inner = self.rt.backend
        self.latents = []

    def __enter__(self):
        outer = self

        class Spy:
            def run(self, component, feeds):
                if component == "vae_decoder":
                    outer.latents.append(np.array(feeds["latent"]))
                return outer.inner.run(component, feeds)

            def has(self, component):
                return outer.inner.has(component)

            def __getattr__(self, name):  # descriptors, labels, ...: the wrapped backend's
                return getattr(outer.inner, name)

        self.rt.backend = Spy()
        return self

    def __exit__(self, *exc):
        self.rt.backend = self.inner


def test_hires_first_pass_is_plain_txt2img_and_second_pass_at_2x(engine):
    base = dict(model=MODEL, prompt="a red circle", negative_prompt="blurry", steps=5, seed=7, cfg_scale=6.0,
                sampler_name="Euler a", batch_size=2)
    with _Recorder(engine) as plain:
        txt = engine.generate(GenerationRequest(**base))
    with _Recorder(engine) as hires:
        res = engine.generate(GenerationRequest(**base, hires=Hires(2.0, upscaler="Nearest", steps=3,
                                                                     denoising_strength=0.6)))
    # the image upscaler decodes the first pass: that latent is plain txt2img's, bit for bit
    assert np.array_equal(hires.latents[0], plain.latents[0])
    assert hires.latents[1].shape == (2, 4, 16, 16)
    assert txt.images[0].shape == (64, 64, 3) and res.images[0].shape == (128, 128, 3)
    text = res.infotexts[0]
    for field in ("Hires upscale: 2", "Hires steps: 3", "Hires upscaler: Nearest", "Denoising strength: 0.6",
                  "Size: 64x64", "Steps: 5"):
        assert field in text, (field, text)
    assert res.info["width"] == 64 and res.info["denoising_strength"] == 0.6


def test_hires_at_denoising_strength_0_decodes_the_upscaled_first_pass(engine):
    """The webui's setup_img2img_steps at strength 0 gives the hires pass 0 steps and sigmas [0]: the upscaled
    latent is decoded as it is (the webui's own API test sends enable_hr with denoising_strength 0)."""
    base = dict(model=MODEL, prompt="a red circle", steps=3, seed=5, sampler_name="Euler a")
    with _Recorder(engine) as plain:
        engine.generate(GenerationRequest(**base))
    with _Recorder(engine) as hires:
        res = engine.generate(GenerationRequest(**base, hires=Hires(2.0, upscaler="Latent (nearest)",
                                                                     denoising_strength=0.0)))
    expected = upscale_latent(plain.latents[0], 16, 16, "Latent (nearest)")
    assert np.array_equal(hires.latents[-1], expected)
    assert res.images[0].shape == (128, 128, 3) and "Denoising strength: 0," in res.infotexts[0]


def test_hires_latent_first_pass_is_plain_txt2img(engine, monkeypatch):
    base = dict(model=MODEL, prompt="a red circle", steps=4, seed=3, sampler_name="DPM++ 2M", scheduler="Karras")
    with _Recorder(engine) as plain:
        engine.generate(GenerationRequest(**base))
    seen = []
    original = Engine._hires_pass

    def spy(self, ctx, latents, *args):
        seen.append(np.array(latents))
        return original(self, ctx, latents, *args)

    monkeypatch.setattr(Engine, "_hires_pass", spy)
    res = engine.generate(GenerationRequest(**base, hires=Hires(1.5, upscaler="Latent")))
    assert np.array_equal(seen[0], plain.latents[0])
    assert res.images[0].shape == (96, 96, 3)
    assert "Hires upscaler: Latent" in res.infotexts[0]
    # not given: the same "Latent" pass, and the webui leaves the field out of the infotext
    unset = engine.generate(GenerationRequest(**base, hires=Hires(1.5)))
    assert np.array_equal(unset.images[0], res.images[0])
    assert "Hires upscaler" not in unset.infotexts[0] and "Hires upscale: 1.5" in unset.infotexts[0]


def test_hires_upscalers_differ_and_are_deterministic(engine):
    def run(upscaler):
        req = GenerationRequest(model=MODEL, prompt="a red circle", steps=4, seed=11, sampler_name="Euler",
                                hires=Hires(2.0, upscaler=upscaler, steps=2, denoising_strength=0.5))
        return engine.generate(req).images[0]

    latent, latent2 = run("Latent"), run("Latent")
    lanczos, lanczos2 = run("Lanczos"), run("Lanczos")
    assert np.array_equal(latent, latent2) and np.array_equal(lanczos, lanczos2)
    assert mad(latent, lanczos) > 1.0
    assert mad(run("Latent (nearest)"), latent) > 0.2


def test_hires_resize_and_sampler_fields(engine):
    req = GenerationRequest(model=MODEL, prompt="a red circle", steps=4, seed=11, sampler_name="Euler",
                            hires=Hires(upscaler="Latent (bicubic antialiased)", resize_x=128, resize_y=96,
                                        sampler_name="Euler a", prompt="a blue circle", cfg_scale=3.0))
    res = engine.generate(req)
    # 64x64 to 128x96: upscaled to 128x128, the latent cut to 16x12
    assert res.images[0].shape == (96, 128, 3)
    text = res.infotexts[0]
    for field in ("Hires resize: 128x96", "Hires sampler: Euler a", "Hires prompt: a blue circle",
                  "Hires CFG Scale: 3", "Hires upscaler: Latent (bicubic antialiased)"):
        assert field in text, (field, text)


def test_hires_size_limit_names_the_field(tiny_store, tmp_path):
    small = Engine(models_dir=tiny_store, backend="torch", cache_dir=tmp_path, max_size=96)
    with pytest.raises(InvalidRequest) as exc:
        small.generate(GenerationRequest(model=MODEL, prompt="x", steps=2, seed=1, hires=Hires(2.0)))
    assert exc.value.field == "hires.scale" and "at most 1.5 for 64x64" in exc.value.allowed
    with pytest.raises(InvalidRequest) as exc:
        small.generate(GenerationRequest(model=MODEL, prompt="x", steps=2, seed=1, hires=Hires(resize_x=256)))
    assert exc.value.field == "hires.resize_x"


def test_cli_img2img(tmp_path, tiny_store):
    """`sdengine img2img` on the real engine (tiny-sd1): an init image file, a mask, flags; errors name the field."""
    import shutil

    from click.testing import CliRunner

    from cli import main
    from tests.api_support import png_infotext, png_pixels

    models = tmp_path / "m" / "Stable-diffusion"
    models.mkdir(parents=True)
    shutil.copyfile(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors", models / "tiny-sd1.safetensors")
    init = smooth_image(48, 96)
    Image.fromarray(init).save(tmp_path / "in.png")
    mask = np.zeros((48, 96), np.uint8)
    mask[8:40, 40:88] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = ["img2img", "--models-dir", str(tmp_path / "m"), "--results-dir", str(tmp_path / "r"), "--model",
            "tiny-sd1", "--backend", "torch", "--steps", "4", "--seed", "3", "--width", "64", "--height", "64",
            "--init-image",
            str(tmp_path / "in.png")]
    runner = CliRunner()
    r = runner.invoke(main, base + ["--denoising-strength", "0.5", "--resize-mode", "Crop and resize",
                                    "-o", str(tmp_path / "out.png")])
    assert r.exit_code == 0, r.output
    text = png_infotext(tmp_path / "out.png")
    assert "Denoising strength: 0.5" in text and "Size: 64x64" in text
    assert png_pixels(tmp_path / "out.png").shape == (64, 64, 3)
    r = runner.invoke(main, base + ["--mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "inpaint.png")])
    assert r.exit_code == 0, r.output
    out = png_pixels(tmp_path / "inpaint.png")
    assert out.shape == (48, 96, 3) and "Inpaint area: Only masked" in png_infotext(tmp_path / "inpaint.png")
    r = runner.invoke(main, base + ["--denoising-strength", "1.5"])
    assert r.exit_code == 1 and "denoising_strength" in r.output
