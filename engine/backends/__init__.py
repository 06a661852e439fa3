"""Runtimes that run a model's components: torch (the reference), onnxruntime, OpenVINO, TensorRT (the last three on
exported graphs). See base.py (the protocol, the factory and its table ``BACKENDS``)."""

from engine.backends.base import Backend, create_backend

__all__ = ["Backend", "create_backend"]
