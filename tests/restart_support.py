"""TEST HOOK for the kill tests of ``sdengine serve`` (tests/test_api_restart.py): ``--engine-factory
tests.restart_support:factory`` runs the real engine (``engine.pipeline.Engine``, nothing of the pipeline
replaced) and holds each result PNG ``$SDENGINE_TEST_PNG_PAUSE`` seconds inside its atomic write -- written to
its temp file, not yet renamed -- so that a test can SIGKILL the server during a PNG write."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from api_compat import images
from api_compat.engine_api import default_engine_factory

_atomic_file = images.atomic_file


@contextmanager
def _paused_atomic_file(path, *args, **kwargs):
    with _atomic_file(path, *args, **kwargs) as f:
        yield f
        f.flush()
        time.sleep(float(os.environ.get("SDENGINE_TEST_PNG_PAUSE") or 0))


images.atomic_file = _paused_atomic_file


def factory(config):
    return default_engine_factory(config)
