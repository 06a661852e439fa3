"""Non-torch backends release the torch weights they do not run (engine.backends.weights).

Reference: the same backend on an unreleased copy of the same tiny model (built from the same seed): outputs
are bit-identical, so releasing changes memory only. After release the module's parameters live on the meta
device (no storage), every artefact made from it exists, and a second backend on the released modules finds
them through the manifests (the weights fingerprint is remembered).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.backends import create_backend
from engine.config import EngineConfig
from core.deferred import DeferredModule
from engine.models.tiny import build_tiny
from export.onnx import is_released

BACKENDS = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("openvino") is None, reason="openvino extra"))]


def feeds_for(backend, component, seed=0):
    desc = backend.descriptor(component)
    return {k: v.numpy() for k, v in desc.sample_inputs(2, 8, 8, 77, seed=seed).items()}


def on_meta(module) -> bool:
    return all(p.device.type == "meta" for p in module.parameters())


@pytest.mark.parametrize("kind", BACKENDS)
def test_release_after_export_keeps_results(kind, tmp_path):
    config = EngineConfig(backend=kind, precision="fp32", cache_dir=tmp_path)
    kept = create_backend(config, build_tiny("sd1").components, "tiny-sd1")
    comps = build_tiny("sd1").components
    released = create_backend(config, comps, "tiny-sd1", release_weights=True)
    for component in ("text_encoder", "unet", "vae_decoder"):
        feeds = feeds_for(kept, component, seed=2)
        a = released.run(component, feeds)
        b = kept.run(component, feeds)
        for out in b:
            np.testing.assert_array_equal(a[out], b[out])
    for source in ("text_encoder", "unet", "vae"):
        assert is_released(comps[source]) and on_meta(comps[source]), source
    # the siblings were exported before the release: unet_control (ControlNet) and vae_encoder still run
    for component in ("unet_control", "vae_encoder"):
        feeds = feeds_for(kept, component, seed=3)
        np.testing.assert_array_equal(released.run(component, feeds)[kept.descriptor(component).output_names[0]],
                                      kept.run(component, feeds)[kept.descriptor(component).output_names[0]])
    assert comps["unet"].config.block_out_channels  # configs stay (descriptors, pixel multiple)
    # a new backend on the released modules finds the artefacts through their manifests
    again = create_backend(config, comps, "tiny-sd1")
    feeds = feeds_for(kept, "vae_decoder", seed=4)
    np.testing.assert_array_equal(again.run("vae_decoder", feeds)["image"], kept.run("vae_decoder", feeds)["image"])


def test_export_from_released_weights_is_refused(tmp_path):
    comps = build_tiny("sd1").components
    first = create_backend(EngineConfig(backend="onnxruntime", cache_dir=tmp_path / "a"), comps, "h",
                           release_weights=True)
    first.run("vae_decoder", feeds_for(first, "vae_decoder"))
    empty = create_backend(EngineConfig(backend="onnxruntime", cache_dir=tmp_path / "b"), comps, "h")
    with pytest.raises(RuntimeError, match="released"):
        empty.run("vae_decoder", feeds_for(first, "vae_decoder"))


def test_backends_keep_weights_by_default(tmp_path):
    comps = build_tiny("sd1").components
    b = create_backend(EngineConfig(backend="onnxruntime", cache_dir=tmp_path), comps, "h")
    b.run("vae_decoder", feeds_for(b, "vae_decoder"))
    assert not is_released(comps["vae"]) and not on_meta(comps["vae"])


def test_owned_modules_release_only_on_backends_that_run_exported_graphs(tmp_path):
    """``create_backend(..., owned=True)`` (what the Engine does) turns the release on for onnxruntime and
    openvino (their LoRA merges read the base weights from the artefacts), not for torch (it runs the modules)."""
    comps = build_tiny("sd1").components
    ort_b = create_backend(EngineConfig(backend="onnxruntime", cache_dir=tmp_path), comps, "h", owned=True)
    assert ort_b.release_weights is True
    if __import__("importlib").util.find_spec("openvino") is not None:
        ov_b = create_backend(EngineConfig(backend="openvino", cache_dir=tmp_path), comps, "h", owned=True)
        assert ov_b.release_weights is True
    torch_b = create_backend(EngineConfig(backend="torch"), build_tiny("sd1").components, "h", owned=True)
    feeds = feeds_for(torch_b, "vae_decoder")
    torch_b.run("vae_decoder", feeds)
    assert not is_released(torch_b._components["vae"])


# ------------------------------------------------------------------------------------- load from cache, no weights
ENGINE_BACKENDS = ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("openvino") is None, reason="openvino extra"))]


def _requests():
    from engine.request import GenerationRequest, InitImage

    txt = GenerationRequest(model="tiny-sd1", prompt="a red house", steps=3, width=64, height=64, seed=5)
    init = (np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3) * 7) % 251
    img = GenerationRequest(model="tiny-sd1", prompt="a red house", steps=4, width=64, height=64, seed=6,
                            init=InitImage(init.astype(np.uint8), 0.6))
    return txt, img


def _no_tensor_reads(monkeypatch):
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint's tensors were read")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)


def config_dict(module) -> dict:
    cfg = module.config
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sd1-diffusers", "tiny-sdxl"])
def test_meta_load_builds_the_same_modules(tiny_store, model):
    """``load_checkpoint(meta=True)`` (headers only) builds the modules, configs, family and prediction type a
    full load builds (webui single file and diffusers folder), with every parameter on the meta device."""
    from engine.models.checkpoints import load_checkpoint

    path = tiny_store / "Stable-diffusion" / (model if model.endswith("diffusers") else f"{model}.safetensors")
    full = load_checkpoint(path, sha256="ab" * 32)
    meta = load_checkpoint(path, sha256="ab" * 32, meta=True)
    assert meta.meta and not full.meta
    assert (meta.arch, meta.prediction_type, meta.native_size) == (full.arch, full.prediction_type, full.native_size)
    assert meta.family.artefact_key == full.family.artefact_key
    np.testing.assert_array_equal(meta.alphas_cumprod, full.alphas_cumprod)
    for key, module in full.components.items():
        if not hasattr(module, "state_dict"):
            continue
        assert config_dict(meta.components[key]) == config_dict(module), key
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
        assert {k: (tuple(v.shape), v.dtype) for k, v in meta.components[key].state_dict().items()} == shapes, key
        assert on_meta(meta.components[key]), key


def test_meta_load_refuses_what_needs_the_weights(tmp_path):
    """A pickle's layout is only known by unpickling: ``meta=True`` says so (the store then loads it fully)."""
    from engine.models.checkpoints import NeedsWeights, read_state_dict

    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(NeedsWeights, match="safetensors header"):
        read_state_dict(tmp_path / "x.ckpt", allow_pickle=True, meta=True)


