"""Engine configuration: which backend, device and precision, where the model store is."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from core.cpu import native_bf16 as cpu_native_bf16
from core.errors import InvalidRequest
from engine.rules import MAX_SIZE
from engine.tiling import VaeTiling

# Where files live (docs/API.md "Where files live"): one home, each part movable on its own
ENV_HOME = "SDENGINE_HOME"
ENV_MODELS_DIR = "SDENGINE_MODELS_DIR"
ENV_CACHE_DIR = "SDENGINE_CACHE_DIR"
ENV_RESULTS_DIR = "SDENGINE_RESULTS_DIR"
ENV_DEFAULT_MODEL = "SDENGINE_DEFAULT_MODEL"
CONFIG_FILE = "config.json"  # in the home: user settings (``default_model``), written by ``sdengine models default``


class BackendKind(str, Enum):
    """The runtimes a model can run on (the backend objects themselves: engine.backends.Backend)."""

    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TORCH = "torch"
    TENSORRT = "tensorrt"


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # openvino only: the UNet quantized by NNCF (engine.backends.int8), the rest in bf16/f32


def _enum(enum: type[Enum], value, field_name: str):
    if isinstance(value, enum):
        return value
    try:
        return enum(str(value).lower())
    except ValueError:
        raise InvalidRequest(field_name, f"unknown value {value!r}", ", ".join(e.value for e in enum)) from None


def _absolute(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().absolute()


def sdengine_home() -> Path:
    """``$SDENGINE_HOME``, else ``$XDG_DATA_HOME/sdengine``, else ``~/.local/share/sdengine`` (absolute)."""
    if os.environ.get(ENV_HOME):
        return _absolute(os.environ[ENV_HOME])
    data = os.environ.get("XDG_DATA_HOME") or Path("~") / ".local" / "share"
    return _absolute(Path(data) / "sdengine")


def config_file() -> Path:
    """The user settings file: ``{home}/config.json``."""
    return sdengine_home() / CONFIG_FILE


def read_settings() -> dict:
    """The settings file's JSON object ({} when absent or unreadable: a broken file never stops a command)."""
    import json
    import logging

    path = config_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logging.getLogger(__name__).warning("ignoring the settings file %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def write_settings(**changes) -> Path:
    """Set (or, with None, remove) keys of the settings file, written atomically; returns its path."""
    import json

    from core.atomic import atomic_file

    data = read_settings()
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = config_file()
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def configured_default_model() -> tuple[str | None, str]:
    """The default checkpoint the user configured and where it comes from: ``$SDENGINE_DEFAULT_MODEL``, else
    ``default_model`` of the settings file (``sdengine models default NAME``), else (None, "bundled demo
    model"): the store's rule (engine.models.store.ModelStore.default_checkpoint)."""
    if os.environ.get(ENV_DEFAULT_MODEL):
        return os.environ[ENV_DEFAULT_MODEL], f"${ENV_DEFAULT_MODEL}"
    value = read_settings().get("default_model")
    if isinstance(value, str) and value:
        return value, str(config_file())
    return None, "none configured: the bundled demo model, else the store's first checkpoint"


def _default_model() -> str | None:
    return configured_default_model()[0]


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def default_backend(device: str, openvino: bool | None = None) -> BackendKind:
    """The backend when none is asked: on CPU openvino (the fastest measured, docs/DECISIONS.md) when the
    ``openvino`` package is installed, else onnxruntime; on CUDA onnxruntime."""
    if device == "cpu" and (openvino_installed() if openvino is None else openvino):
        return BackendKind.OPENVINO
    return BackendKind.ONNXRUNTIME


def default_precision(backend: BackendKind, device: str, native_bf16: bool | None = None) -> Precision:
    """The precision when none is asked: bf16 for openvino on a CPU with native bf16 (AVX512-BF16/AMX),
    fp32 everywhere else."""
    if backend == BackendKind.OPENVINO and device == "cpu":
        if native_bf16 is None:
            native_bf16 = cpu_native_bf16()
        if native_bf16:
            return Precision.BF16
    return Precision.FP32


def default_models_dir() -> Path:
    """``$SDENGINE_MODELS_DIR``, else ``{home}/models``."""
    return _absolute(os.environ.get(ENV_MODELS_DIR) or sdengine_home() / "models")


def default_cache_dir(models_dir: str | os.PathLike) -> Path:
    """``$SDENGINE_CACHE_DIR``, else ``{models_dir}/cache``."""
    return _absolute(os.environ.get(ENV_CACHE_DIR) or Path(models_dir) / "cache")


def default_results_dir() -> Path:
    """``$SDENGINE_RESULTS_DIR``, else ``{home}/outputs``."""
    return _absolute(os.environ.get(ENV_RESULTS_DIR) or sdengine_home() / "outputs")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. ``device`` is "cpu" or "cuda[:N]"; ``providers`` overrides the ORT provider list.

    ``backend`` and ``precision`` left unset (None) are resolved here: :func:`default_backend` and
    :func:`default_precision`; the resolved values are what the config holds.
    """

    models_dir: Path = field(default_factory=default_models_dir)
    backend: BackendKind | None = None
    device: str = "cpu"
    precision: Precision | None = None
    default_model: str | None = field(default_factory=_default_model)  # $SDENGINE_DEFAULT_MODEL, config.json
    providers: tuple[str, ...] | None = None
    cache_dir: Path | None = None  # default: $SDENGINE_CACHE_DIR, else models_dir / "cache"
    max_batch_size: int = 8
    max_size: int = MAX_SIZE
    max_prompt_chunks: int = 32
    allow_pickle: bool = False
    torch_compile: bool = False
    num_threads: int | None = None
    vae_tiling: VaeTiling = field(default_factory=VaeTiling)  # tiled VAE decode above a size (engine.tiling)

    def __post_init__(self):
        object.__setattr__(self, "models_dir", _absolute(self.models_dir))
        object.__setattr__(self, "cache_dir", _absolute(self.cache_dir) if self.cache_dir
                           else default_cache_dir(self.models_dir))
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InvalidRequest("device", f"unknown device {self.device!r}", "cpu, cuda, cuda:N")
        backend = default_backend(self.device) if self.backend is None else _enum(BackendKind, self.backend, "backend")
        object.__setattr__(self, "backend", backend)
        precision = (default_precision(backend, self.device) if self.precision is None
                     else _enum(Precision, self.precision, "precision"))
        if precision == Precision.INT8 and backend != BackendKind.OPENVINO:
            raise InvalidRequest("precision", f"int8 runs on the openvino backend only (this is {backend.value})",
                                 "fp32, fp16, bf16")
        object.__setattr__(self, "precision", precision)

    @property
    def artefacts_dir(self) -> Path:
        return self.cache_dir
