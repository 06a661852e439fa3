"""The OpenAI images API (/v1/images/generations, /v1/images/edits, /v1/models) driven by the official ``openai``
Python client (``base_url`` pointed at a real ``python -m cli serve`` with ``--api-key``), on the bundled demo model
(ONNX Runtime backend).

Reference for the pixels: the same server's ``/scc`` task API for the same request (prompt, seed, steps, cfg,
sampler, size); tolerance: none (pixel-equal: both faces queue the same request on the same engine).
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the openai client (dev extra) drives these tests")
httpx = pytest.importorskip("httpx")

from tests.api_support import wait_healthy  # noqa: E402
from tests.conftest import exclusive  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-local-test-key"
PROMPT = "a large red circle in the middle on a blue background"
EXTRA = {"steps": 4, "cfg_scale": 1.5, "sampler": "Euler a", "seed": 7, "negative_prompt": ""}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_cache):
    """One real server for the module: its url, an openai client, its process and folder."""
    root = tmp_path_factory.mktemp("openai-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDENGINE_CACHE_DIR": str(demo_cache)}
    env.pop("SDENGINE_API_KEY", None)
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir", str(root / "models"),
         "--results-dir", str(root / "results"), "--backend", "onnxruntime", "--api-key", KEY],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def tail():
        log.flush()
        return (root / "server.log").read_bytes().decode(errors="replace")[-3000:]

    wait_healthy(url, proc, tail)
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)
    with exclusive(demo_cache):  # the first generation may export the demo model
        client.images.generate(prompt=PROMPT, extra_body={**EXTRA, "steps": 1})
    yield SimpleNamespace(url=url, client=client, proc=proc, root=root)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    log.close()


def _pixels(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def _scc(url: str, kind: str, payload: dict) -> list[np.ndarray]:
    headers = {"Authorization": f"Bearer {KEY}"}
    task = httpx.post(f"{url}/scc/sd_{kind}", json=payload, headers=headers, timeout=60).json()["taskId"]
    for _ in range(6000):
        result = httpx.post(f"{url}/scc/sd_get_result", json={"taskId": task}, headers=headers, timeout=60).json()
        if result["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.05)
    assert result["status"] == "succeeded", result
    return [_pixels(httpx.get(u, headers=headers, timeout=60).content) for u in result["images"]]


def test_models_lists_the_checkpoints(server):
    url, client = server.url, server.client
    ids = [m.id for m in client.models.list()]
    assert "sdengine-demo" in ids


def test_generations_b64_equal_the_scc_task(server):
    url, client = server.url, server.client
    answer = client.images.generate(prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                    model="sdengine-demo", quality="standard", user="someone", extra_body=EXTRA)
    assert len(answer.data) == 2 and answer.size == "64x64"
    got = [_pixels(base64.b64decode(d.b64_json)) for d in answer.data]
    want = _scc(url, "txt2img", {"prompt": PROMPT, "batch_size": 2, "width": 64, "height": 64,
                                 "stable_diffusion_model": "sdengine-demo", "steps": 4, "cfg_scale": 1.5,
                                 "sampler_name": "Euler a", "seed": 7, "negative_prompt": ""})
    assert got[0].shape == (64, 64, 3) and got[0].std() > 5  # a picture, not a flat fill
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got[0], got[1])  # seeds 7 and 8


def test_generations_url_needs_the_key(server):
    url, client = server.url, server.client
    answer = client.images.generate(prompt=PROMPT, response_format="url", extra_body=EXTRA)
    link = answer.data[0].url
    assert link.startswith(url + "/scc/images/")
    assert httpx.get(link, timeout=30).status_code == 401
    image = _pixels(httpx.get(link, headers={"Authorization": f"Bearer {KEY}"}, timeout=30).content)
    assert image.shape == (64, 64, 3)


def test_errors_in_openai_shape_name_the_param(server):
    url, client = server.url, server.client
    cases = [({"size": "100x64"}, "size", "multiple of 8"), ({"n": 0}, "n", None),
             ({"model": "dall-e-3"}, "model", None), ({"response_format": "jpeg"}, "response_format", None),
             ({"extra_body": {"sampler": "Nope"}}, "sampler", None),
             ({"extra_body": {"background": "transparent"}}, "background", None)]
    for kwargs, param, words in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt=PROMPT, **kwargs)
        error = info.value.body
        assert error["param"] == param, (kwargs, error)
        assert error["type"] == "invalid_request_error" and error["code"] and error["message"]
        if words:
            assert words in error["message"], error
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="")
    assert info.value.body["param"] == "prompt"
    bad_key = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad_key.images.generate(prompt=PROMPT)
    assert info.value.body["type"] == "authentication_error"


def _png(array: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG")
    return out.getvalue()


def test_edits_mask_transparent_is_edited(server):
    url, client = server.url, server.client
    base = client.images.generate(prompt="a large red circle in the middle on a blue background",
                                  extra_body=EXTRA)
    image = base64.b64decode(base.data[0].b64_json)
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, 32:] = 0  # OpenAI's convention: transparent = edit (the right half)
    rgba = np.dstack([_pixels(image), alpha])
    mask = _png(rgba, "RGBA")
    edit = {**EXTRA, "seed": 11}
    answer = client.images.edit(image=("in.png", image, "image/png"), mask=("mask.png", mask, "image/png"),
                                prompt="a large yellow triangle in the middle on a white background",
                                extra_body=edit)
    got = _pixels(base64.b64decode(answer.data[0].b64_json))
    # the same inpainting on /scc with our convention (white = repaint), denoising 1.0 as the face sets it
    ours = _png(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")
    want = _scc(url, "img2img", {"prompt": "a large yellow triangle in the middle on a white background",
                                 "init_images": [base64.b64encode(image).decode()],
                                 "mask": base64.b64encode(ours).decode(), "denoising_strength": 1.0,
                                 "width": 64, "height": 64, "steps": 4, "cfg_scale": 1.5, "sampler_name": "Euler a",
                                 "seed": 11, "negative_prompt": ""})[0]
    np.testing.assert_array_equal(got, want)
    original = _pixels(image).astype(int)
    kept = np.abs(got[:, :24].astype(int) - original[:, :24]).mean()
    changed = np.abs(got[:, 40:].astype(int) - original[:, 40:]).mean()
    assert kept < 3 < changed, (kept, changed)  # the opaque half kept, the transparent half repainted


def test_edit_errors_name_the_param(server):
    url, client = server.url, server.client
    image = _png(np.zeros((64, 64, 3), np.uint8), "RGB")
    with pytest.raises(openai.BadRequestError) as info:  # a mask without transparency means nothing here
        client.images.edit(image=("in.png", image, "image/png"), mask=("m.png", image, "image/png"), prompt="x")
    assert info.value.body["param"] == "mask" and "alpha" in info.value.body["message"]
    small = _png(np.zeros((32, 32, 4), np.uint8), "RGBA")
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("in.png", image, "image/png"), mask=("m.png", small, "image/png"), prompt="x")
    assert info.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("in.png", b"not an image", "image/png"), prompt="x")
    assert info.value.body["param"] == "image"


def test_cli_sends_its_task_to_the_running_server(server):
    """The CLI on the server's results folder: the folder is locked by the server's task store, so the CLI finds
    the server (its server.json) and sends the task there; without the key it says which variable to set. The
    lock's own message names the server's PID and the remedy."""
    from api_compat.service import TaskService
    from api_compat.tasks.store import StoreLocked

    results = server.root / "results"
    command = [sys.executable, "-m", "cli", "txt2img", "--results-dir", str(results), "--prompt", PROMPT,
               "--steps", "2", "--cfg-scale", "1.5", "--seed", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDENGINE_API_KEY": KEY}
    run = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"running server at {server.url} (pid {server.proc.pid})" in run.stderr
    png = Path(run.stdout.strip().splitlines()[-1])
    assert png.is_file() and _pixels(png.read_bytes()).shape == (64, 64, 3)
    env.pop("SDENGINE_API_KEY")
    run = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "SDENGINE_API_KEY" in run.stderr, run.stderr
    with pytest.raises(StoreLocked) as info:
        TaskService(results_dir=results, check_models=False)
    message = str(info.value)
    assert f"process {server.proc.pid} (sdengine serve at {server.url})" in message and "--results-dir" in message


def test_edit_without_mask_uses_the_images_transparency(server):
    """No mask: the image's own transparency is the mask (OpenAI's dall-e-2 rule): the same pixels as that
    alpha sent as the mask of the opaque image."""
    client = server.client
    base = _pixels(base64.b64decode(client.images.generate(prompt=PROMPT, extra_body=EXTRA).data[0].b64_json))
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:32] = 0  # the top half is to be edited
    edit = {**EXTRA, "seed": 5}
    prompt = "a large green square in the middle on a black background"
    own = client.images.edit(image=("in.png", _png(np.dstack([base, alpha]), "RGBA"), "image/png"), prompt=prompt,
                             extra_body=edit)
    masked = client.images.edit(image=("in.png", _png(base, "RGB"), "image/png"),
                                mask=("m.png", _png(np.dstack([base, alpha]), "RGBA"), "image/png"), prompt=prompt,
                                extra_body=edit)
    got = _pixels(base64.b64decode(own.data[0].b64_json))
    np.testing.assert_array_equal(got, _pixels(base64.b64decode(masked.data[0].b64_json)))
    assert np.abs(got[40:].astype(int) - base[40:]).mean() < 3  # the opaque half kept
