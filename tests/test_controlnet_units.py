"""ControlNet unit scheduling and control modes (engine/controlnet/units.py).

Reference: sd-webui-controlnet v1.1.4xx scripts/hook.py -- guidance window ``start <= step/steps <= end``,
soft injection scales ``weight * 0.825 ** (12 - i)`` for i in range(13) (SDXL: the first 10), cfg injection
zeroes the residuals of unconditional rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.controlnet.units import (
    ControlMode,
    PreparedUnit,
    active,
    active_units,
    combine_residuals,
    cond_rows_mask,
    controlnet_component,
    controlnet_residuals,
    residual_names,
    residual_scales,
    webui_sampling_step,
)
from core.errors import InvalidRequest

IMG = np.zeros((1, 3, 16, 16), np.float32)


def unit(**kw) -> PreparedUnit:
    kw.setdefault("model", "cn")
    return PreparedUnit(image=IMG, **kw)


def test_guidance_window_table_steps_20():
    """Steps i = 0..19 of 20 run when start <= i/20 <= end (the extension's guidance_schedule_handler)."""
    cases = {
        (0.0, 1.0): list(range(20)),
        (0.0, 0.5): list(range(0, 11)),  # 10/20 = 0.5 is still inside
        (0.5, 1.0): list(range(10, 20)),
        (0.25, 0.75): list(range(5, 16)),
        (0.3, 0.3): [6],
        (0.0, 0.0): [0],
        (0.96, 1.0): [],  # 19/20 = 0.95 < 0.96
        (0.1, 0.19): [2, 3],
    }
    for (start, end), expected in cases.items():
        u = unit(guidance_start=start, guidance_end=end)
        assert [i for i in range(20) if active(u, i, 20)] == expected, (start, end)


def test_webui_sampling_step_lag():
    """The webui's state.sampling_step inside step i is i-1 (0 for step 0): with it, end=0.5 runs steps 0..11."""
    assert [webui_sampling_step(i) for i in range(4)] == [0, 0, 1, 2]
    u = unit(guidance_end=0.5)
    assert [i for i in range(20) if active(u, webui_sampling_step(i), 20)] == list(range(12))


def test_active_units_skips_zero_weight_and_keeps_order():
    a, b, c = unit(model="a"), unit(model="b", weight=0.0), unit(model="c", guidance_start=0.5)
    assert [u.model for u in active_units([a, b, c], 0, 10)] == ["a"]
    assert [u.model for u in active_units([a, b, c], 5, 10)] == ["a", "c"]


def test_control_mode_parse():
    assert ControlMode.parse("Balanced") is ControlMode.BALANCED
    assert ControlMode.parse("My prompt is more important") is ControlMode.PROMPT
    assert ControlMode.parse(2) is ControlMode.CONTROL  # the extension's legacy int
    # names are matched case-insensitively (the API schema uses this parser too)
    assert ControlMode.parse(" balanced") is ControlMode.BALANCED
    with pytest.raises(InvalidRequest) as err:
        ControlMode.parse("balance", "alwayson_scripts.controlnet.units[0].control_mode")
    assert "units[0].control_mode" in str(err.value) and "ControlNet is more important" in str(err.value)


def test_residual_scales_golden():
    """Golden numbers: 0.825 ** (12 - i) * weight (soft injection), weight otherwise."""
    assert residual_scales(unit(weight=0.7), 13) == [0.7] * 13
    prompt = residual_scales(unit(weight=2.0, control_mode="My prompt is more important"), 13)
    golden = [2 * 0.825 ** (12 - i) for i in range(13)]
    assert prompt == golden
    assert prompt[0] == pytest.approx(0.198827924, rel=1e-8)  # 2 * 0.825**12
    assert prompt[11] == pytest.approx(1.65) and prompt[12] == 2.0  # last down 0.825, middle block 1.0
    control = residual_scales(unit(weight=2.0, control_mode=ControlMode.CONTROL), 13)
    assert control == prompt  # same scales, cond rows only
    # SDXL (9 down + mid): the extension truncates the 13 scales to 10 -> the middle block gets 0.825**3
    sdxl = residual_scales(unit(control_mode=ControlMode.PROMPT), 10)
    assert sdxl == [0.825 ** (12 - i) for i in range(10)]
    assert sdxl[-1] == pytest.approx(0.561515625)
    with pytest.raises(ValueError):
        residual_scales(unit(control_mode=ControlMode.PROMPT), 14)


def test_cond_rows_mask_from_step_conditioning_layout():
    # two images, image 0 has two AND-parts (rows 0, 1), image 1 one (row 2); negatives are rows 3, 4
    positive = (((0, 1.0), (1, 0.5)), ((2, 1.0),))
    assert cond_rows_mask(positive, 5).tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_combine_residuals_two_units_cond_only_mask(kind):
    rng = np.random.default_rng(0)
    r1 = [rng.standard_normal((4, 2, 3, 3)).astype(np.float32) for _ in range(3)]
    r2 = [rng.standard_normal((4, 2, 3, 3)).astype(np.float32) for _ in range(3)]
    s1, s2 = [0.5, 1.0, 2.0], [0.1, 0.2, 0.3]
    mask = np.array([1, 0, 1, 0], np.float32)
    expected = [a * x + b * y * mask[:, None, None, None] for a, x, b, y in zip(s1, r1, s2, r2)]
    conv = (lambda a: a) if kind == "numpy" else torch.from_numpy
    got = combine_residuals([[conv(x) for x in r1], [conv(x) for x in r2]], [s1, s2], [None, mask])
    for g, e in zip(got, expected):
        g = g if kind == "numpy" else g.numpy()
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
    # uncond row 1 holds unit 1 only
    np.testing.assert_allclose(np.asarray(got[0])[1], s1[0] * r1[0][1], rtol=1e-6)


def test_residual_names():
    assert residual_names(5) == ["down_residual_0", "down_residual_1", "down_residual_2", "down_residual_3",
                                 "mid_residual"]


class FakeBackend:
    """A ControlNet whose residual i is ``controlnet_cond.mean() * (i + 1) + sample`` per row."""

    def __init__(self, n_down=3):
        self.n_down = n_down
        self.calls = []

    def run(self, component, feeds):
        self.calls.append((component, int(feeds["sample"].shape[0])))
        x, cond = feeds["sample"], feeds["controlnet_cond"]
        per_row = cond.reshape(cond.shape[0], -1).mean(axis=1).reshape(-1, 1, 1, 1)
        out = {f"down_residual_{i}": x + per_row * (i + 1) for i in range(self.n_down)}
        out["mid_residual"] = x + per_row * 10
        return out


def test_controlnet_residuals_modes_window_and_components():
    be = FakeBackend()
    sample = np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1) * np.ones((4, 2, 2, 2), np.float32)
    feeds = {"sample": sample, "timestep": np.full(4, 500.0, np.float32),
             "encoder_hidden_states": np.zeros((4, 77, 8), np.float32)}
    img_a = np.full((1, 3, 16, 16), 0.5, np.float32)
    img_b = np.full((1, 3, 16, 16), 0.25, np.float32)
    a = PreparedUnit("a", img_a, weight=0.5)
    b = PreparedUnit("b", img_b, weight=2.0, control_mode=ControlMode.CONTROL, guidance_end=0.5)
    mask = np.array([1, 1, 0, 0], np.float32)

    assert controlnet_residuals(be.run, [b], 6, 10, feeds, mask) is None  # 0.6 > end
    out = controlnet_residuals(be.run, [a, b], 0, 10, feeds, mask)
    assert list(out) == ["down_residual_0", "down_residual_1", "down_residual_2", "mid_residual"]
    # unit b runs on its 2 conditional rows only, under its own component key
    assert be.calls == [(controlnet_component("a"), 4), (controlnet_component("b"), 2)]
    soft = [2.0 * 0.825 ** (12 - i) for i in range(4)]
    for i, name in enumerate(out):
        k = 10 if name == "mid_residual" else i + 1
        ra = sample + 0.5 * k
        rb = (sample + 0.25 * k) * mask[:, None, None, None]
        np.testing.assert_allclose(out[name], 0.5 * ra + soft[i] * rb, rtol=1e-6)
    # a batch without a negative pass: every row is conditional
    be.calls.clear()
    out2 = controlnet_residuals(be.run, [b], 0, 10, feeds, None)
    assert be.calls == [(controlnet_component("b"), 4)]
    np.testing.assert_allclose(out2["mid_residual"], soft[3] * (sample + 2.5), rtol=1e-6)


