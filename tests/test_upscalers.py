"""Model upscalers (engine.upscalers through spandrel), the extras postprocessing (engine.extras), the SD upscale
grid (engine.sd_upscale) and prompt styles (engine.styles), without a server.

References and tolerances:
* detection and layouts: the file loaded through spandrel's registry equals the architecture module that wrote it
  (same input, same output within 1 uint8 level: the rounding of our uint8 conversion);
* tiling: tiled == untiled (tile 16, overlap 8, on a 32x40 image): the convolutional models (ESRGAN, Compact)
  within 4 uint8 levels max and 0.5 mean (measured: ESRGAN 1 / 0.02); SwinIR (shifted-window attention over the
  whole tile: its receptive field is the tile) within 4 levels mean (measured 3.1);
* the webui's rules: ``Upscaler.upscale``'s passes and sizes, PIL ``Image.blend`` for the second upscaler,
  ``images.combine_grid`` (written here with PIL, as the webui does) for the SD upscale grid: equal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests import upscaler_support as us

torch = pytest.importorskip("torch")

from core.errors import InvalidRequest, NotSupported  # noqa: E402
from engine import upscalers  # noqa: E402
from engine.extras import Extras, html_info, postprocess  # noqa: E402
from engine.sd_upscale import combine_grid, split_grid, tiles_of  # noqa: E402
from engine.styles import apply_styles, load_styles, merge_prompts  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("upscalers")
    us.write_esrgan_old(root / "ESRGAN" / "4x-Tiny.pth")
    us.write_esrgan_new(root / "RealESRGAN" / "RealESRGAN_x4plus.pth")
    us.write_compact(root / "RealESRGAN" / "realesr-general-x4v3.safetensors")
    us.write_swinir(root / "SwinIR" / "SwinIR_2x.pth")
    (root / "ESRGAN" / "notes.txt").write_text("not a model")
    return root


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 10, 3)).astype(np.float32)
    # a smooth picture (upsampled noise), as photos are, 32x40
    return np.asarray(torch.nn.functional.interpolate(torch.from_numpy(base).permute(2, 0, 1)[None], (32, 40),
                                                      mode="bilinear")[0].permute(1, 2, 0).round().clamp(0, 255),
                      dtype=np.uint8)


def test_listing_names_folders_and_scales(models):
    found = upscalers.find_upscalers(models)
    assert [(u.name, u.folder, u.scale) for u in found] == [
        ("4x-Tiny", "ESRGAN", 4), ("R-ESRGAN 4x+", "RealESRGAN", 4), ("R-ESRGAN General 4xV3", "RealESRGAN", 4),
        ("SwinIR_2x", "SwinIR", 2)]
    assert [u.model_name for u in found] == ["ESRGAN_4x", "RealESRGAN_x4plus", "realesr-general-x4v3", "SwinIR 4x"]
    assert upscalers.upscaler_names(models)[:3] == ("None", "Lanczos", "Nearest")


@pytest.mark.parametrize("name,arch,scale", [("4x-Tiny", "ESRGAN", 4), ("R-ESRGAN 4x+", "ESRGAN", 4),
                                             ("R-ESRGAN General 4xV3", "RealESRGAN Compact", 4),
                                             ("SwinIR_2x", "SwinIR", 2)])
def test_detection_and_scale(models, image, name, arch, scale):
    model = upscalers.load(upscalers.find(name, models).path)
    assert (model.architecture, model.scale) == (arch, scale)
    out = model(image, tile=0)
    assert out.shape == (32 * scale, 40 * scale, 3) and out.dtype == np.uint8
    assert out.std() > 1.0  # a picture, not a constant


def test_both_esrgan_layouts_load_the_same_network(models, image):
    """The new (BasicSR, params_ema) layout is the old one renamed: same weights, same output as the module."""
    module = us.esrgan_module()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        want = (module(x)[0].clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()
    for name in ("4x-Tiny", "R-ESRGAN 4x+"):
        got = upscalers.load(upscalers.find(name, models).path)(image, tile=0)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, name


@pytest.mark.parametrize("name,max_diff,mean_diff", [("4x-Tiny", 4, 0.5), ("R-ESRGAN General 4xV3", 4, 0.5),
                                                     ("SwinIR_2x", 255, 4.0)])
def test_tiled_equals_untiled(models, image, name, max_diff, mean_diff):
    model = upscalers.load(upscalers.find(name, models).path)
    whole = model(image, tile=0).astype(int)
    seen = []
    tiled = model(image, tile=16, overlap=8, progress=lambda d, t: seen.append((d, t))).astype(int)
    diff = np.abs(whole - tiled)
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max(), diff.mean())
    assert seen[-1] == (len(seen), len(seen)) and len(seen) == 3 * 4  # 32x40 in 16-px tiles, 8 overlapping


def test_tiles_stop_when_cancelled(models, image):
    import threading

    from core.errors import Cancelled

    cancel = threading.Event()
    model = upscalers.load(upscalers.find("4x-Tiny", models).path)
    with pytest.raises(Cancelled):
        model(image, tile=16, overlap=4, cancel=cancel, progress=lambda d, t: cancel.set())


def test_webui_upscale_passes_and_sizes(models, image):
    how = upscalers.Upscaling(models_dir=models, tile=0)
    # a 2x model asked for 3.3x: two passes (4x), then Lanczos down to (w*3.3)//8*8
    out = upscalers.upscale(image, 3.3, "SwinIR_2x", how)
    assert out.shape == (int(32 * 3.3) // 8 * 8, int(40 * 3.3) // 8 * 8, 3)
    # a 4x model asked for 2x: one pass, Lanczos down
    from PIL import Image

    one = upscalers.load(upscalers.find("4x-Tiny", models).path)(image, tile=0)
    want = np.asarray(Image.fromarray(one).resize((80, 64), Image.Resampling.LANCZOS))
    assert np.array_equal(upscalers.upscale(image, 2, "4x-Tiny", how), want)
    # the PIL upscalers as the webui's Lanczos upscaler: resize by the scale
    lanczos = np.asarray(Image.fromarray(image).resize((80, 64), Image.Resampling.LANCZOS))
    assert np.array_equal(upscalers.upscale(image, 2, "Lanczos", how), lanczos)


def test_unknown_and_missing_upscalers_are_named(models):
    with pytest.raises(InvalidRequest) as exc:
        upscalers.resolve("4x-UltraSharp", models, "upscaler_1")
    assert exc.value.field == "upscaler_1" and "4x-Tiny" in exc.value.allowed and "ESRGAN/" in exc.value.message
    with pytest.raises(InvalidRequest) as exc:
        upscalers.resolve("R-ESRGAN 4x+ Anime6B", models, "hr_upscaler")
    assert "RealESRGAN_x4plus_anime_6B.pth" in exc.value.message and "RealESRGAN/" in exc.value.message
    assert upscalers.resolve("r-esrgan 4x+", models, "x") == "R-ESRGAN 4x+"


def test_a_file_spandrel_does_not_know_names_the_file(tmp_path):
    from core.errors import ModelError

    path = tmp_path / "ESRGAN" / "odd.pth"
    path.parent.mkdir()
    torch.save({"weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelError) as exc:
        upscalers.load(path)
    assert "odd.pth" in str(exc.value)


def test_memory_estimate_is_bounded_by_the_tile():
    small = upscalers.estimate_bytes(1024, 1024, 4, tile=192)
    untiled = upscalers.estimate_bytes(1024, 1024, 4, tile=0)
    assert untiled > 10 * small  # tiles are what keep a 4x upscale of 1024^2 within a budget
    assert small < 2 * 2**30


# ------------------------------------------------------------------------------------------------- extras
def test_extras_resize_modes_and_infotext(models, image):
    how = upscalers.Upscaling(models_dir=models, tile=16)
    out, text = postprocess(image, Extras(upscaling_resize=2, upscaler_1="Lanczos"), how)
    assert out.shape == (64, 80, 3) and text == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    extras = Extras(resize_mode=1, upscaling_resize_w=48, upscaling_resize_h=48, upscaling_crop=True,
                    upscaler_1="4x-Tiny")
    out, text = postprocess(image, extras, how)
    assert out.shape == (48, 48, 3)
    assert text == ("Postprocess upscale to: 48x48, Postprocess crop to: 48x48, Postprocess upscaler: 4x-Tiny")
    out, _ = postprocess(image, Extras(resize_mode=1, upscaling_resize_w=48, upscaling_resize_h=48,
                                       upscaling_crop=False, upscaler_1="Nearest"), how)
    assert out.shape == (int(32 * 1.5) // 8 * 8, int(40 * 1.5) // 8 * 8, 3)  # the larger ratio, not cropped
    assert html_info("a, b\nc<") == "<p>a, b<br>\nc&lt;</p>"


def test_second_upscaler_blends_as_pil(models, image):
    from PIL import Image

    how = upscalers.Upscaling(models_dir=models, tile=0)
    first, _ = postprocess(image, Extras(upscaler_1="Lanczos"), how)
    second, _ = postprocess(image, Extras(upscaler_1="4x-Tiny"), how)
    out, text = postprocess(image, Extras(upscaler_1="Lanczos", upscaler_2="4x-Tiny",
                                          extras_upscaler_2_visibility=0.3), how)
    want = np.asarray(Image.blend(Image.fromarray(first), Image.fromarray(second), 0.3))
    assert np.abs(out.astype(int) - want.astype(int)).max() <= 1  # PIL rounds in fixed point
    assert text.endswith("Postprocess upscaler 2: 4x-Tiny")


def test_face_restoration_without_its_module_is_refused(models, image):
    import importlib.util

    if importlib.util.find_spec("engine.faces") is not None:
        pytest.skip("engine.faces is present: face restoration is tested with it")
    with pytest.raises(NotSupported) as exc:
        postprocess(image, Extras(codeformer_visibility=0.5), upscalers.Upscaling(models_dir=models))
    assert exc.value.field == "codeformer_visibility" and "Codeformer/" in exc.value.message


# ------------------------------------------------------------------------------------------------ SD upscale
def _webui_combine(grid, tiles):
    """webui images.combine_grid with PIL (the reference)."""
    from PIL import Image

    def mask(r):
        return Image.fromarray((r * 255 / grid.overlap).astype(np.uint8), "L")

    mask_w = mask(np.arange(grid.overlap, dtype=np.float32).reshape((1, grid.overlap)).repeat(grid.tile_h, 0))
    mask_h = mask(np.arange(grid.overlap, dtype=np.float32).reshape((grid.overlap, 1)).repeat(grid.width, 1))
    combined = Image.new("RGB", (grid.width, grid.height))
    k = 0
    for y, xs in grid.rows:
        row = Image.new("RGB", (grid.width, grid.tile_h))
        for x in xs:
            tile = Image.fromarray(tiles[k])
            k += 1
            if x == 0:
                row.paste(tile, (0, 0))
                continue
            row.paste(tile.crop((0, 0, grid.overlap, grid.tile_h)), (x, 0), mask=mask_w)
            row.paste(tile.crop((grid.overlap, 0, grid.tile_w, grid.tile_h)), (x + grid.overlap, 0))
        if y == 0:
            combined.paste(row, (0, 0))
            continue
        combined.paste(row.crop((0, 0, row.width, grid.overlap)), (0, y), mask=mask_h)
        combined.paste(row.crop((0, grid.overlap, row.width, grid.tile_h)), (0, y + grid.overlap))
    return np.asarray(combined)


def test_sd_upscale_grid_is_the_webuis():
    grid = split_grid(200, 150, 64, 64, 8)
    # webui split_grid: cols = ceil((200-8)/56) = 4, rows = ceil((150-8)/56) = 3, evenly spread, last flush
    assert [y for y, _ in grid.rows] == [0, 43, 86] and grid.rows[0][1] == (0, 45, 90, 136)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (150, 200, 3)).astype(np.uint8)
    tiles = tiles_of(image, grid)
    assert np.array_equal(combine_grid(grid, tiles), image)  # untouched tiles give the image back
    changed = [np.clip(t.astype(int) + rng.integers(-40, 40, t.shape), 0, 255).astype(np.uint8) for t in tiles]
    assert np.abs(combine_grid(grid, changed).astype(int) - _webui_combine(grid, changed).astype(int)).max() <= 1
    assert split_grid(64, 64, 64, 64, 8).count == 1 and math.isclose(grid.count, 12)


# ------------------------------------------------------------------------------------------------- styles
def test_styles_file_and_merge_rules(tmp_path):
    (tmp_path / "styles.csv").write_text(
        'name,prompt,negative_prompt\n"Cinematic","cinematic still of {prompt}, film grain","cartoon, drawing"\n'
        'Sharp,"sharp, detailed",blurry\n,"no name",x\n', encoding="utf-8")
    styles = load_styles(tmp_path / "styles.csv")
    assert list(styles) == ["Cinematic", "Sharp"]
    assert apply_styles("a cat", "ugly", ["Cinematic", "Sharp"], styles) == (
        "cinematic still of a cat, film grain, sharp, detailed", "ugly, cartoon, drawing, blurry")
    assert merge_prompts("x", "") == "x" and merge_prompts("", " p ") == "p"
    with pytest.raises(InvalidRequest) as exc:
        apply_styles("a", "", ["Sharp", "Nope"], styles)
    assert exc.value.field == "styles[1]" and "Cinematic" in exc.value.allowed
    assert load_styles(tmp_path / "missing.csv") == {}


def test_hires_admission_counts_a_model_upscaler(models):
    """The memory budget's hires estimate (engine.admission) takes a model upscaler of the store at its own cost
    (engine.memory.model_upscaler_pass: one pass at the model's scale over the default tiles, its weights), more
    than a PIL resize to the same size; latent upscalers cost nothing there."""
    from engine.admission import _upscaler_cost
    from engine.memory import resize_pass

    assert _upscaler_cost("Latent", models) is None
    assert _upscaler_cost("Lanczos", models) is resize_pass
    model = _upscaler_cost("R-ESRGAN 4x+", models)
    weights = (models / "RealESRGAN" / "RealESRGAN_x4plus.pth").stat().st_size
    assert model is not resize_pass
    # a 2x hires from 256 still runs the 4x model: its 1024x1024 output is counted, with its weights
    assert model(256, 256, 512, 512, 1) > resize_pass(256, 256, 1024, 1024, 1) + weights
    assert model(256, 256, 512, 512, 1) > resize_pass(256, 256, 512, 512, 1)


# ------------------------------------------------------------------------- ESRGAN_tile in hires and SD upscale
@pytest.fixture(scope="module")
def sd_store(tiny_store, models, tmp_path_factory):
    """tiny-sd1 beside the model upscalers of ``models`` (one store for the engine)."""
    import shutil

    root = tmp_path_factory.mktemp("upscalers-sd")
    (root / "Stable-diffusion").mkdir()
    shutil.copy(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors", root / "Stable-diffusion")
    shutil.copytree(models / "ESRGAN", root / "ESRGAN")
    return root


def test_esrgan_tile_options_reach_hires_and_sd_upscale(sd_store, image, monkeypatch, tmp_path):
    """The webui's ESRGAN_tile / ESRGAN_tile_overlap (override_settings; the webui routes carry the server's
    options so) reach the model upscaler of the hires fix and of the SD upscale script, as they reach the extras'
    (one helper, engine.pipeline.Engine._upscaling): the upscaler is called with the request's tiles, and its
    output tiled (16, overlap 8) differs from untiled (0) within the model-level tolerance above (4 levels max,
    0.5 mean; measured 1 / 0.02); the images made from it differ little (a denoising pass over 1-level changes:
    mean within 1 level; measured: hires 0.22 (max 15), SD upscale 0.04). Out of range, the option is refused
    naming it."""
    import base64
    import io

    from PIL import Image

    from api_compat.errors import ApiError
    from api_compat.schema import parse_request
    from api_compat.translate import translate_request
    from engine.config import EngineConfig
    from engine.pipeline import Engine

    real_load = upscalers.load
    calls = []

    class Recorder:  # the real model, its calls' tiling and outputs recorded
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def __call__(self, im, *, tile=0, overlap=0, **kw):
            out = self.model(im, tile=tile, overlap=overlap, **kw)
            calls.append(((tile, overlap), out))
            return out

    monkeypatch.setattr(upscalers, "load", lambda path, device="cpu": Recorder(real_load(path, device)))
    config = EngineConfig(models_dir=sd_store, backend="torch", cache_dir=tmp_path)
    engine = Engine(config)
    buf = io.BytesIO()
    Image.fromarray(image[:32, :32]).save(buf, format="PNG")
    init = base64.b64encode(buf.getvalue()).decode()
    payloads = {
        "txt2img": {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3, "cfg_scale": 1.5,
                    "sampler_name": "Euler", "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "4x-Tiny",
                    "denoising_strength": 0.3},
        "img2img": {"init_images": [init], "prompt": "a red circle", "steps": 2, "width": 64, "height": 64,
                    "seed": 5, "cfg_scale": 1.5, "denoising_strength": 0.3, "sampler_name": "Euler",
                    "script_name": "sd upscale", "script_args": ["", 8, "4x-Tiny", 2.0]},
    }
    for kind, payload in payloads.items():
        runs = {}
        for tiles in ((16, 8), (0, 8)):
            overrides = {"ESRGAN_tile": tiles[0], "ESRGAN_tile_overlap": tiles[1]}
            request = translate_request(kind, parse_request(kind, {**payload, "override_settings": overrides}),
                                        config).request
            assert (request.upscaler_tile, request.upscaler_tile_overlap) == tiles
            calls.clear()
            result = engine.generate(request)
            assert calls and all(c[0] == tiles for c in calls), (kind, [c[0] for c in calls])
            runs[tiles] = (calls[0][1].astype(int), result.images[0].astype(int))
        (up_tiled, tiled), (up_whole, whole) = runs[(16, 8)], runs[(0, 8)]
        diff = np.abs(up_tiled - up_whole)
        assert diff.max() <= 4 and diff.mean() <= 0.5, (kind, diff.max(), diff.mean())
        assert np.abs(tiled - whole).mean() <= 1.0, (kind, np.abs(tiled - whole).mean())
    default = translate_request("txt2img", parse_request("txt2img", payloads["txt2img"]), config).request
    assert (default.upscaler_tile, default.upscaler_tile_overlap) == (upscalers.DEFAULT_TILE, upscalers.DEFAULT_OVERLAP)
    with pytest.raises(ApiError) as refused:
        parse_request("txt2img", {**payloads["txt2img"], "override_settings": {"ESRGAN_tile": 9000}})
    assert refused.value.field == "override_settings.ESRGAN_tile"
