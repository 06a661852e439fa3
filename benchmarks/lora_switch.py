"""Cost of switching LoRA sets vs re-exporting, SD1.5-architecture UNet (random weights), CPU.

    PYTHONPATH=. python -m benchmarks.lora_switch [--rank 16] [--repeats 3] [--openvino bf16,fp32] [--markdown PATH]

The LoRAs are kohya files written here (rank ``--rank``, every attention projection, feed-forward and
transformer proj in/out of the SD1.5 UNet: 192 layers, as a typical character/style LoRA), read and mapped by
engine.networks (the product path). Timed, in one process, through the engine's backends:

- baseline: the ONNX export of the UNet into an empty cache (what a per-LoRA re-export would cost), then the
  onnxruntime session on it;
- onnxruntime: switching to a new set (host merge of the patched initializers + a new session with
  ``add_external_initializers``), and back to a recent set (the cached session);
- torch: switching sets in place (restore the originals + add the new deltas);
- openvino, per inference precision of ``--openvino`` (bf16 needs a CPU with native bf16, else it runs f32;
  empty: skipped): its own export (full attention) and IR conversion, the compile of the base UNet at batch 2,
  64x64 latents, 77 tokens (512x512 with CFG), then switching to a new set (the IR read, the patched constants
  merged and swapped in, a compile) and back to a recent set (the compiled-model cache), with the process's
  resident memory with the base compiled and with the base and both sets compiled (three models).
Each switch is timed ``--repeats`` times (alternating two sets, so every switch is a real change) after one
warm-up; median (min) reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.unet import MACHINE, SD15_UNET
from core.cpu import cpu_flags


def lora_file(unet, path: Path, rank: int, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    names = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(names) and "attentions" in name:
            w = m.weight
            key = "lora_unet_" + name.replace(".", "_")
            down = torch.randn(rank, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
            up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.1
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down.contiguous(), up.contiguous()
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return path


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def openvino_switch(modules, patches, config, precision: str, repeats: int) -> dict:
    """openvino at ``precision``: export + IR, base compile, new set, switch back (see the module docstring)."""
    import gc

    from engine.backends import create_backend
    from engine.config import EngineConfig
    from engine.networks.lora import EMPTY

    backend = create_backend(EngineConfig(backend="openvino", precision=precision, **config), modules,
                             "bench-lora", max_compiled=3)
    desc = backend.descriptor("unet")
    shapes = {n: tuple(v.shape) for n, v in desc.sample_inputs(2, 64, 64, 77).items()}
    t = time.perf_counter()
    art = backend.artefact("unet")
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    backend.ir_path("unet", art)
    ir_s = time.perf_counter() - t
    backend.set_patch(EMPTY)
    t = time.perf_counter()
    backend.compiled("unet", shapes)
    base_compile_s = time.perf_counter() - t
    gc.collect()
    rss_base = rss_mb()

    def new_set(patch):  # with max_sets=1 each switch drops the other set: read, merge, compile
        backend.set_patch(patch)
        t = time.perf_counter()
        backend.compiled("unet", shapes)
        return time.perf_counter() - t

    backend.max_sets = 1
    new_set(patches[0])  # warm-up
    new = [new_set(patches[(i + 1) % 2]) for i in range(repeats)]
    backend.max_sets = 3
    for patch in (*patches, EMPTY):  # untimed: the base and both sets compiled
        backend.set_patch(patch)
        backend.compiled("unet", shapes)
    gc.collect()
    rss_sets = rss_mb()
    cached = []
    for i in range(repeats):
        backend.set_patch(patches[i % 2])
        t = time.perf_counter()
        backend.compiled("unet", shapes)
        cached.append(time.perf_counter() - t)
    label = backend.label
    del backend
    gc.collect()
    return {"label": label, "export_s": export_s, "ir_s": ir_s, "base_compile_s": base_compile_s,
            "new_set": stat(new), "cached_set": stat(cached), "rss_base_mb": rss_base, "rss_sets_mb": rss_sets}


def stat(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}


def main(argv=None) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from engine.backends import create_backend
    from engine.config import EngineConfig
    from engine.networks.files import read_lora
    from engine.networks.lora import EMPTY, LoraUse, WeightPatch, map_lora

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--openvino", default="bf16,fp32",
                    help="openvino inference precisions to time, comma-separated (empty: none)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="sdengine-lora-bench-"))
    try:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET).eval()
        modules = {"unet": unet}
        tables: dict = {}
        patches = []
        for seed in (1, 2):
            lora = read_lora(lora_file(unet, work / f"l{seed}.safetensors", args.rank, seed))
            mapped = map_lora(lora, f"l{seed}", f"{seed:064x}", modules, "sd1", tables)
            patches.append(WeightPatch((LoraUse(mapped, 1.0, 0.8),)))
        layers = len(patches[0].params("unet"))
        config = dict(cache_dir=work / "cache", num_threads=os.cpu_count())

        # baseline: what a re-export per LoRA set would cost
        ort_backend = create_backend(EngineConfig(backend="onnxruntime", **config), modules, "bench-lora")
        t = time.perf_counter()
        ort_backend.artefact("unet")
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        ort_backend.session("unet")
        base_session_s = time.perf_counter() - t

        def ort_switch(patch):
            ort_backend._sessions.clear()  # a set never seen: merge + new session
            ort_backend.set_patch(patch)
            t = time.perf_counter()
            ort_backend.session("unet")
            return time.perf_counter() - t

        ort_switch(patches[0])  # warm-up
        ort_new = [ort_switch(patches[(i + 1) % 2]) for i in range(args.repeats)]
        for patch in patches:  # untimed: both sets' sessions in the LRU (the loop above kept only the last)
            ort_backend.set_patch(patch)
            ort_backend.session("unet")
        ort_cached = []
        for i in range(args.repeats):  # both sets in the LRU: switching back is a lookup
            ort_backend.set_patch(patches[i % 2])
            t = time.perf_counter()
            ort_backend.session("unet")
            ort_cached.append(time.perf_counter() - t)
        del ort_backend

        torch_backend = create_backend(EngineConfig(backend="torch", **config), modules, "bench-lora")
        torch_backend.set_patch(patches[0])  # warm-up (first patch keeps the originals)
        torch_times = []
        for i in range(args.repeats):
            t = time.perf_counter()
            torch_backend.set_patch(patches[(i + 1) % 2])
            torch_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch_backend.set_patch(EMPTY)
        torch_remove_s = time.perf_counter() - t
        del torch_backend

        openvino = {}
        for precision in [p for p in args.openvino.split(",") if p]:
            openvino[precision] = openvino_switch(modules, patches, config, precision, args.repeats)

        flags = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "avx512f"})
        result = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": MACHINE,
            "cpu_flags": flags, "platform": platform.platform(), "torch": torch.__version__,
            "rank": args.rank, "layers": layers, "export_s": export_s, "base_session_s": base_session_s,
            "ort_new_set": stat(ort_new), "ort_cached_set": stat(ort_cached), "torch_switch": stat(torch_times),
            "torch_remove_s": torch_remove_s, "openvino": openvino, "load_avg": os.getloadavg(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        f = lambda s: f"{s['median_s']:.2f} s ({s['min_s']:.2f})"  # noqa: E731
        args.markdown.write_text(
            f"SD1.5-architecture UNet (random weights), kohya LoRA rank {args.rank} on {layers} layers, fp32; "
            f"{MACHINE}, CPU flags {', '.join(flags) or 'none'}; {result['date']}; load average "
            f"{'/'.join(f'{x:.1f}' for x in result['load_avg'])}.\n\n"
            "| what | median (min) of " f"{args.repeats} |\n|---|---|\n"
            f"| baseline: ONNX export of the UNet (a re-export per set) | {export_s:.1f} s (1 run) |\n"
            f"| onnxruntime session on the base graph | {base_session_s:.2f} s (1 run) |\n"
            f"| onnxruntime: switch to a new set (merge + session) | {f(result['ort_new_set'])} |\n"
            f"| onnxruntime: switch back to a recent set (LRU) | {f(result['ort_cached_set'])} |\n"
            f"| torch: switch sets in place | {f(result['torch_switch'])} |\n"
            f"| torch: remove the set (restore originals) | {torch_remove_s:.2f} s (1 run) |\n"
            + "".join(
                f"| {o['label']}: ONNX export (full attention) + IR conversion | {o['export_s']:.1f} s + "
                f"{o['ir_s']:.1f} s (1 run) |\n"
                f"| {o['label']}: compile of the base UNet | {o['base_compile_s']:.2f} s (1 run) |\n"
                f"| {o['label']}: switch to a new set (IR read + merge + compile) | {f(o['new_set'])} |\n"
                f"| {o['label']}: switch back to a recent set (cache) | {f(o['cached_set'])} |\n"
                f"| {o['label']}: process resident memory, base compiled -> base + 2 sets compiled | "
                f"{o['rss_base_mb']:.0f} -> {o['rss_sets_mb']:.0f} MiB |\n"
                for o in openvino.values()))
    return result


if __name__ == "__main__":
    main()
