"""dw_openpose_full (engine.controlnet.dwpose): DWPose's two ONNX files as sd-webui-controlnet runs them.

The real files cannot be fetched here; the tests run small graphs with the real files' inputs and outputs
(tests/dwpose_support.py): a detector answering chosen boxes, and an estimator that puts each keypoint on a
coloured dot of the image with a chosen score. So the boxes must decode to where they were placed in the
image (through the 640x640 letterbox), the keypoints must land on the dots (through the crop, the RGB
normalisation and the inverse mapping) at several image sizes, aspect ratios and processor_res values, and
the drawn map must show the extension's joint colours there; low scores are dropped as the extension drops them.
"""

from __future__ import annotations


import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("onnx")

from core.errors import InvalidRequest  # noqa: E402
from engine.controlnet import annotators, dwpose  # noqa: E402
from engine.controlnet.preprocessors import PREPROCESSORS, get_preprocessor  # noqa: E402
from tests import dwpose_support as ds  # noqa: E402

PERSON = 0
CAR = 2


def _scaled(box, w, h):
    return (box[0] * w, box[1] * h, box[2] * w, box[3] * h)


def _letterbox_scale(h, w):
    """The scale of an h x w image in YOLOX's 640x640 input (the longer side fills it)."""
    return 640 / max(h, w)


def _files(folder, detections, groups_scores=None):
    """The two files under ``folder/openpose`` (the extension's layout)."""
    det = ds.detector_graph(folder / "openpose" / "yolox_l.onnx", detections)
    est = ds.estimator_graph(folder / "openpose" / "dw-ll_ucoco_384.onnx", *(groups_scores or ds.person()))
    return det, est


def _expected(h, w):
    """The dots' pixel positions in an h x w image of the seven-dot person."""
    return {g: (round(x * w), round(y * h)) for g, (x, y) in ds.LAYOUT.items()}


def _person_detection(h, w, score=0.95, stride=32):
    r = _letterbox_scale(h, w)
    return (tuple(v * r for v in _scaled(ds.PERSON_BOX, w, h)), score, PERSON, score, stride)


# ------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("h, w", [(480, 640), (100, 37), (640, 640), (333, 1000)])
def test_boxes_decode_to_the_image_through_the_letterbox(tmp_path, h, w):
    """Boxes placed in the image and written into the detector's raw output (via the 640x640 letterbox) come
    back where they were (float32: 1e-3 px relative); a weaker person box overlapping a stronger one above IoU
    0.45 is suppressed, a person scoring 0.3 or less (objectness x class) is dropped, another class is not a
    person; the people come best first."""
    r = _letterbox_scale(h, w)
    a = (0.10 * w, 0.10 * h, 0.50 * w, 0.90 * h)  # the strongest person
    b = (0.12 * w, 0.12 * h, 0.52 * w, 0.88 * h)  # overlaps a (IoU ~0.85), weaker: suppressed
    c = (0.60 * w, 0.30 * h, 0.95 * w, 0.95 * h)  # another person, kept (0.8 * 0.9 = 0.72)
    d = (0.55 * w, 0.05 * h, 0.70 * w, 0.25 * h)  # a person scoring 0.6 * 0.45 = 0.27: dropped
    e = (0.05 * w, 0.50 * h, 0.45 * w, 0.95 * h)  # a car, strong
    detections = [(tuple(v * r for v in a), 0.95, PERSON, 0.95, 8), (tuple(v * r for v in b), 0.9, PERSON, 0.9, 16),
                  (tuple(v * r for v in c), 0.8, PERSON, 0.9, 32), (tuple(v * r for v in d), 0.6, PERSON, 0.45, 16),
                  (tuple(v * r for v in e), 0.99, CAR, 0.99, 8)]
    det, est = _files(tmp_path, detections)
    model = dwpose.DWPose.from_files(det, est)
    image = np.zeros((h, w, 3), np.uint8)
    boxes = model.boxes(image)
    assert boxes.shape == (2, 4)
    np.testing.assert_allclose(boxes, [a, c], rtol=1e-3, atol=1e-3)


