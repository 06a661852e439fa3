"""Query-chunked attention in the ONNX export (export.attention, issue 12): the chunked graph computes what the
unchunked graph and diffusers' own attention compute, at sizes other than the traced one, and its artefact key
differs (a graph exported before is never loaded as a chunked one)."""

from __future__ import annotations

import numpy as np
import pytest

from export.attention import ChunkedAttnProcessor, attention_kind, chunked_attention


@pytest.fixture(scope="module")
def tiny():
    from engine.models.tiny import build_tiny

    return build_tiny("sd1").components


def _run(art, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_chunked_export_matches_full_and_diffusers(tiny, tmp_path):
    """Reference: diffusers' default attention (torch) and the unchunked export, on the tiny UNet (4 heads) at a
    14x22 latent (308 tokens: chunks of 19-20 rows, not the traced size) and the tiny VAE decoder's mid-block
    attention at 11x9. Tolerance: ONNX Runtime fp32 vs torch, atol 1e-4 (outputs of order 1)."""
    import torch

    from export.descriptors import describe
    from export.onnx import export_component

    rng = np.random.default_rng(0)
    cases = {
        "unet": {"sample": rng.standard_normal((2, 4, 14, 22)).astype(np.float32),
                 "timestep": np.array([500.0, 20.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)},
        "vae_decoder": {"latent": rng.standard_normal((1, 4, 11, 9)).astype(np.float32)},
    }
    for component, feeds in cases.items():
        chunked = export_component(component, tiny, "tiny-attn", tmp_path, attention_chunks=16)
        full = export_component(component, tiny, "tiny-attn", tmp_path, attention_chunks=0)
        # one fp32 stage folder per attention layout (backends sharing a cache do not re-export in turn)
        assert (chunked.directory.name, full.directory.name) == ("onnx-fp32", "onnx-fp32-full")
        assert chunked.directory.parent == full.directory.parent
        desc = describe(component, tiny)
        with torch.no_grad():
            ref = desc.wrapper(tiny[desc.source]).eval()(*(torch.from_numpy(feeds[n]) for n in desc.input_names))
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
        # `full` was exported last: the chunked graph is still there, valid under its own key
        again = export_component(component, tiny, "tiny-attn", tmp_path, attention_chunks=16)
        assert not again.built and again.directory == chunked.directory
        assert again.manifest["key"]["attention"] == "chunked:16" and full.manifest["key"]["attention"] == "full"
        assert (again.manifest["info"]["fp32_stage"], full.manifest["info"]["fp32_stage"]) == (
            "onnx-fp32", "onnx-fp32-full")
        out_chunked, out_full = _run(again, feeds), _run(full, feeds)
        np.testing.assert_allclose(out_chunked, ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(out_full, ref, atol=1e-4, rtol=0)


def test_graph_has_one_softmax_per_chunk(tiny, tmp_path):
    """The exported UNet computes attention in 16 slices: 16 Softmax nodes per attention layer."""
    import onnx

    from export.onnx import export_component

    full = onnx.load(str(export_component("unet", tiny, "tiny-attn", tmp_path, attention_chunks=0).path))
    chunked = onnx.load(str(export_component("unet", tiny, "tiny-attn", tmp_path, attention_chunks=16).path))
    count = lambda m: sum(n.op_type == "Softmax" for n in m.graph.node)  # noqa: E731
    assert count(full) > 0 and count(chunked) == 16 * count(full)


def test_processors_are_restored_and_kinds_named(tiny):
    unet = tiny["unet"]
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with chunked_attention(unet, 4):
        assert all(isinstance(p, ChunkedAttnProcessor) for p in unet.attn_processors.values())
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert attention_kind(16) == "chunked:16" and attention_kind(0) == attention_kind(1) == "full"
