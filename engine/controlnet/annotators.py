"""Model-based ControlNet preprocessors (softedge, scribble, mlsd, lineart, openpose, normal_bae, depth_leres,
depth_leres++, depth_midas, normal_midas, depth_anything, depth_anything_v2, depth_zoe, seg_ofade20k and
seg_ofcoco), run with the networks
of ``controlnet_aux`` (the library these annotators are maintained in; the ``annotators`` extra) as
sd-webui-controlnet runs them (scripts/preprocessor/legacy/processor.py): the input's short side resized to
``processor_res`` and padded to multiples of 64 (``resize_image_with_pad``), the network run on that, the padding
cropped off, then the module's post-processing (the scribble modules' NMS + blur + threshold on the cropped map).
dw_openpose_full runs DWPose's two ONNX files through onnxruntime the same way (engine.controlnet.dwpose; no
controlnet_aux: its DWPose needs mmpose). depth_midas / normal_midas run MiDaS DPT-Hybrid with transformers' DPT
on the extension's file, its keys mapped (engine.controlnet.midas; no controlnet_aux: its MiDaS needs timm, which
needs torchvision); depth_anything and depth_anything_v2 run transformers' DepthAnythingForDepthEstimation on the
extension's original files through the engine's key mapping (engine.controlnet.depth_anything; not in
controlnet_aux 0.0.10); depth_zoe runs the original ZoeD_M12_N file in transformers' ZoeDepth through our key
mapping, with the extension's ZoeDepth pre- and post-processing (engine.controlnet.zoe; no controlnet_aux: its
ZoeDepth is built with timm, which needs torchvision); seg_ofade20k / seg_ofcoco run the extension's OneFormer
Swin-L files in transformers' OneFormerForUniversalSegmentation through our key mapping, with the extension's
detectron2 pre- and post-processing and its matplotlib-drawn colour map (engine.controlnet.oneformer; not in
controlnet_aux 0.0.10).

Weights are read where users keep them, never downloaded (:func:`search_dirs`): ``$SDENGINE_ANNOTATORS_DIR``
(one or more folders, ``os.pathsep``-separated), Forge's ``{models_dir}/ControlNetPreprocessor/``, and the
extension's ``{models_dir}/../extensions/sd-webui-controlnet/annotator/downloads/``; in each, the file by the
extension's name either in the extension's sub-folder (``pidinet/table5_pidinet.pth``) or at the top. A module
whose file is missing is listed; a request for it is refused at submit naming the file and the folder
(:func:`check_available`). Files are the extension's pickles, read with ``torch.load(weights_only=True)`` (no
pickled code runs), or a ``.safetensors`` of the same stem (docs/DECISIONS.md "Model-based ControlNet
preprocessors"); DWPose's are ONNX graphs.

``controlnet_aux`` is imported without its package ``__init__`` (which imports every annotator, some through
torchvision, timm or scikit-image): only the sub-packages used are loaded (:func:`aux`). Two of them import a few
torchvision transforms / one scikit-image function at import time; where those packages are missing (the engine
never installs torchvision: a PyPI build beside the CPU torch breaks transformers), those names are given by
small equivalents for the duration of that import only (:func:`_import_shims`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
import types
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import InvalidRequest, MissingDependency, ModelError
from engine.controlnet.openpose import draw_people, pose_json

log = logging.getLogger(__name__)

ENV_ANNOTATORS_DIR = "SDENGINE_ANNOTATORS_DIR"
FORGE_FOLDER = "ControlNetPreprocessor"
EXTENSION_DOWNLOADS = Path("extensions", "sd-webui-controlnet", "annotator", "downloads")
MAX_LOADED = 2  # annotator networks kept loaded between requests (least recently used dropped first)


@dataclass(frozen=True)
class WeightFile:
    """A weight file as the extension keeps it: ``annotator/downloads/{folder}/{name}``; ``alternatives``: other
    names of the same network accepted when ``name`` is absent (M-LSD's tiny file)."""

    folder: str
    name: str
    alternatives: tuple[str, ...] = ()
    size_mb: float = 0.0  # the real file's size in MiB (the memory estimate)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.alternatives)


# the extension's files (annotator/<name>/__init__.py: remote_model_path and the downloads folder)
PIDINET = WeightFile("pidinet", "table5_pidinet.pth", size_mb=2.8)
HED = WeightFile("hed", "ControlNetHED.pth", size_mb=29.4)
MLSD = WeightFile("mlsd", "mlsd_large_512_fp32.pth", ("mlsd_tiny_512_fp32.pth",), size_mb=6.3)
LINEART = WeightFile("lineart", "sk_model.pth", size_mb=17.2)
LINEART_COARSE = WeightFile("lineart", "sk_model2.pth", size_mb=17.2)
LINEART_ANIME = WeightFile("lineart_anime", "netG.pth", size_mb=217.4)
OPENPOSE_BODY = WeightFile("openpose", "body_pose_model.pth", size_mb=209.3)
OPENPOSE_HAND = WeightFile("openpose", "hand_pose_model.pth", size_mb=147.3)
OPENPOSE_FACE = WeightFile("openpose", "facenet.pth", size_mb=153.7)
NORMAL_BAE = WeightFile("normal_bae", "scannet.pt", size_mb=291.5)
TEED = WeightFile("TEED", "7_model.pth", size_mb=0.3)  # softedge_teed (the extension's annotator/teed)
LERES = WeightFile("leres", "res101.pth", size_mb=530.0)
LERES_BOOST = WeightFile("leres", "latest_net_G.pth", size_mb=303.5)  # depth_leres++'s merge network
# DWPose (dw_openpose_full): ONNX files, run through onnxruntime (engine.controlnet.dwpose)
DWPOSE_DETECTOR = WeightFile("openpose", "yolox_l.onnx", size_mb=207.0)
DWPOSE_ESTIMATOR = WeightFile("openpose", "dw-ll_ucoco_384.onnx", size_mb=128.0)
# MiDaS DPT-Hybrid (depth / normal_map): run with transformers' DPT (engine.controlnet.midas), no controlnet_aux
MIDAS = WeightFile("midas", "dpt_hybrid-midas-501f0c75.pt", size_mb=469.9)
# Depth Anything (ViT-L/14, 335.3M fp32 parameters), run on transformers' implementation (engine.controlnet.
# depth_anything); v2's file as the extension downloads it (a safetensors), or the original release's .pth
DEPTH_ANYTHING = WeightFile("depth_anything", "depth_anything_vitl14.pth", size_mb=1279.1)
DEPTH_ANYTHING_V2 = WeightFile("depth_anything_v2", "depth_anything_v2_vitl.safetensors",
                               ("depth_anything_v2_vitl.pth",), size_mb=1279.1)
# ZoeDepth (depth_zoe): the original ZoeD_N file, run by transformers' ZoeDepth (engine.controlnet.zoe)
ZOE = WeightFile("zoedepth", "ZoeD_M12_N.pt", size_mb=1376.5)
# OneFormer Swin-L (seg_ofade20k, seg_ofcoco; annotator/oneformer/__init__.py OneformerDetector.configs), run by
# transformers' OneFormer (engine.controlnet.oneformer). size_mb: the inference network's fp32 tensors as loaded
# (218.8M values; the training-only text encoder a checkpoint may also carry is not loaded)
ONEFORMER_ADE20K = WeightFile("oneformer", "250_16_swin_l_oneformer_ade20k_160k.pth", size_mb=834.7)
ONEFORMER_COCO = WeightFile("oneformer", "150_16_swin_l_oneformer_coco_100ep.pth", size_mb=834.6)


def search_dirs(models_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for annotator weights, in order: ``$SDENGINE_ANNOTATORS_DIR`` (``os.pathsep``-
    separated), ``{models_dir}/ControlNetPreprocessor`` (Forge), ``{models_dir}/../extensions/sd-webui-controlnet/
    annotator/downloads`` (the extension, when ``models_dir`` is a webui's ``models`` folder)."""
    from engine.config import default_models_dir

    dirs = [Path(p).expanduser().absolute() for p in os.environ.get(ENV_ANNOTATORS_DIR, "").split(os.pathsep)
            if p.strip()]
    models = Path(models_dir).absolute() if models_dir is not None else default_models_dir()
    dirs += [models / FORGE_FOLDER, models.parent / EXTENSION_DOWNLOADS]
    return dirs


def find_weight(weight: WeightFile, models_dir=None) -> Path | None:
    """The first file of ``weight`` in :func:`search_dirs` (its sub-folder first, then the folder's top)."""
    for root in search_dirs(models_dir):
        for name in weight.names:
            for base in (root / weight.folder, root):
                # a .safetensors of the same stem (a converted file) is taken before a pickle
                converted = () if name.endswith(".onnx") else (base / Path(name).with_suffix(".safetensors"),)
                for path in (*converted, base / name):
                    if path.is_file():
                        return path
    return None


def missing_message(weight: WeightFile, models_dir=None) -> str:
    dirs = search_dirs(models_dir)
    where = " or ".join(str(d / weight.folder) for d in dirs[-2:])
    return (f"needs the annotator file {weight.name!r}, which is not installed: put it in {where} "
            f"(or in ${ENV_ANNOTATORS_DIR}); weights are never downloaded")


def aux_installed() -> bool:
    return "controlnet_aux" in sys.modules or importlib.util.find_spec("controlnet_aux") is not None


def check_available(weights: tuple[WeightFile, ...], module: str, field: str, models_dir=None,
                    needs_aux: bool = True, packages: tuple[tuple[str, str], ...] = ()) -> None:
    """Refuse (InvalidRequest naming ``field``) a module whose package (controlnet_aux, when ``needs_aux``; the
    ``(module, extra)`` pairs of ``packages``) or weight files are missing."""
    if needs_aux and not aux_installed():
        raise InvalidRequest(field, f"preprocessor {module!r} needs the package controlnet_aux (the 'annotators' "
                                    "extra: pip install 'sdengine[annotators]')", "an installed preprocessor")
    for package, extra in packages:
        if sys.modules.get(package) is None and importlib.util.find_spec(package) is None:
            raise InvalidRequest(field, f"preprocessor {module!r} needs the package {package} (the {extra!r} extra: "
                                        f"pip install 'sdengine[{extra}]')", "an installed preprocessor")
    for weight in weights:
        if find_weight(weight, models_dir) is None:
            raise InvalidRequest(field, f"preprocessor {module!r} {missing_message(weight, models_dir)}",
                                 "a preprocessor whose files are installed, or module 'none' with a detected map")


# ------------------------------------------------------------------------------------- controlnet_aux


class _Compose:  # torchvision.transforms.Compose
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class _Normalize:  # torchvision.transforms.Normalize on a (..., C, H, W) tensor
    def __init__(self, mean, std, inplace=False):
        self.mean, self.std = mean, std

    def __call__(self, x):
        import torch

        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


class _ToTensor:  # torchvision.transforms.ToTensor: HWC uint8 / PIL -> CHW float in [0, 1]
    def __call__(self, pic):
        import torch

        a = np.asarray(pic)
        if a.ndim == 2:
            a = a[:, :, None]
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
        return t.float().div(255) if a.dtype == np.uint8 else t.float()


class _ToPILImage:  # torchvision.transforms.ToPILImage of a CHW float tensor in [0, 1] (openpose face)
    def __call__(self, pic):
        from PIL import Image

        a = pic.detach().cpu().numpy()
        a = (a * 255).astype(np.uint8) if a.dtype.kind == "f" else a
        a = np.transpose(a, (1, 2, 0))
        return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


def _skimage_label(image, return_num=False, connectivity=None, background=0):
    """skimage.measure.label for a 2-D binary image with full (8-) connectivity, by scipy.ndimage.label (both
    number components in raster order)."""
    from scipy import ndimage

    structure = np.ones((3, 3), dtype=bool) if connectivity in (None, 2) else None
    labels, count = ndimage.label(np.asarray(image) != background, structure=structure)
    return (labels, count) if return_num else labels


def _skimage_block_reduce(image, block_size, func=np.sum, cval=0):
    """skimage.measure.block_reduce of a 2-D array (LeReS's boost imports it; padded with ``cval`` to whole
    blocks)."""
    a = np.asarray(image)
    bh, bw = block_size
    ph, pw = (-a.shape[0]) % bh, (-a.shape[1]) % bw
    a = np.pad(a, ((0, ph), (0, pw)), constant_values=cval)
    blocks = a.reshape(a.shape[0] // bh, bh, a.shape[1] // bw, bw)
    return func(blocks, axis=(1, 3))


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # missing, or a torchvision build that does not match torch
        return False


@contextmanager
def _import_shims():
    """Give torchvision.transforms (Compose, Normalize, ToTensor, ToPILImage) and skimage.measure.label to the
    controlnet_aux modules imported inside, when those packages cannot be imported; the fake modules are removed
    from ``sys.modules`` afterwards, so no other library sees them."""
    added = []
    if not _importable("torchvision"):
        tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
        tr.Compose, tr.Normalize, tr.ToTensor, tr.ToPILImage = _Compose, _Normalize, _ToTensor, _ToPILImage
        tr.transforms = tr
        tv.transforms = tr
        added += [("torchvision", tv), ("torchvision.transforms", tr)]
    if not _importable("skimage"):
        sk, measure = types.ModuleType("skimage"), types.ModuleType("skimage.measure")
        measure.label = _skimage_label
        measure.block_reduce = _skimage_block_reduce
        sk.measure = measure
        added += [("skimage", sk), ("skimage.measure", measure)]
    for name, module in added:
        sys.modules[name] = module
    try:
        yield
    finally:
        for name, module in added:
            if sys.modules.get(name) is module:
                del sys.modules[name]


_import_lock = threading.Lock()


def aux(submodule: str):
    """``controlnet_aux.{submodule}``, imported without the package's ``__init__`` (see the module doc)."""
    if not aux_installed():
        raise MissingDependency("controlnet_aux", "annotators", "model-based ControlNet preprocessors")
    with _import_lock:
        name = f"controlnet_aux.{submodule}"
        if name in sys.modules:
            return sys.modules[name]
        if "controlnet_aux" not in sys.modules:
            spec = importlib.util.find_spec("controlnet_aux")
            package = types.ModuleType("controlnet_aux")
            package.__path__ = list(spec.submodule_search_locations)
            package.__file__ = spec.origin
            sys.modules["controlnet_aux"] = package
        with _import_shims():
            return importlib.import_module(name)


def read_weights(path: Path) -> dict:
    """A weight file's tensors: safetensors, or a pickle read with ``weights_only`` (tensors and containers; no
    code runs)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a ModelError naming it
        raise ModelError(path, f"cannot read this annotator file (safetensors, or torch.load weights_only=True): "
                               f"{exc}") from exc


def _strip(state: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _load(net, state: dict, path: Path, what: str):
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(path, f"not a {what} file: {str(exc).splitlines()[0]}") from None
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- loaders
# each returns the controlnet_aux detector object for the resolved file(s)


def load_pidinet(path: Path):
    pidi = aux("pidi")
    state = read_weights(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return pidi.PidiNetDetector(_load(pidi.pidinet(), _strip(state), path, "PiDiNet"))


def load_hed(path: Path):
    hed = aux("hed")
    return hed.HEDdetector(_load(hed.ControlNetHED_Apache2(), read_weights(path), path, "ControlNet HED"))


def load_teed(path: Path):
    teed = aux("teed")
    return teed.TEEDdetector(_load(teed.TED(), read_weights(path), path, "TEED"))


def load_mlsd(path: Path):
    mlsd = aux("mlsd")
    if "tiny" in path.name:
        from importlib import import_module

        net = import_module("controlnet_aux.mlsd.models.mbv2_mlsd_tiny").MobileV2_MLSD_Tiny()
    else:
        net = mlsd.MobileV2_MLSD_Large()
    return mlsd.MLSDdetector(_load(net, read_weights(path), path, "M-LSD"))


def load_lineart(path: Path):
    lineart = aux("lineart")
    net = _load(lineart.Generator(3, 1, 3), read_weights(path), path, "lineart")
    return lineart.LineartDetector(net, net)  # the module picks fine or coarse by file; one net is used


def load_lineart_anime(path: Path):
    import functools

    anime = aux("lineart_anime")
    import torch.nn as nn

    norm_layer = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    net = anime.UnetGenerator(3, 1, 8, 64, norm_layer=norm_layer, use_dropout=False)
    state = read_weights(path)
    state = _strip(state)
    return anime.LineartAnimeDetector(_load(net, state, path, "lineart_anime"))


def load_openpose(body: Path | None, hand: Path | None, face: Path | None):
    aux("open_pose")
    import importlib as il

    body_mod = il.import_module("controlnet_aux.open_pose.body")
    hand_mod = il.import_module("controlnet_aux.open_pose.hand")
    face_mod = il.import_module("controlnet_aux.open_pose.face")
    util = il.import_module("controlnet_aux.open_pose.util")
    op = sys.modules["controlnet_aux.open_pose"]

    def body_estimator(path):
        est = body_mod.Body.__new__(body_mod.Body)
        est.model = body_mod.bodypose_model()
        _load(est.model, util.transfer(est.model, read_weights(path)), path, "openpose body")
        return est

    def hand_estimator(path):
        est = hand_mod.Hand.__new__(hand_mod.Hand)
        est.model = hand_mod.handpose_model()
        _load(est.model, util.transfer(est.model, read_weights(path)), path, "openpose hand")
        return est

    def face_estimator(path):
        est = face_mod.Face.__new__(face_mod.Face)
        est.inference_size = face_mod.params["inference_img_size"]
        est.sigma = face_mod.params["gaussian_sigma"]
        est.threshold = face_mod.params["heatmap_peak_thresh"]
        est.model = _load(face_mod.FaceNet(), read_weights(path), path, "openpose face")
        return est

    return op.OpenposeDetector(body_estimator(body) if body else None, hand_estimator(hand) if hand else None,
                               face_estimator(face) if face else None)


def load_normal_bae(path: Path):
    bae = aux("normalbae")
    nnet = importlib.import_module("controlnet_aux.normalbae.nets.NNET")
    args = types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                                 importance_ratio=0.7)
    # NNET builds its EfficientNet backbone with torch.hub.load(controlnet_aux's own copy, source="local",
    # pretrained=False): nothing is fetched
    net = nnet.NNET(args)
    state = read_weights(path)
    state = state.get("model", state)
    return bae.NormalBaeDetector(_load(net, _strip(state), path, "normal_bae"))


def load_leres(path: Path):
    """LeReS (ResNeXt-101 depth) without its boost network: controlnet_aux's LeresDetector with no pix2pix model
    (depth_leres). In training mode, as the extension (annotator/leres apply_leres) and controlnet_aux's
    ``from_pretrained`` leave it (neither calls ``eval()``): its batch-norm layers normalise with each input's
    own statistics, which is what the extension's maps are made with (docs/DECISIONS.md). It has no dropout;
    the running statistics it updates are not used in training mode."""
    leres = aux("leres")
    model = importlib.import_module("controlnet_aux.leres.leres.multi_depth_model_woauxi")
    state = read_weights(path)
    state = state.get("depth_model", state)
    net = _load(model.RelDepthModel(backbone="resnext101"), _strip(state), path, "LeReS depth")
    return leres.LeresDetector(net.train(), None)


def load_pix2pix(path: Path):
    """LeReS's boost (merge) network, controlnet_aux's Pix2Pix4DepthModel (a 10-level U-Net, 2 -> 1 channels), on
    the CPU, with the file's weights. Its options are controlnet_aux's own test options at their defaults,
    parsed from an empty command line (controlnet_aux's ``TestOptions().parse()`` reads the process's
    ``sys.argv``, which is the server's here); the model's constructor sets ``torch.backends.cudnn.benchmark``,
    which is put back."""
    import argparse

    import torch

    aux("leres")
    models = importlib.import_module("controlnet_aux.leres.pix2pix.models")
    options = importlib.import_module("controlnet_aux.leres.pix2pix.options.test_options").TestOptions()
    parser = options.initialize(argparse.ArgumentParser())
    parser = models.get_option_setter(parser.parse_args([]).model)(parser, False)
    opt = parser.parse_args([])
    opt.isTrain, opt.gpu_ids = False, []  # what parse() sets; no GPU: the CPU, as the other annotators
    benchmark = torch.backends.cudnn.benchmark
    try:
        model = models.find_model_using_name(opt.model)(opt)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    _load(model.netG, _strip(read_weights(path)), path, "LeReS boost (pix2pix merge network)")
    model.eval()
    return model


def load_leres_boost(depth: Path, merge: Path):
    """LeReS with its boost network (depth_leres++): controlnet_aux's LeresDetector with both."""
    return aux("leres").LeresDetector(load_leres(depth).model, load_pix2pix(merge))


def load_dwpose(detector: Path, estimator: Path):
    """DWPose's two ONNX files (engine.controlnet.dwpose)."""
    from engine.controlnet.dwpose import DWPose

    return DWPose.from_files(detector, estimator)


def load_midas(path: Path):
    """MiDaS DPT-Hybrid in transformers' DPT, the file's keys mapped (engine.controlnet.midas)."""
    from engine.controlnet import midas

    return midas.build(read_weights(path), path)


def load_depth_anything(path: Path):
    """Depth Anything (v1) on transformers' DepthAnythingForDepthEstimation (engine.controlnet.depth_anything)."""
    from engine.controlnet import depth_anything

    return depth_anything.load("v1", path, read_weights(path))


def load_depth_anything_v2(path: Path):
    """Depth Anything V2 on transformers' DepthAnythingForDepthEstimation (engine.controlnet.depth_anything)."""
    from engine.controlnet import depth_anything

    return depth_anything.load("v2", path, read_weights(path))


def load_zoe(path: Path):
    """ZoeD_M12_N through transformers' ZoeDepth and our key mapping (engine.controlnet.zoe)."""
    from engine.controlnet import zoe

    return zoe.load(path, read_weights)


def load_oneformer(path: Path):
    """OneFormer (Swin-L) on transformers' OneFormerForUniversalSegmentation (engine.controlnet.oneformer)."""
    from engine.controlnet import oneformer

    return oneformer.load(path, read_weights(path))


# ------------------------------------------------------------------------------------------ the cache


class _Loaded:
    """Detectors loaded from files, by (loader, paths, mtimes); at most :data:`MAX_LOADED` kept."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: OrderedDict = OrderedDict()

    def get(self, loader, paths: tuple[Path | None, ...]):
        key = (loader.__name__, tuple((str(p), p.stat().st_mtime_ns) if p else None for p in paths))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        log.info("loading annotator %s from %s", loader.__name__.removeprefix("load_"),
                 ", ".join(str(p) for p in paths if p))
        detector = loader(*paths)
        with self._lock:
            self._items[key] = detector
            while len(self._items) > MAX_LOADED:
                self._items.popitem(last=False)
        return detector

    def clear(self):
        with self._lock:
            self._items.clear()


LOADED = _Loaded()


# ------------------------------------------------------------------------------------------ the runners


def _padded_call(img: np.ndarray, res: int, run) -> np.ndarray:
    """The extension's call of an annotator: short side -> ``res``, padded to multiples of 64, ``run`` on that
    (a controlnet_aux detector at its own size: detect and image resolution = the padded short side, so its own
    resize is the identity), the padding cropped off."""
    from engine.controlnet.images import resize_image_with_pad

    padded, remove_pad = resize_image_with_pad(img, res)
    side = min(padded.shape[:2])
    return remove_pad(np.asarray(run(padded, side)))


_boost_lock = threading.Lock()


def _boosted(call):
    """``call()`` (controlnet_aux's LeReS with boost) one at a time: its boost (leres/leres/depthmap.py) keeps
    a module-level ``factor`` between its steps. The progress lines it prints go to this module's debug log:
    ``sys.stdout`` is redirected for the call's duration (log handlers keep the stream they were given, so only
    bare prints of other threads would land there too; the engine's library code does not print)."""
    import io
    from contextlib import redirect_stdout

    with _boost_lock:
        printed = io.StringIO()
        try:
            with redirect_stdout(printed):
                return call()
        finally:
            for line in printed.getvalue().splitlines():
                log.debug("LeReS boost: %s", line)


def _scribble(edge: np.ndarray) -> np.ndarray:
    """The extension's scribble_hed / scribble_pidinet post-processing of the cropped soft-edge map."""
    import cv2

    util = aux("util")
    result = util.nms(edge[:, :, 0] if edge.ndim == 3 else edge, 127, 3.0)
    result = cv2.GaussianBlur(result, (0, 0), 3.0)
    result[result > 4] = 255
    result[result < 255] = 0
    return result


@dataclass(frozen=True)
class ModelRunner:
    """``fn(img, res, thr_a, thr_b, models_dir=...)`` of a model-based preprocessor: the files it needs, how it
    is loaded and run. ``kind``: pidinet / hed / teed / mlsd / lineart / lineart_anime / openpose / normal_bae /
    leres / dwpose / midas / depth_anything / zoe / oneformer; ``options``: the module's flags (safe, scribble,
    filter, coarse, hand, face, body, boost, normal, v2, coco)."""

    kind: str
    weights: tuple[WeightFile, ...]
    options: tuple[tuple[str, bool], ...] = ()

    @property
    def size_mb(self) -> float:
        return sum(w.size_mb for w in self.weights)

    def work_bytes(self, height: int, width: int) -> int:
        """The activations the network holds at once on a padded working image of ``height x width`` where they
        grow with it beyond its weights (OneFormer's image-sized class scores: engine.controlnet.oneformer); 0 for
        the networks whose activations stay below their weights' size at the working sizes the limits allow."""
        if self.kind == "oneformer":
            from engine.controlnet import oneformer

            return oneformer.pixel_bytes(133 if dict(self.options).get("coco") else 150) * height * width
        return 0

    @property
    def needs_aux(self) -> bool:
        """Whether it runs controlnet_aux's code (DWPose runs ONNX files through onnxruntime; MiDaS, Depth
        Anything and ZoeDepth run transformers' networks: core dependencies)."""
        return self.kind not in NO_AUX_KINDS

    @property
    def packages(self) -> tuple[tuple[str, str], ...]:
        """Other packages it needs, as ``(module, extra)``: OneFormer draws its map with matplotlib, as the
        extension does."""
        return (("matplotlib", "controlnet"),) if self.kind == "oneformer" else ()

    def check_work(self, work: tuple[int, int], field: str, module: str) -> None:
        """Refuse (InvalidRequest naming ``field``) a padded working image (h, w) the network cannot run on:
        ZoeDepth's resize of an image whose aspect ratio rounds a side to 0 (engine.controlnet.zoe)."""
        if self.kind == "zoe":
            from engine.controlnet import zoe

            zoe.check_work(work, field, module)

    @property
    def makes_poses(self) -> bool:
        """Whether it finds people whose keypoints it can give as pose JSON (the openpose modules, DWPose)."""
        return self.kind in ("openpose", "dwpose")

    def __call__(self, img, res, a, b, models_dir=None, pose_callback=None):
        """The map of ``img``. ``pose_callback`` (the extension's ``json_pose_callback``; :attr:`makes_poses`
        runners only): called with the pose JSON of the people found (engine.controlnet.openpose.pose_json), on
        the padded image the network ran on."""
        opts = dict(self.options)
        if self.makes_poses:
            opts["pose_callback"] = pose_callback
        paths = []
        for weight in self.weights:
            path = find_weight(weight, models_dir)
            if path is None:
                raise ModelError(Path(weight.folder) / weight.name, missing_message(weight, models_dir))
            paths.append(path)
        import torch

        with torch.inference_mode():
            return getattr(self, f"_run_{self.kind}")(img, int(res), a, b, paths, opts)

    def _run_pidinet(self, img, res, a, b, paths, opts):
        det = LOADED.get(load_pidinet, tuple(paths))
        edge = _padded_call(img, res, lambda x, s: det(x, detect_resolution=s, image_resolution=s,
                                                       safe=opts.get("safe", False), output_type="np",
                                                       apply_filter=opts.get("filter", False)))
        return _scribble(edge) if opts.get("scribble") else edge

    def _run_hed(self, img, res, a, b, paths, opts):
        det = LOADED.get(load_hed, tuple(paths))
        edge = _padded_call(img, res, lambda x, s: det(x, detect_resolution=s, image_resolution=s,
                                                       safe=opts.get("safe", False), output_type="np"))
        return _scribble(edge) if opts.get("scribble") else edge

    def _run_teed(self, img, res, a, b, paths, opts):
        det = LOADED.get(load_teed, tuple(paths))
        return _padded_call(img, res, lambda x, s: det(x, detect_resolution=s, safe_steps=int(a), output_type="np"))

    def _run_mlsd(self, img, res, a, b, paths, opts):
        det = LOADED.get(load_mlsd, tuple(paths))
        return _padded_call(img, res, lambda x, s: det(x, thr_v=a, thr_d=b, detect_resolution=s,
                                                       image_resolution=s, output_type="np"))

    def _run_lineart(self, img, res, a, b, paths, opts):
        det = LOADED.get(load_lineart, tuple(paths))
        return _padded_call(img, res, lambda x, s: det(x, coarse=opts.get("coarse", False), detect_resolution=s,
                                                       image_resolution=s, output_type="np"))

    def _run_lineart_anime(self, img, res, a, b, paths, opts):
        det = LOADED.get(load_lineart_anime, tuple(paths))
        return _padded_call(img, res, lambda x, s: det(x, detect_resolution=s, image_resolution=s,
                                                       output_type="np"))

    def _run_openpose(self, img, res, a, b, paths, opts):
        by_name = {w.name: p for w, p in zip(self.weights, paths)}
        files = (by_name.get(OPENPOSE_BODY.name), by_name.get(OPENPOSE_HAND.name), by_name.get(OPENPOSE_FACE.name))
        det = LOADED.get(load_openpose, files)
        hand, face = opts.get("hand", False), opts.get("face", False)

        def run(x, s):  # controlnet_aux's OpenposeDetector.__call__ at the padded size (its resizes are identities)
            poses = det.detect_poses(x, hand, face)
            if opts.get("pose_callback"):
                opts["pose_callback"](pose_json([_openpose_person(p) for p in poses], *x.shape[:2]))
            return aux("open_pose").draw_poses(poses, *x.shape[:2], draw_body=opts.get("body", True),
                                               draw_hand=hand, draw_face=face)

        return _padded_call(img, res, run)

    def _run_leres(self, img, res, a, b, paths, opts):
        if not opts.get("boost", False):
            det = LOADED.get(load_leres, tuple(paths))
            return _padded_call(img, res, lambda x, s: det(x, thr_a=a, thr_b=b, boost=False, detect_resolution=s,
                                                           image_resolution=s, output_type="np"))
        det = LOADED.get(load_leres_boost, tuple(paths))
        return _padded_call(img, res, lambda x, s: _boosted(lambda: det(
            x, thr_a=a, thr_b=b, boost=True, detect_resolution=s, image_resolution=s, output_type="np")))

    def _run_dwpose(self, img, res, a, b, paths, opts):
        det = LOADED.get(load_dwpose, tuple(paths))

        def run(x, s):
            people = det.detect(x)
            if opts.get("pose_callback"):
                opts["pose_callback"](pose_json(people, *x.shape[:2]))
            return draw_people(people, *x.shape[:2])

        return _padded_call(img, res, run)

    def _run_depth_anything(self, img, res, a, b, paths, opts):
        from engine.controlnet import depth_anything

        loader = load_depth_anything_v2 if opts.get("v2", False) else load_depth_anything
        model = LOADED.get(loader, tuple(paths))
        return _padded_call(img, res, lambda x, s: depth_anything.detect(model, x))

    def _run_zoe(self, img, res, a, b, paths, opts):
        det = LOADED.get(load_zoe, tuple(paths))
        return _padded_call(img, res, lambda x, s: det(x))

    def _run_oneformer(self, img, res, a, b, paths, opts):
        """The extension's oneformer_ade20k / oneformer_coco: the padded image through OneformerDetector and
        semantic_run (engine.controlnet.oneformer), the padding cropped."""
        from engine.controlnet import oneformer

        model = LOADED.get(load_oneformer, tuple(paths))
        dataset = oneformer.DATASETS["coco" if opts.get("coco", False) else "ade20k"]
        return _padded_call(img, res, lambda x, s: oneformer.detect(model, x, dataset))

    def _run_normal_bae(self, img, res, a, b, paths, opts):
        det = LOADED.get(load_normal_bae, tuple(paths))
        return _padded_call(img, res, lambda x, s: det(x, detect_resolution=s, image_resolution=s,
                                                       output_type="np"))


    def _run_midas(self, img, res, a, b, paths, opts):
        """The extension's midas / midas_normal (its legacy processor): the padded image through apply_midas
        (normal_map: thr_a is the background threshold; depth: the default 0.1, unused), the padding cropped."""
        from engine.controlnet import midas

        net = LOADED.get(load_midas, tuple(paths))
        normal = opts.get("normal", False)

        def run(x, side):
            depth_image, normal_image = midas.apply_midas(midas.depth(net, x), bg_th=a if normal else 0.1)
            return normal_image if normal else depth_image

        return _padded_call(img, res, run)


def _openpose_person(pose) -> dict:
    """controlnet_aux's ``PoseResult`` as the parts of an OpenPose person (keypoints ``(x, y)`` or None)."""
    def points(keypoints):
        return None if keypoints is None else [None if k is None else (k.x, k.y) for k in keypoints]

    return {"pose_keypoints_2d": points(pose.body.keypoints), "hand_left_keypoints_2d": points(pose.left_hand),
            "hand_right_keypoints_2d": points(pose.right_hand), "face_keypoints_2d": points(pose.face)}


# runners that need no controlnet_aux: DWPose (onnxruntime), MiDaS, Depth Anything, ZoeDepth, OneFormer
# (transformers)
NO_AUX_KINDS = frozenset({"dwpose", "midas", "depth_anything", "zoe", "oneformer"})


def runner(kind: str, *weights: WeightFile, **options: bool) -> ModelRunner:
    return ModelRunner(kind, tuple(weights), tuple(sorted(options.items())))
