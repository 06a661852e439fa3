"""depth_zoe (engine.controlnet.zoe): ZoeD_M12_N in transformers' ZoeDepth through our key mapping, with the
extension's ZoeDepth pre- and post-processing.

- The mapping against the real file's layout (tests/golden: the key names, shapes and dtypes of controlnet_aux
  0.0.10's ZoeDepth, the extension's code, as ZoeDepth's timm 0.6.7 builds it): every original key used exactly
  once or ignored for a stated reason, every network key filled once, shapes equal, on the meta device.
- The annotator's steps (sizes, padding, flip averaging, percentile normalisation, the extension's padded call)
  on a reduced network of the same family (tests/zoe_support.py), in CI.
- Parity with the reference implementation (controlnet_aux's ZoeDetector with random weights of the full real
  architecture, the extension's call), where controlnet_aux's zoe (timm, torchvision) imports; skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cv2")

from core.errors import InvalidRequest, ModelError  # noqa: E402
from engine.controlnet import annotators, zoe  # noqa: E402
from engine.controlnet.images import resize_image_with_pad  # noqa: E402
from engine.controlnet.preprocessors import PREPROCESSORS, get_preprocessor, not_run_here  # noqa: E402
from tests import zoe_support  # noqa: E402
from tests.conftest import assert_missing_file_refused  # noqa: E402


def _scene(h: int, w: int) -> np.ndarray:
    """A drawn scene: a gradient, a bright disc, a dark bar."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    img[(yy - h // 3) ** 2 + (xx - w // 2) ** 2 < (min(h, w) // 5) ** 2] = (250, 250, 40)
    img[2 * h // 3: 2 * h // 3 + max(2, h // 12), w // 6: 5 * w // 6] = (20, 20, 200)
    return img


# ------------------------------------------------------------------------------- the real file's layout


def test_mapping_covers_the_real_file_layout():
    """Every key of the real ZoeD_M12_N.pt either maps to transformers' ZoeDepth exactly once (the fused qkv
    weight to q/k/v) or is one of the stated ignored entries; every network key is filled exactly once with an
    equal shape; the config read from the shapes is ZoeD_N's (BEiT-L/16 384, features of layers 6/12/18/24,
    neck 256/512/1024/1024, fusion 256, 64 softplus bins in 1e-3..10, attractors 16/8/4/1)."""
    layout = zoe_support.real_layout()
    assert len(layout) == 535
    state = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, shape, dtype in layout}
    config = zoe.config_from_state(state)
    bb = config.backbone_config
    assert (bb.num_hidden_layers, bb.hidden_size, bb.num_attention_heads, bb.intermediate_size, bb.image_size,
            bb.patch_size) == (24, 1024, 16, 4096, 384, 16)
    assert bb.out_features == ["stage6", "stage12", "stage18", "stage24"] and bb.layer_norm_eps == 1e-6
    assert list(config.neck_hidden_sizes) == [256, 512, 1024, 1024] and config.fusion_hidden_size == 256
    assert config.bottleneck_features == 256 and config.num_relative_features == 32
    assert config.bin_configurations == [{"n_bins": 64, "min_depth": 1e-3, "max_depth": 10.0}]
    assert list(config.num_attractors) == [16, 8, 4, 1] and config.bin_embedding_dim == 128
    assert config.bin_centers_type == "softplus" and config.attractor_kind == "mean"
    assert (config.min_temp, config.max_temp) == (0.0212, 50.0)

    target = zoe.build(config, "meta").state_dict()
    filled, ignored = Counter(), []
    for key, shape, _ in layout:
        if zoe.IGNORED.fullmatch(key):
            ignored.append(key)
            continue
        if key.endswith("attn.qkv.weight"):
            block = key.split("blocks.")[1].split(".")[0]
            for name in "qkv":
                hf = f"backbone.beit.layers.{block}.attention.{name}_proj.weight"
                filled[hf] += 1
                assert tuple(target[hf].shape) == (shape[0] // 3, shape[1]), key
            continue
        hf = zoe.transformers_key(key)
        filled[hf] += 1
        assert tuple(target[hf].shape) == shape, (key, hf)
    assert set(filled) == set(target) and set(filled.values()) == {1}
    # the ignored entries: buffers transformers computes (24 relative position indices, the log-binomial's
    # indices and K - 1) and timm's unused ImageNet classifier
    assert len(ignored) == 24 + 2 + 2 + 2
    assert sum(k.endswith("relative_position_index") for k in ignored) == 24
    # the whole dict through to_transformers: the same keys and shapes
    mapped = zoe.to_transformers(state)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in target.items()}


