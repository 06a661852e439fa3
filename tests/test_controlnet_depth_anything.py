"""depth_anything and depth_anything_v2 (engine.controlnet.depth_anything): transformers' DepthAnything network
loaded from the original files through the engine's key mapping, called as sd-webui-controlnet calls it.

- The mapping against the real architecture: the original ViT-L files' key names and shapes (tests/data, listed
  from the original networks), every key used exactly once, the shapes equal to transformers' model of the
  extension's configuration (built on the meta device).
- Parity with the reference implementation (the original ``depth_anything`` / ``depth_anything_v2`` packages the
  extension imports) where it is importable; skipped elsewhere (it needs torchvision).
- Pre/post-processing, resolution handling and the refusal of a missing file, on random ViT-S files of the
  original layout (tests/depth_anything_support.py).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cv2")
torch = pytest.importorskip("torch")

from core.errors import ModelError  # noqa: E402
from engine.controlnet import annotators, depth_anything as da  # noqa: E402
from engine.controlnet.preprocessors import PREPROCESSORS, get_preprocessor, resize_image_with_pad  # noqa: E402
from tests import depth_anything_support as support  # noqa: E402
from tests.weights_support import photo_or_scene  # noqa: E402
from tests.conftest import assert_missing_file_refused  # noqa: E402

KEYS = Path(__file__).parent / "data" / "depth_anything_vitl_keys.json.gz"
MODULES = {"v1": "depth_anything", "v2": "depth_anything_v2"}


def _original(version: str) -> dict:
    with gzip.open(KEYS, "rt") as f:
        return json.load(f)[version]



# ------------------------------------------------------------------------------- the mapping, full size


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mapping_covers_the_real_vitl_architecture(version):
    """Every key of the original ViT-L file (listed from the original network) is used exactly once (each fused
    q/k/v three times, as its three row blocks), and the result is exactly transformers' model of the extension's
    configuration: the same keys, the same shapes."""
    from transformers import DepthAnythingForDepthEstimation

    original = _original(version)
    state = {k: torch.empty(shape, device="meta") for k, shape in original["keys"]}
    mapped = da.to_transformers(state)
    with torch.device("meta"):
        model = DepthAnythingForDepthEstimation(da.config(version))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected
    # provenance: each mapped tensor is an original tensor or a row block of one
    uses = Counter(id(v._base if v._base is not None else v) for v in mapped.values())
    for key, tensor in state.items():
        assert uses[id(tensor)] == (3 if ".attn.qkv." in key else 1), key
    assert sum(uses.values()) == len(mapped)
    # the memory estimate is the real file's fp32 parameters
    params = sum(int(np.prod(shape)) for _, shape in original["keys"])
    weight = annotators.DEPTH_ANYTHING if version == "v1" else annotators.DEPTH_ANYTHING_V2
    assert weight.name == original["file"]
    assert weight.size_mb * 1024 * 1024 == pytest.approx(params * 4, rel=1e-3)


def test_versions_differ_in_the_blocks_feeding_the_neck():
    """v1 takes ViT-L's last four blocks, v2 blocks 4, 11, 17, 23 (transformers counts the embeddings as hidden
    state 0); both through the final layer norm, relative depth with a ReLU head, the extension's neck sizes."""
    v1, v2 = da.config("v1"), da.config("v2")
    assert list(v1.backbone_config.out_indices) == [21, 22, 23, 24]
    assert list(v2.backbone_config.out_indices) == [5, 12, 18, 24]
    assert list(da.config("v2", 384, 12, (48, 96, 192, 384), 64).backbone_config.out_indices) == [3, 6, 9, 12]
    for cfg in (v1, v2):
        assert cfg.backbone_config.apply_layernorm and not cfg.backbone_config.reshape_hidden_states
        assert (cfg.backbone_config.hidden_size, cfg.backbone_config.num_hidden_layers,
                cfg.backbone_config.num_attention_heads) == (1024, 24, 16)
        assert list(cfg.neck_hidden_sizes) == [256, 512, 1024, 1024] and cfg.fusion_hidden_size == 256
        assert list(cfg.reassemble_factors) == [4, 2, 1, 0.5] and cfg.head_hidden_size == 32
        assert cfg.depth_estimation_type == "relative" and cfg.max_depth == 1


