"""The findings of the adversarial probe (issue 12), one test each, with the probe's payloads: cross-site and
DNS-rebinding requests, stalled connections, non-loopback binds without a key, deep JSON nesting, task-id type
errors, real ControlNet photos, thin images, queued tasks' memory, deleted results, broken model links and
the results-directory lock. Every test here failed before the fix. Generation, where a task runs, is the real
engine on the tiny models; a test double only holds the worker where a queue must stay full."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from api_compat import ApiError, TaskService
from api_compat.http import allowed_hosts_for, create_app, uvicorn_config
from api_compat.schema import MAX_JSON_DEPTH, parse_payload
from api_compat.tasks.store import StoreLocked, TaskStore
from engine.controlnet import PREPROCESSORS, unit_sizes
from engine.controlnet.images import EncodedImage, fit_detected_map
from engine.request import ControlNetUnit
from tests.api_support import EngineDouble, png_b64, tiny_engine  # noqa: F401 (fixture)

CN = "alwayson_scripts.controlnet.units[0]"
CONTROLNET = "tiny-controlnet-sd1"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def photo_b64(width: int, height: int, quality: int = 90, seed: int = 0) -> str:
    """A photo-like JPEG (smooth gradients + sensor noise: what makes real photos large)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=2)
    pixels = (base + rng.normal(0, 24, base.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode()


def thin_png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def cn_payload(image: str, **unit) -> dict:
    return {"steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"controlnet": {"units": [
        {"model": CONTROLNET, "module": "canny", "input_image": image, **unit}]}}}


@pytest.fixture
def service(tmp_path, tiny_engine):
    svc = TaskService(results_dir=tmp_path / "results", max_queue=8, **tiny_engine)
    yield svc
    svc.close()


@pytest.fixture
def client(service):
    with TestClient(create_app(service), base_url="http://localhost") as c:
        yield c


