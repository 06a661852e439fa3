"""CPU peers side by side: sdengine's backends vs diffusers, optimum (ONNX Runtime) and optimum-intel (OpenVINO).

    python -m benchmarks peers [--workdir DIR] [--peers-venv DIR] [--systems a,b,...] [--size 256] [--steps 10]
                               [--rounds 3] [--out FILE.md] [--tiny]

One model folder for everyone: the SD1.5 architecture (engine/models/configs/sd15.json) with random weights
(seed 0), written once as a diffusers folder into ``{workdir}/models/Stable-diffusion/sd15-random`` (the speed
of a network does not depend on its weight values). One request for everyone: a fixed prompt, empty negative
prompt, ``--size``², ``--steps`` steps of Euler a, CFG 7, batch 1, seed 1.

``--tiny`` writes the tests' tiny SD1 model (engine.models.tiny) instead: with ``--size 64 --steps 20`` what is
timed is the per-request overhead around the networks (``optimum-openvino-static``: optimum-intel reshaped to
the request's static shapes, its fastest mode for a fixed size).

Every system runs in its own process (``python -m benchmarks.peers --child SYSTEM ...``):

- *prepare* (once, in ``--systems`` order): from nothing to the first image: exports (sdengine's ONNX and
  OpenVINO IR artefacts into ``{workdir}/cache-{system}``, one cache per system, emptied first: nothing of
  another system's export is reused; optimum's exported folders, re-exported),
  load and the first generation. Reported as the cold cost.
- *rounds*: ``--rounds`` rounds; in each round every system (the order rotated per round: interleaved) starts
  a fresh process that loads from the cache (timed: load), generates once (timed: first run: compiles,
  allocations) and ``--runs`` - 1 times more (timed: warm, the median of those runs; the tiny model's
  milliseconds want ``--runs 12``). The table reports the median over rounds of each, and the peak RSS of the
  process (``ru_maxrss``, the largest over rounds).

The peers live in a separate virtual environment (``--peers-venv``, default ``$SDENGINE_PEERS_VENV`` or
``.venv-peers``), never beside the engine: they are a benchmark extra, not a dependency. A peer whose
packages are not installed there is skipped with a note; diffusers runs from the peers venv when it has it,
else from the engine's environment (diffusers is an engine dependency). Versions, CPU flags and the date go into
the report. The SD1.5-size runs need ~10 GB of memory and tens of minutes: run them alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = "sd15-random"
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 1
CFG = 7.0

# system -> (environment: "engine" | "peers" | "peers-or-engine", packages whose versions are reported)
SYSTEMS = {
    "sdengine-onnxruntime": ("engine", ("onnxruntime", "torch")),
    "sdengine-openvino": ("engine", ("openvino", "torch")),
    "sdengine-openvino-f32": ("engine", ("openvino", "torch")),
    "sdengine-torch": ("engine", ("torch",)),
    "diffusers": ("peers-or-engine", ("diffusers", "torch", "transformers")),
    "optimum-ort": ("peers", ("optimum", "optimum-onnx", "onnxruntime", "diffusers")),
    "optimum-openvino": ("peers", ("optimum-intel", "openvino", "diffusers")),
    "optimum-openvino-f32": ("peers", ("optimum-intel", "openvino", "diffusers")),
    "optimum-openvino-static": ("peers", ("optimum-intel", "openvino", "diffusers")),
}
DEFAULT_SYSTEMS = "sdengine-onnxruntime,sdengine-openvino,diffusers,optimum-ort,optimum-openvino"
PEER_MODULES = {"diffusers": "diffusers", "optimum-ort": "optimum.onnxruntime", "optimum-openvino": "optimum.intel",
                "optimum-openvino-f32": "optimum.intel", "optimum-openvino-static": "optimum.intel"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


# ------------------------------------------------------------------------------------------------ the model
def write_model(folder: Path, small: bool = False, tiny: bool = False) -> None:
    """The SD1.5-architecture diffusers folder with random weights (seed 0), tokenizer files for every
    transformers version (vocab.json + merges.txt beside what save_pretrained writes). ``small``: narrower
    blocks and one text layer (a check of this harness in minutes, not a figure)."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models.tokenizer import clip_tokenizer

    if (folder / "model_index.json").is_file():
        return
    cfg = json.loads((Path(__file__).parents[1] / "engine/models/configs/sd15.json").read_text())
    if small:
        cfg["unet"].update(block_out_channels=[32, 64, 64, 64], layers_per_block=1)
        cfg["vae"].update(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
        cfg["text_encoder"].update(num_hidden_layers=1)
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    if tiny:  # the tests' tiny SD1 (engine.models.tiny): what is left is per-request overhead
        from engine.models.tiny import build_tiny

        modules = {k: v for k, v in build_tiny("sd1").components.items() if k in ("unet", "vae", "text_encoder")}
    else:
        modules = {
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        }
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.35.0",
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", "PNDMScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    for name, module in modules.items():
        module.save_pretrained(tmp / name, safe_serialization=True)
        index[name] = ["transformers" if name == "text_encoder" else "diffusers", type(module).__name__]
    clip_tokenizer().save_pretrained(tmp / "tokenizer")
    data = Path(__file__).parents[1] / "engine/models/data"
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(data / name, tmp / "tokenizer" / name)
    (tmp / "scheduler").mkdir()
    sched = {"_class_name": "PNDMScheduler", **cfg["scheduler"]}
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=1))
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
    os.replace(tmp, folder)


