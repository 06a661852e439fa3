"""Image models (upscalers, restorers) through spandrel: its architecture registry and the loading of a file into
a spandrel ``ModelDescriptor`` (the architecture and its hyper-parameters detected from the state dict).

spandrel (MIT) imports every architecture it knows at import time, two of them (LaMa, RestoreFormer) through
torchvision. Where torchvision cannot be imported (absent, or a build that does not match torch: a CUDA
torchvision beside a CPU torch) the registry is built from spandrel's own architecture modules without those two,
in spandrel's detection order: every upscaler this engine lists keeps working (docs/DECISIONS.md, "Model
upscalers through spandrel"). The non-commercial architectures of ``spandrel_extra_arches`` are added only when
asked for (``SDENGINE_SPANDREL_EXTRA_ARCHES=1``), never by default.

Files are read without running pickled code: safetensors, or ``torch.load(weights_only=True)`` for .pth/.pt.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
import types
from pathlib import Path
from typing import Any

from core.errors import MissingDependency, ModelError
from core.lazy import require

log = logging.getLogger(__name__)

EXTRA_ARCHES_ENV = "SDENGINE_SPANDREL_EXTRA_ARCHES"
# spandrel 0.4's MAIN_REGISTRY, in its order (detection order follows it); the two that need torchvision last
_ARCHES = ("Compact", "SwiftSRGAN", "HAT", "GRL", "Swin2SR", "SwinIR", "GFPGAN", "RestoreFormer", "LaMa", "OmniSR",
           "SCUNet", "FBCNN", "Uformer", "RGT", "DAT", "CRAFT", "KBNet", "DITN", "MMRealSR", "SPAN", "RealCUGAN",
           "SAFMN", "SAFMNBCIE", "DCTLSA", "FFTformer", "NAFNet", "ATD", "MixDehazeNet", "DRUNet", "DnCNN", "IPT",
           "DRCT", "ESRGAN", "PLKSR", "RetinexFormer", "HVICIDNet", "SeemoRe", "MoSR", "MoESR", "RCAN", "FDAT",
           "AuraSR")
_NEEDS_TORCHVISION = frozenset({"LaMa", "RestoreFormer"})
_lock = threading.Lock()
_registry: Any = None


def _torchvision_usable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build for another torch: its ops fail to register
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def _partial_registry():
    """spandrel's architectures without the ones that import torchvision, loaded without ``spandrel/__init__``
    (which imports them all)."""
    spec = importlib.util.find_spec("spandrel")
    root = str(Path(spec.origin).parent)
    package = types.ModuleType("spandrel")
    package.__path__ = [root]
    package.__file__ = spec.origin
    package.__package__ = "spandrel"
    package.__spec__ = importlib.util.spec_from_file_location("spandrel", spec.origin,
                                                               submodule_search_locations=[root])
    sys.modules["spandrel"] = package
    registry_module = importlib.import_module("spandrel.__helpers.registry")
    registry = registry_module.ArchRegistry()
    supports = []
    for name in _ARCHES:
        if name in _NEEDS_TORCHVISION:
            continue
        module = importlib.import_module(f"spandrel.architectures.{name}")
        supports.append(registry_module.ArchSupport.from_architecture(getattr(module, f"{name}Arch")()))
    registry.add(*supports)
    # the package's public names that do not import the rest (spandrel_extra_arches reads MAIN_REGISTRY)
    descriptor = importlib.import_module("spandrel.__helpers.model_descriptor")
    canonical = importlib.import_module("spandrel.__helpers.canonicalize")
    package.MAIN_REGISTRY = registry
    package.ArchRegistry, package.ArchSupport = registry_module.ArchRegistry, registry_module.ArchSupport
    package.UnsupportedModelError = registry_module.UnsupportedModelError
    package.canonicalize_state_dict = canonical.canonicalize_state_dict
    for name in ("ImageModelDescriptor", "MaskedImageModelDescriptor", "ModelDescriptor", "Architecture",
                 "SizeRequirements", "ModelTiling"):
        setattr(package, name, getattr(descriptor, name))
    log.info("spandrel: torchvision is not usable here; %d architectures loaded without %s", len(supports),
             ", ".join(sorted(_NEEDS_TORCHVISION)))
    return registry


def registry():
    """spandrel's architecture registry (built once per process)."""
    global _registry
    with _lock:
        if _registry is not None:
            return _registry
        if importlib.util.find_spec("spandrel") is None:
            raise MissingDependency("spandrel", "upscalers", "model upscalers (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT)")
        if _torchvision_usable():
            import spandrel

            found = spandrel.MAIN_REGISTRY
        else:
            found = _partial_registry()
        if os.environ.get(EXTRA_ARCHES_ENV, "").strip().lower() in ("1", "true", "yes"):
            extra = require("spandrel_extra_arches", "upscalers",
                            f"the non-commercial architectures ({EXTRA_ARCHES_ENV}=1)")
            found.add(*extra.EXTRA_REGISTRY, ignore_duplicates=True)
        _registry = found
        return found


def read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a model file (safetensors, or a .pth/.pt/.ckpt pickle read with ``weights_only``)."""
    import torch

    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif suffix in (".pth", ".pt", ".ckpt", ".bin"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise ModelError(str(path), f"unsupported model file type {suffix!r} (.safetensors, .pth, .pt)")
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken file or forbidden pickle content: name the file
        raise ModelError(str(path), f"cannot be read as a model file: {exc}") from None
    if not isinstance(state, dict):
        raise ModelError(str(path), "holds no state dict")
    return state


def load_model(path: Path, device: str = "cpu"):
    """The spandrel ``ModelDescriptor`` of a model file, on ``device``, in eval mode. Raises ModelError naming
    the file when its architecture is not one spandrel knows."""
    found = registry()
    state = read_state_dict(path)
    for key in ("params_ema", "params", "state_dict", "model"):  # some trainers wrap the weights
        if key in state and isinstance(state[key], dict) and len(state) <= 3:
            state = state[key]
            break
    try:
        descriptor = found.load(state)
    except Exception as exc:  # noqa: BLE001 - UnsupportedModelError or a shape mismatch inside an arch
        raise ModelError(str(path), f"is not a model architecture spandrel knows ({type(exc).__name__}: "
                         f"{str(exc)[:200]})") from None
    return descriptor.to(device).eval()
