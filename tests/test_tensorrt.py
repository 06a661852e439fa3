"""TensorRT path, tested up to the boundary: TensorRT itself cannot be installed here and has NOT run.

Covered: the MissingDependency error, engine cache keys and directory names, profiles, profile range checks,
the ONNX preparation (vs the unprepared graph on the CPU EP, relL2 <= 1e-5), and the build/caching logic
against a recording stand-in for the ``tensorrt`` module that implements only the documented calls we make
(it checks which calls and arguments we pass, not that TensorRT accepts them).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest

import export.onnx as xonnx
import export.tensorrt as xtrt
from engine.backends import create_backend
from engine.config import EngineConfig
from core.errors import BackendUnavailable, InvalidRequest, MissingDependency
from engine.models.tiny import build_tiny
from export.descriptors import ShapeConfig, describe
from export.onnx import export_component
from export.tensorrt import (check_in_profile, engine_dir_name, engine_key, engine_precision, prepare_onnx)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1").components


@pytest.fixture(scope="module")
def unet_onnx(sd1, tmp_path_factory):
    return export_component("unet", sd1, "tiny-sd1", tmp_path_factory.mktemp("trt-cache"))


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_missing_tensorrt_is_a_clear_error(sd1):
    with pytest.raises(MissingDependency, match=r"tensorrt.*pip install 'sdengine\[tensorrt\]'"):
        create_backend(EngineConfig(backend="tensorrt", device="cuda"), sd1, "h")


def test_tensorrt_needs_cuda(sd1, monkeypatch):
    monkeypatch.setattr(xtrt, "import_tensorrt", lambda: types.SimpleNamespace())
    with pytest.raises(BackendUnavailable, match="CUDA"):
        create_backend(EngineConfig(backend="tensorrt", device="cpu"), sd1, "h")


def test_engine_key_changes_with_each_ingredient():
    sc = ShapeConfig()
    prof = {"sample": ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 128, 128))}
    base = engine_key("a" * 64, "fp16", prof, sc, "10.13.0", "NVIDIA H100 80GB HBM3")
    assert base["profile"] == {"sample": [[1, 4, 32, 32], [2, 4, 64, 64], [4, 4, 128, 128]]}
    variants = [
        engine_key("b" * 64, "fp16", prof, sc, "10.13.0", "NVIDIA H100 80GB HBM3"),
        engine_key("a" * 64, "fp32", prof, sc, "10.13.0", "NVIDIA H100 80GB HBM3"),
        engine_key("a" * 64, "fp16", {"sample": ((1, 4, 32, 32),) * 3}, sc, "10.13.0", "NVIDIA H100 80GB HBM3"),
        engine_key("a" * 64, "fp16", prof, sc, "10.14.1", "NVIDIA H100 80GB HBM3"),
        engine_key("a" * 64, "fp16", prof, sc, "10.13.0", "NVIDIA H200"),
    ]
    assert all(v != base for v in variants)
    name = engine_dir_name("0123456789abcdef" * 4, "fp16", sc, "10.13.0", "NVIDIA H100 80GB HBM3")
    assert name == "0123456789abcdef-fp16-b1-2-4_i256-512-1024_t1-1-3-trt10.13.0-NVIDIA_H100_80GB_HBM3"


def test_engine_precision_policy(sd1):
    sdxl = build_tiny("sdxl").components
    assert engine_precision(describe("vae_decoder", sdxl), "fp16") == "fp32"
    assert engine_precision(describe("unet", sd1), "fp16") == "fp16"
    with pytest.raises(InvalidRequest, match="precision"):
        engine_precision(describe("unet", sd1), "int8")


def test_check_in_profile(sd1):
    prof = describe("unet", sd1).profile(ShapeConfig(batch=(1, 1, 2), image=(256, 512, 512), token_chunks=(1, 1, 2)))
    check_in_profile(prof, {"sample": (2, 4, 48, 64), "timestep": (2,), "encoder_hidden_states": (2, 154, 32)})
    with pytest.raises(InvalidRequest, match="sample.*outside"):
        check_in_profile(prof, {"sample": (1, 4, 80, 64), "timestep": (1,), "encoder_hidden_states": (1, 77, 32)})
    with pytest.raises(InvalidRequest, match="encoder_hidden_states"):
        check_in_profile(prof, {"sample": (1, 4, 64, 64), "timestep": (1,), "encoder_hidden_states": (1, 231, 32)})


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def test_prepare_onnx_keeps_the_function(unet_onnx):
    """Prepared graph (constant-folded, shape-inferred) == the exported graph on the CPU EP (relL2 <= 1e-5)."""
    import onnx

    prepared = prepare_onnx(unet_onnx)
    assert prepared.directory.name == "onnx-fp32-trt" and prepared.manifest["key"]["parent_sha256"] == unet_onnx.sha256
    before, after = onnx.load(str(unet_onnx.path)), onnx.load(str(prepared.path))
    assert len(after.graph.node) < len(before.graph.node)
    assert len(after.graph.value_info) > 0  # shapes inferred
    assert {n.domain for n in after.graph.node} <= {"", "ai.onnx"}  # standard ops only: TensorRT parses them
    feeds = unet_onnx.descriptor.sample_inputs(batch=3, height=6, width=10, tokens=154, seed=4)
    a, b = _run(unet_onnx.path, feeds), _run(prepared.path, feeds)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) <= 1e-5
    mtime = prepared.path.stat().st_mtime_ns
    assert prepare_onnx(unet_onnx).path.stat().st_mtime_ns == mtime  # manifest cache hit


def test_prepare_onnx_big_model_single_data_file(sd1, tmp_path, monkeypatch):
    monkeypatch.setattr(xonnx, "EXTERNAL_DATA_BYTES", 1000)
    art = export_component("vae_decoder", {"vae": sd1["vae"]}, "big", tmp_path)
    prepared = prepare_onnx(art)
    assert sorted(p.name for p in prepared.directory.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data"]
    feeds = art.descriptor.sample_inputs(batch=1, height=4, width=6)
    a, b = _run(art.path, feeds), _run(prepared.path, feeds)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) <= 1e-5


# -- build logic against a recording stand-in of the documented tensorrt API ----------------------------------

class _Rec:
    def __init__(self, log, name):
        self._log, self._name = log, name

    def __getattr__(self, attr):
        if attr in _PROPERTIES:
            return _PROPERTIES[attr]

        def call(*args, **kwargs):
            self._log.append((f"{self._name}.{attr}", args))
            return _RESULTS.get(attr, lambda *a: _Rec(self._log, attr))(*args)
        return call


_PROPERTIES = {"num_errors": 0}  # read-only properties of the real API
_RESULTS = {
    "parse_from_file": lambda path: True,
    "build_serialized_network": lambda net, cfg: b"PLAN",
    "serialize": lambda: b"TIMING",
    "refit_from_file": lambda path: True,
    "get_missing_weights": lambda: [],
    "refit_cuda_engine": lambda: True,
}


def fake_tensorrt(log):
    trt = types.SimpleNamespace(__version__="10.99.0")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Builder = lambda logger: _Rec(log, "builder")
    trt.OnnxParser = lambda network, logger: _Rec(log, "parser")
    trt.Refitter = lambda engine, logger: _Rec(log, "refitter")
    trt.OnnxParserRefitter = lambda refitter, logger: _Rec(log, "parser_refitter")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16", REFIT="REFIT")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    return trt


def test_build_engine_calls_and_cache(unet_onnx, tmp_path, monkeypatch):
    log: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log))
    monkeypatch.setattr(xtrt, "gpu_name", lambda device="cuda": "Fake GPU")
    prepared = prepare_onnx(unet_onnx)
    sc = ShapeConfig(batch=(1, 2, 4), image=(256, 512, 768), token_chunks=(1, 1, 2))
    plan = xtrt.build_engine(prepared, sc, "fp16", tmp_path)
    assert plan.read_bytes() == b"PLAN" and plan.name == "engine.plan"
    assert plan.parent.parent == tmp_path / "tiny-sd1" / "unet"
    assert plan.parent.name.startswith(prepared.sha256[:16] + "-fp16-b1-2-4_i256-512-768_t1-1-2-trt10.99.0-Fake_GPU")
    calls = [c for c, _ in log]
    assert ("parser.parse_from_file", (str(prepared.path),)) in log
    assert ("set_flag", ("FP16",)) in [(c.split(".")[-1], a) for c, a in log]
    assert ("set_flag", ("REFIT",)) in [(c.split(".")[-1], a) for c, a in log]
    shapes = {a[0]: a[1:] for c, a in log if c.endswith("set_shape")}
    assert shapes == {k: v for k, v in prepared.descriptor.profile(sc).items()}
    assert (tmp_path / "timing" / "trt10.99.0-Fake_GPU.cache").read_bytes() == b"TIMING"
    n = len(calls)
    assert xtrt.build_engine(prepared, sc, "fp16", tmp_path) == plan and len(log) == n  # cache hit: no build
    xtrt.build_engine(prepared, sc, "fp32", tmp_path)  # another precision: another engine
    assert len(log) > n and ("set_flag", ("FP16",)) not in [(c.split(".")[-1], a) for c, a in log[n:]]


def test_failed_parse_leaves_no_engine(unet_onnx, tmp_path, monkeypatch):
    log: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log))
    monkeypatch.setitem(_RESULTS, "parse_from_file", lambda path: False)
    monkeypatch.setattr(xtrt, "gpu_name", lambda device="cuda": "Fake GPU")
    prepared = prepare_onnx(unet_onnx)
    with pytest.raises(RuntimeError, match="could not parse"):
        xtrt.build_engine(prepared, ShapeConfig(), "fp16", tmp_path)
    assert not (tmp_path / "tiny-sd1").exists()


def test_refit_calls_and_missing_weights(tmp_path, monkeypatch):
    log: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log))
    xtrt.refit_engine(object(), tmp_path / "model.onnx")
    assert [c for c, _ in log] == ["parser_refitter.refit_from_file", "refitter.get_missing_weights",
                                   "refitter.refit_cuda_engine"]
    assert log[0][1] == (str(tmp_path / "model.onnx"),)
    monkeypatch.setitem(_RESULTS, "get_missing_weights", lambda: ["unet.conv_in.weight"])
    with pytest.raises(RuntimeError, match="lacks 1 weights"):
        xtrt.refit_engine(object(), tmp_path / "model.onnx")


def test_lora_refit_weights_reproduce_the_patched_unet(sd1, unet_onnx, tmp_path, monkeypatch):
    """The LoRA refit path up to TensorRT: the backend refits a built engine from the prepared graph plus the
    patched tensors by initializer name (set_named_weights), and those tensors, written into the prepared
    graph in place of the originals, make it compute the torch-patched UNet (CPU EP, relL2 <= 1e-5)."""
    import copy

    import onnx
    import torch
    from onnx import numpy_helper

    from engine.backends.tensorrt import TensorRTBackend
    from engine.networks.lora import EMPTY, LoraUse, MappedLora, WeightPatch
    from engine.networks.files import LoraLayer
    from tests.lora_support import UNET_TARGETS, factors, targets

    log: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log))
    monkeypatch.setitem(_RESULTS, "set_named_weights", lambda name, weights: True)
    sys.modules["tensorrt"].Weights = lambda array: ("Weights", array.shape)
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in targets(sd1["unet"], UNET_TARGETS):
        down, up = factors(module, 4, gen, 0.5)
        layers[f"{name}.weight"] = LoraLayer(down, up, 2.0)
    patch = WeightPatch((LoraUse(MappedLora("x", "ab" * 32, {"unet": layers}), 1.0, 0.7),))

    backend = TensorRTBackend(EngineConfig(backend="tensorrt", device="cuda", cache_dir=tmp_path), sd1, "tiny-sd1")
    prepared = prepare_onnx(unet_onnx)
    refits = []
    backend._prepared_arts["unet"] = prepared
    backend._engines["unet"] = types.SimpleNamespace(refit=lambda path, named: refits.append((path, named)))
    backend.set_patch(patch)
    backend.set_patch(patch)  # unchanged: no second refit
    assert len(refits) == 1 and refits[0][0] == prepared.path
    named = refits[0][1]
    assert len(named) == len(layers)  # every touched weight found in the prepared graph
    backend.set_patch(EMPTY)
    assert refits[-1] == (prepared.path, {})  # back to the base weights of the graph

    # the tensors reproduce the patched UNet when written into the prepared graph
    model = onnx.load(str(prepared.path))
    for init in model.graph.initializer:
        if init.name in named:
            init.CopyFrom(numpy_helper.from_array(named[init.name], init.name))
    onnx.save_model(model, str(tmp_path / "patched.onnx"), save_as_external_data=True,
                    location="patched.onnx.data")
    unet = copy.deepcopy(sd1["unet"])
    with torch.no_grad():
        for param, layer in layers.items():
            w = unet.get_parameter(param)
            w += (0.7 * layer.scale * layer.delta()).reshape(w.shape)
    desc = describe("unet", sd1)
    feeds = desc.sample_inputs(batch=1, height=8, width=8)
    with torch.no_grad():
        ref = desc.wrapper(unet)(*[feeds[n] for n in desc.input_names]).numpy()
        base = desc.wrapper(sd1["unet"])(*[feeds[n] for n in desc.input_names]).numpy()
    got = ort.InferenceSession(str(tmp_path / "patched.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in feeds.items()})[0]
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert rel(got, ref) <= 1e-5 and rel(base, ref) > 1e-2

    # refit_engine hands the named tensors to the refitter after the base weights
    log.clear()
    xtrt.refit_engine(object(), prepared.path, named)
    calls = [c for c, _ in log]
    assert calls[0] == "parser_refitter.refit_from_file" and calls[-1] == "refitter.refit_cuda_engine"
    assert sorted(a[0] for c, a in log if c == "refitter.set_named_weights") == sorted(named)


def test_default_profile_covers_img2img_and_a_512_hires_pass(sd1):
    """The default ShapeConfig (sides 256..1024 px) covers the VAE encoder of img2img and a 512 -> 1024 hires
    second pass (UNet, encoder, decoder at 1024); a 768 -> 1536 pass is refused naming the input and the
    supported range (rebuild with a wider ShapeConfig)."""
    sc = ShapeConfig()
    enc = describe("vae_encoder", sd1).profile(sc)
    check_in_profile(enc, {"image": (1, 3, 512, 512)})
    check_in_profile(enc, {"image": (2, 3, 1024, 1024)})
    unet = describe("unet", sd1).profile(sc)
    check_in_profile(unet, {"sample": (2, 4, 128, 128), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)})
    dec = describe("vae_decoder", sd1).profile(sc)
    check_in_profile(dec, {"latent": (1, 4, 128, 128)})
    with pytest.raises(InvalidRequest, match="image.*outside") as exc:
        check_in_profile(enc, {"image": (1, 3, 1536, 1536)})
    assert "1024" in exc.value.allowed