def test_mapping_refuses_foreign_keys():
    state = {k: torch.empty(shape, device="meta") for k, shape in _original("v1")["keys"]}
    with pytest.raises(ValueError, match="unexpected keys pretrained.extra"):
        da.to_transformers({**state, "pretrained.extra": torch.empty(1, device="meta")})
    del state["depth_head.scratch.refinenet2.out_conv.bias"]
    with pytest.raises(ValueError, match="missing keys depth_head.scratch.refinenet2.out_conv.bias"):
        da.to_transformers(state)


# ------------------------------------------------------------------------------- files and the call


@pytest.fixture(scope="module")
def da_dir(tmp_path_factory):
    """Both versions' files (random ViT-S weights, the original layouts and names, fp16) in the extension's
    layout; deleted after the module."""
    root = tmp_path_factory.mktemp("depth_anything")
    for seed, version in enumerate(("v1", "v2"), 21):
        support.write_file(root / support.FILES[version][0], version, seed)
    yield root
    shutil.rmtree(root, ignore_errors=True)  # ~100 MB (tests/README.md: large random files are deleted)


def test_preprocessing_as_the_extension():
    """The network's input: the RGB image converted with the BGR->RGB code (channels swapped, as the extension
    does to its RGB array), /255, cubic resize to the 518 lower bound at multiples of 14 (aspect kept),
    ImageNet normalisation."""
    assert da.net_size(512, 512) == (518, 518)
    assert da.net_size(64, 128) == (518, 1036)
    assert da.net_size(640, 512) == (644, 518)  # 647.5 -> 46.25 patches -> 46
    assert da.net_size(320, 512) == (518, 826)  # 828.8 -> 59.2 patches -> 59
    assert da.net_size(1024, 768) == (686, 518)  # 690.7 -> 49.3 -> 49
    assert da.net_size(600, 1400) == (518, 1204)  # 1208.7 -> 86.3 -> 86
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255
    x = da.prepare(red)
    assert tuple(x.shape) == (1, 3, 518, 518) and x.dtype == torch.float32
    # red became the third channel (BGR->RGB on an RGB array), then (v - mean) / std per channel
    expected = [(0 - 0.485) / 0.229, (0 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    for c in range(3):
        assert torch.allclose(x[0, c], torch.full((518, 518), expected[c]), atol=1e-5), c


def test_postprocessing_as_the_extension():
    """Min-max to 0..255, truncated to uint8; a constant depth gives a black map."""
    depth = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    assert da.to_levels(depth).tolist() == [[0, 63], [127, 255]]
    assert da.to_levels(torch.full((3, 4), 2.5)).tolist() == [[0] * 4] * 3


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_engine_map_equals_its_steps(version, da_dir, annotators_env):
    """The preprocessor's map is the extension's sequence of steps: resize_image_with_pad, the network at the
    518 lower bound, the depth resized back (bilinear) to the padded size, min-max levels, the padding cropped.
    v1 on a padded non-square image (the position grid interpolated), v2 on a square one; the network's output
    is taken from the run itself (a forward hook), so each case runs the network once; maps vary."""
    import torch.nn.functional as F

    annotators_env(da_dir)
    pre = get_preprocessor(MODULES[version])
    pre.check_available("module")
    (h, w), res = ((70, 90), 64) if version == "v1" else ((64, 64), 64)
    image = photo_or_scene(h, w)
    padded, remove_pad = resize_image_with_pad(image, res)
    loader = annotators.load_depth_anything if version == "v1" else annotators.load_depth_anything_v2
    path = annotators.find_weight(annotators.DEPTH_ANYTHING if version == "v1" else annotators.DEPTH_ANYTHING_V2)
    model = annotators.LOADED.get(loader, (path,))  # the network the preprocessor runs
    seen = []
    hook = model.register_forward_hook(lambda module, args, kwargs_out: seen.append(kwargs_out.predicted_depth))
    try:
        ours = pre(image, res)
    finally:
        hook.remove()
    (depth,) = seen
    assert tuple(depth.shape[1:]) == da.net_size(*padded.shape[:2])
    depth = F.interpolate(depth[None], padded.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    expected = remove_pad(((depth - depth.min()) / (depth.max() - depth.min()) * 255.0).numpy().astype(np.uint8))
    _, (oh, ow) = pre.sizes(h, w, res)
    assert ours.shape == (oh, ow, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours[:, :, 0], expected) and np.array_equal(ours[:, :, 0], ours[:, :, 2])
    assert ours.std() > 1


def test_files_load_in_both_formats_and_bad_files_are_refused(da_dir, tmp_path, annotators_env):
    """v2 from its .pth (the original release's name) when no .safetensors is there; a file of another network
    is a ModelError naming the file."""
    state = annotators.read_weights(da_dir / "depth_anything_v2" / "depth_anything_v2_vitl.safetensors")
    (tmp_path / "depth_anything_v2").mkdir()
    torch.save(state, tmp_path / "depth_anything_v2" / "depth_anything_v2_vitl.pth")
    annotators_env(tmp_path)
    found = annotators.find_weight(annotators.DEPTH_ANYTHING_V2)
    assert found == tmp_path / "depth_anything_v2" / "depth_anything_v2_vitl.pth"
    other = da_dir / "depth_anything_v2" / "depth_anything_v2_vitl.safetensors"
    a, b = (da.load("v2", f, annotators.read_weights(f)) for f in (found, other))
    for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(u, v), k
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="not a Depth Anything file"):
        da.load("v1", tmp_path / "other.pth", annotators.read_weights(tmp_path / "other.pth"))


def test_missing_file_is_refused_naming_the_file_and_folders(tmp_path, annotators_env, monkeypatch):
    annotators_env()
    monkeypatch.delenv(annotators.ENV_ANNOTATORS_DIR)
    models = tmp_path / "webui" / "models"
    for module, name, folder in (("depth_anything", "depth_anything_vitl14.pth", "depth_anything"),
                                 ("depth_anything_v2", "depth_anything_v2_vitl.safetensors", "depth_anything_v2")):
        assert_missing_file_refused(models, module, name, folder)


def test_sliders_and_memory_estimate():
    """The extension's legacy table gives both modules no thresholds and the default Resolution slider (its
    module_detail shows the Preprocessor class's slider_resolution); the weights count in the estimate."""
    from engine.admission import preprocessor_bytes
    from engine.request import ControlNetUnit

    for module in MODULES.values():
        pre = PREPROCESSORS[module]
        assert [s.api_json() for s in pre.sliders().values()] == [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]
        assert pre.tags == ("Depth",) and pre.label is None and pre.resize == "pad" and pre.model_based
        assert not pre.fn.needs_aux  # transformers' network: no controlnet_aux
    units = [ControlNetUnit(model="m", image=np.zeros((8, 8, 3), np.uint8), module=m) for m in MODULES.values()]
    assert preprocessor_bytes(units) == int(2 * 1279.1 * 1024 * 1024)


# ------------------------------------------------------------------------------- parity with the reference


def _reference_importable() -> str | None:
    """Why the reference cannot run here, or None: the original packages (depth_anything, depth_anything_v2,
    which import torchvision) and, for v1, DINOv2's torch.hub code in the hub cache (the extension builds v1's
    backbone with torch.hub.load('facebookresearch/dinov2', ...))."""
    for name in ("torchvision", "depth_anything", "depth_anything_v2"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return (f"the reference implementation (the original depth_anything / depth_anything_v2 packages, which "
                    f"import torchvision) is not importable here: {name!r} is missing")
    if not (Path(torch.hub.get_dir()) / "facebookresearch_dinov2_main" / "hubconf.py").is_file():
        return "DINOv2's torch.hub code (facebookresearch_dinov2_main) is not in the torch hub cache"
    return None


def _reference_network(version: str, state: dict):
    """The original network (ViT-S: features 64, out_channels 48/96/192/384), the file's weights."""
    if version == "v1":
        import torch.nn as nn
        from depth_anything.dpt import DPT_DINOv2, DPTHead

        net = DPT_DINOv2.__new__(DPT_DINOv2)  # DPT_DINOv2.__init__, its backbone from the local hub cache
        nn.Module.__init__(net)
        net.pretrained = torch.hub.load(str(Path(torch.hub.get_dir()) / "facebookresearch_dinov2_main"),
                                        "dinov2_vits14", source="local", pretrained=False)
        net.depth_head = DPTHead(1, 384, 64, False, out_channels=[48, 96, 192, 384], use_clstoken=False)
    else:
        from depth_anything_v2.dpt import DepthAnythingV2

        net = DepthAnythingV2(encoder="vits", features=64, out_channels=[48, 96, 192, 384])
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return net.eval()


def _reference_call(net, image: np.ndarray):
    """annotator/depth_anything*.py __call__(image, colored=False) with the reference package's transforms,
    returning the raw depth at the image's size too."""
    import cv2
    import torch.nn.functional as F
    from depth_anything.util.transform import NormalizeImage, PrepareForNet, Resize
    from torchvision.transforms import Compose

    transform = Compose([Resize(width=518, height=518, resize_target=False, keep_aspect_ratio=True,
                                ensure_multiple_of=14, resize_method="lower_bound",
                                image_interpolation_method=cv2.INTER_CUBIC),
                         NormalizeImage(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), PrepareForNet()])
    h, w = image.shape[:2]
    x = transform({"image": cv2.cvtColor(image, cv2.COLOR_BGR2RGB) / 255.0})["image"]
    with torch.no_grad():
        depth = net(torch.from_numpy(x).unsqueeze(0))
    depth = F.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
    levels = ((depth - depth.min()) / (depth.max() - depth.min()) * 255.0).numpy().astype(np.uint8)
    return depth.numpy(), levels


@pytest.mark.skipif(_reference_importable() is not None, reason=str(_reference_importable()))
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_parity_with_the_reference_implementation(version, da_dir, annotators_env):
    """The engine's map against the original network (the packages the extension imports) with the same file,
    called as the extension calls it (resize_image_with_pad, __call__ with colored=False, remove_pad), at a square
    and a non-square padded size (the position grid interpolated). Tolerance: raw depth within 1e-4 of its range
    (float32 sums in another order), the map within 1 level (truncation near a level's edge)."""
    annotators_env(da_dir)
    folder, name = support.FILES[version]
    net = _reference_network(version, annotators.read_weights(da_dir / folder / name))
    model = da.load(version, da_dir / folder / name, annotators.read_weights(da_dir / folder / name))
    for (h, w), res in (((64, 64), 64), ((70, 90), 64)):
        image = photo_or_scene(h, w)
        padded, remove_pad = resize_image_with_pad(image, res)
        ref_raw, ref_levels = _reference_call(net, padded)
        raw = da.raw_depth(model, padded).numpy()
        assert np.abs(raw - ref_raw).max() <= 1e-4 * (ref_raw.max() - ref_raw.min())
        ours = get_preprocessor(MODULES[version])(image, res)[:, :, 0]
        assert np.abs(ours.astype(int) - remove_pad(ref_levels).astype(int)).max() <= 1
