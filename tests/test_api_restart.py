"""Accepted tasks survive a crash: a process running TaskService is killed with SIGKILL while a slow task runs
and others wait; the reopened service serves the finished results (PNG and record) and runs the killed tasks
again, in their submit order, with their seeds (a random one drawn at submit included). The same for a
synchronous webui call (/sdapi/v1/txt2img) on a killed `sdengine serve`, whose webui options survive the
restart. The attempts rule (worker_lost), cancels and records without a payload are checked on the store."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

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
    random_seed = svc.sd_txt2img({"prompt": "waits", "seed": -1})["taskId"]
    while svc.sd_get_result({"taskId": slow})["status"] != "running":
        time.sleep(0.01)
    print(json.dumps({"done": done, "done_i2i": done_i2i, "slow": slow, "waiting": waiting,
                      "waiting_i2i": waiting_i2i, "random": random_seed}), flush=True)
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

    order = []

    def factory(config):
        engine = EngineDouble(config)
        generate = engine.generate

        def recorded(request, *, progress=None, cancel=None):  # the double's signature (no on_images sink)
            order.append(request.seed)
            return generate(request, progress=progress, cancel=cancel)

        engine.generate = recorded
        return engine

    with TaskService(tmp_path / "models", results_dir=tmp_path, check_models=False,
                      engine_factory=factory) as svc:
        assert svc.store.recovered == 4 and svc.backend.restored == 4
        slow = svc.sd_get_result({"taskId": ids["slow"]})
        assert slow["status"] in ("waiting", "running")
        done = svc.sd_get_result({"taskId": ids["done"]})
        assert done["status"] == "succeeded" and png_seed(done["images"][0]) == 5
        assert svc.image_path(ids["done"], 0) is not None
        done_i2i = svc.sd_get_result({"taskId": ids["done_i2i"]})
        assert done_i2i["status"] == "succeeded" and png_seed(done_i2i["images"][0]) == 9
        assert done_i2i["parameters"]["denoising_strength"] == 0.5 and done_i2i["parameters"]["init_images"]
        for key, seed in (("slow", 6), ("waiting", 7), ("waiting_i2i", 10), ("random", None)):
            result = svc.wait(ids[key], 30)
            assert result["status"] == "succeeded", result
            assert len(result["images"]) == 1 and svc.image_path(ids[key], 0) is not None
            if seed is not None:
                assert png_seed(result["images"][0]) == seed
        slow = svc.sd_get_result({"taskId": ids["slow"]})
        assert slow["parameters"]["steps"] == 150 and svc.store.get(ids["slow"]).attempts == 2
        # the seed drawn at submit (EngineDouble would use 1234 for -1), the same in the record and the PNG
        drawn = png_seed(svc.sd_get_result({"taskId": ids["random"]})["images"][0])
        assert drawn != 1234 and svc.sd_get_result({"taskId": ids["random"]})["parameters"]["seed"] == -1
        assert order[:4] == [6, 7, 10, drawn]  # submit order: the task that was running first
        # the reopened service works
        again = svc.sd_txt2img({"prompt": "after restart", "seed": 8})["taskId"]
        assert svc.wait(again, 30)["status"] == "succeeded"
        again = svc.sd_img2img({"init_images": [png_b64()], "prompt": "after restart", "seed": 8})["taskId"]
        assert svc.wait(again, 30)["status"] == "succeeded"
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]


def _leave(tmp_path, rows):
    """A results folder as a killed process leaves it: records in the given states (no process ran them)."""
    from api_compat.tasks.store import TaskStore

    store = TaskStore(tmp_path)
    for task_id, status, attempts, payload, cancel in rows:
        store.insert(task_id, "default", {"prompt": "p"}, payload=payload)
        store._db.execute("UPDATE tasks SET status=?, attempts=?, cancel=? WHERE task_id=?",
                          (status, attempts, cancel, task_id))
    store._db.close()  # as a kill leaves it: no final checkpoint, the directory lock released by the OS
    os.close(store._lock_file)


def test_attempts_cancels_and_old_records_after_a_crash(tmp_path):
    """A task whose starts died max_attempts times fails worker_lost (the Celery rule); one more start is
    allowed below that; a cancel asked before the crash is kept; a record without a payload (from a version
    that kept none) fails interrupted. Submit order is kept."""
    ids = {name: f"{i:032x}" for i, name in enumerate(("lost", "again", "cancelled", "old", "waits"), 1)}
    payload = {"prompt": "p", "seed": 3, "steps": 2}
    _leave(tmp_path, [(ids["lost"], "running", 2, payload, 0), (ids["again"], "running", 1, payload, 0),
                      (ids["cancelled"], "running", 1, payload, 1), (ids["old"], "waiting", 0, None, 0),
                      (ids["waits"], "waiting", 0, {**payload, "seed": 4}, 0)])
    with TaskService(tmp_path / "models", results_dir=tmp_path, check_models=False, engine_factory=EngineDouble,
                     max_attempts=2) as svc:
        assert svc.backend.restored == 2
        lost = svc.sd_get_result({"taskId": ids["lost"]})
        assert lost["status"] == "failed" and lost["error"]["code"] == "worker_lost", lost
        assert "2 times" in lost["error"]["message"]
        assert svc.sd_get_result({"taskId": ids["cancelled"]})["error"]["code"] == "cancelled"
        assert svc.sd_get_result({"taskId": ids["old"]})["error"]["code"] == "interrupted"
        for key, seed in (("again", 3), ("waits", 4)):
            result = svc.wait(ids[key], 30)
            assert result["status"] == "succeeded" and png_seed(result["images"][0]) == seed, result
        assert svc.store.get(ids["again"]).attempts == 2


def test_stray_files_are_removed_on_open(tmp_path):
    images = tmp_path / "images"
    images.mkdir(parents=True)
    (images / ".0123456789abcdef0123456789abcdef-0.png.x.tmp").write_bytes(b"half")
    (images / "0123456789abcdef0123456789abcdef-0.png").write_bytes(b"no record")
    with TaskService(tmp_path / "models", results_dir=tmp_path, check_models=False, engine_factory=EngineDouble):
        assert not list(images.iterdir())


def _serve(tmp_path, port, *args, factory="tests.api_support:double_factory", env=None):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("SDENGINE_API_KEY", None)
    log = open(tmp_path / f"serve-{port}-{time.monotonic_ns()}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir",
                             str(tmp_path / "models"), "--results-dir", str(tmp_path / "r"),
                             "--engine-factory", factory, *args],
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
    call's task runs again and succeeds (its caller is gone, but the task was accepted: it is readable with
    sd_get_result, as with the Celery backend), the webui options set before are still set, and the webui
    routes work."""
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
        end = time.monotonic() + 60
        while (result := httpx.post(url + "/scc/sd_get_result", json={"taskId": task}).json())["status"] in (
                "waiting", "running"):
            assert time.monotonic() < end, result
            time.sleep(0.05)
        assert result["status"] == "succeeded" and len(result["images"]) == 1, result
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