def test_memory_estimate_is_the_real_files_size():
    """The estimate (each file's size, as the other annotators): the real file's tensors in their dtypes
    (fp32 weights, int64 relative position indices) within 0.1% of annotators.ZOE's 1376.5 MiB."""
    from engine.admission import preprocessor_bytes
    from engine.request import ControlNetUnit

    nbytes = sum(int(np.prod(shape)) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
                 for _, shape, dtype in zoe_support.real_layout())
    assert nbytes == pytest.approx(annotators.ZOE.size_mb * 1024 * 1024, rel=1e-3)
    unit = ControlNetUnit(model="m", image=np.zeros((8, 8, 3), np.uint8), module="depth_zoe")
    assert preprocessor_bytes([unit]) == int(1376.5 * 1024 * 1024)


def test_an_unknown_layout_is_refused_naming_the_file(tmp_path):
    """A file that is not ZoeD_N (another network's keys; ZoeD_NK's second head) is a ModelError naming it."""
    state = zoe_support.reduced_original_state()
    state["patch_transformer.embedding_convPxP.weight"] = torch.zeros(128, 32, 1, 1)
    path = tmp_path / "ZoeD_M12_N.pt"
    torch.save({"model": state}, path)
    with pytest.raises(ModelError) as err:
        zoe.load(path, annotators.read_weights)
    assert "ZoeD_M12_N.pt" in str(err.value) and "patch_transformer" in str(err.value)


# ----------------------------------------------------------------------------- the annotator's steps


def test_network_size_is_midas_minimal_resize():
    """PrepForMidas (ZoeD_N: 384x512, keep aspect ratio, "minimal", multiples of 32): the scale of 384/h or
    512/w nearer to 1, both sides rounded to multiples of 32 (hand-computed)."""
    assert zoe.network_size(384, 512) == (384, 512)
    assert zoe.network_size(466, 466) == (512, 512)  # 384/466 = 0.82, 512/466 = 1.10: the width's scale
    assert zoe.network_size(322, 466) == (352, 512)  # scale 512/466: 322 * 1.0987 = 353.8 -> 352
    assert zoe.network_size(1000, 600) == (864, 512)  # 0.384 vs 0.853: the width's; 1000 * 0.853 = 853 -> 864
    assert zoe.network_size(100, 100) == (384, 384)  # 3.84 vs 5.12: the height's
    assert zoe.pad_sizes(512, 768) == (48, 58)  # int(sqrt(256) * 3), int(sqrt(384) * 3) = int(58.79)
    assert zoe.pad_sizes(64, 64) == (16, 16)


def test_an_image_zoedepth_cannot_resize_is_refused_at_submit():
    """An aspect ratio that ZoeDepth's resize rounds to 0 pixels on a side (it fails in the extension too): a
    64x4096 padded image (padded by 16 and 67 to 96x4230, scale 512/4230: 96 * 0.121 = 11.6 -> 0) is refused
    naming the unit's processor_res (or /controlnet/detect's); 64x2048 runs at 32x512."""
    from engine.controlnet import check_unit_sizes
    from engine.request import ControlNetUnit

    pre = get_preprocessor("depth_zoe")
    with pytest.raises(InvalidRequest) as err:
        pre.check_work(pre.sizes(64, 4096, 64)[0], "controlnet_processor_res")
    assert err.value.field == "controlnet_processor_res" and "512x0" in str(err.value)
    pre.check_work(pre.sizes(64, 2048, 64)[0], "controlnet_processor_res")
    assert zoe.network_size(96, 2048 + 2 * zoe.pad_sizes(64, 2048)[1]) == (32, 512)
    unit = ControlNetUnit(model="m", image=np.zeros((16, 1024, 3), np.uint8), module="depth_zoe", processor_res=64,
                          pixel_perfect=False)
    with pytest.raises(InvalidRequest) as err:
        check_unit_sizes(unit, 64, 64, 10**8, "controlnet_units[0].image")
    assert err.value.field == "controlnet_units[0].processor_res"


