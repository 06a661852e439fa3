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
    from engine.errors import ModelError

    with pytest.raises(ModelError, match="pickle files can run code"):
        read_embedding(tmp_path / "a.pt")
    np.testing.assert_array_equal(read_embedding(tmp_path / "a.pt", allow_pickle=True)[""], vec)
    save({"<tok>": vec[0]}, tmp_path / "b.safetensors")
    assert read_embedding(tmp_path / "b.safetensors")[""].shape == (1, 8)
    save({"a": vec, "b": vec.clone()}, tmp_path / "c.safetensors")
    with pytest.raises(ModelError, match="not a textual-inversion embedding"):
        read_embedding(tmp_path / "c.safetensors")
