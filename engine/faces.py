"""Face restoration (the webui's ``restore_faces`` and the extras tab's GFPGAN / CodeFormer fields).

The webui's way (``modules/face_restoration_utils.py`` with facexlib), in four steps per image:

1. **detect** the faces: dlib's HOG frontal-face detector (``dlib.get_frontal_face_detector``: trained weights
   inside the dlib library, nothing to download; boxes scoring below :data:`DETECT_THRESHOLD` are dropped). The
   five landmarks facexlib aligns with (eyes, nose, mouth corners) are placed at their mean positions in the box
   (:data:`BOX_LANDMARKS`), so faces are aligned upright (no roll correction).
2. **align and crop** each face to 512x512: the similarity transform from its landmarks to facexlib's FFHQ
   template (:data:`TEMPLATE_512`, ``cv2.estimateAffinePartial2D`` with LMEDS), border filled with facexlib's
   grey.
3. **restore** the crop with the model, in [-1, 1] RGB as the webui feeds it: GFPGAN ``net(x, return_rgb=False)[0]``,
   CodeFormer ``net(x, weight=w, adain=True)[0]`` (``w`` = ``code_former_weight``: 0 strongest, 1 weakest).
4. **paste back** with the inverse transform and facexlib's feathered mask (the warped square eroded by 2 px,
   eroded again and Gaussian-blurred over 1/20 of the face's side): pixels away from the faces are unchanged.

Model files are the webui's: ``models/GFPGAN/*.pth`` (GFPGAN v1.3/v1.4 "clean" architecture) and
``models/Codeformer/*.pth`` (CodeFormer), loaded through spandrel (engine.spandrel_loader; CodeFormer through
spandrel_extra_arches, a non-commercial licence: the opt-in ``faces`` extra). A request that asks for face
restoration with no model installed is refused naming the folder (:func:`check`), never silently skipped.

``restore(image, model, visibility, weight, models=FaceModels(models_dir))`` is the one entry point, used by
the pipeline (``restore_faces``) and the extras route (visibility blends as the webui's ``Image.blend``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InvalidRequest, MissingDependency, ModelError
from core.lazy import require
from engine import spandrel_loader

log = logging.getLogger(__name__)

# the webui's restorer names -> the models/ folder it reads their files from
RESTORERS = {"CodeFormer": "Codeformer", "GFPGAN": "GFPGAN"}
SUFFIXES = (".pth", ".pt", ".safetensors")
FACE_SIZE = 512
# facexlib's FFHQ five-point template for 512x512 crops (eyes, nose tip, mouth corners)
TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                         [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
# the same five points as fractions of a dlib HOG face box (mean positions on frontal faces)
BOX_LANDMARKS = np.array([[0.31, 0.36], [0.69, 0.36], [0.50, 0.58], [0.35, 0.79], [0.65, 0.79]], dtype=np.float32)
DETECT_THRESHOLD = 0.5  # dlib HOG score; lower boxes (weak, often not faces) are dropped
DETECT_UPSAMPLE = 1  # dlib upsamples the image once: faces down to ~40 px
BORDER_VALUE = (135, 133, 132)  # facexlib's fill of the crop outside the image


def model_file(models_dir: str | Path, name: str) -> Path | None:
    """The file of restorer ``name`` in ``models_dir/<its folder>``: one whose name holds the restorer's name,
    else the first model file there (sorted); None when there is none."""
    folder = Path(models_dir) / RESTORERS[name]
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    named = [p for p in files if name.lower() in p.name.lower()]
    return (named or files or [None])[0]


def installed(models_dir: str | Path) -> dict[str, Path]:
    """The restorers with a file in ``models_dir``, webui order (CodeFormer, GFPGAN)."""
    found = {name: model_file(models_dir, name) for name in RESTORERS}
    return {name: path for name, path in found.items() if path is not None}


def check(models_dir: str | Path, name: str | None, field: str = "face_restoration") -> str:
    """The restorer a request with face restoration uses (``name``: the webui's face_restoration_model; None: the
    first installed). InvalidRequest naming the folder(s) when none is installed, or naming the installed ones
    when ``name`` is not among them."""
    found = installed(models_dir)
    if not found:
        folders = " or ".join(f"{Path(models_dir) / folder}" for folder in RESTORERS.values())
        raise InvalidRequest(field, f"face restoration asked for, but no face-restoration model is installed: put "
                             f"a GFPGAN or CodeFormer .pth file in {folders}", "false (no model installed)")
    if name is None or name in ("", "None"):
        return next(iter(found))
    match = {n.lower(): n for n in found}.get(str(name).lower())
    if match is None:
        known = f" ({name!r} is not installed: its folder is {Path(models_dir) / RESTORERS[name]})" \
            if name in RESTORERS else ""
        raise InvalidRequest(f"{field}.model", f"unknown face restorer {name!r}{known}", ", ".join(found))
    return match


# ------------------------------------------------------------------------------------------------ detection
@dataclass(frozen=True)
class Face:
    """A detected face: its box (x0, y0, x1, y1) in pixels, the detector's score, the five landmarks (5, 2)."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray


