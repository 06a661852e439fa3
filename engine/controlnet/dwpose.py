"""DWPose (``dw_openpose_full``) as sd-webui-controlnet runs it (annotator/openpose: ``wholebody.py``,
``cv_ox_det.py``, ``cv_ox_pose.py``), on two ONNX files through onnxruntime (CPU, as the extension runs them on
the CPU through OpenCV's DNN module):

- ``yolox_l.onnx``, YOLOX-L (COCO, 80 classes), finds the people. Its input is the image letterboxed into
  640x640 (scaled by ``r = min(640 / h, 640 / w)`` with bilinear resampling, placed top-left on a ground of
  114, channels first, 0..255 floats, not normalised); its output ``(1, 8400, 85)`` holds, per anchor of the
  8/16/32-pixel grids, the box (offsets from the cell in cells, log sizes), the objectness and the 80 class
  probabilities. Boxes are decoded back to the image (``/ r``), scored ``objectness * class``, kept above 0.1,
  suppressed per class at IoU 0.45; the people are the "person" boxes scoring above 0.3. When nothing at all
  scores above 0.1 the image has no people; when something does but no person passes, the whole image is taken
  as one person's box (the extension's behaviour, kept).
- ``dw-ll_ucoco_384.onnx``, RTMPose-L trained on COCO-WholeBody (133 keypoints: 17 body, 6 feet, 68 face,
  21 + 21 hands), estimates each person's keypoints. Its input is the person's box, centred, enlarged 1.25x
  and widened to the model's 3:4 aspect, warped (bilinear) to 288x384, normalised with ImageNet's mean and
  std in RGB order; its outputs are SimCC distributions, ``simcc_x (1, 133, 576)`` and ``simcc_y
  (1, 133, 768)`` (two bins per input pixel). A keypoint is at the argmax of each, halved, mapped back
  through the box; its score is the smaller of the two maxima.

The image given to both networks is the extension's: the RGB array the preprocessor receives (the extension
does not convert it to BGR for DWPose). Keypoints become OpenPose's layout: the 17 COCO body points reordered
to OpenPose's 18 with a neck (the shoulders' midpoint, present when both shoulders score above 0.3), the 68
face points followed by the two eyes (OpenPose's 70), the two hands; a keypoint is kept when its score is at
least 0.3. People are drawn by :func:`engine.controlnet.openpose.draw_people` (the extension's drawing, which
``/controlnet/render_openpose_json`` uses too), in pixels of the image they were found on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import ModelError
from core.lazy import load, require

DETECTOR_SIZE = (640, 640)  # YOLOX input (height, width)
GRID_STRIDES = (8, 16, 32)
LETTERBOX_FILL = 114
CANDIDATE_SCORE = 0.1  # a box of any class counts above this
NMS_IOU = 0.45
PERSON_SCORE = 0.3
PERSON_CLASS = 0  # COCO's "person"

POSE_SIZE = (288, 384)  # RTMPose input (width, height)
BOX_PADDING = 1.25
SIMCC_SPLIT = 2.0  # SimCC bins per input pixel
MEAN = (123.675, 116.28, 103.53)  # RGB
STD = (58.395, 57.12, 57.375)
KEYPOINT_SCORE = 0.3  # a keypoint is drawn at this score and above; the neck needs both shoulders above it

WHOLEBODY_KEYPOINTS = 133
NECK = WHOLEBODY_KEYPOINTS  # the neck, appended after COCO-WholeBody's points
# OpenPose's 18 body points (nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right
# hip/knee/ankle, left hip/knee/ankle, right eye, left eye, right ear, left ear) from COCO's 17 and the neck
OPENPOSE_BODY = (0, NECK, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
LEFT_SHOULDER, RIGHT_SHOULDER = 5, 6
FACE = slice(23, 91)
LEFT_HAND = slice(91, 112)
RIGHT_HAND = slice(112, 133)
OPENPOSE_EYES = (14, 15)  # appended to the 68 face points (OpenPose's face has 70)


# ------------------------------------------------------------------------------------------- detection


def letterbox(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The detector's input ``(1, 3, 640, 640)`` float32 and the scale ``r`` of the image in it."""
    cv2 = require("cv2", "controlnet", "DWPose")
    h, w = image.shape[:2]
    ratio = min(DETECTOR_SIZE[0] / h, DETECTOR_SIZE[1] / w)
    size = (int(w * ratio), int(h * ratio))
    ground = np.full((*DETECTOR_SIZE, 3), LETTERBOX_FILL, dtype=np.uint8)
    ground[:size[1], :size[0]] = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(ground.transpose(2, 0, 1)[None], dtype=np.float32), ratio


