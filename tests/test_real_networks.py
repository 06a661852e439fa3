"""Real network files of the shared weights: the seven textual-inversion embeddings (webui ``.pt`` with
``string_to_param``, ``EasyNegative.safetensors`` with ``emb_params``; 768 wide, for SD1) through the engine's
loader, the webui listing and a model of the SD1 text width; and a real LoRA in a format neither the webui nor
sdengine reads (cloneofsimo ``lora_diffusion``), refused naming the file and the format.

The SD1-width model is random weights of the real architecture's text width (a CLIPTextModel with
``hidden_size`` 768, two layers; a UNet with ``cross_attention_dim`` 768), so the real vectors go through a real
768-wide token-embedding path. What is checked, and against what:

- vector counts: written down below (read once from the files' own tensors; the folder's README says 2 to 16),
  and the engine's vectors equal the tensors read directly (``torch.load(weights_only=True)`` / safetensors);
- hashes: the webui's embedding hash is the sha256 of the whole file and its short hash the first 12 hex digits
  (webui ``modules/textual_inversion/textual_inversion.py`` ``create_embedding_from_data`` ->
  ``hashes.sha256(filepath, ...)`` -> ``Embedding.set_hash``: ``shorthash = hash[0:12]``), compared with the
  folder's ``SHA256SUMS``;
- the vectors the encoder receives at the embedding's positions equal the file's vectors exactly (fp32), and the
  prompt's embedding changes from the embedding's first position on, never before it (CLIP's causal mask);
- the foreign LoRA: refused at submit (422 ``model_error`` naming ``prompt``, the file and the format), by the
  engine when it is run directly, in ``/sdapi/v1/loras`` (an ``error`` beside the webui's fields) and in
  ``models info``.

Tests skip with a reason where the shared folder is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ModelError
from engine.networks.embeddings import embedding_info, read_embedding
from tests.api_support import wait_healthy
from tests.queue_support import free_port
from tests.weights_support import WEIGHTS, needs

pytestmark = [needs("embeddings", "the real textual-inversion embeddings"),
              needs("lora-foreign", "the real LoRA of a foreign format")]

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sd1-768.safetensors"
# name -> vectors (read once from the files; the shared folder's README: SD1, 768 wide, 2 to 16 vectors)
FOREIGN = "lora_disney.safetensors"  # cloneofsimo lora_diffusion
FORMAT = "cloneofsimo lora_diffusion"
COUNTS = {"EasyNegative": 8, "bad-artist": 2, "bad-artist-anime": 2, "bad-hands-5": 2, "bad-prompt": 16,
          "bad_prompt_version2": 8, "eyeliner2": 3}
WIDTH = 768


def _files() -> dict[str, Path]:
    return {p.stem: p for p in sorted((WEIGHTS / "embeddings").iterdir())} if WEIGHTS else {}


def _sums() -> dict[str, str]:
    """name -> sha256 from the folder's SHA256SUMS."""
    out = {}
    for line in (WEIGHTS / "SHA256SUMS").read_text().splitlines():
        digest, path = line.split(maxsplit=1)
        if path.startswith("./embeddings/"):
            out[Path(path).stem] = digest
    return out


def _file_vectors(path: Path) -> torch.Tensor:
    """The file's vectors read directly (the reference for what the engine inserts)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))["emb_params"].float()
    data = torch.load(path, map_location="cpu", weights_only=True)
    (vec,) = data["string_to_param"].values()
    return vec.detach().float()


def write_sd1_width_model(path: Path) -> None:
    """A tiny SD1 checkpoint with the real text width: CLIPTextModel hidden_size 768 (2 layers, 12 heads, the
    real 49408-token vocabulary), UNet cross_attention_dim 768; random weights (engine.models.tiny)."""
    from engine.models.convert import save_single_file
    from engine.models.family import Arch, tokenizers
    from engine.models.tiny import TEXT_SD1, TINY_SIZE, UNET_SD1, build_text_encoder, build_unet, build_vae

    text = dict(TEXT_SD1, hidden_size=WIDTH, intermediate_size=256, num_hidden_layers=2, num_attention_heads=12,
                projection_dim=WIDTH)
    components = {"text_encoder": build_text_encoder(text, seed=0), **tokenizers(Arch.SD1),
                  "unet": build_unet(dict(UNET_SD1, cross_attention_dim=WIDTH), 2), "vae": build_vae(1)}
    save_single_file(components, path, prediction_type="epsilon", native_size=TINY_SIZE)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A model store: the SD1-width model and the seven real embeddings (the bundled demo model beside them)."""
    root = tmp_path_factory.mktemp("real-embeddings") / "models"
    (root / "Stable-diffusion").mkdir(parents=True)
    write_sd1_width_model(root / "Stable-diffusion" / MODEL)
    (root / "embeddings").mkdir()
    for path in _files().values():
        shutil.copyfile(path, root / "embeddings" / path.name)
    (root / "Lora").mkdir()
    shutil.copyfile(WEIGHTS / "lora-foreign" / FOREIGN, root / "Lora" / FOREIGN)
    return root