def test_letterbox_is_the_detectors_input():
    """The image scaled by min(640/h, 640/w) (bilinear), top-left on a ground of 114, RGB channels first,
    0..255 (not normalised)."""
    import cv2

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 400, 3), dtype=np.uint8)
    x, ratio = dwpose.letterbox(image)
    assert x.shape == (1, 3, 640, 640) and x.dtype == np.float32 and ratio == 640 / 400
    scaled = cv2.resize(image, (640, 240), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(x[0, :, :240, :].transpose(1, 2, 0), scaled)
    assert (x[0, :, 240:, :] == 114).all()


def test_nothing_found_gives_no_people_and_other_things_the_whole_image(tmp_path):
    """No box of any class above 0.1: no people, a black map. Only another class: the extension takes the whole
    image as one person's box, so the dots are still found."""
    h, w = 120, 160
    image = ds.dots(h, w, _expected(h, w), 3)
    det, est = _files(tmp_path / "none", [(_scaled(ds.PERSON_BOX, 640, 480), 0.3, PERSON, 0.3, 32)])
    model = dwpose.DWPose.from_files(det, est)  # 0.3 * 0.3 = 0.09: nothing above 0.1
    assert model.boxes(image) is None and model.detect(image) == []
    assert not model(image).any()
    r = _letterbox_scale(h, w)
    det, est = _files(tmp_path / "car", [(tuple(v * r for v in _scaled((0.1, 0.1, 0.3, 0.3), w, h)), 0.9, CAR,
                                          0.9, 16)])
    model = dwpose.DWPose.from_files(det, est)
    assert model.boxes(image).shape == (0, 4)
    people = model.detect(image)
    assert len(people) == 1
    nose = people[0]["pose_keypoints_2d"][0]
    x, y = _expected(h, w)[ds.NOSE]
    size = dwpose.box_frame((0, 0, w, h))[1]
    assert abs(nose[0] - x) <= 1 + size[0] / 288 and abs(nose[1] - y) <= 1 + size[1] / 384


# ------------------------------------------------------------------------------------------------ pose


@pytest.mark.parametrize("h, w, radius", [(256, 192, 4), (300, 500, 5), (97, 411, 2), (640, 640, 8)])
def test_keypoints_land_on_the_dots(tmp_path, h, w, radius):
    """Each kept keypoint decodes onto its dot (within a pixel plus one input pixel of the pose network in the
    image's pixels); OpenPose's layout: the neck between the shoulders, the 68 face points and the two eyes,
    the left hand; keypoints below 0.3 are absent (arms, legs, ears, the right hand)."""
    det, est = _files(tmp_path, [_person_detection(h, w)])
    model = dwpose.DWPose.from_files(det, est)
    at = _expected(h, w)
    [person] = model.detect(ds.dots(h, w, at, radius))
    centre, size = dwpose.box_frame(_scaled(ds.PERSON_BOX, w, h))
    tol = 1 + size[0] / 288  # one pose-input pixel, in image pixels (the aspect is the input's, 3:4)

    def near(point, group):
        assert point is not None, group
        assert abs(point[0] - at[group][0]) <= tol and abs(point[1] - at[group][1]) <= tol, (point, at[group], tol)

    body = person["pose_keypoints_2d"]
    assert len(body) == 18
    near(body[0], ds.NOSE)
    near(body[2], ds.RIGHT_SHOULDER)
    near(body[5], ds.LEFT_SHOULDER)
    near(body[14], ds.RIGHT_EYE)
    near(body[15], ds.LEFT_EYE)
    neck = body[1]
    assert neck == pytest.approx(tuple(np.mean([body[2], body[5]], axis=0)))
    assert [i for i, p in enumerate(body) if p is None] == [3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17]
    face = person["face_keypoints_2d"]
    assert len(face) == 70 and face[68:] == [body[14], body[15]]
    for p in face[:68]:
        near(p, ds.FACE)
    assert len(person["hand_left_keypoints_2d"]) == 21
    for p in person["hand_left_keypoints_2d"]:
        near(p, ds.LEFT_HAND)
    assert person["hand_right_keypoints_2d"] is None


def test_low_scores_are_dropped_as_the_extension_drops_them(tmp_path):
    """Shoulders at 0.25: absent, and so is the neck; at 0.31 both present (the neck needs both shoulders above
    0.3). A face whose points all score below 0.3 is absent (and the eyes are not appended)."""
    h, w = 200, 160
    image = ds.dots(h, w, _expected(h, w), 3)
    for shoulder, present in ((0.25, False), (0.31, True)):
        det, est = _files(tmp_path / str(shoulder), [_person_detection(h, w)], ds.person(shoulder=shoulder,
                                                                                           face=0.2))
        [person] = dwpose.DWPose.from_files(det, est).detect(image)
        body = person["pose_keypoints_2d"]
        assert (body[1] is not None, body[2] is not None, body[5] is not None) == (present,) * 3
        assert person["face_keypoints_2d"] is None and body[0] is not None


def test_decode_simcc_against_hand_computed_values():
    """One keypoint's SimCC maxima at bins (100, 300) of a region centred at (50, 80) of size 144 x 192: input
    pixel (50, 150) -> 50/288 * 144 + 50 - 72 = 3.0, 150/384 * 192 + 80 - 96 = 59.0; the score is the smaller
    maximum; a non-positive score puts the keypoint at bin -1."""
    sx, sy = np.zeros((1, 2, 576), np.float32), np.zeros((1, 2, 768), np.float32)
    sx[0, 0, 100], sy[0, 0, 300] = 0.8, 0.6
    points, scores = dwpose.decode_simcc(sx, sy, np.array([50.0, 80.0]), np.array([144.0, 192.0]))
    assert points[0] == pytest.approx((3.0, 59.0)) and scores[0] == pytest.approx(0.6)
    assert scores[1] == 0 and points[1] == pytest.approx((-0.5 / 288 * 144 - 22, -0.5 / 384 * 192 - 16))


# -------------------------------------------------------------------------------------- the preprocessor


@pytest.mark.parametrize("h, w, res", [(192, 256, 256), (192, 256, 128), (300, 200, 512), (90, 250, 64)])
def test_the_map_through_the_preprocessor(tmp_path, annotators_env, h, w, res):
    """dw_openpose_full on an image: resized to processor_res and padded (the map cropped back), people found on
    that; the map shows the extension's drawing at the dots' places: joints in the body colours (nose, neck,
    shoulders), white face dots (the eyes are appended to the face), red hand joints."""
    pre = get_preprocessor("dw_openpose_full")
    (ph, pw), (oh, ow) = pre.sizes(h, w, res)
    r = _letterbox_scale(ph, pw)
    # the padded image holds the resized one at its top-left: the person's box in its pixels, then the letterbox
    box = tuple(v * r for v in _scaled(ds.PERSON_BOX, ow, oh))
    _files(tmp_path, [(box, 0.95, PERSON, 0.95, 32)])
    annotators_env(tmp_path)
    pre.check_available("module")
    at = _expected(h, w)
    out = pre(ds.dots(h, w, at, max(3, min(h, w) // 30)), res)
    assert out.shape == (oh, ow, 3) and out.dtype == np.uint8

    def colours(group=None, point=None):
        """The colours within a pixel of where the resize puts the dot's centre ((x + 0.5) * scale - 0.5;
        the joint is drawn where the keypoint was found, truncated to a pixel: within about 2 px)."""
        x, y = point if point is not None else at[group]
        cx, cy = int(round((x + 0.5) * ow / w - 0.5)), int(round((y + 0.5) * oh / h - 0.5))
        return {tuple(c) for c in out[max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2].reshape(-1, 3)}

    assert (255, 0, 0) in colours(ds.NOSE)
    assert (255, 170, 0) in colours(ds.RIGHT_SHOULDER)
    assert (85, 255, 0) in colours(ds.LEFT_SHOULDER)
    neck = np.mean([at[ds.LEFT_SHOULDER], at[ds.RIGHT_SHOULDER]], axis=0)
    assert (255, 85, 0) in colours(point=neck)
    for group in (ds.FACE, ds.LEFT_EYE, ds.RIGHT_EYE):
        assert (255, 255, 255) in colours(group), group
    assert (0, 0, 255) in colours(ds.LEFT_HAND)
    # nothing else: the right hand and the other body joints are absent (no right elbow colour anywhere)
    assert not (out == (255, 255, 0)).all(axis=2).any()


def test_missing_files_are_refused_naming_file_and_folder(tmp_path, annotators_env, monkeypatch):
    annotators_env()
    monkeypatch.delenv(annotators.ENV_ANNOTATORS_DIR)
    models = tmp_path / "webui" / "models"
    field = "controlnet_units[0].module"
    pre = get_preprocessor("dw_openpose_full")
    with pytest.raises(InvalidRequest) as err:
        pre.check_available(field, models)
    assert err.value.field == field and "'yolox_l.onnx'" in str(err.value)
    assert str(models / "ControlNetPreprocessor" / "openpose") in str(err.value)
    downloads = tmp_path / "webui" / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" / "openpose"
    assert str(downloads) in str(err.value)
    downloads.mkdir(parents=True)
    ds.detector_graph(downloads / "yolox_l.onnx", [])
    with pytest.raises(InvalidRequest, match="dw-ll_ucoco_384.onnx"):
        pre.check_available(field, models)
    forge = models / "ControlNetPreprocessor"  # Forge's folder, flat
    ds.estimator_graph(forge / "dw-ll_ucoco_384.onnx", *ds.person())
    pre.check_available(field, models)
    assert annotators.find_weight(annotators.DWPOSE_ESTIMATOR, models) == forge / "dw-ll_ucoco_384.onnx"


def test_module_detail_as_the_extension():
    """The extension's legacy table: dw_openpose_full has the Resolution slider only (64..2048, 512), the
    OpenPose tag, priority 0; depth_leres++ the sliders of depth_leres."""
    from api_compat.webui.controlnet import control_types, modules

    detail = modules(False)["module_detail"]
    assert detail["dw_openpose_full"] == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]}
    assert detail["depth_leres++"] == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Remove Near %", "value": 0, "min": 0, "max": 100, "step": 0.1},
        {"name": "Remove Background %", "value": 0, "min": 0, "max": 100, "step": 0.1}]}
    types = control_types([])["control_types"]
    assert "dw_openpose_full" in types["OpenPose"]["module_list"]
    assert types["OpenPose"]["default_option"] == "openpose_full"
    assert PREPROCESSORS["dw_openpose_full"].priority == 0 and not PREPROCESSORS["dw_openpose_full"].fn.needs_aux


