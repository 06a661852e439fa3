"""Small ONNX graphs with the inputs and outputs of DWPose's two files, for tests (engine.controlnet.dwpose):

- a detector with yolox_l.onnx's interface (``images`` ``(1, 3, 640, 640)`` -> ``output`` ``(1, 8400, 85)``)
  whose output is fixed: the raw rows of chosen boxes (centre offsets from the anchor's cell and log sizes in
  cells, objectness, class probabilities), every other anchor empty;
- an estimator with dw-ll_ucoco_384.onnx's interface (``input`` ``(N, 3, 384, 288)`` -> ``simcc_x``
  ``(N, 133, 576)``, ``simcc_y`` ``(N, 133, 768)``) that finds coloured dots: keypoint k looks for the dot of
  colour ``groups[k]`` (one of the seven :data:`PALETTE` colours, picked by channel weights +1 / -1 so that only
  that colour scores highest) in the column and row sums of its input, and reports it with score
  ``scores[k]`` (its two SimCC maxima equal that score). So a keypoint decodes onto its dot's position in the
  image if the crop, the normalisation (RGB order) and the inverse mapping are right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# the seven colours whose channels are each 0 or 255
PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 255, 255))
KEYPOINTS = 133
STRIDES = (8, 16, 32)


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def anchor(box640, stride: int) -> tuple[int, int, int]:
    """``(index, cell x, cell y)`` of the anchor of ``stride`` whose cell holds the box's centre."""
    cx, cy = (box640[0] + box640[2]) / 2, (box640[1] + box640[3]) / 2
    index = 0
    for s in STRIDES:
        if s == stride:
            gx, gy = int(cx // s), int(cy // s)
            return index + gy * (640 // s) + gx, gx, gy
        index += (640 // s) ** 2
    raise ValueError(stride)


def detector_rows(detections) -> np.ndarray:
    """The raw ``(8400, 85)`` output holding ``detections``: (box x1, y1, x2, y2 in the 640x640 letterbox,
    objectness, class, class probability, stride of the anchor that reports it)."""
    raw = np.zeros((sum((640 // s) ** 2 for s in STRIDES), 85), np.float32)
    for box, objectness, cls, probability, stride in detections:
        index, gx, gy = anchor(box, stride)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        w, h = box[2] - box[0], box[3] - box[1]
        raw[index, :4] = (cx / stride - gx, cy / stride - gy, np.log(w / stride), np.log(h / stride))
        raw[index, 4] = objectness
        raw[index, 5 + cls] = probability
    return raw


def detector_graph(path: Path, detections) -> Path:
    """yolox_l.onnx's interface, answering ``detections`` (see :func:`detector_rows`) for any image."""
    from onnx import TensorProto, helper, numpy_helper

    raw = detector_rows(detections)[None]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=1),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),  # the input in the graph, contributing 0
        helper.make_node("Reshape", ["nothing", "shape3"], ["nothing3"]),
        helper.make_node("Add", ["rows", "nothing3"], ["output"]),
    ]
    inits = [numpy_helper.from_array(raw, "rows"), numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(np.array([1, 1, 1], np.int64), "shape3")]
    graph = helper.make_graph(
        nodes, "yolox_stand_in",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, raw.shape[1], 85])], inits)
    return _save(graph, path)


def estimator_graph(path: Path, groups, scores) -> Path:
    """dw-ll_ucoco_384.onnx's interface: keypoint k at the dot of colour ``groups[k]`` with score
    ``scores[k]``."""
    from onnx import TensorProto, helper, numpy_helper

    groups, scores = list(groups), list(scores)
    assert len(groups) == len(scores) == KEYPOINTS
    weights = np.array([[1.0 if c else -1.0 for c in PALETTE[g]] for g in groups], np.float32)  # (133, 3)
    inits = [numpy_helper.from_array(weights, "weights"),
             numpy_helper.from_array(np.array(scores, np.float32)[:, None], "scores"),
             numpy_helper.from_array(np.array([1e-6], np.float32), "eps")]
    nodes = []
    for axis, name, length in ((2, "x", 288), (3, "y", 384)):
        bins = np.zeros((length, 2 * length), np.float32)
        bins[np.arange(length), 2 * np.arange(length)] = 1.0  # input pixel i -> SimCC bin 2i
        inits += [numpy_helper.from_array(bins, f"bins_{name}"),
                  numpy_helper.from_array(np.array([axis], np.int64), f"axis_{name}"),
                  numpy_helper.from_array(np.array([0, 3, length], np.int64), f"shape_{name}")]
        nodes += [
            helper.make_node("ReduceSum", ["input", f"axis_{name}"], [f"sum_{name}"], keepdims=1),
            helper.make_node("Reshape", [f"sum_{name}", f"shape_{name}"], [f"profile_{name}"]),
            helper.make_node("MatMul", ["weights", f"profile_{name}"], [f"mixed_{name}"]),  # (N, 133, L)
            helper.make_node("ReduceMin", [f"mixed_{name}"], [f"low_{name}"], axes=[-1], keepdims=1),
            helper.make_node("Sub", [f"mixed_{name}", f"low_{name}"], [f"above_{name}"]),
            helper.make_node("ReduceMax", [f"above_{name}"], [f"high_{name}"], axes=[-1], keepdims=1),
            helper.make_node("Add", [f"high_{name}", "eps"], [f"norm_{name}"]),
            helper.make_node("Div", [f"above_{name}", f"norm_{name}"], [f"unit_{name}"]),
            helper.make_node("Mul", [f"unit_{name}", "scores"], [f"scored_{name}"]),
            helper.make_node("MatMul", [f"scored_{name}", f"bins_{name}"], [f"simcc_{name}"]),
        ]
    graph = helper.make_graph(
        nodes, "rtmpose_stand_in",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 384, 288])],
        [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, ["N", KEYPOINTS, 576]),
         helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, ["N", KEYPOINTS, 768])], inits)
    return _save(graph, path)