def detect(image: np.ndarray, threshold: float = DETECT_THRESHOLD) -> list[Face]:
    """The faces of an RGB uint8 image (H, W, 3), best first."""
    dlib = require("dlib", "faces", "face detection (restore_faces)")
    detector = dlib.get_frontal_face_detector()
    rects, scores, _ = detector.run(np.ascontiguousarray(image[..., :3], dtype=np.uint8), DETECT_UPSAMPLE, threshold)
    faces = []
    for rect, score in sorted(zip(rects, scores), key=lambda rs: -rs[1]):
        x0, y0, x1, y1 = rect.left(), rect.top(), rect.right(), rect.bottom()
        points = np.array([x0, y0], np.float32) + BOX_LANDMARKS * np.array([x1 - x0, y1 - y0], np.float32)
        faces.append(Face((x0, y0, x1, y1), float(score), points))
    return faces


def align(image: np.ndarray, face: Face) -> tuple[np.ndarray, np.ndarray]:
    """The face's 512x512 crop (RGB uint8) and the 2x3 affine that maps image pixels to crop pixels."""
    cv2 = require("cv2", "controlnet", "face alignment (restore_faces)")
    affine = cv2.estimateAffinePartial2D(face.landmarks, TEMPLATE_512, method=cv2.LMEDS)[0]
    crop = cv2.warpAffine(image, affine, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BORDER_VALUE)
    return crop, affine


def paste(image: np.ndarray, restored: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``restored`` (the 512x512 crop, restored) pasted into ``image`` (float32 (H, W, 3)) through the inverse of
    ``affine`` with facexlib's feathered mask; returns the new float32 image."""
    cv2 = require("cv2", "controlnet", "face paste-back (restore_faces)")
    h, w = image.shape[:2]
    inverse = cv2.invertAffineTransform(affine)
    back = cv2.warpAffine(restored.astype(np.float32), inverse, (w, h))
    mask = cv2.warpAffine(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse, (w, h))
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))
    edge = int(float(mask.sum()) ** 0.5) // 20
    if edge > 0:
        mask = cv2.erode(mask, np.ones((edge * 2, edge * 2), np.uint8))
        mask = cv2.GaussianBlur(mask, (edge * 2 + 1, edge * 2 + 1), 0)
    mask = mask[..., None]
    return mask * back + (1.0 - mask) * image


# ------------------------------------------------------------------------------------------------ models
def _extra_arches() -> None:
    """Make ``spandrel_extra_arches``' architecture modules importable on top of engine.spandrel_loader's
    spandrel (which, without a usable torchvision, is a package whose ``__init__`` did not run): spandrel's
    public names are set on it, and spandrel_extra_arches is entered without its ``__init__`` (which imports
    every extra architecture)."""
    if "spandrel_extra_arches" not in sys.modules and importlib.util.find_spec("spandrel_extra_arches") is None:
        raise MissingDependency("spandrel_extra_arches", "faces", "CodeFormer face restoration")
    spandrel_loader.registry()
    package = sys.modules["spandrel"]
    if getattr(package, "__all__", None) is None:  # the bare package: its public names that import nothing else
        for name in ("model_descriptor", "registry", "canonicalize"):
            module = importlib.import_module(f"spandrel.__helpers.{name}")
            for attr in dir(module):
                if not attr.startswith("_") and not hasattr(package, attr):
                    setattr(package, attr, getattr(module, attr))
    if "spandrel_extra_arches" not in sys.modules:
        spec = importlib.util.find_spec("spandrel_extra_arches")
        root = str(Path(spec.origin).parent)
        stub = types.ModuleType("spandrel_extra_arches")
        stub.__path__, stub.__file__, stub.__package__ = [root], spec.origin, "spandrel_extra_arches"
        stub.__spec__ = importlib.util.spec_from_file_location("spandrel_extra_arches", spec.origin,
                                                              submodule_search_locations=[root])
        sys.modules["spandrel_extra_arches"] = stub