def test_depth_to_map_is_the_percentile_normalisation():
    """Depth at its 2nd percentile -> 255, at its 85th -> 0, farther clipped to 0, nearer clipped to 255 (near
    is white), linear between (numpy's percentiles, linear interpolation)."""
    depth = np.linspace(1.0, 2.0, 101, dtype=np.float32).reshape(1, 101)  # percentile p is 1 + p / 100
    out = zoe.depth_to_map(depth)
    assert out.dtype == np.uint8 and out.shape == depth.shape
    assert out[0, 2] >= 254 and out[0, 0] == 255 and out[0, 85] == 0 and out[0, 100] == 0  # (float32 rounding)
    assert abs(int(out[0, 50]) - 107) <= 1  # (1 - (1.5 - 1.02) / (1.85 - 1.02)) * 255 = 107.5
    assert np.all(np.diff(out[0].astype(int)) <= 0)


@pytest.fixture(scope="module")
def reduced_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoe")
    zoe_support.write_reduced_file(root)
    return root


def test_the_network_runs_at_the_minimal_size_with_pad_and_flip(reduced_dir, annotators_env):
    """ZoeDepth.infer as DepthModel.infer: two runs (the image and its mirror) at the network size of the
    reflect-padded image; the result is the mean of the run and the mirrored run's mirror, so the map of a
    mirrored image is the mirrored map (exactly, at an aligned size, where resize_image_with_pad adds nothing)."""
    annotators_env(reduced_dir)
    det = annotators.LOADED.get(annotators.load_zoe, (annotators.find_weight(annotators.ZOE),))
    seen = []
    handle = det.net.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["pixel_values"].shape)),
                                               with_kwargs=True)
    try:
        image = _scene(256, 384)
        out = det(image)
    finally:
        handle.remove()
    assert seen == [(1, 3, 352, 512)] * 2  # padded by (33, 41) to 322x466 -> 352x512
    assert out.shape == (256, 384) and out.dtype == np.uint8 and out.std() > 10
    x = torch.from_numpy(image).float().div(255).permute(2, 0, 1)[None]
    with torch.inference_mode():
        one, mirrored = det.infer_padded(x), det.infer_padded(torch.flip(x, dims=[3]))
    assert torch.equal(det.infer(x), (one + torch.flip(mirrored, dims=[3])) / 2)
    assert not torch.equal(one, torch.flip(mirrored, dims=[3]))  # the network is not symmetric itself
    pre = get_preprocessor("depth_zoe")
    a, b = pre(image, 256), pre(image[:, ::-1], 256)
    np.testing.assert_array_equal(a[:, ::-1], b)


@pytest.mark.parametrize("h, w, res", [(70, 90, 64), (200, 120, 96)])
def test_the_preprocessor_is_the_extensions_padded_call(reduced_dir, annotators_env, h, w, res):
    """depth_zoe as the extension's processor.py runs it: resize_image_with_pad to processor_res, the annotator
    on the padded image (its percentiles count the edge padding), the padding cropped; the planned sizes are
    the sizes it makes; three equal channels."""
    annotators_env(reduced_dir)
    pre = get_preprocessor("depth_zoe")
    pre.check_available("module")
    image = _scene(h, w)
    out = pre(image, res)
    (ph, pw), (oh, ow) = pre.sizes(h, w, res)
    padded, remove_pad = resize_image_with_pad(image, res)
    assert padded.shape[:2] == (ph, pw) and out.shape == (oh, ow, 3) and out.dtype == np.uint8
    det = annotators.LOADED.get(annotators.load_zoe, (annotators.find_weight(annotators.ZOE),))
    expected = remove_pad(zoe.depth_to_map(det.depth(padded)))
    np.testing.assert_array_equal(out, np.repeat(expected[:, :, None], 3, axis=2))
    assert out.std() > 5


def test_module_list_and_sliders_as_the_extension():
    """The extension's legacy table: depth_zoe, the Depth tag, priority 0, the Resolution slider only (its
    legacy "resolution": None is not read by LegacyPreprocessor, which keeps the class's 64..2048 / 512 / 8);
    it runs here now (not flagged); no controlnet_aux needed (transformers is a core dependency)."""
    from api_compat.webui.controlnet import control_types, modules

    detail = modules(False)["module_detail"]
    assert detail["depth_zoe"] == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]}
    pre = PREPROCESSORS["depth_zoe"]
    assert pre.tags == ("Depth",) and pre.priority == 0 and pre.model_based and not pre.fn.needs_aux
    assert "depth_zoe" not in [name for name, *_ in not_run_here()]
    depth = control_types([])["control_types"]["Depth"]
    assert depth["module_list"][:2] == ["none", "depth_midas"]  # the extension's Depth default (priority 100)
    assert depth["module_list"].index("depth_zoe") == 2  # then by label, descending


