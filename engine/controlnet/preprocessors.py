"""ControlNet preprocessors as sd-webui-controlnet v1.1.4xx runs them: image operations, and networks
(engine.controlnet.annotators) whose weight files users install.

The registry :data:`PREPROCESSORS` maps the extension's module names to :class:`Preprocessor` objects;
:data:`ALIASES` maps the extension's UI labels ("invert (from white bg & black line)", "t2ia_color_grid",
...) to them. Model-based preprocessors (softedge incl. teed, scribble, mlsd, lineart, openpose, normal_bae,
depth_leres, depth_leres++) run controlnet_aux's networks, dw_openpose_full DWPose's ONNX files
(engine.controlnet.dwpose), depth_midas / normal_midas MiDaS in transformers' DPT (engine.controlnet.midas),
depth_anything(_v2) transformers' DepthAnything network (engine.controlnet.depth_anything), depth_zoe ZoeDepth in
transformers (engine.controlnet.zoe), seg_ofade20k / seg_ofcoco transformers' OneFormer
(engine.controlnet.oneformer), on
files read from disk, never downloaded: one whose file is missing is listed, and a
request for it is an :class:`InvalidRequest` naming the file and where to put it
(:meth:`Preprocessor.check_available`); the other model-based modules of the extension are refused naming why.

Parameters follow the extension's slider configs: each preprocessor declares a default and a range for
``processor_res``, ``threshold_a`` and ``threshold_b``; -1 (any negative) or a value outside the range gives
the default, as the extension's bound check does (:meth:`Preprocessor.check_params` also says which values it
replaced, for the extension's log line "[canny.processor_res] Invalid value(-100), using default value 512.").
Algorithms follow
scripts/processor.py: most first resize the input so its short side is ``processor_res`` (INTER_CUBIC up,
INTER_AREA down), pad it to a multiple of 64 with edge pixels, run, and crop the padding off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.controlnet import annotators as _ann
from engine.controlnet.annotators import ModelRunner, runner
from engine.controlnet.images import _pad64, hwc3, resize_image_with_pad  # noqa: F401 (re-exported)
from core.errors import InvalidRequest
from core.lazy import require


def _cv2():
    return require("cv2", "controlnet", "ControlNet preprocessing")


@dataclass(frozen=True)
class Param:
    """One slider: its default and inclusive range, and how the extension's UI shows it (label, step)."""

    default: float
    minimum: float
    maximum: float
    label: str = ""
    step: float = 0.01

    def resolve(self, value: float | None) -> float:
        """``value`` if it is given and in range, else the default (-1 means "default")."""
        if value is None or value < 0 or not (self.minimum <= value <= self.maximum):
            return self.default
        return value

    def api_json(self) -> dict:
        """The slider as sd-webui-controlnet's ``/controlnet/module_list`` ``module_detail`` shows it."""
        return {"name": self.label, "value": self.default, "min": self.minimum, "max": self.maximum,
                "step": self.step}


@dataclass(frozen=True)
class Adjusted:
    """A slider value that was out of the preprocessor's range and replaced by its default (``slider``:
    processor_res, threshold_a or threshold_b)."""

    module: str
    slider: str
    given: float
    default: float

    def message(self) -> str:
        """The extension's log line, to the character: ``[canny.processor_res] Invalid value(-100), using
        default value 512.`` (processor_res is an integer there, the thresholds floats)."""
        given = int(self.given) if self.slider == "processor_res" else float(self.given)
        return f"[{self.module}.{self.slider}] Invalid value({given}), using default value {self.default}."