@pytest.mark.parametrize("kind", ENGINE_BACKENDS)
def test_load_from_cache_reads_no_weights(kind, tiny_store, tmp_path, monkeypatch):
    """A second engine on a warm artefact cache builds the model from the file headers and never reads its
    tensors (``safetensors.torch.load_file`` refuses here): txt2img and img2img (VAE encoder) images are
    bit-identical to the engine that exported (reference: the same backend with the torch weights loaded)."""
    from engine.pipeline import Engine

    txt, img = _requests()
    first = Engine(models_dir=tiny_store, cache_dir=tmp_path, backend=kind, precision="fp32")
    expected = [np.asarray(first.generate(r).images[0]) for r in (txt, img)]
    _no_tensor_reads(monkeypatch)
    second = Engine(models_dir=tiny_store, cache_dir=tmp_path, backend=kind, precision="fp32")
    rt = second.runtime("tiny-sd1")
    assert rt.model.meta
    for r, want in zip((txt, img), expected):
        np.testing.assert_array_equal(np.asarray(second.generate(r).images[0]), want)
    # the modules came from the store's module card (core.deferred) and nothing built them: configs sufficed
    for source in ("text_encoder", "unet", "vae"):
        module = rt.model.components[source]
        assert isinstance(module, DeferredModule) and not module.built, source
        assert is_released(module) and on_meta(module), source  # on_meta builds it: headers only, no tensor read


@pytest.mark.parametrize("kind", ENGINE_BACKENDS)
def test_missing_artefact_loads_the_weights_back(kind, tiny_store, tmp_path):
    """An artefact deleted after a load from cache (the VAE encoder's): the img2img request that needs it loads
    the weights back, exports, releases them again, and paints the same image as the exporting engine."""
    import shutil

    from engine.pipeline import Engine

    txt, img = _requests()
    first = Engine(models_dir=tiny_store, cache_dir=tmp_path, backend=kind, precision="fp32")
    want_txt, want_img = (np.asarray(first.generate(r).images[0]) for r in (txt, img))
    second = Engine(models_dir=tiny_store, cache_dir=tmp_path, backend=kind, precision="fp32")
    rt = second.runtime("tiny-sd1")
    np.testing.assert_array_equal(np.asarray(second.generate(txt).images[0]), want_txt)
    assert is_released(rt.model.components["vae"])
    shutil.rmtree(tmp_path / rt.model.family.artefact_key / "vae_encoder")
    np.testing.assert_array_equal(np.asarray(second.generate(img).images[0]), want_img)
    stage = rt.backend.artefact("vae_encoder").directory  # onnx-fp32 (onnxruntime) or onnx-fp32-full (openvino)
    assert stage.parent == tmp_path / rt.model.family.artefact_key / "vae_encoder" and (stage / "model.onnx").is_file()
    assert is_released(rt.model.components["vae"]) and on_meta(rt.model.components["vae"])