# ------------------------------------------------------------------------------ SIGKILL of the real server
KILL_POINTS = ("waiting", "loading", "sampling", "png", "random", "random")


def _kill_when(point: str, url: str, ids: list[str], images: Path, rng: random.Random) -> str:
    """Wait for ``point`` (a task waiting, loading its model, sampling, writing a PNG; or a random moment), then
    return what was seen (the test SIGKILLs the server at once)."""
    if point == "waiting":
        return "waiting"
    if point == "random":
        time.sleep(rng.uniform(0.0, 4.0))
        return "random"
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if point == "png":
            if any(p.name.endswith(".tmp") for p in images.iterdir()):
                return "png"
            time.sleep(0.002)
            continue
        for task in ids:
            result = httpx.post(url + "/scc/sd_get_result", json={"taskId": task}, timeout=10).json()
            if result["status"] == "running" and result["progress"]["phase"] == point:
                return point
        time.sleep(0.005)
    raise AssertionError(f"never saw a task {point}")


def _pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.slow
def test_sigkill_at_random_points_every_task_runs(tmp_path):
    """`sdengine serve` on the real engine (demo model, torch) killed with SIGKILL again and again -- while
    tasks wait, while the model loads, mid-sampling, inside a PNG write (held open by tests.restart_support),
    at random moments -- and restarted on the same results folder, new tasks submitted each round: every
    accepted task ends succeeded, with exactly one PNG, no temp file is left, and the pixels equal an
    uninterrupted run of the same payload with the task's seed (drawn at submit for seed -1)."""
    seed = int(os.environ.get("SDENGINE_TEST_SEED") or time.time_ns() % 100000)
    rng = random.Random(seed)
    (tmp_path / "models").mkdir()
    images = tmp_path / "r" / "images"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    args = ("--backend", "torch", "--max-attempts", "20")
    env = {"SDENGINE_TEST_PNG_PAUSE": "0.3"}
    payloads: dict[str, dict] = {}
    seen = []
    for n, point in enumerate(KILL_POINTS):
        proc = _serve(tmp_path, port, *args, factory="tests.restart_support:factory", env=env)
        try:
            new = []
            for j in range(2):
                payload = {"prompt": f"a house, round {n} task {j}", "steps": rng.choice((4, 8)), "width": 96,
                           "height": 96, "seed": rng.choice((-1, rng.randrange(10**6)))}
                r = httpx.post(url + "/scc/sd_txt2img", json=payload, timeout=30)
                assert r.status_code == 200, r.text
                payloads[r.json()["taskId"]] = payload
                new.append(r.json()["taskId"])
            seen.append(_kill_when(point, url, list(payloads), images, rng))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    assert {"waiting", "loading", "sampling", "png"} <= set(seen), seen

    proc = _serve(tmp_path, port, *args, factory="tests.restart_support:factory")
    start = time.monotonic()
    try:
        results = {}
        end = time.monotonic() + 300
        for task in payloads:
            while (result := httpx.post(url + "/scc/sd_get_result", json={"taskId": task}, timeout=10).json())[
                    "status"] in ("waiting", "running"):
                assert time.monotonic() < end, f"seed {seed}: {result}"
                time.sleep(0.1)
            assert result["status"] == "succeeded", f"seed {seed}: {result}"
            assert len(result["images"]) == 1 and result["info"]["all_seeds"]
            results[task] = result
        print(f"seed {seed}: kills {seen}; the last restart ran the rest in {time.monotonic() - start:.1f} s")
        files = sorted(p.name for p in images.iterdir())
        assert files == sorted(f"{task}-0.png" for task in payloads), f"seed {seed}: {files}"
        # an uninterrupted run of each payload, with the seed its task ran with
        for task, payload in payloads.items():
            drawn = results[task]["info"]["all_seeds"][0]
            assert payload["seed"] in (-1, drawn)
            r = httpx.post(url + "/scc/sd_txt2img", json={**payload, "seed": drawn}, timeout=30)
            while (again := httpx.post(url + "/scc/sd_get_result", json=r.json(), timeout=10).json())[
                    "status"] in ("waiting", "running"):
                time.sleep(0.05)
            assert again["status"] == "succeeded", again
            assert np.array_equal(_pixels(images / f"{task}-0.png"),
                                  _pixels(images / f"{again['taskId']}-0.png")), f"seed {seed}: task {task}"
    finally:
        proc.terminate()
        proc.wait(30)
