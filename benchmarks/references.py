"""The reference implementations that benchmarks time against and tests compare with.

k-diffusion's ``sampling.py`` / ``external.py`` are loaded from the installed package without its
``__init__`` (which imports torchvision, wandb, ...). k-diffusion is a dev/benchmark dependency, never a runtime one.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def load_kdiffusion() -> types.ModuleType:
    """A package-like module with ``sampling`` and ``external`` of the installed k-diffusion (ImportError if
    it is not installed)."""
    if "_kdiff_ref" in sys.modules:
        return sys.modules["_kdiff_ref"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    root = Path(spec.origin).parent
    pkg = types.ModuleType("_kdiff_ref")
    pkg.__path__ = [str(root)]
    utils = types.ModuleType("_kdiff_ref.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules["_kdiff_ref"] = pkg
    sys.modules["_kdiff_ref.utils"] = utils
    for name in ("sampling", "external"):
        mspec = importlib.util.spec_from_file_location(f"_kdiff_ref.{name}", root / f"{name}.py")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mspec.name] = module
        mspec.loader.exec_module(module)
        setattr(pkg, name, module)
    return pkg
