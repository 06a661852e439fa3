"""Backends: onnxruntime (CPU EP, and the IO-binding path over CPU torch tensors) vs the torch backend.

Reference: engine.backends.torch.TorchBackend in fp32 (the export.wrappers modules, eager).
Tolerance: relative L2 <= 1e-4 for fp32. GPU providers cannot run here: their selection, error messages
and option dicts are tested; the IO-binding code is exercised with device type "cpu".
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

import export.onnx as xonnx
from engine.backends import Backend, create_backend
from engine.backends.onnxruntime import (CPU, CUDA, TENSORRT, OnnxRuntimeBackend, check_providers, provider_options,
                                         session_options)
from engine.backends.torch import TorchBackend
from engine.config import EngineConfig
from core.errors import BackendUnavailable, InvalidRequest
from engine.models.tiny import build_tiny
from export.descriptors import ShapeConfig

TOL = 1e-4


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1").components


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("backend-cache")


@pytest.fixture(scope="module")
def backends(sd1, cache):
    cfg = dict(cache_dir=cache)
    return {
        "torch": create_backend(EngineConfig(backend="torch", **cfg), sd1, "tiny-sd1"),
        "ort": create_backend(EngineConfig(backend="onnxruntime", **cfg), sd1, "tiny-sd1"),
        "ort_bound": create_backend(EngineConfig(backend="onnxruntime", **cfg), sd1, "tiny-sd1", io_binding=True),
    }


def feeds_for(backend, component, batch=2, height=8, width=8, tokens=77, seed=0):
    desc = backend.descriptor(component)
    return {k: v.numpy() for k, v in desc.sample_inputs(batch, height, width, tokens, seed=seed).items()}


def test_factory_and_protocol(backends):
    assert isinstance(backends["torch"], TorchBackend)
    assert isinstance(backends["ort"], OnnxRuntimeBackend)
    for b in backends.values():
        assert isinstance(b, Backend)
        assert b.has("unet") and b.has("vae_decoder") and b.has("unet_control")
        assert not b.has("text_encoder_2") and not b.has("controlnet")


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_onnxruntime_matches_torch_backend(backends, component):
    """ORT CPU EP (plain and IO binding) vs torch backend fp32: relL2 <= 1e-4; numpy float32 out."""
    feeds = feeds_for(backends["torch"], component, batch=2, height=6, width=10, seed=3)
    ref = backends["torch"].run(component, feeds)
    for name in ("ort", "ort_bound"):
        got = backends[name].run(component, feeds)
        assert set(got) == set(ref)
        for out in ref:
            assert isinstance(got[out], np.ndarray) and got[out].dtype == np.float32
            assert rel_l2(got[out], ref[out]) <= TOL, f"{name} {component}/{out}"


def test_io_binding_buffers_per_shape(backends):
    """Static buffers are kept per input shape; results stay valid after later runs (they are clones)."""
    b, plain = backends["ort_bound"], backends["ort"]
    small = feeds_for(b, "unet", batch=1, height=8, width=8, seed=1)
    big = feeds_for(b, "unet", batch=2, height=12, width=8, tokens=154, seed=2)
    before = len(b._bound.get("unet", {}))
    r1 = b.run("unet", small)["model_output"]
    keep = r1.copy()
    r2 = b.run("unet", big)["model_output"]
    r3 = b.run("unet", small)["model_output"]
    assert r2.shape == (2, 4, 12, 8)
    np.testing.assert_array_equal(r1, keep)
    np.testing.assert_array_equal(r3, keep)
    np.testing.assert_allclose(r2, plain.run("unet", big)["model_output"], rtol=0, atol=1e-6)
    assert len(b._bound["unet"]) == before + 2


def test_torch_tensors_accepted_on_cpu(backends):
    feeds = {k: torch.from_numpy(v) for k, v in feeds_for(backends["torch"], "vae_decoder", 1, 4, 4).items()}
    a = backends["ort"].run("vae_decoder", feeds)["image"]
    b = backends["torch"].run("vae_decoder", feeds)["image"]
    assert a.shape == (1, 3, 32, 32) and rel_l2(a, b) <= TOL


def test_sessions_are_lazy_and_cached(sd1, tmp_path, monkeypatch):
    calls = []
    real = xonnx.torch_export
    monkeypatch.setattr(xonnx, "torch_export", lambda *a, **k: (calls.append(a[1].component), real(*a, **k)))
    config = EngineConfig(backend="onnxruntime", cache_dir=tmp_path)
    backend = create_backend(config, {"vae": sd1["vae"]}, "h")
    assert calls == [] and not any(tmp_path.iterdir())  # nothing exported at construction
    feeds = feeds_for(backend, "vae_decoder", 1, 4, 4)
    first = backend.run("vae_decoder", feeds)["image"]
    again = create_backend(config, {"vae": sd1["vae"]}, "h").run("vae_decoder", feeds)["image"]
    assert calls == ["vae_decoder"]  # the second backend found the artefact through its manifest
    np.testing.assert_array_equal(first, again)


def test_feed_errors_name_the_field(backends):
    feeds = feeds_for(backends["torch"], "unet")
    del feeds["timestep"]
    for b in backends.values():
        with pytest.raises(InvalidRequest, match="unet.timestep"):
            b.run("unet", feeds)
    with pytest.raises(InvalidRequest, match="component"):
        backends["ort"].run("controlnet", {})


def test_torch_backend_bf16_casts_weights_once(backends):
    """bf16 really runs in bf16 (weights cast once, not per call): close to fp32 (relL2 < 5e-2), not equal."""
    bf16 = create_backend(EngineConfig(backend="torch", precision="bf16"), build_tiny("sd1").components, "tiny-sd1")
    feeds = feeds_for(bf16, "unet", seed=4)
    a = bf16.run("unet", feeds)["model_output"]
    b = backends["torch"].run("unet", feeds)["model_output"]
    assert a.dtype == np.float32
    assert 1e-5 < rel_l2(a, b) < 5e-2
    assert {p.dtype for p in bf16._wrapper("unet").parameters()} == {torch.bfloat16}


def test_torch_backend_fp16_keeps_sdxl_vae_in_fp32(monkeypatch):
    """fp16: the UNet runs in fp16, the SDXL VAE (fp16 overflow, descriptor fp16=False) stays fp32 exactly
    (reference: the same backend in fp32), as diffusers' force_upcast. On CPU fp16 resolves to bf16 (or fp32):
    the CUDA resolution (fp16) is forced here so that the fp16 policy runs."""
    import engine.backends.torch as tb

    monkeypatch.setattr(tb, "compute_dtype",
                        lambda precision, device: torch.float16 if precision.value == "fp16" else torch.float32)
    comps32, comps16 = build_tiny("sdxl").components, build_tiny("sdxl").components
    fp32 = create_backend(EngineConfig(backend="torch"), comps32, "tiny-sdxl")
    fp16 = create_backend(EngineConfig(backend="torch", precision="fp16"), comps16, "tiny-sdxl")
    assert not fp16.descriptor("vae_decoder").fp16 and fp16.descriptor("unet").fp16
    feeds = feeds_for(fp32, "vae_decoder", seed=5)
    np.testing.assert_array_equal(fp16.run("vae_decoder", feeds)["image"], fp32.run("vae_decoder", feeds)["image"])
    assert {p.dtype for p in fp16._wrapper("vae_decoder").parameters()} == {torch.float32}
    assert {p.dtype for p in fp16._wrapper("unet").parameters()} == {torch.float16}


def test_cpu_half_precision_runs_fp32_when_emulated(caplog, monkeypatch):
    import engine.backends.torch as tb

    monkeypatch.setattr(tb, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="engine.backends.torch"):
        b = create_backend(EngineConfig(backend="torch", precision="bf16"), build_tiny("sd1").components, "t")
    assert "emulated" in caplog.text and "fp32" in caplog.text
    assert b.dtype_of("unet") == "float32"


# -- provider selection --------------------------------------------------------------------------------------

def test_unknown_provider_is_named_with_the_available_ones(sd1):
    config = EngineConfig(backend="onnxruntime", providers=("NoSuchExecutionProvider", CPU))
    with pytest.raises(BackendUnavailable) as err:
        create_backend(config, sd1, "h")
    text = str(err.value)
    assert "NoSuchExecutionProvider" in text
    for name in ort.get_available_providers():
        assert name in text


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has the CUDA EP")
def test_cuda_device_without_cuda_ep(sd1):
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        create_backend(EngineConfig(backend="onnxruntime", device="cuda:1"), sd1, "h")


def test_check_providers_passes_available():
    check_providers([CUDA, CPU], [TENSORRT, CUDA, CPU])
    with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider"):
        check_providers([TENSORRT], [CUDA, CPU])


def test_bf16_rejected_by_onnxruntime(sd1):
    with pytest.raises(InvalidRequest, match="precision"):
        create_backend(EngineConfig(backend="onnxruntime", precision="bf16"), sd1, "h")


def test_cpu_session_options(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # tests/conftest.py sets it to 1 for the test run
    so = session_options(EngineConfig())
    assert so.intra_op_num_threads == os.cpu_count()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the setting torch's OpenMP pool follows, followed here too
    assert session_options(EngineConfig()).intra_op_num_threads == 3
    assert session_options(EngineConfig(num_threads=2)).intra_op_num_threads == 2
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options(EngineConfig(num_threads=3)).intra_op_num_threads == 3


def test_provider_option_dicts():
    cfg = EngineConfig(device="cuda:1", precision="fp16")
    cuda = provider_options(CUDA, cfg, cuda_graph=True, stream=1234)
    assert cuda["device_id"] == "1" and cuda["enable_cuda_graph"] == "1"
    assert cuda["user_compute_stream"] == "1234" and cuda["has_user_compute_stream"] == "1"
    assert "enable_cuda_graph" not in provider_options(CUDA, cfg)
    assert provider_options(CPU, cfg) == {}


def test_tensorrt_ep_options_with_profile(sd1, tmp_path):
    """TensorRT EP: fp16 flag, caches, and min/opt/max shapes from the unet descriptor and a ShapeConfig."""
    cfg = EngineConfig(device="cuda", precision="fp16", providers=(TENSORRT, CUDA, CPU), cache_dir=tmp_path)
    backend = OnnxRuntimeBackend(cfg, sd1, "h", available=[TENSORRT, CUDA, CPU],
                                 shape_config=ShapeConfig(batch=(1, 2, 4), image=(256, 512, 768),
                                                          token_chunks=(1, 1, 2)), io_binding=False)
    assert backend.onnx_precision == "fp32"  # TensorRT makes the fp16 engine itself
    (name, opts), *_ = backend.providers_for("unet", tmp_path / "unet")
    assert name == TENSORRT and opts["trt_fp16_enable"] == "1"
    assert opts["trt_engine_cache_enable"] == "1"
    assert opts["trt_timing_cache_path"] == str(tmp_path / "unet" / "ort-tensorrt")
    assert opts["trt_profile_min_shapes"] == "sample:1x4x32x32,timestep:1,encoder_hidden_states:1x77x32"
    assert opts["trt_profile_opt_shapes"] == "sample:2x4x64x64,timestep:2,encoder_hidden_states:2x77x32"
    assert opts["trt_profile_max_shapes"] == "sample:4x4x96x96,timestep:4,encoder_hidden_states:4x154x32"


def test_controlnet_into_unet_control_matches_diffusers(tmp_path):
    """ORT backend: controlnet outputs fed by name into unet_control == diffusers' own ControlNet -> UNet
    call (reference: ControlNetModel + UNet2DConditionModel with down/mid residuals), relL2 <= 1e-4."""
    modules = dict(build_tiny("sd1").components, **build_tiny("controlnet_sd1").components)
    backend = create_backend(EngineConfig(backend="onnxruntime", cache_dir=tmp_path), modules, "tiny-cn")
    cn_feeds = feeds_for(backend, "controlnet", batch=2, height=8, width=8, seed=9)
    residuals = backend.run("controlnet", cn_feeds)
    feeds = {k: cn_feeds[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    got = backend.run("unet_control", {**feeds, **residuals})["model_output"]
    t = {k: torch.from_numpy(v) for k, v in cn_feeds.items()}
    with torch.no_grad():
        down, mid = modules["controlnet"](t["sample"], t["timestep"], t["encoder_hidden_states"],
                                          t["controlnet_cond"], return_dict=False)
        ref = modules["unet"](t["sample"], t["timestep"], t["encoder_hidden_states"],
                              down_block_additional_residuals=down, mid_block_additional_residual=mid,
                              return_dict=False)[0].numpy()
        plain = modules["unet"](t["sample"], t["timestep"], t["encoder_hidden_states"], return_dict=False)[0].numpy()
    assert rel_l2(got, ref) <= TOL
    assert rel_l2(plain, ref) > 1e-3  # the residuals matter: the test could fail


def test_run_options_of_bound_shapes():
    """CUDA graph id per shape; no end-of-run stream sync when ORT runs on torch's stream (sync=False)."""
    from engine.backends.onnxruntime import run_options

    graph = run_options(3, sync=True)
    assert graph.get_run_config_entry("gpu_graph_id") == "3"
    with pytest.raises(Exception):
        graph.get_run_config_entry("disable_synchronize_execution_providers")
    stream = run_options(None, sync=False)
    assert stream.get_run_config_entry("disable_synchronize_execution_providers") == "1"


