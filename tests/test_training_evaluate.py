"""The automatic evaluator: ~100% on the generator's own images, ~chance on shuffled captions."""

import numpy as np
import pytest

pytest.importorskip("cv2")

from training import evaluate as E  # noqa: E402
from training import scenes as S  # noqa: E402


def test_evaluator_scores_ground_truth():
    acc = E.ground_truth_accuracy(n=400, seed=11)
    assert acc["all"] >= 0.99, acc


def test_evaluator_is_near_chance_on_shuffled_captions():
    acc = E.ground_truth_accuracy(n=400, seed=11, shuffled=True)
    assert acc["all"] < 0.05, acc
    # per attribute: chance level is 1/k for k values (shuffling keeps the marginals)
    assert acc["shape"] < 0.45 and acc["position"] < 0.3 and acc["colour"] < 0.3, acc


def test_blank_and_wrong_images_fail():
    scene = S.Scene(1, "large", "red", "circle", "middle", "black")
    blank = np.full((64, 64, 3), S.BACKGROUNDS["black"], np.uint8)
    det = E.analyse(blank)
    assert det.count == 0 and not E.score(scene, det)["all"]
    other = S.render(S.Scene(1, "large", "red", "square", "middle", "black"), 0)
    sc = E.score(scene, E.analyse(other))
    assert not sc["shape"] and sc["colour"] and sc["position"] and not sc["all"]


def test_edge_iou():
    a = np.zeros((64, 64), np.uint8)
    a[10, 10:30] = 255
    b = np.roll(a, 1, axis=0)
    assert E.edge_iou(a, a) == 1.0
    assert E.edge_iou(a, b) == 0.0
    assert E.edge_iou(a, b, tolerance=1) == 1.0
    assert E.edge_iou(a, np.zeros_like(a), tolerance=1) == 0.0


def test_ddim_timesteps_match_diffusers_leading_spacing():
    """Reference: diffusers DDIMScheduler(steps_offset=1, timestep_spacing="leading").set_timesteps(20)."""
    assert E.ddim_timesteps(20) == list(range(951, 0, -50))