@pytest.mark.parametrize("h, w, res", [(192, 256, 128), (300, 200, 512)])
def test_pose_json_is_the_people_on_the_map(tmp_path, annotators_env, h, w, res):
    """The pose JSON (the extension's ``poses`` of /controlnet/detect, annotator/openpose encode_poses_as_json):
    the canvas is the padded image DWPose ran on, keypoints in its pixels (as the extension's DWPose gives them)
    as [x, y, 1.0], an absent keypoint [0, 0, 0], an absent part null, the face's 68 points plus the two eyes;
    drawn back by /controlnet/render_openpose_json's renderer and cropped, it is the detected map itself."""
    from engine.controlnet.openpose import render_pose

    pre = get_preprocessor("dw_openpose_full")
    (ph, pw), (oh, ow) = pre.sizes(h, w, res)
    r = _letterbox_scale(ph, pw)
    _files(tmp_path, [(tuple(v * r for v in _scaled(ds.PERSON_BOX, ow, oh)), 0.95, PERSON, 0.95, 32)])
    annotators_env(tmp_path)
    at = _expected(h, w)
    poses = []
    out = pre(ds.dots(h, w, at, max(3, min(h, w) // 30)), res, pose_callback=poses.append)
    [pose] = poses
    assert (pose["canvas_height"], pose["canvas_width"]) == (ph, pw) and pose["animals"] == []
    [person] = pose["people"]
    body = person["pose_keypoints_2d"]
    assert len(body) == 18 * 3 and len(person["face_keypoints_2d"]) == 70 * 3
    assert person["hand_right_keypoints_2d"] is None and len(person["hand_left_keypoints_2d"]) == 21 * 3
    nose = np.array(body[0:3])
    expected = [(at[ds.NOSE][0] + 0.5) * ow / w - 0.5, (at[ds.NOSE][1] + 0.5) * oh / h - 0.5]
    assert nose[2] == 1.0 and np.abs(nose[:2] - expected).max() <= 2.0  # pixels, not fractions
    assert body[3 * 3:3 * 3 + 3] == [0.0, 0.0, 0.0]  # the right elbow: absent
    assert person["face_keypoints_2d"][-6:] == body[14 * 3:16 * 3]  # the eyes appended to the face
    np.testing.assert_array_equal(render_pose(pose)[:oh, :ow], out)