@dataclass(frozen=True)
class Preprocessor:
    """A preprocessor: ``fn(image_rgb_uint8, res, thr_a, thr_b) -> map`` and its slider definitions.

    A slider that is None is not used by the preprocessor (its value is ignored).
    """

    name: str
    fn: Callable[[np.ndarray, int, float, float], np.ndarray]
    resolution: Param | None = None
    threshold_a: Param | None = None
    threshold_b: Param | None = None
    label: str | None = None
    # sd-webui-controlnet's control-type tags and list priority (Preprocessor.tags, sorting_priority), and
    # whether the unit needs no ControlNet model at all (do_not_need_model: the reference_* modules)
    tags: tuple[str, ...] = ()
    priority: int = 0
    model_free: bool = False
    # how fn resizes its input: "same" (it does not), "pad" (resize_image_with_pad: short side -> res, padded
    # to multiples of 64), "short" (short side -> res), "rate" (divided by threshold_a when >= 1.1)
    resize: str = "same"
    # the shortest longer side of the working image it runs on (0: any): below it the network's code fails
    min_work_side: int = 0

    def resolve(self, processor_res: float = -1, threshold_a: float = -1, threshold_b: float = -1):
        """The effective (res, thr_a, thr_b), defaults applied; unused sliders come back as None."""
        res = None if self.resolution is None else int(self.resolution.resolve(processor_res))
        a = None if self.threshold_a is None else self.threshold_a.resolve(threshold_a)
        b = None if self.threshold_b is None else self.threshold_b.resolve(threshold_b)
        return res, a, b

    def sliders(self) -> dict[str, Param]:
        """The sliders this preprocessor has, by their unit field (processor_res, threshold_a, threshold_b)."""
        return {name: param for name, param in (("processor_res", self.resolution), ("threshold_a", self.threshold_a),
                                                ("threshold_b", self.threshold_b)) if param is not None}

    def check_params(self, module: str, processor_res: float, threshold_a: float, threshold_b: float
                     ) -> tuple[dict[str, float], list[Adjusted]]:
        """The extension's bound check of a unit's sliders: a value outside the slider's range becomes its
        default. Returns ``({field: value}, adjustments)``: every given value, out-of-range ones of the sliders
        this preprocessor has replaced; an adjustment for each that was not -1 ("default"), to be logged as
        :meth:`Adjusted.message` says. ``module``: the name the request used."""
        values = {"processor_res": processor_res, "threshold_a": threshold_a, "threshold_b": threshold_b}
        adjusted = []
        for name, param in self.sliders().items():
            value = values[name]
            if not param.minimum <= value <= param.maximum:
                values[name] = param.default
                if value != -1:
                    adjusted.append(Adjusted(module, name, value, param.default))
        return values, adjusted

    def sizes(self, height: int, width: int, processor_res: float = -1, threshold_a: float = -1,
              threshold_b: float = -1, exact_res: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((work_h, work_w), (out_h, out_w))``: the largest array ``fn`` makes from an image of this size and
        the detected map's size, computed as ``fn`` computes them (no pixel touched)."""
        res, a, _ = self.resolve(processor_res, threshold_a, threshold_b)
        if exact_res is not None and res is not None:
            res = max(1, int(exact_res))
        if self.resize == "pad":
            k = float(res) / float(min(height, width))
            h, w = int(np.round(float(height) * k)), int(np.round(float(width) * k))
            return (h + _pad64(h), w + _pad64(w)), (h, w)
        if self.resize == "short":
            h, w = (res, int(round(width / height * res))) if height < width else (int(round(height / width * res)), res)
            return (h, w), (h, w)
        if self.resize == "rate" and a >= 1.1:
            h, w = int(float(height) / float(a)), int(float(width) / float(a))
            return (height, width), (h, w)
        return (height, width), (height, width)

    def check_work(self, work: tuple[int, int], field: str) -> None:
        """Refuse (InvalidRequest naming ``field``, the resolution's) a working image too small for this
        preprocessor (:attr:`min_work_side`; ``work``: (h, w) as :meth:`sizes` gives it)."""
        if max(work) < self.min_work_side:
            raise InvalidRequest(field, f"makes a {work[1]}x{work[0]} working image for {self.label or self.name}, "
                                        f"whose boost cannot run below {self.min_work_side} pixels on the longer side "
                                        "(its resolution search finds no size: it fails in the extension too)",
                                 f"a processor_res (or pixel-perfect size) that makes the padded image at least "
                                 f"{self.min_work_side} pixels on its longer side")
        if self.model_based:
            self.fn.check_work(work, field, self.label or self.name)

    @property
    def model_based(self) -> bool:
        """Whether it runs a network whose weight files must be installed (engine.controlnet.annotators)."""
        return isinstance(self.fn, ModelRunner)

    def check_available(self, field: str = "module", models_dir=None) -> None:
        """Refuse (InvalidRequest naming ``field``) a model-based preprocessor whose package or files are
        missing; an image-op preprocessor is always available."""
        if self.model_based:
            _ann.check_available(self.fn.weights, self.label or self.name, field, models_dir, self.fn.needs_aux,
                                 self.fn.packages)

    @property
    def makes_poses(self) -> bool:
        """Whether it gives the people it found as pose JSON (the openpose modules and DWPose; the extension's
        ``/controlnet/detect`` returns it as ``poses``)."""
        return self.model_based and self.fn.makes_poses

    def __call__(self, image: np.ndarray, processor_res: float = -1, threshold_a: float = -1,
                 threshold_b: float = -1, exact_res: int | None = None, models_dir=None,
                 pose_callback=None) -> np.ndarray:
        """Run on an RGB uint8 image. ``exact_res`` (pixel perfect) is used as is, without the range check.
        ``models_dir``: where a model-based preprocessor's files are searched (annotators.search_dirs).
        ``pose_callback``: called with the pose JSON of the people found (:attr:`makes_poses` only)."""
        res, a, b = self.resolve(processor_res, threshold_a, threshold_b)
        if exact_res is not None and res is not None:
            res = max(1, int(exact_res))
        image = hwc3(np.asarray(image))
        if self.model_based:
            return hwc3(np.ascontiguousarray(self.fn(image, res, a, b, models_dir=models_dir,
                                                     pose_callback=pose_callback)))
        return hwc3(np.ascontiguousarray(self.fn(image, res, a, b)))


# ------------------------------------------------------------------------------------------ algorithms


def _none(img, res, a, b):
    return img


def _invert(img, res, a, b):
    return 255 - img


def _canny(img, res, low, high):
    padded, remove_pad = resize_image_with_pad(img, res)
    return remove_pad(_cv2().Canny(padded, low, high))


def _threshold(img, res, thr, b):
    padded, remove_pad = resize_image_with_pad(img, res)
    out = np.zeros_like(padded, dtype=np.uint8)
    out[np.min(padded, axis=2) > thr] = 255
    return remove_pad(out)


def _binary(img, res, thr, b):
    """The extension's v1.0 "binary": inverted binarisation of the gray image; 0 or 255 = Otsu's threshold."""
    cv2 = _cv2()
    padded, remove_pad = resize_image_with_pad(img, res)
    gray = cv2.cvtColor(padded, cv2.COLOR_RGB2GRAY)
    if thr == 0 or thr == 255:
        _, out = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    else:
        _, out = cv2.threshold(gray, thr, 255, cv2.THRESH_BINARY_INV)
    return remove_pad(out)


def _blur_gaussian(img, res, sigma, b):
    padded, remove_pad = resize_image_with_pad(img, res)
    return _cv2().GaussianBlur(remove_pad(padded), (0, 0), float(sigma))


def _scribble_xdog(img, res, thr, b):
    cv2 = _cv2()
    padded, remove_pad = resize_image_with_pad(img, res)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros_like(padded, dtype=np.uint8)
    out[2 * (255 - dog) > thr] = 255
    return remove_pad(out)


def _lineart_standard(img, res, a, b):
    padded, remove_pad = resize_image_with_pad(img, res)
    x = padded.astype(np.float32)
    g = _cv2().GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 0.0)
    intensity *= 127
    return remove_pad(intensity.clip(0, 255).astype(np.uint8))