def dots(height: int, width: int, positions, radius: int) -> np.ndarray:
    """A black RGB image with a disc of colour ``PALETTE[g]`` at each ``positions[g]`` (pixel x, y)."""
    import cv2

    image = np.zeros((height, width, 3), np.uint8)
    for g, (x, y) in positions.items():
        cv2.circle(image, (int(round(x)), int(round(y))), radius, PALETTE[g], thickness=-1)
    return image


# A person of seven dots (fractions of the image): the COCO-WholeBody keypoints on them, the others scored low
NOSE, LEFT_EYE, RIGHT_EYE, FACE, LEFT_SHOULDER, RIGHT_SHOULDER, LEFT_HAND = range(7)
LAYOUT = {RIGHT_EYE: (0.40, 0.08), LEFT_EYE: (0.58, 0.16), NOSE: (0.49, 0.26), FACE: (0.30, 0.36),
          LEFT_SHOULDER: (0.70, 0.48), RIGHT_SHOULDER: (0.20, 0.58), LEFT_HAND: (0.82, 0.74)}
PERSON_BOX = (0.10, 0.02, 0.90, 0.85)  # x1, y1, x2, y2, fractions of the image


def person(shoulder: float = 0.8, face: float = 0.9, low: float = 0.1) -> tuple[list[int], list[float]]:
    """``(groups, scores)`` of the seven-dot person: nose, eyes, shoulders (score ``shoulder``), the 68 face
    points on the face dot (score ``face``), the left hand on its dot; every other keypoint (arms, legs, ears,
    feet, right hand) scored ``low``."""
    groups, scores = [NOSE] * KEYPOINTS, [low] * KEYPOINTS
    for k, g, s in ((0, NOSE, 0.9), (1, LEFT_EYE, 0.9), (2, RIGHT_EYE, 0.9), (5, LEFT_SHOULDER, shoulder),
                    (6, RIGHT_SHOULDER, shoulder)):
        groups[k], scores[k] = g, s
    for k in range(23, 91):
        groups[k], scores[k] = FACE, face
    for k in range(91, 112):
        groups[k], scores[k] = LEFT_HAND, 0.9
    return groups, scores
