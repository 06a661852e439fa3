"""sd-webui-controlnet's tile_colorfix / tile_colorfix+sharp (engine.controlnet.colorfix).

Reference: the extension's own post-processing (scripts/hook.py, "Post-processing for color fix"), transcribed below
line by line in its names (ldm's predict_start_from_noise / predict_noise_from_start over ``alphas_cumprod``, its
``blur``); tolerance 1e-12 (float64, the same operations). Then the fix in a generation: the demo model's image takes
the hint's colours (tests/test_demo_model.py has the trained demo model and ControlNet).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.controlnet.colorfix import ColorFix, colorfix  # noqa: E402
from engine.controlnet.preprocessors import get_preprocessor  # noqa: E402
from engine.controlnet.units import PreparedUnit  # noqa: E402


def _extension(xt, h, timesteps, x0_origin, alphas_cumprod, k, weight, name, threshold_b, cond_mark):
    """The extension's code (hook.py), with ldm's two helpers written out over alphas_cumprod."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / ac)
    sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / ac - 1)

    def extract(a, t, shape):
        return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(shape) - 1)))

    def predict_start_from_noise(x_t, t, noise):
        return (extract(sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def predict_noise_from_start(x_t, t, x0):
        return ((extract(sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0)
                / extract(sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def blur(x, k):
        y = torch.nn.functional.pad(x, (k, k, k, k), mode="replicate")
        return torch.nn.functional.avg_pool2d(y, (k * 2 + 1, k * 2 + 1), stride=(1, 1))

    t = torch.round(timesteps.float()).long()
    x0_prd = predict_start_from_noise(xt, t, h)
    x0 = x0_prd - blur(x0_prd, k) + blur(x0_origin, k)
    if "+sharp" in name:
        detail_weight = float(threshold_b) * 0.01
        neg = detail_weight * blur(x0, k) + (1 - detail_weight) * x0
        x0 = cond_mark * x0 + (1 - cond_mark) * neg
    eps_prd = predict_noise_from_start(xt, t, x0)
    w = max(0.0, min(1.0, float(weight)))
    return eps_prd * w + h * (1 - w)


def _case(rows=4, size=(12, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    xt = torch.randn(rows, 4, *size, generator=g, dtype=torch.float64)
    eps = torch.randn(rows, 4, *size, generator=g, dtype=torch.float64)
    latent = torch.randn(1, 4, *size, generator=g, dtype=torch.float64) * 2
    t = torch.tensor([637.4, 637.4, 12.6, 999.0][:rows], dtype=torch.float64)
    return xt, eps, latent, t




def _alphas():
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2  # SD's scaled_linear
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("name, k, weight, sharp", [("tile_colorfix", 8, 1.0, None), ("tile_colorfix", 3, 0.4, None),
                                                    ("tile_colorfix", 16, 1.7, None),
                                                    ("tile_colorfix+sharp", 8, 1.0, 1.0),
                                                    ("tile_colorfix+sharp", 5, 0.6, 2.0)])
def test_colorfix_is_the_extensions_post_processing(name, k, weight, sharp):
    xt, eps, latent, t = _case()
    mark = np.array([1.0, 0.0, 1.0, 0.0])
    ours = colorfix(xt, eps, t, latent, _alphas(), k, weight, sharp, mark)
    ref = _extension(xt, eps, t, latent.expand_as(xt), _alphas(), k, weight, name, sharp,
                     torch.as_tensor(mark).reshape(-1, 1, 1, 1))
    assert float((ours - ref).abs().max()) <= 1e-12
    assert float((ours - eps).abs().max()) > 0.1  # it does change the output


def test_weight_zero_and_sharp_rows():
    xt, eps, latent, t = _case()
    assert torch.equal(colorfix(xt, eps, t, latent, _alphas(), 8, 0.0), eps)
    mark = np.array([1.0, 0.0, 1.0, 0.0])
    plain = colorfix(xt, eps, t, latent, _alphas(), 8, 1.0)
    sharp = colorfix(xt, eps, t, latent, _alphas(), 8, 1.0, 1.5, mark)
    assert torch.allclose(sharp[[0, 2]], plain[[0, 2]], rtol=0, atol=1e-12)  # positive rows: plain x0
    assert float((sharp[[1, 3]] - plain[[1, 3]]).abs().max()) > 1e-3  # negative rows: the blurred mix


def test_colorfix_object_runs_each_unit_on_numpy_outputs_and_doubles_k_in_hires():
    xt, eps, latent, t = _case()
    image = np.zeros((1, 3, 96, 80), dtype=np.float32)
    units = [PreparedUnit(model="m", image=image, module="tile_colorfix", weight=1.0, threshold_a=4.0),
             PreparedUnit(model="m", image=image, module="canny"),
             PreparedUnit(model="m", image=image, module="tile_colorfix+sharp", weight=0.5, threshold_a=6.0,
                          threshold_b=2.0)]
    mark = np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32)
    for hires, scale in ((False, 1), (True, 2)):
        fix = ColorFix(units, _alphas(), lambda pixels: latent.numpy(), hires=hires)
        out = fix.apply(xt.numpy().astype(np.float32), t.numpy().astype(np.float32), eps.numpy().astype(np.float32),
                        mark)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        x32 = torch.as_tensor(xt.numpy().astype(np.float32), dtype=torch.float64)
        e32 = torch.as_tensor(eps.numpy().astype(np.float32), dtype=torch.float64)
        t32 = torch.as_tensor(t.numpy().astype(np.float32), dtype=torch.float64)
        step = colorfix(x32, e32, t32, latent, _alphas(), 4 * scale, 1.0)
        step = colorfix(x32, step, t32, latent, _alphas(), 6 * scale, 0.5, 2.0, mark)
        assert np.abs(out - step.numpy()).max() <= 1e-5


def test_sliders_as_the_extension():
    from api_compat.webui.controlnet import modules

    detail = modules(False)["module_detail"]
    assert detail["tile_colorfix"] == {"model_free": False, "sliders": [
        {"name": "Variation", "value": 8.0, "min": 3.0, "max": 32.0, "step": 1.0}]}
    assert detail["tile_colorfix+sharp"] == {"model_free": False, "sliders": [
        {"name": "Variation", "value": 8.0, "min": 3.0, "max": 32.0, "step": 1.0},
        {"name": "Sharpness", "value": 1.0, "min": 0.0, "max": 2.0, "step": 0.01}]}
    image = np.full((20, 30, 3), 77, np.uint8)
    assert np.array_equal(get_preprocessor("tile_colorfix")(image), image)  # the image itself