def test_controlnet_residuals_torch_feeds():
    be = FakeBackend(n_down=2)
    feeds = {"sample": torch.ones(2, 2, 2, 2), "timestep": torch.tensor([1.0, 1.0])}
    u = PreparedUnit("a", np.full((1, 3, 8, 8), 0.5, np.float32), control_mode=ControlMode.CONTROL)
    out = controlnet_residuals(be.run, [u], 0, 1, feeds, np.array([0.0, 1.0]))
    assert isinstance(out["mid_residual"], torch.Tensor)
    assert torch.all(out["mid_residual"][0] == 0)
    assert torch.allclose(out["mid_residual"][1], torch.full((2, 2, 2), 6.0 * 0.825 ** 10))  # 3 residuals: mid = scale[2]


def test_prepared_unit_validates_image_shape():
    with pytest.raises(ValueError):
        PreparedUnit("a", np.zeros((3, 8, 8), np.float32))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_control_image_rows_built_once_per_request(kind):
    """The control image repeated to the batch rows is built once per (rows, device, dtype) and reused by
    every later model evaluation (no per-step copy); a different row count gets its own array."""
    seen = []

    def run(component, feeds):
        seen.append(feeds["controlnet_cond"])
        return FakeBackend(n_down=1).run(component, feeds)

    def feeds_of(n):
        x = np.zeros((n, 2, 2, 2), np.float32)
        return {"sample": x if kind == "numpy" else torch.from_numpy(x)}

    u = PreparedUnit("a", np.full((1, 3, 8, 8), 0.5, np.float32))
    for step in range(3):
        controlnet_residuals(run, [u], step, 3, feeds_of(4))
    controlnet_residuals(run, [u], 0, 3, feeds_of(2))
    assert seen[0] is seen[1] is seen[2] and seen[3] is not seen[0]
    assert tuple(seen[0].shape) == (4, 3, 8, 8) and tuple(seen[3].shape) == (2, 3, 8, 8)
    assert float(seen[3][1].mean()) == 0.5