@pytest.mark.parametrize("kind", ENGINE_BACKENDS)
def test_cold_txt2img_exports_only_what_it_runs(kind, tiny_store, tmp_path):
    """A cold txt2img exports the text encoder, the UNet and the VAE decoder -- not unet_control (ControlNet) nor
    vae_encoder (img2img), which it never runs; the first img2img then exports the encoder through the weights
    loader, and paints what an engine that had it from the start paints (reference: a fresh engine on a fresh
    cache; tolerance: none)."""
    from engine.pipeline import Engine

    txt, img = _requests()
    engine = Engine(models_dir=tiny_store, cache_dir=tmp_path / "a", backend=kind, precision="fp32")
    engine.generate(txt)
    key = engine.runtime("tiny-sd1").model.family.artefact_key
    exported = {p.name for p in (tmp_path / "a" / key).iterdir() if p.is_dir()}
    assert exported == {"text_encoder", "unet", "vae_decoder"}, exported
    got = np.asarray(engine.generate(img).images[0])
    assert (tmp_path / "a" / key / "vae_encoder").is_dir()
    assert is_released(engine.runtime("tiny-sd1").model.components["vae"])
    fresh = Engine(models_dir=tiny_store, cache_dir=tmp_path / "b", backend=kind, precision="fp32")
    np.testing.assert_array_equal(got, np.asarray(fresh.generate(img).images[0]))


# ------------------------------------------------------------------------------------- cold start, one module at a time
@pytest.mark.parametrize("kind", ENGINE_BACKENDS[1:])  # the CPU default (the path is the same on onnxruntime)
def test_cold_start_holds_one_module_weights_at_a_time(kind, tiny_store, tmp_path, monkeypatch):
    """Issue 29's cold start: on an empty cache each export loads its own module's weights only (the store is
    asked for that module alone) and, while it traces, no other module holds torch weights (the ones exported
    before were released, the ones after not loaded yet; engine.backends.weights.export_ahead runs them all at
    load, before anything is compiled); the image is bit-identical to the same backend's on
    modules whose weights were all loaded up front (reference: the load before this change, every module read
    at once; tolerance: none)."""
    import engine.pipeline as pipeline
    import export.onnx as xonnx
    from core.deferred import real_module
    from engine.models.store import ModelStore
    from engine.pipeline import Engine

    txt, _ = _requests()
    with monkeypatch.context() as m:  # the reference: weights loaded with the modules (no meta load)
        m.setattr(pipeline, "RELEASES_WEIGHTS", frozenset())
        want = np.asarray(Engine(models_dir=tiny_store, cache_dir=tmp_path / "ref", backend=kind,
                                 precision="fp32").generate(txt).images[0])
    loads, traced = [], []
    real_load, real_export = ModelStore.load_weights, xonnx.torch_export
    monkeypatch.setattr(ModelStore, "load_weights",
                        lambda self, model, *a, only=None, **k: loads.append(only) or real_load(self, model, *a,
                                                                                                 only=only, **k))
    engine = Engine(models_dir=tiny_store, cache_dir=tmp_path / "cold", backend=kind, precision="fp32")
    model = engine.store.load_model("tiny-sd1", meta=True)  # the store keeps it: the model runtime() takes
    modules = {k: v for k, v in model.components.items() if k in ("text_encoder", "unet", "vae")}

    def spy(wrapper, desc, path, opset):
        traced.append((desc.component, sorted(k for k, v in modules.items() if not on_meta(real_module(v)))))
        return real_export(wrapper, desc, path, opset)

    monkeypatch.setattr(xonnx, "torch_export", spy)
    np.testing.assert_array_equal(np.asarray(engine.generate(txt).images[0]), want)
    assert engine.runtime("tiny-sd1").model is model
    assert traced == [("text_encoder", ["text_encoder"]), ("unet", ["unet"]), ("vae_decoder", ["vae"])], traced
    assert loads == [("text_encoder",), ("unet",), ("vae",)], loads
    assert all(is_released(v) and on_meta(v) for v in modules.values())


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sd1-diffusers"])
def test_load_modules_builds_only_what_is_asked(tiny_store, model, monkeypatch):
    """``load_modules(path, only)``: the named modules with exactly the weights a full load gives them, and no
    other module; a diffusers folder reads only those modules' files (reference: load_checkpoint's modules)."""
    from engine.models import checkpoints

    path = tiny_store / "Stable-diffusion" / (model if model.endswith("diffusers") else f"{model}.safetensors")
    full = checkpoints.load_checkpoint(path)
    read = []
    real = checkpoints.read_state_dict
    monkeypatch.setattr(checkpoints, "read_state_dict", lambda p, *a, **k: read.append(p) or real(p, *a, **k))
    for only in (("vae",), ("unet",), ("text_encoder",)):
        read.clear()
        got = checkpoints.load_modules(path, only)
        assert set(got) == set(only)
        want = full.components[only[0]].state_dict()
        have = got[only[0]].state_dict()
        assert set(have) == set(want)
        for key, value in want.items():
            assert have[key].dtype == value.dtype and bool((have[key] == value).all()), (only, key)
        if path.is_dir():
            assert read and all(p.parent.name == only[0] for p in read), read
