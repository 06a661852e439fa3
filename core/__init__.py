"""The bottom layer: primitives that engine/, export/ and api_compat/ share and that know no engine type.

Modules here import only the standard library and each other (tests/test_engine_middle.py checks it): errors,
lazy optional imports, atomic writes, deferred modules, file hashing, process liveness, token constants,
progress event names, CPU feature probing, safetensors headers. Nothing heavy is imported at import time.
"""
