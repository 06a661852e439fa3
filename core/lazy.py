"""Lazy imports of optional dependencies with a message naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from core.errors import MissingDependency


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming ``pip install 'sdengine[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency(module, extra, purpose) from exc