def _anchors() -> tuple[np.ndarray, np.ndarray]:
    """Each anchor's cell ``(x, y)`` and stride, in the detector's output order (stride by stride, rows)."""
    cells, strides = [], []
    for stride in GRID_STRIDES:
        rows, cols = DETECTOR_SIZE[0] // stride, DETECTOR_SIZE[1] // stride
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        cells.append(np.stack((xs.ravel(), ys.ravel()), axis=1))
        strides.append(np.full((rows * cols, 1), stride))
    return np.concatenate(cells), np.concatenate(strides)


def decode_detections(raw: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """The detector's output -> ``(boxes, scores)``: boxes ``(N, 4)`` as x1, y1, x2, y2 in the image's pixels,
    scores ``(N, 80)`` = objectness x class probability (float32, as the extension computes them)."""
    raw = np.asarray(raw, dtype=np.float32).reshape(-1, np.shape(raw)[-1])
    cells, strides = _anchors()
    if len(raw) != len(cells):
        raise ValueError(f"the detector gave {len(raw)} anchors; a 640x640 YOLOX has {len(cells)}")
    centre = ((raw[:, :2] + cells) * strides).astype(np.float32)
    size = (np.exp(raw[:, 2:4]) * strides).astype(np.float32)
    boxes = np.concatenate((centre - size / 2.0, centre + size / 2.0), axis=1)
    boxes /= ratio  # a Python float: float32 arithmetic, as the extension's in-place division
    return boxes, raw[:, 4:5] * raw[:, 5:]


def suppress(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> list[int]:
    """Greedy non-maximum suppression, highest score first; areas and overlaps in whole pixels (+1), a box is
    dropped when its IoU with a kept one is above ``iou``. The indices kept, best first."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        overlap = w * h / (areas[best] + areas[rest] - w * h)
        order = rest[overlap <= iou]
    return keep


def person_boxes(raw: np.ndarray, ratio: float) -> np.ndarray | None:
    """The people's boxes ``(M, 4)`` (float64, best first) from the detector's output; None when no box of any
    class scores above :data:`CANDIDATE_SCORE` (the extension then finds no one); ``(0, 4)`` when only other
    things were found (the extension then takes the whole image as one person)."""
    boxes, scores = decode_detections(raw, ratio)
    if not (scores > CANDIDATE_SCORE).any():
        return None
    candidates = scores[:, PERSON_CLASS] > CANDIDATE_SCORE
    boxes, person = boxes[candidates], scores[candidates, PERSON_CLASS]
    keep = suppress(boxes, person) if len(boxes) else []
    kept = [i for i in keep if person[i] > PERSON_SCORE]
    return boxes[kept].astype(np.float64).reshape(-1, 4)


# ------------------------------------------------------------------------------------------------ pose


def box_frame(box) -> tuple[np.ndarray, np.ndarray]:
    """``(centre, size)`` of the region the pose network sees for ``box`` (x1, y1, x2, y2): the box's centre,
    its size x 1.25 widened (or heightened) to the network's 3:4 aspect."""
    x1, y1, x2, y2 = (float(v) for v in box)
    centre = np.array([x1 + x2, y1 + y2]) * 0.5
    w, h = np.array([x2 - x1, y2 - y1]) * BOX_PADDING
    aspect = POSE_SIZE[0] / POSE_SIZE[1]
    size = np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])
    return centre, size


def crop(image: np.ndarray, centre: np.ndarray, size: np.ndarray) -> np.ndarray:
    """The pose network's input ``(1, 3, 384, 288)`` float32: the region warped to the network's size (its
    width maps to 288 pixels; black outside the image), normalised."""
    cv2 = require("cv2", "controlnet", "DWPose")
    out_w, out_h = POSE_SIZE
    # three point pairs fix the affine map: the centre, the point half a width above it, and that point
    # turned a quarter about the latter (as mmpose's get_warp_matrix builds them, in float32)
    c = centre.astype(np.float32)
    top = (centre + np.array([0.0, -0.5 * size[0]])).astype(np.float32)
    d = c - top
    src = np.stack([c, top, top + np.array([-d[1], d[0]], dtype=np.float32)])
    dc = np.array([out_w * 0.5, out_h * 0.5], dtype=np.float32)
    dtop = dc + np.array([0.0, -out_w * 0.5], dtype=np.float32)
    dd = dc - dtop
    dst = np.stack([dc, dtop, dtop + np.array([-dd[1], dd[0]], dtype=np.float32)])
    warp = cv2.getAffineTransform(src, dst)
    region = cv2.warpAffine(image, warp, (out_w, out_h), flags=cv2.INTER_LINEAR)
    x = (region - np.array(MEAN)) / np.array(STD)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, centre: np.ndarray, size: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """SimCC outputs ``(1, K, 576)``, ``(1, K, 768)`` -> keypoints ``(K, 2)`` in the image's pixels and scores
    ``(K,)``: each axis's argmax, in input pixels (bins / 2), mapped back through the region; the score is the
    smaller maximum (a keypoint whose score is not positive is put at bin -1, as the extension does)."""
    sx = np.asarray(simcc_x).reshape(-1, np.shape(simcc_x)[-1])
    sy = np.asarray(simcc_y).reshape(-1, np.shape(simcc_y)[-1])
    locations = np.stack((sx.argmax(axis=1), sy.argmax(axis=1)), axis=-1).astype(np.float32)
    scores = np.minimum(sx.max(axis=1), sy.max(axis=1))
    locations[scores <= 0] = -1
    keypoints = locations / SIMCC_SPLIT / np.array(POSE_SIZE) * size + centre - size / 2
    return keypoints, scores


