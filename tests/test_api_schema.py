"""sd_txt2img payload validation: every field of the cloud API page (sd_txt2img.txt) and the webui extras of
API.md, with accepted values and each kind of invalid value; errors name the field path and the allowed
values; nothing is queued when a payload is refused."""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from api_compat import ApiError, TaskService
from api_compat.schema import Txt2ImgPayload, field_path, parse_payload
from api_compat.translate import translate
from engine.config import EngineConfig
from engine.controlnet.images import EncodedImage, as_array
from core.errors import InvalidRequest
from tests.api_support import double_factory, png_b64

CN = "alwayson_scripts.controlnet.units[0]"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """Validation only (the engine is the test double; the model store is real, with placeholder files: names
    are resolved at submit, nothing is loaded)."""
    models = tmp_path_factory.mktemp("models")
    for sub, name in (("Stable-diffusion", "model.safetensors"), ("VAE", "sdxl_vae.safetensors"),
                      ("ControlNet", "control_canny.safetensors")):
        (models / sub).mkdir()
        (models / sub / name).write_bytes(b"x")
    svc = TaskService(models, results_dir=tmp_path_factory.mktemp("results"), engine_factory=double_factory,
                       configs={"big": {"max_batch_size": 16}, "small": {"max_size": 512}})
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def strict_service(service, tmp_path_factory):
    """The same store, ``strict=True`` (sdengine serve --strict): unknown fields are errors."""
    svc = TaskService(service.configs["default"].models_dir, results_dir=tmp_path_factory.mktemp("strict"),
                      engine_factory=double_factory, strict=True)
    yield svc
    svc.close()


def unit(**fields):
    return {"model": "control_canny", "input_image": png_b64(), **fields}


def cn(*units, key="units"):
    return {"alwayson_scripts": {"controlnet": {key: list(units)}}}


def submit(service, payload, headers=None):
    before = service.store.count()
    try:
        answer = service.sd_txt2img(payload, headers)
    except ApiError as exc:
        assert service.store.count() == before, "a refused payload must not be queued"
        return exc
    assert answer["status"] == "waiting" and len(answer["taskId"]) == 32
    assert service.store.count() == before + 1
    return answer


def assert_refused(service, payload, field, code="invalid_request", headers=None):
    result = submit(service, payload, headers)
    assert isinstance(result, ApiError), f"{payload!r} was accepted; expected an error on {field}"
    assert result.field == field, f"error names {result.field!r}, expected {field!r}: {result}"
    assert result.code == code, f"code {result.code!r}, expected {code!r}: {result}"
    assert result.allowed, f"the error must name the allowed values: {result}"
    assert result.http_status in (400, 422)
    return result


# field -> (accepted values, invalid values)
SEED_FIELDS = {
    "stable_diffusion_model": (["model.safetensors", "model", "MODEL", None, ""], [5, ["model"]]),
    "sd_vae": (["Automatic", "None", "sdxl_vae.safetensors", "sdxl_vae"], [1, True]),
    "clip_skip": ([1, 2, 3, 2.0], [0, 13, 1.5, "2", True, None, -1]),
    "prompt": (["", "a (cat:1.2), [dog] BREAK x", "x" * 5000, "ünïcødé"], [5, None, ["a"], "a\x00b", "a\ud800b"]),
    "negtive_prompt": (["", "blurry"], [5, ["a"]]),
    "negative_prompt": (["", "blurry"], [5, {"a": 1}]),
    "batch_size": ([1, 8], [0, 9, -1, 1.5, "1", True]),
    "steps": ([1, 20, 150], [0, 151, "20", 20.5, None]),
    "cfg_scale": ([0, 1, 7, 7.5, 30], [-0.1, 30.1, "7", True, float("nan"), float("inf")]),
    "width": ([64, 512, 520, 2048, None], [63, 0, 513, 2056, "512", 512.5, -512]),
    "height": ([64, 768, 2048, None], [56, 100, 4096, "768"]),
    "sampler_name": (["Euler a", "DPM++ 2M Karras", "DPM++ 2M", "k_euler", "DDIM", "UniPC", None, ""],
                     ["Euler z", 5, "DPM++ 2M Bogus"]),
    "seed": ([-1, 0, 1, 4294967294, 2**63 - 1], [-2, 2**63, 1.5, "1", True, None]),
    # webui extras
    "n_iter": ([1, 4], [0, 101, 1.5]),
    "scheduler": (["Automatic", "Karras", "Exponential", "SGM Uniform", "Align Your Steps"], ["Foo", 3]),
    "subseed": ([-1, 0, 99], [-5, "x"]),
    "subseed_strength": ([0, 0.5, 1], [-0.1, 1.1, "0.5"]),
    "eta": ([None, 0, 0.5, 1], [-1, 1.5, "1"]),
    "s_churn": ([0, 1.5], [-1, "x"]),
    "s_tmin": ([0, 1], [-1]),
    "s_tmax": ([None, 0, 10], [-1]),
    "s_noise": ([0, 1, 1.003], [-0.5, 3]),
    "sampler_index": (["Euler", None], ["Nope", 1]),
    "denoising_strength": ([None, 0.7], [2]),
    "hr_scale": ([2.0, None], ["x", 0.5, 9]),
    "do_not_save_samples": ([True, False, None], ["maybe"]),
}


