"""Lazy imports of optional and heavy dependencies: a message naming the extra to install, and one import at
a time.

transformers and diffusers resolve their top-level names lazily (``_LazyModule.__getattr__`` imports the
submodule on first access), and that first resolution is not thread-safe: two request threads of a freshly
started server asking for ``CLIPTokenizer`` at once got ``ImportError: cannot import name 'CLIPTokenizer'``.
:func:`load` and :func:`require` import under one process-wide lock, once per name; later calls do not lock.
Code outside a module's import (engine/, on a request or worker thread) takes these names through
:func:`load`, never with a bare ``from transformers import X``.
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType
from typing import Any

from core.errors import MissingDependency

_lock = threading.RLock()  # re-entrant: a module imported under it may load another one
_loaded: dict[tuple[str, str], Any] = {}


def load(module: str, name: str | None = None) -> Any:
    """``module`` imported (or its attribute ``name``, ``from module import name``), single-flight: the first
    call imports under the lock, concurrent first calls wait for it; a name, once resolved, is returned without
    the lock (a module always goes through ``sys.modules``, so a module made unimportable there stays so).
    Raises ImportError as the import statement would."""
    if name is None:
        if module in sys.modules:  # imported (or being imported: the import system waits for it)
            return importlib.import_module(module)
        with _lock:
            return importlib.import_module(module)
    key = (module, name)
    try:
        return _loaded[key]
    except KeyError:
        pass
    with _lock:
        if key not in _loaded:
            try:
                _loaded[key] = getattr(importlib.import_module(module), name)
            except AttributeError:
                raise ImportError(f"cannot import name {name!r} from {module!r}", name=module) from None
        return _loaded[key]


def load_all(module: str, *names: str) -> tuple[Any, ...]:
    """Several names of one module (``from module import a, b``), each through :func:`load`."""
    return tuple(load(module, name) for name in names)


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` (through :func:`load`) or raise :class:`MissingDependency` naming
    ``pip install 'sdengine[extra]'``."""
    try:
        return load(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency(module, extra, purpose) from exc
