"""GPU benchmark harness: diffusers eager fp16 + SDPA (the baseline) beside every sdengine backend, one run.

    python -m benchmarks gpu [--device cuda] [--workloads NAME,...] [--systems NAME,...] [--repeats 10]
                             [--warmup 2] [--budget-s 240] [--out DIR]      (also: sdengine bench gpu ...)
    python -m benchmarks gpu --device cpu --smoke --out DIR                    (CI: tiny shapes, no timing claims)

Workloads (:data:`WORKLOADS`): SD1.5 512² batch 1 at 20 and 50 steps, batch 4 at 20 steps, SD1.5 768², SDXL
1024² 30 steps, SD1.5 + one ControlNet 512²; Euler a, CFG 7, one prompt and its negative. The models have
**random weights at the real architectures** (the bundled SD1.5 / SDXL / ControlNet configs; no download): the
speed of a network does not depend on its weight values. They are written once as diffusers folders (fp16)
into ``--models-dir`` and every system loads the same files.

Systems (:data:`SYSTEMS`), each in its own process (clean peak memory; a crash or a hang costs only itself):
``diffusers`` (``StableDiffusion[XL|ControlNet]Pipeline``, fp16, ``AttnProcessor2_0``), ``torch`` (our torch
backend, eager fp16), ``torch-compiled`` (the same, ``torch.compile``), ``onnxruntime`` (CUDA EP, fp16 graph
through the transformer optimizer, IO binding), ``onnxruntime-graph`` (the same + one CUDA graph per shape;
CUDA only), ``tensorrt`` (when ``tensorrt`` imports). A system that is not available says why.

Per system and workload: load, then the first generation (first-run cost: load + export/build/compile +
run), ``--warmup`` untimed generations, then ``--repeats`` timed ones; the median is reported. Stage times
come from CUDA events recorded around every model call (text encoders, UNet + ControlNet per step, VAE
decode; host ``perf_counter`` on CPU); end to end is host wall time of the whole request (images on the
host); it/s = steps / span from the first to the last UNet call; peak memory = torch's peak allocation and
the device's used memory (``cudaMemGetInfo``, which includes onnxruntime/TensorRT arenas and the context).
Each system gets ``--budget-s`` seconds per workload: over it, the process is stopped and what it measured so
far is reported as "over budget". Results: ``results.json`` and ``results.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("benchmarks.gpu")

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"
CFG = 7.0
SAMPLER = "Euler a"


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    family: str  # "sd15" | "sdxl"
    size: int  # pixels (square)
    batch: int
    steps: int
    controlnet: bool = False

    def smoke(self) -> "Workload":
        """The same workload on the tiny models: 64², at most 3 steps and batch 2."""
        return dataclasses.replace(self, size=64, steps=min(self.steps, 3), batch=min(self.batch, 2))


WORKLOADS = (
    Workload("sd15-512-b1-s20", "sd15", 512, 1, 20),
    Workload("sd15-512-b1-s50", "sd15", 512, 1, 50),
    Workload("sd15-512-b4-s20", "sd15", 512, 4, 20),
    Workload("sd15-768-b1-s20", "sd15", 768, 1, 20),
    Workload("sdxl-1024-b1-s30", "sdxl", 1024, 1, 30),
    Workload("sd15-cn-512-b1-s20", "sd15", 512, 1, 20, controlnet=True),
)

# family -> (bundled config, checkpoint name, ControlNet config, ControlNet name); smoke: the tiny store's names
MODELS = {
    "sd15": ("sd15.json", "bench-sd15", "controlnet_sd15.json", "bench-controlnet-sd15"),
    "sdxl": ("sdxl_base.json", "bench-sdxl", None, None),
}
TINY_MODELS = {"sd15": ("tiny-sd1", "tiny-controlnet-sd1"), "sdxl": ("tiny-sdxl", None)}


def model_names(family: str, smoke: bool) -> tuple[str, str | None]:
    if smoke:
        return TINY_MODELS[family]
    _, name, _, cn = MODELS[family]
    return name, cn


# ------------------------------------------------------------------------------------------- models


def write_models(models_dir: Path, families: set[str], smoke: bool, device: str, need_controlnet: bool,
                 cache_dir: Path | None = None) -> None:
    """Write the benchmark models (random weights) once; later runs reuse the folders (and their hashes)."""
    from engine.models.store import ModelStore

    models_dir = Path(models_dir)
    if smoke:
        from engine.models.tiny import write_tiny_store

        kinds = [k for f, k in (("sd15", "sd1"), ("sdxl", "sdxl")) if f in families]
        if need_controlnet and "sd15" in families:
            kinds.append("controlnet_sd1")
        missing = [k for k in kinds if not (models_dir / "Stable-diffusion" / f"tiny-{k}.safetensors").exists()
                   and not (models_dir / "ControlNet" / f"tiny-{k.replace('_', '-')}.safetensors").exists()]
        if missing:
            write_tiny_store(models_dir, kinds=tuple(missing))
    else:
        for family in sorted(families):
            config, name, cn_config, cn_name = MODELS[family]
            folder = models_dir / "Stable-diffusion" / name
            if not (folder / "model_index.json").exists():
                t = time.perf_counter()
                write_random_model(folder, config, device)
                log.info("wrote %s (random weights) in %.1f s", folder, time.perf_counter() - t)
            if need_controlnet and cn_config and not (models_dir / "ControlNet" / cn_name / "config.json").exists():
                write_random_controlnet(models_dir / "ControlNet" / cn_name, cn_config, device)
    (models_dir / "VAE").mkdir(parents=True, exist_ok=True)
    store = ModelStore(models_dir, bundled=None, cache_dir=cache_dir)
    for entry in store.entries():  # hash once here, so that no timed process hashes gigabytes
        store.hash_of(entry)


def _init_device(device: str):
    import torch

    # initialising 1-3 B parameters is seconds on a GPU and a minute on a CPU
    return torch.device(device if device.startswith("cuda") else "cpu")


def write_random_model(folder: Path, config_name: str, device: str) -> None:
    """A diffusers folder (fp16 safetensors) of the bundled config ``config_name``, random weights (seed 0)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine.models.checkpoints import bundled_config
    from engine.models.tiny import TinyModel, save_diffusers_folder

    cfg = bundled_config(config_name)
    torch.manual_seed(0)
    with _init_device(device):
        comps = {"text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))}
        if "text_encoder_2" in cfg:
            comps["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
        comps["unet"] = UNet2DConditionModel(**cfg["unet"])
        comps["vae"] = AutoencoderKL(**cfg["vae"])
    for module in comps.values():
        module.to(torch.float16).eval()
    save_diffusers_folder(TinyModel(config_name, comps, cfg.get("prediction_type", "epsilon")), folder)


def write_random_controlnet(folder: Path, config_name: str, device: str) -> None:
    import torch
    from diffusers import ControlNetModel

    from engine.models.checkpoints import bundled_config
    from engine.models.tiny import TinyModel, save_diffusers_folder

    torch.manual_seed(3)
    with _init_device(device):
        cn = ControlNetModel(**bundled_config(config_name)["controlnet"])
    save_diffusers_folder(TinyModel(config_name, {"controlnet": cn.to(torch.float16).eval()}), folder)


def control_image(size: int):
    """A deterministic edge-like control image (white rectangle outlines on black), HxWx3 uint8."""
    import numpy as np

    img = np.zeros((size, size, 3), np.uint8)
    for k in range(1, 4):
        a, b = size * k // 8, size - size * k // 8
        img[a, a:b] = img[b - 1, a:b] = img[a:b, a] = img[a:b, b - 1] = 255
    return img


# ------------------------------------------------------------------------------------------- timing


class StageRecorder:
    """Times model calls by stage: CUDA events on a GPU (no sync inside the loop), perf_counter on a CPU."""

    STAGES = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "unet": "unet",
              "unet_control": "unet", "controlnet": "unet", "vae_decoder": "vae_decoder"}

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks: list[tuple[str, Any, Any]] = []

    def reset(self) -> None:
        self.marks = []

    def _now(self):
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = self._now()
            out = fn(*args, **kwargs)
            self.marks.append((stage, start, self._now()))
            return out

        timed.__wrapped__ = fn
        return timed

    def collect(self) -> dict[str, float]:
        """Milliseconds per stage, and the span from the first UNet call's start to the last one's end."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()

            def ms(a, b):
                return a.elapsed_time(b)
        else:
            def ms(a, b):
                return (b - a) * 1e3
        out = {"text_encoder_ms": 0.0, "unet_ms": 0.0, "vae_decoder_ms": 0.0}
        unet = [(s, e) for stage, s, e in self.marks if stage == "unet"]
        for stage, s, e in self.marks:
            out[f"{stage}_ms"] = out.get(f"{stage}_ms", 0.0) + ms(s, e)
        if unet:
            out["denoise_span_ms"] = ms(unet[0][0], unet[-1][1])
        return out


def _memory(device: str) -> dict[str, float]:
    if not device.startswith("cuda"):
        return {}
    import torch

    free, total = torch.cuda.mem_get_info()
    return {"peak_alloc_gb": torch.cuda.max_memory_allocated() / 2**30, "device_used_gb": (total - free) / 2**30}


# ------------------------------------------------------------------------------------------- systems


class System:
    """One way to run a workload: ``load`` once, then ``generate`` (one request, images on the host).

    Every request has a new prompt of the same token count (:meth:`prompt`), so that no system serves the
    text encoder from a prompt cache: sdengine caches encoded prompts between requests, diffusers does not.
    """

    name = ""
    label = ""
    calls = 0

    def prompts(self) -> tuple[str, str]:
        """(prompt, negative prompt) of the next request."""
        self.calls += 1
        return f"{PROMPT}, take {self.calls}", f"{NEGATIVE}, take {self.calls}"

    def unavailable(self, device: str) -> str | None:
        return None

    def load(self, ctx: "Context") -> None: ...

    def generate(self, ctx: "Context") -> None: ...

    def instrument(self, ctx: "Context", rec: StageRecorder) -> None: ...


@dataclasses.dataclass
class Context:
    workload: Workload
    models_dir: Path
    device: str
    precision: str
    smoke: bool
    cache_dir: Path

    @property
    def names(self) -> tuple[str, str | None]:
        return model_names(self.workload.family, self.smoke)


class EngineSystem(System):
    """sdengine's own pipeline (engine.pipeline.Engine) on one backend."""

    backend = "torch"
    compile = False
    backend_attrs: dict[str, Any] = {}

    def load(self, ctx: Context) -> None:
        from engine.config import EngineConfig
        from engine.pipeline import Engine

        self.engine = Engine(EngineConfig(models_dir=ctx.models_dir, backend=self.backend, device=ctx.device,
                                          precision=ctx.precision, torch_compile=self.compile,
                                          cache_dir=ctx.cache_dir))
        rt = self.engine.runtime(ctx.names[0])
        for key, value in self.backend_attrs.items():  # before the first run creates any session
            setattr(rt.backend, key, value)

    def request(self, ctx: Context):
        from engine.request import ControlNetUnit, GenerationRequest

        w = ctx.workload
        units = ()
        if w.controlnet:
            units = (ControlNetUnit(model=ctx.names[1], image=control_image(w.size), module="none"),)
        prompt, negative = self.prompts()
        return GenerationRequest(model=ctx.names[0], prompt=prompt, negative_prompt=negative, steps=w.steps,
                                 cfg_scale=CFG, sampler_name=SAMPLER, seed=1, width=w.size, height=w.size,
                                 batch_size=w.batch, controlnet_units=units)

    def generate(self, ctx: Context) -> None:
        self.engine.generate(self.request(ctx))

    def instrument(self, ctx: Context, rec: StageRecorder) -> None:
        rt = self.engine.runtime(ctx.names[0])
        backends = [rt.backend] + [b for _, b in getattr(rt, "controlnets", {}).values()]
        for backend in backends:
            run = backend.run

            def timed(component, feeds, _run=run):
                return rec.wrap(StageRecorder.STAGES.get(component, component), _run)(component, feeds)

            backend.run = timed


class TorchEager(EngineSystem):
    name, label = "torch", "sdengine torch eager"


class TorchCompiled(EngineSystem):
    name, label = "torch-compiled", "sdengine torch compiled"
    compile = True


class OnnxRuntimeCuda(EngineSystem):
    name, label = "onnxruntime", "sdengine onnxruntime"
    backend = "onnxruntime"

    def unavailable(self, device: str) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime not installed"
        import onnxruntime

        if device.startswith("cuda") and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return (f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
                    "(install onnxruntime-gpu; the device suite carries it)")
        return None


class OnnxRuntimeCudaGraph(OnnxRuntimeCuda):
    name, label = "onnxruntime-graph", "sdengine onnxruntime + CUDA graph"
    backend_attrs = {"cuda_graph": True}

    def unavailable(self, device: str) -> str | None:
        if not device.startswith("cuda"):
            return "CUDA graphs need a CUDA device"
        return super().unavailable(device)


class TensorRT(EngineSystem):
    name, label = "tensorrt", "sdengine TensorRT"
    backend = "tensorrt"

    def unavailable(self, device: str) -> str | None:
        if not device.startswith("cuda"):
            return "TensorRT needs a CUDA device"
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt not installed"
        return None


class Diffusers(System):
    """The baseline: diffusers' own pipeline over the same weights, eager, SDPA attention."""

    name, label = "diffusers", "diffusers eager + SDPA"

    def load(self, ctx: Context) -> None:
        import diffusers
        import torch
        from diffusers.models.attention_processor import AttnProcessor2_0

        from engine.models.store import ModelStore

        store = ModelStore(ctx.models_dir, bundled=None, cache_dir=ctx.cache_dir)
        model = store.load_model(ctx.names[0])
        comps = dict(model.components)
        sched = diffusers.EulerAncestralDiscreteScheduler.from_config(model.scheduler_config)
        kwargs: dict[str, Any] = dict(vae=comps["vae"], text_encoder=comps["text_encoder"],
                                      tokenizer=comps["tokenizer"], unet=comps["unet"], scheduler=sched)
        if "text_encoder_2" in comps:
            cls = diffusers.StableDiffusionXLPipeline
            kwargs.update(text_encoder_2=comps["text_encoder_2"], tokenizer_2=comps["tokenizer_2"])
        else:
            kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            cls = diffusers.StableDiffusionPipeline
        if ctx.workload.controlnet:
            kwargs["controlnet"] = store.load_controlnet(ctx.names[1]).module
            cls = diffusers.StableDiffusionControlNetPipeline
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(ctx.precision, torch.float32)
        self.pipe = cls(**kwargs).to(ctx.device, dtype)
        for name in ("unet", "controlnet", "vae"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.set_attn_processor(AttnProcessor2_0())
        self.pipe.set_progress_bar_config(disable=True)

    def generate(self, ctx: Context) -> None:
        import torch

        w = ctx.workload
        kwargs = {}
        if w.controlnet:
            from PIL import Image

            kwargs["image"] = Image.fromarray(control_image(w.size))
        prompt, negative = self.prompts()
        self.pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=w.steps, guidance_scale=CFG,
                  height=w.size, width=w.size, num_images_per_prompt=w.batch, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(1), **kwargs)

    def instrument(self, ctx: Context, rec: StageRecorder) -> None:
        for attr, stage in (("text_encoder", "text_encoder"), ("text_encoder_2", "text_encoder"),
                            ("unet", "unet"), ("controlnet", "unet")):
            module = getattr(self.pipe, attr, None)
            if module is not None:
                module.forward = rec.wrap(stage, module.forward)
        self.pipe.vae.decode = rec.wrap("vae_decoder", self.pipe.vae.decode)


SYSTEMS: dict[str, type[System]] = {s.name: s for s in (Diffusers, TorchEager, TorchCompiled, OnnxRuntimeCuda,
                                                        OnnxRuntimeCudaGraph, TensorRT)}
DEFAULT_SYSTEMS = ("diffusers", "torch", "torch-compiled", "onnxruntime", "onnxruntime-graph", "tensorrt")
SMOKE_SYSTEMS = ("diffusers", "torch", "onnxruntime")


# ------------------------------------------------------------------------------------------- one system


def measure(system: System, ctx: Context, warmup: int, repeats: int, save: Callable[[dict], None]) -> dict:
    """Load, first run, warm-up, timed repeats; ``save(partial)`` after every phase (for over-budget kills)."""
    import torch

    cuda = ctx.device.startswith("cuda")
    result: dict[str, Any] = {"status": "running", "runs": []}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    system.load(ctx)
    result["load_s"] = time.perf_counter() - t0
    save(result)
    t1 = time.perf_counter()
    system.generate(ctx)
    result["first_generation_s"] = time.perf_counter() - t1
    result["first_run_s"] = time.perf_counter() - t0
    result["memory_first_run"] = _memory(ctx.device)
    save(result)
    rec = StageRecorder(ctx.device)
    system.instrument(ctx, rec)
    for _ in range(warmup):
        system.generate(ctx)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        rec.reset()
        t = time.perf_counter()
        system.generate(ctx)
        run = {"e2e_s": time.perf_counter() - t, **rec.collect()}
        mem = _memory(ctx.device)
        run.update(mem)
        result["runs"].append(run)
        save(result)
    result["status"] = "ok"
    return result


def summarize(result: dict, steps: int) -> dict:
    """Medians of the timed runs (and it/s, UNet ms per step, peak memory)."""
    runs = result.get("runs") or []
    if not runs:
        return {}
    keys = sorted({k for r in runs for k in r if k.endswith("_s") or k.endswith("_ms")})
    med = {k: statistics.median(r[k] for r in runs if k in r) for k in keys}
    if "unet_ms" in med:
        med["unet_per_step_ms"] = med["unet_ms"] / steps
    if med.get("denoise_span_ms"):
        med["it_per_s"] = steps / (med["denoise_span_ms"] / 1e3)
    for k in ("peak_alloc_gb", "device_used_gb"):
        values = [r[k] for r in runs if k in r]
        if values:
            med[k] = max(values)
    med["n"] = len(runs)
    return med


def worker(args) -> int:
    """One (workload, system) in this process; results go to ``--worker-out`` as they come."""
    spec = json.loads(args.worker)
    workload = Workload(**spec["workload"])
    ctx = Context(workload, Path(spec["models_dir"]), spec["device"], spec["precision"], spec["smoke"],
                  Path(spec["cache_dir"]))
    out = Path(spec["out"])

    def save(partial: dict) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(partial))
        os.replace(tmp, out)

    system = SYSTEMS[spec["system"]]()
    try:
        save(measure(system, ctx, spec["warmup"], spec["repeats"], save))
    except Exception as exc:  # reported as the system's status; the harness goes on
        log.exception("%s on %s failed", system.name, workload.name)
        partial = json.loads(out.read_text()) if out.exists() else {"runs": []}
        save({**partial, "status": f"failed: {type(exc).__name__}: {str(exc)[:400]}"})
        return 1
    return 0