@pytest.mark.parametrize("name,value", [(k, v) for k, (ok, _) in SEED_FIELDS.items() for v in ok])
def test_field_accepts(service, name, value):
    result = submit(service, {name: value})
    assert isinstance(result, dict), f"{name}={value!r} refused: {result}"


def test_clip_skip_schema_range_then_model_layers(service):
    """The schema admits the webui's 1..12; at submit the model's text encoder decides (the demo model: 3)."""
    assert parse_payload({"clip_skip": 12}).clip_skip == 12
    assert_refused(service, {"clip_skip": 12}, "clip_skip")
    # the error names the field the payload used (issue 23: one field-origin map per face)
    assert_refused(service, {"override_settings": {"CLIP_stop_at_last_layers": 4}},
                   "override_settings.CLIP_stop_at_last_layers")


@pytest.mark.parametrize("name,value", [(k, v) for k, (_, bad) in SEED_FIELDS.items() for v in bad])
def test_field_rejects(service, name, value):
    assert_refused(service, {name: value}, name)


@pytest.mark.parametrize("name", [
    "../model", "..", "/etc/passwd", "models/../../x", "a\\b", "..\\..\\x", "C:model", "C:\\x", "~root", " model",
    "model\x00", "model\n", "x" * 300,
])
def test_model_name_path_traversal(service, name):
    code = "invalid_request" if len(name) > 255 else "unsafe_model_path"
    assert_refused(service, {"stable_diffusion_model": name}, "stable_diffusion_model", code)
    assert_refused(service, {"sd_vae": name}, "sd_vae", code)
    assert_refused(service, cn(unit(model=name)), f"{CN}.model", code)
    assert_refused(service, {"override_settings": {"sd_model_checkpoint": name}},
                   "override_settings.sd_model_checkpoint", code)


def test_model_names_checked_against_the_store(service):
    assert_refused(service, {"stable_diffusion_model": "missing"}, "stable_diffusion_model", "model_not_found")
    assert_refused(service, {"sd_vae": "missing.safetensors"}, "sd_vae", "model_not_found")
    assert_refused(service, cn(unit(model="control_depth")), f"{CN}.model", "model_not_found")
    assert isinstance(submit(service, cn(unit(model="control_canny [a1b2c3d4]"))), dict)  # webui "name [hash]"
    assert isinstance(submit(service, cn(unit(model="Control_Canny.safetensors"))), dict)  # case-insensitive


