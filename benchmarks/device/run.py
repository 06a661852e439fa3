"""The one-shot device suite: everything a fresh GPU machine (no network) can show, in one run, by value.

    python -m benchmarks.device.run --out "$OUT"                      # on the GPU machine (default --device cuda)
    python -m benchmarks.device.run --device cpu --smoke --out DIR    # CI: the same steps on tiny shapes

Steps, each recorded (status, seconds, figures) and none stopping the others:

a. **install** what is carried (benchmarks/device/prepare.py): the wheels of ``carry/wheels`` with
   ``pip install --no-deps --no-index --target`` into a folder put first on ``sys.path``/``PYTHONPATH``; our
   own wheel is then imported from that folder in a fresh process (packaging check: package data, demo model);
   onnxruntime-gpu is joined from ``ort-gpu-parts/`` when every piece is there (sha256 checked).
b. **correctness**: every backend present (torch fp16, torch compiled fp16, onnxruntime CUDA EP fp16,
   TensorRT) against the torch fp32 reference on the same inputs, per component (text encoder, UNet, VAE
   decoder) of the SD1.5 architecture (random weights; tiny model with ``--smoke``): outputs finite and
   relative L2 <= :data:`HALF_TOL`; then the bundled demo model through the whole API (``TaskService``,
   sd_txt2img -> PNG) on the device, fp32 and half: mean absolute difference to the golden image
   (tests/golden) <= :data:`GOLDEN_TOL` and the demo evaluator reads the prompt's scene.
c. **the harness** (benchmarks/gpu.py): SD1.5 workloads first, SDXL last, while the time budget lasts.
d. **results**: ``suite.json`` and ``suite.md`` (and the harness's ``results.json``/``results.md``) in --out.

On a CPU "half" means what the torch backend makes of it there (bf16 where the CPU has native bf16, else
fp32) and fp16 ONNX graphs on the CPU EP; torch.compile checks are left to tests/test_torch_fast.py unless
``--compile``. Budget: ``--budget-s`` (default 480 s) for the whole suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("benchmarks.device")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
HALF_TOL = {"text_encoder": 3e-2, "unet": 3e-2, "vae_decoder": 3e-2}  # relative L2 vs torch fp32
GOLDEN_TOL = {"fp32": 2.0, "half": 6.0}  # mean |diff| to the golden image, in 1/255
DEMO_PROMPT = "a large red circle in the middle on a blue background"
DEMO_SCENE = (1, "large", "red", "circle", "middle", "blue")


class Suite:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.steps: list[dict] = []
        self.work = Path(tempfile.mkdtemp(prefix="sdengine-device-"))
        self.models_dir = self.out / "models" if args.keep_models else self.work / "models"
        self.cache_dir = self.work / "cache"

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def step(self, name: str, fn: Callable[[], dict]) -> dict:
        t = time.perf_counter()
        log.info("== %s (%.0f s left)", name, self.left())
        try:
            record = {"step": name, **fn()}
            record.setdefault("status", "ok")
        except Exception as exc:
            log.exception("%s failed", name)
            record = {"step": name, "status": f"failed: {type(exc).__name__}: {str(exc)[:500]}",
                      "traceback": traceback.format_exc()[-3000:]}
        record["seconds"] = round(time.perf_counter() - t, 2)
        self.steps.append(record)
        self.write()
        return record

    # -- a. install -------------------------------------------------------------------------------------
    def install(self) -> dict:
        wheels = Path(self.args.carry) / "wheels"
        result: dict[str, Any] = {"installed": []}
        target = self.work / "site"
        found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        if not found:
            result["status"] = f"skipped: nothing carried ({wheels} has no wheels; benchmarks/device/prepare.py)"
        else:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                            "--disable-pip-version-check", "--target", str(target), *map(str, found)], check=True)
            result["installed"] = [w.name for w in found]
            # everything else (this suite, the harness workers) sees the carried packages first; our own
            # code stays the checkout's (the repository root is first on sys.path when run with -m)
            _prepend_path(target, after_root=True)
            if any(w.name.startswith("sdengine-") for w in found):
                result["sdengine_wheel"] = check_wheel(target)
        parts = Path(self.args.ort_parts)
        if (parts / "manifest.json").exists():
            from benchmarks.device.prepare import join

            wheel = join(parts, self.work / "ort-gpu-wheel")
            ort_target = self.work / "ort-gpu"
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                            "--disable-pip-version-check", "--target", str(ort_target), str(wheel)], check=True)
            _prepend_path(ort_target, after_root=False)
            result["onnxruntime_gpu"] = wheel.name
        else:
            result["onnxruntime_gpu"] = f"not carried ({parts}/manifest.json missing)"
        probe = subprocess.run([sys.executable, "-c", "import onnxruntime as o; print(o.__version__, "
                                "','.join(o.get_available_providers()))"], capture_output=True, text=True,
                               env=dict(os.environ))
        result["onnxruntime"] = probe.stdout.strip() or probe.stderr.strip()[-300:]
        return result

    # -- b. correctness ---------------------------------------------------------------------------------
    def backends_vs_fp32(self) -> dict:
        import numpy as np

        from benchmarks import gpu
        from engine.backends import create_backend
        from engine.config import EngineConfig
        from engine.models.store import ModelStore

        smoke, device = self.args.smoke, self.args.device
        gpu.write_models(self.models_dir, {"sd15"}, smoke, device, False, self.cache_dir)
        name = gpu.model_names("sd15", smoke)[0]

        def components():
            # a fresh load per backend: a backend casts and moves the modules it is handed, in place
            return ModelStore(self.models_dir, bundled=None, cache_dir=self.cache_dir).load_model(name)

        model = components()
        key = model.family.artefact_key  # the key the engine uses: the harness then finds these artefacts
        base = dict(device=device, cache_dir=self.cache_dir)
        reference = create_backend(EngineConfig(backend="torch", precision="fp32", **base), model.components, key)
        latent = 8 if smoke else 64
        feeds = {}
        for comp in HALF_TOL:
            desc = reference.descriptor(comp)
            feeds[comp] = {k: v.numpy() for k, v in desc.sample_inputs(2, latent, latent, seed=7).items()}
            if comp == "text_encoder":
                feeds[comp]["input_ids"][:, 0] = 49406  # BOS, as real prompts
        refs = {comp: reference.run(comp, f) for comp, f in feeds.items()}
        del reference
        _free(device)

        candidates = [("torch fp16", "torch", {}), ("torch compiled fp16", "torch", {"torch_compile": True}),
                      ("onnxruntime fp16", "onnxruntime", {}), ("tensorrt fp16", "tensorrt", {})]
        rows = []
        for label, backend, extra in candidates:
            row: dict[str, Any] = {"backend": label}
            rows.append(row)
            why = _unavailable(backend, device, extra, self.args.compile)
            if why:
                row["status"] = why
                continue
            try:
                b = create_backend(EngineConfig(backend=backend, precision="fp16", **base, **extra),
                                   components().components, key)
                for comp, f in feeds.items():
                    out = b.run(comp, f)
                    out_name = next(iter(refs[comp]))
                    got = _host(out[out_name])
                    ref = refs[comp][out_name]
                    err = float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))
                    finite = bool(np.isfinite(got).all())
                    row[comp] = {"rel_l2": err, "finite": finite, "ok": finite and err <= HALF_TOL[comp],
                                 "dtype": getattr(b, "dtype_of", lambda c: "fp16 graph")(comp)}
                row["status"] = "ok" if all(row[c]["ok"] for c in feeds) else "FAILED: over tolerance or not finite"
                del b
            except Exception as exc:
                row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:400]}"
            _free(device)
        bad = [r["backend"] for r in rows if not (r["status"] == "ok" or r["status"].startswith("unavailable"))]
        return {"rows": rows, "tolerance_rel_l2": HALF_TOL, "status": "ok" if not bad else f"FAILED: {', '.join(bad)}"}

    def demo_api(self) -> dict:
        import numpy as np
        from PIL import Image

        from api_compat import TaskService

        golden = np.asarray(Image.open(ROOT / "tests" / "golden" / "demo-seed1-euler-a.png").convert("RGB"))
        try:
            from training.evaluate import analyse
        except ImportError:  # opencv missing: the golden image comparison still runs
            analyse = None
        rows = []
        backends = ["torch"] + (["onnxruntime"] if _unavailable("onnxruntime", self.args.device, {}, True) is None
                                else [])
        for backend in backends:
            for precision in ("fp32", "half"):
                if backend == "onnxruntime" and precision == "fp32" and self.args.device.startswith("cuda"):
                    continue  # the fp32 reference is torch's; ORT fp16 is the product path on CUDA
                prec = precision if precision == "fp32" else "fp16"
                row: dict[str, Any] = {"backend": backend, "precision": prec}
                rows.append(row)
                try:
                    with TaskService(models_dir=self.work / "empty-store", results_dir=self.work / "results",
                                      backend=backend, device=self.args.device, precision=prec,
                                      cache_dir=self.cache_dir / "demo") as sd:
                        task = sd.sd_txt2img({"prompt": DEMO_PROMPT, "steps": 20, "cfg_scale": 1.5, "seed": 1,
                                              "sampler_name": "Euler a"})
                        res = sd.wait(task["taskId"], timeout=max(self.left(), 60))
                    row["api_status"] = res["status"]
                    img = np.asarray(Image.open(res["images"][0]).convert("RGB"))
                    diff = float(np.abs(img.astype(np.float64) - golden).mean())
                    row["golden_mean_abs_diff"] = diff
                    ok = res["status"] == "succeeded" and diff <= GOLDEN_TOL[precision]
                    if analyse is not None:
                        det = analyse(img)
                        scene = (det.count, det.size, det.colour, det.shape, det.position, det.background)
                        row["evaluator"] = list(scene)
                        ok = ok and scene == DEMO_SCENE
                    row["status"] = "ok" if ok else "FAILED"
                except Exception as exc:
                    row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:400]}"
        bad = [f"{r['backend']} {r['precision']}" for r in rows if r["status"] != "ok"]
        return {"rows": rows, "tolerance_mean_abs_diff_255": GOLDEN_TOL,
                "status": "ok" if not bad else f"FAILED: {', '.join(bad)}"}

    # -- c. harness -------------------------------------------------------------------------------------
    def harness(self) -> dict:
        from benchmarks import gpu

        workloads = self.args.workloads or ("sd15-512-b1-s20,sd15-512-b1-s50,sd15-512-b4-s20,sd15-cn-512-b1-s20,"
                                            "sd15-768-b1-s20,sdxl-1024-b1-s30")
        argv = ["--device", self.args.device, "--out", str(self.out / "harness"), "--workloads", workloads,
                "--models-dir", str(self.models_dir), "--cache-dir", str(self.cache_dir),
                "--budget-s", str(self.args.system_budget_s), "--total-budget-s", str(max(self.left() - 15, 10))]
        if self.args.smoke:
            argv += ["--smoke", "--repeats", "2", "--warmup", "0"]
        if self.args.systems:
            argv += ["--systems", self.args.systems]
        args = gpu.parser().parse_args(argv)
        args.argv = argv
        args.warmup = args.warmup if args.warmup is not None else (0 if self.args.smoke else 2)
        args.repeats = args.repeats if args.repeats is not None else (2 if self.args.smoke else 10)
        report = gpu.run(args)
        done = {w["workload"]["name"]: {s: r["status"] for s, r in w["systems"].items()}
                for w in report["workloads"]}
        return {"workloads": done, "results": str(self.out / "harness" / "results.md")}

    # -- d. results -------------------------------------------------------------------------------------
    def write(self) -> None:
        from benchmarks.gpu import environment

        report = {"suite": "benchmarks/device/run.py", "argv": self.args.argv, "device": self.args.device,
                  "smoke": self.args.smoke, "elapsed_s": round(time.monotonic() - self.start, 1),
                  "environment": environment(self.args.device), "steps": self.steps}
        _atomic(self.out / "suite.json", json.dumps(report, indent=1, default=str))
        _atomic(self.out / "suite.md", markdown(report, self.out))


def markdown(report: dict, out: Path) -> str:
    env = report["environment"]
    lines = [f"# Device suite ({env['date']}, {env.get('gpu') or 'no GPU'}, driver {env.get('driver') or '-'}, "
             f"{report['elapsed_s']} s{', SMOKE: tiny shapes, no timing claims' if report['smoke'] else ''})", "",
             "| step | status | seconds |", "|---|---|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['step']} | {str(s['status'])[:200]} | {s['seconds']} |")
    for s in report["steps"]:
        if s["step"] == "backends vs torch fp32" and s.get("rows"):
            lines += ["", "Backends vs the torch fp32 reference (relative L2; tolerance "
                      + ", ".join(f"{k} {v:g}" for k, v in HALF_TOL.items()) + "):", "",
                      "| backend | " + " | ".join(HALF_TOL) + " | status |", "|---|" + "---|" * (len(HALF_TOL) + 1)]
            for r in s["rows"]:
                cells = [f"{r[c]['rel_l2']:.1e} ({r[c]['dtype']})" if c in r else "-" for c in HALF_TOL]
                lines.append(f"| {r['backend']} | " + " | ".join(cells) + f" | {r['status'][:160]} |")
        if s["step"] == "demo model through the API" and s.get("rows"):
            lines += ["", "Demo model through TaskService (golden image tests/golden/demo-seed1-euler-a.png; "
                      f"tolerance mean |diff| fp32 {GOLDEN_TOL['fp32']}/255, half {GOLDEN_TOL['half']}/255):", "",
                      "| backend | precision | mean abs diff (/255) | evaluator | status |", "|---|---|---|---|---|"]
            for r in s["rows"]:
                diff = f"{r['golden_mean_abs_diff']:.2f}" if "golden_mean_abs_diff" in r else "-"
                lines.append(f"| {r['backend']} | {r['precision']} | {diff} | {' '.join(map(str, r.get('evaluator', [])))}"
                             f" | {r['status'][:160]} |")
    harness = out / "harness" / "results.md"
    if harness.exists():
        lines += ["", harness.read_text(encoding="utf-8")]
    return "\n".join(lines) + "\n"


def check_wheel(target: Path) -> dict:
    """Import our installed wheel in a fresh process from ``target`` alone: files, package data, version."""
    code = ("import json, engine, engine.models.store as s; from importlib.resources import files; "
            "b = s.bundled_root(); "
            "print(json.dumps({'file': engine.__file__, 'demo': sorted(p.name for p in b.rglob('*.safetensors')), "
            "'configs': sorted(p.name for p in files('engine.models').joinpath('configs').iterdir())}))")
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          env=env, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"our wheel does not import from {target}: {proc.stderr[-800:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if not info["file"].startswith(str(target)):
        raise RuntimeError(f"engine imported from {info['file']}, not from the installed wheel in {target}")
    if not info["demo"] or "sd15.json" not in info["configs"]:
        raise RuntimeError(f"the wheel lacks package data: {info}")
    return info


def _unavailable(backend: str, device: str, extra: dict, compile_ok: bool) -> str | None:
    import importlib.util

    if extra.get("torch_compile") and not (device.startswith("cuda") or compile_ok):
        return "unavailable: compile checks on CPU run in tests/test_torch_fast.py (--compile to run here)"
    if backend == "onnxruntime":
        import onnxruntime

        if device.startswith("cuda") and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return f"unavailable: onnxruntime {onnxruntime.__version__} has no CUDA EP (onnxruntime-gpu not carried)"
    if backend == "tensorrt":
        if not device.startswith("cuda"):
            return "unavailable: TensorRT needs a CUDA device"
        if importlib.util.find_spec("tensorrt") is None:
            return "unavailable: tensorrt not installed"
    return None


def _host(value):
    import numpy as np

    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _prepend_path(folder: Path, after_root: bool) -> None:
    folder = str(folder)
    index = 1 if after_root and sys.path and sys.path[0] in ("", str(ROOT)) else 0
    sys.path.insert(index, folder)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if after_root:
        parts = [str(ROOT), folder] + [p for p in parts if p != str(ROOT)]
    else:
        parts = [folder] + parts
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)
    import importlib

    importlib.invalidate_caches()


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.device.run", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "device-out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CI on CPU); no timing claims")
    p.add_argument("--budget-s", type=float, default=480.0, help="for the whole suite (default 480)")
    p.add_argument("--system-budget-s", type=float, default=150.0, help="per harness system and workload")
    p.add_argument("--workloads", help="harness workloads (default: SD1.5 ones, then SDXL)")
    p.add_argument("--systems", help="harness systems (default: the harness's)")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: install,backends,demo,harness")
    p.add_argument("--compile", action="store_true", help="also check torch.compile on a CPU")
    p.add_argument("--carry", default=str(HERE / "carry"))
    p.add_argument("--ort-parts", default=str(HERE / "ort-gpu-parts"))
    p.add_argument("--keep-models", action="store_true", help="write the benchmark models under --out")
    args = p.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    skip = set(filter(None, args.skip.split(",")))
    suite = Suite(args)
    if "install" not in skip:
        suite.step("install", suite.install)
    if "backends" not in skip:
        suite.step("backends vs torch fp32", suite.backends_vs_fp32)
    if "demo" not in skip:
        suite.step("demo model through the API", suite.demo_api)
    if "harness" not in skip:
        suite.step("harness", suite.harness)
    suite.write()
    print((suite.out / "suite.md").read_text(encoding="utf-8"))
    failed = [s["step"] for s in suite.steps if str(s["status"]).lower().startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