def poll(client, task_id, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = client.post("/scc/sd_get_result", json={"taskId": task_id})
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("succeeded", "failed"):
            return r.json()
        time.sleep(0.02)
    raise AssertionError("task did not finish")


# ------------------------------------------------------------------------------- cross-site, rebinding
@pytest.mark.parametrize("content_type,body", [
    ("text/plain", b'{"prompt": "x", "steps": 1}'),  # what an HTML form or fetch(no-cors) can send
    ("application/x-www-form-urlencoded", b'{"prompt": "x", "steps": 1}'),
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n{}\r\n--x--'),
    (None, b'{"prompt": "x", "steps": 1}'),
])
@pytest.mark.parametrize("path", ["/scc/sd_txt2img", "/scc/sd_get_result", "/scc/sd_cancel"])
def test_post_bodies_must_be_json(client, service, content_type, body, path):
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type" and r.json()["error"]["field"] == "headers.Content-Type"
    assert service.store.count() == 0
    r = client.post("/scc/sd_txt2img", content=b'{"steps": 1, "width": 64, "height": 64}',
                    headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:7860", "127.0.0.1.evil.example", "localhost.evil"])
def test_dns_rebinding_host_is_refused(client, service, host):
    r = client.post("/scc/sd_txt2img", json={"steps": 1}, headers={"host": host})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    assert r.json()["error"]["field"] == "headers.Host" and "localhost" in r.json()["error"]["allowed"]
    assert client.get("/health", headers={"host": host}).status_code == 400
    assert service.store.count() == 0


def test_loopback_hosts_are_served(client):
    for host in ("localhost", "localhost:7860", "127.0.0.1:7860", "[::1]:7860", "LOCALHOST."):
        assert client.get("/health", headers={"host": host}).status_code == 200, host


def test_allowed_hosts_follow_the_bind():
    assert set(allowed_hosts_for("127.0.0.1")) == {"127.0.0.1", "localhost", "::1"}
    assert set(allowed_hosts_for("192.168.1.5", ["gpu-box.lan"])) == {"192.168.1.5", "gpu-box.lan"}
    assert "*" in allowed_hosts_for("10.0.0.1", ["*"])


def test_wildcard_bind_admits_ip_literals_not_names(service):
    app = create_app(service, allowed_hosts=allowed_hosts_for("0.0.0.0", ["gpu-box.lan"]))
    with TestClient(app, base_url="http://localhost") as c:
        for host, status in (("10.1.2.3:7860", 200), ("[fe80::1]:7860", 200), ("gpu-box.lan:7860", 200),
                             ("localhost", 200), ("attacker.example", 400), ("10.1.2.3.nip.io", 400)):
            assert c.get("/health", headers={"host": host}).status_code == status, host


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:9999", "https://localhost"])
def test_cross_site_origin_is_refused(client, service, origin):
    r = client.post("/scc/sd_txt2img", json={"steps": 1}, headers={"origin": origin})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    assert r.json()["error"]["field"] == "headers.Origin"
    r = client.options("/scc/sd_txt2img", headers={"origin": origin, "access-control-request-method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert service.store.count() == 0


def test_same_origin_and_cors_origins(service):
    with TestClient(create_app(service, cors_origins=["https://app.example"]), base_url="http://localhost") as c:
        r = c.post("/scc/sd_txt2img", json={"steps": 1, "width": 64, "height": 64},
                   headers={"origin": "http://localhost"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = c.options("/scc/sd_txt2img", headers={"origin": "https://app.example",
                                                  "access-control-request-method": "POST",
                                                  "access-control-request-headers": "content-type"})
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "content-type" in r.headers["access-control-allow-headers"]
        r = c.post("/scc/sd_txt2img", json={"steps": 1, "width": 64, "height": 64},
                   headers={"origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert c.post("/scc/sd_txt2img", json={}, headers={"origin": "https://evil.example"}).status_code == 403


def test_preflight_is_answered_before_the_api_key(service):
    with TestClient(create_app(service, api_key="k", cors_origins=["https://app.example"]),
                    base_url="http://localhost") as c:
        r = c.options("/scc/sd_txt2img", headers={"origin": "https://app.example",
                                                  "access-control-request-method": "POST"})
        assert r.status_code == 204
        r = c.post("/scc/sd_txt2img", json={}, headers={"origin": "https://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"


def _serve(app, header_timeout):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, header_timeout=header_timeout, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 20
    while not server.started and time.monotonic() < end:
        time.sleep(0.02)
    assert server.started
    return server, thread, sock


def _closed_within(conn: socket.socket, seconds: float) -> tuple[bool, bytes]:
    conn.settimeout(seconds)
    data = b""
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return True, data
            data += chunk
    except socket.timeout:
        return False, data


def test_stalled_connections_are_closed(service):
    """The probe kept 1,000 stalled connections open. Real uvicorn (the configuration `sdengine serve` runs):
    a connection that sends nothing, or half a request head, is closed after the header deadline; a body that
    stalls is answered 408 after the read deadline; a normal request on the same server still works."""
    server, thread, sock = _serve(create_app(service, read_timeout=1.0), header_timeout=1.0)
    port = sock.getsockname()[1]
    try:
        silent = socket.create_connection(("127.0.0.1", port))
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"POST /scc/sd_txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        body = socket.create_connection(("127.0.0.1", port))
        body.sendall(b"POST /scc/sd_txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\"")
        t0 = time.monotonic()
        assert _closed_within(silent, 5)[0], "a silent connection stayed open"
        assert _closed_within(half, 5)[0], "a half-sent request head stayed open"
        closed, answer = _closed_within(body, 5)
        assert time.monotonic() - t0 < 5
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer[:300]
        import httpx

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert http.get("/health").status_code == 200
        for conn in (silent, half, body):
            conn.close()
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_serve_refuses_a_non_loopback_bind_without_a_key(tmp_path, monkeypatch):
    from cli import main

    monkeypatch.delenv("SDENGINE_API_KEY", raising=False)
    r = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--results-dir", str(tmp_path / "r")])
    assert r.exit_code == 2 and "without an API key" in r.output and "--insecure-no-auth" in r.output
    assert not (tmp_path / "r").exists(), "nothing was started"


# ------------------------------------------------------------------------------------ malformed JSON
def _nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize("body", [
    '{"prompt": "x", "comments": ' + _nested(1000) + "}",  # the probe: ~1,000 deep -> RecursionError, 500
    '{"prompt": "x", "hr_additional_modules": ' + _nested(300) + "}",  # 300 deep in an ignored field -> 500
    _nested(100000),
    '{"a": ' * 5000 + "1" + "}" * 5000,
])
@pytest.mark.parametrize("path", ["/scc/sd_txt2img", "/scc/sd_get_result", "/scc/sd_cancel"])
def test_deep_nesting_is_a_400_naming_the_problem(service, body, path):
    with TestClient(create_app(service, max_body_bytes=1 << 20), base_url="http://localhost") as c:
        r = c.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request" and "nested" in r.json()["error"]["message"]
    assert str(MAX_JSON_DEPTH) in r.json()["error"]["allowed"]


def test_deep_nesting_in_process_names_the_field():
    payload = {"hr_additional_modules": json.loads(_nested(300))}
    with pytest.raises(ApiError) as exc:
        parse_payload(payload)
    assert exc.value.http_status == 422 and exc.value.field.startswith("hr_additional_modules[0][0]")
    assert parse_payload({"hr_additional_modules": json.loads(_nested(2, '"x"'))[0]})  # shallow is fine


@pytest.mark.parametrize("task_id", [5, None, ["x"], {"a": 1}, True, 1.5])
@pytest.mark.parametrize("path", ["/scc/sd_get_result", "/scc/sd_cancel"])
def test_task_id_type_errors_are_422(client, path, task_id):
    r = client.post(path, json={"taskId": task_id})
    assert r.status_code == 422 and r.json()["error"]["field"] == "taskId", r.text
    assert "must be a string" in r.json()["error"]["message"]


def test_cancel_and_get_result_agree_on_a_missing_task_id(client):
    answers = [client.post(p, json={}) for p in ("/scc/sd_get_result", "/scc/sd_cancel")]
    assert [a.status_code for a in answers] == [422, 422]
    assert answers[0].json() == answers[1].json()
    assert answers[0].json()["error"]["field"] == "taskId"


# ------------------------------------------------------------------------------------- request images
def test_real_photos_are_accepted(service):
    """A 512x512 JPEG at quality 90 is ~300,000 base64 characters (the probe's was refused at 65,536); a
    2048x2048 one over 1 MB. Both run on the real tiny ControlNet through the default HTTP body limit."""
    with TestClient(create_app(service), base_url="http://localhost") as c:
        for side in (512, 2048):
            image = photo_b64(side, side)
            assert len(image) > 65536
            r = c.post("/scc/sd_txt2img", json=cn_payload(image))
            assert r.status_code == 200, r.text[:500]
            result = poll(c, r.json()["taskId"])
            assert result["status"] == "succeeded", result.get("error")
            assert result["parameters"]["alwayson_scripts"]["controlnet"]["units"][0]["input_image"].startswith(
                f"<image: {len(image)} characters")


@pytest.mark.parametrize("size,unit,what", [
    ((4096, 1), {"module": "canny"}, "elongated"),  # the probe: "Unable to allocate 3.00 GiB"
    ((100000, 1), {"module": "canny"}, "elongated"),  # RSS +1.9 GB for 19 s
    ((4096, 1), {"module": "none", "resize_mode": 2}, "elongated"),  # OpenCV assertion
    ((4096, 1), {"module": "none", "resize_mode": 0}, "elongated"),
    ((4096, 256), {"module": "canny", "processor_res": 2048}, "preprocessor"),  # 16:1, 32768x2048 working size
    ((2048, 128), {"module": "color", "processor_res": 2048}, "preprocessor"),
    ((4096, 256), {"module": "none"}, "fitted map"),  # covering 2048x2048 -> a 32768x2048 map
])
def test_thin_images_are_refused_at_submit(client, service, size, unit, what):
    payload = cn_payload(thin_png(*size), **unit)
    if what == "fitted map":
        payload.update(width=2048, height=2048)
    r = client.post("/scc/sd_txt2img", json=payload)
    assert r.status_code == 422, r.text[:300]
    error = r.json()["error"]
    assert error["field"] == f"{CN}.input_image" and what in error["message"], error
    assert service.store.count() == 0


def test_a_very_wide_image_is_refused_from_its_header(client, service):
    """16,000,000x1 (OpenCV asked for 196 GB): refused before its pixels are decoded."""
    before = _rss()
    r = client.post("/scc/sd_txt2img", json=cn_payload(thin_png(16_000_000, 1)))
    assert r.status_code == 422 and "elongated" in r.json()["error"]["message"]
    assert _rss() - before < 100 << 20
    assert service.store.count() == 0


@pytest.mark.parametrize("module", sorted(m for m, p in PREPROCESSORS.items() if not p.model_based))
@pytest.mark.parametrize("mode", ["Just Resize", "Crop and Resize", "Resize and Fill"])
def test_planned_sizes_are_the_sizes_the_unit_makes(module, mode):
    """unit_sizes (what submit checks) against what the preprocessor and the fitting really make."""
    rng = np.random.default_rng(1)
    for h, w, res, pp in ((37, 23, 96, False), (20, 300, 64, False), (64, 64, -1, True), (50, 90, 128, True)):
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        unit = ControlNetUnit(model="m", image=image, module=module, resize_mode=mode, processor_res=res,
                              threshold_a=2.0 if module == "tile_resample" else -1, pixel_perfect=pp)
        sizes = {stage: (sh, sw) for stage, sh, sw in unit_sizes(unit, 80, 48)}
        from engine.controlnet import pixel_perfect_resolution

        exact = pixel_perfect_resolution(image, 48, 80, mode) if pp else None
        detected = PREPROCESSORS[module](image, res, unit.threshold_a, -1, exact_res=exact)
        assert sizes["detected map"] == detected.shape[:2], (module, h, w)
        assert sizes["control image"] == fit_detected_map(detected, mode, 48, 80).shape[:2] == (48, 80)


def test_queued_tasks_hold_compressed_images(tmp_path):
    """The probe: ten 4096x4096 units in a 637 KiB body added ~530 MB per queued task. Queued tasks now hold
    the compressed files: three such tasks waiting add well under 100 MB, and the queue is bounded in bytes."""
    gate = threading.Event()

    class Held(EngineDouble):
        """TEST DOUBLE: holds the worker so that the tasks stay queued."""

        def generate(self, request, *, progress=None, cancel=None):
            gate.wait(600)  # released in finally; the submits below decode 30 large PNGs (slow on a busy CPU)
            return super().generate(request, progress=progress, cancel=cancel)

    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (30, 60, 90)).save(buf, format="PNG")
    big = base64.b64encode(buf.getvalue()).decode()
    units = [{"model": "c", "module": "none", "input_image": big, "resize_mode": 0} for _ in range(10)]
    payload = {"steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"controlnet": {"units": units}}}
    svc = TaskService(tmp_path, results_dir=tmp_path / "r", engine_factory=Held, check_models=False,
                       max_queue_bytes=len(buf.getvalue()) * 10 * 3)
    try:
        first = svc.sd_txt2img({"steps": 1})["taskId"]  # occupies the worker
        deadline = time.monotonic() + 120
        while not svc.health()["devices"]["cpu"]["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.sd_get_result({"taskId": first})["status"] == "running", svc.sd_get_result({"taskId": first})
        before = _rss()
        ids = [svc.sd_txt2img(payload)["taskId"] for _ in range(3)]
        grown = _rss() - before
        assert grown < 100 << 20, f"3 queued tasks of 10 4096^2 images grew RSS by {grown >> 20} MiB"
        queued = [svc.backend._live[t] for t in ids]
        assert all(isinstance(u.image, EncodedImage) for t in queued for u in t.request.controlnet_units)
        assert svc.health()["devices"]["cpu"]["waiting_bytes"] == 3 * 10 * len(buf.getvalue())
        with pytest.raises(ApiError) as exc:  # the byte bound, long before the count bound (256)
            svc.sd_txt2img(payload)
        assert exc.value.code == "queue_full" and "bytes" in str(exc.value)
        svc.cancel(ids[0])
        assert svc.health()["devices"]["cpu"]["waiting_bytes"] == 2 * 10 * len(buf.getvalue())
        svc.sd_txt2img(payload)
    finally:
        gate.set()
        svc.close()


# --------------------------------------------------------------------------------- results and store
def test_deleted_result_reads_expired(tmp_path, tiny_engine):
    results = tmp_path / "results"
    with TaskService(results_dir=results, **tiny_engine) as svc:
        with TestClient(create_app(svc), base_url="http://localhost") as c:
            task = c.post("/scc/sd_txt2img", json={"steps": 1, "width": 64, "height": 64}).json()["taskId"]
            assert poll(c, task)["status"] == "succeeded"
            (png,) = list((results / "images").glob(f"{task}-*.png"))
            png.unlink()
            result = c.post("/scc/sd_get_result", json={"taskId": task}).json()
            assert result["status"] == "failed" and result["images"] == []
            assert result["error"]["code"] == "expired" and "no longer on the server" in result["error"]["message"]
            assert c.get(f"/scc/images/{task}/0.png").status_code == 404
    with TaskService(results_dir=results, **tiny_engine) as svc:  # after a restart
        result = svc.sd_get_result({"taskId": task})
        assert result["status"] == "failed" and result["error"]["code"] == "expired"


def test_the_results_lock_survives_deleting_the_lock_file(tmp_path):
    """The probe deleted .lock and started a second server on the live directory."""
    first = TaskStore(tmp_path)
    try:
        (tmp_path / ".lock").unlink()
        with pytest.raises(StoreLocked):
            TaskStore(tmp_path)
        (tmp_path / ".lock").write_text("stale")
        with pytest.raises(StoreLocked):
            TaskStore(tmp_path)
    finally:
        first.close()
    TaskStore(tmp_path).close()  # released with the store


def test_the_results_lock_holds_across_processes(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    first = TaskStore(tmp_path)
    try:
        os.unlink(tmp_path / ".lock")
        code = ("import sys\nfrom api_compat.tasks.store import TaskStore, StoreLocked\n"
                "try:\n    TaskStore(sys.argv[1])\nexcept StoreLocked:\n    sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True,
                              env={**os.environ, "PYTHONPATH": str(root)}, timeout=60)
        assert proc.returncode == 3, proc.stderr.decode()[-500:]
    finally:
        first.close()


def test_broken_model_links_are_not_found_without_server_paths(tmp_path, tiny_store, tiny_engine):
    """A symlink loop in the models folder answered 500; a dangling link printed the store's absolute path."""
    import shutil

    models = tmp_path / "models"
    ckpts = models / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    shutil.copyfile(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors", ckpts / "tiny-sd1.safetensors")
    os.symlink("loop.safetensors", ckpts / "loop.safetensors")
    os.symlink("b.safetensors", ckpts / "a.safetensors")
    os.symlink("a.safetensors", ckpts / "b.safetensors")
    os.symlink("/nonexistent/x.safetensors", ckpts / "dangling.safetensors")
    os.symlink(str(tmp_path / "gone.safetensors"), ckpts / "gone.safetensors")
    options = {**tiny_engine, "models_dir": models, "cache_dir": tmp_path / "cache"}
    with TaskService(results_dir=tmp_path / "r", **options) as svc:
        with TestClient(create_app(svc), base_url="http://localhost") as c:
            for name in ("loop.safetensors", "a.safetensors", "dangling.safetensors", "gone.safetensors", "loop"):
                r = c.post("/scc/sd_txt2img", json={"stable_diffusion_model": name, "steps": 1})
                assert r.status_code == 422, r.text
                assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["field"] == \
                    "stable_diffusion_model"
                assert str(tmp_path) not in r.text and "/nonexistent" not in r.text, r.text
            assert c.post("/scc/sd_txt2img", json={"stable_diffusion_model": "tiny-sd1", "steps": 1, "width": 64,
                                                   "height": 64}).status_code == 200