def test_model_store_link_out_of_the_store_is_refused(tmp_path):
    """A checkpoint entry that is a symlink to a file outside the store is never resolved (the engine's
    ModelStore decides at submit)."""
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    (models / "Stable-diffusion" / "secret.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with TaskService(models, results_dir=tmp_path / "r", engine_factory=double_factory) as svc:
        for name in ("secret.safetensors", "secret", "SECRET"):
            assert_refused(svc, {"stable_diffusion_model": name}, "stable_diffusion_model", "unsafe_model_path")


def test_negative_prompt_alias(service):
    ok = submit(service, {"negtive_prompt": "a", "negative_prompt": "a"})
    assert service.sd_get_result(ok)["parameters"]["negative_prompt"] == "a"
    assert_refused(service, {"negtive_prompt": "a", "negative_prompt": "b"}, "negative_prompt")
    for key in ("negtive_prompt", "negative_prompt"):
        t = translate(parse_payload({key: "ugly"}), EngineConfig())
        assert t.request.negative_prompt == "ugly"


def test_translation_is_field_for_field():
    payload = {"stable_diffusion_model": "m", "sd_vae": "None", "clip_skip": 2, "prompt": "p", "negtive_prompt": "n",
               "batch_size": 2, "n_iter": 3, "steps": 7, "cfg_scale": 4.5, "width": 320, "height": 256,
               "sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": 42, "subseed": 7, "subseed_strength": 0.25,
               "eta": 0.5, "s_churn": 0.1, "s_tmin": 0.2, "s_tmax": 5, "s_noise": 0.9,
               "override_settings": {"eta_noise_seed_delta": 31337}}
    r = translate(parse_payload(payload), EngineConfig()).request
    assert (r.model, r.vae, r.clip_skip, r.prompt, r.negative_prompt) == ("m", "None", 2, "p", "n")
    assert (r.batch_size, r.n_iter, r.steps, r.cfg_scale, r.width, r.height) == (2, 3, 7, 4.5, 320, 256)
    assert (r.sampler_name, r.scheduler, r.seed, r.subseed, r.subseed_strength) == ("DPM++ 2M", "Karras", 42, 7, 0.25)
    assert (r.eta, r.s_churn, r.s_tmin, r.s_tmax, r.s_noise, r.eta_noise_seed_delta) == (0.5, 0.1, 0.2, 5, 0.9, 31337)
    d = translate(parse_payload({}), EngineConfig()).request
    assert (d.model, d.sampler_name, d.seed, d.width, d.steps, d.cfg_scale, d.s_tmax) == (
        None, "Euler a", -1, None, 20, 7.0, float("inf"))
    # sampler_index (legacy) is used only when sampler_name is absent; override_settings win like the webui
    assert translate(parse_payload({"sampler_index": "Heun"}), EngineConfig()).request.sampler_name == "Heun"
    r = translate(parse_payload({"clip_skip": 1, "override_settings": {"CLIP_stop_at_last_layers": 2,
                                 "sd_model_checkpoint": "o", "sd_vae": "v"}}), EngineConfig()).request
    assert (r.clip_skip, r.model, r.vae) == (2, "o", "v")


def test_request_is_frozen():
    r = translate(parse_payload({"prompt": "x"}), EngineConfig()).request
    with pytest.raises(Exception):
        r.prompt = "y"


@pytest.mark.parametrize("payload,field", [
    ({"batch_size": 9}, "batch_size"),
    ({"width": 1024}, "width"),
])
def test_limits_follow_the_engine_configuration(service, payload, field):
    allowed = {"batch_size": ("big",), "width": ("big", "default")}[field]
    for config_id in allowed:
        assert isinstance(submit(service, payload, {"X-SP-RESOURCE-CONFIG-ID": config_id}), dict)
    refused = {"batch_size": "default", "width": "small"}[field]
    err = assert_refused(service, payload, field, headers={"X-SP-RESOURCE-CONFIG-ID": refused})
    assert ("8" if field == "batch_size" else "512") in err.allowed


def test_seed_plus_images_must_fit_int64(service):
    assert_refused(service, {"seed": 2**63 - 1, "batch_size": 2}, "seed")
    assert_refused(service, {"subseed": 2**63 - 2, "n_iter": 3}, "subseed")


def test_resource_config_header(service):
    for name in ("X-SP-RESOURCE-CONFIG-ID", "x-sp-resource-config-id"):
        assert isinstance(submit(service, {}, {name: "big"}), dict)
    err = assert_refused(service, {}, "headers.X-SP-RESOURCE-CONFIG-ID", "unknown_config",
                         headers={"X-SP-RESOURCE-CONFIG-ID": "gpu-9"})
    assert "big" in err.allowed and "small" in err.allowed and "default" in err.allowed
    task = submit(service, {"prompt": "which"}, {"X-SP-RESOURCE-CONFIG-ID": "small"})
    assert service.wait(task["taskId"], 10)["info"]["resource_config_id"] == "small"


NOT_SUPPORTED = {  # webui v1.10 txt2img fields the engine does not implement: default accepted, else refused
    "seed_resize_from_h": ([-1, 0], [512]),
    "seed_resize_from_w": ([-1, 0], [512]),
    "firstpass_image": ([None, ""], ["iVBOR"]),
    "force_task_id": ([None], ["abc"]),
    "script_name": ([None, ""], ["x/y/z plot"]),  # refused at translation (api_compat.translate._script)
    "infotext": ([None, ""], ["a cat\nSteps: 20"]),
}


@pytest.mark.parametrize("name,value,ok", [(k, v, ok) for k, (good, bad) in NOT_SUPPORTED.items()
                                           for ok, vals in ((True, good), (False, bad)) for v in vals])
def test_unsupported_webui_fields(service, name, value, ok):
    if ok:
        assert isinstance(submit(service, {name: value}), dict)
    else:
        err = assert_refused(service, {name: value}, name, "not_supported")
        assert "not supported" in str(err)


def test_restore_faces_without_a_model_names_the_folder(service):
    """No face-restoration model installed: restore_faces true (or the face_restoration option) is refused at
    submit naming the folders to put one in, never a silent no-op; false/null and tiling are accepted."""
    for payload, field in (({"restore_faces": True}, "restore_faces"),
                           ({"override_settings": {"face_restoration": True}}, "override_settings.face_restoration")):
        err = assert_refused(service, payload, field, "invalid_request")
        assert "GFPGAN" in str(err) and "Codeformer" in str(err), err
    for payload in ({"restore_faces": False}, {"restore_faces": None}, {"tiling": True},
                    {"override_settings": {"tiling": True, "face_restoration_model": "GFPGAN"}}):
        assert isinstance(submit(service, payload), dict), payload


def test_hires_fields_are_ignored_while_hires_is_off(service):
    payload = {"enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0,
               "hr_resize_x": 0, "hr_resize_y": 0, "denoising_strength": 0.7, "firstphase_width": 0,
               "firstphase_height": 0, "hr_prompt": "", "hr_negative_prompt": "", "refiner_switch_at": 0.8,
               "send_images": True, "save_images": False, "override_settings_restore_afterwards": True,
               "comments": {"x": 1}, "disable_extra_networks": False}
    assert isinstance(submit(service, payload), dict)


@pytest.mark.parametrize("payload,field,hint", [
    ({"stepz": 20}, "stepz", "steps"),
    ({"negativ_prompt": "x"}, "negativ_prompt", "negative_prompt"),
    ({"Prompt": "x"}, "Prompt", "prompt"),
    (cn(unit(wieght=1)), f"{CN}.wieght", "weight"),
    ({"alwayson_scripts": {"controlnet": {"unitz": []}}}, "alwayson_scripts.controlnet.unitz", "units"),
])
def test_unknown_fields_are_named(service, strict_service, payload, field, hint):
    """Strict: an error naming the field, with a "did you mean"; by default (the leniency policy) the field is
    ignored and named in the result's info.warnings."""
    err = assert_refused(strict_service, payload, field, "unknown_field")
    assert repr(hint) in str(err), f"expected a suggestion of {hint!r}: {err}"
    answer = submit(service, payload)
    result = service.wait(answer["taskId"], timeout=60)
    assert result["status"] == "succeeded", result
    assert [w for w in result["info"]["warnings"] if w.startswith(f"{field}: unknown field, ignored")], result["info"]


def test_other_scripts_and_settings_are_not_supported(service, strict_service):
    enabled = {"args": [True, False, {"ad_model": "face_yolov8n.pt"}]}  # ADetailer runs; this model is absent
    assert_refused(service, {"alwayson_scripts": {"ADetailer": enabled}}, "alwayson_scripts.ADetailer.args[2].ad_model",
                   "invalid_request")
    assert_refused(service, {"alwayson_scripts": {"My Script": {"args": []}}}, "alwayson_scripts.My Script",
                   "not_supported")
    assert_refused(strict_service, {"override_settings": {"sd_hypernetwork": "x"}},
                   "override_settings.sd_hypernetwork", "not_supported")
    assert isinstance(submit(service, {"override_settings": {"sd_hypernetwork": "x"}}), dict)


def test_payload_must_be_an_object(service):
    for payload in (None, [], "x", 5):
        err = submit(service, payload)
        assert isinstance(err, ApiError) and err.code == "bad_request" and err.http_status == 400


def test_all_errors_are_listed(service):
    err = submit(service, {"steps": 0, "cfg_scale": 99, "seed_resize_from_h": 512})
    assert {e["field"] for e in err.errors} == {"steps", "cfg_scale", "seed_resize_from_h"}


# ---------------------------------------------------------------------------------------------- ControlNet
def test_module_names_come_from_the_engine_registry(service):
    """engine.controlnet.preprocessors decides: the error lists every module it can run offline."""
    from engine.controlnet.preprocessors import PREPROCESSORS

    err = assert_refused(service, cn(unit(module="seg_ufade20k")), f"{CN}.module")
    assert "not available in this engine" in err.message and "UniFormer" in err.message
    assert [m for m in PREPROCESSORS if m not in err.allowed.split(", ")] == []
    assert "not supported" in assert_refused(service, cn(unit(module="shuffle")), f"{CN}.module").message


UNIT_FIELDS = {
    "enabled": ([True, False], ["yes", 2]),
    "module": (["none", "canny", "Canny", "invert", "threshold", "blur_gaussian", "scribble_xdog", "lineart_standard",
                "invert (from white bg & black line)", "t2ia_color_grid"],
               ["depth_midas_bogus", "seg_ufade20k", "reference_adain", 5]),
    "weight": ([0, 1, 2, 0.5], [-0.1, 2.1, "1"]),
    "guidance_start": ([0, 0.5], [-0.1, 1.1, "0"]),
    "guidance_end": ([1, 0.5], [1.5, -1]),
    "resize_mode": (["Just Resize", "Crop and Resize", "Resize and Fill", "just resize", 0, 1, 2,
                     "Inner Fit (Scale to Fit)", "Envelope (Outer Fit)"], [3, "Stretch", True, 1.5]),
    "processor_res": ([-1, 512, 64, -100, 99999], [1.5, "512", 2**40]),  # out of the preprocessor's range: its default
    "threshold_a": ([-1, 100, 0.5], ["100", float("nan")]),
    "threshold_b": ([-1, 200], [[1]]),
    "control_mode": (["Balanced", "My prompt is more important", "ControlNet is more important", 0, 1, 2],
                     ["Equal", 3]),
    "pixel_perfect": ([True, False, "true"], ["maybe"]),
    "save_detected_map": ([True, False], [None]),
    "low_vram": ([True, False], ["x"]),
    "guess_mode": ([False], [True]),
}


@pytest.mark.parametrize("key", ["units", "args"])
@pytest.mark.parametrize("name,value", [(k, v) for k, (ok, _) in UNIT_FIELDS.items() for v in ok])
def test_unit_field_accepts(service, key, name, value):
    assert isinstance(submit(service, cn(unit(**{name: value}), key=key)), dict)


@pytest.mark.parametrize("name,value", [(k, v) for k, (_, bad) in UNIT_FIELDS.items() for v in bad])
def test_unit_field_rejects(service, name, value):
    code = "not_supported" if name == "guess_mode" else "invalid_request"
    assert_refused(service, cn(unit(), unit(**{name: value})), f"alwayson_scripts.controlnet.units[1].{name}", code)
    assert_refused(service, cn(unit(**{name: value}), key="args"), f"alwayson_scripts.controlnet.args[0].{name}",
                   code)


def test_unit_translation():
    payload = cn(unit(module="Canny", weight=0.5, guidance_start=0.1, guidance_end=0.9, resize_mode=0,
                      processor_res=256, threshold_a=50, threshold_b=150, control_mode=2, pixel_perfect=True,
                      input_image=png_b64(24, 16, (1, 2, 3))),
                 unit(enabled=False, model=None, input_image=None))
    t = translate(parse_payload(payload), EngineConfig())
    (u,) = t.request.controlnet_units
    assert (u.model, u.module, u.weight, u.guidance_start, u.guidance_end) == ("control_canny", "canny", 0.5, 0.1, 0.9)
    assert (u.resize_mode, u.processor_res, u.threshold_a, u.threshold_b) == ("Just Resize", 256, 50, 150)
    assert (u.control_mode, u.pixel_perfect) == ("ControlNet is more important", True)
    # the request keeps the compressed file (what a queued task holds), decoded when the unit runs
    assert isinstance(u.image, EncodedImage) and u.image.shape == (16, 24, 3) and u.image.nbytes < 200
    pixels = as_array(u.image)
    assert pixels.shape == (16, 24, 3) and pixels.dtype.name == "uint8" and tuple(pixels[5, 5]) == (1, 2, 3)
    echoed = t.parameters["alwayson_scripts"]["controlnet"]["units"][0]["input_image"]
    assert echoed.startswith("<image: ") or len(echoed) <= 256


@pytest.mark.parametrize("fields,field", [
    ({"model": None}, "model"),
    ({"input_image": None}, "input_image"),
    ({"input_image": ""}, "input_image"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_end"),
    ({"image": png_b64(8, 8, (9, 9, 9))}, "image"),  # input_image and image both given and different
])
def test_unit_cross_field_rules(service, fields, field):
    assert_refused(service, cn(unit(**fields)), f"{CN}.{field}")


def test_units_limits(service):
    assert_refused(service, cn(*[unit()] * 11), "alwayson_scripts.controlnet.units")
    assert_refused(service, {"alwayson_scripts": {"controlnet": {"units": [unit()], "args": [unit()]}}},
                   "alwayson_scripts.controlnet.args")
    assert_refused(service, {"alwayson_scripts": {"controlnet": {"units": [5]}}}, CN)
    assert_refused(service, {"alwayson_scripts": {"controlnet": {"units": {"model": "x"}}}},
                   "alwayson_scripts.controlnet.units")
    assert isinstance(submit(service, {"alwayson_scripts": {"ControlNet": {"args": [unit()]}}}), dict)


# ------------------------------------------------------------------------------------------- input images
# The decoding itself is engine.controlnet.images.decode_image (tests/test_controlnet_images.py); these check
# that submit runs it on each unit's image with the service's limits and reports the unit's field path.
def _unit_image(payload, **service_limits):
    from api_compat.images import ImageLimits

    units = translate(parse_payload(payload), EngineConfig(), ImageLimits(**service_limits)).request.controlnet_units
    return as_array(units[0].image)


def test_image_encodings(service):
    b64 = png_b64(8, 8, (200, 100, 50))
    for value in (b64, "data:image/png;base64," + b64, b64[:40] + "\n" + b64[40:], b64.rstrip("="),
                  png_b64(8, 8, (200, 100, 50), fmt="BMP"), "  " + b64 + "  "):
        assert isinstance(submit(service, cn(unit(input_image=value))), dict)
        arr = _unit_image(cn(unit(input_image=value)))
        assert arr.shape == (8, 8, 3) and tuple(arr[0, 0]) == (200, 100, 50)
    jpeg = _unit_image(cn(unit(input_image=png_b64(8, 8, (200, 100, 50), fmt="JPEG"))))
    assert abs(int(jpeg[0, 0, 0]) - 200) < 8, "JPEG decodes to the colour within compression error"
    assert isinstance(submit(service, cn(unit(input_image=None, image="data:image/png;base64," + b64))), dict)
    assert tuple(_unit_image(cn(unit(input_image=None, image=b64)))[0, 0]) == (200, 100, 50)


def _bomb_b64(width, height):
    """A small PNG that decodes to width x height pixels (a decompression bomb when large)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(b"\x00" * (width + 1) * 64, 9)  # only the first rows: the header is what matters
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


@pytest.mark.parametrize("value,why", [
    ("not base64 at all!!", "base64"),
    ("aGVsbG8gd29ybGQ=", "not a readable image"),  # valid base64, not an image
    ("data:image/png;base64", "data URI"),
    ("data:text/html,<b>x</b>", "data URI"),
    ("http://127.0.0.1:1/x.png", "URLs are not allowed"),
    ("https://example.com/x.png", "URLs are not allowed"),
    ("file:///etc/passwd", "base64"),
    (_bomb_b64(5000, 5000), "pixels"),
    (_bomb_b64(100000, 100000), "pixels"),
    (_bomb_b64(1, 20_000_000), "pixels"),
])
def test_bad_images(service, value, why):
    err = assert_refused(service, cn(unit(input_image=value)), f"{CN}.input_image")
    assert why in str(err), err
    alias = assert_refused(service, cn(unit(input_image=None, image=value)), f"{CN}.image")
    assert why in str(alias), alias


def test_service_image_limits(tmp_path):
    big = base64.b64encode(b"\x89PNG" + b"\x00" * 2000).decode()
    with TaskService(tmp_path / "m", results_dir=tmp_path / "r", engine_factory=double_factory, check_models=False,
                      max_image_bytes=1000, max_image_pixels=63 * 63) as svc:
        assert "larger than 1000 bytes" in str(assert_refused(svc, cn(unit(input_image=big)), f"{CN}.input_image"))
        err = assert_refused(svc, cn(unit(input_image=png_b64(64, 64))), f"{CN}.input_image")
        assert "too many pixels" in str(err)
        assert isinstance(submit(svc, cn(unit(input_image=png_b64(63, 63)))), dict)


def test_url_fetch_when_allowed(tmp_path):
    body = base64.b64decode(png_b64(8, 8, (7, 8, 9)))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/ok.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ok.png"
        local = {"allow_url_fetch": True, "allow_private_urls": True}  # a loopback server: private allowed
        assert tuple(_unit_image(cn(unit(input_image=url)), **local)[0, 0]) == (7, 8, 9)
        with pytest.raises(InvalidRequest, match="could not be fetched") as exc:
            _unit_image(cn(unit(input_image=url.replace("ok", "missing"))), **local)
        assert exc.value.field == f"{CN}.input_image"
        with pytest.raises(InvalidRequest, match="larger than 10 bytes"):
            _unit_image(cn(unit(input_image=url)), **local, max_bytes=10)
        with pytest.raises(InvalidRequest, match="URLs are not allowed"):
            _unit_image(cn(unit(input_image=url)))
        with pytest.raises(InvalidRequest, match="private, loopback or link-local"):  # loopback: not by default
            _unit_image(cn(unit(input_image=url)), allow_url_fetch=True)
    finally:
        server.shutdown()
        server.server_close()


def test_field_path_format():
    assert field_path(("alwayson_scripts", "controlnet", "units", 1, "weight")) == \
        "alwayson_scripts.controlnet.units[1].weight"


def test_openapi_schema_lists_every_seed_field():
    props = Txt2ImgPayload.model_json_schema()["properties"]
    seed = ["stable_diffusion_model", "sd_vae", "clip_skip", "prompt", "negtive_prompt", "batch_size", "steps",
            "cfg_scale", "width", "height", "sampler_name", "seed", "alwayson_scripts"]
    assert not [f for f in seed if f not in props]


def test_masks_are_limited_by_bytes_and_pixels_not_characters(service):
    """A real mask (a feathered PNG far over the prompt's 65,536 characters as base64) is accepted; one over the
    server's pixel limit is refused naming `mask` in pixels, never in characters; width 100 is "not a multiple
    of 8", not out of range."""
    import io

    import numpy as np
    from PIL import Image

    def png(array):
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode()

    rng = np.random.default_rng(0)
    feathered = png((rng.random((256, 256)) * 255).astype(np.uint8))  # noise: incompressible, ~90 KB of base64
    assert len(feathered) > 65536
    init = png(np.zeros((256, 256, 3), np.uint8))
    service.check({"init_images": [init], "mask": feathered, "width": 256, "height": 256}, kind="img2img")
    limited = TaskService(service.configs["default"].models_dir, results_dir=service.results_dir / "limited",
                          engine_factory=double_factory, max_image_pixels=128 * 128)
    try:
        with pytest.raises(ApiError) as info:
            limited.check({"init_images": [png(np.zeros((64, 64, 3), np.uint8))], "mask": feathered},
                          kind="img2img")
    finally:
        limited.close()
    assert info.value.field == "mask" and "pixels" in str(info.value) and "character" not in str(info.value)
    with pytest.raises(ApiError) as info:
        service.check({"width": 100})
    assert info.value.field == "width" and "not a multiple of 8" in str(info.value)
