"""Runtimes that run exported components: torch (the reference), onnxruntime, TensorRT. See base.py."""

from engine.backends.base import Backend, create_backend

__all__ = ["Backend", "create_backend"]
