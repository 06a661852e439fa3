"""OpenPose JSON -> the pose map sd-webui-controlnet draws (``/controlnet/render_openpose_json``).

The JSON is OpenPose's output format as the extension reads it: ``{"people": [{"pose_keypoints_2d": [x, y, c,
...], "hand_left_keypoints_2d": ..., "hand_right_keypoints_2d": ..., "face_keypoints_2d": ...}],
"canvas_width": W, "canvas_height": H}``. A keypoint whose confidence ``c`` is below 1 is absent. Coordinates
are pixels, or fractions of the canvas when every keypoint of a part lies in [0, 1]. The drawing follows the
extension's (the body's 17 limbs as ellipses at 60% colour and 18 joints, hands as 20 HSV-coloured edges with
red joints, the face as white dots), written here with OpenCV.
"""

from __future__ import annotations

import colorsys
import math
from typing import Any

import numpy as np

from core.errors import InvalidRequest
from core.lazy import require

MAX_CANVAS_SIDE = 4096
MAX_COORDINATE = 100_000  # |x|, |y| in pixels (or fractions): beyond it OpenCV's int32 drawing overflows
EPS = 0.01  # the extension draws hand and face points only beyond this many pixels from the top-left corner

_LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
          (2, 1), (1, 15), (15, 17), (1, 16), (16, 18))
_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
_HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
               (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
_PARTS = ("pose_keypoints_2d", "hand_left_keypoints_2d", "hand_right_keypoints_2d", "face_keypoints_2d")

Keypoints = list  # of (x, y) tuples or None


def _keypoints(value: Any, field: str, count: int | None) -> Keypoints | None:
    """A flat [x, y, c, ...] list -> keypoints (None where c < 1); null or [] -> None."""
    if value is None or (isinstance(value, list) and not value):
        return None
    if not isinstance(value, list) or len(value) % 3 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        raise InvalidRequest(field, "must be a flat list of x, y, confidence numbers", "[x, y, c, ...] or null")
    for i, v in enumerate(value):
        if i % 3 != 2 and abs(v) > MAX_COORDINATE:
            raise InvalidRequest(f"{field}[{i}]", f"is {v:.6g}, off any canvas",
                                 f"a coordinate from -{MAX_COORDINATE} to {MAX_COORDINATE}")
    points = [None if c < 1.0 else (float(x), float(y)) for x, y, c in zip(value[0::3], value[1::3], value[2::3])]
    if count is not None and len(points) < count:
        raise InvalidRequest(field, f"has {len(points)} keypoints", f"at least {count} keypoints (x, y, c each)")
    return points


def parse_pose(pose: Any, field: str = "pose_data[0]") -> tuple[int, int, list[dict[str, Keypoints | None]]]:
    """``(height, width, people)`` of one pose JSON; an InvalidRequest names the field that is wrong."""
    if not isinstance(pose, dict):
        raise InvalidRequest(field, "must be an object", '{"people": [...], "canvas_width": W, "canvas_height": H}')
    sides = []
    for name in ("canvas_height", "canvas_width"):
        value = pose.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CANVAS_SIDE:
            raise InvalidRequest(f"{field}.{name}", "is required: the canvas size in pixels",
                                 f"an integer from 1 to {MAX_CANVAS_SIDE}")
        sides.append(value)
    people = pose.get("people")
    if not isinstance(people, list):
        raise InvalidRequest(f"{field}.people", "is required: a list of people", "a list of OpenPose people")
    parsed = []
    for i, person in enumerate(people):
        where = f"{field}.people[{i}]"
        if not isinstance(person, dict) or "pose_keypoints_2d" not in person:
            raise InvalidRequest(where, "must be an object with pose_keypoints_2d", "an OpenPose person")
        parsed.append({part: _keypoints(person.get(part), f"{where}.{part}",
                                        18 if part == "pose_keypoints_2d" else None) for part in _PARTS})
    return sides[0], sides[1], parsed


def _scale(points: Keypoints, canvas: np.ndarray) -> tuple[float, float]:
    """(H, W) to multiply the keypoints by: the canvas size when every keypoint is a fraction, else 1."""
    present = [p for p in points if p is not None]
    if present and all(abs(x) <= 1 and abs(y) <= 1 for x, y in present):
        return float(canvas.shape[0]), float(canvas.shape[1])
    return 1.0, 1.0


def _body(cv2, canvas: np.ndarray, points: Keypoints) -> None:
    h, w = _scale(points, canvas)
    for (a, b), color in zip(_LIMBS, _COLORS):
        p, q = points[a - 1], points[b - 1]
        if p is None or q is None:
            continue
        ys = np.array([p[0], q[0]]) * w
        xs = np.array([p[1], q[1]]) * h
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(ys)), int(np.mean(xs))), (int(length / 2), 4), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in color])
    for point, color in zip(points, _COLORS):
        if point is not None:
            cv2.circle(canvas, (int(point[0] * w), int(point[1] * h)), 4, color, thickness=-1)