def _color(img, res, a, b):
    """T2I-Adapter colour grid: short side -> res (INTER_AREA), 64x cubic downscale, nearest upscale."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    if h < w:
        new_h, new_w = res, int(round(w / h * res))
    else:
        new_w, new_h = res, int(round(h / w * res))
    img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
    grid = cv2.resize(img, (max(1, new_w // 64), max(1, new_h // 64)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(grid, (new_w, new_h), interpolation=cv2.INTER_NEAREST)


def _tile_resample(img, res, rate, b):
    if rate < 1.1:
        return img
    h, w = img.shape[:2]
    return _cv2().resize(img, (int(float(w) / float(rate)), int(float(h) / float(rate))),
                         interpolation=_cv2().INTER_AREA)


def _recolor(conversion: str, channel: int):
    def run(img, res, gamma, b):
        cv2 = _cv2()
        # The extension converts its RGB array with the BGR conversion codes; kept for identical maps.
        x = cv2.cvtColor(img, getattr(cv2, conversion))[:, :, channel].astype(np.float32) / 255.0
        x = ((x ** gamma) * 255.0).clip(0, 255).astype(np.uint8)
        return cv2.cvtColor(x, cv2.COLOR_GRAY2RGB)

    return run


# --------------------------------------------------------------------------------------------- registry

_RES = Param(512, 64, 2048, "Resolution", 8)


def _slider(default: float, minimum: float, maximum: float, label: str, step: float = 0.01) -> Param:
    return Param(default, minimum, maximum, label, step)


# sliders, labels, tags and priorities as the extension declares them (model_free_preprocessors.py and the
# legacy table); binary is the extension's v1.0 module, kept for clients that still send it
PREPROCESSORS: dict[str, Preprocessor] = {
    p.name: p
    for p in (
        Preprocessor("none", _none, tags=("InstructP2P",), priority=10),
        Preprocessor("invert", _invert, label="invert (from white bg & black line)",
                     tags=("Canny", "Lineart", "Scribble", "MLSD"), priority=20),
        Preprocessor("canny", _canny, _RES, _slider(100, 1, 255, "Low Threshold", 1),
                     _slider(200, 1, 255, "High Threshold", 1), resize="pad", tags=("Canny",), priority=100),
        Preprocessor("threshold", _threshold, _RES, _slider(127, 0, 255, "Binarization Threshold"), resize="pad"),
        Preprocessor("binary", _binary, _RES, _slider(0, 0, 255, "Binary Threshold"), resize="pad"),
        Preprocessor("blur_gaussian", _blur_gaussian, _RES, _slider(9.0, 0.01, 64.0, "Sigma"), resize="pad",
                     tags=("Tile",)),
        Preprocessor("scribble_xdog", _scribble_xdog, _RES, _slider(32, 1, 64, "XDoG Threshold"), resize="pad",
                     tags=("Scribble", "SparseCtrl")),
        Preprocessor("lineart_standard", _lineart_standard, _RES,
                     label="lineart_standard (from white bg & black line)", resize="pad", tags=("Lineart",),
                     priority=100),
        Preprocessor("color", _color, _RES, label="t2ia_color_grid", resize="short", tags=("T2I-Adapter",)),
        Preprocessor("tile_resample", _tile_resample, None, _slider(1.0, 1.0, 8.0, "Down Sampling Rate"),
                     resize="rate", tags=("Tile",), priority=100),
        # the image itself; the colour fix of every model output is engine.controlnet.colorfix
        Preprocessor("tile_colorfix", _none, None, _slider(8.0, 3.0, 32.0, "Variation", 1.0), tags=("Tile",)),
        Preprocessor("tile_colorfix+sharp", _none, None, _slider(8.0, 3.0, 32.0, "Variation", 1.0),
                     _slider(1.0, 0.0, 2.0, "Sharpness"), tags=("Tile",)),
        Preprocessor("recolor_luminance", _recolor("COLOR_BGR2LAB", 0), None,
                     _slider(1.0, 0.1, 2.0, "Gamma Correction", 0.001), tags=("Recolor",), priority=100),
        Preprocessor("recolor_intensity", _recolor("COLOR_BGR2HSV", 2), None,
                     _slider(1.0, 0.1, 2.0, "Gamma Correction", 0.001), tags=("Recolor",)),
        # model-based (engine.controlnet.annotators: controlnet_aux networks, files where users keep them);
        # names, labels, sliders, tags and priorities as the extension's legacy table (preprocessor_compiled.py)
        Preprocessor("pidinet", runner("pidinet", _ann.PIDINET), _RES, label="softedge_pidinet", resize="pad",
                     tags=("SoftEdge",), priority=100),
        Preprocessor("pidinet_safe", runner("pidinet", _ann.PIDINET, safe=True), _RES, label="softedge_pidisafe",
                     resize="pad", tags=("SoftEdge",)),
        Preprocessor("pidinet_scribble", runner("pidinet", _ann.PIDINET, scribble=True), _RES,
                     label="scribble_pidinet", resize="pad", tags=("Scribble",), priority=100),
        Preprocessor("pidinet_sketch", runner("pidinet", _ann.PIDINET, filter=True), _RES, label="t2ia_sketch_pidi",
                     resize="pad", tags=("T2I-Adapter",)),
        Preprocessor("hed", runner("hed", _ann.HED), _RES, label="softedge_hed", resize="pad", tags=("SoftEdge",)),
        Preprocessor("hed_safe", runner("hed", _ann.HED, safe=True), _RES, label="softedge_hedsafe", resize="pad",
                     tags=("SoftEdge",)),
        Preprocessor("scribble_hed", runner("hed", _ann.HED, scribble=True), _RES, resize="pad",
                     tags=("Scribble",)),
        Preprocessor("softedge_teed", runner("teed", _ann.TEED), _RES, _slider(2, 0, 10, "Safe Steps", 1),
                     resize="pad", tags=("SoftEdge",)),
        Preprocessor("mlsd", runner("mlsd", _ann.MLSD), _RES, _slider(0.1, 0.01, 2.0, "MLSD Value Threshold"),
                     _slider(0.1, 0.01, 20.0, "MLSD Distance Threshold"), resize="pad", tags=("MLSD",),
                     priority=100),
        Preprocessor("lineart", runner("lineart", _ann.LINEART), _RES, label="lineart_realistic", resize="pad",
                     tags=("Lineart",)),
        Preprocessor("lineart_coarse", runner("lineart", _ann.LINEART_COARSE, coarse=True), _RES, resize="pad",
                     tags=("Lineart",)),
        Preprocessor("lineart_anime", runner("lineart_anime", _ann.LINEART_ANIME), _RES, resize="pad",
                     tags=("Lineart",)),
        Preprocessor("openpose", runner("openpose", _ann.OPENPOSE_BODY), _RES, resize="pad", tags=("OpenPose",)),
        Preprocessor("openpose_hand", runner("openpose", _ann.OPENPOSE_BODY, _ann.OPENPOSE_HAND, hand=True), _RES,
                     resize="pad", tags=("OpenPose",)),
        Preprocessor("openpose_face", runner("openpose", _ann.OPENPOSE_BODY, _ann.OPENPOSE_FACE, face=True), _RES,
                     resize="pad", tags=("OpenPose",)),
        Preprocessor("openpose_faceonly", runner("openpose", _ann.OPENPOSE_BODY, _ann.OPENPOSE_FACE, body=False,
                                                 face=True), _RES, resize="pad", tags=("OpenPose",)),
        Preprocessor("openpose_full", runner("openpose", _ann.OPENPOSE_BODY, _ann.OPENPOSE_HAND, _ann.OPENPOSE_FACE,
                                             hand=True, face=True), _RES, resize="pad", tags=("OpenPose",),
                     priority=100),
        # DWPose: YOLOX + RTMPose ONNX files through onnxruntime (engine.controlnet.dwpose), body, hands, face
        Preprocessor("dw_openpose_full", runner("dwpose", _ann.DWPOSE_DETECTOR, _ann.DWPOSE_ESTIMATOR), _RES,
                     resize="pad", tags=("OpenPose",)),
        Preprocessor("normal_bae", runner("normal_bae", _ann.NORMAL_BAE), _RES, resize="pad", tags=("NormalMap",),
                     priority=100),
        Preprocessor("depth_leres", runner("leres", _ann.LERES), _RES, _slider(0, 0, 100, "Remove Near %", 0.1),
                     _slider(0, 0, 100, "Remove Background %", 0.1), resize="pad", tags=("Depth",)),
        # LeReS with its boost: controlnet_aux's merge of estimates at several sizes by a pix2pix network
        # (controlnet_aux's resolution search, leres/leres/depthmap.py calculateprocessingres, loops over sizes
        # from 448 px up to 3x the image's longer side; it finds none, and fails, below 160 px)
        Preprocessor("depth_leres++", runner("leres", _ann.LERES, _ann.LERES_BOOST, boost=True), _RES,
                     _slider(0, 0, 100, "Remove Near %", 0.1), _slider(0, 0, 100, "Remove Background %", 0.1),
                     resize="pad", tags=("Depth",), min_work_side=160),
        # MiDaS DPT-Hybrid in transformers' DPT (engine.controlnet.midas); normal_map's threshold_a is its
        # background threshold
        Preprocessor("depth", runner("midas", _ann.MIDAS), _RES, label="depth_midas", resize="pad", tags=("Depth",),
                     priority=100),
        Preprocessor("normal_map", runner("midas", _ann.MIDAS, normal=True), _RES,
                     _slider(0.4, 0.0, 1.0, "Normal Background Threshold"), label="normal_midas", resize="pad",
                     tags=("NormalMap",)),
        # Depth Anything v1 / v2: transformers' DepthAnythingForDepthEstimation on the extension's files
        # (engine.controlnet.depth_anything); the legacy table gives no resolution entry, so the extension shows
        # its Preprocessor class's default Resolution slider (512, 64..2048, step 8); no thresholds
        Preprocessor("depth_anything", runner("depth_anything", _ann.DEPTH_ANYTHING), _RES, resize="pad",
                     tags=("Depth",)),
        Preprocessor("depth_anything_v2", runner("depth_anything", _ann.DEPTH_ANYTHING_V2, v2=True), _RES,
                     resize="pad", tags=("Depth",)),
        # ZoeDepth (ZoeD_M12_N) in transformers' ZoeDepth, the extension's pre/post-processing (engine.controlnet.zoe)
        Preprocessor("depth_zoe", runner("zoe", _ann.ZOE), _RES, resize="pad", tags=("Depth",)),
        # OneFormer Swin-L (ADE20K, COCO) in transformers' OneFormer (engine.controlnet.oneformer); the legacy
        # table's resolution entry is None, which hides its own slider and leaves the Preprocessor class's default
        # Resolution slider (512, 64..2048, step 8) in module_detail; the value is the res the call resizes to
        Preprocessor("oneformer_ade20k", runner("oneformer", _ann.ONEFORMER_ADE20K), _RES, label="seg_ofade20k",
                     resize="pad", tags=("Segmentation",), priority=100),
        Preprocessor("oneformer_coco", runner("oneformer", _ann.ONEFORMER_COCO, coco=True), _RES, label="seg_ofcoco",
                     resize="pad", tags=("Segmentation",)),
        # model-free attention injection (engine.controlnet.reference): the map is the image; threshold_a is the
        # style fidelity (the extension's "Style Fidelity (only for Balanced mode)" slider)
        Preprocessor("reference_only", _none, None, _slider(0.5, 0.0, 1.0, "Style Fidelity (only for Balanced mode)"),
                     model_free=True, tags=("Reference",)),
        # IP-Adapter (engine.ip_adapter): the image goes to the CLIP vision encoder the module names, no map
        *(Preprocessor(name, _none, tags=("IP-Adapter",)) for name in (
            "ip-adapter_clip_sd15", "ip-adapter_clip_h", "ip-adapter_clip_sdxl", "ip-adapter_clip_g",
            "ip-adapter_clip_sdxl_plus_vith", "ip-adapter-auto")),
    )
}

# UI labels the extension accepts for the same modules (global_state.preprocessor_aliases).
ALIASES: dict[str, str] = {p.label: p.name for p in PREPROCESSORS.values() if p.label}

# Modules of the extension that need downloaded model weights (module name, then UI label where different).
MODEL_BASED: tuple[str, ...] = (
    "depth", "depth_midas", "depth_leres", "depth_leres++", "depth_zoe", "depth_anything", "depth_anything_v2",
    "depth_hand_refiner", "depth_marigold", "normal_map", "normal_midas", "normal_bae", "normal_dsine",
    "hed", "softedge_hed", "hed_safe", "softedge_hedsafe", "pidinet", "softedge_pidinet", "pidinet_safe",
    "softedge_pidisafe", "pidinet_sketch", "t2ia_sketch_pidi", "pidinet_scribble", "scribble_pidinet",
    "scribble_hed", "softedge_teed", "te_hed", "mlsd", "openpose", "openpose_face", "openpose_faceonly",
    "openpose_full", "openpose_hand", "dw_openpose_full", "animal_openpose", "densepose", "densepose_parula",
    "lineart", "lineart_realistic", "lineart_coarse", "lineart_anime", "lineart_anime_denoise",
    "segmentation", "seg_ufade20k", "oneformer_coco", "seg_ofcoco", "oneformer_ade20k", "seg_ofade20k",
    "seg_anime_face", "mobile_sam", "mediapipe_face", "clip_vision", "t2ia_style_clipvision",
    "revision_clipvision", "revision_ignore_prompt", "ip-adapter_clip_sd15", "ip-adapter_clip_h",
    "ip-adapter_clip_sdxl", "ip-adapter_clip_g", "ip-adapter_clip_sdxl_plus_vith", "ip-adapter_face_id",
    "ip-adapter_face_id_plus", "ip-adapter_pulid", "ip-adapter-auto", "instant_id_face_embedding",
    "instant_id_face_keypoints", "inpaint_only+lama", "invert_depth",
)
# Why a model-based module of the extension does not run here (docs/DECISIONS.md "Model-based ControlNet
# preprocessors"); the others of MODEL_BASED are not implemented
NOT_RUNNABLE: dict[str, str] = {
    **{m: "the UniFormer segmentation network is not in controlnet_aux 0.0.10"
       for m in ("segmentation", "seg_ufade20k")},
}
# Model-free modules whose behaviour this engine does not implement (attention/output hijacks, inpainting).
UNSUPPORTED: tuple[str, ...] = (
    "reference_adain", "reference_adain+attn", "inpaint", "inpaint_global_harmonious",
    "inpaint_only", "shuffle",
)


# UI labels of the extension's modules that do not run here (where the label differs from the name)
_LABELS_NOT_RUN: dict[str, str] = {
    "depth": "depth_midas", "normal_map": "normal_midas", "anime_face_segment": "seg_anime_face",
    "segmentation": "seg_ufade20k",
    "clip_vision": "t2ia_style_clipvision", "inpaint": "inpaint_global_harmonious",
    "densepose": "densepose (pruple bg & purple torso)", "densepose_parula": "densepose_parula (black bg & blue torso)",
}
_OLD_NAMES = {"te_hed": "softedge_teed"}  # former names, accepted in requests, not listed
_MODEL_FREE_NOT_RUN = ("reference_adain", "reference_adain+attn")  # the extension's do_not_need_model


def not_run_here() -> list[tuple[str, str, bool, str]]:
    """The extension's modules that this engine does not run, as ``(name, UI label, model_free, why)``, in a
    stable order: /controlnet/module_list lists them (flagged) so that clients and the extension's own module
    checks see every module the extension has (docs/DECISIONS.md); a request for one is refused at submit."""
    runnable = set(PREPROCESSORS) | set(ALIASES)
    labels = set(_LABELS_NOT_RUN.values())
    out = []
    for name in dict.fromkeys((*MODEL_BASED, *UNSUPPORTED, *_LABELS_NOT_RUN)):
        if name in runnable or name in labels or name in _OLD_NAMES:
            continue
        why = NOT_RUNNABLE.get(name) or (NOT_RUNNABLE.get(_LABELS_NOT_RUN.get(name, "")) or
                                         "not implemented in this engine")
        out.append((name, _LABELS_NOT_RUN.get(name, name), name in _MODEL_FREE_NOT_RUN, why))
    return out


# sd-webui-controlnet's control types (its preprocessors' tags), as /controlnet/control_types lists them
CONTROL_TYPES: tuple[str, ...] = ("All",) + tuple(sorted((
    "Canny", "Depth", "IP-Adapter", "Inpaint", "Instant-ID", "InstructP2P", "Lineart", "MLSD", "NormalMap",
    "OpenPose", "Recolor", "Reference", "Revision", "Scribble", "Segmentation", "Shuffle", "SoftEdge",
    "SparseCtrl", "T2I-Adapter", "Tile")))


def sorted_preprocessors() -> list[Preprocessor]:
    """The registry in the extension's list order: "none", then by priority and label, descending."""
    rest = [p for p in PREPROCESSORS.values() if p.name != "none"]
    rest.sort(key=lambda p: str(p.priority).zfill(8) + (p.label or p.name), reverse=True)
    return [PREPROCESSORS["none"], *rest]