def test_missing_file_is_refused_naming_the_file_and_folders(tmp_path, annotators_env, monkeypatch):
    annotators_env()
    monkeypatch.delenv(annotators.ENV_ANNOTATORS_DIR)
    models = tmp_path / "webui" / "models"
    field = "controlnet_units[0].module"
    assert_missing_file_refused(models, "depth_zoe", "'ZoeD_M12_N.pt'", "zoedepth", field)
    flat = models / "ControlNetPreprocessor" / "ZoeD_M12_N.safetensors"  # Forge's flat layout, a converted file
    flat.parent.mkdir(parents=True)
    flat.write_bytes(b"")
    get_preprocessor("depth_zoe").check_available(field, models)


# ------------------------------------------------------------------------------- the reference (timm)


def _reference_importable() -> bool:
    try:
        return importlib.util.find_spec("controlnet_aux") is not None and \
            importlib.util.find_spec("timm") is not None and importlib.util.find_spec("torchvision") is not None
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _reference_importable(),
                    reason="the reference, controlnet_aux's zoe (the extension's annotator/zoe code), needs timm and "
                           "torchvision, which the engine does not install (a PyPI torchvision beside the CPU torch "
                           "breaks transformers); run it where they are installed")
def test_depth_zoe_equals_the_reference(tmp_path, annotators_env):
    """Random weights of the full real architecture (controlnet_aux's ZoeDepth built from its ZoeD_N config,
    seeded), saved as the original file ({'model': ...}); the engine's map equals controlnet_aux's ZoeDetector
    called the way the extension calls it (resize_image_with_pad, the padding cropped) within 1 uint8 level
    (different BEiT/attention kernels: float differences of ~1e-6 of the depth range move a few pixels across a
    level boundary), and the raw metric depth within 1e-4 of its range."""
    from controlnet_aux.zoe import ZoeDetector
    from controlnet_aux.zoe.zoedepth.models.zoedepth.zoedepth_v1 import ZoeDepth as Reference
    from controlnet_aux.zoe.zoedepth.utils.config import get_config

    ref = Reference.build_from_config(get_config("zoedepth", "infer"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.copy_(1 + 0.2 * r)
            elif name.endswith(("gamma_1", "gamma_2")):
                p.copy_(0.3 + 0.1 * r)
            elif "relative_position_bias_table" in name or name.endswith("cls_token"):
                p.copy_(0.5 * r)
            elif name.endswith(("seed_bin_regressor._net.2.bias",)) or (name.startswith("attractors")
                                                                         and name.endswith("2.bias")):
                p.copy_(0.5 + r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / max(1.0, p[0].numel() ** 0.5))
    ref.eval()
    state = ref.state_dict()
    golden = {k for k, _, _ in zoe_support.real_layout()}
    assert set(state) <= golden and golden - set(state) <= {k for k in golden if k.endswith("relative_position_index")}
    (tmp_path / "zoedepth").mkdir()
    torch.save({"model": state}, tmp_path / "zoedepth" / "ZoeD_M12_N.pt")
    annotators_env(tmp_path)
    detector = ZoeDetector(ref)
    pre = get_preprocessor("depth_zoe")
    det = annotators.LOADED.get(annotators.load_zoe, (annotators.find_weight(annotators.ZOE),))
    for image, res in ((_scene(96, 128), 128), (_scene(150, 100), 96)):
        padded, remove_pad = resize_image_with_pad(image, res)
        side = min(padded.shape[:2])
        expected = remove_pad(detector(padded, detect_resolution=side, image_resolution=side, output_type="np"))
        ours = pre(image, res)
        assert ours.shape == expected.shape
        diff = np.abs(ours.astype(int) - expected.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
        with torch.no_grad():
            x = torch.from_numpy(padded).float().div(255).permute(2, 0, 1)[None]
            reference_depth = ref.infer(x)[0, 0].numpy()
        depth = det.depth(padded)
        span = float(reference_depth.max() - reference_depth.min())
        assert span > 0 and np.abs(depth - reference_depth).max() <= 1e-4 * span
