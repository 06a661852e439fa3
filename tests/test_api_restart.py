"""Results survive a crash: a process running TaskService is killed with SIGKILL while a slow task runs and
another waits; the reopened store serves the finished result (PNG and record) and reads the killed tasks as
failed with the code "interrupted" (never stuck in running). The same for a synchronous webui call
(/sdapi/v1/txt2img) on a killed `sdengine serve`, whose webui options survive the restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx

from api_compat import TaskService
from tests.api_support import EngineDouble, png_b64, png_seed

CHILD = textwrap.dedent("""
    import json, sys, time
    from api_compat import TaskService
    from tests.api_support import EngineDouble, png_b64

    results = sys.argv[1]
    svc = TaskService(results + "/models", results_dir=results, check_models=False,
                       engine_factory=lambda c: EngineDouble(c, step_delay=0.5))
    done = svc.sd_txt2img({"prompt": "finished", "seed": 5, "steps": 2})["taskId"]
    assert svc.wait(done, 60)["status"] == "succeeded"
    init = {"init_images": [png_b64()], "denoising_strength": 0.5}
    done_i2i = svc.sd_img2img({**init, "prompt": "finished", "seed": 9, "steps": 2})["taskId"]
    assert svc.wait(done_i2i, 60)["status"] == "succeeded"
    slow = svc.sd_img2img({**init, "prompt": "SLOW", "seed": 6, "steps": 150})["taskId"]
    waiting = svc.sd_txt2img({"prompt": "waits", "seed": 7})["taskId"]
    waiting_i2i = svc.sd_img2img({**init, "prompt": "waits", "seed": 10})["taskId"]
    while svc.sd_get_result({"taskId": slow})["status"] != "running":
        time.sleep(0.01)
    print(json.dumps({"done": done, "done_i2i": done_i2i, "slow": slow, "waiting": waiting,
                      "waiting_i2i": waiting_i2i}), flush=True)
    time.sleep(600)
""")


def test_sigkill_mid_run_then_reopen(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env,
                             cwd=root, text=True)
    try:
        line = child.stdout.readline()
        assert line, "the child process did not start its tasks"
        ids = json.loads(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL

    with TaskService(tmp_path / "models", results_dir=tmp_path, check_models=False,
                      engine_factory=EngineDouble) as svc:
        assert svc.store.recovered == 3
        done = svc.sd_get_result({"taskId": ids["done"]})
        assert done["status"] == "succeeded" and png_seed(done["images"][0]) == 5
        assert svc.image_path(ids["done"], 0) is not None
        done_i2i = svc.sd_get_result({"taskId": ids["done_i2i"]})
        assert done_i2i["status"] == "succeeded" and png_seed(done_i2i["images"][0]) == 9
        assert done_i2i["parameters"]["denoising_strength"] == 0.5 and done_i2i["parameters"]["init_images"]
        for key, was in (("slow", "running"), ("waiting", "waiting"), ("waiting_i2i", "waiting")):
            result = svc.sd_get_result({"taskId": ids[key]})
            assert result["status"] == "failed", result
            assert result["error"]["code"] == "interrupted" and was in result["error"]["message"]
        # the reopened service works
        again = svc.sd_txt2img({"prompt": "after restart", "seed": 8})["taskId"]
        assert svc.wait(again, 30)["status"] == "succeeded"
        again = svc.sd_img2img({"init_images": [png_b64()], "prompt": "after restart", "seed": 8})["taskId"]
        assert svc.wait(again, 30)["status"] == "succeeded"


def test_stray_files_are_removed_on_open(tmp_path):
    images = tmp_path / "images"
    images.mkdir(parents=True)
    (images / ".0123456789abcdef0123456789abcdef-0.png.x.tmp").write_bytes(b"half")
    (images / "0123456789abcdef0123456789abcdef-0.png").write_bytes(b"no record")
    with TaskService(tmp_path / "models", results_dir=tmp_path, check_models=False, engine_factory=EngineDouble):
        assert not list(images.iterdir())


def _serve(tmp_path, port):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    env.pop("SDENGINE_API_KEY", None)
    log = open(tmp_path / f"serve-{port}-{time.monotonic_ns()}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir",
                             str(tmp_path / "models"), "--results-dir", str(tmp_path / "r"),
                             "--engine-factory", "tests.api_support:double_factory"],
                            env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < end, "sdengine serve did not come up"
        time.sleep(0.1)


def test_sigkill_during_a_webui_call_then_restart(tmp_path):
    """`sdengine serve` killed (SIGKILL) while a synchronous /sdapi/v1/txt2img call runs: after the restart the
    call's task reads failed "interrupted" in sd_get_result, the webui options set before are still set, and
    the webui routes work."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "models").mkdir()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(tmp_path, port)
    try:
        assert httpx.post(url + "/sdapi/v1/options", json={"eta_noise_seed_delta": 31337}).status_code == 200
        caller = threading.Thread(target=lambda: _swallow(lambda: httpx.post(
            url + "/sdapi/v1/txt2img", json={"prompt": "SLOW", "steps": 150, "width": 64, "height": 64},
            timeout=120)), daemon=True)
        caller.start()
        end = time.monotonic() + 60
        while True:
            progress = httpx.get(url + "/sdapi/v1/progress").json()
            if progress["state"]["sampling_step"] > 0:
                break
            assert time.monotonic() < end, "the webui call never ran"
            time.sleep(0.02)
        task = progress["current_task"][len("task("):-1]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    caller.join(30)
    proc = _serve(tmp_path, port)
    try:
        result = httpx.post(url + "/scc/sd_get_result", json={"taskId": task}).json()
        assert result["status"] == "failed" and result["error"]["code"] == "interrupted", result
        assert httpx.get(url + "/sdapi/v1/options").json()["eta_noise_seed_delta"] == 31337
        r = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "after", "steps": 2, "width": 64, "height": 64},
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert httpx.get(url + "/sdapi/v1/progress").json()["state"]["job_count"] == 0
    finally:
        proc.terminate()
        proc.wait(30)


def _swallow(call):
    try:
        call()
    except httpx.TransportError:
        pass  # the server was killed under the call
