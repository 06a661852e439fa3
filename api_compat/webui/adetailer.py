"""The ADetailer extension's routes (``/adetailer/v1/...``) as :class:`ADetailerRoutes`: its version, the
detector models installed here (engine.adetailer.detectors: MediaPipe models whose weights are found, the YOLO
files of ``models/adetailer``) and the JSON schema of a tab (api_compat.adetailer.TabPayload)."""

# no "from __future__ import annotations": FastAPI must see the real types of the route methods

import asyncio

from engine.adetailer import VERSION, Detectors

from api_compat.adetailer import TabPayload
from api_compat.webui.routes import RouteSet, route


class ADetailerRoutes(RouteSet):
    """Bing-su/adetailer's API (``add_api_endpoints``)."""

    @route("GET", "/adetailer/v1/version", summary="The ADetailer version this engine follows")
    async def ad_version(self):
        return {"version": VERSION}

    @route("GET", "/adetailer/v1/schema", summary="The JSON schema of one ADetailer tab (its args)")
    async def ad_schema(self):
        return TabPayload.model_json_schema()

    @route("GET", "/adetailer/v1/ad_model", summary="The ADetailer detector models installed here")
    async def ad_model(self):
        return {"ad_model": await asyncio.to_thread(lambda: Detectors(self.state.store.root).names())}