def run_system(name: str, ctx: Context, warmup: int, repeats: int, budget_s: float, workdir: Path) -> dict:
    """Run one system on one workload in a subprocess with a time budget; never raises."""
    system = SYSTEMS[name]()
    reason = system.unavailable(ctx.device)
    if reason:
        return {"status": f"unavailable: {reason}", "runs": []}
    out = workdir / f"{ctx.workload.name}.{name}.json"
    spec = {"workload": dataclasses.asdict(ctx.workload), "models_dir": str(ctx.models_dir), "device": ctx.device,
            "precision": ctx.precision, "smoke": ctx.smoke, "cache_dir": str(ctx.cache_dir), "system": name,
            "warmup": warmup, "repeats": repeats, "out": str(out)}
    cmd = [sys.executable, "-m", "benchmarks", "gpu", "--worker", json.dumps(spec)]
    log_file = workdir / f"{ctx.workload.name}.{name}.log"
    t = time.perf_counter()
    try:
        with open(log_file, "w", encoding="utf-8") as logf:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=budget_s,
                                  env=_worker_env())
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
    result = json.loads(out.read_text()) if out.exists() else {"runs": []}
    result["wall_s"] = time.perf_counter() - t
    if code is None:
        result["status"] = f"over budget ({budget_s:.0f} s; {len(result.get('runs', []))} timed runs done)"
    elif code != 0 and not str(result.get("status", "")).startswith("failed"):
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-400:] if log_file.exists() else ""
        result["status"] = f"failed: exit code {code}: {tail}"
    return result


