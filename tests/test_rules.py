"""engine/rules.py is the one home of each request rule: a limit or default changed there (or in the request
dataclasses) changes the schema's validation, the OpenAPI page, docs/API.md's tables and the engine alike; engine
errors name GenerationRequest paths and one function maps them back to the payload of the face that got them.

The schema is built when api_compat.schema is imported, so the "change it in the home" test runs in a subprocess
that loads engine/request.py and engine/rules.py from their source with a few values changed, then imports the
rest of the project unchanged and checks every consumer.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import rules
from core.errors import InvalidRequest, ModelNotFound
from engine.request import ControlNetUnit, GenerationRequest, Hires, InitImage

ROOT = Path(__file__).resolve().parent.parent

# (module, source text, changed text): every rule the subprocess changes in its home
CHANGES = [
    ("engine.request", "    steps: int = 20\n", "    steps: int = 25\n"),
    ("engine.request", '    sampler_name: str = "Euler a"\n', '    sampler_name: str = "DPM++ 2M"\n'),
    ("engine.request", "    cfg_scale: float = 7.0\n", "    cfg_scale: float = 6.5\n"),
    ("engine.request", "    scale: float = 2.0\n", "    scale: float = 1.5\n"),
    ("engine.request", "    mask_blur_x: int = 4\n", "    mask_blur_x: int = 6\n"),
    ("engine.request", "    weight: float = 1.0\n", "    weight: float = 0.5\n"),
    ("engine.rules", "MIN_SIZE = 64 ", "MIN_SIZE = 128 "),
    ("engine.rules", "MAX_SIZE = 2048 ", "MAX_SIZE = 1536 "),
    ("engine.rules", "SIZE_MULTIPLE = 8 ", "SIZE_MULTIPLE = 16 "),
    ("engine.rules", "MAX_SEED = 4294967294 ", "MAX_SEED = 12345 "),
    ("engine.rules", "MAX_UNITS = 10 ", "MAX_UNITS = 3 "),
    ("engine.rules", 'USE_SAME_SAMPLER = "Use same sampler"', 'USE_SAME_SAMPLER = "Same as first"'),
    ("engine.rules", '    "steps": _int(1, 150),\n', '    "steps": _int(1, 99),\n'),
    ("engine.rules", '    "clip_skip": _int(1, 12),\n', '    "clip_skip": _int(1, 9),\n'),
    ("engine.rules", '    "cfg_scale": Range(0.0, 30.0),\n', '    "cfg_scale": Range(0.0, 25.0),\n'),
    ("engine.rules", '    "hires.scale": Range(1.0, 8.0),\n', '    "hires.scale": Range(1.0, 4.0),\n'),
    ("engine.rules", '    "init.mask_blur_x": _int(0, 64),\n', '    "init.mask_blur_x": _int(0, 32),\n'),
    ("engine.rules", '    "controlnet_units.weight": Range(0.0, 2.0),\n',
     '    "controlnet_units.weight": Range(0.0, 1.5),\n'),
]

_CHECKS = r'''
import importlib.util, json, sys, tempfile
from pathlib import Path

import engine

CHANGES = json.loads(sys.argv[1])


def load_changed(name):
    path = Path(engine.__file__).parent / (name.split(".")[1] + ".py")
    src = path.read_text(encoding="utf-8")
    for module, old, new in CHANGES:
        if module == name:
            assert src.count(old) == 1, (name, old)
            src = src.replace(old, new)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None, origin=str(path)))
    module.__file__ = str(path)
    sys.modules[name] = module
    setattr(engine, name.split(".")[1], module)
    exec(compile(src, str(path), "exec"), module.__dict__)


load_changed("engine.request")
load_changed("engine.rules")

from api_compat import apidoc
from api_compat.errors import ApiError
from api_compat.schema import ControlNetUnitPayload, Img2ImgPayload, OverrideSettings, Txt2ImgPayload, parse_payload, parse_img2img
from api_compat.translate import translate
from engine.config import EngineConfig
from core.errors import InvalidRequest
from engine.models.family import ModelFamily
from engine.noise import MAX_SEED
from engine.request import GenerationRequest, Hires
from engine.rules import hires_sampler
out = {}


def refused(payload, parse=parse_payload):
    try:
        parse(payload)
    except ApiError as exc:
        return [exc.field, exc.allowed]
    return None


# the schema's validation
out["valid"] = {
    "steps 99": refused({"steps": 99}), "steps 100": refused({"steps": 100}),
    "clip_skip 10": refused({"clip_skip": 10}), "cfg 26": refused({"cfg_scale": 26}),
    "width 1536": refused({"width": 1536}), "width 1552": refused({"width": 1552}),
    "width 120": refused({"width": 120}), "width 136": refused({"width": 136}),
    "hr_scale 5": refused({"hr_scale": 5}),
    "override clip 10": refused({"override_settings": {"CLIP_stop_at_last_layers": 10}}),
    "weight 1.6": refused({"alwayson_scripts": {"controlnet": {"units": [{"weight": 1.6}]}}}),
    "4 units": refused({"alwayson_scripts": {"controlnet": {"units": [{}] * 4}}}),
    "mask_blur_x 33": refused({"init_images": ["x"], "mask_blur_x": 33}, parse_img2img),
}
out["defaults"] = {name: model.model_fields[field].default for name, model, field in (
    ("steps", Txt2ImgPayload, "steps"), ("cfg_scale", Txt2ImgPayload, "cfg_scale"),
    ("weight", ControlNetUnitPayload, "weight"), ("mask_blur_x", Img2ImgPayload, "mask_blur_x"))}
out["hr_scale description"] = Txt2ImgPayload.model_fields["hr_scale"].description

# the OpenAPI page
from api_compat.http import create_app
from api_compat.service import LocalService
from fastapi.testclient import TestClient

with tempfile.TemporaryDirectory() as tmp:
    with LocalService(Path(tmp) / "m", results_dir=Path(tmp) / "r", check_models=False) as service:
        with TestClient(create_app(service), base_url="http://localhost") as client:
            spec = client.get("/openapi.json").json()
props = spec["components"]["schemas"]["Txt2ImgPayload"]["properties"]
out["openapi"] = {name: [props[name].get("maximum"), props[name].get("minimum"), props[name].get("default")]
                  for name in ("steps", "cfg_scale", "width", "clip_skip", "hr_scale")}
clip = spec["paths"]["/sdapi/v1/options"]["post"]["requestBody"]["content"]["application/json"]["schema"][
    "properties"]["CLIP_stop_at_last_layers"]
out["openapi options"] = [clip["minimum"], clip["maximum"]]

# docs/API.md's tables
table = apidoc.field_table(Txt2ImgPayload)
out["doc rows"] = [line for line in table.splitlines() if line.startswith(("| `steps` |", "| `width` |",
                                                                           "| `hr_scale` |", "| `sampler_name` |"))]
out["doc unit weight"] = [line for line in apidoc.field_table(ControlNetUnitPayload).splitlines()
                          if line.startswith("| `weight` |")]

# the engine
request = GenerationRequest()
out["engine"] = {
    "request": [request.steps, request.sampler_name, request.cfg_scale, Hires().scale],
    "translated": [translate(parse_payload({}), EngineConfig()).request.steps,
                   translate(parse_payload({}), EngineConfig()).request.sampler_name],
    "max_size": EngineConfig().max_size, "max_seed": MAX_SEED,
    "hires sampler": list(hires_sampler("Euler", "Karras", Hires(sampler_name="Same as first"))),
}
family = ModelFamily(arch=None, native_size=512, prediction_type="epsilon", pixel_multiple=16, schedule=None)
for size in (112, 128):
    try:
        family.check_size(size, 512, 1536)
        out["engine"][f"size {size}"] = "ok"
    except InvalidRequest as exc:
        out["engine"][f"size {size}"] = exc.allowed
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def changed():
    """What every consumer says once the rules changed in their homes (one subprocess)."""
    result = subprocess.run([sys.executable, "-c", _CHECKS, json.dumps(CHANGES)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_schema_validates_by_the_changed_rules(changed):
    valid = changed["valid"]
    assert valid["steps 99"] is None and valid["steps 100"] == ["steps", "an integer from 1 to 99"]
    assert valid["clip_skip 10"] == ["clip_skip", "an integer from 1 to 9"]
    assert valid["override clip 10"] == ["override_settings.CLIP_stop_at_last_layers", "an integer from 1 to 9"]
    assert valid["cfg 26"] == ["cfg_scale", "a number from 0 to 25"]
    assert valid["width 1536"] is None
    assert valid["width 1552"] == valid["width 120"] == valid["width 136"] == [
        "width", "a multiple of 16 from 128 to 1536"]
    assert valid["hr_scale 5"] == ["hr_scale", "a number from 1 to 4"]
    assert valid["weight 1.6"] == ["alwayson_scripts.controlnet.units[0].weight", "a number from 0 to 1.5"]
    assert valid["4 units"] == ["alwayson_scripts.controlnet.units", "at most 3 units"]
    assert valid["mask_blur_x 33"] == ["mask_blur_x", "an integer from 0 to 32"]
    assert changed["defaults"] == {"steps": 25, "cfg_scale": 6.5, "weight": 0.5, "mask_blur_x": 6}
    assert changed["hr_scale description"] == "default 1.5"


def test_the_openapi_page_follows(changed):
    assert changed["openapi"] == {"steps": [99, 1, 25], "cfg_scale": [25.0, 0.0, 6.5], "width": [1536, 128, None],
                                  "clip_skip": [9, 1, 1], "hr_scale": [4.0, 1.0, None]}
    assert changed["openapi options"] == [1, 9]


def test_the_api_page_tables_follow(changed):
    rows = "\n".join(changed["doc rows"])
    assert "| `steps` | int | 25 | an integer from 1 to 99 |" in rows
    assert "| `width` | int \\| null | null | a multiple of 16 from 128 to 1536 |" in rows
    assert "| `hr_scale` | float \\| null | null | 1..4 (empty: default) | hires fix upscale factor (default 1.5;" in rows
    assert 'empty: "DPM++ 2M"' in rows
    assert changed["doc unit weight"] == ["| `weight` | float | 0.5 | 0..1.5 | residual weight (IP-Adapter units: the "
                                          "weight of the image-prompt attention; 0 = no adapter) |"]


def test_the_engine_follows(changed):
    engine = changed["engine"]
    assert engine["request"] == [25, "DPM++ 2M", 6.5, 1.5]
    assert engine["translated"] == [25, "DPM++ 2M"]
    assert engine["max_size"] == 1536 and engine["max_seed"] == 12345
    assert engine["hires sampler"] == ["Euler", "Automatic"]  # the changed "Use same sampler" spelling
    assert engine["size 112"] == "multiples of 16 from 128 to 1536" and engine["size 128"] == "ok"


def test_every_change_applies():
    """A change the source does not contain (a renamed constant, a reformatted line) would make the subprocess
    test prove nothing: each must match exactly once in its home."""
    for module, old, _ in CHANGES:
        path = ROOT / (module.replace(".", "/") + ".py")
        assert path.read_text(encoding="utf-8").count(old) == 1, (module, old)


# ------------------------------------------------------------------------------------------- in process
def test_defaults_are_the_request_dataclasses():
    for cls, section in ((GenerationRequest, ""), (Hires, "hires."), (InitImage, "init."),
                         (ControlNetUnit, "controlnet_units.")):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                assert rules.default(section + f.name) == f.default
    with pytest.raises(KeyError):
        rules.default("nope")


def test_the_schema_takes_its_defaults_from_the_request():
    from api_compat.schema import ControlNetUnitPayload, Img2ImgPayload, Txt2ImgPayload

    same = {"clip_skip", "prompt", "batch_size", "n_iter", "steps", "cfg_scale", "width", "height", "scheduler",
            "seed", "subseed", "subseed_strength", "eta", "s_churn", "s_tmin", "s_noise"}
    for name in same:
        assert Txt2ImgPayload.model_fields[name].default == rules.default(name), name
    assert Txt2ImgPayload.model_fields["stable_diffusion_model"].default == rules.default("model")
    assert Txt2ImgPayload.model_fields["sd_vae"].default == rules.default("vae")
    for name in ("module", "weight", "guidance_start", "guidance_end", "resize_mode", "processor_res", "threshold_a",
                 "threshold_b", "control_mode", "pixel_perfect", "save_detected_map"):
        assert ControlNetUnitPayload.model_fields[name].default == rules.default(f"controlnet_units.{name}"), name
    for name in ("denoising_strength", "resize_mode", "mask_blur_x", "mask_blur_y", "mask_round",
                 "inpaint_full_res_padding", "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res"):
        want = rules.WEBUI_IMG2IMG_DEFAULTS.get(f"init.{name}", None)
        want = rules.default(f"init.{name}") if want is None else want
        assert Img2ImgPayload.model_fields[name].default == want, name


def test_parse_choice():
    names = ("Just resize", "Crop and resize")
    assert rules.parse_choice(1, names, "f") == 1
    assert rules.parse_choice("  crop AND resize ", names, "f") == 1
    assert rules.parse_choice("fit", names, "f", aliases={"Fit": "Crop and resize"}) == 1
    assert rules.parse_choice(7, names, "f", ints={7: 0}) == 0
    for bad in (True, 2, -1, "stretch", 1.0, None):
        with pytest.raises(InvalidRequest) as err:
            rules.parse_choice(bad, names, "init.resize_mode", what="resize mode")
        assert err.value.field == "init.resize_mode" and err.value.allowed == "'Just resize', 'Crop and resize'"
        assert err.value.message == f"unknown resize mode {bad!r}"


def test_hires_sampler_rule():
    first = ("DPM++ 2M", "Karras")
    assert rules.hires_sampler(*first, Hires()) == ("DPM++ 2M", "Automatic")
    assert rules.hires_sampler(*first, Hires(sampler_name="Use same sampler")) == ("DPM++ 2M", "Automatic")
    assert rules.hires_sampler(*first, Hires(sampler_name="Euler", scheduler="Use same scheduler")) == (
        "Euler", "Karras")
    from engine.samplers import resolve

    for hires, field in ((Hires(sampler_name="nope"), "hires.sampler_name"), (Hires(scheduler="nope"),
                                                                               "hires.scheduler")):
        with pytest.raises(InvalidRequest) as err:
            rules.resolve_hires_sampler(*first, hires, resolve)
        assert err.value.field == field
    with pytest.raises(InvalidRequest) as err:  # the first pass's own name is not the hires fix's to answer for
        rules.resolve_hires_sampler("nope", "Automatic", Hires(), resolve)
    assert err.value.field == "sampler_name"


def test_sampler_and_schedule_names_as_the_webui_takes_them():
    """Samplers by name or alias in any case; schedules by label or by the name /sdapi/v1/schedulers lists
    ("automatic", "karras", "sgm_uniform"), any case; "Use same scheduler" in any case."""
    from engine.samplers import resolve
    from api_compat.webui.listings import schedulers

    for name, scheduler, expected in (("euler A", "automatic", ("Euler a", "Automatic")),
                                      ("k_euler_a", "KARRAS", ("Euler a", "Karras")),
                                      ("dpm++ 2m karras", None, ("DPM++ 2M", "Karras")),
                                      ("Euler", "sgm_uniform", ("Euler", "SGM Uniform"))):
        r = resolve(name, scheduler)
        assert (r.name, r.schedule_label) == expected, name
    for row in schedulers():
        assert resolve("Euler", row["name"]).schedule_label == resolve("Euler", row["label"]).schedule_label
    assert rules.hires_sampler("Euler", "Karras", Hires(scheduler="use same scheduler")) == ("Euler", "Karras")


def test_check_limits():
    from engine.config import EngineConfig

    config = EngineConfig(max_size=512, max_batch_size=2)
    rules.check_limits(config, width=512, height=None, batch_size=2, n_iter=3, seed=-1, subseed=5)
    for kw, field, allowed in (({"width": 520}, "width", "a multiple of 8 from 64 to 512"),
                               ({"batch_size": 3}, "batch_size", "an integer from 1 to 2"),
                               ({"seed": rules.INT64_MAX}, "seed", f"-1 or an integer from 0 to {rules.INT64_MAX - 1}")):
        args = {"width": None, "height": None, "batch_size": 1, "n_iter": 2, "seed": -1, "subseed": -1, **kw}
        with pytest.raises(InvalidRequest) as err:
            rules.check_limits(config, **args)
        assert (err.value.field, err.value.allowed) == (field, allowed)


# ------------------------------------------------------------------------------------------- error paths
def test_errors_carry_their_parts():
    err = InvalidRequest("hires.scale", "gives a second pass of 4096x4096", "at most 2")
    assert (err.field, err.message, err.allowed) == ("hires.scale", "gives a second pass of 4096x4096", "at most 2")
    assert str(err) == "hires.scale: gives a second pass of 4096x4096 (allowed: at most 2)"
    moved = err.at("hr_scale")
    assert type(moved) is InvalidRequest and str(moved) == "hr_scale: gives a second pass of 4096x4096 (allowed: at most 2)"
    missing = ModelNotFound("x.safetensors", "no checkpoint of this name", "model")
    assert (missing.path, missing.field, missing.message) == ("x.safetensors", "model", "no checkpoint of this name")
    assert str(missing) == "x.safetensors: model: no checkpoint of this name"


def test_field_origins_map_request_paths_to_the_payload():
    from api_compat.errors import api_error_from, payload_path
    from api_compat.schema import parse_img2img, parse_payload
    from api_compat.translate import field_origins

    unit = {"model": "cn", "input_image": "x"}
    payload = parse_payload({
        "negative_prompt": "n", "sampler_index": "Euler", "override_settings": {"sd_model_checkpoint": "m"},
        "alwayson_scripts": {"controlnet": {"args": [{**unit, "enabled": False}, unit, {"model": "cn", "image": "y"}]}}})
    origins = field_origins(payload)
    for path, want in (("negative_prompt", "negative_prompt"), ("sampler_name", "sampler_index"),
                       ("model", "override_settings.sd_model_checkpoint"), ("vae", "sd_vae"),
                       ("controlnet_units[0].model", "alwayson_scripts.controlnet.args[1].model"),  # disabled skipped
                       ("controlnet_units[0].image", "alwayson_scripts.controlnet.args[1].input_image"),
                       ("controlnet_units[1].image", "alwayson_scripts.controlnet.args[2].image"),
                       ("controlnet_units[1].weight", "alwayson_scripts.controlnet.args[2].weight"),
                       ("hires.scale", "hr_scale"), ("hires", "enable_hr"), ("steps", "steps"), (None, None)):
        assert payload_path(path, origins) == want, path
    assert payload_path("negative_prompt", field_origins(parse_payload({}))) == "negtive_prompt"
    i2i = field_origins(parse_img2img({"init_images": ["x"], "mask_blur": 3}))
    assert [payload_path(p, i2i) for p in ("init.image", "init.mask", "init.mask_blur_y", "init.upscaler",
                                           "init.inpainting_fill")] == [
        "init_images[0]", "mask", "mask_blur", "override_settings.upscaler_for_img2img", "inpainting_fill"]
    err = api_error_from(InvalidRequest("controlnet_units[1].module", "unknown preprocessor 'x'", "canny"), origins)
    assert (err.field, err.message, err.allowed) == ("alwayson_scripts.controlnet.args[2].module",
                                                     "unknown preprocessor 'x'", "canny")


def test_no_rule_is_restated():
    """The literals of the rules appear in their home only (engine/ and api_compat/ sources)."""
    sources = [p for d in ("engine", "api_compat") for p in (ROOT / d).rglob("*.py") if p.name != "rules.py"]
    for literal in ('"Use same sampler"', '"Use same scheduler"', "= 4294967294", "MAX_SEED =", "MIN_SIZE =",
                    "MAX_SIZE =", "= 2**63 - 1", "from 64 to", "64 <="):
        found = [str(p.relative_to(ROOT)) for p in sources if literal in p.read_text(encoding="utf-8")]
        assert found == [], (literal, found)
