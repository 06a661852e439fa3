"""The sd-webui-controlnet extension's routes (``/controlnet/...``) as :class:`ControlNetRoutes`.

``/controlnet/detect`` is a task like a generation: the service checks the body and decodes the images
(:func:`api_compat.detect.parse_detect`), the preprocessors run on the task backend's worker
(:func:`api_compat.detect.run_detect`), and the route waits for the detected maps. Nothing is computed in the
API process but ``/controlnet/render_openpose_json``'s drawing (a few shapes on a bounded canvas, on a thread:
:mod:`engine.controlnet.openpose`)."""

# no "from __future__ import annotations": FastAPI must see the real Request type of the route methods

import asyncio
from typing import Any

from fastapi import Request

from core.errors import InvalidRequest
from engine.controlnet.openpose import render_pose
from engine.controlnet.preprocessors import CONTROL_TYPES, not_run_here, sorted_preprocessors
from engine.models.checkpoints import Kind

from api_compat.errors import ApiError, api_error_from
from api_compat.images import png_base64
from api_compat.schema import MAX_UNITS
from api_compat.webui.routes import RouteSet, json_body, route

CONTROLNET_API_VERSION = 2  # sd-webui-controlnet external_code.get_api_version()
MAX_POSES = 16  # poses in one render_openpose_json call


def modules(alias_names: bool) -> dict[str, Any]:
    """``/controlnet/module_list``: the preprocessors the engine runs, in the extension's order, with their
    sliders as the extension describes them (``model_free``: the module needs no ControlNet model); then the
    extension's modules that do not run here, each with no sliders and ``sdengine_unavailable`` (why; a request
    for it is refused naming the field), so that the list has every module the extension has."""
    listed = sorted_preprocessors()
    names = [(p.label or p.name) if alias_names else p.name for p in listed]
    detail = {name: {"model_free": p.model_free, "sliders": [s.api_json() for s in p.sliders().values()]}
              for name, p in zip(names, listed)}
    for name, label, model_free, why in not_run_here():
        shown = label if alias_names else name
        names.append(shown)
        detail[shown] = {"model_free": model_free, "sliders": [], "sdengine_unavailable": why}
    return {"module_list": names, "module_detail": detail}


# model-name words of each control type beside its own name (the extension's Preprocessor.tag_to_filters)
_TYPE_FILTERS = {"instructp2p": ("ip2p",), "segmentation": ("seg",), "normalmap": ("normal",),
                 "t2i-adapter": ("t2i_adapter", "t2iadapter", "t2ia"), "ip-adapter": ("ip_adapter", "ipadapter"),
                 "openpose": ("openpose", "densepose"), "instant-id": ("instant_id", "instantid"),
                 "scribble": ("sketch",), "tile": ("blur",)}
# control types a ControlNet union model serves (the extension's ControlNetUnionControlType.all_tags)
_UNION_TYPES = ("openpose", "depth", "softedge", "scribble", "canny", "lineart", "mlsd", "normalmap",
                "segmentation", "inpaint", "tile")


def control_types(model_titles: list[str]) -> dict[str, Any]:
    """``/controlnet/control_types``: every control type of the extension with the modules this engine runs
    for it (its UI labels; "none" always) and the store's models whose names match it, as the extension
    filters them; ``default_option``/``default_model`` as the extension picks them ("none"/"None" when the
    type has nothing here)."""
    listed = sorted_preprocessors()
    models = ["None", *model_titles]
    out = {}
    for kind in CONTROL_TYPES:
        if kind == "All":
            out[kind] = {"module_list": [p.label or p.name for p in listed], "model_list": models,
                         "default_option": "none", "default_model": "None"}
            continue
        pattern = kind.lower()
        words = {pattern, *_TYPE_FILTERS.get(pattern, ()), *(("union",) if pattern in _UNION_TYPES else ())}
        fitting = [m for m in models if m.lower() == "none" or any(w in m.lower() for w in words)]
        default_model = "None"
        if len(fitting) > 1:
            default_model = next((m for m in fitting if "11" in m.split("[")[0]), fitting[1])
        modules = [p.label or p.name for p in listed if kind in p.tags or p.name == "none"]
        out[kind] = {"module_list": modules, "model_list": fitting,
                     "default_option": modules[1] if len(modules) > 1 else modules[0],
                     "default_model": default_model}
    return {"control_types": out}


