"""IP-Adapter through ControlNet units (engine.ip_adapter, export.ip_adapter).

Models: the tiny SD1 / SDXL models, tiny ``CLIPVisionModelWithProjection`` encoders (ViT-H role: 32 wide, projection
24; ViT-bigG role: 48 wide, projection 40) and adapters with random weights in the h94 file layouts (plain:
``image_proj.proj`` / ``norm``; plus: the Resampler's ``latents``, ``proj_in``, ``layers.i.0/1``, ...; ``ip_adapter``
``{2i+1}.to_k_ip`` / ``to_v_ip``), as safetensors and as a ``.bin`` pickle of the two dicts, placed where the webui
keeps them (``models/ControlNet``, ``models/clip_vision/CLIP-ViT-H-14.safetensors``, the extension's
``annotator/downloads/clip_vision/clip_g.pth``).

References and tolerances:
- the UNet output with the units vs diffusers' pipeline after ``load_ip_adapter`` (IPAdapterAttnProcessor2_0, its
  image projection, its ``prepare_ip_adapter_image_embeds`` with classifier-free guidance and its
  ``CLIPImageProcessor``), the same UNet weights, sample, timestep and text: relative L2 <= 1e-5 (float32; the same
  attention written as one batched softmax over the units);
- the CLIP preprocessing vs transformers' ``CLIPImageProcessor``: exactly equal (both PIL bicubic);
- weight 0 vs no unit: identical images (the plain UNet runs); several images in one unit: the mean of the
  single images' tokens (the extension's ``ImageEmbed.average_of``) to 1e-6.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import InvalidRequest, ModelError
from engine.ip_adapter import IPAdapters, IPInjection, clip_pixels, read_adapter
from engine.pipeline import Engine
from engine.request import ControlNetUnit, GenerationRequest
from export.ip_adapter import cross_attention_layers, parse_variant, variant_name

H = dict(hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=2, num_attention_heads=1,
         image_size=32, patch_size=8)
G = dict(hidden_size=48, intermediate_size=96, projection_dim=40, num_hidden_layers=2, num_attention_heads=1,
         image_size=32, patch_size=8)


def encoder(cfg: dict, seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg, hidden_act="gelu", layer_norm_eps=1e-5)).eval()


def adapter_state(unet, clip_dim: int, seed: int, plus: bool = False, full: bool = False) -> dict:
    """An adapter's ``{"image_proj": ..., "ip_adapter": ...}`` with random weights in the h94 layout for ``unet``
    (``full``: the full-face projection ``proj.0`` Linear, GELU, ``proj.2`` Linear, ``proj.3`` LayerNorm)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, base=0.0):
        return (base + torch.randn(*shape, generator=g) * 0.2).contiguous()

    cross = unet.config.cross_attention_dim
    if full:  # ip-adapter-full-face_sd15: MLPProjModel over every penultimate hidden state
        proj = {"proj.0.weight": r(clip_dim, clip_dim), "proj.0.bias": r(clip_dim), "proj.2.weight": r(cross, clip_dim),
                "proj.2.bias": r(cross), "proj.3.weight": r(cross, base=1.0), "proj.3.bias": r(cross)}
    elif plus:  # the h94 Resampler: depth 4, dim_head 64, ff_mult 4
        dim, inner, tokens = 48, 64, 16
        proj = {"latents": r(1, tokens, dim), "proj_in.weight": r(dim, clip_dim), "proj_in.bias": r(dim),
                "proj_out.weight": r(cross, dim), "proj_out.bias": r(cross), "norm_out.weight": r(cross, base=1.0),
                "norm_out.bias": r(cross)}
        for i in range(4):
            proj.update({f"layers.{i}.0.norm1.weight": r(dim, base=1.0), f"layers.{i}.0.norm1.bias": r(dim),
                         f"layers.{i}.0.norm2.weight": r(dim, base=1.0), f"layers.{i}.0.norm2.bias": r(dim),
                         f"layers.{i}.0.to_q.weight": r(inner, dim), f"layers.{i}.0.to_kv.weight": r(2 * inner, dim),
                         f"layers.{i}.0.to_out.weight": r(dim, inner),
                         f"layers.{i}.1.0.weight": r(dim, base=1.0), f"layers.{i}.1.0.bias": r(dim),
                         f"layers.{i}.1.1.weight": r(4 * dim, dim), f"layers.{i}.1.3.weight": r(dim, 4 * dim)})
    else:
        proj = {"proj.weight": r(4 * cross, clip_dim), "proj.bias": r(4 * cross),
                "norm.weight": r(cross, base=1.0), "norm.bias": r(cross)}
    ip = {}
    for i, attn in enumerate(cross_attention_layers(unet)):
        ip[f"{2 * i + 1}.to_k_ip.weight"] = r(attn.to_k.out_features, cross)
        ip[f"{2 * i + 1}.to_v_ip.weight"] = r(attn.to_k.out_features, cross)
    return {"image_proj": proj, "ip_adapter": ip}