def available() -> list[str]:
    """Module names (and their UI labels) this engine can run."""
    return list(PREPROCESSORS) + list(ALIASES)


def get_preprocessor(module: str | None, field: str = "module") -> Preprocessor:
    """The preprocessor for a webui module name or label; unknown or unavailable is an InvalidRequest."""
    name = "none" if module is None else str(module)
    name = ALIASES.get(name, _OLD_NAMES.get(name, name))
    if name in PREPROCESSORS:
        return PREPROCESSORS[name]
    allowed = ", ".join(available())
    if name in NOT_RUNNABLE:
        raise InvalidRequest(field, f"preprocessor {module!r} is not available in this engine: {NOT_RUNNABLE[name]}; "
                                    "run it elsewhere and send the detected map with module 'none'", allowed)
    if name in MODEL_BASED:
        raise InvalidRequest(field, f"preprocessor {module!r} is not implemented in this engine; run it elsewhere "
                                    "and send the detected map with module 'none'", allowed)
    if name in UNSUPPORTED:
        raise InvalidRequest(field, f"preprocessor {module!r} is not supported by this engine", allowed)
    raise InvalidRequest(field, f"unknown preprocessor {module!r}", allowed)


def preprocess(module: str, image: np.ndarray, processor_res: float = -1, threshold_a: float = -1,
               threshold_b: float = -1, field: str = "module") -> np.ndarray:
    """Run the webui preprocessor ``module`` on an RGB uint8 image; returns the detected map, RGB uint8."""
    return get_preprocessor(module, field)(image, processor_res, threshold_a, threshold_b)
