"""What several commands share: the ``Shown`` option class and the engine options' help."""

from __future__ import annotations

import importlib
from typing import Any

import click


class Shown(click.Option):
    """An option whose default lives elsewhere (the payload's schema, the engine): ``shown`` is what ``--help``
    prints as its default, while the option itself stays unset so that it does not override the payload."""

    def __init__(self, *args, shown: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.shown = shown

    def get_help_record(self, ctx):
        names, text = super().get_help_record(ctx)
        return names, f"{text}  [default: {self.shown}]".strip()


def load_factory(spec: str | None):
    """The engine factory named by ``--engine-factory module:attribute`` (benchmarks, tests, plugins)."""
    if not spec:
        return None
    module, _, attr = spec.partition(":")
    if not attr:
        raise click.BadParameter("expected module:attribute", param_hint="--engine-factory")
    return getattr(importlib.import_module(module), attr)


def engine_options(backend, device, precision) -> dict[str, Any]:
    return {k: v for k, v in (("backend", backend), ("device", device), ("precision", precision)) if v}


def dirs_help() -> tuple[str, str]:
    from engine.config import default_models_dir, default_results_dir

    return str(default_models_dir()), str(default_results_dir())


BACKEND_DEFAULT = "openvino on CPU when installed, else onnxruntime"
PRECISION_DEFAULT = "bf16 for openvino on a CPU with native bf16, else fp32"