def test_real_files_read_with_their_counts_hashes_and_training_fields():
    """Every file reads (the six pickles only with the opt-in, refused naming the file without it) with its
    vector count, width 768, the file's own vectors and training fields, and the webui hash (SHA256SUMS)."""
    files, sums = _files(), _sums()
    assert set(files) == set(COUNTS) == set(sums)
    from engine.models.hashing import sha256_file

    for name, path in files.items():
        if path.suffix == ".pt":
            with pytest.raises(ModelError, match="pickle files can run code") as refused:
                read_embedding(path)
            assert path.name in str(refused.value)
        vectors = read_embedding(path, allow_pickle=True)
        assert list(vectors) == [""] and tuple(vectors[""].shape) == (COUNTS[name], WIDTH), name
        torch.testing.assert_close(vectors[""], _file_vectors(path), rtol=0, atol=0)
        info = embedding_info(path, name, allow_pickle=True)
        assert (info.vectors, info.shape) == (COUNTS[name], WIDTH)
        if path.suffix == ".pt":  # the webui's training wrote these fields; the listing reports them
            data = torch.load(path, map_location="cpu", weights_only=True)
            assert (info.step, info.sd_checkpoint, info.sd_checkpoint_name) == (
                data["step"], data["sd_checkpoint"], data["sd_checkpoint_name"])
        assert sha256_file(path) == sums[name]


def test_pickles_only_with_the_opt_in(store):
    """The engine's embedding database for a 768-wide encoder: without allow_pickle only the safetensors file;
    with it all seven."""
    from engine.models.store import ModelStore
    from engine.networks.embeddings import EmbeddingDatabase

    models = ModelStore(store, bundled=None, cache_dir=store.parent / "hashes")
    for allow, expected in ((False, {"EasyNegative"}), (True, set(COUNTS))):
        db = EmbeddingDatabase(models, {"text_encoder": WIDTH}, allow_pickle=allow)
        db.refresh()
        assert set(db.embeddings) == expected
        assert {n: e.count for n, e in db.embeddings.items()} == {n: COUNTS[n] for n in expected}


@pytest.fixture(scope="module")
def engine(store, tmp_path_factory):
    from engine.pipeline import Engine

    return Engine(models_dir=store, backend="torch", allow_pickle=True,
                  cache_dir=tmp_path_factory.mktemp("real-embeddings-cache"))


def test_real_vectors_feed_the_768_wide_text_encoder(engine):
    """With the SD1-width model every real embedding is used: the rows the text encoder receives at the
    embedding's positions are the file's vectors (exactly), and the prompt's embedding differs from the same
    text without embeddings from that position on (max |diff| > 0.05), identical before it (causal mask)."""
    from engine.conditioning import encode_texts
    from engine.models.tokenizer import clip_tokenizer
    from engine.prompts import tokenize_prompt

    rt = engine.runtime(MODEL)
    ti, _ = rt.networks.textual_inversion()
    assert ti is not None and ti.counts == COUNTS
    files = _files()
    assert rt.networks.ti_hashes(sorted(COUNTS)) == tuple((n, _sums()[n][:12]) for n in sorted(COUNTS))

    encoder = rt.model.family.text.text.encoders[0]
    table = rt.model.components["text_encoder"].get_input_embeddings()
    seen = []
    hook = table.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    try:
        for name, count in COUNTS.items():
            text = f"a photo of a cat, {name}, outdoors"
            (chunk,) = tokenize_prompt(text, clip_tokenizer(encoder.pad_token), words=ti.words(encoder.pad_token))
            assert chunk.fixes and chunk.fixes[0][1] == name
            position = chunk.fixes[0][0]
            seen.clear()
            with_ti = encode_texts(rt.backend, rt.model.family.text, [text], clip_skip=1, ti=ti)
            rows = seen[-1][0, position:position + count]
            torch.testing.assert_close(rows.float(), _file_vectors(files[name]), rtol=0, atol=0)
            plain = encode_texts(rt.backend, rt.model.family.text, [text], clip_skip=1)  # the name as words
            a = np.asarray(with_ti[encoder.component][text].hidden, dtype=np.float64)
            b = np.asarray(plain[encoder.component][text].hidden, dtype=np.float64)
            np.testing.assert_allclose(a[:position], b[:position], rtol=0, atol=1e-5)
            assert np.abs(a[position:] - b[position:]).max() > 0.05, name
    finally:
        hook.remove()


