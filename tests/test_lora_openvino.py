"""LoRA on the openvino backend (engine.backends.openvino: patched IR constants, a compiled model per set).

Reference: the torch backend in fp32 with the same LoRA set (itself within 2/255 of diffusers' fused LoRA,
tests/test_networks.py). Tolerances are openvino's own (tests/test_openvino.py), LoRA or not:
- components: f32 inference relative L2 <= 1e-4, bf16 <= 8e-2, with the same patch on both sides; the patch
  itself moves each output by far more (checked, so the comparison is not vacuous);
- images: f32 within 1/255 mean absolute difference of torch fp32, bf16 within 3/255, while the LoRA moves the
  image by more than 3/255;
- switching sets back and forth, and a request without LoRA after one with it: bit-identical to a fresh engine
  (never patched, or patched once with that set); no ONNX export and no IR conversion because of a LoRA.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is part of the dev extra")

import engine.backends.openvino as xov  # noqa: E402
from engine.backends import create_backend  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from core.errors import BackendUnavailable  # noqa: E402
from engine.infotext import parse_infotext  # noqa: E402
from engine.models.checkpoints import load_checkpoint  # noqa: E402
from engine.models.tiny import build_tiny  # noqa: E402
from engine.networks.files import read_lora  # noqa: E402
from engine.networks.lora import EMPTY, LoraUse, WeightPatch, map_lora  # noqa: E402
from engine.pipeline import Engine  # noqa: E402
from engine.request import GenerationRequest  # noqa: E402
from tests.lora_support import kohya_lora, peft_lora, save  # noqa: E402

SD1 = "tiny-sd1.safetensors"
TOL = {"fp32": 1e-4, "bf16": 8e-2}
MAD = {"fp32": 1.0, "bf16": 3.0}
NATIVE_BF16 = "BF16" in xov.cpu_capabilities()


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def mad(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# -- the backend on its own ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1").components


@pytest.fixture(scope="module")
def patches(sd1, tmp_path_factory):
    """Three patches over the tiny SD1 modules: kohya (UNet incl. LoCon convs + text encoder), PEFT, and both
    with split multipliers."""
    root = tmp_path_factory.mktemp("ov-lora-files")
    tables: dict = {}
    mapped = {}
    for name, sd in (("kohya", kohya_lora(sd1, seed=0)), ("peft", peft_lora(sd1, seed=1))):
        mapped[name] = map_lora(read_lora(save(sd, root / f"{name}.safetensors")), name, f"{len(mapped):064x}",
                                sd1, "sd1", tables)
    return {
        "kohya": WeightPatch((LoraUse(mapped["kohya"], 0.8, 0.8),)),
        "peft": WeightPatch((LoraUse(mapped["peft"], 0.7, 0.7),)),
        "both": WeightPatch((LoraUse(mapped["kohya"], 0.3, 0.9), LoraUse(mapped["peft"], -0.4, 0.5))),
    }


def feeds_for(backend, component, seed=0):
    desc = backend.descriptor(component)
    return {k: v.numpy() for k, v in desc.sample_inputs(2, 6, 10, 77, seed=seed).items()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ov-lora-cache")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("component", ["unet", "unet_control", "text_encoder"])
def test_patched_components_match_torch(sd1, patches, cache, component, precision):
    """Each patch on openvino vs the torch backend with the same patch: relL2 within openvino's own tolerance
    (measured on the tiny SD1 model: f32 1.5e-6 UNet, 3e-7 text encoder; bf16 4-5e-2 UNet, 0.6-1.1e-2 text
    encoder), while the patch moves each output by 0.7-1.6 relL2; every touched parameter is a replaced
    constant."""
    ref = create_backend(EngineConfig(backend="torch", cache_dir=cache), sd1, "tiny-sd1")
    ov = create_backend(EngineConfig(backend="openvino", precision=precision, cache_dir=cache), sd1, "tiny-sd1")
    feeds = feeds_for(ref, component, seed=4)
    # openvino first: its export reads the shared torch modules, which the torch backend patches in place
    unpatched = ov.run(component, feeds)
    ref.set_patch(EMPTY)
    plain = ref.run(component, feeds)
    for out in plain:
        assert rel_l2(unpatched[out], plain[out]) <= TOL[precision]
    replaced = []
    real = xov.patch_constants
    try:
        xov.patch_constants = lambda *a: replaced.append(real(*a)) or replaced[-1]
        for name, patch in patches.items():
            ref.set_patch(patch)
            ov.set_patch(patch)
            want, got = ref.run(component, feeds), ov.run(component, feeds)
            for out in want:
                err, moved = rel_l2(got[out], want[out]), rel_l2(want[out], plain[out])
                assert err <= TOL[precision], (name, out, err)
                assert moved > 5 * err and moved > 1e-2, (name, out, moved, err)
    finally:
        xov.patch_constants = real
        ref.set_patch(EMPTY)
    source = "text_encoder" if component == "text_encoder" else "unet"
    assert replaced == [len(p.params(source)) for p in patches.values()] and min(replaced) > 4


def test_compiled_sets_are_bounded_and_switching_back_is_a_lookup(sd1, patches, cache, monkeypatch):
    """Compiled models are cached per (patch key, shapes): at most ``max_sets`` patch keys per component (LRU)
    and ``max_compiled`` models; a recent set is not compiled again; an evicted set compiled again and the
    unpatched model after a patched one give the same bits as before."""
    b = create_backend(EngineConfig(backend="openvino", precision="fp32", cache_dir=cache), sd1, "tiny-sd1",
                       max_sets=2, max_compiled=3)
    compiles = []
    real = xov.dropping_mapped_pages  # entered once per compile
    monkeypatch.setattr(xov, "dropping_mapped_pages", lambda path: compiles.append(path) or real(path))
    feeds = feeds_for(b, "unet", seed=2)
    out = {}
    for step, name in enumerate([None, "kohya", None, "kohya", "peft", "both", None, "both"]):
        b.set_patch(patches[name] if name else EMPTY)
        got = b.run("unet", feeds)["model_output"]
        if name in out:
            np.testing.assert_array_equal(got, out[name], err_msg=f"step {step}: {name} changed")
        out[name] = got
    # compiled: None, kohya (then both cached), peft (evicts None), both (evicts kohya), None again
    assert len(compiles) == 5, compiles
    keys = {k: list(v) for k, v in b._compiled.items()}
    assert set(keys) == {"unet", ("unet", patches["both"].key("unet"))}
    assert sum(len(v) for v in keys.values()) == 2
    assert mad(out[None], out["kohya"]) > 1e-3 and mad(out["kohya"], out["both"]) > 1e-3


def test_a_weight_missing_from_the_ir_is_a_clear_error(sd1, patches, cache):
    """A patched tensor that is not a constant of the IR (or has another shape) is refused naming it; nothing
    is replaced."""
    b = create_backend(EngineConfig(backend="openvino", precision="fp32", cache_dir=cache), sd1, "tiny-sd1")
    b.set_patch(patches["kohya"])
    model = b.model("unet")
    tensors = b.patched_constants("unet")
    before = [c.get_friendly_name() for c in model.get_ops() if c.get_type_name() == "Constant"]
    with pytest.raises(BackendUnavailable, match=r"unet: the LoRA weight no-such-initializer is not a constant"):
        xov.patch_constants(model, tensors + [("no-such-initializer", np.zeros(3, np.float32))], "unet")
    name, value = tensors[0]
    with pytest.raises(BackendUnavailable, match=rf"the LoRA weight {name} is \("):
        xov.patch_constants(model, [(name, value.reshape(-1))], "unet")
    assert [c.get_friendly_name() for c in model.get_ops() if c.get_type_name() == "Constant"] == before
    assert xov.patch_constants(model, tensors, "unet") == len(tensors) > 4


# -- through the pipeline ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_store(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("ov-lora-store")
    (root / "Stable-diffusion").mkdir()
    shutil.copy(tiny_store / "Stable-diffusion" / SD1, root / "Stable-diffusion" / SD1)
    model = load_checkpoint(root / "Stable-diffusion" / SD1)
    save(kohya_lora(model.components, seed=0), root / "Lora" / "kohya.safetensors")
    save(peft_lora(model.components, seed=1), root / "Lora" / "peft.safetensors")
    save(kohya_lora(model.components, seed=2, text=False), root / "LyCORIS" / "locon.safetensors")
    return root


@pytest.fixture(scope="module")
def engines(lora_store, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ov-lora-artefacts")
    made = {}

    def get(backend: str, precision: str = "fp32", fresh: bool = False) -> Engine:
        if fresh:
            return Engine(models_dir=lora_store, backend=backend, precision=precision, cache_dir=cache)
        if (backend, precision) not in made:
            made[backend, precision] = Engine(models_dir=lora_store, backend=backend, precision=precision,
                                              cache_dir=cache)
        return made[backend, precision]

    return get


def _req(prompt: str, **kw) -> GenerationRequest:
    args = dict(model=SD1, prompt=prompt, negative_prompt="blurry", steps=6, seed=5, cfg_scale=6.0,
                sampler_name="Euler")
    args.update(kw)
    return GenerationRequest(**args)


PROMPTS = ["a red circle", "a red circle <lora:kohya:0.8>",
           "a red <lora:kohya:0.3:0.9> circle <lora:peft:unet=0.5:te=-0.4>",
           "a red circle <lora:kohya:0.8> <lora:locon:-0.5>"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_images_match_torch(engines, precision):
    """Images with LoRA sets on openvino vs the torch backend (fp32) with the same sets: f32 within 1/255 MAD,
    bf16 within 3/255 (openvino's tolerances without LoRA); each set moves the image by more than 3/255; the
    infotext keeps the tags and the hashes and names the backend."""
    ov = engines("openvino", precision)
    plain = engines("torch").generate(_req(PROMPTS[0])).images[0]
    for prompt in PROMPTS[1:]:
        ref = engines("torch").generate(_req(prompt))
        got = ov.generate(_req(prompt))
        assert mad(ref.images[0], plain) > 3.0, f"{prompt!r} must move the image for the comparison to mean much"
        assert mad(got.images[0], ref.images[0]) <= MAD[precision], (
            f"{prompt!r}: openvino {precision} vs torch {mad(got.images[0], ref.images[0]):.3f}/255")
        text, _, params = parse_infotext(got.infotexts[0])
        assert text == prompt and params["Lora hashes"] == parse_infotext(ref.infotexts[0])[2]["Lora hashes"]
        assert params["Backend"] == f"openvino {'bf16' if precision == 'bf16' and NATIVE_BF16 else 'f32'}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_switching_sets_is_bit_identical_to_a_fresh_engine(engines, precision, monkeypatch):
    """Back and forth between LoRA sets (and none) on one openvino engine: the same bits as a fresh engine per
    set; no request without LoRA differs from a never-patched engine's; no ONNX export and no IR conversion
    happens because of a LoRA."""
    import export.onnx as xonnx

    calls = []
    real_export, real_save = xonnx.torch_export, xov.import_openvino().save_model
    engines("openvino", precision, fresh=True).generate(_req(PROMPTS[0]))  # the artefacts exist from here on
    monkeypatch.setattr(xonnx, "torch_export", lambda *a, **k: (calls.append(a[1].component), real_export(*a, **k)))
    monkeypatch.setattr(xov.import_openvino(), "save_model", lambda *a, **k: (calls.append(a[1]), real_save(*a, **k)))
    never_patched = engines("openvino", precision, fresh=True).generate(_req(PROMPTS[0])).images[0]
    engine = engines("openvino", precision, fresh=True)
    seen: dict[int, np.ndarray] = {}
    for i in [1, 0, 2, 1, 3, 0, 2, 0]:
        image = engine.generate(_req(PROMPTS[i])).images[0]
        if i in seen:
            np.testing.assert_array_equal(image, seen[i], err_msg=f"{precision}: set {PROMPTS[i]!r} drifted")
        seen[i] = image
    np.testing.assert_array_equal(seen[0], never_patched, err_msg="no LoRA after a LoRA differs from never patched")
    for i in (2, 3):
        fresh = engines("openvino", precision, fresh=True).generate(_req(PROMPTS[i])).images[0]
        np.testing.assert_array_equal(fresh, seen[i], err_msg=f"{precision}: a fresh engine with the set differs")
    assert mad(seen[0], seen[1]) > 3.0 and mad(seen[1], seen[3]) > 1.0
    assert calls == [], f"a LoRA exported or converted: {calls}"


def test_webui_txt2img_with_lora_on_the_default_backend(lora_store, tmp_path):
    """``POST /sdapi/v1/txt2img`` with ``<lora:...>`` on the default CPU backend (openvino where installed):
    200, the LoRA applied (the image differs from the same request without the tag) and named in the infotext."""
    from fastapi.testclient import TestClient

    from api_compat import TaskService
    from api_compat.http import create_app
    from engine.config import BackendKind, default_backend
    from tests.api_support import png_pixels

    assert default_backend("cpu") == BackendKind.OPENVINO
    payload = {"prompt": "a red circle <lora:kohya:0.8>", "negative_prompt": "blurry", "steps": 4, "seed": 5,
               "width": 64, "height": 64, "cfg_scale": 6, "sampler_name": "Euler"}
    with TaskService(lora_store, cache_dir=tmp_path / "cache", results_dir=tmp_path / "out",
                      default_model="tiny-sd1") as service:
        with TestClient(create_app(service), base_url="http://localhost") as client:
            with_lora = client.post("/sdapi/v1/txt2img", json=payload)
            assert with_lora.status_code == 200, with_lora.text
            without = client.post("/sdapi/v1/txt2img", json={**payload, "prompt": "a red circle"})
            assert without.status_code == 200, without.text
    import base64
    import json

    info = json.loads(with_lora.json()["info"])
    assert info["backend"].startswith("openvino ")
    assert "<lora:kohya:0.8>" in info["infotexts"][0] and "Lora hashes: " in info["infotexts"][0]
    a, b = (png_pixels(base64.b64decode(r.json()["images"][0])) for r in (with_lora, without))
    assert mad(a, b) > 1.0


def test_sdxl_patch_matches_torch(tmp_path):
    """SDXL: a kohya LoRA in LDM names over the UNet and both text encoders (``lora_te1_``/``lora_te2_``) on
    openvino f32 vs the torch backend with the same patch, within 1e-4 relL2 (the patch moves each by more)."""
    sdxl = build_tiny("sdxl").components
    lora = read_lora(save(kohya_lora(sdxl, seed=3, ldm_names=True), tmp_path / "xl.safetensors"))
    patch = WeightPatch((LoraUse(map_lora(lora, "xl", "3" * 64, sdxl, "sdxl", {}), 0.6, 0.9),))
    ref = create_backend(EngineConfig(backend="torch", cache_dir=tmp_path), sdxl, "tiny-sdxl")
    ov = create_backend(EngineConfig(backend="openvino", precision="fp32", cache_dir=tmp_path), sdxl, "tiny-sdxl")
    for component in ("unet", "text_encoder", "text_encoder_2"):
        feeds = feeds_for(ref, component, seed=1)
        ref.set_patch(EMPTY)  # the torch backend patches the shared modules in place: not while openvino exports
        ov.set_patch(EMPTY)
        ov.run(component, feeds)
        plain = ref.run(component, feeds)
        ref.set_patch(patch)
        ov.set_patch(patch)
        want, got = ref.run(component, feeds), ov.run(component, feeds)
        for out in want:
            assert rel_l2(got[out], want[out]) <= TOL["fp32"], (component, out, rel_l2(got[out], want[out]))
            assert rel_l2(want[out], plain[out]) > 1e-2, (component, out)
    ref.set_patch(EMPTY)
