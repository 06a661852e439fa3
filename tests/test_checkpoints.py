"""Checkpoint formats: detection, loading, the diffusers -> webui writer round trip, and refusals."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from core.errors import ModelError
from engine.models.checkpoints import (
    Arch,
    detect_path_arch,
    load_checkpoint,
    load_controlnet,
    load_single_file,
    load_vae,
    read_safetensors_header,
    scheduler_alphas_cumprod,
    yaml_parameterization,
)
from engine.models.convert import METADATA_KEY, save_single_file
from engine.models.tiny import STORE_NAMES, TINY_SIZE, build_tiny

EXPECTED = {
    "sd1": Arch.SD1, "sd2v": Arch.SD2, "sdxl": Arch.SDXL,
    "controlnet_sd1": Arch.CONTROLNET_SD1, "controlnet_sdxl": Arch.CONTROLNET_SDXL,
}


def _paths(store, kind):
    sub, stem = STORE_NAMES[kind]
    return store / sub / f"{stem}.safetensors", store / sub / f"{stem}-diffusers"


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_architecture_detection_both_formats(tiny_store, kind):
    single, folder = _paths(tiny_store, kind)
    assert detect_path_arch(single) is EXPECTED[kind]
    assert detect_path_arch(folder) is EXPECTED[kind]
    loader = load_controlnet if EXPECTED[kind].is_controlnet else load_checkpoint
    assert loader(single).arch is EXPECTED[kind]
    assert loader(folder).arch is EXPECTED[kind]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, what: str):
    sa, sb = a.state_dict(), b.state_dict()
    sa = {k: v for k, v in sa.items() if not k.endswith("position_ids")}
    sb = {k: v for k, v in sb.items() if not k.endswith("position_ids")}
    assert sa.keys() == sb.keys(), f"{what}: key sets differ: {sorted(sa.keys() ^ sb.keys())[:5]}"
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"{what}: {len(diff)} tensors differ, e.g. {diff[:5]}"


def _unet_out(unet, xl: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if xl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(x, torch.tensor([500.0]), encoder_hidden_states=ctx, **kw).sample


@pytest.mark.parametrize("kind", ["sd1", "sd2v", "sdxl"])
def test_single_file_round_trip(tiny_store, kind):
    """tiny model -> webui single file (our writer) -> loader (diffusers' ldm converters): every tensor equal
    to the original modules, to the diffusers-folder copy (our folder loader) and to diffusers' own
    UNet2DConditionModel.from_pretrained of that folder (torch.equal), and the
    UNet / text encoder outputs equal to the folder copy's within atol 1e-5 (the weights are bitwise equal;
    fp32 CPU kernels may order sums differently for differently allocated tensors: ~7e-7 seen)."""
    ref = build_tiny(kind)
    single, folder = _paths(tiny_store, kind)
    loaded = load_single_file(single)
    from_folder = load_checkpoint(folder)
    assert loaded.prediction_type == ref.prediction_type == from_folder.prediction_type
    assert loaded.native_size == TINY_SIZE == from_folder.native_size
    names = [n for n in ref.components if not n.startswith("tokenizer")]
    assert sorted(n for n in loaded.components if not n.startswith("tokenizer")) == sorted(names)
    for name in names:
        _assert_same_weights(ref.components[name], loaded.components[name], f"{kind}/{name}")
        _assert_same_weights(from_folder.components[name], loaded.components[name], f"{kind}/{name} (folder)")
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, low_cpu_mem_usage=False)
    _assert_same_weights(reference, loaded.components["unet"], f"{kind}/unet (diffusers from_pretrained)")
    xl = kind == "sdxl"
    torch.testing.assert_close(_unet_out(loaded.components["unet"], xl),
                               _unet_out(from_folder.components["unet"], xl), atol=1e-5, rtol=1e-5)
    # the text encoders give the same hidden states as the originals
    ids = ref.components["tokenizer"]("a red circle", padding="max_length", return_tensors="pt").input_ids
    for name in ("text_encoder", "text_encoder_2"):
        if name in names:
            with torch.no_grad():
                a = ref.components[name](ids, output_hidden_states=True).hidden_states[-2]
                b = loaded.components[name](ids, output_hidden_states=True).hidden_states[-2]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert loaded.components["tokenizer"].pad_token == ("!" if kind == "sd2v" else "<|endoftext|>")
    if xl:
        assert loaded.components["tokenizer_2"].pad_token == "!"


def test_sd2_single_file_carries_extra_openclip_layer(tiny_store):
    """The writer adds the OpenCLIP layer diffusers dropped (5 diffusers layers -> 6 resblocks on disk)."""
    single, _ = _paths(tiny_store, "sd2v")
    shapes = read_safetensors_header(single).shapes
    blocks = {k.split(".")[4] for k in shapes if k.startswith("cond_stage_model.model.transformer.resblocks.")}
    assert blocks == {str(i) for i in range(6)}
    assert shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (96, 32)
    assert "cond_stage_model.model.text_projection" in shapes
    assert shapes["first_stage_model.decoder.mid.attn_1.q.weight"] == (32, 32, 1, 1)


@pytest.mark.parametrize("kind", ["controlnet_sd1", "controlnet_sdxl"])
def test_controlnet_round_trip(tiny_store, kind):
    ref = build_tiny(kind).components["controlnet"]
    single, folder = _paths(tiny_store, kind)
    a, b = load_controlnet(single).module, load_controlnet(folder).module
    _assert_same_weights(ref, a, kind)
    _assert_same_weights(b, a, f"{kind} (folder)")
    assert any(k.startswith("control_model.input_hint_block.14.") for k in read_safetensors_header(single).shapes)


def test_external_vae_file(tmp_path):
    vae = build_tiny("sd1").components["vae"]
    path = save_single_file({"vae": vae}, tmp_path / "my.vae.safetensors")
    assert detect_path_arch(path) is Arch.VAE
    assert all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
               for k in read_safetensors_header(path).shapes)
    _assert_same_weights(vae, load_vae(path), "vae")


def test_vae_from_first_stage_model_keys(tiny_store):
    """A file with ``first_stage_model.`` keys (a whole checkpoint) also serves as a VAE."""
    single, _ = _paths(tiny_store, "sd1")
    _assert_same_weights(build_tiny("sd1").components["vae"], load_vae(single), "vae")


def test_pickle_refused_without_opt_in_and_loaded_with_it(tiny_store, tmp_path):
    from safetensors.torch import load_file

    single, _ = _paths(tiny_store, "sd1")
    ckpt = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": load_file(str(single))}, ckpt)
    with pytest.raises(ModelError) as err:
        load_single_file(ckpt)
    assert "pickled.ckpt" in str(err.value) and "pickle" in str(err.value) and "allow_pickle" in str(err.value)
    # opted in: torch.load(weights_only=True); no metadata, so the bundled SD1.5 config is used and the tiny
    # weights do not fit it -- the error names the file and the mismatch
    with pytest.raises(ModelError, match="pickled.ckpt.*do not match its config"):
        load_single_file(ckpt, allow_pickle=True)


def test_unknown_architecture(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "mystery.safetensors"
    save_file({"some.layer.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelError, match="mystery.safetensors: unknown architecture"):
        load_single_file(path)
    with pytest.raises(ModelError, match="mystery.safetensors: unknown architecture"):
        load_controlnet(path)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_safetensors(tiny_store, tmp_path, cut):
    single, _ = _paths(tiny_store, "sd1")
    data = single.read_bytes()
    path = tmp_path / "broken.safetensors"
    path.write_bytes(data[:cut])
    with pytest.raises(ModelError) as err:
        load_single_file(path)
    assert "broken.safetensors" in str(err.value)
    assert "truncated" in str(err.value)


def test_corrupt_header(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{not json" + b"\0" * 20)
    with pytest.raises(ModelError, match="garbage.safetensors: corrupt safetensors header"):
        read_safetensors_header(path)


def test_metadata_configs_are_used(tiny_store):
    single, _ = _paths(tiny_store, "sdxl")
    meta = json.loads(read_safetensors_header(single).metadata[METADATA_KEY])
    assert meta["unet"]["cross_attention_dim"] == 64 and meta["prediction_type"] == "epsilon"
    assert set(meta) >= {"unet", "vae", "text_encoder", "text_encoder_2"}


def test_without_metadata_the_bundled_family_config_is_used(tiny_store, tmp_path):
    """A tiny SD1 file stripped of its metadata is read with the bundled SD1.5 config, which it does not fit."""
    from safetensors.torch import load_file, save_file

    single, _ = _paths(tiny_store, "sd1")
    path = tmp_path / "nometa.safetensors"
    save_file(load_file(str(single)), str(path))
    with pytest.raises(ModelError, match=r"nometa.safetensors: unet weights do not match its config"):
        load_single_file(path)


def test_yaml_parameterization(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    assert yaml_parameterization(ckpt) is None
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert yaml_parameterization(ckpt) == "v_prediction"
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    parameterization: \"eps\"\n")
    assert yaml_parameterization(ckpt) == "epsilon"


def test_alphas_cumprod_golden():
    """SD's schedule (scaled_linear 0.00085..0.012, 1000 steps); golden values from the published
    ldm/diffusers schedule: alphas_cumprod[0] = 0.99915, [999] = 0.0046601 = 1 / (1 + 14.6146^2), the webui's
    sigma_max 14.6146 (to 1e-6); all of it against diffusers' DDPMScheduler (rtol 1e-6)."""
    ac = scheduler_alphas_cumprod({"beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                                   "beta_schedule": "scaled_linear"})
    assert ac.dtype == np.float64 and ac.shape == (1000,)
    assert abs(ac[0] - 0.99915) < 1e-12
    assert abs(ac[-1] - 0.0046601) < 1e-6
    assert abs(((1 - ac[-1]) / ac[-1]) ** 0.5 - 14.6146) < 1e-3
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    np.testing.assert_allclose(ac, ref.double().numpy(), rtol=1e-6)


def test_loaded_model_fields(tiny_store):
    m = load_checkpoint(_paths(tiny_store, "sd2v")[0])
    assert m.prediction_type == "v_prediction" and m.scheduler_config["prediction_type"] == "v_prediction"
    assert all(not p.requires_grad for p in m.components["unet"].parameters())
    assert not m.components["unet"].training and not m.components["text_encoder"].training


def _meta_modules(config_name: str) -> tuple[dict, dict]:
    """The modules of a bundled family config built on the meta device (real sizes, no memory)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine.models.checkpoints import bundled_config

    cfg = bundled_config(config_name)
    mods = {}
    with torch.device("meta"):
        if "controlnet" in cfg:
            mods["controlnet"] = ControlNetModel(**cfg["controlnet"])
        else:
            mods["unet"] = UNet2DConditionModel(**cfg["unet"])
            mods["vae"] = AutoencoderKL(**cfg["vae"])
            mods["text_encoder"] = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
            if "text_encoder_2" in cfg:
                mods["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    return mods, cfg


# bundled config -> (our Arch, diffusers' infer_diffusers_model_type, real webui keys with their shapes)
REAL_FAMILIES = {
    "sd15.json": (Arch.SD1, "v1", {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    }, {"model.diffusion_model.": 686, "first_stage_model.": 248}),
    "sd21_v.json": (Arch.SD2, "v2", {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
    }, {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.model.transformer.resblocks.": 24 * 12}),
    "sdxl_base.json": (Arch.SDXL, "xl_base", {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.bias": (1280,),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
    }, {"model.diffusion_model.": 1680, "first_stage_model.": 248, "conditioner.embedders.1.model.transformer.resblocks.": 32 * 12}),
    "controlnet_sd15.json": (Arch.CONTROLNET_SD1, "controlnet", {
        "control_model.input_hint_block.0.weight": (16, 3, 3, 3),
        "control_model.input_hint_block.14.weight": (320, 256, 3, 3),
        "control_model.zero_convs.11.0.weight": (1280, 1280, 1, 1),
        "control_model.middle_block_out.0.weight": (1280, 1280, 1, 1),
    }, {}),
    "controlnet_sdxl.json": (Arch.CONTROLNET_SDXL, None, {
        "control_model.label_emb.0.0.weight": (1280, 2816),
        "control_model.zero_convs.8.0.weight": (1280, 1280, 1, 1),
    }, {}),
}


@pytest.mark.parametrize("config_name", list(REAL_FAMILIES))
def test_bundled_configs_match_the_real_webui_layout(config_name):
    """At the real sizes, on the meta device: bundled config -> our writer gives the webui key names and
    shapes of the published checkpoints (UNet 686 / SDXL 1680 tensors, VAE 248), diffusers' own
    infer_diffusers_model_type recognises the family, and the loader rebuilds every module with strict keys."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from engine.models.checkpoints import build_components, build_controlnet, detect_arch
    from engine.models.convert import ldm_state_dict

    arch, diffusers_type, known, counts = REAL_FAMILIES[config_name]
    mods, cfg = _meta_modules(config_name)
    sd = ldm_state_dict(mods, arch, cfg)
    for key, shape in known.items():
        assert tuple(sd[key].shape) == shape, key
    for prefix, n in counts.items():
        assert sum(k.startswith(prefix) for k in sd) == n, prefix
    assert detect_arch({k: tuple(v.shape) for k, v in sd.items()}) is arch
    if diffusers_type:
        assert infer_diffusers_model_type(sd) == diffusers_type
    if arch.is_controlnet:
        cn = build_controlnet(arch, sd, cfg["controlnet"], config_name)
        assert sum(p.numel() for p in cn.parameters()) == sum(p.numel() for p in mods["controlnet"].parameters())
    else:
        built = build_components(arch, sd, cfg, config_name)
        for name, module in mods.items():
            assert sum(p.numel() for p in built[name].parameters()) == sum(p.numel() for p in module.parameters())


def test_pickle_vae_with_opt_in(tmp_path):
    """allow_pickle=True loads a .pt through torch.load(weights_only=True); weights equal the original."""
    from engine.models.convert import vae_to_ldm

    vae = build_tiny("sd1").components["vae"]
    path = tmp_path / "old.vae.pt"
    torch.save({"state_dict": vae_to_ldm(vae.state_dict(), vae.config)}, path)
    cfg = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    with pytest.raises(ModelError, match="old.vae.pt.*pickle"):
        load_vae(path, config=cfg)
    _assert_same_weights(vae, load_vae(path, config=cfg, allow_pickle=True), "pickled vae")


def test_sd2_prediction_from_yaml_when_metadata_lacks_it(tiny_store, tmp_path):
    """No prediction_type in the metadata: a webui-style <name>.yaml beside the file decides."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    single, _ = _paths(tiny_store, "sd2v")
    with safe_open(str(single), "pt") as f:
        meta = f.metadata()
    configs = json.loads(meta[METADATA_KEY])
    del configs["prediction_type"], configs["native_size"]
    path = tmp_path / "sd2.safetensors"
    save_file(load_file(str(single)), str(path), metadata={**meta, METADATA_KEY: json.dumps(configs)})
    (tmp_path / "sd2.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    m = load_single_file(path)
    assert m.prediction_type == "v_prediction" and m.native_size == 768
    (tmp_path / "sd2.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    m = load_single_file(path)
    assert m.prediction_type == "epsilon" and m.native_size == 512


def test_sd2_v_heuristic_rule():
    """The webui rule (sd_models_config.is_using_v_parameterization_for_sd2): mean(unet(x, 999) - x) < -1 -> v."""
    from types import SimpleNamespace

    from engine.models.checkpoints import _sd2_is_v

    class FakeUnet(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = shift
            self.config = SimpleNamespace(cross_attention_dim=16, in_channels=4)
            self.dtype = torch.float32

        def forward(self, x, t, encoder_hidden_states):
            assert t.tolist() == [999] and encoder_hidden_states.shape == (1, 2, 16)
            return SimpleNamespace(sample=x + self.shift)

    assert _sd2_is_v(FakeUnet(-1.5)) and not _sd2_is_v(FakeUnet(-0.5))


def test_unknown_diffusers_folder(tmp_path):
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text('{"_class_name": "Transformer2DModel"}')
    with pytest.raises(ModelError, match="weird: unknown architecture"):
        load_checkpoint(tmp_path / "weird")
    with pytest.raises(ModelError, match="weird: unknown architecture"):
        load_controlnet(tmp_path / "weird")


def test_write_tiny_store_is_deterministic(tiny_store, tmp_path):
    """Two writes give byte-identical files (same sha256 for every file), so tiny-model hashes are stable."""
    from engine.models.hashing import sha256_file
    from engine.models.tiny import write_tiny_store

    root = write_tiny_store(tmp_path / "again", kinds=("controlnet_sd1", "sd1"))
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert len(files) >= 8
    for rel in files:
        assert sha256_file(root / rel) == sha256_file(tiny_store / rel), rel
    with pytest.raises(ValueError, match="unknown tiny model kind 'sd3'"):
        write_tiny_store(tmp_path / "bad", kinds=("sd3",))


def test_diffusers_folder_pickle_and_shards(tiny_store, tmp_path):
    """Folder weights: .bin (pickle) follows the allow_pickle policy; sharded safetensors (index.json) load."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, folder = _paths(tiny_store, "sd1")
    copy = tmp_path / "sd1-folder"
    shutil.copytree(folder, copy)
    vae_file = copy / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(vae_file)), copy / "vae" / "diffusion_pytorch_model.bin")
    vae_file.unlink()
    unet_file = copy / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(unet_file))
    keys = sorted(sd)
    shards = {"unet-1.safetensors": keys[: len(keys) // 2], "unet-2.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_file({k: sd[k] for k in names}, str(copy / "unet" / shard))
    (copy / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: shard for shard, names in shards.items() for k in names}}))
    unet_file.unlink()
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model.bin: pickle"):
        load_checkpoint(copy)
    m = load_checkpoint(copy, allow_pickle=True)
    ref = load_checkpoint(folder)
    for name in ("unet", "vae"):
        _assert_same_weights(ref.components[name], m.components[name], name)