def openpose_person(keypoints: np.ndarray, scores: np.ndarray) -> dict[str, list | None]:
    """133 COCO-WholeBody keypoints and scores -> one OpenPose person (the parts of the pose JSON, keypoints
    ``(x, y)`` or None below :data:`KEYPOINT_SCORE`; a hand or face with no keypoint left is None)."""
    points = np.concatenate((keypoints, np.asarray(scores, dtype=np.float64)[:, None]), axis=1)
    neck = np.mean(points[[LEFT_SHOULDER, RIGHT_SHOULDER]], axis=0)
    neck[2] = float(points[LEFT_SHOULDER, 2] > KEYPOINT_SCORE and points[RIGHT_SHOULDER, 2] > KEYPOINT_SCORE)
    points = np.concatenate((points, neck[None]))

    def part(rows) -> list | None:
        kept = [(float(x), float(y)) if score >= KEYPOINT_SCORE else None for x, y, score in rows]
        return None if all(p is None for p in kept) else kept

    body = part(points[list(OPENPOSE_BODY)]) or [None] * len(OPENPOSE_BODY)
    face = part(points[FACE])
    if face is not None:
        face += [body[i] for i in OPENPOSE_EYES]
    return {"pose_keypoints_2d": body, "hand_left_keypoints_2d": part(points[LEFT_HAND]),
            "hand_right_keypoints_2d": part(points[RIGHT_HAND]), "face_keypoints_2d": face}


# ------------------------------------------------------------------------------------------- the model


def open_session(path: Path):
    """An onnxruntime CPU session of ``path`` (threads as the engine's CPU backends: core.cpu.cpu_threads)."""
    from core.cpu import cpu_threads

    ort = load("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any unreadable graph is a ModelError naming the file
        raise ModelError(path, f"cannot load this ONNX file: {str(exc).splitlines()[0]}") from None


class DWPose:
    """The two DWPose networks (onnxruntime sessions): :meth:`detect` finds people, calling the object draws
    them."""

    def __init__(self, detector, estimator):
        self.detector = detector
        self.estimator = estimator
        self._detector_input = detector.get_inputs()[0].name
        self._estimator_input = estimator.get_inputs()[0].name

    @classmethod
    def from_files(cls, detector: Path, estimator: Path) -> DWPose:
        return cls(open_session(detector), open_session(estimator))

    def boxes(self, image: np.ndarray) -> np.ndarray | None:
        """The people's boxes in ``image`` (RGB uint8): see :func:`person_boxes`."""
        x, ratio = letterbox(image)
        raw = self.detector.run(None, {self._detector_input: x})[0]
        return person_boxes(raw, ratio)

    def detect(self, image: np.ndarray) -> list[dict[str, list | None]]:
        """The people in ``image`` (RGB uint8), OpenPose's parts with keypoints in its pixels."""
        boxes = self.boxes(image)
        if boxes is None:
            return []
        if not len(boxes):
            h, w = image.shape[:2]
            boxes = np.array([[0.0, 0.0, float(w), float(h)]])
        people = []
        for box in boxes:  # one box a run (the extension's OpenCV path; any batch size of the graph works)
            centre, size = box_frame(box)
            simcc_x, simcc_y = self.estimator.run(None, {self._estimator_input: crop(image, centre, size)})[:2]
            people.append(openpose_person(*decode_simcc(simcc_x, simcc_y, centre, size)))
        return people

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The pose map of ``image``: its people drawn at its size (body, hands, face), RGB uint8."""
        from engine.controlnet.openpose import draw_people

        return draw_people(self.detect(image), *image.shape[:2])
