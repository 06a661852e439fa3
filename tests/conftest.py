"""Shared fixtures (how to keep new tests cheap: tests/README.md). ``tiny_store``: a webui-layout model store
with every tiny model in both formats, written once per test session (about 10 s) into a temporary folder.
Treat it as read-only; tests that modify a store copy what they need into their own ``tmp_path``.
``demo_cache``: the demo model's export cache, shared by the run's workers."""

from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest


def pytest_configure(config):
    # One compute thread per test process (torch's OpenMP pool, numpy's BLAS, and through core.cpu.cpu_threads
    # ONNX Runtime and OpenVINO), inherited by the servers and workers the tests start. `make test` runs one
    # pytest worker per core, so more threads than that only spin-wait on each other: on 2 busy cores a tiny
    # model's torch generation took 30x the CPU with 2 threads (tests/README.md). Runs before any test module
    # imports torch; a value already set in the environment wins.
    # TORCHINDUCTOR_COMPILE_THREADS=1: torch.compile builds its kernels in the test process instead of
    # starting a pool of compile processes (each importing torch) for the one compile test
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
        os.environ.setdefault(name, "1")
    # the engine's home (models, cache, results by default) is a temporary folder: tests never write to ~
    os.environ["SDENGINE_HOME"] = tempfile.mkdtemp(prefix="sdengine-test-home-")
    for name in ("SDENGINE_MODELS_DIR", "SDENGINE_CACHE_DIR", "SDENGINE_RESULTS_DIR"):
        os.environ.pop(name, None)



@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """Path of the session's tiny model store (see :func:`engine.models.tiny.write_tiny_store`)."""
    from engine.models.tiny import write_tiny_store

    return write_tiny_store(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_model_store(tiny_store, tmp_path_factory):
    """A :class:`engine.models.store.ModelStore` over ``tiny_store`` (bundled models excluded, hash cache in a
    session tmp folder so the read-only store is never written)."""
    from engine.models.store import ModelStore

    return ModelStore(tiny_store, bundled=None, cache_dir=tmp_path_factory.mktemp("model-cache"))


def pytest_collection_modifyitems(session, config, items):
    """Test files with a ``slow`` test first (a stable sort: each file's tests stay together and in order).
    ``make test`` hands whole files to its workers in this order, so the long files start at once and the run
    ends on short ones instead of one worker finishing a long file while the others idle."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """An export cache for the bundled demo model shared by every worker of the test run (``make test`` runs
    one pytest worker per core; their base folders share a parent). Artefacts are keyed by what made them
    and a second builder keeps the first one's (export.manifest), so engines and servers of any worker may
    use it at once; wrap the first generation in :func:`exclusive` so that the others wait for one export
    instead of repeating it. Not for tests about exporting or cold starts: they take a fresh ``tmp_path``."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "shared-demo-cache"
    path.mkdir(exist_ok=True)
    return path


@contextmanager
def exclusive(cache: Path):
    """Hold an exclusive lock on ``cache`` (a lock file beside it, across the test workers) for a warm-up that
    exports."""
    cache = Path(cache)
    with open(cache.parent / f"{cache.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture
def annotators_env(monkeypatch):
    """``use(*dirs)``: the annotator weight folders searched ($SDENGINE_ANNOTATORS_DIR), the loaded networks
    forgotten before and after (engine.controlnet.annotators)."""
    from engine.controlnet import annotators

    def use(*dirs):
        monkeypatch.setenv(annotators.ENV_ANNOTATORS_DIR, os.pathsep.join(str(d) for d in dirs))
        annotators.LOADED.clear()

    yield use
    annotators.LOADED.clear()


def assert_missing_file_refused(models, module: str, file: str, folder: str,
                                field: str = "controlnet_units[0].module") -> str:
    """A model-based preprocessor whose file is absent is refused at submit (InvalidRequest naming ``field``),
    naming the file and both folders to put it in: Forge's ``{models}/ControlNetPreprocessor/{folder}`` and the
    extension's downloads ``{models}/../extensions/sd-webui-controlnet/annotator/downloads/{folder}``. Returns the
    message."""
    from pathlib import Path

    from core.errors import InvalidRequest
    from engine.controlnet.preprocessors import get_preprocessor

    models = Path(models)
    with pytest.raises(InvalidRequest) as err:
        get_preprocessor(module).check_available(field, models)
    message = str(err.value)
    assert err.value.field == field and file in message, message
    assert str(models / "ControlNetPreprocessor" / folder) in message
    assert str(models.parent / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" / folder) in message
    return message


@pytest.fixture(scope="session")
def midas_dir(tmp_path_factory):
    """An annotator downloads folder with ``midas/dpt_hybrid-midas-501f0c75.pt``: random weights of the real MiDaS
    DPT-Hybrid in the original layout (tests/midas_support.py; 246 MB, fp16), made once per session."""
    import shutil

    from tests.midas_support import write_random_file

    root = tmp_path_factory.mktemp("midas")
    write_random_file(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)
