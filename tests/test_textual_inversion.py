"""Textual-inversion embeddings (engine.networks.embeddings) through the engine on the torch and onnxruntime
backends.

References and tolerances: images vs diffusers ``load_textual_inversion`` on a pipeline over the same
checkpoint (SD1: a webui ``emb_params`` file; SDXL: a ``clip_l`` + ``clip_g`` file loaded into both encoders, as
diffusers documents), same initial latents, Euler: within 2/255 mean absolute difference, while the
embedding itself moves the image by more than 3/255.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from engine.models.checkpoints import load_checkpoint
from engine.networks.embeddings import read_embedding
from engine.pipeline import Engine
from engine.request import GenerationRequest
from tests.lora_support import save

WORD = "sdshiny"  # several BPE tokens: the match is on the token sequence of the file name
VECTORS = 3


def _vectors(text_encoder, seed: int) -> torch.Tensor:
    table = text_encoder.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(VECTORS, table.shape[1], generator=g) * table.std() * 4).contiguous()


@pytest.fixture(scope="module")
def ti_store(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("ti-store")
    (root / "Stable-diffusion").mkdir()
    for name in ("tiny-sd1.safetensors", "tiny-sdxl.safetensors"):
        shutil.copy(tiny_store / "Stable-diffusion" / name, root / "Stable-diffusion" / name)
    sd1 = load_checkpoint(root / "Stable-diffusion" / "tiny-sd1.safetensors").components
    sdxl = load_checkpoint(root / "Stable-diffusion" / "tiny-sdxl.safetensors").components
    save({"emb_params": _vectors(sd1["text_encoder"], 0)}, root / "embeddings" / f"{WORD}.safetensors")
    save({"clip_l": _vectors(sdxl["text_encoder"], 1), "clip_g": _vectors(sdxl["text_encoder_2"], 2)},
         root / "embeddings" / f"{WORD}xl.safetensors")
    return root


@pytest.fixture(scope="module")
def engines(ti_store, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ti-artefacts")
    made = {}

    def get(backend: str) -> Engine:
        if backend not in made:
            made[backend] = Engine(models_dir=ti_store, backend=backend, cache_dir=cache)
        return made[backend]

    return get


def mad(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _req(model: str, prompt: str) -> GenerationRequest:
    return GenerationRequest(model=model, prompt=prompt, negative_prompt="blurry", steps=6, seed=5, cfg_scale=6.0,
                             sampler_name="Euler")


def _reference(ti_store, model: str, prompt: str) -> np.ndarray:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from engine.samplers import resolve

    loaded = load_checkpoint(ti_store / "Stable-diffusion" / model)
    c = {k: copy.deepcopy(v) if k.startswith("tokenizer") else v for k, v in loaded.components.items()}
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", timestep_spacing="linspace")
    if "text_encoder_2" in c:
        from safetensors.torch import load_file

        pipe = StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
                                         tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"], unet=c["unet"],
                                         scheduler=scheduler, force_zeros_for_empty_prompt=True)
        state = load_file(str(ti_store / "embeddings" / f"{WORD}xl.safetensors"))
        pipe.load_textual_inversion(state["clip_l"], token=f"{WORD}xl", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=f"{WORD}xl", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        extra = {"height": 64, "width": 64}
    else:
        pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                       unet=c["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.load_textual_inversion(str(ti_store / "embeddings" / f"{WORD}.safetensors"), token=WORD)
        extra = {}
    sigmas = resolve("Euler", "Automatic").sigmas(6, loaded.family.schedule)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = pipe(prompt=[prompt], negative_prompt=["blurry"], num_inference_steps=6, guidance_scale=6.0,
                   latents=noise, output_type="np", sigmas=[float(s) for s in sigmas[:-1]], **extra).images[0]
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("model, word", [("tiny-sd1.safetensors", WORD), ("tiny-sdxl.safetensors", WORD + "xl")])
def test_embedding_images_match_diffusers(engines, ti_store, model, word):
    prompt = f"a red circle, {word}"
    reference = _reference(ti_store, model, prompt)
    plain = engines("torch").generate(_req(model, "a red circle, plain")).images[0]
    assert mad(plain, reference) > 3.0, "the embedding must change the image for the comparison to mean anything"
    for backend in ("torch", "onnxruntime"):
        result = engines(backend).generate(_req(model, prompt))
        got = result.images[0]
        assert mad(got, reference) <= 2.0, f"{model} on {backend} vs diffusers: {mad(got, reference):.3f}/255"
        from engine.infotext import parse_infotext
        from engine.models.hashing import sha256_file

        params = parse_infotext(result.infotexts[0])[2]
        sha = sha256_file(ti_store / "embeddings" / f"{word}.safetensors")[:12]
        assert params["TI hashes"] == f"{word}: {sha}"


def test_embedding_for_another_architecture_is_plain_text(engines):
    """The SDXL embedding's name on the SD1 model is just words (the webui skips embeddings of other widths)."""
    result = engines("torch").generate(_req("tiny-sd1.safetensors", f"a red circle, {WORD}xl"))
    assert "TI hashes" not in result.infotexts[0]


