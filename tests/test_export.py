"""ONNX export: every component vs its torch wrapper (the reference), dynamic shapes, fp16, manifest cache.

Reference: the export.wrappers module run eagerly in torch fp32. Tolerance: relative L2 <= 1e-4 for fp32
graphs (observed ~1e-6); fp16 graphs on the CPU EP: relative L2 <= 2e-2 (observed ~5e-3).
Each tiny component is exported once per session into a session-scoped cache directory.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.onnx as xonnx
from core.errors import InvalidRequest
from engine.models.tiny import build_tiny
from export.manifest import MANIFEST
from export.onnx import export_component

FP32_TOL = 1e-4
FP16_TOL = 2e-2

CASES = {
    "sd1": ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
    "sd2v": ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
    "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"),
    "controlnet_sd1": ("controlnet", "unet_control"),
}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def modules_of(kind: str) -> dict:
    if kind.startswith("controlnet_"):
        return dict(build_tiny(kind.split("_", 1)[1]).components, **build_tiny(kind).components)
    return build_tiny(kind).components


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def exported(export_cache):
    """kind -> (modules, {component: artefact}); each tiny component exported once per session."""
    done: dict = {}

    def get(kind: str):
        if kind not in done:
            modules = modules_of(kind)
            arts = {c: export_component(c, modules, f"tiny-{kind}", export_cache) for c in CASES[kind]}
            done[kind] = (modules, arts)
        return done[kind]

    return get


def run_both(modules, art, feeds):
    desc = art.descriptor
    session = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    got = session.run(desc.output_names, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        ref = desc.wrapper(modules[desc.source])(*(feeds[n] for n in desc.input_names))
    ref = ref if isinstance(ref, tuple) else (ref,)
    return dict(zip(desc.output_names, got)), {n: r.numpy() for n, r in zip(desc.output_names, ref)}


PARITY = [(k, c) for k, comps in CASES.items() for c in comps]


@pytest.mark.parametrize("kind,component", PARITY, ids=[f"{k}-{c}" for k, c in PARITY])
def test_component_matches_torch(exported, kind, component):
    """ONNX (CPU EP) vs the torch wrapper, fp32: relative L2 <= 1e-4 on every output."""
    modules, arts = exported(kind)
    art = arts[component]
    desc = art.descriptor
    clip_skips = (1, 2) if desc.optimizer_type == "clip" else (None,)
    for clip_skip in clip_skips:
        feeds = desc.sample_inputs(batch=2, height=2 * desc.latent_multiple * 2, width=3 * desc.latent_multiple * 2,
                                   seed=7)
        if clip_skip is not None:
            feeds["clip_skip"] = torch.tensor([clip_skip])
        got, ref = run_both(modules, art, feeds)
        for name in desc.output_names:
            assert got[name].shape == ref[name].shape
            assert np.abs(ref[name]).max() > 0, f"{name} is all zeros: the test could not fail"
            err = rel_l2(got[name], ref[name])
            assert err <= FP32_TOL, f"{kind}/{component}/{name} clip_skip={clip_skip}: relL2 {err:.2e} > {FP32_TOL}"


def test_clip_skip_selects_a_different_layer(exported):
    """clip_skip is a graph input: 1 and 2 give different hidden states from the same export."""
    modules, arts = exported("sd1")
    art = arts["text_encoder"]
    session = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in art.descriptor.sample_inputs(batch=1, seed=3).items()}
    h1 = session.run(["hidden_state"], {**feeds, "clip_skip": np.array([1])})[0]
    h2 = session.run(["hidden_state"], {**feeds, "clip_skip": np.array([2])})[0]
    assert rel_l2(h1, h2) > 1e-2


def test_extra_embedding_rows_stand_for_tokens(exported):
    """extra_embeddings (textual inversion): an id vocab+i looks up row i. Rows equal to the table rows of some
    tokens give the same hidden states as those tokens (ONNX and torch wrapper, atol 1e-5); other rows differ."""
    modules, arts = exported("sd1")
    art = arts["text_encoder"]
    session = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    te = modules["text_encoder"]
    table = te.get_input_embeddings().weight.detach().numpy()
    vocab = table.shape[0]
    ids = art.descriptor.sample_inputs(batch=2, seed=4)["input_ids"].numpy()
    swapped = ids.copy()
    swapped[:, 3:6] = vocab + np.array([2, 0, 1])
    rows = table[ids[0, [4, 5, 3]]]  # rows 0, 1, 2 hold the tokens at 4, 5, 3 of image 0
    skip = np.array([1])
    plain = session.run(None, {"input_ids": ids, "clip_skip": skip, "extra_embeddings": rows})
    extra = session.run(None, {"input_ids": swapped, "clip_skip": skip, "extra_embeddings": rows})
    for a, b in zip(plain, extra):
        np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # image 0: the same vectors at the same places
    assert rel_l2(plain[0][1], extra[0][1]) > 1e-3  # image 1 got image 0's tokens there
    with torch.no_grad():
        ref = art.descriptor.wrapper(te)(torch.from_numpy(swapped), torch.from_numpy(skip), torch.from_numpy(rows))
    for a, b in zip(extra, ref):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5)


@pytest.mark.parametrize("batch,height,width,tokens", [(1, 8, 8, 77), (3, 12, 16, 154), (2, 6, 10, 154)])
def test_unet_dynamic_shapes_one_export(exported, batch, height, width, tokens):
    """One sd1 UNet export serves several batch sizes, latent sizes and 77/154 tokens (relL2 <= 1e-4)."""
    modules, arts = exported("sd1")
    art = arts["unet"]
    feeds = art.descriptor.sample_inputs(batch=batch, height=height, width=width, tokens=tokens, seed=11)
    got, ref = run_both(modules, art, feeds)
    assert got["model_output"].shape == (batch, 4, height, width)
    assert rel_l2(got["model_output"], ref["model_output"]) <= FP32_TOL


@pytest.mark.parametrize("batch", [1, 3])
def test_text_encoder_and_vae_dynamic_batch(exported, batch):
    modules, arts = exported("sd1")
    for component in ("text_encoder", "vae_decoder"):
        art = arts[component]
        feeds = art.descriptor.sample_inputs(batch=batch, height=6, width=10, seed=5)
        got, ref = run_both(modules, art, feeds)
        for name in art.descriptor.output_names:
            assert got[name].shape[0] == batch
            assert rel_l2(got[name], ref[name]) <= FP32_TOL


def test_manifest_contents(exported):
    modules, arts = exported("sd1")
    art = arts["unet"]
    manifest = json.loads((art.directory / MANIFEST).read_text())
    key = manifest["key"]
    assert key["model_hash"] == "tiny-sd1" and key["component"] == "unet" and key["precision"] == "fp32"
    assert key["opset"] >= 17 and key["tools"]["torch"] == torch.__version__
    assert key["dynamic_axes"]["sample"] == {"0": "B", "2": "h", "3": "w"}
    assert key["dynamic_axes"]["encoder_hidden_states"] == {"0": "B", "1": "T"}
    assert len(manifest["info"]["sha256"]) == 64
    assert manifest["files"]["model.onnx"]["sha256"]
    # layout {cache}/{model hash}/{component}/{stage}
    assert art.directory.parts[-3:] == ("tiny-sd1", "unet", "onnx-fp32")


# -- manifest cache -----------------------------------------------------------------------------------------

@pytest.fixture()
def counted(monkeypatch):
    calls = []
    real = xonnx.torch_export

    def counting(*args, **kwargs):
        calls.append(args[1].component)
        return real(*args, **kwargs)

    monkeypatch.setattr(xonnx, "torch_export", counting)
    return calls


@pytest.fixture(scope="module")
def sd1_vae():
    return {"vae": build_tiny("sd1").components["vae"]}


def test_second_export_is_skipped(tmp_path, counted, sd1_vae):
    first = export_component("vae_decoder", sd1_vae, "h1", tmp_path)
    mtime = first.path.stat().st_mtime_ns
    second = export_component("vae_decoder", sd1_vae, "h1", tmp_path)
    assert counted == ["vae_decoder"]
    assert second.path.stat().st_mtime_ns == mtime and second.sha256 == first.sha256


def test_precision_and_hash_changes_reexport(tmp_path, counted, sd1_vae):
    fp32 = export_component("vae_decoder", sd1_vae, "h1", tmp_path)
    fp16 = export_component("vae_decoder", sd1_vae, "h1", tmp_path, precision="fp16")
    assert fp16.precision == "fp16" and fp16.directory != fp32.directory and fp16.sha256 != fp32.sha256
    assert fp16.manifest["key"]["parent_sha256"] == fp32.sha256
    assert counted == ["vae_decoder"]  # fp16 is converted from the cached fp32 graph
    other = export_component("vae_decoder", sd1_vae, "h2", tmp_path)  # new source weights hash
    assert counted == ["vae_decoder", "vae_decoder"]
    assert other.manifest["key"]["model_hash"] == "h2"


def test_changed_weights_reexport_even_with_the_same_hash(tmp_path, counted):
    vae = build_tiny("sd1").components["vae"]
    first = export_component("vae_decoder", {"vae": vae}, "h1", tmp_path)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)
    second = export_component("vae_decoder", {"vae": vae}, "h1", tmp_path)
    assert len(counted) == 2 and second.sha256 != first.sha256
    feeds = second.descriptor.sample_inputs(batch=1, height=4, width=4)
    got, ref = run_both({"vae": vae}, second, feeds)
    assert rel_l2(got["image"], ref["image"]) <= FP32_TOL


def test_key_mismatch_or_corruption_rebuilds(tmp_path, counted, sd1_vae):
    art = export_component("vae_decoder", sd1_vae, "h1", tmp_path)
    # a manifest written by another opset/tool version does not match: rebuilt in place
    manifest = json.loads((art.directory / MANIFEST).read_text())
    manifest["key"]["tools"]["torch"] = "0.0"
    (art.directory / MANIFEST).write_text(json.dumps(manifest))
    export_component("vae_decoder", sd1_vae, "h1", tmp_path)
    assert len(counted) == 2
    # a corrupted graph file (same size, different bytes) fails its sha256: rebuilt
    data = bytearray(art.path.read_bytes())
    data[-1] ^= 0xFF
    art.path.write_bytes(bytes(data))
    again = export_component("vae_decoder", sd1_vae, "h1", tmp_path)
    assert len(counted) == 3
    ort.InferenceSession(str(again.path), providers=["CPUExecutionProvider"])
    opset18 = export_component("vae_decoder", sd1_vae, "h1", tmp_path, opset=18)
    assert len(counted) == 4 and opset18.manifest["key"]["opset"] == 18
    assert onnx.load(str(opset18.path)).opset_import[0].version == 18


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_export_leaves_nothing_that_loads(tmp_path, counted, monkeypatch, sd1_vae, exc):
    real = xonnx.consolidate

    def half_written(src, dst, move=False):
        dst.write_bytes(b"\x08\x07partial")  # a truncated graph, then the crash
        raise exc

    monkeypatch.setattr(xonnx, "consolidate", half_written)
    with pytest.raises(type(exc)):
        export_component("vae_decoder", sd1_vae, "h1", tmp_path)
    component_dir = tmp_path / "h1" / "vae_decoder"
    assert list(component_dir.iterdir()) == []  # no final dir, no temp dir
    monkeypatch.setattr(xonnx, "consolidate", real)
    art = export_component("vae_decoder", sd1_vae, "h1", tmp_path)
    assert len(counted) == 2  # the interrupted one did not count as cached
    ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])


def test_invalid_options(tmp_path, sd1_vae):
    with pytest.raises(InvalidRequest, match="precision"):
        export_component("vae_decoder", sd1_vae, "h1", tmp_path, precision="int8")
    with pytest.raises(InvalidRequest, match="component"):
        export_component("unet", sd1_vae, "h1", tmp_path)
    with pytest.raises(InvalidRequest, match="opset"):
        export_component("vae_decoder", sd1_vae, "h1", tmp_path, opset=13)


# -- fp16 and the GPU flavour -------------------------------------------------------------------------------

def test_fp16_unet_runs_on_cpu_ep(exported, export_cache):
    """fp16 sd1 UNet (norms/softmax/sin/cos kept fp32) on the CPU EP vs torch fp32: relL2 <= 2e-2."""
    modules, _ = exported("sd1")
    art = export_component("unet", modules, "tiny-sd1", export_cache, precision="fp16")
    model = onnx.load(str(art.path))
    halves = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert halves > 10, "weights were not converted to fp16"
    # keep_io_types: the graph still takes and gives fp32
    assert {i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)} == {onnx.TensorProto.FLOAT}
    feeds = art.descriptor.sample_inputs(batch=2, height=8, width=8, seed=2)
    got, ref = run_both(modules, art, feeds)
    err = rel_l2(got["model_output"], ref["model_output"])
    assert 1e-6 < err <= FP16_TOL, f"fp16 relL2 {err:.2e}"


def test_sdxl_vae_stays_fp32_by_policy(exported, export_cache):
    modules, arts = exported("sdxl")
    art = export_component("vae_decoder", modules, "tiny-sdxl", export_cache, precision="fp16")
    assert art.precision == "fp32" and art.directory == arts["vae_decoder"].directory
    sd1_modules, _ = exported("sd1")
    assert export_component("vae_decoder", sd1_modules, "tiny-sd1", export_cache,
                            precision="fp16").precision == "fp16"


def test_gpu_flavour_optimizer_on_tiny_unet(exported, export_cache):
    """The ORT transformer optimizer (GPU flavour) runs on the tiny UNet and fuses CUDA-only ops.

    Its attention fusion crashes on numpy >= 2.4 (ORT <= 1.32) unless export.optimize.numpy24_fix is in
    place; with it, MultiHeadAttention is fused. The fused graph holds CUDA-EP ops: the CPU EP must refuse it.
    """
    modules, _ = exported("sd1")
    art = export_component("unet", modules, "tiny-sd1", export_cache, gpu_optimize=True)
    info = art.manifest["info"]["optimizer"]
    assert info == {"model_type": "unet", "attention_fusion": True}  # numpy24_fix made the fusion work
    ops = {n.op_type for n in onnx.load(str(art.path)).graph.node}
    assert ops & {"GroupNorm", "NhwcConv", "SkipGroupNorm", "BiasSplitGelu"}
    assert "MultiHeadAttention" in ops
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|implementation"):
        ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])


def test_big_model_weights_go_to_one_external_file(tmp_path, monkeypatch, sd1_vae):
    """Above the threshold (1 GB; lowered here) the weights are consolidated into ONE data file."""
    monkeypatch.setattr(xonnx, "EXTERNAL_DATA_BYTES", 1000)
    art = export_component("vae_decoder", sd1_vae, "big", tmp_path)
    files = sorted(p.name for p in art.directory.iterdir())
    assert files == ["manifest.json", "model.onnx", "model.onnx.data"]
    assert set(art.manifest["files"]) == {"model.onnx", "model.onnx.data"}
    feeds = art.descriptor.sample_inputs(batch=1, height=4, width=4)
    got, ref = run_both(sd1_vae, art, feeds)
    assert rel_l2(got["image"], ref["image"]) <= FP32_TOL
    # a truncated data file is detected and rebuilds
    with open(art.directory / "model.onnx.data", "r+b") as f:
        f.truncate(100)
    again = export_component("vae_decoder", sd1_vae, "big", tmp_path)
    assert os.path.getsize(again.directory / "model.onnx.data") == again.manifest["files"]["model.onnx.data"]["size"]


def test_progress_callback(tmp_path, sd1_vae):
    events = []
    export_component("vae_decoder", sd1_vae, "h1", tmp_path, precision="fp16",
                     progress=lambda what, done, total: events.append((what, done, total)))
    # each build is announced ("building", stages done so far) and reported ("built"); a cache hit says so
    assert events == [("vae_decoder: onnx-fp32 (building)", 0, 2), ("vae_decoder: onnx-fp32 (built)", 1, 2),
                      ("vae_decoder: onnx-fp16 (building)", 1, 2), ("vae_decoder: onnx-fp16 (built)", 2, 2)]
    events.clear()
    art = export_component("vae_decoder", sd1_vae, "h1", tmp_path, precision="fp16",
                           progress=lambda what, done, total: events.append((what, done, total)))
    assert events == [("vae_decoder: onnx-fp32 (up to date)", 1, 2), ("vae_decoder: onnx-fp16 (up to date)", 2, 2)]
    assert not art.built


def test_consolidate_streams_per_tensor_files_into_one(tmp_path, sd1_vae):
    """What the legacy exporter writes above 2 GB (one file per tensor) becomes graph + ONE data file."""
    from onnx.external_data_helper import convert_model_to_external_data

    art = export_component("vae_decoder", sd1_vae, "h1", tmp_path / "cache")
    model = onnx.load(str(art.path))
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=64)
    raw = tmp_path / "raw"
    raw.mkdir()
    onnx.save_model(model, str(raw / "model.onnx"))
    assert len(list(raw.iterdir())) > 10
    out = tmp_path / "out"
    out.mkdir()
    xonnx.consolidate(raw / "model.onnx", out / "model.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    feeds = art.descriptor.sample_inputs(batch=1, height=4, width=4)
    latent = {"latent": feeds["latent"].numpy()}
    a = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"]).run(None, latent)
    b = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, latent)
    np.testing.assert_array_equal(a[0], b[0])
    # move=True (the export's own raw files): each tensor file deleted once copied, the same graph and data
    moved = tmp_path / "moved"
    moved.mkdir()
    xonnx.consolidate(raw / "model.onnx", moved / "model.onnx", move=True)
    assert [p.name for p in raw.iterdir()] == ["model.onnx"]
    assert (moved / "model.onnx.data").read_bytes() == (out / "model.onnx.data").read_bytes()


def test_numpy24_fix_is_scoped():
    """The corrected get_num_heads is in place only inside the context; onnxruntime's own is restored."""
    import sys

    from export.optimize import _num_heads, numpy24_fix

    with numpy24_fix():
        patched = [m.FusionAttentionUnet for n, m in list(sys.modules.items())
                   if n.rsplit(".", 1)[-1] == "fusion_attention_unet"]
        assert patched and all(c.get_num_heads is _num_heads for c in patched)
    assert all(c.get_num_heads is not _num_heads for c in patched)


def test_load_from_cache_hashes_nothing_for_unchanged_files(tmp_path, counted, sd1_vae, monkeypatch):
    """The graph's sha256 is checked again only when its mtime differs from the build's (a touched or rewritten
    file); an unchanged artefact is reused without reading it."""
    import export.manifest as xmanifest

    art = export_component("vae_decoder", sd1_vae, "h1", tmp_path)
    assert art.manifest["files"]["model.onnx"]["mtime_ns"] == art.path.stat().st_mtime_ns
    hashed = []
    real = xmanifest.sha256_file
    monkeypatch.setattr(xmanifest, "sha256_file", lambda p, *a: (hashed.append(p), real(p, *a))[1])
    export_component("vae_decoder", sd1_vae, "h1", tmp_path)
    assert hashed == [] and len(counted) == 1
    os.utime(art.path, ns=(art.path.stat().st_atime_ns, art.path.stat().st_mtime_ns + 10**9))
    export_component("vae_decoder", sd1_vae, "h1", tmp_path)
    assert len(hashed) == 1 and len(counted) == 1  # touched, same bytes: hashed once more, still reused
