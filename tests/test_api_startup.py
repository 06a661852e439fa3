"""No race at startup: the first requests to a freshly started `sdengine serve` arrive together -- txt2img and
img2img submits, whose admission tokenises the prompt (transformers' CLIPTokenizer, imported lazily), and the
webui listings -- and none answers 5xx. Before core.lazy made heavy imports single-flight, 5 of 48 such
requests answered 500 (``ImportError: cannot import name 'CLIPTokenizer'``) in 4 of 6 fresh starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTS = int(os.environ.get("SDENGINE_TEST_STARTS") or 10)
CONCURRENT = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_requests(url: str) -> list[tuple[str, int, str]]:
    """CONCURRENT requests released at once (a barrier), each its own connection; (route, status, body)."""
    tiny = {"steps": 1, "width": 64, "height": 64}
    calls = []
    for i in range(CONCURRENT):
        kind = i % 4
        if kind in (0, 1):
            calls.append(("POST", "/scc/sd_txt2img", {"prompt": f"a red house {i}", **tiny}))
        elif kind == 2 and i % 8 == 2:
            calls.append(("POST", "/sdapi/v1/txt2img", {"prompt": f"a boat {i}", **tiny}))
        elif kind == 2:
            calls.append(("POST", "/scc/sd_img2img", {"prompt": f"a cat {i}", **tiny, "init_images": [_PNG]}))
        else:
            calls.append(("GET", ("/sdapi/v1/sd-models", "/sdapi/v1/samplers", "/sdapi/v1/options",
                                  "/health")[i // 4 % 4], None))
    barrier = threading.Barrier(len(calls))
    answers: list[tuple[str, int, str]] = []

    def one(method, path, body):
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            try:
                r = client.request(method, url + path, json=body)
                answers.append((path, r.status_code, r.text[:300]))
            except httpx.HTTPError as exc:
                answers.append((path, 0, repr(exc)))

    threads = [threading.Thread(target=one, args=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return answers


def _png() -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


_PNG = _png()


@pytest.mark.slow
def test_concurrent_first_requests_to_a_fresh_server(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SDENGINE_API_KEY", None)
    failures = []
    for start in range(STARTS):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = tmp_path / f"serve-{start}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir", str(tmp_path / "models"),
                 "--results-dir", str(tmp_path / f"results-{start}"), "--backend", "torch"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 60
            while True:  # up: the socket accepts (no request is sent before the burst)
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < end, log_path.read_text()[-3000:]
                    time.sleep(0.05)
            answers = _first_requests(url)
            assert len(answers) == CONCURRENT
            failures += [(start, *a) for a in answers if not 200 <= a[1] < 300]
        finally:
            proc.kill()  # the queued tasks do not matter here
            proc.wait(30)
    assert not failures, failures
