"""The openvino backend on the tiny models, and the choice of the CPU default backend.

Reference: engine.backends.torch.TorchBackend in fp32 (the export.wrappers modules, eager), as for onnxruntime.
Tolerances:
- f32 inference precision: per component relative L2 <= 1e-4 (the ONNX tolerance of test_backends); images
  through the pipeline within 1/255 mean absolute difference (as onnxruntime in test_pipeline).
- bf16 inference precision (only where the CPU has native bf16, else OpenVINO runs f32): per component
  relative L2 <= 8e-2 (bf16 keeps 8 mantissa bits: 2^-8 ~ 4e-3 per value, accumulated over the layers);
  images within 3/255 mean absolute difference of the fp32 torch images.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("openvino", reason="the openvino extra is part of the dev extra")

import engine.backends.openvino as xov  # noqa: E402
from engine.backends import create_backend  # noqa: E402
from engine.backends.openvino import IR_FP16_STAGE, IR_STAGE, OpenVinoBackend, import_openvino, inference_precision  # noqa: E402
from engine.config import BackendKind as Backend, EngineConfig, Precision, default_backend, default_precision  # noqa: E402
from core.cpu import native_bf16  # noqa: E402
from core.errors import BackendUnavailable, InvalidRequest  # noqa: E402
from engine.models.tiny import build_tiny  # noqa: E402
from engine.pipeline import Engine  # noqa: E402
from engine.request import ControlNetUnit, GenerationRequest  # noqa: E402

TOL_F32 = 1e-4
TOL_BF16 = 8e-2
MAD_F32 = 1.0
MAD_BF16 = 3.0
NATIVE_BF16 = "BF16" in xov.cpu_capabilities()


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def mad(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1").components


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="module")
def backends(sd1, cache):
    return {
        "torch": create_backend(EngineConfig(backend="torch", cache_dir=cache), sd1, "tiny-sd1"),
        "f32": create_backend(EngineConfig(backend="openvino", precision="fp32", cache_dir=cache), sd1, "tiny-sd1"),
        "bf16": create_backend(EngineConfig(backend="openvino", precision="bf16", cache_dir=cache), sd1, "tiny-sd1"),
    }


def feeds_for(backend, component, batch=2, height=6, width=10, tokens=77, seed=0):
    desc = backend.descriptor(component)
    return {k: v.numpy() for k, v in desc.sample_inputs(batch, height, width, tokens, seed=seed).items()}


@pytest.mark.parametrize("component", ["text_encoder", "unet", "unet_control", "vae_decoder", "vae_encoder"])
def test_openvino_matches_torch_backend(backends, component):
    """f32: relL2 <= 1e-4 vs torch fp32; bf16: <= 8e-2, and really bf16 (not equal to f32) on a bf16 CPU."""
    feeds = feeds_for(backends["torch"], component, seed=3)
    ref = backends["torch"].run(component, feeds)
    f32 = backends["f32"].run(component, feeds)
    bf16 = backends["bf16"].run(component, feeds)
    for out in ref:
        assert isinstance(f32[out], np.ndarray) and f32[out].dtype == np.float32
        assert f32[out].shape == ref[out].shape
        assert rel_l2(f32[out], ref[out]) <= TOL_F32, f"f32 {component}/{out}: {rel_l2(f32[out], ref[out]):.2e}"
        assert rel_l2(bf16[out], ref[out]) <= TOL_BF16, f"bf16 {component}/{out}: {rel_l2(bf16[out], ref[out]):.2e}"
        if NATIVE_BF16:
            assert rel_l2(bf16[out], f32[out]) > 1e-4, "bf16 asked on a bf16 CPU but the results are f32's"


def test_controlnet_component_matches_torch(cache):
    cn = build_tiny("controlnet_sd1").components
    torch_b = create_backend(EngineConfig(backend="torch"), cn, "tiny-cn")
    ov_b = create_backend(EngineConfig(backend="openvino", precision="fp32", cache_dir=cache), cn, "tiny-cn")
    feeds = feeds_for(torch_b, "controlnet", seed=5)
    ref, got = torch_b.run("controlnet", feeds), ov_b.run("controlnet", feeds)
    assert set(got) == set(ref) and len(ref) > 2
    for out in ref:
        assert rel_l2(got[out], ref[out]) <= TOL_F32, out


def test_static_shapes_are_compiled_per_shape_and_bounded(sd1, cache):
    """One compiled model per input shape set, at most ``max_compiled`` kept (LRU); a shape compiled again
    after eviction gives the same result; torch tensors are accepted."""
    b = create_backend(EngineConfig(backend="openvino", precision="fp32", cache_dir=cache), sd1, "tiny-sd1",
                       max_compiled=2)
    first = feeds_for(b, "vae_decoder", 1, 4, 4, seed=1)
    r1 = b.run("vae_decoder", first)["image"]
    for h in (6, 8, 10):
        b.run("vae_decoder", feeds_for(b, "vae_decoder", 1, h, 4, seed=2))
    shapes = [dict(k)["latent"] for k in b._compiled["vae_decoder"]]
    assert shapes == [(1, 4, 8, 4), (1, 4, 10, 4)]
    again = b.run("vae_decoder", {k: torch.from_numpy(v) for k, v in first.items()})["image"]
    np.testing.assert_array_equal(r1, again)
    assert len(b._compiled["vae_decoder"]) == 2


def test_ir_is_converted_once_and_rebuilt_for_another_openvino(sd1, tmp_path, monkeypatch):
    ov = import_openvino()
    calls = []
    real = ov.save_model
    monkeypatch.setattr(ov, "save_model", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    config = EngineConfig(backend="openvino", precision="fp32", cache_dir=tmp_path)
    feeds = feeds_for(create_backend(config, {"vae": sd1["vae"]}, "h"), "vae_decoder", 1, 4, 4)
    a = create_backend(config, {"vae": sd1["vae"]}, "h").run("vae_decoder", feeds)["image"]
    b = create_backend(config, {"vae": sd1["vae"]}, "h").run("vae_decoder", feeds)["image"]
    assert len(calls) == 1 and (tmp_path / "h" / "vae_decoder" / IR_STAGE / "model.xml").is_file()
    np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(ov, "__version__", "0.0-other")
    create_backend(config, {"vae": sd1["vae"]}, "h").run("vae_decoder", feeds)
    assert len(calls) == 2  # the manifest key names the openvino version: a mismatch rebuilds


def test_bf16_compiles_read_fp16_weights_f32_compiles_fp32(sd1, tmp_path):
    """The IR a compile reads follows the inference precision: bf16 -> ``openvino-ir-fp16`` (weights stored
    fp16: half the bytes), f32 -> ``openvino-ir`` (fp32, parity). Both sit beside the same ONNX artefact."""
    feeds = None
    for precision, caps in (("fp32", ("FP32",)), ("bf16", ("FP32", "BF16"))):
        config = EngineConfig(backend="openvino", precision=precision, cache_dir=tmp_path)
        b = create_backend(config, {"vae": sd1["vae"]}, "h", capabilities=caps)
        feeds = feeds or feeds_for(b, "vae_decoder", 1, 4, 4)
        b.run("vae_decoder", feeds)
    fp32 = (tmp_path / "h" / "vae_decoder" / IR_STAGE / "model.bin").stat().st_size
    fp16 = (tmp_path / "h" / "vae_decoder" / IR_FP16_STAGE / "model.bin").stat().st_size
    assert 0.45 < fp16 / fp32 < 0.6, (fp16, fp32)


def mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    target, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                inside = len(head) >= 6 and head[5] == target
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps")
def test_compiled_models_keep_no_mapped_ir_pages(sd1, tmp_path):
    """bf16: after a compile the IR's weight file stays mapped (the compiled model holds it) but none of its
    pages stay resident (drop_mapped_pages), and the results do not change: the compiled model runs its own
    bf16 copy (reference: the same compiled model's first output, bit-identical). (f32 compiles read some
    constants in place; those pages fault back in, which is the same memory, not a copy.)"""
    from engine.backends.openvino import drop_mapped_pages

    config = EngineConfig(backend="openvino", precision="bf16", cache_dir=tmp_path)
    b = create_backend(config, {"vae": sd1["vae"]}, "h", capabilities=("FP32", "BF16"))
    feeds = feeds_for(b, "vae_decoder", 1, 4, 4)
    first = b.run("vae_decoder", feeds)["image"]
    weights = tmp_path / "h" / "vae_decoder" / IR_FP16_STAGE / "model.bin"
    assert weights.stat().st_size > 100_000
    assert mapped_rss(weights) == 0
    np.testing.assert_array_equal(b.run("vae_decoder", feeds)["image"], first)
    # a mapping that is read again faults its pages back from the file: transparent
    model = import_openvino().Core().read_model(str(weights.with_suffix(".xml")))
    before = [c.get_data().copy() for c in model.get_ordered_ops() if c.get_type_name() == "Constant"][:3]
    assert drop_mapped_pages(weights) > 0
    after = [c.get_data().copy() for c in model.get_ordered_ops() if c.get_type_name() == "Constant"][:3]
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps")
def test_mapped_pages_are_dropped_while_a_block_reads_them(tmp_path):
    """``dropping_mapped_pages``: pages of a read-only mapping read inside the block do not stay resident while
    the block still runs (what bounds a compile's peak: SD1.5 UNet f32 6.7 -> 3.4 GB), and reading them again
    gives the same bytes."""
    import time

    from engine.backends.openvino import dropping_mapped_pages

    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)  # 16 MiB
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    with dropping_mapped_pages(path, interval=0.02):
        total = float(mapped.sum())  # touches every page
        deadline = time.monotonic() + 5
        while mapped_rss(path) > 1 << 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mapped_rss(path) <= 1 << 20  # dropped while the block runs
    assert mapped_rss(path) == 0
    assert float(mapped.sum()) == total and np.array_equal(np.asarray(mapped[:1000]), data[:1000])


def test_precision_choice_per_machine():
    assert inference_precision(Precision.BF16, ("FP32", "BF16")) == "bf16"
    assert inference_precision(Precision.BF16, ("FP32",)) == "f32"  # warned, and f32
    assert inference_precision(Precision.FP32, ("FP32", "BF16")) == "f32"
    with pytest.raises(InvalidRequest, match="precision"):
        inference_precision(Precision.FP16, ("FP32", "BF16"))
    assert default_precision(Backend.OPENVINO, "cpu", native_bf16=True) == Precision.BF16
    assert default_precision(Backend.OPENVINO, "cpu", native_bf16=False) == Precision.FP32
    assert default_precision(Backend.ONNXRUNTIME, "cpu", native_bf16=True) == Precision.FP32
    # unset precision resolves per machine; an explicit one is kept
    assert EngineConfig(backend="openvino").precision == (Precision.BF16 if native_bf16() else Precision.FP32)
    assert EngineConfig(backend="openvino", precision="fp32").precision == Precision.FP32
    b = OpenVinoBackend(EngineConfig(backend="openvino", precision="bf16"), {}, "h", capabilities=("FP32",))
    assert b.label == "openvino f32"
    b = OpenVinoBackend(EngineConfig(backend="openvino", precision="bf16"), {}, "h", capabilities=("FP32", "BF16"))
    assert b.label == "openvino bf16" and b.compile_properties()["INFERENCE_PRECISION_HINT"] == "bf16"


def test_default_backend_both_ways(monkeypatch):
    """openvino is the CPU default when installed; onnxruntime is the fallback without it, and on CUDA."""
    import engine.config as config

    assert default_backend("cpu", openvino=True) == Backend.OPENVINO
    assert default_backend("cpu", openvino=False) == Backend.ONNXRUNTIME
    assert default_backend("cuda", openvino=True) == Backend.ONNXRUNTIME
    assert EngineConfig().backend == Backend.OPENVINO  # installed here (dev extra)
    monkeypatch.setattr(config, "openvino_installed", lambda: False)
    assert EngineConfig().backend == Backend.ONNXRUNTIME
    assert EngineConfig().precision == Precision.FP32
    assert EngineConfig(backend="openvino").backend == Backend.OPENVINO  # an explicit choice is kept


def test_missing_openvino_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'sdengine\[openvino\]'"):
        import_openvino()


def test_bad_device_and_precision_name_the_field(sd1):
    with pytest.raises(InvalidRequest, match="device"):
        create_backend(EngineConfig(backend="openvino", device="cuda"), sd1, "h")
    with pytest.raises(InvalidRequest, match="precision"):
        create_backend(EngineConfig(backend="openvino", precision="fp16"), sd1, "h")
    with pytest.raises(InvalidRequest, match="unet.timestep"):
        b = create_backend(EngineConfig(backend="openvino"), sd1, "h")
        feeds = feeds_for(b, "unet")
        del feeds["timestep"]
        b.run("unet", feeds)


# -- through the pipeline ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(tiny_store, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ov-artefacts")
    made = {}

    def get(backend: str, precision: str = "fp32") -> Engine:
        if (backend, precision) not in made:
            made[backend, precision] = Engine(models_dir=tiny_store, backend=backend, precision=precision,
                                              cache_dir=cache)
        return made[backend, precision]

    return get


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_pipeline_openvino_matches_torch(engines, model):
    """Images: f32 within 1/255 MAD of torch fp32, bf16 within 3/255 (measured ~0.55); the info names the precision."""
    req = GenerationRequest(model=model, prompt="a red (circle:1.2), blue background", negative_prompt="green",
                            steps=6, seed=11, batch_size=2, sampler_name="DPM++ 2M", scheduler="Karras")
    ref = engines("torch").generate(req)
    f32 = engines("openvino", "fp32").generate(req)
    bf16 = engines("openvino", "bf16").generate(req)
    for a, b, c in zip(ref.images, f32.images, bf16.images):
        assert mad(a, b) <= MAD_F32, f"openvino f32 vs torch: {mad(a, b):.3f}/255"
        assert mad(a, c) <= MAD_BF16, f"openvino bf16 vs torch: {mad(a, c):.3f}/255"
    assert mad(ref.images[0], ref.images[1]) > 1.0  # the images differ between seeds: real content
    assert f32.info["backend"] == "openvino f32" and f32.info["precision"] == "fp32"
    assert bf16.info["precision"] == "bf16"
    # the infotext names the inference precision the CPU really ran
    assert "Backend: openvino f32" in f32.infotexts[0]
    assert f"Backend: openvino {'bf16' if NATIVE_BF16 else 'f32'}" in bf16.infotexts[0]
    assert "Backend: torch" in ref.infotexts[0]


def test_pipeline_openvino_controlnet_matches_torch(engines):
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = 255
    base = GenerationRequest(model="tiny-sd1", prompt="a square", steps=4, seed=3, sampler_name="Euler")
    unit = ControlNetUnit(model="tiny-controlnet-sd1", image=img, module="canny", weight=1.5)
    req = dataclasses.replace(base, controlnet_units=(unit,))
    plain = engines("torch").generate(base)
    ref = engines("torch").generate(req)
    got = engines("openvino", "fp32").generate(req)
    assert mad(plain.images[0], ref.images[0]) > 0.5  # the unit changes the image
    assert mad(ref.images[0], got.images[0]) <= MAD_F32
