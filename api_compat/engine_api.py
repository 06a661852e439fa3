"""The seams between api_compat and the engine: the engine protocol and factory, sampler names, ControlNet
preprocessor names and model-store lookups.

Each seam prefers the engine's own module (imported lazily, at first use) and falls back to the contract's
tables in API.md while that module is not there. This is the one file to touch when the engine's interfaces
change.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from engine.config import EngineConfig
from engine.errors import InvalidRequest, ModelNotFound
from engine.request import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@runtime_checkable
class EngineLike(Protocol):
    """What the task workers drive: ``engine.pipeline.Engine``, or anything with the same ``generate``.

    ``generate`` raises ``engine.errors.Cancelled`` when ``cancel`` is set, ``InvalidRequest``/``ModelError``
    for bad input; any other exception is an internal error of that task.
    """

    def generate(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult: ...


EngineFactory = Callable[[EngineConfig], EngineLike]


def default_engine_factory(config: EngineConfig) -> EngineLike:
    """The real engine: ``engine.pipeline.Engine(config)`` (imported when the first task runs)."""
    from engine.pipeline import Engine

    return Engine(config)


# ---------------------------------------------------------------------------------------------- samplers
# API.md "Samplers": webui name -> aliases. Used only while engine.samplers.resolve is not available.
SAMPLER_NAMES: dict[str, tuple[str, ...]] = {
    "DPM++ 2M": ("k_dpmpp_2m",),
    "DPM++ SDE": ("k_dpmpp_sde",),
    "DPM++ 2M SDE": ("k_dpmpp_2m_sde",),
    "DPM++ 2M SDE Heun": ("k_dpmpp_2m_sde_heun",),
    "DPM++ 2S a": ("k_dpmpp_2s_a",),
    "DPM++ 3M SDE": ("k_dpmpp_3m_sde",),
    "Euler a": ("k_euler_a",),
    "Euler": ("k_euler",),
    "LMS": ("k_lms",),
    "Heun": ("k_heun",),
    "DPM2": ("k_dpm_2",),
    "DPM2 a": ("k_dpm_2_a",),
    "DPM fast": ("k_dpm_fast",),
    "DPM adaptive": ("k_dpm_ad",),
    "Restart": ("restart",),
    "DDIM": ("ddim",),
    "PLMS": ("plms",),
    "UniPC": ("unipc",),
    "LCM": ("k_lcm",),
}
SCHEDULER_NAMES = (
    "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "Simple", "Normal",
    "DDIM", "Beta", "KL Optimal", "Align Your Steps",
)


@functools.lru_cache(maxsize=None)
def _engine_attr(module: str, attr: str):
    """``module.attr`` of the engine, or None while that part of the engine is not there (cached: a failed
    import is slow and the answer does not change while the process runs)."""
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        if exc.name and not module.startswith(exc.name):  # the module exists but one of its imports is missing
            raise
        return None
    except AttributeError:
        return None


def check_sampler(sampler_name: str, scheduler: str) -> None:
    """Raise ``InvalidRequest`` (field ``sampler_name`` or ``scheduler``) for names the engine does not know.

    Uses ``engine.samplers.resolve(sampler_name, scheduler)`` when it exists, else the table of API.md.
    """
    resolve = _engine_attr("engine.samplers", "resolve")
    if resolve is not None:
        resolve(sampler_name, scheduler)
        return
    _check_sampler_table(sampler_name, scheduler)


@functools.lru_cache(maxsize=1)
def _sampler_tables() -> tuple[dict[str, str], dict[str, str]]:
    names = {n.lower(): n for n in SAMPLER_NAMES}
    names.update({a.lower(): n for n, aliases in SAMPLER_NAMES.items() for a in aliases})
    return names, {s.lower(): s for s in SCHEDULER_NAMES}


def _check_sampler_table(sampler_name: str, scheduler: str) -> None:
    names, schedules = _sampler_tables()
    key = sampler_name.strip().lower()
    if key not in names:
        # "DPM++ 2M Karras" = sampler "DPM++ 2M" + schedule "Karras"
        for label in sorted(schedules, key=len, reverse=True):
            if key.endswith(" " + label) and key[: -len(label) - 1].strip() in names:
                key = key[: -len(label) - 1].strip()
                break
        else:
            raise InvalidRequest("sampler_name", f"unknown sampler {sampler_name!r}", ", ".join(SAMPLER_NAMES))
    if scheduler.strip().lower() not in schedules:
        raise InvalidRequest("scheduler", f"unknown scheduler {scheduler!r}", ", ".join(SCHEDULER_NAMES))


# -------------------------------------------------------------------------------------- ControlNet modules
# API.md "ControlNet unit": the preprocessors named there. Used while engine.controlnet has no registry.
CONTROLNET_MODULES = ("none", "canny", "invert", "threshold", "blur_gaussian", "scribble_xdog")


def controlnet_modules() -> tuple[str, ...]:
    """Preprocessor names the engine accepts (``engine.controlnet.preprocessors.PREPROCESSORS`` if present)."""
    registry = _engine_attr("engine.controlnet.preprocessors", "PREPROCESSORS")
    if registry:
        return tuple(registry)
    return CONTROLNET_MODULES


# ---------------------------------------------------------------------------------------------- model store
class ModelCatalog(Protocol):
    """Checks at submit that a model name exists in the store; raises ``ModelNotFound`` otherwise."""

    def check(self, kind: str, name: str, field: str) -> None: ...


MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".sft")
KIND_DIRS = {  # webui layout first, then flat
    "checkpoint": ("Stable-diffusion", "checkpoints", "."),
    "vae": ("VAE", "vae", "."),
    "controlnet": ("ControlNet", "controlnet", "."),
}


class DirectoryCatalog:
    """Model names looked up in the models directory: ``{dir}/{name}`` or ``{dir}/{name}{ext}``, exact name
    first, then case-insensitive, then the webui's ``"name [hash]"`` with the hash dropped (API.md).

    Stands in for ``engine.models.store.ModelStore`` until the store is wired in (see :func:`default_catalog`).
    Names are never joined to a path before they are checked to be plain names (schema.check_model_name).
    """

    def __init__(self, models_dir: str | os.PathLike):
        self.models_dir = Path(models_dir)

    def _entries(self, kind: str) -> list[str]:
        out: list[str] = []
        for sub in KIND_DIRS.get(kind, (".",)):
            folder = self.models_dir / sub
            try:
                out.extend(e.name for e in os.scandir(folder) if e.name != "cache")
            except OSError:
                continue
        return out

    def find(self, kind: str, name: str) -> str | None:
        entries = self._entries(kind)
        candidates = [name]
        if name.endswith("]") and " [" in name:
            candidates.append(name[: name.rindex(" [")])
        for fold in (False, True):
            table = {(e.lower() if fold else e): e for e in entries}
            for cand in candidates:
                c = cand.lower() if fold else cand
                if c in table:
                    return table[c]
                for ext in MODEL_EXTENSIONS:
                    if c + ext in table:
                        return table[c + ext]
        return None

    def check(self, kind: str, name: str, field: str) -> None:
        if self.find(kind, name) is None:
            raise ModelNotFound(field, f"no {kind} named {name!r} in the model store {self.models_dir}")


class StoreCatalog:
    """Lookups through ``engine.models.store.ModelStore(models_dir).resolve(name, kind)``."""

    def __init__(self, store):
        self.store = store

    def check(self, kind: str, name: str, field: str) -> None:
        self.store.resolve(name, kind)


def default_catalog(config: EngineConfig) -> ModelCatalog:
    """The engine's model store when it provides ``ModelStore.resolve``, else :class:`DirectoryCatalog`."""
    store_cls = _engine_attr("engine.models.store", "ModelStore")
    if store_cls is not None and hasattr(store_cls, "resolve"):
        return StoreCatalog(store_cls(config.models_dir))
    return DirectoryCatalog(config.models_dir)
