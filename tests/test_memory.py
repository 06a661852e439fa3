"""The memory model (engine.memory) against measured peak RSS of the real engine, the submit-time budget, and the
real server under an address-space cap (RLIMIT_AS) receiving the probe's memory-heavy payloads (issue 12)."""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from api_compat import ApiError, TaskService
from engine.memory import Architecture, architecture_of, estimate, estimate_request, largest_fitting
from tests.api_support import double_factory, wait_healthy

needs_openvino = pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None,
                                    reason="the openvino extra is part of the dev extra")

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

MEASURE = textwrap.dedent("""
    import json, sys
    from engine.pipeline import Engine
    from engine.request import GenerationRequest

    models, cache, backend = sys.argv[1], sys.argv[2], sys.argv[3]
    engine = Engine(models_dir=models, cache_dir=cache, backend=backend)
    engine.generate(GenerationRequest(model="tiny-sd1", steps=1, width=64, height=64, seed=1))  # warm-up
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    out = []
    for size in map(int, sys.argv[4:]):
        # Reset the high-water mark to the current RSS (Linux clear_refs 5): the peak of loading and exporting
        # during the warm-up is not the request's.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        engine.generate(GenerationRequest(model="tiny-sd1", steps=1, width=size, height=size, seed=1),
                        on_images=lambda first, images, texts: None)  # as the task writer streams them
        out.append([size, status("VmHWM") - before, status("VmHWM")])
    print(json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend,sizes", [("onnxruntime", [256, 384]), ("torch", [384, 1024]),
                                           pytest.param("openvino", [384, 1024], marks=needs_openvino)])
def test_estimate_matches_measured_peak(tiny_store, tmp_path_factory, backend, sizes):
    """The real engine (tiny-sd1, 1 step, CFG 7) in a fresh process: the growth of its peak RSS over a request
    lies within 35% + 96 MiB of the estimated activations (full attention on ONNX Runtime: 2 x rows x heads x
    T^2 fp32 at the 48x48 latent of 384^2 is 324 MiB; torch's flash attention builds none in the UNet; OpenVINO
    fuses the full-attention export into a blocked kernel: none either). 1024^2 and 2048^2 are decoded in 512^2
    tiles (engine.tiling), where the untiled decode's mid-block attention alone would be 2 GiB at 1024^2.
    On OpenVINO (the CPU default) the largest size cheap enough here, 1024^2, is also held to the issue-31 bar:
    the process's whole peak RSS within 25% of ``estimate_request(...).total`` (what the budget compares);
    2048^2 (~10 minutes on 2 loaded cores) is measured by ``python -m benchmarks memory`` (BENCHMARKS.md,
    "Memory of whole requests": demo model 2048^2 -13%, batch 8 +8%)."""
    # A cache of its own: the warm-up exports every component in the measuring process whatever ran before in
    # the session (with a cache shared with other tests the result depended on the test order).
    cache = tmp_path_factory.mktemp("memory-cache")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tiny_store), str(cache), backend, *map(str, sizes)],
                          capture_output=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    arch, _ = architecture_of(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors")
    for size, measured, peak in json.loads(proc.stdout.decode().strip().splitlines()[-1]):
        predicted = estimate(arch, size, size, 1, backend=backend).activations
        # 35% + 96 MiB: the same request's growth varies by ~60 MiB between runs of one commit (torch 1024^2:
        # +328 and +384 MiB measured by fresh-clone CI runs, estimate 236 MiB): allocator reuse, not the model
        assert abs(measured - predicted) <= 0.35 * predicted + 96 * MIB, (
            f"{backend} {size}^2: measured +{measured / MIB:.0f} MiB, estimated {predicted / MIB:.0f} MiB")
        if backend == "openvino" and size == max(sizes):
            total = estimate_request(arch, size, size, 1, backend=backend).total
            assert abs(peak - total) <= 0.25 * total, (
                f"{backend} {size}^2: peak RSS {peak / MIB:.0f} MiB, estimated {total / MIB:.0f} MiB")


def test_attention_dominates_as_measured_by_the_probe():
    """The demo model (64 channels, 4 heads at full latent resolution) at 1024^2 on ONNX Runtime: the probe
    measured 1.3 -> 20.9 GB with full attention; the estimate is the same order (attention: 2 x 2 x 4 x 16384^2 x 4 B
    = 16 GiB)."""
    demo = ROOT / "engine/models/bundled/Stable-diffusion/sdengine-demo.safetensors"
    arch, native = architecture_of(demo)
    assert native == 64 and arch.unet_heads == (4, 4)
    e = estimate(arch, 1024, 1024, 1, backend="onnxruntime", attention=("full", "full"))  # the export the probe ran
    assert 15 * 2**30 < e.total < 21 * 2**30
    # the export now computes attention in 16 query chunks (export.attention) on ONNX Runtime
    assert estimate(arch, 1024, 1024, 1, backend="onnxruntime").total < 4 * 2**30
    assert estimate(arch, 512, 512, 2, backend="onnxruntime").activations > 1.9 * estimate(arch, 512, 512, 1).activations


def test_sd15_architecture_from_the_bundled_config():
    from engine.models.checkpoints import bundled_config

    cfg = bundled_config("sd15.json")
    arch = Architecture.from_configs(cfg["unet"], cfg["vae"], weights_bytes=4_265_000_000)
    assert arch.unet_heads == (8, 8, 8, 8) and arch.unet_attention == (True, True, True, False)
    full = estimate(arch, 1024, 1024, 1, backend="onnxruntime", attention=("full", "full"))
    assert full.unet > 30 * 2**30
    assert estimate(arch, 1024, 1024, 1, backend="onnxruntime").unet < 3 * 2**30  # 16 query chunks  # 2 rows x 8 heads x 16384^2 x 4 B x 2 = 32 GiB
    assert estimate(arch, 1024, 1024, 1, backend="torch").unet < 1 * 2**30
    # the tiled VAE decode (the engine's default above 768^2) is what brings 1024^2 on torch under 8 GB
    assert estimate(arch, 1024, 1024, 1, backend="torch").total < 8e9 < estimate(arch, 1024, 1024, 1, backend="torch",
                                                                                 tiling=None).total


def _service(tmp_path, tiny_store, budget):
    models = tmp_path / "m" / "Stable-diffusion"
    models.mkdir(parents=True)
    shutil.copyfile(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors", models / "tiny-sd1.safetensors")
    # onnxruntime's estimate (16 query chunks) is the one these budgets are written for; the CPU default is
    # openvino where installed, whose fused attention holds no score matrices
    return TaskService(tmp_path / "m", results_dir=tmp_path / "r", engine_factory=double_factory,
                        default_model="tiny-sd1", memory_budget=budget, backend="onnxruntime")


def test_budget_refuses_naming_the_field_and_the_largest_that_fits(tmp_path, tiny_store):
    budget = 1024 * MIB
    with _service(tmp_path, tiny_store, budget) as svc:
        assert svc.sd_txt2img({"width": 384, "height": 384})["status"] == "waiting"
        with pytest.raises(ApiError) as exc:
            svc.sd_txt2img({"width": 1024, "height": 1024})  # the probe's payload
        err = exc.value
        assert (err.code, err.field, err.http_status) == ("too_much_memory", "width", 422)
        assert "1024x1024" in str(err) and "budget of 1.0 GiB" in str(err)
        arch, _ = architecture_of(tmp_path / "m" / "Stable-diffusion" / "tiny-sd1.safetensors")
        w, h = largest_fitting(arch, 1024, 1024, 1, budget, backend="onnxruntime")
        assert err.allowed == f"width x height at most {w}x{h} at batch_size 1" and 384 <= w < 1024
        assert svc.sd_txt2img({"width": w, "height": h})["status"] == "waiting"
        with pytest.raises(ApiError) as exc:
            svc.sd_txt2img({"width": 512, "height": 512, "batch_size": 8})
        assert exc.value.field == "batch_size" and exc.value.allowed.startswith("batch_size at most ")
        # the hires fix's second pass is held to the same budget, naming hr_scale
        assert svc.sd_txt2img({"width": 192, "height": 192, "enable_hr": True, "hr_scale": 2})["status"] == "waiting"
        with pytest.raises(ApiError) as exc:
            svc.sd_txt2img({"width": 384, "height": 384, "enable_hr": True, "hr_scale": 4})
        assert (exc.value.code, exc.value.field) == ("too_much_memory", "hr_scale")
        assert exc.value.allowed.startswith("hr_scale at most ") and "second pass at 1536x1536" in str(exc.value)


def _png(width, height) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_server_under_an_address_space_cap(tmp_path, tiny_store):
    """`sdengine serve` (real engine, ONNX Runtime) with RLIMIT_AS = 8 GiB and a 1 GiB budget: the probe's
    memory-heavy payloads are refused at submit (1024^2, 2048^2, a batch of 8, thin images) or queued as
    compressed bytes (4096^2 units), none fails inside the worker, the largest size the budget admits runs
    to success under the cap, and the server stays up."""
    models = tmp_path / "m"
    for kind, name in (("Stable-diffusion", "tiny-sd1.safetensors"), ("ControlNet", "tiny-controlnet-sd1.safetensors")):
        (models / kind).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_store / kind / name, models / kind / name)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cap = 8 * 2**30

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port), "--models-dir", str(models),
         "--results-dir", str(tmp_path / "r"), "--memory-budget-gb", "1.0", "--backend", "onnxruntime"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=limit)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            wait_healthy(f"http://127.0.0.1:{port}", proc, lambda: "sdengine serve did not come up")
            m = {"stable_diffusion_model": "tiny-sd1", "steps": 1}
            refused = [
                ({**m, "width": 1024, "height": 1024}, "width"),
                ({**m, "width": 2048, "height": 2048}, "width"),
                ({**m, "width": 512, "height": 512, "batch_size": 8}, "batch_size"),
            ]
            for payload, field in refused:
                r = http.post("/scc/sd_txt2img", json=payload)
                assert r.status_code == 422 and r.json()["error"]["code"] == "too_much_memory", r.text
                assert r.json()["error"]["field"] == field
            for size in ((4096, 1), (100000, 1)):
                unit = {"model": "tiny-controlnet-sd1", "module": "canny", "input_image": _png(*size)}
                r = http.post("/scc/sd_txt2img", json={**m, "width": 64, "height": 64,
                                                       "alwayson_scripts": {"controlnet": {"units": [unit]}}})
                assert r.status_code == 422 and r.json()["error"]["field"].endswith("input_image"), r.text
            big = {"model": "tiny-controlnet-sd1", "module": "none", "resize_mode": 0, "input_image": _png(4096, 4096)}
            tasks = [http.post("/scc/sd_txt2img", json={**m, "width": 64, "height": 64, "alwayson_scripts": {
                "controlnet": {"units": [big] * 3}}}).json()["taskId"] for _ in range(2)]
            r = http.post("/scc/sd_txt2img", json={**m, "width": 64, "height": 64}).json()
            tasks.append(r["taskId"])
            # the largest size the budget admits at batch 1 (from the 1024^2 refusal), run for real under the cap
            r = http.post("/scc/sd_txt2img", json={**m, "width": 1024, "height": 1024})
            w, h = map(int, r.json()["error"]["allowed"].split("at most ")[1].split(" ")[0].split("x"))
            tasks.append(http.post("/scc/sd_txt2img", json={**m, "width": w, "height": h}).json()["taskId"])
            deadline = time.monotonic() + 300
            for task in tasks:
                while (result := http.post("/scc/sd_get_result", json={"taskId": task}).json())["status"] not in (
                        "succeeded", "failed"):
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.2)
                assert result["status"] == "succeeded", result.get("error")
            assert http.get("/health").json()["status"] == "ok"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert b"MemoryError" not in out and b"Traceback" not in out, out.decode(errors="replace")[-3000:]


def test_clip_skip_beyond_the_text_encoder_is_refused_at_submit(tmp_path, tiny_store):
    """The probe: clip_skip 9-12 on a model with fewer layers was accepted and failed in the worker (an ONNX
    Gather out of range). tiny-sd1's text encoder has 5 layers."""
    with _service(tmp_path, tiny_store, None) as svc:
        assert svc.sd_txt2img({"clip_skip": 5})["status"] == "waiting"
        for payload in ({"clip_skip": 6}, {"clip_skip": 12}, {"override_settings": {"CLIP_stop_at_last_layers": 9}}):
            with pytest.raises(ApiError) as exc:
                svc.sd_txt2img(payload)
            # the error names the field the payload used (issue 23: the field-origin map of the face)
            field = "override_settings.CLIP_stop_at_last_layers" if "override_settings" in payload else "clip_skip"
            assert (exc.value.field, exc.value.http_status) == (field, 422)
            assert exc.value.allowed.startswith("an integer from 1 to 5")


def test_over_long_prompts_are_refused_at_submit(tmp_path, tiny_store):
    """The probe: prompts over the chunk limit were accepted and failed in the worker (`invalid_request` only after
    queueing). engine.admission tokenises them at submit with the model's tokenizer, by the rule the worker
    applies (engine.conditioning), and the error names the field."""
    long = " ".join(["cat"] * (32 * 75 + 1))  # 2401 tokens: 33 chunks of 75, the limit is 32
    with _service(tmp_path, tiny_store, None) as svc:
        assert svc.sd_txt2img({"prompt": " ".join(["cat"] * (32 * 75))})["status"] == "waiting"  # exactly 32
        for payload, field in (({"prompt": long}, "prompt"), ({"negtive_prompt": long}, "negtive_prompt"),
                               ({"prompt": f"[dog:{long}:3]", "steps": 6}, "prompt")):
            with pytest.raises(ApiError) as exc:
                svc.sd_txt2img(payload)
            assert (exc.value.code, exc.value.field, exc.value.http_status) == ("invalid_request", field, 422)
            assert exc.value.allowed == "at most 32 chunks (2400 tokens)"


def test_whole_request_n_iter_answer_hires_and_upscaler_hook(tmp_path, tiny_store):
    """Issue 31: what a whole request holds. The images of n_iter iterations are streamed to the task's files, so
    n_iter adds nothing to the engine's peak; the webui route holds every image as base64 (3 copies of 4/3 of the
    PNG) and is refused naming n_iter with the largest that fits; the hires fix counts its second pass and, with
    an image upscaler, the decode / upscale / encode; a model upscaler's cost comes through the hook."""
    from engine.memory import answer_bytes, model_upscaler_pass, png_bytes, resize_pass

    arch, _ = architecture_of(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors")
    one = estimate_request(arch, 512, 512, 2, backend="onnxruntime")
    assert estimate_request(arch, 512, 512, 2, n_iter=100, backend="onnxruntime") == one  # streamed
    held = estimate_request(arch, 512, 512, 2, n_iter=100, streamed=False, backend="onnxruntime")
    assert held.total - one.total == 99 * 2 * 512 * 512 * 3  # earlier iterations' uint8 images, if not streamed
    answer = estimate_request(arch, 512, 512, 2, n_iter=100, answer=True, backend="onnxruntime")
    assert answer.total - one.total == answer_bytes(512, 512, 200) == int(200 * 3 * 4 / 3 * png_bytes(512, 512))
    assert png_bytes(512, 512) > 512 * 512 * 3  # incompressible pixels: a stored PNG is larger than the raw
    latent = estimate_request(arch, 256, 256, 1, hires=(512, 512), backend="torch")
    lanczos = estimate_request(arch, 256, 256, 1, hires=(512, 512), upscaler=resize_pass, backend="torch")
    assert lanczos.upscale > 0 == latent.upscale and lanczos.total >= latent.total > one.base
    assert latent.unet == estimate_request(arch, 512, 512, 1, backend="torch").unet  # the second pass's UNet
    # the hook a model upscaler (spandrel, the extras) plugs in: whole-image vs tiled activations
    whole = model_upscaler_pass(4, features=64, model_bytes=64 * MIB)(512, 512, 2048, 2048, 1)
    tiled = model_upscaler_pass(4, tile=128, features=64, model_bytes=64 * MIB)(512, 512, 2048, 2048, 1)
    assert whole > tiled > 64 * MIB
    big = estimate_request(arch, 512, 512, 1, hires=(2048, 2048), upscaler=model_upscaler_pass(4), backend="torch")
    assert big.upscale >= model_upscaler_pass(4)(512, 512, 2048, 2048, 1) > whole - 64 * MIB - 1

    # a budget that holds the answer of exactly 20 iterations (the service's estimate: onnxruntime, CFG 7)
    budget = estimate_request(arch, 512, 512, 2, n_iter=20, answer=True, backend="onnxruntime").total + MIB
    with _service(tmp_path, tiny_store, budget) as svc:
        payload = {"width": 512, "height": 512, "batch_size": 2, "n_iter": 100}
        assert svc.sd_txt2img(payload)["status"] == "waiting"  # /scc: URLs, streamed files
        with pytest.raises(ApiError) as exc:
            svc.sd_txt2img(payload, inline_images=True)  # the webui route's answer: 200 images inline
        err = exc.value
        assert (err.code, err.field, err.http_status) == ("too_much_memory", "n_iter", 422)
        assert err.allowed == "n_iter at most 20 at batch_size 2" and "base64" in str(err)
        assert svc.sd_txt2img({**payload, "n_iter": 20}, inline_images=True)["status"] == "waiting"
        with pytest.raises(ApiError):
            svc.sd_txt2img({**payload, "n_iter": 21}, inline_images=True)
        # the hires fix with an image upscaler, held to the same budget, naming hr_scale
        with pytest.raises(ApiError) as exc:
            svc.sd_txt2img({"width": 512, "height": 512, "enable_hr": True, "hr_scale": 4, "hr_upscaler": "Lanczos"})
        assert (exc.value.code, exc.value.field) == ("too_much_memory", "hr_scale")