def _hand(cv2, canvas: np.ndarray, points: Keypoints | None) -> None:
    if not points:
        return
    h, w = _scale(points, canvas)
    for i, (a, b) in enumerate(_HAND_EDGES):
        if a >= len(points) or b >= len(points) or points[a] is None or points[b] is None:
            continue
        x1, y1 = int(points[a][0] * w), int(points[a][1] * h)
        x2, y2 = int(points[b][0] * w), int(points[b][1] * h)
        if min(x1, y1, x2, y2) > EPS:
            color = [c * 255 for c in colorsys.hsv_to_rgb(i / float(len(_HAND_EDGES)), 1.0, 1.0)]
            cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=2)
    for point in points:
        if point is not None:
            x, y = int(point[0] * w), int(point[1] * h)
            if x > EPS and y > EPS:
                cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)


def _face(cv2, canvas: np.ndarray, points: Keypoints | None) -> None:
    if not points:
        return
    h, w = _scale(points, canvas)
    for point in points:
        if point is not None:
            x, y = int(point[0] * w), int(point[1] * h)
            if x > EPS and y > EPS:
                cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)


def draw_people(people: list[dict[str, Keypoints | None]], height: int, width: int) -> np.ndarray:
    """People (each ``{part: keypoints or None}``, the parts of the JSON: ``pose_keypoints_2d`` (18),
    ``hand_left_keypoints_2d``, ``hand_right_keypoints_2d`` (21 each), ``face_keypoints_2d``; a keypoint is
    ``(x, y)`` or None when absent) drawn on a black ``height`` x ``width`` canvas as the extension draws them:
    each person's body, left hand, right hand, then face. RGB uint8 (H, W, 3). Used by
    ``/controlnet/render_openpose_json`` and by the DWPose preprocessor (engine.controlnet.dwpose)."""
    cv2 = require("cv2", "controlnet", "drawing OpenPose maps")
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for person in people:
        if person.get("pose_keypoints_2d"):
            _body(cv2, canvas, person["pose_keypoints_2d"])
        _hand(cv2, canvas, person.get("hand_left_keypoints_2d"))
        _hand(cv2, canvas, person.get("hand_right_keypoints_2d"))
        _face(cv2, canvas, person.get("face_keypoints_2d"))
    return canvas


def pose_json(people: list[dict[str, Keypoints | None]], height: int, width: int) -> dict[str, Any]:
    """People (as :func:`draw_people` takes them) as the pose JSON the extension's ``/controlnet/detect`` returns
    for its openpose modules (annotator/openpose ``encode_poses_as_json``): per person the four parts as flat
    ``[x, y, 1.0, ...]`` lists, an absent keypoint ``[0.0, 0.0, 0.0]``, an absent part null; ``animals`` empty;
    the canvas is the image the detector ran on. Coordinates are passed as they are: the openpose modules'
    fractions of the canvas, DWPose's pixels (as the extension's; :func:`parse_pose` reads both)."""

    def flat(points: Keypoints | None) -> list[float] | None:
        if not points:
            return None
        return [v for point in points
                for v in ((float(point[0]), float(point[1]), 1.0) if point is not None else (0.0, 0.0, 0.0))]

    return {"people": [{"pose_keypoints_2d": flat(person.get("pose_keypoints_2d")),
                        "face_keypoints_2d": flat(person.get("face_keypoints_2d")),
                        "hand_left_keypoints_2d": flat(person.get("hand_left_keypoints_2d")),
                        "hand_right_keypoints_2d": flat(person.get("hand_right_keypoints_2d"))} for person in people],
            "animals": [], "canvas_height": int(height), "canvas_width": int(width)}


def render_pose(pose: Any, field: str = "pose_data[0]") -> np.ndarray:
    """One pose JSON drawn on a black canvas of its size: RGB uint8 (H, W, 3)."""
    height, width, people = parse_pose(pose, field)
    return draw_people(people, height, width)
