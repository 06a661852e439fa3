"""The torch backend's fast path on CPU: compiled vs eager, bf16 vs fp32, the CUDA defaults run on CPU.

Reference: the same backend in fp32, eager, with the CPU defaults (the export.wrappers modules as diffusers
builds them). Tolerances (relative L2 over the output):

- torch.compile (inductor, fp32) vs eager: <= 1e-4 (inductor fuses and reorders reductions; 1.4e-6 measured);
- fused QKV + SDPA + channels_last (the CUDA defaults) in fp32 vs the plain modules: <= 1e-5;
- bf16 weights (autocast, and pure bf16 as on CUDA) vs fp32: <= 3e-2 for the UNet (bf16 keeps 8 bits of
  mantissa: ~4e-3 per op), <= 3e-2 for the VAE image. Only where this CPU has native bf16 (AVX512-BF16 or
  AMX-BF16); elsewhere the backend runs fp32 and those tests are skipped, saying so.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

import engine.backends.torch as tb
from engine.backends import create_backend
from engine.backends.torch import TorchOptions, compute_dtype, cpu_has_native_bf16
from engine.config import EngineConfig, Precision
from core.errors import InvalidRequest
from engine.models.tiny import build_tiny

NATIVE_BF16 = cpu_has_native_bf16()
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (AVX512-BF16/AMX-BF16): "
                                                         "the backend runs fp32 there, nothing to compare")


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def backend(precision="fp32", compile=False, kind="sd1", **options):
    config = EngineConfig(backend="torch", precision=precision, torch_compile=compile)
    return create_backend(config, build_tiny(kind).components, f"tiny-{kind}", torch_options=options or None)


def feeds(b, component, batch=2, size=8, seed=1):
    desc = b.descriptor(component)
    return {k: v.numpy() for k, v in desc.sample_inputs(batch, size, size, seed=seed).items()}


@pytest.fixture(scope="module")
def fp32():
    return backend()


def test_options_per_device():
    cpu, cuda = TorchOptions.for_device("cpu"), TorchOptions.for_device("cuda:0", compile=True)
    assert cpu.autocast and not cpu.channels_last and not cpu.fuse_qkv and not cpu.compile and cpu.sdpa
    assert not cuda.autocast and cuda.channels_last and cuda.fuse_qkv and cuda.compile
    assert cuda.compile_mode == "reduce-overhead" and cpu.compile_mode is None
    with pytest.raises(InvalidRequest) as err:
        TorchOptions.for_device("cpu", fuse_qvk=True)
    assert "torch_options.fuse_qvk" in str(err.value) and "fuse_qkv" in str(err.value)


def test_precision_resolution():
    """CUDA: as asked. CPU: bf16 where native (fp16 too), fp32 otherwise; fp32 always fp32."""
    assert compute_dtype(Precision.FP16, "cuda") == torch.float16
    assert compute_dtype(Precision.BF16, "cuda:1") == torch.bfloat16
    assert compute_dtype(Precision.FP32, "cuda") == torch.float32
    assert compute_dtype(Precision.FP16, "cpu", native_bf16=True) == torch.bfloat16
    assert compute_dtype(Precision.BF16, "cpu", native_bf16=True) == torch.bfloat16
    assert compute_dtype(Precision.BF16, "cpu", native_bf16=False) == torch.float32
    assert compute_dtype(Precision.FP16, "cpu", native_bf16=False) == torch.float32


def test_cpu_without_native_bf16_runs_fp32_and_says_so(caplog, monkeypatch, fp32):
    """Without AVX512-BF16/AMX a half request runs fp32 (bit-identical to the fp32 backend), with a warning."""
    monkeypatch.setattr(tb, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="engine.backends.torch"):
        b = backend("bf16")
    assert "emulated" in caplog.text and "running fp32" in caplog.text
    assert b.dtype_of("unet") == "float32"
    f = feeds(b, "unet")
    np.testing.assert_array_equal(b.run("unet", f)["model_output"], fp32.run("unet", f)["model_output"])
    assert {p.dtype for p in b._wrapper("unet").parameters()} == {torch.float32}


def test_cuda_defaults_on_cpu_match_plain_modules(fp32):
    """Fused QKV + SDPA + channels_last + pure-dtype feeds (the CUDA defaults), fp32 on CPU: relL2 <= 1e-5."""
    fast = backend(autocast=False, channels_last=True, fuse_qkv=True)
    for component, out in (("unet", "model_output"), ("vae_decoder", "image"), ("text_encoder", "hidden_state")):
        f = feeds(fast, component) if component != "text_encoder" else feeds(fast, component, batch=2)
        got = fast.run(component, f)[out]
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert rel_l2(got, fp32.run(component, f)[out]) <= 1e-5, component
    unet = fast._components["unet"]
    procs = {type(p).__name__ for p in unet.attn_processors.values()}
    assert procs == {"FusedAttnProcessor2_0"}
    assert any(hasattr(m, "to_qkv") for m in unet.modules())
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_sdpa_processor_set_by_default(fp32):
    fp32.run("unet", feeds(fp32, "unet"))
    procs = {type(p).__name__ for p in fp32._components["unet"].attn_processors.values()}
    assert procs == {"AttnProcessor2_0"}


@needs_bf16
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "pure-bf16"])
def test_bf16_matches_fp32(fp32, autocast):
    """bf16 weights (once-cast) vs the fp32 reference: UNet and VAE decoder relL2 <= 3e-2."""
    b = backend("bf16", autocast=autocast)
    assert b.dtype_of("unet") == "bfloat16" and b.dtype_of("vae_decoder") == "bfloat16"
    for component, out in (("unet", "model_output"), ("vae_decoder", "image")):
        f = feeds(b, component)
        got = b.run(component, f)[out]
        assert got.dtype == np.float32 and np.isfinite(got).all()
        err = rel_l2(got, fp32.run(component, f)[out])
        assert err <= 3e-2, (component, err)
    assert {p.dtype for p in b._wrapper("unet").parameters()} == {torch.bfloat16}


@needs_bf16
def test_fp16_on_cpu_runs_bf16(caplog):
    with caplog.at_level(logging.INFO, logger="engine.backends.torch"):
        b = backend("fp16")
    assert b.dtype_of("unet") == "bfloat16" and "runs as bf16" in caplog.text


def test_vae_tiling_option():
    b = backend(vae_tiling=True)
    f = feeds(b, "vae_decoder", batch=1)
    b.run("vae_decoder", f)
    assert b._components["vae"].use_tiling


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU (inductor) needs a C++ compiler; .ci/run installs g++")
def test_compiled_matches_eager(fp32):
    """torch.compile (inductor, per static shape) of the UNet vs eager, fp32 on CPU: relL2 <= 1e-4; a second
    shape compiles its own graph and still matches."""
    compiled = backend(compile=True, compile_components=("unet",))
    assert compiled.options.compile and compiled.options.compile_mode is None
    for size in (8, 12):
        f = feeds(compiled, "unet", size=size, seed=size)
        got = compiled.run("unet", f)["model_output"]
        assert got.shape == (2, 4, size, size)
        assert rel_l2(got, fp32.run("unet", f)["model_output"]) <= 1e-4
    assert type(compiled._wrapper("unet")).__name__ == "OptimizedModule"
    assert type(compiled._wrapper("vae_decoder")).__name__ == "VaeDecoderWrapper"  # not in compile_components
