"""The sd-webui-controlnet extension's routes (``/controlnet/...``) as :class:`ControlNetRoutes`.

``/controlnet/detect`` is a task like a generation: the service checks the body and decodes the images
(:func:`api_compat.detect.parse_detect`), the preprocessors run on the task backend's worker
(:func:`api_compat.detect.run_detect`), and the route waits for the detected maps. Nothing is computed in the
API process."""

# no "from __future__ import annotations": FastAPI must see the real Request type of the route methods

import asyncio
from typing import Any

from fastapi import Request

from engine.controlnet.preprocessors import ALIASES, PREPROCESSORS
from engine.models.checkpoints import Kind

from api_compat.errors import ApiError
from api_compat.schema import MAX_UNITS
from api_compat.webui.routes import RouteSet, json_body, route

CONTROLNET_API_VERSION = 2  # sd-webui-controlnet external_code.get_api_version()


def modules(alias_names: bool) -> dict[str, Any]:
    """``/controlnet/module_list``: the preprocessors the engine runs, with their sliders."""
    labels = {v: k for k, v in ALIASES.items()}
    names = [labels.get(n, n) if alias_names else n for n in PREPROCESSORS]
    detail = {}
    for name, pre in PREPROCESSORS.items():
        sliders = []
        for label, param in (("Preprocessor Resolution", pre.resolution), ("Threshold A", pre.threshold_a),
                             ("Threshold B", pre.threshold_b)):
            if param is not None:
                sliders.append({"name": label, "value": param.default, "min": param.minimum, "max": param.maximum})
        detail[labels.get(name, name) if alias_names else name] = {"model_free": True, "sliders": sliders}
    return {"module_list": names, "module_detail": detail}


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

    @route("GET", "/controlnet/module_list", summary="Preprocessors this engine runs (model-free ones)")
    async def cn_module_list(self, alias_names: bool = False):
        return modules(alias_names)

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
            return {"images": images, "info": "Success"}
        except ApiError as exc:
            return self.failure(exc)
