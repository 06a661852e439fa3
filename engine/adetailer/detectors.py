"""ADetailer's detectors: what finds the regions a tab repaints, by the names the extension lists them under.

- The MediaPipe face models (``mediapipe_face_short``, ``mediapipe_face_full``, ``mediapipe_face_mesh``,
  ``mediapipe_face_mesh_eyes_only``), run through MediaPipe's Tasks API (``mediapipe.tasks.python.vision``, in
  every mediapipe release from 0.10 on). Their weights are the BlazeFace files the mediapipe 0.10.x wheels ship in
  ``mediapipe/modules/face_detection/`` (mediapipe 0.10.30 and later ship no weights): a file placed in
  ``models/adetailer/`` first, then the copies bundled with the package (engine/models/bundled/adetailer, Apache-2.0),
  then an installed 0.10.x wheel's own; the mesh models need the Tasks bundle
  ``face_landmarker.task`` in ``models/adetailer/``. A model is listed only when its weights and mediapipe are there.
- YOLO detectors: the ``.pt`` files of ``models/adetailer/`` (``face_yolov8n.pt``, ...), run through
  ``ultralytics`` (the ``adetailer-yolo`` extra, not installed by default). A ``.pt`` is a pickle with code in it:
  it runs only with the engine's ``allow_pickle`` opt-in.

A prediction is the extension's ``PredictOutput``: boxes ``[x1, y1, x2, y2]`` (pixels, floats), one mask per box
(uint8 (H, W), 255 inside: the box for detectors without segmentation, as ``create_mask_from_bbox`` draws it),
and the confidences.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import InvalidRequest, MissingDependency
from core.lazy import require

log = logging.getLogger(__name__)

FOLDER = "adetailer"  # models/adetailer: YOLO .pt files, and MediaPipe weights placed by hand
# the MediaPipe models by the extension's names -> the weight files each runs (the first one found)
MEDIAPIPE_FILES: dict[str, tuple[str, ...]] = {
    "mediapipe_face_full": ("face_detection_full_range.tflite", "face_detection_full_range_sparse.tflite"),
    "mediapipe_face_short": ("face_detection_short_range.tflite",),
    "mediapipe_face_mesh": ("face_landmarker.task",),
    "mediapipe_face_mesh_eyes_only": ("face_landmarker.task",),
}
MESH_FACES = 20  # the extension's max_num_faces
YOLO_SUFFIX = ".pt"


@dataclass
class Prediction:
    """What a detector found on one image (the extension's PredictOutput, without the preview)."""

    bboxes: list[list[float]] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # uint8 (H, W), 255 inside
    confidences: list[float] = field(default_factory=list)


def box_masks(bboxes: list[list[float]], size: tuple[int, int]) -> list[np.ndarray]:
    """The extension's ``create_mask_from_bbox``: PIL's filled rectangle of each box (corners included) on a
    black (H, W) mask; ``size`` is (width, height)."""
    from PIL import Image, ImageDraw

    out = []
    for box in bboxes:
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        out.append(np.asarray(mask, dtype=np.uint8))
    return out


def _mediapipe_dirs() -> list[Path]:
    """Where an installed mediapipe wheel keeps its face weights (0.10.x); nothing is imported to find it."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return [root / "modules" / "face_detection"]


def has_mediapipe() -> bool:
    return importlib.util.find_spec("mediapipe") is not None


class Detectors:
    """The detectors of one models folder: listing, the submit-time check, and prediction (YOLO models and
    MediaPipe detectors are kept loaded; one lock, as the engine runs one request at a time)."""

    def __init__(self, models_dir: str | Path, allow_pickle: bool = False, device: str = "cpu"):
        self.models_dir = Path(models_dir)
        self.device = device  # where ultralytics runs a YOLO model (MediaPipe's face detectors run on the CPU)
        self.folder = self.models_dir / FOLDER
        self.allow_pickle = allow_pickle
        self._lock = threading.Lock()
        self._yolo: dict[Path, object] = {}

    # --------------------------------------------------------------------------------------- what is there
    def mediapipe_weights(self, name: str) -> Path | None:
        from engine.models.store import bundled_root

        # the user's folder first, then the bundled BlazeFace files (engine/models/bundled/adetailer, Apache-2.0),
        # then an installed 0.10.x wheel's own copy
        extra = (bundled_root() / FOLDER, *_mediapipe_dirs()) if name in MEDIAPIPE_FILES else ()
        for folder in (self.folder, *extra):
            for file in MEDIAPIPE_FILES.get(name, ()):
                if (folder / file).is_file():
                    return folder / file
        return None

    def yolo_files(self) -> dict[str, Path]:
        """The ``.pt`` files of models/adetailer (and its sub-folders), by file name as the extension lists them."""
        if not self.folder.is_dir():
            return {}
        out: dict[str, Path] = {}
        for path in sorted(self.folder.rglob(f"*{YOLO_SUFFIX}")):
            if path.is_file():
                out.setdefault(path.name, path)
        return out

    def names(self) -> list[str]:
        """The installed models, as ``/adetailer/v1/ad_model`` lists them: the MediaPipe models whose weights are
        found (with mediapipe installed), then the YOLO files."""
        media = [n for n in MEDIAPIPE_FILES if has_mediapipe() and self.mediapipe_weights(n) is not None]
        return media + list(self.yolo_files())

    def check(self, name: str, field_name: str) -> None:
        """What :meth:`predict` would refuse about ``name``, before anything runs."""
        if name in MEDIAPIPE_FILES:
            if self.mediapipe_weights(name) is None:
                files = " or ".join(MEDIAPIPE_FILES[name])
                raise InvalidRequest(field_name, f"the MediaPipe model {name!r} needs {files} in {self.folder} (the "
                                     "mediapipe 0.10.x wheels carry the face detectors; later ones ship no weights)",
                                     self._allowed())
            if not has_mediapipe():
                raise MissingDependency("mediapipe", "adetailer", f"the ADetailer model {name!r}")
            return
        path = self.yolo_files().get(name)
        if path is None:
            raise InvalidRequest(field_name, f"no ADetailer model {name[:100]!r} in {self.folder}", self._allowed())
        if not self.allow_pickle:
            raise InvalidRequest(field_name, f"{name} is a pickle (.pt: it can run code when loaded); YOLO models are "
                                 "loaded only when the server allows pickles (--allow-pickle)",
                                 "a MediaPipe model, or start the server with --allow-pickle")
        if importlib.util.find_spec("ultralytics") is None:
            raise MissingDependency("ultralytics", "adetailer-yolo", f"the YOLO model {name!r}")

    def _allowed(self) -> str:
        names = self.names()
        return ", ".join(names) if names else f"none installed: place YOLO .pt files in {self.folder}"

    # --------------------------------------------------------------------------------------- prediction
    def predict(self, name: str, image: np.ndarray, confidence: float = 0.3, classes: str = "",
                field_name: str = "ad_model") -> Prediction:
        """Detect on ``image`` (RGB uint8 (H, W, 3)) with the model ``name``."""
        self.check(name, field_name)
        with self._lock:
            if name in ("mediapipe_face_short", "mediapipe_face_full"):
                return self._face_detection(self.mediapipe_weights(name), image, confidence)
            if name in ("mediapipe_face_mesh", "mediapipe_face_mesh_eyes_only"):
                return self._face_mesh(self.mediapipe_weights(name), image, confidence,
                                       eyes_only=name.endswith("eyes_only"))
            return self._ultralytics(self.yolo_files()[name], image, confidence, classes)

    @staticmethod
    def _mp_image(image: np.ndarray):
        mp = require("mediapipe", "adetailer", "ADetailer's MediaPipe models")
        return mp, mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image[..., :3]))

    def _face_detection(self, weights: Path, image: np.ndarray, confidence: float) -> Prediction:
        """The extension's ``mediapipe_face_detection``: BlazeFace boxes, a box mask each."""
        mp, frame = self._mp_image(image)
        vision = mp.tasks.vision
        options = vision.FaceDetectorOptions(base_options=mp.tasks.BaseOptions(model_asset_path=str(weights)),
                                             min_detection_confidence=float(confidence))
        with vision.FaceDetector.create_from_options(options) as detector:
            found = detector.detect(frame)
        h, w = image.shape[:2]
        bboxes, scores = [], []
        for det in found.detections:
            box = det.bounding_box
            x1, y1 = max(float(box.origin_x), 0.0), max(float(box.origin_y), 0.0)
            x2, y2 = min(float(box.origin_x + box.width), float(w)), min(float(box.origin_y + box.height), float(h))
            if x2 <= x1 or y2 <= y1:
                continue
            bboxes.append([x1, y1, x2, y2])
            scores.append(float(det.categories[0].score) if det.categories else 1.0)
        return Prediction(bboxes, box_masks(bboxes, (w, h)), scores)

    def _face_mesh(self, weights: Path, image: np.ndarray, confidence: float, eyes_only: bool) -> Prediction:
        """The extension's ``mediapipe_face_mesh`` (the convex hull of each face's landmarks) and
        ``mediapipe_face_mesh_eyes_only`` (the hulls of the eyes' landmarks); confidence 1.0 (unknown)."""
        from PIL import Image, ImageDraw

        cv2 = require("cv2", "controlnet", "ADetailer's face mesh masks")
        mp, frame = self._mp_image(image)
        vision = mp.tasks.vision
        options = vision.FaceLandmarkerOptions(base_options=mp.tasks.BaseOptions(model_asset_path=str(weights)),
                                               num_faces=MESH_FACES, min_face_detection_confidence=float(confidence))
        with vision.FaceLandmarker.create_from_options(options) as landmarker:
            found = landmarker.detect(frame)
        h, w = image.shape[:2]
        groups = [None]
        if eyes_only:
            conn = vision.FaceLandmarksConnections
            groups = [sorted({i for c in conn.FACE_LANDMARKS_LEFT_EYE for i in (c.start, c.end)}),
                      sorted({i for c in conn.FACE_LANDMARKS_RIGHT_EYE for i in (c.start, c.end)})]
        masks = []
        for landmarks in found.face_landmarks:
            points = np.array([[p.x * w, p.y * h] for p in landmarks], dtype=np.int32)
            mask = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(mask)
            for idx in groups:
                hull = cv2.convexHull(points if idx is None else points[idx]).reshape(-1).tolist()
                draw.polygon(hull, fill=255)
            masks.append(np.asarray(mask, dtype=np.uint8))
        bboxes = []
        kept = []
        for mask in masks:
            ys, xs = np.nonzero(mask)
            if len(xs):
                bboxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
                kept.append(mask)
        return Prediction(bboxes, kept, [1.0] * len(kept))

    def _ultralytics(self, path: Path, image: np.ndarray, confidence: float, classes: str) -> Prediction:
        """The extension's ``ultralytics_predict``: boxes, segmentation masks where the model has them."""
        ultralytics = require("ultralytics", "adetailer-yolo", "ADetailer's YOLO models")
        model = self._yolo.get(path)
        if model is None:
            model = self._yolo[path] = ultralytics.YOLO(str(path))
        if classes and "-world" in path.stem:
            parsed = [c.strip() for c in classes.split(",") if c.strip()]
            if parsed:
                model.set_classes(parsed)
        from PIL import Image

        result = model(Image.fromarray(image[..., :3]), conf=float(confidence), device=self.device,
                       verbose=False)[0]
        bboxes = result.boxes.xyxy.cpu().numpy().tolist()
        if not bboxes:
            return Prediction()
        h, w = image.shape[:2]
        if result.masks is None:
            masks = box_masks(bboxes, (w, h))
        else:
            data = result.masks.data.cpu().numpy()
            masks = [np.asarray(Image.fromarray((np.clip(m, 0, 1) * 255).astype(np.uint8)).resize((w, h)))
                     for m in data]
        return Prediction(bboxes, masks, result.boxes.conf.cpu().numpy().tolist())
