"""The captioned scene generator: deterministic, and the captions describe what is drawn."""

import random

import numpy as np
import pytest

pytest.importorskip("cv2")

from training import scenes as S  # noqa: E402


def test_combinations_and_heldout_split_are_fixed():
    allsc = S.all_scenes()
    assert len(allsc) == len(set(allsc)) == 4 * 19 * 3 * 5  # (2 sizes + 2 counts) x colour/bg x shape x pos
    assert all(S.COLOURS[s.colour] != S.BACKGROUNDS[s.background] for s in allsc)
    train, held = S.split()
    assert len(held) == 100 and not set(train) & set(held) and len(train) + len(held) == len(allsc)
    assert S.split() == (train, held)


def test_caption_wording():
    assert S.Scene(1, "large", "red", "circle", "middle", "blue").caption == \
        "a large red circle in the middle on a blue background"
    assert S.Scene(2, "group", "green", "square", "top", "black").caption == \
        "two green squares at the top on a black background"
    assert S.Scene(2, "group", "green", "square", "top", "black").caption_without_position == \
        "two green squares on a black background"
    assert S.Scene(1, "small", "blue", "triangle", "left", "white").caption_without_position == \
        "a small blue triangle on a white background"


def test_every_object_spans_two_latent_pixels_and_stays_in_the_frame():
    """Single objects are >= 16 px (2 latent pixels of the x8 VAE), group members >= 12.6 px, and nothing
    leaves the 64x64 frame by more than the position jitter (large objects at the sides touch the edge)."""
    import random

    assert S.EXTENT["small"] * 0.9 >= 16 and S.EXTENT["group"] * 0.9 >= 12.5
    for scene in S.all_scenes():
        half = S.EXTENT[scene.size] * 1.1 / 2
        for cx, cy in S.object_centres(scene, random.Random(0)):
            slack = S.JITTER + (0 if scene.size == "large" else 0.5)
            assert -slack - 1 <= cx - half and cx + half <= S.SIZE + slack + 1, scene


def test_render_is_deterministic_and_seeded():
    sc = S.Scene(3, "group", "yellow", "triangle", "left", "gray")
    a, b, c = S.render(sc, 5), S.render(sc, 5), S.render(sc, 6)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # jitter differs
    s1, i1 = S.sample_batch(S.all_scenes(), 8, 3)
    s2, i2 = S.sample_batch(S.all_scenes(), 8, 3)
    assert s1 == s2 and np.array_equal(i1, i2)


@pytest.mark.parametrize("seed", range(40))
def test_drawn_pixels_match_caption(seed):
    """Independent of the evaluator: object centres have the caption's colour, corners the background's,
    and the number of blobs of that colour equals the caption's count."""
    import cv2

    rng = random.Random(seed)
    scene = rng.choice(S.all_scenes())
    img = S.render(scene, seed)
    r = random.Random(seed)
    r.uniform(0.9, 1.1)  # the extent draw precedes the centres in render()
    for cx, cy in S.object_centres(scene, r):
        assert tuple(img[int(cy), int(cx)]) == S.COLOURS[scene.colour], scene.caption
    for y, x in ((0, 0), (0, 63), (63, 0), (63, 63)):
        assert tuple(img[y, x]) == S.BACKGROUNDS[scene.background], scene.caption
    exact = np.all(img == np.array(S.COLOURS[scene.colour], np.uint8), axis=2).astype(np.uint8)
    assert cv2.connectedComponents(exact, connectivity=8)[0] - 1 == scene.count, scene.caption


def test_canny_finds_object_outlines():
    img = S.render(S.Scene(1, "large", "red", "square", "middle", "black"), 0)
    edges = S.canny(img)
    assert set(np.unique(edges)) == {0, 255}
    assert edges[:5].sum() == 0 and edges[29:35, 29:35].sum() == 0  # none on the plain bg or inside
    assert edges.sum() / 255 > 4 * 20  # the square's outline