def _worker_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


# ------------------------------------------------------------------------------------------- report


def environment(device: str) -> dict:
    info: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "python": platform.python_version(), "machine": platform.machine(), "device": device,
                            "versions": {}}
    for pkg in ("torch", "diffusers", "transformers", "onnxruntime", "tensorrt", "triton"):
        try:
            from importlib.metadata import version

            info["versions"][pkg] = version(pkg if pkg != "onnxruntime" or not _has_dist("onnxruntime-gpu")
                                            else "onnxruntime-gpu")
        except Exception:
            info["versions"][pkg] = None
    try:
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(device)
            info["gpu"] = props.name
            info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
            info["cuda"] = torch.version.cuda
    except Exception as exc:  # report, never fail the run on a probe
        info["gpu_error"] = str(exc)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    from core.cpu import cpu_flags

    info["cpu_flags"] = sorted(cpu_flags() & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})
    info["cpu_count"] = os.cpu_count()
    return info


def _has_dist(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


COLUMNS = (("e2e_s", "end to end (s)", "{:.3f}"), ("it_per_s", "it/s", "{:.1f}"),
           ("text_encoder_ms", "text enc (ms)", "{:.1f}"), ("unet_per_step_ms", "UNet/step (ms)", "{:.2f}"),
           ("vae_decoder_ms", "VAE dec (ms)", "{:.1f}"), ("peak_alloc_gb", "peak alloc (GB)", "{:.2f}"),
           ("device_used_gb", "device used (GB)", "{:.2f}"))


def markdown(report: dict) -> str:
    env = report["environment"]
    smoke = report["smoke"]
    lines = [f"## GPU harness ({env['date']}; `{report['command']}`)", ""]
    if smoke:
        lines += ["**SMOKE RUN: tiny models at 64x64 on " + env["device"] + ", a check that every path runs. "
                  "No timing claims.**", ""]
    else:
        lines += ["Models: **random weights at the real architectures** (bundled SD1.5 / SDXL / ControlNet "
                  "configs; the speed of a network does not depend on its weight values).", ""]
    gpu = env.get("gpu") or "no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines += [f"Device: {gpu} ({env.get('gpu_memory_gb', '-')} GB), driver {env.get('driver') or '-'}, CUDA "
              f"{env.get('cuda') or '-'}; {versions}; Python {env['python']}; CPU flags "
              f"{' '.join(env['cpu_flags']) or '-'}. Precision {report['precision']}; {SAMPLER}, CFG {CFG}; "
              f"median of {report['repeats']} after {report['warmup']} warm-up runs (plus the first run, "
              f"reported as first-run cost); stage times from "
              f"{'CUDA events' if env['device'].startswith('cuda') else 'perf_counter'}.", ""]
    for w in report["workloads"]:
        wl = w["workload"]
        lines += [f"### {wl['name']}: {wl['family']} {wl['size']}x{wl['size']}, batch {wl['batch']}, "
                  f"{wl['steps']} steps{' + ControlNet' if wl['controlnet'] else ''}", "",
                  "| system | " + " | ".join(c[1] for c in COLUMNS) + " | vs diffusers | first run (s) | status |",
                  "|---|" + "---|" * (len(COLUMNS) + 3)]
        base = w["systems"].get("diffusers", {}).get("summary", {}).get("e2e_s")
        for name, r in w["systems"].items():
            s = r.get("summary", {})
            cells = [fmt.format(s[k]) if s.get(k) is not None else "-" for k, _, fmt in COLUMNS]
            speed = f"{base / s['e2e_s']:.2f}x" if base and s.get("e2e_s") else "-"
            first = f"{r['first_run_s']:.1f}" if r.get("first_run_s") is not None else "-"
            status = str(r.get("status", "")).replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {SYSTEMS[name].label} | " + " | ".join(cells) + f" | {speed} | {first} | {status} |")
        lines.append("")
    return "\n".join(lines)


