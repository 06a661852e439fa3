"""LoRA from the prompt (engine.networks): the tag syntax, the store, the file formats, and images on the torch and
onnxruntime backends.

References and tolerances:
- images with LoRAs vs diffusers ``load_lora_weights`` + ``fuse_lora`` on a pipeline over the same checkpoint,
  same initial latents, Euler: within 2/255 mean absolute difference, while the LoRA itself moves the image by
  more than 3/255 (so the comparison is not vacuous);
- switching LoRA sets back and forth: bit-identical images to a fresh engine with that set (no drift);
- onnxruntime: no ONNX export happens because of a LoRA (exports counted).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from core.errors import InvalidRequest, ModelError, ModelNotFound
from engine.infotext import parse_infotext
from engine.models.checkpoints import load_checkpoint
from engine.models.family import Kind
from engine.models.store import ModelStore
from engine.networks.syntax import NetworkTag, parse_prompt
from engine.pipeline import Engine
from engine.request import GenerationRequest
from tests.lora_support import kohya_lora, peft_lora, save

SD1 = "tiny-sd1.safetensors"


# ------------------------------------------------------------------------------------------------ syntax

@pytest.mark.parametrize("prompt, text, loras", [
    ("a castle", "a castle", ()),
    ("masterpiece, <lora:detail:0.6> a castle", "masterpiece,  a castle", (NetworkTag("detail", 0.6, 0.6),)),
    ("<lora:detail>", "", (NetworkTag("detail", 1.0, 1.0),)),
    ("<lora:d:0.5:1.5>", "", (NetworkTag("d", 0.5, 1.5),)),
    ("<lora:d:te=0.5:unet=1>", "", (NetworkTag("d", 0.5, 1.0),)),
    ("<lora:d:0.3:unet=0.9>", "", (NetworkTag("d", 0.3, 0.9),)),
    ("<lora:d:unet=0.2>", "", (NetworkTag("d", 1.0, 0.2),)),
    ("<lyco:d:0.7>", "", (NetworkTag("d", 0.7, 0.7),)),
    ("<LoRA:d:2>", "", (NetworkTag("d", 2.0, 2.0),)),  # the kind is matched case-insensitively
    ("[a <lora:x:0.5>:b:5]", "[a :b:5]", (NetworkTag("x", 0.5, 0.5),)),  # inside a prompt-editing schedule
    ("a <lora:x:1> AND b <lora:y:-1>", "a  AND b ", (NetworkTag("x"), NetworkTag("y", -1.0, -1.0))),
    ("<lora:x:0.5> <lora:x:0.25>", " ", (NetworkTag("x", 0.5, 0.5), NetworkTag("x", 0.25, 0.25))),  # sums
    ("<foo:bar> cat", " cat", ()),  # unknown kinds are removed and ignored (webui)
    ("a <lora:> b", None, "LoRA name is empty"),
    ("<lora: :1>", None, "LoRA name is empty"),
    ("<lora:x:abc>", None, "'abc' is not a number"),
    ("<lora:x:1:zz>", None, "'zz' is not a number"),
    ("<lora:x:te=q>", None, "'q' is not a number"),
    ("<lora:x:nan>", None, "'nan' is out of range"),
    # the multiplier range (engine.rules.LORA_MULTIPLIER, -10..10): its ends are accepted, beyond them refused
    ("<lora:x:10:-10>", "", (NetworkTag("x", 10.0, -10.0),)),
    ("<lora:x:1e308>", None, "'1e308' is out of range"),
    ("<lora:x:-1e5>", None, "'-1e5' is out of range"),
    ("<lora:x:inf>", None, "out of range"),
    ("<lora:x:1:unet=10.01>", None, "unet multiplier '10.01' is out of range"),
    ("<lora:x:1:1:4>", None, "dyn"),
    ("<lora:x:dyn=4>", None, "dyn"),
    ("<lora:x:foo=1>", None, "unknown argument 'foo'"),
    ("<hypernet:x:1>", None, "hypernet networks are not supported"),
])
def test_prompt_tags(prompt, text, loras):
    if text is None:
        with pytest.raises(InvalidRequest, match=loras) as err:
            parse_prompt(prompt, "prompt")
        assert err.value.field == "prompt"
        return
    parsed = parse_prompt(prompt)
    assert parsed.text == text and parsed.loras == loras


# ------------------------------------------------------------------------------------------------ store

@pytest.fixture(scope="module")
def lora_store(tiny_store, tmp_path_factory):
    """A store with tiny-sd1 and LoRA files in each format (kohya with conv/LoCon layers, PEFT, a LyCORIS
    folder entry, an SDXL LoRA, LoHa and LoKr files)."""
    root = tmp_path_factory.mktemp("lora-store")
    (root / "Stable-diffusion").mkdir()
    shutil.copy(tiny_store / "Stable-diffusion" / SD1, root / "Stable-diffusion" / SD1)
    model = load_checkpoint(root / "Stable-diffusion" / SD1)
    save(kohya_lora(model.components, seed=0), root / "Lora" / "kohya.safetensors")
    save(peft_lora(model.components, seed=1), root / "Lora" / "peft.safetensors")
    save(kohya_lora(model.components, seed=2, text=False), root / "LyCORIS" / "locon.safetensors")
    sdxl = load_checkpoint(tiny_store / "Stable-diffusion" / "tiny-sdxl.safetensors")
    save(kohya_lora(sdxl.components, seed=3, ldm_names=True), root / "Lora" / "for-sdxl.safetensors")
    save({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)},
         root / "Lora" / "loha.safetensors")
    save({"lora_unet_x.lokr_w1": torch.zeros(2, 2), "lora_unet_x.lokr_w2": torch.zeros(2, 2)},
         root / "Lora" / "lokr.safetensors")
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, root / "Lora" / "pickled.pt")
    return root


def test_store_lists_and_resolves_loras(lora_store, tmp_path):
    store = ModelStore(lora_store, bundled=None, cache_dir=tmp_path)
    names = [e.name for e in store.entries(Kind.LORA)]
    assert names == ["for-sdxl.safetensors", "kohya.safetensors", "loha.safetensors", "lokr.safetensors",
                     "peft.safetensors", "pickled.pt", "locon.safetensors"]
    assert store.resolve("locon", Kind.LORA, field="prompt").path.parent.name == "LyCORIS"
    with pytest.raises(ModelNotFound, match=r"missing: prompt: no lora .* Lora/ or LyCORIS/ .*kohya, loha"):
        store.resolve("missing", Kind.LORA, field="prompt")
    rows = {e.name: e for e in store.list(Kind.LORA)}
    assert rows["for-sdxl.safetensors"].architecture.value == "sdxl"


def test_models_list_shows_loras(lora_store):
    from cli import main

    result = CliRunner().invoke(main, ["models", "list", "--models-dir", str(lora_store), "--no-hash"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split() for line in result.output.splitlines() if line and line[0] != " "}
    assert lines["kohya.safetensors"][1] == "lora" and lines["locon.safetensors"][1] == "lora"
    assert lines["for-sdxl.safetensors"][2] == "sdxl"


def test_pickle_lora_refused_at_submit_without_the_opt_in(lora_store, tmp_path):
    """A prompt naming a pickle LoRA (``pickled.pt``) is refused at submit -- 422 ``model_error`` naming the field
    ``prompt``, the file and how to opt in -- on a configuration without the pickle opt-in, and passes the submit
    checks on one with it (``"allow_pickle": true``); the webui listing (``/sdapi/v1/loras``: listings.loras with the
    server's opt-in), ``models info`` and ``models list`` say the same. A pickle of another kind (a ControlNet
    ``.pth``) is refused at submit the same way, naming its field."""
    from api_compat.service import CONFIG_HEADER, ApiError, TaskService
    from api_compat.webui.listings import loras
    from cli import main
    from engine.models.card import card, card_lines
    from tests.api_support import png_b64

    cn = lora_store / "ControlNet"
    cn.mkdir(exist_ok=True)
    torch.save({"x": torch.zeros(1)}, cn / "pickled-cn.pth")
    try:
        payload = {"prompt": "a cat <lora:pickled:0.5>", "stable_diffusion_model": SD1, "steps": 1, "width": 64,
                   "height": 64}
        with TaskService(lora_store, results_dir=tmp_path / "results", cache_dir=tmp_path / "cache",
                         configs={"pickles": {"allow_pickle": True}}, memory_budget=None) as service:
            with pytest.raises(ApiError) as refused:
                service.check(payload)
            e = refused.value
            assert (e.http_status, e.code, e.field) == (422, "model_error", "prompt"), e
            assert "pickled.pt" in e.message and '"allow_pickle": true' in e.message, e.message
            service.check(payload, {CONFIG_HEADER: "pickles"})  # the opt-in: accepted (the engine reads it then)
            unit = {"model": "pickled-cn", "module": "canny", "image": png_b64(64, 64)}
            with pytest.raises(ApiError) as refused:
                service.check({**payload, "prompt": "a cat", "alwayson_scripts": {"controlnet": {"args": [unit]}}})
            assert refused.value.field == "alwayson_scripts.controlnet.args[0].model", refused.value.field
            assert "pickled-cn.pth" in refused.value.message
            assert "allow_pickle" in refused.value.message
        store = ModelStore(lora_store, bundled=None, cache_dir=tmp_path / "hashes")
        rows = {r["name"]: r for r in loras(store, allow_pickle=False)}
        assert "pickled.pt" in rows["pickled"]["error"] and "allow_pickle" in rows["pickled"]["error"]
        assert "error" not in rows["kohya"]
        assert "error" not in {r["name"]: r for r in loras(store, allow_pickle=True)}["pickled"]
        notes = [line for line in card_lines(card(store, "pickled")) if line.startswith("note:")]
        assert any("pickled.pt" in line and "allow_pickle" in line for line in notes), notes
        listed = CliRunner().invoke(main, ["models", "list", "--models-dir", str(lora_store), "--no-hash"])
        lines = {line.split()[0]: line for line in listed.output.splitlines() if line.strip()}
        assert "refused" in lines["pickled.pt"] and "refused" in lines["loha.safetensors"], listed.output
        assert "refused" not in lines["kohya.safetensors"]
    finally:
        (cn / "pickled-cn.pth").unlink()


def test_serve_allow_pickle_flag_is_the_opt_in(lora_store, tmp_path):
    """``sdengine serve --allow-pickle`` (a real server process) is the server's pickle opt-in: its webui LoRA
    listing (listings.loras with the server's config) then carries no refusal for the pickle LoRA, where the same
    listing without the opt-in names the file and the opt-in (the test above)."""
    import os
    import subprocess
    import sys

    from pathlib import Path

    import httpx

    from tests.api_support import wait_healthy
    from tests.queue_support import free_port

    root = Path(__file__).resolve().parents[1]
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("SDENGINE_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir",
                                 str(lora_store), "--results-dir", str(tmp_path / "results"), "--allow-pickle"],
                                env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, lambda: log.read_text(errors="replace")[-3000:], timeout=90)
        rows = {r["name"]: r for r in httpx.get(url + "/sdapi/v1/loras", timeout=60).json()}
        assert "pickled" in rows and "error" not in rows["pickled"], rows.get("pickled")
        assert "error" in rows["loha"]  # a refusal of another kind stays
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def engines(lora_store, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lora-artefacts")
    made = {}

    def get(backend: str, fresh: bool = False) -> Engine:
        if fresh:
            return Engine(models_dir=lora_store, backend=backend, cache_dir=cache)
        if backend not in made:
            made[backend] = Engine(models_dir=lora_store, backend=backend, cache_dir=cache)
        return made[backend]

    return get


def _req(prompt: str, **kw) -> GenerationRequest:
    args = dict(model=SD1, prompt=prompt, negative_prompt="blurry", steps=6, seed=5, cfg_scale=6.0,
                sampler_name="Euler")
    args.update(kw)
    return GenerationRequest(**args)


@pytest.mark.parametrize("prompt, error, match", [
    ("<lora:missing:1>", ModelNotFound, r"prompt: no lora .*available: for-sdxl, kohya"),
    ("<lora:loha>", ModelError, r"loha.safetensors: this is a LoHa \(LyCORIS Hadamard product\) network"),
    ("<lora:lokr>", ModelError, r"lokr.safetensors: this is a LoKr \(LyCORIS Kronecker product\) network"),
    ("<lora:for-sdxl>", ModelError, r"for-sdxl.safetensors: LoRA 'for-sdxl' is refused: it looks made for sdxl, "
                                    r"the checkpoint is sd1"),
    ("<lora:pickled>", ModelError, r"pickled.pt: pickle files can run code .* refused"),
    ("<lora:../kohya>", Exception, r"prompt: model names are file names inside the model store"),
])
def test_bad_loras_are_refused(engines, prompt, error, match):
    with pytest.raises(error, match=match):
        engines("torch").generate(_req(f"a cat {prompt}"))


# ------------------------------------------------------------------------------------------------ images

def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _diffusers_reference(lora_store, fused: list[tuple[str, dict]], prompt: str) -> np.ndarray:
    """diffusers StableDiffusionPipeline over a fresh load of the checkpoint, each LoRA file loaded with
    ``load_lora_weights`` and fused with ``fuse_lora(components=..., lora_scale=...)``, Euler, same latents."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from engine.samplers import resolve

    model = load_checkpoint(lora_store / "Stable-diffusion" / SD1)
    c = model.components
    pipe = StableDiffusionPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
        scheduler=EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear", timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for name, scales in fused:
        pipe.load_lora_weights(str(lora_store / "Lora" / f"{name}.safetensors"))
        for component, scale in scales.items():
            pipe.fuse_lora(components=[component], lora_scale=scale)
        pipe.unload_lora_weights()  # the fused weights stay
    sigmas = resolve("Euler", "Automatic").sigmas(6, model.family.schedule)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = pipe(prompt=[prompt], negative_prompt=["blurry"], num_inference_steps=6, guidance_scale=6.0,
                   latents=noise, output_type="np", sigmas=[float(s) for s in sigmas[:-1]]).images[0]
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


REFERENCE_CASES = {
    # our prompt, the diffusers fusing of the same LoRAs
    "kohya": ("a red circle <lora:kohya:0.8>", [("kohya", {"unet": 0.8, "text_encoder": 0.8})]),
    "peft": ("a red circle <lora:peft:0.7>", [("peft", {"unet": 0.7, "text_encoder": 0.7})]),
    # two LoRAs with different multipliers, one of them with split TE/UNet multipliers
    "two-split": ("a red <lora:kohya:0.3:0.9> circle <lora:peft:unet=0.5:te=-0.4>",
                  [("kohya", {"unet": 0.9, "text_encoder": 0.3}), ("peft", {"unet": 0.5, "text_encoder": -0.4})]),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_lora_images_match_diffusers(engines, lora_store, case):
    prompt, fused = REFERENCE_CASES[case]
    reference = _diffusers_reference(lora_store, fused, "a red circle")
    plain = engines("torch").generate(_req("a red circle")).images[0]
    assert mad(plain, reference) > 3.0, "the LoRA must change the image for this comparison to mean anything"
    for backend in ("torch", "onnxruntime"):
        image = engines(backend).generate(_req(prompt))
        got = image.images[0]
        assert mad(got, reference) <= 2.0, f"{case} on {backend} vs diffusers: {mad(got, reference):.3f}/255 > 2/255"


def test_switching_sets_is_bit_identical_to_a_fresh_engine(engines, monkeypatch):
    """Back and forth between LoRA sets on one engine gives the same bits as a fresh engine per set, on both
    backends; the onnxruntime backend exports each component once, never because of a LoRA."""
    import export.onnx as xonnx

    exports = []
    real = xonnx.torch_export
    monkeypatch.setattr(xonnx, "torch_export", lambda *a, **k: (exports.append(a[1].component), real(*a, **k)))
    prompts = ["a red circle", "a red circle <lora:kohya:0.8>", "a red circle <lora:kohya:0.8> <lora:locon:-0.5>",
               "a red circle <lora:peft:1:0>", "a red circle"]
    order = [0, 1, 2, 1, 3, 0, 2, 4]
    for backend in ("torch", "onnxruntime"):
        engine = engines(backend, fresh=True)
        seen = {}
        for i in order:
            image = engine.generate(_req(prompts[i])).images[0]
            if i in seen:
                np.testing.assert_array_equal(image, seen[i], err_msg=f"{backend}: set {prompts[i]!r} drifted")
            seen[i] = image
        for i in (1, 2):
            fresh = engines(backend, fresh=True).generate(_req(prompts[i])).images[0]
            np.testing.assert_array_equal(fresh, seen[i], err_msg=f"{backend}: fresh engine differs")
        np.testing.assert_array_equal(seen[0], seen[4])  # "a red circle" twice: unpatched again
        assert mad(seen[0], seen[1]) > 3.0 and mad(seen[1], seen[2]) > 1.0
    # the shared artefact cache was filled by the module's engines or by the first fresh one: at most one
    # export per component, whatever the number of LoRA sets (onnxruntime also exports the siblings of a source
    # module, unet_control and vae_encoder, before it frees the torch weights: engine.backends.weights)
    assert len(exports) == len(set(exports)) and set(exports) <= {"text_encoder", "unet", "unet_control",
                                                                  "vae_decoder", "vae_encoder"}


# fp16 onnxruntime (CPU EP) vs the torch backend in fp32, same LoRA set: measured on the tiny SD1 model, seeds
# 5-7, four sets (none, kohya, kohya TE/UNet split + PEFT, kohya + LoCon): mean 0.05-0.10/255, largest pixel
# difference 1/255. Bounds with ~5x margin; the LoRA itself moves the fp16 image by ~7.8/255.
FP16_MEAN_BOUND = 0.5
FP16_MAX_BOUND = 4


@pytest.mark.slow
def test_lora_on_fp16_onnxruntime_matches_torch_fp32_and_switches_bit_identically(engines, lora_store,
                                                                                 tmp_path_factory):
    """A LoRA on an fp16 onnxruntime export (precision fp16, CPU EP): images vs the reference, the torch backend
    in fp32 with the same LoRA set (itself within 2/255 of diffusers, test_lora_images_match_diffusers), within
    FP16_MEAN_BOUND/255 mean absolute difference and FP16_MAX_BOUND/255 per pixel (fp16 rounding; observed
    figures above). Switching sets back and forth on the fp16 engine returns bit-identical images, equal to a
    fresh fp16 engine's for that set."""
    prompts = ["a red circle", "a red circle <lora:kohya:0.8>",
               "a red <lora:kohya:0.3:0.9> circle <lora:peft:unet=0.5:te=-0.4>",
               "a red circle <lora:kohya:0.8> <lora:locon:-0.5>"]
    cache = tmp_path_factory.mktemp("lora-fp16-artefacts")
    fp16 = Engine(models_dir=lora_store, backend="onnxruntime", precision="fp16", cache_dir=cache)
    seen: dict[int, np.ndarray] = {}
    for i in [0, 1, 2, 3, 1, 0, 2]:
        image = fp16.generate(_req(prompts[i])).images[0]
        if i in seen:
            np.testing.assert_array_equal(image, seen[i], err_msg=f"fp16: set {prompts[i]!r} drifted")
        seen[i] = image
    ran = {p.parent.parent.name for p in cache.glob("*/*/onnx-fp16/manifest.json")}
    assert {"text_encoder", "unet", "vae_decoder"} <= ran, f"the fp16 graphs must be the ones that ran: {ran}"
    for i, prompt in enumerate(prompts):
        reference = engines("torch").generate(_req(prompt)).images[0]
        diff = np.abs(seen[i].astype(np.int64) - reference.astype(np.int64))
        assert mad(seen[i], reference) <= FP16_MEAN_BOUND and diff.max() <= FP16_MAX_BOUND, (
            f"{prompt!r}: fp16 onnxruntime vs torch fp32: mean {mad(seen[i], reference):.3f}/255, max {diff.max()}")
    assert mad(seen[0], seen[1]) > 3.0 and mad(seen[1], seen[3]) > 1.0, "the LoRAs must move the fp16 image"
    fresh = Engine(models_dir=lora_store, backend="onnxruntime", precision="fp16", cache_dir=cache)
    np.testing.assert_array_equal(fresh.generate(_req(prompts[2])).images[0], seen[2],
                                  err_msg="fp16: a fresh engine with the set differs")


def test_infotext_keeps_tags_and_names_lora_hashes(engines, lora_store):
    from engine.networks.files import addnet_hash

    result = engines("torch").generate(_req("a red circle <lora:kohya:0.8>, <lyco:locon:0.2>"))
    prompt, _, params = parse_infotext(result.infotexts[0])
    assert prompt == "a red circle <lora:kohya:0.8>, <lyco:locon:0.2>"
    kohya = addnet_hash(lora_store / "Lora" / "kohya.safetensors")[:12]
    locon = addnet_hash(lora_store / "LyCORIS" / "locon.safetensors")[:12]
    assert params["Lora hashes"] == f"kohya: {kohya}, locon: {locon}"
    assert f'Lora hashes: "kohya: {kohya}, locon: {locon}"' in result.infotexts[0]


def test_disable_extra_networks_removes_tags_without_applying(engines):
    plain = engines("torch").generate(_req("a red circle"))
    disabled = engines("torch").generate(_req("a red circle<lora:kohya:0.8>", disable_extra_networks=True))
    np.testing.assert_array_equal(plain.images[0], disabled.images[0])
    assert "Lora hashes" not in disabled.infotexts[0]


def test_sdxl_kohya_names_map_like_diffusers_names(tiny_store, tmp_path):
    """An SDXL kohya LoRA in the original (LDM) UNet names (``input_blocks_4_1_...``) with lora_te1_/lora_te2_
    maps onto the same parameters, with the same factors, as the same LoRA in diffusers names; every layer
    lands (none is dropped)."""
    from engine.networks.files import read_lora
    from engine.networks.lora import map_lora

    sdxl = load_checkpoint(tiny_store / "Stable-diffusion" / "tiny-sdxl.safetensors")
    ldm = read_lora(save(kohya_lora(sdxl.components, seed=3, ldm_names=True), tmp_path / "ldm.safetensors"))
    diff = read_lora(save(kohya_lora(sdxl.components, seed=3), tmp_path / "diff.safetensors"))
    assert any(k.startswith("input_blocks_") for _, k in ldm.layers) and ldm.components == {
        "unet", "text_encoder", "text_encoder_2"}
    a = map_lora(ldm, "ldm", "0" * 64, sdxl.components, "sdxl", {})
    b = map_lora(diff, "diff", "1" * 64, sdxl.components, "sdxl", {})
    assert {s: sorted(t) for s, t in a.targets.items()} == {s: sorted(t) for s, t in b.targets.items()}
    assert sum(len(t) for t in a.targets.values()) == len(ldm.layers)
    for source, targets in a.targets.items():
        for param, layer in targets.items():
            torch.testing.assert_close(layer.delta(), b.targets[source][param].delta())


@pytest.mark.parametrize("tensors, what", [
    ({"unet:0:up": torch.zeros(4, 1), "unet:0:down": torch.zeros(1, 4), "<s1>": torch.zeros(768)},
     "cloneofsimo lora_diffusion"),
    ({"emb_params": torch.zeros(2, 768)}, "textual-inversion embedding"),
    ({"model.diffusion_model.out.0.weight": torch.zeros(4)}, "full checkpoint"),
    ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}, "LoHa"),
])
def test_foreign_lora_formats_named_from_the_header(tmp_path, tensors, what):
    """A LoRA-folder file of a format or kind the engine refuses: named (file and format) from its header alone
    (engine.networks.files.lora_problem, used by the listings, models info and the submit check) and by
    read_lora; a kohya file has no problem. The real lora_diffusion file: tests/test_real_networks.py."""
    from engine.networks.files import lora_problem, read_lora

    path = save(tensors, tmp_path / "Lora" / "foreign.safetensors")
    assert what in lora_problem(path)
    with pytest.raises(ModelError, match=what) as refused:
        read_lora(path)
    assert "foreign.safetensors" in str(refused.value)
    assert lora_problem(save(kohya_lora_tensors(), tmp_path / "Lora" / "fine.safetensors")) is None


def kohya_lora_tensors() -> dict:
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0)}