# ------------------------------------------------------------------------------------------------ children
def _versions(names) -> dict:
    import importlib.metadata as md

    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


def _sdengine(system: str, workdir: Path, size: int, steps: int, prepare: bool = False):
    import shutil

    from engine.pipeline import Engine
    from engine.request import GenerationRequest

    backend = system.split("-")[1]
    precision = "fp32" if system.endswith("-f32") or backend != "openvino" else None
    # each system its own artefact cache, emptied before its prepare run: "cold" is measured from nothing
    # (no export of another system reused); the rounds then load from it
    cache = workdir / f"cache-{system}"
    if prepare:
        shutil.rmtree(cache, ignore_errors=True)
    engine = Engine(models_dir=workdir / "models", backend=backend, precision=precision,
                    cache_dir=cache)
    def generate(side: int = size):
        req = GenerationRequest(model=MODEL, prompt=PROMPT, negative_prompt="", steps=steps, width=side,
                                height=side, cfg_scale=CFG, seed=SEED, sampler_name="Euler a")
        return engine.generate(req).images[0]

    engine.runtime(MODEL)  # load: store, checkpoint, backend (sessions are created by the first run)
    label = f"{engine.config.backend.value} {engine.config.precision.value}"
    return generate, label


def _diffusers_like(system: str, workdir: Path, size: int, steps: int, prepare: bool):
    import torch
    from diffusers import EulerAncestralDiscreteScheduler

    folder = workdir / "models" / "Stable-diffusion" / MODEL
    if system == "diffusers":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        label = "fp32"
    elif system == "optimum-ort":
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        exported = workdir / "optimum-onnx"
        if prepare or not exported.is_dir():
            from optimum.exporters.onnx import main_export  # from_pretrained(export=True) cannot infer the library

            main_export(str(folder), output=str(exported), task="text-to-image", library_name="diffusers")
        pipe = ORTStableDiffusionPipeline.from_pretrained(exported)
        label = "CPU EP fp32"
    else:
        from optimum.intel import OVStableDiffusionPipeline

        exported = workdir / "optimum-openvino"
        if prepare or not exported.is_dir():
            OVStableDiffusionPipeline.from_pretrained(folder, export=True, compile=False).save_pretrained(exported)
        ov_config = {"INFERENCE_PRECISION_HINT": "f32"} if system.endswith("-f32") else {}
        static = system.endswith("-static")
        pipe = OVStableDiffusionPipeline.from_pretrained(exported, ov_config=ov_config, compile=not static)
        label = "f32 hint" if ov_config else "default hint (bf16 where the CPU has it)"
        if static:  # optimum-intel's static-shape mode: reshaped to the request, then compiled
            pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
            pipe.compile()
            label += ", static shapes"
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def generate(side: int = size):
        # optimum >= 2 runs diffusers' own pipeline code: a torch generator for every system
        kwargs = {"generator": torch.Generator("cpu").manual_seed(SEED)}
        return pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=CFG, height=side,
                    width=side, output_type="np", **kwargs).images[0]

    return generate, label


def child(system: str, workdir: Path, size: int, steps: int, runs: int, prepare: bool, out: Path,
          new_size: int | None = None, trace: bool = False) -> None:
    """One system's process: load, ``runs`` generations at ``size``; ``trace``: where the memory went (the peak
    between the engine's log records, benchmarks.memory.LogPeaks); ``new_size``: then one generation at that
    size (the first of a new size) and one more (warm), timed apart; the peak RSS is read before them."""
    import numpy as np

    tracer = None
    if trace:
        from benchmarks.memory import LogPeaks

        tracer = LogPeaks()
    t0 = time.perf_counter()
    if system.startswith("sdengine"):
        generate, label = _sdengine(system, workdir, size, steps, prepare)
    else:
        generate, label = _diffusers_like(system, workdir, size, steps, prepare)
    load = time.perf_counter() - t0
    times = []
    image = None
    for _ in range(runs):
        t = time.perf_counter()
        image = generate()
        times.append(time.perf_counter() - t)
    image = np.asarray(image, dtype=np.float32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "system": system, "label": label, "load_s": load, "runs_s": times, "total_s": time.perf_counter() - t0,
        "peak_rss_mb": max(peak, tracer.peak if tracer else 0) / 2**20,
        "image_mean": float(image.mean()) * (1 if image.max() > 1.5 else 255), "python": sys.executable,
        "versions": _versions(SYSTEMS[system][1]),
    }
    if tracer is not None:
        result["memory_trace"] = tracer.finish()
    if new_size:
        sizes = []
        for _ in range(2):  # the first request of the new size, then a warm one
            t = time.perf_counter()
            generate(new_size)
            sizes.append(time.perf_counter() - t)
        result["new_size"] = new_size
        result["new_size_s"] = sizes
    out.write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------------ driver