def run(args) -> dict:
    device = args.device
    smoke = args.smoke
    precision = args.precision or ("fp16" if device.startswith("cuda") else "fp32")
    names = args.workloads.split(",") if args.workloads else [w.name for w in WORKLOADS]
    by_name = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"--workloads: unknown {', '.join(unknown)}; known: {', '.join(by_name)}")
    workloads = [by_name[n].smoke() if smoke else by_name[n] for n in names]
    systems = args.systems.split(",") if args.systems else list(SMOKE_SYSTEMS if smoke else DEFAULT_SYSTEMS)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"--systems: unknown {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models_dir = Path(args.models_dir or (out / "models"))
    cache_dir = Path(args.cache_dir or (models_dir / "cache"))
    workdir = out / "work"
    workdir.mkdir(exist_ok=True)

    report: dict[str, Any] = {"command": "python -m benchmarks gpu " + " ".join(args.argv), "smoke": smoke,
                              "precision": precision, "warmup": args.warmup, "repeats": args.repeats,
                              "budget_s": args.budget_s, "environment": environment(device), "workloads": []}
    deadline = time.monotonic() + args.total_budget_s if args.total_budget_s else None
    report["models_s"] = 0.0
    written: set[tuple[str, bool]] = set()
    for w in workloads:
        entry = {"workload": dataclasses.asdict(w), "systems": {}}
        report["workloads"].append(entry)
        ctx = Context(w, models_dir, device, precision, smoke, cache_dir)
        if (w.family, w.controlnet) not in written:  # a family's models are written when first needed
            t = time.perf_counter()
            write_models(models_dir, {w.family}, smoke, device, w.controlnet, cache_dir)
            report["models_s"] += time.perf_counter() - t
            written.add((w.family, w.controlnet))
        for name in systems:
            left = deadline - time.monotonic() if deadline else args.budget_s
            if deadline and left < 10:
                entry["systems"][name] = {"status": "skipped: total time budget spent", "runs": []}
                continue
            log.info("%s: %s", w.name, name)
            r = run_system(name, ctx, args.warmup, args.repeats, min(args.budget_s, left), workdir)
            r["summary"] = summarize(r, w.steps)
            entry["systems"][name] = r
            log.info("%s: %s -> %s %s", w.name, name, r["status"], r["summary"].get("e2e_s"))
            _write(out, report)
    _write(out, report)
    return report


def _write(out: Path, report: dict) -> None:
    for name, text in (("results.json", json.dumps(report, indent=1)), ("results.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny models, 64x64, few steps: a check, no timing claims")
    p.add_argument("--workloads", help="comma-separated; default all: " + ",".join(w.name for w in WORKLOADS))
    p.add_argument("--systems", help="comma-separated; default " + ",".join(DEFAULT_SYSTEMS))
    p.add_argument("--precision", help="fp16 (default on CUDA), bf16 or fp32 (default on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=240.0, help="per system and workload (default 240)")
    p.add_argument("--total-budget-s", type=float, default=None, help="for the whole run (default none)")
    p.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    p.add_argument("--models-dir", help="benchmark models (default OUT/models; written when missing)")
    p.add_argument("--cache-dir", help="exported artefacts (default MODELS_DIR/cache)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.worker:
        return worker(args)
    args.argv = argv
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 2
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 10
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="sdengine-gpu-bench-")
    report = run(args)
    print(markdown(report))
    print(f"results: {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}")
    return 0
