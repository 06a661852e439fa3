"""seg_ofade20k / seg_ofcoco (engine.controlnet.oneformer): transformers' OneFormer loaded from the extension's
original Swin-L files through the engine's key mapping, called as sd-webui-controlnet calls it.

- The mapping against the real architecture: the original files' key names and shapes (tests/golden, listed from
  the extension's vendored model built with its configs), every inference key used exactly once, the result equal
  to transformers' model of the files' configuration (built on the meta device).
- Parity with the reference implementation (the extension's own annotator/oneformer code and its vendored
  detectron2) where a checkout of the extension is named by ``$SDENGINE_CONTROLNET_EXTENSION`` and its imports
  (timm, torchvision, fvcore, ...) work; skipped elsewhere.
- Pre/post-processing, the colour map, resolution handling and the refusal of a missing file, on reduced random
  files of the original layout (tests/oneformer_support.py).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from core.errors import InvalidRequest, ModelError  # noqa: E402
from engine.controlnet import annotators, oneformer as of  # noqa: E402
from engine.controlnet.preprocessors import PREPROCESSORS, get_preprocessor, resize_image_with_pad  # noqa: E402
from tests import oneformer_support as support  # noqa: E402
from tests.weights_support import photo_or_scene  # noqa: E402

KEYS = Path(__file__).parent / "golden" / "oneformer_swin_l_keys.json.gz"
MODULES = {"ade20k": "oneformer_ade20k", "coco": "oneformer_coco"}
LABELS = {"ade20k": "seg_ofade20k", "coco": "seg_ofcoco"}
WEIGHT = {"ade20k": annotators.ONEFORMER_ADE20K, "coco": annotators.ONEFORMER_COCO}


def _original(dataset: str) -> dict:
    with gzip.open(KEYS, "rt") as f:
        return json.load(f)[dataset]



# ------------------------------------------------------------------------------- the mapping, full size


@pytest.mark.parametrize("dataset", ["ade20k", "coco"])
def test_mapping_covers_the_real_swin_l_architecture(dataset):
    """Every key of the original Swin-L file (listed from the extension's model) is used exactly once (each fused
    q/k/v three times, as its three row blocks; the stored position index is transformers' own buffer), and the
    result is exactly transformers' model of the file's configuration: the same keys, the same shapes, except the
    two parts the original does not have and inference does not use."""
    from transformers import OneFormerForUniversalSegmentation

    original = _original(dataset)
    state = {k: torch.empty(shape, device="meta") for k, shape in original["keys"]}
    arch = of.architecture(state)
    _, name, queries, classes = support.FILES[dataset]
    assert arch == {**support.FULL, "depths": list(support.FULL["depths"]), "heads": list(support.FULL["heads"]),
                    "mlp_ratio": 4, "queries": queries, "classes": classes, "task_seq_len": 77}
    assert support.original_shapes(**support.FULL, queries=queries, classes=classes) == \
        {k: tuple(s) for k, s in original["keys"]}  # the test files' layout is the original's
    mapped = of.to_transformers(state)
    with torch.device("meta"):
        model = OneFormerForUniversalSegmentation(of.config(**arch))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not of._UNUSED.fullmatch(k)}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected
    assert {k for k in model.state_dict() if of._UNUSED.fullmatch(k)} == {
        "model.pixel_level_module.encoder.swin.layernorm.weight",
        "model.pixel_level_module.encoder.swin.layernorm.bias", "criterion.empty_weight", "criterion.logit_scale"}
    uses = Counter(id(v._base if v._base is not None else v) for v in mapped.values())
    for key, tensor in state.items():
        fused = key.endswith(("attn.qkv.weight", "attn.qkv.bias")) or ".self_attn.in_proj_" in key and \
            "transformer_self_attention_layers" in key
        assert uses[id(tensor)] == (0 if key.endswith("relative_position_index") else 3 if fused else 1), key
    assert sum(uses.values()) == len(mapped)
    # the memory estimate: the file's fp32 tensors (the position index is recomputed, not counted)
    values = sum(int(np.prod(s)) for k, s in original["keys"] if not k.endswith("relative_position_index"))
    assert WEIGHT[dataset].name == original["file"] == name
    assert WEIGHT[dataset].size_mb * 1024 * 1024 == pytest.approx(values * 4, rel=1e-3)


def test_configuration_as_the_extension_configs():
    cfg = of.config(**of.architecture({k: torch.empty(s, device="meta") for k, s in _original("ade20k")["keys"]}))
    bb = cfg.backbone_config
    assert (bb.embed_dim, list(bb.depths), list(bb.num_heads), bb.window_size) == (192, [2, 2, 18, 2],
                                                                                  [6, 12, 24, 48], 12)
    assert (cfg.num_queries, cfg.num_labels, cfg.hidden_dim, cfg.decoder_layers, cfg.query_dec_layers) == \
        (250, 150, 256, 10, 2)
    assert not cfg.is_training and cfg.use_task_norm and cfg.task_seq_len == 77 and cfg.norm == "GN"
    assert (of.DATASETS["ade20k"].min_size, of.DATASETS["ade20k"].max_size) == (640, 2560)
    assert (of.DATASETS["coco"].min_size, of.DATASETS["coco"].max_size) == (800, 1333)
    assert of.DATASETS["ade20k"].classes == 150 and of.DATASETS["coco"].classes == 133


def test_mapping_refuses_foreign_keys_and_skips_training_only_ones():
    state = {k: torch.empty(s, device="meta") for k, s in _original("coco")["keys"]}
    extra = {"text_encoder.positional_embedding": torch.empty(77, 256, device="meta"),
             "text_projector.layers.0.weight": torch.empty(256, 256, device="meta"),
             "prompt_ctx.weight": torch.empty(16, 256, device="meta"),
             "criterion.empty_weight": torch.empty(134, device="meta")}
    assert set(of.to_transformers({**state, **extra})) == set(of.to_transformers(state))
    with pytest.raises(ValueError, match="unexpected keys sem_seg_head.extra"):
        of.to_transformers({**state, "sem_seg_head.extra": torch.empty(1, device="meta")})


# ------------------------------------------------------------------------------- files and the call


@pytest.fixture(scope="module")
def of_dir(tmp_path_factory):
    """Both datasets' files (reduced random weights, the original layout and names) in the extension's layout;
    the COCO one with training-only text-encoder tensors too; deleted after the module."""
    root = tmp_path_factory.mktemp("oneformer")
    support.write_file(root, "ade20k", 31)
    support.write_file(root, "coco", 32, training=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_preprocessing_as_the_extension():
    """detectron2's ResizeShortestEdge sizes, PIL bilinear, the configs' mean/std on RGB, zero padding to 32, the
    task prompt's 77 token ids."""
    ade, coco = of.DATASETS["ade20k"], of.DATASETS["coco"]
    assert of.test_size(512, 512, ade) == (640, 640)
    assert of.test_size(512, 832, ade) == (640, 1040)
    assert of.test_size(832, 512, coco) == (1300, 800)
    assert of.test_size(512, 1024, coco) == (667, 1333)  # the long side capped: 1333 / 2 = 666.5 -> 667
    assert of.test_size(64, 4096, ade) == (40, 2560)
    image = np.zeros((64, 96, 3), np.uint8)
    image[..., 0] = 255
    x, (h, w) = of.prepare(image, ade)
    assert (h, w) == (640, 960) and tuple(x.shape) == (1, 3, 640, 960)
    expected = [(255 - 123.675) / 58.395, -116.28 / 57.12, -103.53 / 57.375]
    for c in range(3):
        assert torch.allclose(x[0, c], torch.full((640, 960), expected[c]), atol=1e-5), c
    x, (h, w) = of.prepare(np.zeros((50, 70, 3), np.uint8), ade)
    assert (h, w) == (640, 896) and tuple(x.shape) == (1, 3, 640, 896)
    x, (h, w) = of.prepare(np.zeros((50, 77, 3), np.uint8), ade)
    assert (h, w) == (640, 986) and tuple(x.shape) == (1, 3, 640, 992) and not x[0, :, :, 986:].any()
    tokens = of.task_inputs()
    assert tokens.shape == (1, 77) and tokens[0, :7].tolist() == list(of.TASK_TOKENS) and not tokens[0, 7:].any()


def test_colour_map_as_the_extension_draws_it():
    """White canvas, each class in its dataset colour (largest area first), regions without holes as polygons
    with a white edge, a region with holes as a flat mask; the map's interior pixels are the class colours."""
    ade = of.DATASETS["ade20k"]
    labels = np.zeros((60, 90), np.int64)
    labels[:, 45:] = 2
    labels[20:40, 10:30] = 5  # a hole in class 0's region
    out = of.draw(labels, ade)
    assert out.shape == (60, 90, 3) and out.dtype == np.uint8
    assert tuple(out[5, 5]) == ade.color(0) and tuple(out[30, 20]) == ade.color(5)
    assert tuple(out[30, 70]) == ade.color(2)
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert {ade.color(0), ade.color(2), ade.color(5)} <= colours
    # class 2's region has no hole: a polygon whose white edge shows along its border
    assert (out[10:50, 44:47] == 255).all(axis=-1).any()
    assert of.draw(np.full((8, 8), 151), ade).min() == 255  # a label outside the dataset is not drawn


@pytest.mark.parametrize("dataset", ["ade20k", "coco"])
def test_engine_map_equals_its_steps(dataset, of_dir, annotators_env):
    """The preprocessor's map is the extension's sequence of steps: resize_image_with_pad, the predictor's resize
    and padding, the masks upsampled to the padded input, cropped, resized to the image, softmax x sigmoid summed
    over the queries, argmax, the colour map, the padding cropped. The network's outputs are taken from the run
    itself (a forward hook); ADE20K on a non-square image, COCO on a square one."""
    import torch.nn.functional as F

    annotators_env(of_dir)
    pre = get_preprocessor(LABELS[dataset])
    assert pre is PREPROCESSORS[MODULES[dataset]]
    pre.check_available("module")
    (h, w), res = ((60, 90), 64) if dataset == "ade20k" else ((64, 64), 64)
    image = photo_or_scene(h, w)
    padded, remove_pad = resize_image_with_pad(image, res)
    model = annotators.LOADED.get(annotators.load_oneformer, (annotators.find_weight(WEIGHT[dataset]),))
    seen = []
    hook = model.register_forward_hook(lambda module, args, kwargs_out: seen.append(kwargs_out))
    try:
        ours = pre(image, res)
    finally:
        hook.remove()
    (out,) = seen
    th, tw = of.test_size(*padded.shape[:2], of.DATASETS[dataset])
    ph, pw = -(-th // 32) * 32, -(-tw // 32) * 32
    queries = support.SMALL["queries"]
    assert tuple(out.masks_queries_logits.shape) == (1, queries, ph // 4, pw // 4)
    assert tuple(out.class_queries_logits.shape) == (1, queries, of.DATASETS[dataset].classes + 1)
    masks = F.interpolate(out.masks_queries_logits, (ph, pw), mode="bilinear", align_corners=False)[:, :, :th, :tw]
    masks = F.interpolate(masks, padded.shape[:2], mode="bilinear", align_corners=False)[0].sigmoid()
    scores = (out.class_queries_logits[0].softmax(-1)[:, :-1, None, None] * masks[:, None]).sum(0)
    expected = remove_pad(of.draw(scores.argmax(0).numpy(), of.DATASETS[dataset]))
    _, (oh, ow) = pre.sizes(h, w, res)
    assert ours.shape == (oh, ow, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, expected)


def test_scores_in_query_chunks_are_the_whole_sum(of_dir, monkeypatch):
    """The masks are resized a few queries at a time: the scores are the sum over all queries all the same."""
    path = of_dir / "oneformer" / support.FILES["ade20k"][1]
    model = of.load(path, annotators.read_weights(path))
    image = photo_or_scene(64, 96)
    whole = of.semantic_scores(model, image, of.DATASETS["ade20k"])
    monkeypatch.setattr(of, "QUERY_CHUNK", 4)  # 6 queries: a chunk of 4 and one of 2
    chunked = of.semantic_scores(model, image, of.DATASETS["ade20k"])
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=1e-7)
    assert torch.equal(chunked.argmax(0), whole.argmax(0))


def test_files_load_in_both_formats_and_bad_files_are_refused(of_dir, tmp_path, annotators_env):
    """The detectron2 pickle ({"model": ...}) and a .safetensors of the same stem load the same network (the
    .safetensors taken first); a file of another network is a ModelError naming the file."""
    from safetensors.torch import save_file

    pth = of_dir / "oneformer" / support.FILES["ade20k"][1]
    state = annotators.read_weights(pth)["model"]
    (tmp_path / "oneformer").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()},
              tmp_path / "oneformer" / Path(support.FILES["ade20k"][1]).with_suffix(".safetensors"))
    annotators_env(tmp_path)
    found = annotators.find_weight(annotators.ONEFORMER_ADE20K)
    assert found.suffix == ".safetensors"
    a, b = of.load(found, annotators.read_weights(found)), of.load(pth, annotators.read_weights(pth))
    for (k, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(u, v), k
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="not a OneFormer"):
        of.load(tmp_path / "other.pth", annotators.read_weights(tmp_path / "other.pth"))


