"""The GPU benchmark harness (benchmarks/gpu.py) on CPU: ``--smoke`` runs every path, no timing claims.

What can fail here: a system that errors (its status is not "ok"), missing stages or non-finite times in
results.json, the markdown missing the smoke / random-weights statements, the budget not enforced, a
failing system stopping the run. Real-architecture timing needs a GPU (benchmarks/device/).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu

ROOT = Path(__file__).resolve().parent.parent


def harness(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "benchmarks", "gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_run_every_system_ok(tmp_path):
    out = tmp_path / "out"
    proc = harness("--device", "cpu", "--smoke", "--out", str(out), "--repeats", "2", "--warmup", "0",
                   "--workloads", "sd15-cn-512-b1-s20",
                   "--systems", "diffusers,torch,onnxruntime,onnxruntime-graph,tensorrt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["smoke"] and report["precision"] == "fp32"
    # one workload (UNet + ControlNet, text encoder, VAE); the device suite's smoke test runs the SDXL one
    assert [w["workload"]["name"] for w in report["workloads"]] == ["sd15-cn-512-b1-s20"]
    for w in report["workloads"]:
        steps = w["workload"]["steps"]
        assert w["workload"]["size"] == 64 and steps <= 3
        systems = w["systems"]
        # CUDA-only systems say why they did not run, and the run went on
        assert systems["onnxruntime-graph"]["status"] == "unavailable: CUDA graphs need a CUDA device"
        assert systems["tensorrt"]["status"] == "unavailable: TensorRT needs a CUDA device"
        for name in ("diffusers", "torch", "onnxruntime"):
            r = systems[name]
            assert r["status"] == "ok", (w["workload"]["name"], name, r["status"])
            assert len(r["runs"]) == 2 and r["first_run_s"] >= r["load_s"] > 0
            s = r["summary"]
            for key in ("e2e_s", "text_encoder_ms", "unet_ms", "vae_decoder_ms", "denoise_span_ms", "it_per_s"):
                assert math.isfinite(s[key]) and s[key] > 0, (name, key, s)
            # every request encodes its prompts (no prompt cache): the text encoder ran in every timed run
            assert all(run["text_encoder_ms"] > 0 for run in r["runs"])
            assert s["denoise_span_ms"] >= s["unet_ms"] * 0.999
    md = (out / "results.md").read_text()
    assert "SMOKE RUN" in md and "No timing claims" in md
    assert "| diffusers eager + SDPA |" in md and "| sdengine onnxruntime + CUDA graph |" in md


def test_budget_and_failures_are_reported(tmp_path):
    """A system over its budget is stopped and reported; an unknown workload is a clear error."""
    out = tmp_path / "out"
    proc = harness("--device", "cpu", "--smoke", "--out", str(out), "--workloads", "sd15-512-b1-s20",
                   "--systems", "torch", "--budget-s", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())["workloads"][0]["systems"]["torch"]
    assert r["status"].startswith("over budget (1 s;") and r["summary"] == {}
    bad = harness("--device", "cpu", "--smoke", "--workloads", "sd15-1024")
    assert bad.returncode != 0 and "unknown sd15-1024" in bad.stderr and "sd15-512-b1-s20" in bad.stderr


def test_summary_and_markdown():
    r = {"status": "ok", "first_run_s": 9.0, "runs": [
        {"e2e_s": 1.0, "unet_ms": 400.0, "denoise_span_ms": 500.0, "text_encoder_ms": 10.0, "peak_alloc_gb": 2.0},
        {"e2e_s": 3.0, "unet_ms": 600.0, "denoise_span_ms": 700.0, "text_encoder_ms": 30.0, "peak_alloc_gb": 3.0},
        {"e2e_s": 2.0, "unet_ms": 500.0, "denoise_span_ms": 600.0, "text_encoder_ms": 20.0, "peak_alloc_gb": 2.5}]}
    s = gpu.summarize(r, steps=20)
    assert s["e2e_s"] == 2.0 and s["unet_per_step_ms"] == 25.0 and s["it_per_s"] == pytest.approx(20 / 0.6)
    assert s["peak_alloc_gb"] == 3.0 and s["n"] == 3  # memory: the peak over the runs, not the median
    base = dict(r, summary=dict(s, e2e_s=4.0))
    report = {"command": "python -m benchmarks gpu", "smoke": False, "precision": "fp16", "warmup": 2,
              "repeats": 10, "environment": {"date": "d", "device": "cuda", "versions": {"torch": "2.11"},
                                             "python": "3.12", "cpu_flags": [], "gpu": "NVIDIA H200"},
              "workloads": [{"workload": dataclasses_asdict(gpu.WORKLOADS[0]),
                             "systems": {"diffusers": base, "torch": dict(r, summary=s)}}]}
    md = gpu.markdown(report)
    assert "random weights at the real architectures" in md and "NVIDIA H200" in md
    assert "| sdengine torch eager | 2.000 |" in md and "| 2.00x | 9.0 | ok |" in md


def dataclasses_asdict(w):
    import dataclasses

    return dataclasses.asdict(w)


def test_workloads_are_the_issue_list():
    names = {w.name: w for w in gpu.WORKLOADS}
    assert (names["sd15-512-b1-s50"].steps, names["sd15-512-b4-s20"].batch) == (50, 4)
    assert names["sdxl-1024-b1-s30"].family == "sdxl" and names["sd15-cn-512-b1-s20"].controlnet
    assert names["sd15-768-b1-s20"].smoke().size == 64
