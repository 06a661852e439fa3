"""depth_midas / normal_midas (the extension's ``depth`` / ``normal_map``): MiDaS DPT-Hybrid run with transformers'
DPT (engine.controlnet.midas) on the extension's file, as sd-webui-controlnet runs them.

- The key mapping against the real architecture's layout (tests/golden/dpt_hybrid_midas_keys.json, written from
  controlnet_aux's network where timm imports): every original key used once, every weight of transformers'
  network filled once, equal shapes.
- Parity with the reference implementation, controlnet_aux 0.0.10's ``MiDaSInference('dpt_hybrid')`` (timm), on
  the same file: runs only where ``controlnet_aux.midas`` imports (timm and torchvision; not in CI, whose torch
  has no torchvision build), skipped with the reason elsewhere. Tolerance: raw depth within 1e-4 of its range,
  maps within 1 uint8 level (measured: identical, 0 difference, on CPU).
- Everywhere: the extension's post-processing on known depths, resolution handling, the normal background
  threshold, the refusal of a missing or foreign file, the memory estimate. Random weights of the real
  architecture (tests/midas_support.py): small processor_res.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytest.importorskip("cv2")
torch = pytest.importorskip("torch")

from core.errors import ModelError  # noqa: E402
from engine.controlnet import annotators, midas  # noqa: E402
from engine.controlnet.images import resize_image_with_pad  # noqa: E402
from engine.controlnet.preprocessors import PREPROCESSORS, get_preprocessor  # noqa: E402
from tests.midas_support import FILE_NAME, original_layout  # noqa: E402
from tests.weights_support import WEIGHTS  # noqa: E402
from tests.conftest import assert_missing_file_refused  # noqa: E402


def _photo(name: str = "astronaut.png", size: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image

    if WEIGHTS is None:  # a drawn scene where the shared photos are absent
        h, w = (size[1], size[0]) if size else (96, 128)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], axis=2).astype(np.uint8)
        img[(yy - h // 2) ** 2 + (xx - w // 3) ** 2 < (h // 4) ** 2] = (240, 200, 40)
        return img
    image = Image.open(WEIGHTS / "photos" / name).convert("RGB")
    return np.asarray(image.resize(size, Image.BICUBIC) if size else image)


# ------------------------------------------------------------------------------------------------ mapping


def test_mapping_uses_every_original_key_once_with_equal_shapes():
    """The original layout (368 keys of controlnet_aux's DPTDepthModel('vitb_rn50_384'), the JSON) mapped to
    transformers' DPTForDepthEstimation (hybrid config) built on the meta device: each original key maps (the two
    keys of timm's ImageNet classifier are the only ones dropped), the fused qkv splits in three, and the result
    is exactly the network's state dict: no key twice, none missing, equal shapes."""
    from transformers import DPTForDepthEstimation

    layout = original_layout()
    assert len(layout) == midas.FILE_KEYS == 368
    assert sum(int(np.prod(s)) for s in layout.values()) == 123_146_985
    names = [midas.map_key(k) for k in layout]
    assert [k for k, n in zip(layout, names) if n is None] == ["pretrained.model.head.weight",
                                                                "pretrained.model.head.bias"]
    kept = [n for n in names if n is not None]
    assert len(kept) == len(set(kept))  # no two original keys onto one name
    with torch.device("meta"):
        model = DPTForDepthEstimation(midas.dpt_hybrid_config())
        mapped = midas.map_state_dict({k: torch.empty(s) for k, s in layout.items()})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected
    assert len(expected) == 368 - 2 + 12 * 4  # each block's qkv weight and bias -> query, key, value
    assert not list(model.named_buffers())  # nothing left unloaded by load_state_dict(assign=True)


def test_mapping_moves_the_values_where_they_belong():
    """Values, not only names: a block's qkv rows go to query / key / value in timm's order; MiDaS's deepest
    fusion block (refinenet4) is transformers' first fusion layer; the stage-2 BiT block and the readout."""
    state = {k: torch.full(s, float(i)) for i, (k, s) in enumerate(original_layout().items())}
    qkv = torch.arange(2304 * 768, dtype=torch.float32).reshape(2304, 768)
    state["pretrained.model.blocks.7.attn.qkv.weight"] = qkv
    mapped = midas.map_state_dict(state)
    layer = "dpt.encoder.layer.7.attention.attention."
    assert torch.equal(mapped[layer + "query.weight"], qkv[:768])
    assert torch.equal(mapped[layer + "key.weight"], qkv[768:1536])
    assert torch.equal(mapped[layer + "value.weight"], qkv[1536:])
    index = {k: i for i, k in enumerate(original_layout())}
    for original, name in (("scratch.refinenet4.out_conv.weight", "neck.fusion_stage.layers.0.projection.weight"),
                           ("scratch.refinenet1.resConfUnit2.conv1.bias",
                            "neck.fusion_stage.layers.3.residual_layer2.convolution1.bias"),
                           ("pretrained.act_postprocess4.4.weight", "neck.reassemble_stage.layers.3.resize.weight"),
                           ("pretrained.act_postprocess3.0.project.0.weight",
                            "neck.reassemble_stage.readout_projects.2.0.weight"),
                           ("pretrained.model.patch_embed.backbone.stages.2.blocks.8.norm3.bias",
                            "dpt.embeddings.backbone.bit.encoder.stages.2.layers.8.norm3.bias"),
                           ("pretrained.model.blocks.11.norm2.weight", "dpt.encoder.layer.11.layernorm_after.weight"),
                           ("scratch.layer4_rn.weight", "neck.convs.3.weight"),
                           ("scratch.output_conv.4.bias", "head.head.4.bias")):
        assert float(mapped[name].flatten()[0]) == index[original], original


def test_a_file_of_another_network_is_refused_naming_it(tmp_path):
    state = {k: torch.zeros(s) for k, s in original_layout().items() if "blocks.3." not in k}
    with pytest.raises(ModelError, match="missing") as err:
        midas.build(state, tmp_path / FILE_NAME)
    assert FILE_NAME in str(err.value)
    with pytest.raises(ModelError, match="unexpected key 'model.conv.weight'"):
        midas.build({"model.conv.weight": torch.zeros(1)}, tmp_path / FILE_NAME)


# ------------------------------------------------------------------------------------------ the extension


def test_depth_and_normal_follow_the_extensions_apply_midas():
    """On known depths: the depth map is (d - min) / max(d - min) x 255, truncated; the normal map of a ramp
    d = c x is (Sobel_x, Sobel_y, 2 pi) = (8c, 0, 2 pi) normalised, x 127.5 + 127.5, channels x, y, z (the
    extension's order; controlnet_aux reverses them); under the background threshold x and y are 0: (127, 127,
    255)."""
    h, w, c = 12, 16, 0.5
    ramp = torch.arange(w, dtype=torch.float32)[None, :].repeat(h, 1) * c + 3.0
    depth, normal = midas.apply_midas(ramp, bg_th=0.0)
    assert depth.dtype == normal.dtype == np.uint8 and depth.shape == (h, w) and normal.shape == (h, w, 3)
    expected = ((np.arange(w) * c) / ((w - 1) * c) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(depth, np.repeat(expected[None], h, 0))
    v = np.array([8 * c, 0.0, 2 * np.pi])
    inner = (v / np.linalg.norm(v) * 127.5 + 127.5).astype(np.uint8)
    assert (normal[1:-1, 1:-1] == inner).all() and tuple(inner) == (195, 127, 235)
    # the background threshold: columns whose normalised depth is under it are flat (facing the viewer)
    depth, normal = midas.apply_midas(ramp, bg_th=0.5)
    flat = depth.astype(np.float64) / 255 < 0.5
    assert flat[:, : w // 2].all() and (normal[flat] == (127, 127, 255)).all()
    assert (normal[1:-1, w // 2 + 1: -1] == inner).all()
    _, all_flat = midas.apply_midas(ramp, bg_th=1.0)  # only the maximum (1.0) is not under 1.0
    assert (all_flat[:, :-1] == (127, 127, 255)).all()


@pytest.fixture(scope="module")
def midas_pre(midas_dir):
    """The two preprocessors on the session's random file (loaded once for the module)."""
    import os

    old = os.environ.get(annotators.ENV_ANNOTATORS_DIR)
    os.environ[annotators.ENV_ANNOTATORS_DIR] = str(midas_dir)
    annotators.LOADED.clear()
    yield get_preprocessor("depth_midas"), get_preprocessor("normal_midas")
    annotators.LOADED.clear()
    if old is None:
        os.environ.pop(annotators.ENV_ANNOTATORS_DIR, None)
    else:
        os.environ[annotators.ENV_ANNOTATORS_DIR] = old


def test_resolution_and_sizes_as_the_extension(midas_pre):
    """The short side to processor_res, padded to multiples of 64 for the network, the padding cropped: the map
    has the resized image's size (what submit plans, Preprocessor.sizes), for square and non-square inputs; the
    network sees the padded image (its map equals the depth of the padded image, cropped)."""
    depth_pre, normal_pre = midas_pre
    net = annotators.LOADED.get(annotators.load_midas, (annotators.find_weight(annotators.MIDAS),))
    for (h, w), res in (((70, 90), 64), ((90, 64), 96), ((64, 64), 64)):
        image = _photo(size=(w, h))
        out = depth_pre(image, res)
        work, size = depth_pre.sizes(h, w, res)
        assert out.shape == (*size, 3) and out.dtype == np.uint8
        padded, remove_pad = resize_image_with_pad(image, res)
        assert padded.shape[:2] == work and work[0] % 64 == 0 and work[1] % 64 == 0
        depth_image, normal_image = midas.apply_midas(midas.depth(net, padded), bg_th=0.4)
        np.testing.assert_array_equal(out[:, :, 0], remove_pad(depth_image))
        np.testing.assert_array_equal(normal_pre(image, res), remove_pad(normal_image))  # default threshold 0.4
        assert out.std() > 0
    assert depth_pre.resize == normal_pre.resize == "pad"


def test_normal_background_threshold_slider(midas_pre):
    """normal_midas's threshold_a is the extension's "Normal Background Threshold" (0..1, default 0.4): more of
    the map is flat (127, 127, 255) as it rises; -1 or out of range gives 0.4."""
    _, normal_pre = midas_pre
    image = _photo(size=(96, 64))
    flat = [float((normal_pre(image, 64, t) == (127, 127, 255)).all(axis=2).mean()) for t in (0.0, 0.4, 0.9)]
    assert flat[0] < flat[1] < flat[2] and flat[2] > 0.5, flat
    np.testing.assert_array_equal(normal_pre(image, 64, -1), normal_pre(image, 64, 0.4))
    np.testing.assert_array_equal(normal_pre(image, 64, 1.5), normal_pre(image, 64, 0.4))
    depth_pre, _ = midas_pre
    np.testing.assert_array_equal(depth_pre(image, 64, 0.9), depth_pre(image, 64))  # depth has no threshold


def test_registry_entries_as_the_extensions_legacy_table():
    """Names, labels, sliders, tags and priorities of the extension's legacy table; no controlnet_aux needed."""
    depth, normal = PREPROCESSORS["depth"], PREPROCESSORS["normal_map"]
    assert (depth.label, depth.tags, depth.priority) == ("depth_midas", ("Depth",), 100)
    assert (normal.label, normal.tags, normal.priority) == ("normal_midas", ("NormalMap",), 0)
    assert [p.api_json() for p in depth.sliders().values()] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]
    assert [p.api_json() for p in normal.sliders().values()] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Normal Background Threshold", "value": 0.4, "min": 0.0, "max": 1.0, "step": 0.01}]
    assert not depth.fn.needs_aux and not normal.fn.needs_aux
    assert depth.fn.weights == normal.fn.weights == (annotators.MIDAS,)


def test_missing_file_is_refused_naming_the_file_and_folders(tmp_path, annotators_env, monkeypatch):
    annotators_env()
    monkeypatch.delenv(annotators.ENV_ANNOTATORS_DIR)
    models = tmp_path / "webui" / "models"
    for module in ("depth_midas", "depth", "normal_midas", "normal_map"):
        assert_missing_file_refused(models, module, FILE_NAME, "midas")


def test_memory_estimate_counts_the_network_once():
    from engine.admission import preprocessor_bytes
    from engine.request import ControlNetUnit

    def unit(module):
        return ControlNetUnit(model="m", image=np.zeros((8, 8, 3), np.uint8), module=module)

    assert preprocessor_bytes([unit("depth_midas"), unit("normal_midas")]) == int(469.9 * 1024 * 1024)
    # the file's fp32 network (without timm's 769,000-value classifier, which the engine drops)
    assert (123_146_985 - 769_000) * 4 <= 469.9 * 1024 * 1024


# ---------------------------------------------------------------------------------------------- parity


def _reference():
    """controlnet_aux 0.0.10's MiDaS (the extension's annotator/midas code, timm + torchvision), or skip."""
    for name in ("timm", "torchvision"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"the reference (controlnet_aux.midas) needs {name}, which is not installed here (the "
                        "engine never installs torchvision: it runs MiDaS through transformers instead)")
    try:
        from controlnet_aux.midas import MidasDetector
        from controlnet_aux.midas.api import MiDaSInference
    except Exception as exc:  # noqa: BLE001 - e.g. a torchvision build that does not match torch
        pytest.skip(f"the reference controlnet_aux.midas cannot be imported here: {exc}")
    return MidasDetector, MiDaSInference


def test_parity_with_controlnet_aux_midas(midas_dir, midas_pre):
    """Random weights of the real architecture in the original file: controlnet_aux's MiDaSInference('dpt_hybrid')
    loading that file (its own loader), called as the extension calls it (resize_image_with_pad, the padded
    image / 127.5 - 1, the padding cropped; MidasDetector at the padded size with depth_and_normal, whose normal
    channels are reversed back to the extension's order), against the engine: raw depth within 1e-4 of its range,
    maps within 1 level (measured: 0)."""
    MidasDetector, MiDaSInference = _reference()
    depth_pre, normal_pre = midas_pre
    ref = MiDaSInference(model_type="dpt_hybrid", model_path=str(midas_dir / "midas" / FILE_NAME))
    detector = MidasDetector(ref)
    net = annotators.LOADED.get(annotators.load_midas, (annotators.find_weight(annotators.MIDAS),))
    for (h, w), res, bg in (((96, 128), 128, 0.4), ((70, 90), 64, 0.1)):
        image = _photo(size=(w, h))
        padded, remove_pad = resize_image_with_pad(image, res)
        x = torch.from_numpy(padded).float() / 127.5 - 1.0
        with torch.no_grad():
            expected_raw = ref(x.permute(2, 0, 1)[None])[0]
        raw = midas.depth(net, padded)
        span = float(expected_raw.max() - expected_raw.min())
        assert span > 0 and float((raw - expected_raw).abs().max()) <= 1e-4 * span
        side = min(padded.shape[:2])
        d, n = detector(padded, bg_th=bg, depth_and_normal=True, detect_resolution=side, image_resolution=side,
                        output_type="np")
        ours_d, ours_n = depth_pre(image, res), normal_pre(image, res, bg)
        assert np.abs(ours_d.astype(int) - remove_pad(d)).max() <= 1
        assert np.abs(ours_n.astype(int) - remove_pad(n)[:, :, ::-1]).max() <= 1
        assert ours_d.std() > 0 and ours_n.std() > 0
