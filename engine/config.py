"""Engine configuration: which backend, device and precision, where the model store is."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from engine.errors import InvalidRequest

ENV_MODELS_DIR = "SDENGINE_MODELS_DIR"
DEFAULT_MODELS_DIR = "models"


class BackendKind(str, Enum):
    """The runtimes a model can run on (the backend objects themselves: engine.backends.Backend)."""

    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"
    TENSORRT = "tensorrt"


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


def _enum(enum: type[Enum], value, field_name: str):
    if isinstance(value, enum):
        return value
    try:
        return enum(str(value).lower())
    except ValueError:
        raise InvalidRequest(field_name, f"unknown value {value!r}", ", ".join(e.value for e in enum)) from None


def default_models_dir() -> Path:
    return Path(os.environ.get(ENV_MODELS_DIR) or DEFAULT_MODELS_DIR)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. ``device`` is "cpu" or "cuda[:N]"; ``providers`` overrides the ORT provider list."""

    models_dir: Path = field(default_factory=default_models_dir)
    backend: BackendKind = BackendKind.ONNXRUNTIME
    device: str = "cpu"
    precision: Precision = Precision.FP32
    default_model: str | None = None
    providers: tuple[str, ...] | None = None
    cache_dir: Path | None = None  # default: models_dir / "cache"
    max_batch_size: int = 8
    max_size: int = 2048
    max_prompt_chunks: int = 32
    allow_pickle: bool = False
    torch_compile: bool = False
    num_threads: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "models_dir", Path(self.models_dir))
        object.__setattr__(self, "backend", _enum(BackendKind, self.backend, "backend"))
        object.__setattr__(self, "precision", _enum(Precision, self.precision, "precision"))
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InvalidRequest("device", f"unknown device {self.device!r}", "cpu, cuda, cuda:N")

    @property
    def artefacts_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.models_dir / "cache"