def test_missing_file_is_refused_naming_the_file_and_folders(tmp_path, annotators_env, monkeypatch):
    annotators_env()
    monkeypatch.delenv(annotators.ENV_ANNOTATORS_DIR)
    models = tmp_path / "webui" / "models"
    field = "controlnet_units[0].module"
    for dataset in ("ade20k", "coco"):
        with pytest.raises(InvalidRequest) as err:
            get_preprocessor(LABELS[dataset]).check_available(field, models)
        message = str(err.value)
        assert err.value.field == field and support.FILES[dataset][1] in message
        assert str(models / "ControlNetPreprocessor" / "oneformer") in message
        assert str(tmp_path / "webui" / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" /
                   "oneformer") in message


def test_missing_matplotlib_is_refused_naming_the_extra(of_dir, annotators_env, monkeypatch):
    annotators_env(of_dir)
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)  # not imported, and not installed:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(InvalidRequest, match=r"matplotlib \(the 'controlnet' extra"):
        get_preprocessor("seg_ofcoco").check_available("module")


def test_sliders_and_memory_estimate():
    """The legacy table gives both modules resolution None (the default Resolution slider shows) and no
    thresholds; labels, tags, priorities as the extension's; the weights count in the estimate."""
    from engine.admission import preprocessor_bytes
    from engine.request import ControlNetUnit

    for dataset, module in MODULES.items():
        pre = PREPROCESSORS[module]
        assert [s.api_json() for s in pre.sliders().values()] == [
            {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]
        assert pre.label == LABELS[dataset] and pre.tags == ("Segmentation",) and pre.resize == "pad"
        assert pre.model_based and not pre.fn.needs_aux and pre.fn.packages == (("matplotlib", "controlnet"),)
    assert PREPROCESSORS["oneformer_ade20k"].priority == 100 and PREPROCESSORS["oneformer_coco"].priority == 0
    units = [ControlNetUnit(model="m", image=np.zeros((8, 8, 3), np.uint8), module=m) for m in LABELS.values()]
    assert preprocessor_bytes(units) == int((834.7 + 834.6) * 1024 * 1024)


# ------------------------------------------------------------------------------- parity with the reference

ENV_EXTENSION = "SDENGINE_CONTROLNET_EXTENSION"


def _reference_importable() -> str | None:
    """Why the reference cannot run here, or None: it is the extension's own annotator/oneformer package (with
    its vendored detectron2), from a checkout named by $SDENGINE_CONTROLNET_EXTENSION, whose imports need timm
    (and so torchvision), fvcore, iopath, omegaconf and pycocotools."""
    root = os.environ.get(ENV_EXTENSION)
    if not root or not (Path(root) / "annotator" / "oneformer" / "api.py").is_file():
        return (f"the reference implementation (the extension's annotator/oneformer) needs a checkout of "
                f"sd-webui-controlnet named by ${ENV_EXTENSION}")
    for name in ("torchvision", "timm", "fvcore", "iopath", "omegaconf", "pycocotools"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"the reference implementation's imports are missing here: {name!r}"
    return None


def _reference_predictor(dataset: str, path: Path):
    """The extension's make_detectron2_model for ``dataset``'s config with a reduced architecture (the file's),
    and its semantic_run. The webui modules it imports (modules.devices, modules.shared) are stand-ins; Pillow
    10 lacks the aliases its vendored detectron2 names (the webui ships Pillow 9.5)."""
    from PIL import Image

    for alias, value in (("LINEAR", Image.BILINEAR), ("CUBIC", Image.BICUBIC), ("ANTIALIAS", Image.LANCZOS)):
        if not hasattr(Image, alias):
            setattr(Image, alias, value)
    root = os.environ[ENV_EXTENSION]
    if root not in sys.path:
        sys.path.insert(0, root)
    modules = sys.modules.setdefault("modules", types.ModuleType("modules"))
    modules.devices = sys.modules.setdefault("modules.devices", types.ModuleType("modules.devices"))
    modules.devices.get_device_for = lambda name: "cpu"
    modules.shared = sys.modules.setdefault("modules.shared", types.ModuleType("modules.shared"))
    modules.shared.opts = types.SimpleNamespace(data={"control_net_modules_path": str(path.parent.parent)})
    modules.shared.cmd_opts, modules.shared.data_path = types.SimpleNamespace(), str(path.parent.parent)
    from annotator.oneformer import OneformerDetector
    from annotator.oneformer.api import semantic_run
    from annotator.oneformer.detectron2.config import get_cfg
    from annotator.oneformer.detectron2.data import MetadataCatalog
    from annotator.oneformer.detectron2.projects.deeplab import add_deeplab_config
    from annotator.oneformer.oneformer import (add_common_config, add_dinat_config, add_oneformer_config,
                                               add_swin_config)
    from annotator.oneformer.oneformer.demo.defaults import DefaultPredictor

    small = support.SMALL
    cfg = get_cfg()
    for add in (add_deeplab_config, add_common_config, add_swin_config, add_oneformer_config, add_dinat_config):
        add(cfg)
    cfg.merge_from_file(str(Path(root) / "annotator" / "oneformer" / OneformerDetector.configs[dataset]["config"]))
    cfg.MODEL.SWIN.EMBED_DIM, cfg.MODEL.SWIN.DEPTHS = small["embed"], list(small["depths"])
    cfg.MODEL.SWIN.NUM_HEADS, cfg.MODEL.SWIN.WINDOW_SIZE = list(small["heads"]), small["window"]
    cfg.MODEL.ONE_FORMER.NUM_OBJECT_QUERIES, cfg.MODEL.ONE_FORMER.HIDDEN_DIM = small["queries"], small["hidden"]
    cfg.MODEL.ONE_FORMER.DEC_LAYERS, cfg.MODEL.ONE_FORMER.DIM_FEEDFORWARD = small["decoder_layers"], \
        small["feedforward"]
    cfg.MODEL.ONE_FORMER.CLASS_DEC_LAYERS = small["query_layers"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = small["conv_dim"], small["mask_dim"]
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = small["encoder_layers"]
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", str(path)
    cfg.freeze()
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST_PANOPTIC[0])
    return predictor, lambda img: semantic_run(img, predictor, metadata)


@pytest.mark.skipif(_reference_importable() is not None, reason=str(_reference_importable()))
@pytest.mark.parametrize("dataset", ["ade20k", "coco"])
def test_parity_with_the_reference_implementation(dataset, of_dir, annotators_env):
    """The engine's map against the extension's own OneFormer path (make_detectron2_model, semantic_run) with the
    same file, called as its legacy processor calls it (resize_image_with_pad, the padding cropped), at a square
    and a non-square size. Tolerance: class scores within 1e-4 (float32 sums in another order), the labels and the
    colour map equal."""
    annotators_env(of_dir)
    path = of_dir / "oneformer" / support.FILES[dataset][1]
    predictor, run = _reference_predictor(dataset, path)
    model = of.load(path, annotators.read_weights(path))
    # the third: so elongated that the last Swin stage's map is no larger than the window (both keep its window
    # and shift there, the map padded)
    for (h, w), res in (((64, 64), 64), ((60, 90), 96), ((40, 1000), 64)):
        image = photo_or_scene(h, w)
        padded, remove_pad = resize_image_with_pad(image, res)
        with torch.no_grad():
            reference = predictor(padded[:, :, ::-1], "semantic")["sem_seg"]
        scores = of.semantic_scores(model, padded, of.DATASETS[dataset])
        assert (scores - reference).abs().max() <= 1e-4
        assert torch.equal(scores.argmax(0), reference.argmax(0))
        ours = get_preprocessor(LABELS[dataset])(image, res)
        assert np.array_equal(ours, remove_pad(run(padded)))


def test_the_memory_check_counts_the_image_sized_class_scores(tiny_store):
    """The class scores (and a chunk of masks) are image-sized: at submit the memory check adds them at the unit's
    padded working size, and refuses naming the unit's processor_res when they do not fit (engine.admission)."""
    from dataclasses import replace

    from core.errors import TooMuchMemory
    from engine.admission import check_memory, preprocessor_work, preprocessor_bytes
    from engine.config import EngineConfig
    from engine.memory import architecture_of, estimate_request
    from engine.request import ControlNetUnit, GenerationRequest

    arch, native = architecture_of(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors")
    image = np.zeros((512, 768, 3), np.uint8)
    unit = ControlNetUnit(model="m", image=image, module="seg_ofade20k", processor_res=2048, pixel_perfect=False)
    work, k = preprocessor_work([ControlNetUnit(model="m", image=image, module="canny"), unit], 256, 256)
    assert k == 1 and work == of.pixel_bytes(150) * 2048 * 3072  # the padded 2048 x 3072 working image
    coco = replace(unit, module="seg_ofcoco")
    assert preprocessor_work([coco], 256, 256)[0] == of.pixel_bytes(133) * 2048 * 3072 < work
    req = GenerationRequest(width=256, height=256, controlnet_units=(unit,))
    weights = preprocessor_bytes(req.controlnet_units)
    plain = estimate_request(arch, 256, 256, 1, backend="torch", units=1, preprocessor_bytes=weights)
    budget = plain.total + work // 2
    config = EngineConfig(models_dir=tiny_store, backend="torch")
    with pytest.raises(TooMuchMemory) as exc:
        check_memory(arch, native, "tiny-sd1", config, req, budget)
    assert exc.value.field == "controlnet_units[0].processor_res" and "processor_res" in exc.value.allowed
    check_memory(arch, native, "tiny-sd1", config, replace(req, controlnet_units=(replace(unit, processor_res=512),)),
                 budget)


def test_detect_is_refused_when_the_class_scores_do_not_fit(of_dir, annotators_env):
    """/controlnet/detect's submit (api_compat.detect.parse_detect) counts the network and its image-sized class
    scores at the working size against the server's memory budget, naming controlnet_processor_res."""
    import base64
    import io

    from PIL import Image

    from api_compat.detect import parse_detect
    from api_compat.errors import ApiError
    from api_compat.images import ImageLimits

    annotators_env(of_dir)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((512, 768, 3), np.uint8)).save(buf, format="PNG")
    body = {"controlnet_module": "seg_ofade20k", "controlnet_input_images": [base64.b64encode(buf.getvalue()).decode()],
            "controlnet_processor_res": 2048}
    budget = 3 * 2**30  # the weights (0.8 GiB) and the scores at 512 fit; at 2048 (a 2048 x 3072 image) they do not
    with pytest.raises(ApiError) as err:
        parse_detect(body, ImageLimits(), memory_budget=budget)
    assert err.value.field == "controlnet_processor_res" and err.value.code == "too_much_memory"
    assert parse_detect({**body, "controlnet_processor_res": 512}, ImageLimits(), memory_budget=budget).processor_res == 512
    assert parse_detect(body, ImageLimits()).processor_res == 2048  # no budget: not checked
