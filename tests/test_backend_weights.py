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