def test_webui_pt_formats(tmp_path):
    """string_to_param (.pt, only with allow_pickle), a diffusers single-tensor dict, a one-vector embedding."""
    vec = torch.randn(2, 8)
    torch.save({"string_to_param": {"*": vec}, "name": "x", "step": 10}, tmp_path / "a.pt")
    from core.errors import ModelError

    with pytest.raises(ModelError, match="pickle files can run code"):
        read_embedding(tmp_path / "a.pt")
    np.testing.assert_array_equal(read_embedding(tmp_path / "a.pt", allow_pickle=True)[""], vec)
    save({"<tok>": vec[0]}, tmp_path / "b.safetensors")
    assert read_embedding(tmp_path / "b.safetensors")[""].shape == (1, 8)
    save({"a": vec, "b": vec.clone()}, tmp_path / "c.safetensors")
    with pytest.raises(ModelError, match="not a textual-inversion embedding"):
        read_embedding(tmp_path / "c.safetensors")


def test_webui_listing_follows_the_current_checkpoint(ti_store, tmp_path):
    """``/sdapi/v1/embeddings`` (api_compat.webui._embeddings, the route's body; the HTTP route itself is tested
    in tests/test_webui_client.py): ``loaded`` are exactly the embeddings the engine's database uses with the
    current checkpoint (text-encoder widths read from the checkpoint's header, compared here with the loaded
    model's), ``skipped`` the others; shape = vector width (SDXL: clip_l + clip_g); pickles only with
    allow_pickle, with the webui's step / sd_checkpoint fields from the file."""
    from safetensors.torch import save_file

    from api_compat.webui.listings import embeddings as _embeddings
    from engine.config import EngineConfig
    from engine.models.store import ModelStore
    from engine.networks.embeddings import EmbeddingDatabase

    root = tmp_path / "models"
    shutil.copytree(ti_store, root)
    sd1 = load_checkpoint(root / "Stable-diffusion" / "tiny-sd1.safetensors")
    sdxl = load_checkpoint(root / "Stable-diffusion" / "tiny-sdxl.safetensors")
    w1 = sd1.components["text_encoder"].config.hidden_size
    wl, wg = (sdxl.components[c].config.hidden_size for c in ("text_encoder", "text_encoder_2"))
    save_file({"emb_params": torch.zeros(2, w1)}, str(root / "embeddings" / "trained.safetensors"),
              metadata={"step": "1200", "sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "tiny-sd1"})
    save({"emb_params": torch.zeros(76, w1)}, root / "embeddings" / "toolong.safetensors")
    save({"emb_params": torch.zeros(1, 768)}, root / "embeddings" / "sd15size.safetensors")
    torch.save({"string_to_param": {"*": torch.zeros(4, w1)}, "name": "old", "step": 7,
                "sd_checkpoint": "ffff0000", "sd_checkpoint_name": "base"}, root / "embeddings" / "old.pt")
    store = ModelStore(root, bundled=None, cache_dir=tmp_path / "cache")
    config = EngineConfig(models_dir=root, backend="torch")

    def row(step, shape, vectors, ckpt=None, ckpt_name=None):
        return {"step": step, "sd_checkpoint": ckpt, "sd_checkpoint_name": ckpt_name, "shape": shape,
                "vectors": vectors}

    listing = _embeddings(store, {"sd_model_checkpoint": "tiny-sd1.safetensors"}, config)
    assert listing == {
        "loaded": {WORD: row(None, w1, VECTORS), "trained": row(1200, w1, 2, "a1b2c3d4", "tiny-sd1")},
        "skipped": {f"{WORD}xl": row(None, wl + wg, VECTORS), "toolong": row(None, w1, 76),
                    "sd15size": row(None, 768, 1)}}
    db = EmbeddingDatabase(store, {"text_encoder": w1})
    db.refresh()
    assert set(db.embeddings) == set(listing["loaded"])

    listing = _embeddings(store, {"sd_model_checkpoint": "tiny-sdxl"}, config)
    assert set(listing["loaded"]) == {f"{WORD}xl"} and listing["loaded"][f"{WORD}xl"]["shape"] == wl + wg
    assert set(listing["skipped"]) == {WORD, "trained", "toolong", "sd15size"}
    db = EmbeddingDatabase(store, {"text_encoder": wl, "text_encoder_2": wg})
    db.refresh()
    assert set(db.embeddings) == set(listing["loaded"])

    # the webui's .pt: listed (with its training fields) only where pickles are allowed
    pickled = _embeddings(store, {"sd_model_checkpoint": "tiny-sd1.safetensors"},
                          EngineConfig(models_dir=root, backend="torch", allow_pickle=True))
    assert pickled["loaded"]["old"] == row(7, w1, 4, "ffff0000", "base")