def test_foreign_lora_refused_by_the_engine_and_models_info(engine, store):
    """Run directly (no API in front), the engine refuses the prompt's foreign LoRA naming the file and its
    format; ``models info`` says the same (engine.models.card)."""
    from engine.models.card import card, card_lines
    from engine.models.store import ModelStore
    from engine.request import GenerationRequest

    with pytest.raises(ModelError, match=FORMAT) as refused:
        engine.generate(GenerationRequest(model=MODEL, prompt="a cat <lora:lora_disney:1>", steps=1, width=64,
                                          height=64, seed=1, sampler_name="Euler"))
    assert FOREIGN in str(refused.value)
    lines = card_lines(card(ModelStore(store, bundled=None, cache_dir=store.parent / "hashes"), "lora_disney"))
    assert "kind:            lora" in lines
    assert any(line.startswith("note:") and FOREIGN in line and FORMAT in line for line in lines), lines


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """``python -m cli serve`` on the store, torch backend, pickles allowed through the ``--configs`` file."""
    root = tmp_path_factory.mktemp("real-embeddings-server")
    configs = root / "configs.json"
    configs.write_text(json.dumps({"default": {"allow_pickle": True}}))
    port = free_port()
    log = open(root / "server.log", "wb")
    env = {"PYTHONPATH": str(ROOT), "SDENGINE_CACHE_DIR": str(root / "cache")}

    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir", str(store),
                             "--results-dir", str(root / "results"), "--backend", "torch", "--configs", str(configs)],
                            env={**os.environ, **env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def tail() -> str:
        log.flush()
        return (root / "server.log").read_text(errors="replace")[-3000:]

    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, tail, timeout=120)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_foreign_lora_refused_at_submit_and_in_the_listing(server):
    """Over HTTP: ``/sdapi/v1/loras`` lists the file with an ``error`` naming it and its format; a txt2img whose
    prompt names it is refused at submit (422 ``model_error``, field ``prompt``), nothing runs."""
    import requests

    (row,) = [r for r in requests.get(server + "/sdapi/v1/loras", timeout=120).json() if r["name"] == "lora_disney"]
    assert FOREIGN in row["error"] and FORMAT in row["error"], row
    bundled = [r for r in requests.get(server + "/sdapi/v1/loras", timeout=120).json() if r["name"] != "lora_disney"]
    assert bundled and all("error" not in r for r in bundled)  # the usable (bundled demo) LoRA: the webui's fields
    for route in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
        payload = {"prompt": "a cat <lora:lora_disney:0.8>", "steps": 1, "width": 64, "height": 64}
        if route.endswith("img2img"):
            payload["init_images"] = [_png_b64(np.zeros((64, 64, 3), np.uint8))]
        r = requests.post(server + route, json=payload, timeout=120)
        assert r.status_code == 422, (route, r.status_code, r.text)
        text = r.text
        assert FOREIGN in text and FORMAT in text and "prompt" in text, text


def _png_b64(image: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow  # a real server on the torch backend, and a 180 MB checkpoint to load (~30 s on 2 busy cores)
def test_webui_listing_and_generation(server):
    """``/sdapi/v1/embeddings``: beside the demo model (another text width) all seven are ``skipped``; with the
    SD1-width model all are ``loaded``, with the files' counts, width and training fields. A txt2img on that
    model names the embeddings its prompts used (EasyNegative in the negative prompt, as it is meant) in
    ``TI hashes`` with the webui's short hashes."""
    import requests

    listing = requests.get(server + "/sdapi/v1/embeddings", timeout=120).json()
    assert listing["loaded"] == {} and set(listing["skipped"]) == set(COUNTS), listing
    assert {n: e["vectors"] for n, e in listing["skipped"].items()} == COUNTS
    r = requests.post(server + "/sdapi/v1/options", json={"sd_model_checkpoint": MODEL}, timeout=300)
    assert r.status_code == 200, r.text
    listing = requests.get(server + "/sdapi/v1/embeddings", timeout=120).json()
    assert listing["skipped"] == {} and set(listing["loaded"]) == set(COUNTS), listing
    for name, row in listing["loaded"].items():
        assert (row["vectors"], row["shape"]) == (COUNTS[name], WIDTH)
    assert listing["loaded"]["bad-prompt"]["step"] == 8000  # the file's training step
    r = requests.post(server + "/sdapi/v1/txt2img", json={
        "prompt": "a photo of a cat, bad-hands-5", "negative_prompt": "EasyNegative", "steps": 2, "width": 64,
        "height": 64, "seed": 1, "sampler_name": "Euler"}, timeout=600)
    assert r.status_code == 200, r.text
    infotext = json.loads(r.json()["info"])["infotexts"][0]
    sums = _sums()
    # the prompt's, then the negative prompt's (where EasyNegative is used), as the webui lists them
    assert f'TI hashes: "bad-hands-5: {sums["bad-hands-5"][:12]}, EasyNegative: {sums["EasyNegative"][:12]}"' \
        in infotext, infotext
