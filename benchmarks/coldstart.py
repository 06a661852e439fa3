"""Cold start: the first run on a new checkpoint, sdengine beside diffusers, each from nothing in a fresh process.

    python -m benchmarks coldstart [--workdir DIR] [--size 256] [--new-size 320] [--steps 10]
                                   [--systems sdengine-openvino,diffusers] [--out FILE.md]

The model, the request and the processes are benchmarks/peers.py's (the SD1.5-architecture diffusers folder
with random weights, seed 0, written once into ``{workdir}/models``; ``--small`` a narrow one that checks the
harness in minutes, not a figure). Each system runs its *prepare* child: sdengine (``sdengine-openvino``: the CPU
default, openvino bf16 where the CPU has it) exports every component it runs into an emptied artefact cache
(ONNX, OpenVINO IR, compile) and generates once at ``--size``; diffusers loads the folder with
``from_pretrained`` and generates once. Reported per system: its peak resident memory up to the end of that
first generation (``ru_maxrss``), and ours / diffusers'. For sdengine the child also traces where the memory went
(benchmarks.memory.LogPeaks: the peak between consecutive log records of the engine -- each export, IR conversion,
compile and weights release logs as it starts).

Then, in the same process (after the peak was read): one more request at ``--size`` (warm), one at ``--new-size``
(the first of a new size: what it pays beyond a warm request is the reshape and compile of each component for
the new static shapes) and one more there (warm). Reported: first-of-new-size / warm at that size.
Peak memory is not affected by the machine's load (times are): state the load average beside the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.peers import MODEL, SYSTEMS, cpu_flags, cpu_model, pythons, spawn, write_model

DEFAULT_SYSTEMS = "sdengine-openvino,diffusers"


def _gb(mb: float) -> str:
    return f"{mb / 1024:.2f} GB"


def markdown(results: dict, args, load: tuple[float, ...]) -> str:
    base = results.get("diffusers")
    lines = [
        f"### Cold start (`python -m benchmarks coldstart`) ({datetime.date.today().isoformat()})",
        "",
        f"Command: `python -m benchmarks coldstart --size {args.size} --new-size {args.new_size} --steps {args.steps} "
        f"--systems {','.join(args.systems)}{' --small' if args.small else ''}"
        f"{f' --shapes {args.shapes}' if args.shapes else ''}`. Machine: {cpu_model()}, "
        f"{os.cpu_count()} cores; CPU flags: {', '.join(cpu_flags()) or 'none listed'}; load average "
        f"{' / '.join(f'{x:.2f}' for x in load)} at the start. Model: SD1.5 architecture"
        f"{' (narrow: --small)' if args.small else ''}, random weights, one diffusers folder for both; "
        f"{args.size}x{args.size}, {args.steps} steps Euler a, CFG 7. Each system from nothing in its own process.",
        "",
        "| system | precision | cold: load + first run | peak RSS (to the end of the first run) | vs diffusers | "
        f"warm at {args.size} | first at {args.new_size} | warm at {args.new_size} | first new / warm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, r in results.items():
        if r is None:
            lines.append(f"| {system} | failed | | | | | | | |")
            continue
        ratio = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "n/a"
        warm = f"{r['runs_s'][1]:.1f} s" if len(r["runs_s"]) > 1 else "n/a"
        first_new, warm_new = r.get("new_size_s", (None, None))
        new = f"{first_new / warm_new:.2f}x" if first_new else "n/a"
        lines.append(f"| {system} | {r['label']} | {r['load_s'] + r['runs_s'][0]:.0f} s | "
                     f"{_gb(r['peak_rss_mb'])} | {ratio} | {warm} | "
                     f"{f'{first_new:.1f} s' if first_new else 'n/a'} | {f'{warm_new:.1f} s' if warm_new else 'n/a'} | "
                     f"{new} |")
    for system, r in results.items():
        trace = (r or {}).get("memory_trace")
        if trace:
            top = sorted(trace, key=lambda row: -row["peak_mib"])[:6]
            lines += ["", f"Where {system}'s cold run peaked (the largest intervals between its log records; "
                          "peak, then anonymous / file-mapped RSS at the interval's end):", ""]
            lines += [f"- {row['peak_mib'] / 1024:.2f} GB after `{row['after']}` "
                      f"({row['anon_mib'] / 1024:.2f} / {row['file_mib'] / 1024:.2f} GB)" for row in top]
    return "\n".join(lines) + "\n"


def shapes(workdir: Path, size: int, new_size: int, rounds: int, log) -> dict:
    """The UNet (batch 2: one image with CFG) compiled for static shapes at ``size`` (the backend's own compile)
    beside one compiled with dynamic spatial axes, both timed on the same feeds in alternation (``rounds``
    each, after a warm-up: the warm cost of dynamic shapes); then the first call at ``new_size`` on each (the
    dynamic model's first inference at a new shape vs the static path's reshape + compile + first inference)
    and a warm one there. Reads the cold run's cache (``cache-sdengine-openvino``)."""
    import statistics

    import numpy as np

    from engine.backends.openvino import _core
    from engine.pipeline import Engine

    engine = Engine(models_dir=workdir / "models", backend="openvino", cache_dir=workdir / "cache-sdengine-openvino")
    backend = engine.runtime(MODEL).backend
    desc = backend.descriptor("unet")

    def feeds(side: int) -> dict:
        return {k: np.ascontiguousarray(v.numpy(), dtype=spec.dtype) for (k, v), spec in
                zip(desc.sample_inputs(2, side // 8, side // 8, 77, seed=0).items(), desc.inputs)}

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    a, b = feeds(size), feeds(new_size)
    shape = {n: v.shape for n, v in a.items()}
    out: dict = {"size": size, "new_size": new_size, "rounds": rounds}
    out["compile_static_s"] = timed(lambda: backend.compiled("unet", shape))
    static = backend.compiled("unet", shape)[1]
    t = time.perf_counter()
    dynamic = _core().compile_model(backend.model("unet"), "CPU", backend.compile_properties()).create_infer_request()
    out["compile_dynamic_s"] = time.perf_counter() - t
    log(f"compiled: static {out['compile_static_s']:.1f} s, dynamic {out['compile_dynamic_s']:.1f} s")
    for request in (static, dynamic):
        request.infer(a, share_inputs=True)
    pairs = [(timed(lambda: static.infer(a, share_inputs=True)), timed(lambda: dynamic.infer(a, share_inputs=True)))
             for _ in range(rounds)]
    out["warm_static_s"] = statistics.median(p[0] for p in pairs)
    out["warm_dynamic_s"] = statistics.median(p[1] for p in pairs)
    out["dynamic_over_static"] = statistics.median(p[1] / p[0] for p in pairs)
    log(f"warm at {size}: static {out['warm_static_s']:.3f} s, dynamic {out['warm_dynamic_s']:.3f} s "
        f"(median ratio {out['dynamic_over_static']:.3f})")
    out["first_new_dynamic_s"] = timed(lambda: dynamic.infer(b, share_inputs=True))
    out["warm_new_dynamic_s"] = timed(lambda: dynamic.infer(b, share_inputs=True))
    new_shape = {n: v.shape for n, v in b.items()}
    out["first_new_static_s"] = timed(lambda: backend.compiled("unet", new_shape)[1].infer(b, share_inputs=True))
    out["warm_new_static_s"] = timed(lambda: backend.compiled("unet", new_shape)[1].infer(b, share_inputs=True))
    log(f"first call at {new_size}: static (reshape + compile + run) {out['first_new_static_s']:.1f} s, dynamic "
        f"{out['first_new_dynamic_s']:.1f} s; warm there: static {out['warm_new_static_s']:.2f} s, dynamic "
        f"{out['warm_new_dynamic_s']:.2f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path,
                    default=Path(os.environ.get("SDENGINE_COLDSTART_WORKDIR", "/tmp/sdengine-coldstart")),
                    help="its own folder by default: the cold runs empty their caches there")
    ap.add_argument("--peers-venv", type=Path, default=Path(os.environ.get("SDENGINE_PEERS_VENV", ".venv-peers")))
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"comma-separated, of: {', '.join(SYSTEMS)}")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--new-size", type=int, default=320, help="the size of the 'first request of a new size' row")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="a narrow model: checks the harness, not a figure")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/coldstart.md"))
    ap.add_argument("--shapes", type=int, default=0, metavar="ROUNDS",
                    help="then the UNet on static vs dynamic shapes, ROUNDS alternated calls each (openvino)")
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {', '.join(unknown)}; allowed: {', '.join(SYSTEMS)}")
    if args.new_size == args.size:
        ap.error("--new-size: must differ from --size (it measures the first request of another size)")
    load = os.getloadavg()
    workdir = args.workdir / ("small" if args.small else "")
    workdir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    log(f"writing the model folder into {workdir}")
    write_model(workdir / "models" / "Stable-diffusion" / MODEL, small=args.small)
    run, skipped = pythons(args.systems, args.peers_venv)
    for system, note in skipped.items():
        log(f"skipping {system}: {note}")
    results = {}
    for system in [s for s in args.systems if s in run]:
        log(f"cold {system}")
        extra = ("--new-size", str(args.new_size)) + (("--trace-memory",) if system.startswith("sdengine") else ())
        results[system] = spawn(system, run[system], workdir, args.size, args.steps, 2, True, log, extra)
    dynamic = shapes(workdir, args.size, args.new_size, args.shapes, log) if args.shapes else None
    (workdir / "coldstart.json").write_text(json.dumps({"results": results, "shapes": dynamic}, indent=1))
    text = markdown(results, args, load)
    if dynamic:
        text += (f"\nThe UNet (batch 2) on static vs dynamic shapes, same process, {dynamic['rounds']} alternated calls: "
                 f"warm at {args.size} static {dynamic['warm_static_s']:.3f} s, dynamic {dynamic['warm_dynamic_s']:.3f} s "
                 f"(median ratio dynamic/static {dynamic['dynamic_over_static']:.3f}); compile static "
                 f"{dynamic['compile_static_s']:.1f} s, dynamic {dynamic['compile_dynamic_s']:.1f} s; first call at "
                 f"{args.new_size}: static (reshape + compile + run) {dynamic['first_new_static_s']:.1f} s, dynamic "
                 f"{dynamic['first_new_dynamic_s']:.1f} s; warm there: static {dynamic['warm_new_static_s']:.2f} s, "
                 f"dynamic {dynamic['warm_new_dynamic_s']:.2f} s.\n")
    # the record names the workdir WORKDIR: no machine path in a committed document (its log lines quote paths)
    for path in sorted({str(workdir.resolve()), str(workdir)}, key=len, reverse=True):
        text = text.replace(path, "WORKDIR")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