def test_cuda_graph_refused_falls_back_without_graph(sd1, tmp_path, monkeypatch, caplog):
    """A session whose graph cannot be captured is recreated without enable_cuda_graph (warning), and its
    shapes get no graph id. Simulated on the CPU EP: the first session creation raises onnxruntime's message."""
    backend = create_backend(EngineConfig(backend="onnxruntime", cache_dir=tmp_path), sd1, "tiny-sd1",
                             io_binding=True, cuda_graph=True)
    calls = []
    real = ort.InferenceSession

    def session(path, sess_options=None, providers=None, provider_options=None):
        calls.append(provider_options)
        if len(calls) == 1:
            raise RuntimeError("This session cannot use the graph capture feature as requested by the user as "
                               "all compute graph nodes have not been partitioned to the CUDA EP.")
        return real(path, sess_options=sess_options, providers=providers, provider_options=provider_options)

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(backend, "providers_for",
                        lambda c, d=None: [(CPU, {"enable_cuda_graph": "1"})])
    feeds = feeds_for(backend, "vae_decoder", 1, 4, 4)
    with caplog.at_level("WARNING", logger="engine.backends.onnxruntime"):
        out = backend.run("vae_decoder", feeds)["image"]
    assert "no CUDA graph" in caplog.text and backend._no_graph == {"vae_decoder"}
    assert calls == [[{"enable_cuda_graph": "1"}], [{}]]
    bound = next(iter(backend._bound["vae_decoder"].values()))
    with pytest.raises(Exception):
        bound.run_options.get_run_config_entry("gpu_graph_id")
    ref = create_backend(EngineConfig(backend="torch"), sd1, "tiny-sd1").run("vae_decoder", feeds)["image"]
    assert rel_l2(out, ref) <= TOL
