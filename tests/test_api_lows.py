"""The low-severity findings of issue 31, each with the behaviour it now has: a full results disk is a clear 507
and /health says degraded (a real server on a real, small tmpfs); a Host header with userinfo is refused; POSTs
to bodyless routes must not be forms or text; no absolute server path in errors or /sdapi/v1/cmd-flags; the webui
routes answer a failed task's model_error as 422 (not 500); a ControlNet file too short for the legacy hash is
titled by its real hash; a stray pickle VAE beside a checkpoint is skipped under the Automatic VAE setting;
docs/API.md lists every error code."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api_compat.errors import HTTP_STATUS
from api_compat.http import create_app, host_syntax_ok
from api_compat.service import TaskService
from engine.models.checkpoints import Kind
from engine.models.store import ModelStore
from tests.api_support import tiny_engine  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"prompt": "a house", "steps": 1, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def store_dir(tiny_store, tmp_path_factory):
    """A store of its own: tiny-sd1 with a stray pickle VAE beside it, a truncated checkpoint, a short .pth
    ControlNet (64 KiB, shorter than the webui's legacy-hash window at 1 MiB)."""
    root = tmp_path_factory.mktemp("lows-models")
    sd = root / "Stable-diffusion"
    sd.mkdir()
    data = (tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors").read_bytes()
    (sd / "tiny-sd1.safetensors").write_bytes(data)
    (sd / "tiny-sd1.vae.pt").write_bytes(b"not a pickle we would ever load" * 10)
    (sd / "broken.safetensors").write_bytes(data[: len(data) // 2])
    (root / "ControlNet").mkdir()
    (root / "ControlNet" / "small-canny.pth").write_bytes(os.urandom(64 * 1024))
    return root


@pytest.fixture(scope="module")
def service(store_dir, tiny_engine, tmp_path_factory):
    svc = TaskService(results_dir=tmp_path_factory.mktemp("lows-results"), max_queue=8,
                      **{**tiny_engine, "models_dir": store_dir})
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service), base_url="http://localhost") as c:
        yield c


# ----------------------------------------------------------------------------------------------- Host
@pytest.mark.parametrize("host", ["127.0.0.1:7860@evil.example", "localhost@evil.example", "localhost/x",
                                  "localhost:7860 evil", "[::1]:7860@evil"])
def test_host_with_userinfo_or_junk_is_refused(client, service, host):
    r = client.post("/scc/sd_get_result", json={"taskId": "0" * 32}, headers={"host": host})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", r.text
    # also on a server that checks no names (behind a proxy): the syntax still matters, URLs echo the host
    with TestClient(create_app(service, allowed_hosts=None), base_url="http://localhost") as c:
        r = c.post("/scc/sd_get_result", json={"taskId": "0" * 32}, headers={"host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", r.text


def test_host_syntax():
    for good in ("localhost", "localhost:7860", "127.0.0.1:7860", "[::1]:7860", "gpu-1.lan", "LOCALHOST."):
        assert host_syntax_ok(good), good
    for bad in ("127.0.0.1:7860@evil.example", "a b", "a/b", "", "a:b:c", "host:99999999"):
        assert not host_syntax_ok(bad), bad


# ------------------------------------------------------------------------------- bodyless POST routes
BODYLESS = ["/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-vae"]


@pytest.mark.parametrize("path", BODYLESS)
@pytest.mark.parametrize("content_type,body", [
    ("text/plain", b"x"), ("application/x-www-form-urlencoded", b"a=1"),
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--'),
    ("text/plain", b""), (None, b"a=1"),
])
def test_bodyless_routes_refuse_forms_and_text(client, path, content_type, body):
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == 415, (path, r.text)
    assert r.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("path", BODYLESS)
def test_bodyless_routes_take_no_body_or_json(client, path):
    assert client.post(path).status_code == 200
    assert client.post(path, json={}).status_code == 200


# ------------------------------------------------------------------------------- server paths, codes
def test_cmd_flags_show_no_server_path(client, store_dir):
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["ckpt_dir"] == "Stable-diffusion"
    assert str(store_dir) not in str(flags) and os.path.realpath(store_dir) not in str(flags)


def test_model_error_is_422_with_a_relative_path(client, store_dir):
    """A checkpoint that fails to load (truncated) fails its task with model_error: the synchronous webui route
    answers 422 (as for a model it cannot find), naming the file relative to the models dir; sd_get_result of
    the same task says the same."""
    r = client.post("/sdapi/v1/txt2img", json={**TINY, "override_settings": {"sd_model_checkpoint": "broken"}})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "model_error"
    assert "Stable-diffusion/broken.safetensors: truncated safetensors file" in error["message"]
    assert str(store_dir) not in r.text and os.path.realpath(store_dir) not in r.text
    task_id = re.search(r"task ([0-9a-f]{32})", error["message"]).group(1)
    result = client.post("/scc/sd_get_result", json={"taskId": task_id}).json()
    assert result["status"] == "failed" and result["error"]["code"] == "model_error"
    assert result["error"]["message"].startswith("Stable-diffusion/broken.safetensors:"), result["error"]


def test_public_paths_rewrite():
    from api_compat.paths import PublicPaths

    paths = PublicPaths([("/srv/m", ""), ("/srv/m/cache", "cache"), ("/srv/r", "results")])
    assert paths.text("/srv/m/VAE/x.pt: bad; /srv/m/cache/a/b.onnx; /srv/m; /srv/m2/x; /srv/r/1.png; "
                      "use POST for /scc/sd_txt2img") == \
        "VAE/x.pt: bad; cache/a/b.onnx; .; /srv/m2/x; results/1.png; use POST for /scc/sd_txt2img"


def test_every_error_code_is_documented():
    """docs/API.md's error table has a row for every code the API answers, with its HTTP status."""
    text = (ROOT / "docs" / "API.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", text, re.M))
    for code, status in HTTP_STATUS.items():
        assert rows.get(code) == str(status), (code, status)
    for code in ("cancelled", "interrupted", "expired", "worker_lost", "model_error", "storage_full"):
        assert code in rows, code


# -------------------------------------------------------------------------------------------- models
def test_short_controlnet_is_titled_by_its_real_hash(client, store_dir):
    path = store_dir / "ControlNet" / "small-canny.pth"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert f"small-canny [{sha[:8]}]" in models, models
    assert not any("e3b0c442" in m for m in models)  # sha256 of no bytes: what the 1 MiB window gave
    store = ModelStore(store_dir, bundled=None, cache_dir=store_dir.parent / "lows-hash-cache")
    assert store.resolve(f"small-canny [{sha[:8]}]", Kind.CONTROLNET).path == path


def test_stray_pickle_vae_is_skipped(store_dir, caplog, tmp_path):
    store = ModelStore(store_dir, bundled=None, cache_dir=tmp_path)
    ckpt = store.resolve("tiny-sd1")
    with caplog.at_level(logging.INFO, logger="engine.models.store"):
        assert store.resolve_vae(ckpt, "Automatic") is None
    assert any("skipping the pickle VAE tiny-sd1.vae.pt" in r.getMessage() for r in caplog.records)
    assert store.resolve_vae(ckpt, "Automatic", allow_pickle=True) == store_dir / "Stable-diffusion" / "tiny-sd1.vae.pt"


def test_checkpoint_with_a_stray_pickle_vae_loads(store_dir, tmp_path):
    """The symptom: under the default VAE setting, loading the checkpoint ran into the pickle and every request
    on it failed (model_error); now it loads with its own VAE."""
    store = ModelStore(store_dir, bundled=None, cache_dir=tmp_path)
    model = store.load_model("tiny-sd1", meta=True)
    assert model.vae_path is None


# ------------------------------------------------------------------------------------------ full disk
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    target = tmp_path / "probe"
    target.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {target}"],
                           capture_output=True, timeout=20)
    return probe.returncode == 0


def test_full_disk_is_507_and_health_degraded(tmp_path):
    """A real server whose results directory is an 8 MiB tmpfs (a private mount namespace: `unshare -rm`); the
    disk is then filled by dd from inside that namespace. Before: 500 OperationalError and /health "ok"."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs `unshare -rm` and tmpfs mounts (user namespaces) to make a small real disk")
    results, trigger, filled = tmp_path / "results", tmp_path / "fill-now", tmp_path / "filled"
    results.mkdir()
    port = _free_port()
    script = (f"mount -t tmpfs -o size=8m tmpfs {results} && "
              f"(while [ ! -e {trigger} ]; do sleep 0.05; done; "
              f"dd if=/dev/zero of={results}/fill bs=64k 2>/dev/null; touch {filled}) & "
              f"exec {sys.executable} -m cli serve --port {port} --models-dir {tmp_path / 'models'} "
              f"--results-dir {results} --backend onnxruntime")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SDENGINE_API_KEY", None)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["unshare", "-rm", "sh", "-c", script], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 90
        while True:
            try:
                health = httpx.get(url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < end, log_path.read_text()[-3000:]
                time.sleep(0.1)
        assert health.json()["status"] == "ok", health.text
        trigger.touch()
        end = time.monotonic() + 30
        while not filled.exists():
            assert time.monotonic() < end
            time.sleep(0.05)
        for path in ("/scc/sd_txt2img", "/sdapi/v1/txt2img"):
            r = httpx.post(url + path, json=TINY, timeout=30)
            assert r.status_code == 507, r.text
            error = r.json()["error"]
            assert error["code"] == "storage_full" and "disk is full" in error["message"]
        health = httpx.get(url + "/health", timeout=5).json()
        assert health["status"] == "degraded" and health["storage"]["free_bytes"] < 64 * 1024, health
        assert any("storage_full" in p for p in health["problems"]) and any("bytes free" in p for p in
                                                                             health["problems"])
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
