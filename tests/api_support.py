"""Shared pieces of the api_compat tests.

``engine_factory`` is THE seam for end-to-end runs: it returns the factory LocalService uses to build its
engine. Today it is :class:`EngineDouble` (a test double, below); at merge it becomes the real engine on the
tiny model with a one-line change (``return tiny_engine_factory``), and every test that uses the fixture then
runs the real engine. Tests that need behaviour a real engine cannot be made to show on demand (a failing
run, a run slow enough to cancel or kill) use :class:`EngineDouble` directly.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time

import numpy as np
import pytest

from engine.errors import Cancelled, InvalidRequest
from engine.request import GenerationRequest, GenerationResult

SEED_RE = re.compile(r"Seed: (\d+)")


class EngineDouble:
    """TEST DOUBLE of engine.pipeline.Engine -- not an engine. It follows the contract of ``generate``
    (progress per step, cancel between steps, one image per seed, webui-style infotext) and makes images
    whose pixels encode the seed (pixel [0, 0] = seed's 3 low bytes), so the tests can check that every
    image belongs to its own request. Prompt words trigger behaviour:
    ``FAIL`` raises RuntimeError, ``INVALID`` raises InvalidRequest, ``SLOW`` sleeps ``step_delay`` per step.
    """

    def __init__(self, config=None, *, step_delay: float = 0.05):
        self.config = config
        self.step_delay = step_delay
        self.calls = 0
        self.started = threading.Event()

    def generate(self, request: GenerationRequest, *, progress=None, cancel=None) -> GenerationResult:
        self.calls += 1
        self.started.set()
        if "FAIL" in request.prompt:
            raise RuntimeError("injected failure")
        if "INVALID" in request.prompt:
            raise InvalidRequest("prompt", "injected invalid request", "anything else")
        base = request.seed if request.seed != -1 else 1234
        count = request.batch_size * request.n_iter
        seeds = [base + i for i in range(count)]
        for step in range(request.steps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled at step {step}")
            if "SLOW" in request.prompt:
                time.sleep(self.step_delay)
            if progress is not None:
                progress(step + 1, request.steps)
        w, h = request.width or 64, request.height or 64
        images, infotexts = [], []
        for seed in seeds:
            img = np.zeros((h // 8, w // 8, 3), np.uint8)
            img[0, 0] = [(seed >> 16) & 255, (seed >> 8) & 255, seed & 255]
            images.append(img)
            neg = f"\nNegative prompt: {request.negative_prompt}" if request.negative_prompt else ""
            infotexts.append(f"{request.prompt}{neg}\nSteps: {request.steps}, Sampler: {request.sampler_name}, "
                             f"Schedule type: {request.scheduler}, CFG scale: {request.cfg_scale:g}, Seed: {seed}, "
                             f"Size: {w}x{h}")
        info = {"prompt": request.prompt, "seed": seeds[0], "all_seeds": seeds, "width": w, "height": h,
                "backend": "test-double"}
        return GenerationResult(images=images, infotexts=infotexts, info=info, seeds=seeds,
                                subseeds=[0] * count, timings={"total": 0.0})


def double_factory(config=None):
    return EngineDouble(config)


@pytest.fixture
def engine_factory():
    """The engine LocalService builds in end-to-end tests (swap here for the real tiny-model engine)."""
    return double_factory


def png_b64(width: int = 16, height: int = 16, color=(10, 20, 30), fmt: str = "PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def png_seed(path) -> int:
    """The seed written in a PNG's webui infotext (``parameters`` chunk)."""
    from PIL import Image

    with Image.open(path) as img:
        text = img.text["parameters"]
    return int(SEED_RE.search(text).group(1))
