"""core.lazy: the first import of a heavy module's lazily resolved name is single-flight. transformers resolves
``CLIPTokenizer`` on first access (``_LazyModule``); 16 threads of a fresh interpreter asking at once got
``ImportError`` in most runs before. Each check runs in a new interpreter (a warm one proves nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys, threading
    from {module} import {function}

    errors, got = [], []
    barrier = threading.Barrier(16)

    def first_call():
        barrier.wait()
        try:
            got.append(id({call}))
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=first_call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(got) == 16 and len(set(got)) == 1, got  # one object: built once
""")


@pytest.mark.parametrize("module, function, call", [
    ("core.lazy", "load", 'load("transformers", "CLIPTokenizer")'),
    ("engine.models.tokenizer", "clip_tokenizer", "clip_tokenizer()"),
])
def test_concurrent_first_imports_in_a_fresh_interpreter(module, function, call):
    code = CHILD.format(module=module, function=function, call=call)
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_load_names_a_missing_attribute_as_an_import_error():
    from core.lazy import load

    with pytest.raises(ImportError, match="no_such_name"):
        load("json", "no_such_name")
    assert load("json", "dumps") is __import__("json").dumps