def save_adapter(state: dict, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({f"{part}.{k}": v for part, d in state.items() for k, v in d.items()}, str(path))
    else:
        torch.save(state, path)


def picture(seed: int, h: int = 48, w: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([(x * 255 // w + 40 * seed) % 256, y * 255 // h, np.full_like(x, 30 * seed)], -1)
    return np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)


ADAPTERS = {  # name -> (family, encoder role, plus ("full": full-face), seed)
    "ip-adapter_sd15.safetensors": ("sd1", "h", False, 11),
    "ip-adapter-full-face_sd15.safetensors": ("sd1", "h", "full", 16),
    "ip-adapter-plus_sd15.bin": ("sd1", "h", True, 12),
    "ip-adapter-plus-face_sd15.safetensors": ("sd1", "h", True, 13),
    "ip-adapter_sdxl.safetensors": ("sdxl", "g", False, 14),
    "ip-adapter_sdxl_vit-h.safetensors": ("sdxl", "h", False, 15),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_store):
    """A webui folder: ``models/`` with the tiny SD1 and SDXL models (the session's files, copied), the adapters and
    the ViT-H encoder; the ViT-bigG encoder as the extension keeps it (``extensions/.../clip_g.pth``, a pickle)."""
    import shutil

    from safetensors.torch import save_file

    from engine.models.tiny import UNET_SD1, UNET_SDXL, build_unet

    webui = tmp_path_factory.mktemp("webui")
    root = webui / "models"
    for sub in ("Stable-diffusion", "ControlNet", "clip_vision"):
        (root / sub).mkdir(parents=True)
    for name in ("tiny-sd1.safetensors", "tiny-sdxl.safetensors"):
        shutil.copyfile(tiny_store / "Stable-diffusion" / name, root / "Stable-diffusion" / name)
    enc_h = encoder(H, 1)
    save_file({k: v.contiguous() for k, v in enc_h.state_dict().items()},
              str(root / "clip_vision" / "CLIP-ViT-H-14.safetensors"))
    g_dir = webui / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" / "clip_vision"
    g_dir.mkdir(parents=True)
    torch.save(encoder(G, 2).state_dict(), g_dir / "clip_g.pth")
    unets = {"sd1": build_unet(UNET_SD1), "sdxl": build_unet(UNET_SDXL)}
    for name, (family, role, plus, seed) in ADAPTERS.items():
        dims = H if role == "h" else G
        clip_dim = dims["hidden_size"] if plus else dims["projection_dim"]
        save_adapter(adapter_state(unets[family], clip_dim, seed, bool(plus), full=plus == "full"),
                     root / "ControlNet" / name)
    return root


@pytest.fixture(scope="module")
def engine(store, tmp_path_factory):
    return Engine(models_dir=store, backend="torch", allow_pickle=True,
                  cache_dir=tmp_path_factory.mktemp("artefacts"))


def unit(model: str, image, module: str = "ip-adapter-auto", weight: float = 1.0, **kw) -> ControlNetUnit:
    return ControlNetUnit(model=model, image=image, module=module, weight=weight, **kw)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------ parity
def _pipeline(rt, encoder_module, sdxl: bool):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor

    c = rt.model.components
    features = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    unet = copy.deepcopy(rt.backend._components["unet"]).float()
    if sdxl:
        return StableDiffusionXLPipeline(c["vae"], c["text_encoder"], c["text_encoder_2"], c["tokenizer"],
                                         c["tokenizer_2"], unet, EulerDiscreteScheduler(),
                                         image_encoder=encoder_module, feature_extractor=features)
    return StableDiffusionPipeline(c["vae"], c["text_encoder"], c["tokenizer"], unet, EulerDiscreteScheduler(),
                                   safety_checker=None, feature_extractor=features, image_encoder=encoder_module,
                                   requires_safety_checker=False)


CASES = {  # case -> (model, [(adapter, module, weight)])
    "sd15": ("tiny-sd1", [("ip-adapter_sd15.safetensors", "ip-adapter_clip_sd15", 0.7)]),
    "sd15-plus-bin": ("tiny-sd1", [("ip-adapter-plus_sd15.bin", "ip-adapter_clip_sd15", 1.0)]),
    "sd15-two-adapters": ("tiny-sd1", [("ip-adapter_sd15.safetensors", "ip-adapter_clip_sd15", 0.5),
                                       ("ip-adapter-plus-face_sd15.safetensors", "ip-adapter-auto", 0.8)]),
    "sd15-full-face": ("tiny-sd1", [("ip-adapter-full-face_sd15.safetensors", "ip-adapter_clip_sd15", 0.9)]),
    "sd15-full-face-and-plain": ("tiny-sd1", [("ip-adapter-full-face_sd15.safetensors", "ip-adapter-auto", 1.0),
                                              ("ip-adapter_sd15.safetensors", "ip-adapter_clip_h", 0.6)]),
    "sdxl-bigG": ("tiny-sdxl", [("ip-adapter_sdxl.safetensors", "ip-adapter_clip_sdxl", 0.6)]),
    "sdxl-vit-h": ("tiny-sdxl", [("ip-adapter_sdxl_vit-h.safetensors", "ip-adapter_clip_sdxl_plus_vith", 1.0)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unet_output_matches_diffusers_load_ip_adapter(engine, store, case):
    """The UNet output with IP-Adapter units (cond and uncond rows) equals diffusers' after load_ip_adapter."""
    model, specs = CASES[case]
    sdxl = model == "tiny-sdxl"
    rt = engine.runtime(model)
    image = picture(3)
    ips = IPAdapters(engine.store, allow_pickle=True)
    prepared = []
    for k, (name, module, weight) in enumerate(specs):
        p, adapter = ips.prepare(unit(name, image, module, weight), f"controlnet_units[{k}]")
        ips.attach(rt.backend, adapter, rt.backend._components["unet"])
        prepared.append(p)
    enc = next(iter(ips.encoders.values()))
    pipe = _pipeline(rt, enc, sdxl)
    pipe.load_ip_adapter(str(store / "ControlNet"), subfolder="", weight_name=[n for n, _, _ in specs],
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale([w for _, _, w in specs])
    with torch.no_grad():
        embeds = pipe.prepare_ip_adapter_image_embeds([image] * len(specs), None, "cpu", 1, True)
    run = engine._run_fn(rt)
    g = np.random.default_rng(0)
    feeds = {"sample": g.standard_normal((2, 4, 8, 8)).astype(np.float32),
             "timestep": np.full(2, 500.0, np.float32),
             "encoder_hidden_states": g.standard_normal((2, 77, rt.backend._components["unet"].config
                                                         .cross_attention_dim)).astype(np.float32)}
    added = None
    if sdxl:
        feeds["text_embeds"] = g.standard_normal((2, 32)).astype(np.float32)
        feeds["time_ids"] = np.tile(np.asarray([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1))
        added = {"text_embeds": torch.from_numpy(feeds["text_embeds"]), "time_ids": torch.from_numpy(feeds["time_ids"])}
    component, extra = IPInjection(prepared, 1).feeds("unet", 0, np.asarray([0.0, 1.0]), 2, feeds["sample"])
    assert parse_variant(component)[0] == "unet"
    ours = run(component, {**feeds, **extra})["model_output"]
    with torch.no_grad():  # diffusers' rows: negative then positive (its CFG concatenation)
        ref = pipe.unet(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                        torch.from_numpy(feeds["encoder_hidden_states"]),
                        added_cond_kwargs={**(added or {}), "image_embeds": embeds}).sample.numpy()
    plain = run("unet", feeds)["model_output"]
    assert rel_l2(ours, ref) <= 1e-5, (case, rel_l2(ours, ref))
    assert rel_l2(ours, plain) > 1e-3  # the adapter acts


def test_full_face_tokens_match_diffusers(engine, store):
    """The full-face adapter's image-prompt tokens (every penultimate hidden state through diffusers'
    IPAdapterFullImageProjection; the negative rows those of an all-zero image, as for the plus adapters) equal
    diffusers' after load_ip_adapter: its ``prepare_ip_adapter_image_embeds`` through the UNet's
    ``encoder_hid_proj``. One token per hidden state: (32 / 8)^2 patches + the class token = 17 here, 257 for
    ViT-H at 224 px."""
    from diffusers.models.embeddings import IPAdapterFullImageProjection

    rt = engine.runtime("tiny-sd1")
    ips = IPAdapters(engine.store, allow_pickle=True)
    image = picture(6)
    p, adapter = ips.prepare(unit("ip-adapter-full-face_sd15", image, "ip-adapter_clip_h"), "controlnet_units[0]")
    assert isinstance(adapter.projection, IPAdapterFullImageProjection)
    assert adapter.shape.full and adapter.shape.tokens == 17 and p.cond.shape == p.uncond.shape == (1, 17, 32)
    assert adapter.key.endswith("-17") and p.label.startswith("ip-adapter-full-face_sd15 [")
    pipe = _pipeline(rt, next(iter(ips.encoders.values())), False)
    pipe.load_ip_adapter(str(store / "ControlNet"), subfolder="", weight_name="ip-adapter-full-face_sd15.safetensors",
                         image_encoder_folder=None)
    with torch.no_grad():
        embeds = pipe.prepare_ip_adapter_image_embeds([image], None, "cpu", 1, True)
        ref = pipe.unet.encoder_hid_proj(embeds)[0].numpy()  # (rows: negative, positive; 1 image; tokens; dim)
    assert ref.shape == (2, 1, 17, 32)
    assert rel_l2(p.cond[0], ref[1, 0]) <= 1e-6, rel_l2(p.cond[0], ref[1, 0])
    assert rel_l2(p.uncond[0], ref[0, 0]) <= 1e-6, rel_l2(p.uncond[0], ref[0, 0])
    assert rel_l2(p.cond, p.uncond) > 1e-2


def test_the_extensions_stored_negative_hidden_states_where_installed(engine, store, tmp_path):
    """Where sd-webui-controlnet is installed beside the models folder (its ``clip_vision_h_uc.data``, a torch
    pickle ``{"uc": (1, tokens, width) float16}``) and pickles are allowed, the negative rows of the plus and
    full-face adapters are the projection of those stored hidden states, as the extension's ``_get_image_embeds``
    makes them; without the opt-in (or without the file) the zero image's, diffusers' rule."""
    import shutil

    from engine.ip_adapter import UNCOND_FILE
    from engine.models.store import ModelStore

    root = tmp_path / "webui" / "models"
    for sub in ("ControlNet", "clip_vision"):
        (root / sub).mkdir(parents=True)
    enc = "clip_vision/CLIP-ViT-H-14.safetensors"
    shutil.copyfile(store / enc, root / enc)
    names = ("ip-adapter-full-face_sd15", "ip-adapter-plus-face_sd15")
    for name in names:
        shutil.copyfile(store / "ControlNet" / f"{name}.safetensors", root / "ControlNet" / f"{name}.safetensors")
    uc = torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(4)).half()
    (root / UNCOND_FILE).parent.mkdir(parents=True)
    torch.save({"uc": uc}, root / UNCOND_FILE)
    local = ModelStore(root, bundled=None, cache_dir=tmp_path / "cache")
    zero_rule = IPAdapters(engine.store, allow_pickle=True)
    for name in names:
        ips = IPAdapters(local, allow_pickle=True)
        p, adapter = ips.prepare(unit(name, picture(1), "ip-adapter_clip_sd15"), "u")
        ref, _ = zero_rule.prepare(unit(name, picture(1), "ip-adapter_clip_sd15"), "u")
        with torch.no_grad():
            expected = adapter.projection(uc.float()).numpy()
        np.testing.assert_allclose(p.uncond, expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(p.cond, ref.cond)
        assert rel_l2(p.uncond, ref.uncond) > 1e-2
        no_pickle, _ = IPAdapters(local).prepare(unit(name, picture(1), "ip-adapter_clip_sd15"), "u")
        np.testing.assert_array_equal(no_pickle.uncond, ref.uncond)


def test_clip_preprocessing_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    image = picture(5, 50, 70)
    ref = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=image, return_tensors="np").pixel_values
    np.testing.assert_array_equal(clip_pixels(image, 32), ref)


# ------------------------------------------------------------------------------------------------ engine
def _request(units=(), model="tiny-sd1", **kw):
    return GenerationRequest(model=model, prompt="a lighthouse", negative_prompt="blur", steps=3, seed=7,
                             sampler_name="Euler", width=64, height=64, controlnet_units=tuple(units), **kw)


@pytest.fixture(scope="module")
def plain_image(engine):
    return engine.generate(_request()).images[0]


def test_image_follows_the_reference_and_weight_zero_is_no_adapter(engine, plain_image):
    a = engine.generate(_request([unit("ip-adapter_sd15", picture(1))])).images[0]
    b = engine.generate(_request([unit("ip-adapter_sd15", picture(2))])).images[0]
    zero = engine.generate(_request([unit("ip-adapter_sd15", picture(1), weight=0.0)]))
    assert np.array_equal(zero.images[0], plain_image)
    assert np.abs(a.astype(int) - plain_image).mean() > 2.0
    assert np.abs(a.astype(int) - b).mean() > 1.0
    assert 'Module: ip-adapter-auto, Model: ip-adapter_sd15 [' in zero.infotexts[0]


def test_full_face_generation_and_weight_zero_is_no_adapter(engine, plain_image):
    zero = engine.generate(_request([unit("ip-adapter-full-face_sd15", picture(1), "ip-adapter_clip_sd15",
                                          weight=0.0)]))
    assert np.array_equal(zero.images[0], plain_image)
    a = engine.generate(_request([unit("ip-adapter-full-face_sd15", picture(1), "ip-adapter_clip_sd15")]))
    b = engine.generate(_request([unit("ip-adapter-full-face_sd15", picture(2), "ip-adapter_clip_sd15")])).images[0]
    assert np.abs(a.images[0].astype(int) - plain_image).mean() > 2.0
    assert np.abs(a.images[0].astype(int) - b).mean() > 1.0
    assert "Module: ip-adapter_clip_sd15, Model: ip-adapter-full-face_sd15 [" in a.infotexts[0]


def test_guidance_window_outside_every_step_is_no_adapter(engine, plain_image):
    # steps 3: the unit runs at step i when start <= i/3 <= end; 0.9..1.0 takes none of 0, 1/3, 2/3
    out = engine.generate(_request([unit("ip-adapter_sd15", picture(1), guidance_start=0.9)])).images[0]
    assert np.array_equal(out, plain_image)
    late = engine.generate(_request([unit("ip-adapter_sd15", picture(1), guidance_start=0.5)])).images[0]
    assert not np.array_equal(late, plain_image)


def test_several_images_average_their_tokens(engine):
    ips = IPAdapters(engine.store)
    one, _ = ips.prepare(unit("ip-adapter_sd15", picture(1)), "u")
    two, _ = ips.prepare(unit("ip-adapter_sd15", picture(2)), "u")
    both, _ = ips.prepare(unit("ip-adapter_sd15", (picture(1), picture(2))), "u")
    np.testing.assert_allclose(both.cond, (one.cond + two.cond) / 2, atol=1e-6)
    np.testing.assert_allclose(both.uncond, (one.uncond + two.uncond) / 2, atol=1e-6)


def test_two_units_of_one_adapter_share_one_variant_input(engine):
    ips = IPAdapters(engine.store)
    a, _ = ips.prepare(unit("ip-adapter_sd15", picture(1), weight=0.5), "u")
    b, _ = ips.prepare(unit("ip-adapter_sd15", picture(2), weight=0.25, guidance_end=0.3), "u")
    name, feeds = IPInjection([a, b], 3).feeds("unet_control", 2, np.asarray([1.0, 0.0]), 2, np.zeros(1, np.float32))
    assert name == variant_name("unet_control", [(a.adapter, 2)])
    assert feeds["ip_tokens_0"].shape == (2, 2, 4, 32)
    np.testing.assert_array_equal(feeds["ip_scale_0"], [[0.5, 0.0], [0.5, 0.0]])  # b is past its window at 2/3
    np.testing.assert_array_equal(feeds["ip_tokens_0"][1, 0], a.uncond[0])  # the negative row
    np.testing.assert_array_equal(feeds["ip_tokens_0"][0, 1], b.cond[0])


def test_sdxl_generation_with_the_extensions_bigG_pickle(engine):
    out = engine.generate(_request([unit("ip-adapter_sdxl", picture(1), "ip-adapter_clip_sdxl")],
                                   model="tiny-sdxl"))
    plain = engine.generate(_request(model="tiny-sdxl"))
    assert np.abs(out.images[0].astype(int) - plain.images[0]).mean() > 1.0


# ------------------------------------------------------------------------------------------------ refusals
def test_refusals_name_the_field(store, engine, tmp_path):
    no_pickle = Engine(models_dir=store, backend="torch", cache_dir=tmp_path)
    with pytest.raises(InvalidRequest) as e:
        no_pickle.generate(_request([unit("ip-adapter-plus_sd15", picture(1))]))
    assert e.value.field == "controlnet_units[0].model" and "pickle" in str(e.value)
    with pytest.raises(ModelError):
        read_adapter(store / "ControlNet" / "ip-adapter-plus_sd15.bin")
    with pytest.raises(InvalidRequest) as e:  # a ViT-H adapter with the bigG module
        engine.generate(_request([unit("ip-adapter_sd15", picture(1), "ip-adapter_clip_sdxl")]))
    assert e.value.field == "controlnet_units[0].module"
    with pytest.raises(InvalidRequest) as e:  # an SDXL adapter on an SD1 model
        engine.generate(_request([unit("ip-adapter_sdxl_vit-h", picture(1), "ip-adapter_clip_h")]))
    assert e.value.field == "controlnet_units[0].model" and "tiny-sd1" in str(e.value)


def test_missing_encoder_names_the_places(tmp_path):
    from engine.models.tiny import UNET_SD1, build_unet

    root = tmp_path / "models"
    (root / "ControlNet").mkdir(parents=True)
    save_adapter(adapter_state(build_unet(UNET_SD1), 24, 1), root / "ControlNet" / "ip-adapter_sd15.safetensors")
    from engine.models.store import ModelStore

    ips = IPAdapters(ModelStore(root, bundled=None, cache_dir=tmp_path / "cache"))
    with pytest.raises(InvalidRequest) as e:
        ips.prepare(unit("ip-adapter_sd15", picture(1), "ip-adapter_clip_sd15"), "controlnet_units[1]")
    assert e.value.field == "controlnet_units[1].module"
    assert "models/clip_vision/CLIP-ViT-H-14.safetensors" in str(e.value)
    assert "annotator/downloads/clip_vision/clip_h.pth" in str(e.value)


# ------------------------------------------------------------------------------------------------ memory
def test_memory_budget_counts_the_encoder_and_the_adapter(engine, store):
    from core.errors import TooMuchMemory
    from engine.admission import check_request
    from engine.ip_adapter import memory_bytes
    from engine.memory import architecture_of, estimate_request

    req = _request([unit("ip-adapter_sd15", picture(1), "ip-adapter_clip_sd15")])
    enc = store / "clip_vision" / "CLIP-ViT-H-14.safetensors"
    expected = 4 * (sum(p.numel() for p in encoder(H, 1).parameters())
                    + sum(v.numel() for d in read_adapter(store / "ControlNet" / "ip-adapter_sd15.safetensors").values()
                          for v in d.values()))
    assert memory_bytes(engine.store, req) == expected > enc.stat().st_size // 2
    arch, _ = architecture_of(store / "Stable-diffusion" / "tiny-sd1.safetensors")
    plain = estimate_request(arch, 64, 64, units=1, backend="torch", tiling=engine.config.vae_tiling).total
    check_request(engine.store, engine.config, _request([unit("ip-adapter_sd15", picture(1))]), plain + 2 * expected)
    with pytest.raises(TooMuchMemory):
        check_request(engine.store, engine.config, req, plain + expected // 2)


def test_memory_budget_counts_the_image_prompt_attention(engine, store):
    """The IP attention's score arrays (rows x heads x latent pixels x units * tokens) count where they outgrow
    the self-attention's: a full-face adapter's tokens are its encoder's hidden states (17 here, from the header)."""
    from engine.ip_adapter import attention_tokens
    from engine.memory import architecture_of, estimate_request

    full = [unit("ip-adapter-full-face_sd15", picture(1), "ip-adapter_clip_sd15")] * 3
    assert attention_tokens(engine.store, _request(full + [unit("ip-adapter_sd15", picture(1))])) == 3 * 17
    assert attention_tokens(engine.store, _request([unit("ip-adapter_sd15", picture(1))])) == 4
    assert attention_tokens(engine.store, _request([unit("ip-adapter-plus_sd15", picture(1))])) == 257  # a pickle
    arch, _ = architecture_of(store / "Stable-diffusion" / "tiny-sd1.safetensors")
    plain = estimate_request(arch, 64, 64, backend="onnxruntime").total
    assert estimate_request(arch, 64, 64, backend="onnxruntime", ip_tokens=64).total == plain  # 8 x 8 latent pixels
    assert estimate_request(arch, 64, 64, backend="onnxruntime", ip_tokens=10 * 257).total > plain


# ------------------------------------------------------------------------------------------------ progress, cancel
def test_image_encode_is_an_encoding_phase_and_cancellable(engine):
    import threading

    from core.errors import Cancelled

    seen, cancel = [], threading.Event()

    def progress(p):
        seen.append((p.phase, p.detail))
        if "IP-Adapter" in p.detail:
            cancel.set()

    with pytest.raises(Cancelled):
        engine.generate(_request([unit("ip-adapter_sd15", (picture(4), picture(5)))]), progress=progress,
                        cancel=cancel)
    assert ("encoding", "controlnet_units[0]: IP-Adapter reference image") in seen
    assert not any(phase == "sampling" for phase, _ in seen)


def test_onnxruntime_engine_runs_the_exported_variant(engine, store, tmp_path):
    """The Engine on onnxruntime (its torch weights released after export) exports the UNet's IP-Adapter variant
    once, keyed by the adapter and the unit count, and runs it: the same images as the torch engine (to 1 level
    of 255 on average: ORT's chunked attention and kernels), no other component re-exported for a new image."""
    ort = Engine(models_dir=store, backend="onnxruntime", allow_pickle=True, cache_dir=tmp_path)
    req = _request([unit("ip-adapter_sd15", picture(1))])
    out = ort.generate(req)
    assert out.info["warnings"] == []
    assert np.abs(out.images[0].astype(int) - engine.generate(req).images[0]).mean() <= 1.0
    exported = sorted(p.name for p in tmp_path.rglob("*") if p.is_dir() and "+ip_" in p.name)
    assert len(exported) == 1 and exported[0].startswith("unet+ip_") and exported[0].endswith("x1")
    again = ort.generate(_request([unit("ip-adapter_sd15", picture(2))]))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_dir() and "+ip_" in p.name) == exported
    assert not np.array_equal(again.images[0], out.images[0])


@pytest.mark.parametrize("backend,model", [("openvino", "ip-adapter_sd15"), ("openvino", "ip-adapter-full-face_sd15"),
                                           ("onnxruntime", "ip-adapter-full-face_sd15")])
def test_exported_variant_matches_torch(engine, backend, model):
    """OpenVINO's IR (from its ONNX export) and onnxruntime's ONNX of the variant against the torch variant on the
    same modules (the full-face variant: 17 image tokens per unit here, 257 with ViT-H)."""
    from engine.backends import create_backend
    from engine.config import EngineConfig

    rt = engine.runtime("tiny-sd1")
    ips = IPAdapters(engine.store)
    p, adapter = ips.prepare(unit(model, picture(1), weight=0.8), "u")
    ips.attach(rt.backend, adapter, rt.backend._components["unet"])
    g = np.random.default_rng(2)
    feeds = {"sample": g.standard_normal((2, 4, 8, 8)).astype(np.float32), "timestep": np.full(2, 300.0, np.float32),
             "encoder_hidden_states": g.standard_normal((2, 77, 32)).astype(np.float32)}
    name, extra = IPInjection([p], 1).feeds("unet", 0, np.asarray([0.0, 1.0]), 2, feeds["sample"])
    ref = rt.backend.run(name, {**feeds, **extra})["model_output"]
    assert extra["ip_tokens_0"].shape == (2, 1, adapter.shape.tokens, 32)
    other = create_backend(EngineConfig(models_dir=engine.config.models_dir, backend=backend, precision="fp32",
                                        cache_dir=engine.config.cache_dir), rt.backend._components,
                           model_hash="ipa-test")
    assert rel_l2(other.run(name, {**feeds, **extra})["model_output"], ref) <= 1e-4


@pytest.mark.parametrize("model,tokens", [("ip-adapter_sd15", 4), ("ip-adapter-full-face_sd15", 17)])
def test_tensorrt_profile_of_the_variant(engine, model, tokens):
    """TensorRT (no GPU here): the variant's descriptor gives the plan's min/opt/max shapes for the IP inputs (the
    token count is static: 4 for a plain adapter, the encoder's hidden states for a full-face one)."""
    from export.descriptors import ShapeConfig

    rt = engine.runtime("tiny-sd1")
    ips = IPAdapters(engine.store)
    _, adapter = ips.prepare(unit(model, picture(1)), "u")
    ips.attach(rt.backend, adapter, rt.backend._components["unet"])
    desc = rt.backend.descriptor(variant_name("unet_control", [(adapter.key, 3)]))
    profile = desc.profile(ShapeConfig(batch=(1, 2, 4)))
    assert profile["ip_tokens_0"] == ((1, 3, tokens, 32), (2, 3, tokens, 32), (4, 3, tokens, 32))
    assert profile["ip_scale_0"] == ((1, 3), (2, 3), (4, 3))
    assert "mid_residual" in profile and desc.source == "unet"


def test_submit_checks_from_the_headers(engine, store, tmp_path):
    from engine.admission import check_request
    from engine.config import EngineConfig

    def refused(units, allow_pickle=True):
        with pytest.raises(InvalidRequest) as e:
            check_request(engine.store, EngineConfig(models_dir=store, backend="torch", allow_pickle=allow_pickle),
                          _request(units))
        return e.value

    check_request(engine.store, engine.config, _request([unit("ip-adapter_sd15", picture(1))]))
    e = refused([unit("ip-adapter-plus_sd15", picture(1))], allow_pickle=False)
    assert e.field == "controlnet_units[0].model" and "pickle" in str(e)
    e = refused([unit("ip-adapter_sd15", picture(1)), unit("ip-adapter_sdxl", picture(1), "ip-adapter_clip_h")])
    assert e.field == "controlnet_units[1].module" and "(24 wide)" in str(e) and "takes 40" in str(e)
    import shutil

    shutil.copyfile(store / "Stable-diffusion" / "tiny-sd1.safetensors", store / "ControlNet" / "not-ip.safetensors")
    e = refused([unit("not-ip", picture(1), "ip-adapter_clip_h")])  # a checkpoint is no IP-Adapter
    assert e.field == "controlnet_units[0].model" and "not an IP-Adapter file" in str(e)
    e = refused([unit("ip-adapter_sd15", picture(1), "canny")])  # an adapter with a ControlNet module
    assert e.field == "controlnet_units[0].module" and "ip-adapter_clip_sd15" in e.allowed
    # full-face: the ViT-H module fits (its hidden states are 32 wide here); the bigG one (the extension's pickle:
    # its width is known once loaded) is refused when the unit runs
    check_request(engine.store, engine.config, _request([unit("ip-adapter-full-face_sd15", picture(1),
                                                              "ip-adapter_clip_sd15")]))
    with pytest.raises(InvalidRequest) as e:
        engine.generate(_request([unit("ip-adapter-full-face_sd15", picture(1), "ip-adapter_clip_g")]))
    assert e.value.field == "controlnet_units[0].module" and "(48 wide)" in str(e.value)
    assert "takes 32" in str(e.value)


def test_faceid_adapters_stay_refused_naming_the_model(engine, store):
    """FaceID (insightface embeddings: ``proj.0``/``proj.2``/``norm``) and FaceID plus (``perceiver_resampler``)
    files are refused at submit naming the model; the allowed values list the full-face adapter."""
    from safetensors.torch import save_file

    from engine.admission import check_request

    ip = {f"ip_adapter.{k}": v for k, v in adapter_state(engine.runtime("tiny-sd1").backend._components["unet"], 24,
                                                          1)["ip_adapter"].items()}
    faceid = {"image_proj.proj.0.weight": torch.zeros(64, 16), "image_proj.proj.0.bias": torch.zeros(64),
              "image_proj.proj.2.weight": torch.zeros(128, 64), "image_proj.proj.2.bias": torch.zeros(128),
              "image_proj.norm.weight": torch.ones(32), "image_proj.norm.bias": torch.zeros(32)}
    plus = {**faceid, "image_proj.perceiver_resampler.proj_in.weight": torch.zeros(48, 32)}
    for name, proj in (("ip-adapter-faceid_sd15", faceid), ("ip-adapter-faceid-plus_sd15", plus)):
        save_file({**proj, **ip}, str(store / "ControlNet" / f"{name}.safetensors"))
        with pytest.raises(InvalidRequest) as e:
            check_request(engine.store, engine.config, _request([unit(name, picture(1), "ip-adapter_clip_sd15")]))
        assert e.value.field == "controlnet_units[0].model", name
        assert "FaceID IP-Adapters are not supported" in str(e.value) and "ip-adapter-full-face_sd15" in e.value.allowed


# ------------------------------------------------------------------------------------------------ webui API
@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """``python -m cli serve --backend torch`` on the module's models folder (adapters and the ViT-H encoder)."""
    import os
    import subprocess
    import sys

    from tests.api_support import wait_healthy
    from tests.queue_support import ROOT, free_port

    work = tmp_path_factory.mktemp("ip-server")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDENGINE_CACHE_DIR": str(work / "cache")}
    env.pop("SDENGINE_API_KEY", None)
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir", str(store),
                             "--results-dir", str(work / "results"), "--backend", "torch"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, lambda: (work / "server.log").read_text()[-3000:], timeout=120)
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    log.close()


def _b64(img: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_webui_route_takes_the_extensions_ip_adapter_unit(server):
    import httpx

    models = httpx.get(server + "/controlnet/model_list", timeout=60).json()["model_list"]
    title = next(m for m in models if m.startswith("ip-adapter_sd15 ["))
    modules = httpx.get(server + "/controlnet/module_list", timeout=60).json()["module_list"]
    assert {"ip-adapter_clip_sd15", "ip-adapter_clip_sdxl_plus_vith", "ip-adapter-auto"} <= set(modules)

    def payload(unit: dict) -> dict:
        return {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler",
                "override_settings": {"sd_model_checkpoint": "tiny-sd1"},
                "alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "model": title, "weight": 0.8,
                                                              **unit}]}}}

    multi = [{"image": _b64(picture(1)), "mask": None}, {"image": _b64(picture(2)), "mask": None}]
    r = httpx.post(server + "/sdapi/v1/txt2img", json=payload({"module": "ip-adapter_clip_sd15", "image": multi}),
                   timeout=600)
    assert r.status_code == 200, r.text
    assert "Module: ip-adapter_clip_sd15, Model: ip-adapter_sd15 [" in r.json()["info"]
    bad = httpx.post(server + "/sdapi/v1/txt2img", json=payload({"module": "ip-adapter_clip_h",
                                                                 "model": "ip-adapter_sdxl", "image": multi}),
                     timeout=600)
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"]["field"] == "alwayson_scripts.controlnet.args[0].module"


def test_webui_txt2img_with_a_full_face_unit(server):
    """/sdapi/v1/txt2img with the extension's full-face unit (ip-adapter_clip_sd15, the preset's module): weight 0
    gives the pixels of the request without the unit, weight 1 others; the infotext names the unit."""
    import base64

    import httpx

    from tests.api_support import png_pixels

    title = next(m for m in httpx.get(server + "/controlnet/model_list", timeout=60).json()["model_list"]
                 if m.startswith("ip-adapter-full-face_sd15 ["))

    def txt2img(weight):
        units = [] if weight is None else [{"enabled": True, "module": "ip-adapter_clip_sd15", "model": title,
                                            "weight": weight, "image": _b64(picture(3))}]
        r = httpx.post(server + "/sdapi/v1/txt2img", timeout=600, json={
            "prompt": "a portrait", "steps": 3, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": "tiny-sd1"},
            "alwayson_scripts": {"ControlNet": {"args": units}}})
        assert r.status_code == 200, r.text
        return r.json()

    plain, zero, full = txt2img(None), txt2img(0.0), txt2img(1.0)
    pixels = [png_pixels(base64.b64decode(a["images"][0])) for a in (plain, zero, full)]
    assert np.array_equal(pixels[1], pixels[0])
    assert np.abs(pixels[2].astype(int) - pixels[0]).mean() > 1.0
    assert "Module: ip-adapter_clip_sd15, Model: ip-adapter-full-face_sd15 [" in full["info"]


# ------------------------------------------------------------------------------------------------ Celery
def test_celery_worker_runs_ip_adapter_units(store, tmp_path):
    """A real ``sdengine worker`` (torch) on a real Redis: an /scc task with an IP-Adapter unit (two images, the
    multi-input form) succeeds; the same task with weight 0 gives the plain task's pixels, with weight 0.8 others."""
    from api_compat import TaskService
    from tests.api_support import png_pixels
    import shutil
    import tempfile

    from tests.queue_support import RedisServer, WorkerProcess

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    pytest.importorskip("celery", reason="the 'queue' extra (celery, redis) is not installed")
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="sdengine-redis-")))
    redis_server.start()
    client = redis_server.client(7)
    worker = WorkerProcess(redis_server.url(7), tmp_path / "r", tmp_path / "w.log", "--models-dir", str(store),
                           "--backend", "torch", "--cache-dir", str(tmp_path / "cache")).start()
    images = [_b64(picture(1)), _b64(picture(2))]

    def payload(weight):
        units = [] if weight is None else [{"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15",
                                            "weight": weight, "image": images}]
        return {"prompt": "a lighthouse", "seed": 4, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
                "stable_diffusion_model": "tiny-sd1", "alwayson_scripts": {"controlnet": {"units": units}}}

    try:
        worker.wait_ready(client)
        with TaskService(store, results_dir=tmp_path / "r", queue=redis_server.url(7)) as svc:
            ids = {w: svc.sd_txt2img(payload(w))["taskId"] for w in (None, 0.0, 0.8)}
            done = {w: svc.wait(t, 300) for w, t in ids.items()}
            assert all(d["status"] == "succeeded" for d in done.values()), done
            pixels = {w: png_pixels(svc.image_path(ids[w], 0)) for w in ids}
        assert np.array_equal(pixels[0.0], pixels[None])
        assert not np.array_equal(pixels[0.8], pixels[None])
        assert "ip-adapter_clip_sd15" in done[0.8]["info"]["infotexts"][0]
    finally:
        worker.kill()
        client.flushdb()
        client.close()
        redis_server.kill()