def load_restorer(path: Path, name: str, device: str = "cpu"):
    """The torch module of restorer ``name`` (GFPGAN or CodeFormer) from ``path``, eval mode on ``device``.
    ModelError naming the file when it is not that architecture."""
    state = spandrel_loader.read_state_dict(Path(path))
    for key in ("params_ema", "params", "state_dict"):  # the webui's files wrap their weights
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if name == "CodeFormer":
        _extra_arches()
        arch = importlib.import_module("spandrel_extra_arches.architectures.CodeFormer").CodeFormerArch()
    else:
        spandrel_loader.registry()
        arch = importlib.import_module("spandrel.architectures.GFPGAN").GFPGANArch()
    if not arch.detect(state):
        raise ModelError(str(path), f"is not a {name} model (its keys are not the {name} architecture's)")
    try:
        descriptor = arch.load(state)
    except Exception as exc:  # noqa: BLE001 - a shape mismatch inside the architecture: name the file
        raise ModelError(str(path), f"cannot be loaded as {name}: {type(exc).__name__}: {str(exc)[:200]}") from None
    return descriptor.model.to(device).eval()


class FaceModels:
    """The restorers of one models folder, loaded on first use and kept (one of each)."""

    def __init__(self, models_dir: str | Path, device: str = "cpu"):
        self.models_dir = Path(models_dir)
        self.device = device
        self._loaded: dict[str, tuple[Path, Any]] = {}
        self._lock = threading.Lock()

    def get(self, name: str):
        """``(restorer name, module)`` of ``name`` (checked as :func:`check`)."""
        name = check(self.models_dir, name)
        path = model_file(self.models_dir, name)
        with self._lock:
            cached = self._loaded.get(name)
            if cached is None or cached[0] != path:
                log.info("face restoration: loading %s from %s", name, path)
                cached = (path, load_restorer(path, name, self.device))
                self._loaded[name] = cached
        return name, cached[1]


def _run(name: str, net, crop: np.ndarray, weight: float, device: str) -> np.ndarray:
    """One aligned crop (512x512 RGB uint8) through the restorer, as the webui runs it -> RGB float32 [0, 255]."""
    import torch

    x = torch.from_numpy(crop.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].to(device)
    with torch.inference_mode():
        if name == "CodeFormer":
            out = net(x, weight=weight, adain=True)[0]
        else:
            out = net(x, return_rgb=False)[0]
    out = out[0] if out.ndim == 4 else out
    out = (out.float().clamp(-1, 1) + 1.0) * 127.5
    return out.permute(1, 2, 0).cpu().numpy()


def restore(image: np.ndarray, model: str | None, visibility: float = 1.0, weight: float = 0.5, *,
            models: FaceModels) -> np.ndarray:
    """Every detected face of ``image`` (RGB uint8 (H, W, 3)) restored by ``model`` ("GFPGAN", "CodeFormer";
    None: the first installed) and pasted back; ``visibility`` blends the result over the input (the extras
    fields ``gfpgan_visibility`` / ``codeformer_visibility``); ``weight``: CodeFormer's fidelity weight
    (``code_former_weight``). Returns a new RGB uint8 image (the input when no face is found)."""
    check(models.models_dir, model)  # refused before any work when no model is installed
    if visibility <= 0:
        return image
    faces = detect(image)
    if not faces:
        log.info("face restoration: no face found")
        return image
    name, net = models.get(model)  # loaded on the first image with a face
    log.info("face restoration (%s): %d face(s)", name, len(faces))
    result = image.astype(np.float32)
    for face in faces:
        crop, affine = align(image, face)
        result = paste(result, _run(name, net, crop, weight, models.device), affine)
    restored = np.clip(result, 0, 255).astype(np.uint8)  # truncated, as the webui's astype("uint8")
    if visibility < 1.0:  # PIL Image.blend: a + (b - a) * alpha
        restored = np.clip(image + (restored.astype(np.float32) - image) * visibility, 0, 255).astype(np.uint8)
    return restored
