"""Server paths in what clients read: error messages, task errors and ``/sdapi/v1/cmd-flags`` name files relative
to the directory they live in (``Stable-diffusion/x.safetensors``, ``cache/...``, ``results/...``), never as the
server's absolute paths (which tell a client the user name, the disk layout, the install place). The log keeps
the full paths for the operator (issue 31)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_INSTALL = Path(__file__).resolve().parents[1]  # the project's own files (the bundled demo model ...)


class PublicPaths:
    """Rewrites absolute paths under known ``roots`` (path -> label shown in their place, "" for none: relative
    to it) to relative ones."""

    def __init__(self, roots: Iterable[tuple[str | os.PathLike, str]]):
        pairs = []
        for root, label in roots:
            for form in {str(Path(root)), os.path.realpath(root)}:
                if form not in ("/", ""):
                    pairs.append((form.rstrip("/"), label))
        self.roots = sorted(set(pairs), key=lambda p: -len(p[0]))  # the deepest root first

    def text(self, value: str) -> str:
        """``value`` with every absolute path under a root made relative."""
        if "/" not in value:
            return value
        for root, label in self.roots:
            if root in value:
                value = re.sub(re.escape(root) + r"(/|(?![\w.-]))", lambda m, label=label: (
                    (f"{label}/" if label else "") if m.group(1) == "/" else (label or ".")), value)
        return value

    def value(self, obj: Any) -> Any:
        """A JSON-like value with :meth:`text` applied to every string in it."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {k: self.value(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.value(v) for v in obj]
        return obj


def public_paths(configs: Iterable[Any], results_dir: str | os.PathLike) -> PublicPaths:
    """The :class:`PublicPaths` of a service: every configuration's models dir (paths shown relative to it) and
    cache dir (``cache/...``), the webui's ``extensions`` folder beside it (``extensions/...``), the results dir (``results/...``), the project's files (``sdengine/...``), the
    home directory (``~/...``)."""
    roots: list[tuple[str | os.PathLike, str]] = [(results_dir, "results"), (_INSTALL, "sdengine"),
                                                  (Path.home(), "~")]
    for config in configs:
        roots.append((config.models_dir, ""))
        # the ControlNet extension's annotator downloads beside a webui's models folder (engine.controlnet.annotators)
        roots.append((Path(config.models_dir).parent / "extensions", "extensions"))
        if getattr(config, "cache_dir", None):
            roots.append((config.cache_dir, "cache"))
    return PublicPaths(roots)