def cpu_flags() -> list[str]:
    from core.cpu import cpu_flags as probe

    flags = probe()
    return [f for f in CPU_FLAGS if f in flags]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _has_module(python: str, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module.split('.')[0]!r}) and " \
            f"importlib.util.find_spec({module!r}) else 1)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pythons(systems: list[str], peers_venv: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The interpreter of each runnable system, and a note for each skipped one."""
    peers_python = peers_venv / "bin" / "python"
    have_peers = peers_python.is_file()
    run, skipped = {}, {}
    for system in systems:
        env, _ = SYSTEMS[system]
        if env == "engine":
            if system.startswith("sdengine-openvino") and not _has_module(sys.executable, "openvino"):
                skipped[system] = "openvino is not installed beside the engine (pip install 'sdengine[openvino]')"
            else:
                run[system] = sys.executable
        elif have_peers and _has_module(str(peers_python), PEER_MODULES[system]):
            run[system] = str(peers_python)
        elif env == "peers-or-engine":
            run[system] = sys.executable
        else:
            where = f"in {peers_venv}" if have_peers else f"({peers_venv} does not exist)"
            skipped[system] = f"{PEER_MODULES[system]} is not installed {where}"
    return run, skipped


def spawn(system: str, python: str, workdir: Path, size: int, steps: int, runs: int, prepare: bool,
          log, extra: tuple[str, ...] = ()) -> dict | None:
    """Run :func:`child` for ``system`` in a fresh process (``extra``: its ``--new-size`` / ``--trace-memory``)."""
    out = workdir / f"result-{system}.json"
    out.unlink(missing_ok=True)
    cmd = [python, "-m", "benchmarks.peers", "--child", system, "--workdir", str(workdir), "--size", str(size),
           "--steps", str(steps), "--runs", str(runs)] + (["--prepare"] if prepare else []) + ["--json", str(out)]
    cmd += list(extra)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        log(f"{system}: FAILED (rc {proc.returncode}) after {time.perf_counter() - t:.0f}s\n{proc.stderr[-3000:]}")
        return None
    result = json.loads(out.read_text())
    log(f"{system}: load {result['load_s']:.1f}s runs {', '.join(f'{x:.1f}' for x in result['runs_s'])}s "
        f"peak RSS {result['peak_rss_mb'] / 1024:.2f} GB")
    return result


def _warm(result: dict) -> float:
    """A round's warm time: the median of its runs after the first (``--runs``; the first run compiles)."""
    return statistics.median(result["runs_s"][1:] or result["runs_s"])


def summarize(prepared: dict, rounds: list[dict], systems: list[str]) -> dict:
    table = {}
    for system in systems:
        rs = [r[system] for r in rounds if r.get(system)]
        if not rs:
            continue
        table[system] = {
            "label": rs[0]["label"], "versions": rs[0]["versions"],
            "warm_s": statistics.median(_warm(r) for r in rs),
            "warm_runs_s": [_warm(r) for r in rs],
            "first_s": statistics.median(r["runs_s"][0] for r in rs),
            "load_s": statistics.median(r["load_s"] for r in rs),
            "peak_rss_gb": max(r["peak_rss_mb"] for r in rs) / 1024,
            "cold_s": prepared[system]["total_s"] if prepared.get(system) else None,
            "image_mean": rs[0]["image_mean"],
        }
    return table


def _secs(x: float) -> str:
    """Seconds as the table shows them: ms under a second (the tiny model's per-request times)."""
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.1f} s"