def model_titles(store) -> list[str]:
    """``/controlnet/model_list``: the store's ControlNet models as the extension names them ('name [hash]')."""
    return [store.controlnet_title(e) for e in store.entries(Kind.CONTROLNET)]


class ControlNetRoutes(RouteSet):
    """sd-webui-controlnet's API (version, settings, model and module lists, detect)."""

    @route("GET", "/controlnet/version", summary="sd-webui-controlnet API version")
    async def cn_version(self):
        return {"version": CONTROLNET_API_VERSION}

    @route("GET", "/controlnet/settings", summary="sd-webui-controlnet settings clients read (unit count)")
    async def cn_settings(self):
        return {"control_net_unit_count": MAX_UNITS}

    @route("GET", "/controlnet/model_list", summary="ControlNet models ('name [hash]')")
    async def cn_model_list(self, update: bool = True):
        return {"model_list": await asyncio.to_thread(lambda: model_titles(self.state.store))}

    @route("GET", "/controlnet/module_list", summary="Preprocessors (those that do not run here flagged sdengine_unavailable), with their sliders")
    async def cn_module_list(self, alias_names: bool = False):
        return modules(alias_names)

    @route("GET", "/controlnet/control_types", summary="Control types: their modules here and fitting models")
    async def cn_control_types(self):
        return control_types(await asyncio.to_thread(lambda: model_titles(self.state.store)))

    @route("POST", "/controlnet/render_openpose_json", summary="Draw OpenPose JSON poses (base64 PNG each)",
           openapi_extra=json_body({"type": "array", "maxItems": MAX_POSES, "items": {
               "type": "object", "required": ["people", "canvas_width", "canvas_height"], "properties": {
                   "people": {"type": "array"}, "canvas_width": {"type": "integer"},
                   "canvas_height": {"type": "integer"}}}}))
    async def cn_render_openpose_json(self, request: Request):
        try:
            body = await self.read_json(request)
            if not isinstance(body, list) or len(body) > MAX_POSES:
                raise ApiError("invalid_request", "the body must be a list of OpenPose JSON objects",
                               allowed=f"a list of at most {MAX_POSES} poses")
            if not body:
                return {"info": "No pose data detected."}

            def draw() -> list[str]:  # a few shapes on a bounded canvas: drawn here, not queued
                return [png_base64(render_pose(pose, f"[{i}]")) for i, pose in enumerate(body)]

            try:
                images = await asyncio.to_thread(draw)
            except InvalidRequest as exc:
                raise api_error_from(exc) from None
            return {"images": images, "info": "Success"}
        except ApiError as exc:
            return self.failure(exc)

    @route("POST", "/controlnet/detect", summary="Run a preprocessor on images (detected maps as base64 PNG)",
           openapi_extra=json_body({"type": "object", "properties": {
               "controlnet_module": {"type": "string"},
               "controlnet_input_images": {"type": "array", "items": {"type": "string"}, "maxItems": 16},
               "controlnet_processor_res": {"type": "number"}, "controlnet_threshold_a": {"type": "number"},
               "controlnet_threshold_b": {"type": "number"}, "controlnet_masks": {"type": "array"},
               "low_vram": {"type": "boolean"}}}))
    async def cn_detect(self, request: Request):
        try:
            body = await self.read_json(request)
            # validated (and the images decoded) on a thread: the submit is as heavy as a txt2img with units
            result = await self.run_task(request, "detect", self.service.controlnet_detect, body, track=False)
            images = await self.images_of(result["_task_id"], len(result.get("images") or []))
            answer: dict[str, Any] = {"info": "Success"}
            poses = (result.get("info") or {}).get("poses")
            if poses:  # the extension's: the openpose modules' pose JSON, one per image, before the images
                answer["poses"] = poses
            answer["images"] = images
            return answer
        except ApiError as exc:
            return self.failure(exc)
