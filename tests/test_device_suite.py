"""The one-shot device suite (benchmarks/device/) end to end on CPU with tiny shapes, as CI runs it.

What can fail: our wheel not building offline or not importing from where it was installed (package data:
the demo model, configs); a backend's half precision off the torch fp32 reference beyond the suite's stated
tolerance (relative L2 3e-2); the demo model through TaskService off the golden image (2/255 fp32, 6/255
half) or misread by the evaluator; a harness system failing; the onnxruntime-gpu pieces not rejoining
bit-exactly. Only CUDA behaviour is left for the GPU run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.device.prepare import join, split

ROOT = Path(__file__).resolve().parent.parent


def test_pieces_rejoin_exactly_and_damage_is_named(tmp_path):
    wheel = tmp_path / "onnxruntime_gpu-1.0-cp312-cp312-linux_x86_64.whl"
    data = os.urandom(2_500_000)
    wheel.write_bytes(data)
    manifest = split(wheel, tmp_path / "parts", piece=1_000_000)
    assert [p["size"] for p in manifest["parts"]] == [1_000_000, 1_000_000, 500_000]
    out = join(tmp_path / "parts", tmp_path / "joined")
    assert out.name == wheel.name and hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    part = tmp_path / "parts" / "part-01"
    raw = part.read_bytes()
    part.write_bytes(bytes([raw[0] ^ 0xFF]) + raw[1:])  # always a change (a fixed byte left 1 in 256 intact)
    with pytest.raises(ValueError, match="part-01: sha256 mismatch"):
        join(tmp_path / "parts", tmp_path / "joined2")
    part.unlink()
    with pytest.raises(ValueError, match="part-01: piece missing"):
        join(tmp_path / "parts", tmp_path / "joined3")


@pytest.mark.slow
def test_suite_smoke_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    carry = tmp_path / "carry"
    prep = subprocess.run([sys.executable, "-m", "benchmarks.device.prepare", "--only-sdengine", "--out", str(carry)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert prep.returncode == 0, prep.stderr[-2000:]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device.run", "--device", "cpu", "--smoke",
                           "--out", str(out), "--carry", str(carry), "--ort-parts", str(tmp_path / "no-parts"),
                           "--workloads", "sdxl-1024-b1-s30", "--systems", "diffusers,torch"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = json.loads((out / "suite.json").read_text())
    steps = {s["step"]: s for s in suite["steps"]}
    assert list(steps) == ["install", "backends vs torch fp32", "demo model through the API", "harness"]
    assert all(s["status"] == "ok" for s in steps.values()), {k: s["status"] for k, s in steps.items()}

    install = steps["install"]
    assert install["installed"] == ["sdengine-0.1.0-py3-none-any.whl"]
    assert "/site/" in install["sdengine_wheel"]["file"] and install["sdengine_wheel"]["demo"]
    assert install["onnxruntime_gpu"].startswith("not carried")

    rows = {r["backend"]: r for r in steps["backends vs torch fp32"]["rows"]}
    for name in ("torch fp16", "onnxruntime fp16"):
        assert rows[name]["status"] == "ok"
        for comp in ("text_encoder", "unet", "vae_decoder"):
            assert rows[name][comp]["finite"] and rows[name][comp]["rel_l2"] <= 3e-2
    assert rows["tensorrt fp16"]["status"] == "unavailable: TensorRT needs a CUDA device"

    demo = steps["demo model through the API"]["rows"]
    assert {(r["backend"], r["precision"]) for r in demo} >= {("torch", "fp32"), ("torch", "fp16")}
    for r in demo:
        assert r["api_status"] == "succeeded" and r["evaluator"] == [1, "large", "red", "circle", "middle", "blue"]
        assert r["golden_mean_abs_diff"] <= (2.0 if r["precision"] == "fp32" else 6.0)

    assert steps["harness"]["workloads"] == {"sdxl-1024-b1-s30": {"diffusers": "ok", "torch": "ok"}}
    md = (out / "suite.md").read_text()
    assert "SMOKE" in md and "| torch fp16 |" in md and "sdengine torch eager" in md
