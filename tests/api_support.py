"""Shared pieces of the api_compat tests.

``tiny_engine`` (fixture): the real engine (``engine.pipeline.Engine``, ONNX Runtime backend) on the session's
tiny models, as TaskService keyword arguments; the end-to-end tests run it. Tests that need behaviour a real
engine cannot be made to show on demand (a failing run, a run slow enough to cancel or kill) use
:class:`EngineDouble`, a TEST DOUBLE, directly.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time

import numpy as np
import pytest

from core.errors import Cancelled, InvalidRequest
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


_ENGINES: dict = {}


def shared_engine(config):
    """The real ``Engine(config)``, one per configuration for the whole test session (TaskService builds one
    per configuration it serves; sharing them across tests saves the model loads)."""
    engine = _ENGINES.get(config)
    if engine is None:
        from engine.pipeline import Engine

        engine = _ENGINES[config] = Engine(config)
    return engine


@pytest.fixture(scope="session")
def tiny_engine(tiny_store, tmp_path_factory):
    """``TaskService(results_dir=..., **tiny_engine)`` runs the real engine on the tiny models: ONNX Runtime
    (the default backend), ``tiny-sd1`` by default, exported ONNX and the hash cache in a session folder (the
    shared store stays read-only; the same folder from every test module, so the export happens once)."""
    cache = tmp_path_factory.getbasetemp() / "api-engine-cache"
    cache.mkdir(exist_ok=True)
    return {"models_dir": tiny_store, "cache_dir": cache, "backend": "onnxruntime", "default_model": "tiny-sd1",
            "engine_factory": shared_engine}


def png_b64(width: int = 16, height: int = 16, color=(10, 20, 30), fmt: str = "PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def png_infotext(path_or_bytes) -> str:
    """A PNG's webui infotext (``parameters`` text chunk)."""
    from PIL import Image

    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as img:
        assert img.format == "PNG"
        return img.text["parameters"]


def png_pixels(path_or_bytes) -> np.ndarray:
    from PIL import Image

    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as img:
        return np.asarray(img.convert("RGB"))


def png_seed(path_or_bytes) -> int:
    """The seed written in a PNG's webui infotext."""
    return int(SEED_RE.search(png_infotext(path_or_bytes)).group(1))


def wait_healthy(url: str, proc, console, timeout: float = 60.0, every: float = 0.2) -> None:
    """Poll a real server's ``GET {url}/health`` until it answers 200; fail with ``console()`` (the server's
    log tail) when its process ``proc`` exits first or ``timeout`` seconds pass."""
    import httpx

    end = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < end, console()
        time.sleep(every)