def markdown(table: dict, skipped: dict, args, baseline: str = "diffusers") -> str:
    flags = ", ".join(cpu_flags()) or "none of " + ", ".join(CPU_FLAGS)
    base = table.get(baseline, {}).get("warm_s")
    tiny = getattr(args, "tiny", False)
    model = "the tests' tiny SD1 model (per-request overhead)" if tiny else "SD1.5 architecture"
    lines = [
        f"## CPU peers (`python -m benchmarks peers`) ({datetime.date.today().isoformat()})",
        "",
        f"Command: `python -m benchmarks peers{' --tiny' if tiny else ''} --size {args.size} --steps {args.steps} "
        f"--rounds {args.rounds} --runs {args.runs} "
        f"--systems {','.join(args.systems)}`, run under the machine's heavy-job lock (other agents' light jobs "
        "still ran: absolute times are inflated, ratios within the run are the figures to read).",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; CPU flags: {flags}. Workload: {model}, random "
        f"weights, {args.size}x{args.size}, {args.steps} steps Euler a, CFG {CFG:g}, batch 1, end to end (text "
        f"encoder, sampling, VAE decode). Each system in its own process; {args.rounds} interleaved rounds.",
        "",
        "| system | precision | warm (median) | vs diffusers | first run | load from cache | cold (export + load + "
        "first) | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system, row in sorted(table.items(), key=lambda kv: kv[1]["warm_s"]):
        ratio = f"{base / row['warm_s']:.2f}x" if base else "n/a"
        cold = f"{row['cold_s']:.0f} s" if row["cold_s"] is not None else "n/a"
        lines.append(f"| {system} | {row['label']} | {_secs(row['warm_s'])} | {ratio} | {_secs(row['first_s'])} | "
                     f"{_secs(row['load_s'])} | {cold} | {row['peak_rss_gb']:.2f} GB |")
    lines.append("")
    lines.append("Warm runs per round: " + "; ".join(
        f"{s} {', '.join(_secs(x) for x in r['warm_runs_s'])}" for s, r in table.items()) + ".")
    lines.append("Versions: " + "; ".join(
        f"{s}: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}" for s, r in table.items()) + ".")
    for system, note in skipped.items():
        lines.append(f"Skipped {system}: {note}.")
    lines.append("Cold cost: from nothing: each sdengine system exports into its own emptied artefact cache "
                 "(no export of another system reused), optimum re-exports its folder; the model files may be in "
                 "the OS page cache.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("SDENGINE_PEERS_WORKDIR", "/tmp/sdengine-peers")))
    ap.add_argument("--peers-venv", type=Path, default=Path(os.environ.get("SDENGINE_PEERS_VENV", ".venv-peers")))
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"comma-separated, of: {', '.join(SYSTEMS)}")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2, help="generations per process in a round (first + warm)")
    ap.add_argument("--small", action="store_true", help="a narrow model: checks the harness, not a figure")
    ap.add_argument("--tiny", action="store_true",
                    help="the tests' tiny SD1 model (use --size 64 --steps 20): per-request overhead, not network speed")
    ap.add_argument("--skip-prepare", action="store_true", help="do not time the cold path (artefacts exist)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/peers.md"))
    ap.add_argument("--benchmarks-md", type=Path, default=Path(__file__).parents[1] / "BENCHMARKS.md",
                    help="replace its '## CPU peers' section with the result (not with --small)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--new-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--trace-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.workdir, args.size, args.steps, args.runs, args.prepare, args.json,
              new_size=args.new_size, trace=args.trace_memory)
        return 0

    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {', '.join(unknown)}; allowed: {', '.join(SYSTEMS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    log(f"writing the model folder into {args.workdir}")
    write_model(args.workdir / "models" / "Stable-diffusion" / MODEL, small=args.small, tiny=args.tiny)
    run, skipped = pythons(args.systems, args.peers_venv)
    for system, note in skipped.items():
        log(f"skipping {system}: {note}")
    systems = [s for s in args.systems if s in run]
    prepared = {}
    if not args.skip_prepare:
        for system in systems:
            log(f"prepare {system}")
            prepared[system] = spawn(system, run[system], args.workdir, args.size, args.steps, 1, True, log)
    rounds = []
    for r in range(args.rounds):
        order = systems[r % len(systems):] + systems[: r % len(systems)]
        log(f"round {r + 1}/{args.rounds}: {', '.join(order)}")
        rounds.append({s: spawn(s, run[s], args.workdir, args.size, args.steps, args.runs, False, log) for s in order})
    table = summarize(prepared, rounds, systems)
    (args.workdir / "peers.json").write_text(json.dumps({"table": table, "skipped": skipped, "rounds": rounds,
                                                          "prepared": prepared}, indent=1))
    text = markdown(table, skipped, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if not args.small and not args.tiny and args.benchmarks_md and args.benchmarks_md.is_file():
        update_section(args.benchmarks_md, text)
    print(text)
    return 0


def update_section(path: Path, text: str, title: str = "## CPU peers") -> None:
    """Replace the section of ``path`` that starts with ``title`` (up to the next ``## ``) by ``text``."""
    doc = path.read_text(encoding="utf-8")
    start = doc.find(title)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", start + len(title))
        doc = doc[:start] + text + (doc[end + 1:] if end >= 0 else "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
