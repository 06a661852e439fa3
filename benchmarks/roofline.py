"""A roofline per component: the machine's measured matmul peak against what each component achieves.

    python -m benchmarks roofline [--model sd15|tiny|PATH] [--workdir DIR] [--size 512] [--batch 2]
                                  [--backends openvino-bf16,openvino-fp32,torch-fp32,torch-bf16] [--runs 3]
                                  [--peak-n 2048] [--profile] [--variants] [--out FILE.json]

1. **Peak**: one large square matmul (``--peak-n``, fp32 and bf16) through each runtime we use: OpenVINO's CPU
   plugin (a MatMul with a constant weight, compiled with the precision hint) and torch (``torch.matmul``);
   the best of a few timed calls after a warm-up, as FLOP/s (2 x N^3 per call). The CPU's matrix features
   (AMX tiles, AVX512-BF16, VNNI) come from /proc/cpuinfo.
2. **Work**: each component's multiply-accumulates, counted from its exported ONNX graph (the artefact the
   backends run) with ONNX shape inference at the request's shapes: MatMul (batched), Gemm, Conv and
   ConvTranspose; FLOPs = 2 x MACs. Element-wise ops, norms and softmax are not counted (they are memory-bound
   and small in FLOPs). :func:`count_macs` is checked against a hand count in tests/test_roofline.py.
3. **Achieved**: each component timed through the engine's backend (median of ``--runs`` after a warm-up that
   compiles) at those shapes -- the UNet at the request's latent size and batch (CFG: batch 2 per image), the
   VAE decoder and encoder at batch 1, the text encoder(s) at one 77-token chunk -- and FLOP/s / peak of the same
   runtime and precision. ``--profile``: OpenVINO's per-layer counters of the UNet (time per layer type and
   kernel), what bounds it; ``--variants``: the UNet compiled with other CPU-plugin properties (THROUGHPUT hint,
   streams, threads, pinning, dynamic shapes), what was tried.

The model: ``sd15`` (the peers' SD1.5 architecture with random weights, written into the workdir), ``tiny``
(the tests' tiny SD1; a check of this harness in seconds, not a figure) or a checkpoint path / store name.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

MATRIX_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_int8", "avx_vnni")
COUNTED = ("MatMul", "Gemm", "Conv", "ConvTranspose")


# ------------------------------------------------------------------------------------------------ FLOPs
def _static(model, input_shapes: Mapping[str, tuple[int, ...]]):
    """A copy of the graph (no weights needed) with every input's dims fixed to ``input_shapes``, shapes inferred
    (with data propagation, so that Reshape targets computed from shapes resolve)."""
    import onnx

    graph_only = onnx.ModelProto()
    graph_only.CopyFrom(model)
    for value in graph_only.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for d, v in zip(dims, input_shapes[value.name]):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    return onnx.shape_inference.infer_shapes(graph_only, data_prop=True)


def _shapes(model) -> dict[str, tuple[int, ...] | None]:
    """Every value's static shape from the inferred graph (None where a dim is unknown); initializers too."""
    out: dict[str, tuple[int, ...] | None] = {}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        out[value.name] = None if any(v < 0 for v in shape) else shape
    for init in model.graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _attr(node, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def openvino_shapes(path, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> static shape, from OpenVINO's ONNX frontend reading the graph at ``path`` (weights
    memory-mapped, not copied) reshaped to ``input_shapes``: its shape propagation folds the Shape -> Gather ->
    Div -> Concat chains that give attention's Reshape targets, which ONNX's data propagation leaves unknown.
    The ONNX tensor names survive as the names of OpenVINO's output tensors."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    model.reshape({name: list(shape) for name, shape in input_shapes.items()})
    out = {}
    for op in model.get_ordered_ops():
        for port in op.outputs():
            if port.get_partial_shape().is_static:
                shape = tuple(int(d) for d in port.get_shape())
                for name in port.get_names():
                    out[name] = shape
    return out


def count_macs(model, input_shapes: Mapping[str, tuple[int, ...]], path=None) -> dict[str, Any]:
    """Multiply-accumulates of ``model`` (an onnx.ModelProto; its weights need not be loaded) at
    ``input_shapes``: ``{"macs": total, "by_op": {op type: macs}, "unresolved": [node names whose shapes shape
    inference left unknown]}``; with ``path`` (the graph's file) the shapes ONNX leaves unknown come from
    :func:`openvino_shapes`. MatMul: prod(output) x K (numpy broadcasting: batch dims in the output);
    Gemm: M x N x K; Conv: prod(output) x C_in/group x prod(kernel); ConvTranspose: prod(input) x
    C_out/group x prod(kernel)."""
    inferred = _static(model, input_shapes)
    shapes = _shapes(inferred)
    if path is not None and any(shapes.get(n) is None for node in _all_nodes(inferred.graph)
                                if node.op_type in COUNTED for n in (*node.input[:2], node.output[0])):
        known = openvino_shapes(path, input_shapes)  # fills what ONNX shape inference left unknown
        shapes = {**known, **{k: v for k, v in shapes.items() if v is not None}}
    by_op = {op: 0 for op in COUNTED}
    unresolved = []
    for node in _all_nodes(inferred.graph):
        if node.op_type not in COUNTED:
            continue
        ins = [shapes.get(name) for name in node.input[:2]]
        out = shapes.get(node.output[0])
        if out is None or any(s is None for s in ins):
            unresolved.append(node.name or node.output[0])
            continue
        a, b = ins
        if node.op_type == "MatMul":
            k = a[-1]
            macs = int(np.prod(out, dtype=np.int64)) * k
        elif node.op_type == "Gemm":
            k = a[0] if _attr(node, "transA", 0) else a[-1]
            macs = int(np.prod(out, dtype=np.int64)) * k
        elif node.op_type == "Conv":  # weight (C_out, C_in/group, *kernel)
            macs = int(np.prod(out, dtype=np.int64)) * int(np.prod(b[1:], dtype=np.int64))
        else:  # ConvTranspose: weight (C_in, C_out/group, *kernel); every input element scatters a kernel
            macs = int(np.prod(a, dtype=np.int64)) * int(np.prod(b[1:], dtype=np.int64))
        by_op[node.op_type] += macs
    return {"macs": sum(by_op.values()), "by_op": by_op, "unresolved": unresolved}


def _all_nodes(graph):
    """The graph's nodes and those of its subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.g is not None and len(a.g.node):
                yield from _all_nodes(a.g)


# ------------------------------------------------------------------------------------------------ peak
def cpu_matrix_flags() -> list[str]:
    from core.cpu import cpu_flags

    flags = cpu_flags()
    return [f for f in MATRIX_FLAGS if f in flags]


def _best(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def peak_openvino(n: int, precision: str, threads: int | None = None) -> float:
    """FLOP/s of an (n x n) @ (n x n) MatMul with a constant weight on OpenVINO's CPU plugin, compiled with
    INFERENCE_PRECISION_HINT ``precision`` (``bf16`` / ``f32``)."""
    import openvino as ov
    from openvino import opset13 as ops

    from core.cpu import cpu_threads

    rng = np.random.default_rng(0)
    x = ops.parameter([n, n], ov.Type.f32, name="x")
    w = ops.constant(rng.standard_normal((n, n), dtype=np.float32))
    model = ov.Model([ops.matmul(x, w, False, False)], [x], "peak")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                       "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                                                       "INFERENCE_NUM_THREADS": str(cpu_threads(threads))})
    request = compiled.create_infer_request()
    feed = rng.standard_normal((n, n), dtype=np.float32)
    seconds = _best(lambda: request.infer({0: feed}, share_inputs=True, share_outputs=True))
    return 2.0 * n**3 / seconds


def peak_torch(n: int, precision: str) -> float:
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    with torch.inference_mode():
        seconds = _best(lambda: torch.matmul(a, b))
    return 2.0 * n**3 / seconds


# ------------------------------------------------------------------------------------------------ components
def component_shapes(desc, batch: int, latent: int) -> dict[str, tuple[int, ...]]:
    env = desc.env(batch, latent, latent)
    return {spec.name: spec.resolve(env) for spec in desc.inputs}


def _onnx_graph(backend, component: str):
    """The component's exported ONNX graph (weights not loaded): the artefact the backends run."""
    import onnx

    art = backend.artefact(component) if hasattr(backend, "artefact") else None
    if art is None:
        from export.onnx import export_component

        art = export_component(component, backend._components, backend.model_hash, backend.config.artefacts_dir,
                               precision="fp32", attention_chunks=0)
    return onnx.load(str(art.path), load_external_data=False), art.path


def time_component(backend, component: str, shapes: Mapping[str, tuple[int, ...]], runs: int) -> float:
    desc = backend.descriptor(component)
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in desc.inputs:
        shape = shapes[spec.name]
        lo, hi = spec.value_range
        if spec.dtype == "int64":
            feeds[spec.name] = rng.integers(int(lo), int(hi), shape, dtype=np.int64)
        else:
            feeds[spec.name] = (rng.random(shape, dtype=np.float32) * (hi - lo) + lo).astype(spec.dtype)
    backend.run(component, feeds)  # warm-up: compiles the static shapes
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        backend.run(component, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_openvino(backend, component: str, shapes: Mapping[str, tuple[int, ...]], top: int = 8) -> list[dict]:
    """OpenVINO's per-layer performance counters (``PERF_COUNT``) of one inference of ``component`` compiled as
    the backend compiles it: time per (layer type, kernel), largest first, as shares of the total."""
    import openvino as ov

    model = backend.model(component)
    model.reshape({name: list(shape) for name, shape in shapes.items()})
    compiled = ov.Core().compile_model(model, "CPU", {**backend.compile_properties(), "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    desc = backend.descriptor(component)
    rng = np.random.default_rng(0)
    feeds = {spec.name: (rng.integers(0, 100, shapes[spec.name]) if spec.dtype == "int64"
                         else rng.random(shapes[spec.name], dtype=np.float32)).astype(spec.dtype)
             for spec in desc.inputs}
    request.infer(feeds)
    request.infer(feeds)
    totals: dict[tuple[str, str], float] = {}
    for info in request.profiling_info:
        key = (info.node_type, info.exec_type)
        totals[key] = totals.get(key, 0.0) + info.real_time.total_seconds()
    whole = sum(totals.values()) or 1.0
    rows = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [{"layer": t, "kernel": k, "ms": v * 1e3, "share": v / whole} for (t, k), v in rows]


# what was tried on the UNet beside the backend's own properties (LATENCY, one stream, every core, static shapes)
VARIANTS = {
    "ours (LATENCY, 1 stream, static)": {},
    "THROUGHPUT hint": {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": "AUTO"},
    "2 streams": {"NUM_STREAMS": "2"},
    "1 thread": {"INFERENCE_NUM_THREADS": "1"},
    "no hyper-threading/pinning": {"ENABLE_CPU_PINNING": "NO"},
    "dynamic shapes": {"_dynamic": True},
}


def variants_openvino(backend, component: str, shapes: Mapping[str, tuple[int, ...]], runs: int) -> list[dict]:
    """The component compiled with other CPU-plugin properties (:data:`VARIANTS`) and timed like the backend's
    own compile (median of ``runs`` after a warm-up): what hints, streams, threads and static shapes change."""
    import openvino as ov

    desc = backend.descriptor(component)
    rng = np.random.default_rng(0)
    feeds = {spec.name: (rng.integers(0, 100, shapes[spec.name]) if spec.dtype == "int64"
                         else rng.random(shapes[spec.name], dtype=np.float32)).astype(spec.dtype)
             for spec in desc.inputs}
    out = []
    for name, extra in VARIANTS.items():
        model = backend.model(component)
        props = {**backend.compile_properties(), **{k: v for k, v in extra.items() if not k.startswith("_")}}
        if not extra.get("_dynamic"):
            model.reshape({n: list(v) for n, v in shapes.items()})
        try:
            request = ov.Core().compile_model(model, "CPU", props).create_infer_request()
        except RuntimeError as exc:  # a property this plugin does not take
            out.append({"variant": name, "error": str(exc).splitlines()[0]})
            continue
        request.infer(feeds)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            request.infer(feeds)
            times.append(time.perf_counter() - t)
        out.append({"variant": name, "seconds": statistics.median(times)})
        del request
    return out


def _model(args, workdir: Path) -> tuple[Path, str]:
    """(models dir, model name)."""
    if args.model == "sd15":
        from benchmarks.peers import MODEL, write_model

        folder = workdir / "models" / "Stable-diffusion" / MODEL
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_model(folder)
        return workdir / "models", MODEL
    if args.model == "tiny":
        from engine.models.tiny import write_tiny_store

        root = workdir / "tiny-models"
        if not root.exists():
            write_tiny_store(root)
        return root, "tiny-sd1"
    path = Path(args.model)
    return (path.parent.parent, path.name) if path.exists() else (workdir / "models", args.model)


def run(args) -> dict:
    from engine.pipeline import Engine

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sdengine-roofline-"))
    models_dir, name = _model(args, workdir)
    peaks: dict[str, float] = {}
    for backend in args.backends:
        runtime, precision = backend.split("-")
        peaks[backend] = peak_openvino(args.peak_n, "f32" if precision == "fp32" else precision) \
            if runtime == "openvino" else peak_torch(args.peak_n, precision)
        print(f"peak {backend}: {peaks[backend] / 1e9:.1f} GFLOP/s ({args.peak_n}^3 matmul)", flush=True)
    rows = []
    macs_cache: dict[tuple, dict] = {}
    for backend in args.backends:
        runtime, precision = backend.split("-")
        engine = Engine(models_dir=models_dir, backend=runtime, precision={"f32": "fp32"}.get(precision, precision),
                        cache_dir=workdir / "cache")
        rt = engine.runtime(name)
        family = rt.model.family
        latent = args.size // 8 if args.size else family.native_size // 8
        for component in ("unet", "vae_decoder", "vae_encoder", "text_encoder", "text_encoder_2"):
            if not rt.backend.has(component):
                continue
            batch = args.batch if component == "unet" else 1
            desc = rt.backend.descriptor(component)
            shapes = component_shapes(desc, batch, latent)
            key = (component, tuple(sorted(shapes.items())))
            if key not in macs_cache:
                graph, path = _onnx_graph(rt.backend, component)
                macs_cache[key] = count_macs(graph, shapes, path)
            work = macs_cache[key]
            seconds = time_component(rt.backend, component, shapes, args.runs)
            achieved = 2.0 * work["macs"] / seconds
            rows.append({"backend": backend, "component": component, "shapes": {k: list(v) for k, v in
                         shapes.items()}, "gmacs": work["macs"] / 1e9, "by_op_gmacs":
                         {k: v / 1e9 for k, v in work["by_op"].items()}, "unresolved": work["unresolved"],
                         "seconds": seconds, "gflops": achieved / 1e9, "peak_gflops": peaks[backend] / 1e9,
                         "fraction_of_peak": achieved / peaks[backend]})
            if args.profile and runtime == "openvino" and component == "unet":
                rows[-1]["profile"] = profile_openvino(rt.backend, component, shapes)
                for p in rows[-1]["profile"]:
                    print(f"  {p['layer']:<24} {p['kernel']:<28} {p['ms']:8.1f} ms {p['share']:5.0%}", flush=True)
            if args.variants and runtime == "openvino" and component == "unet":
                rows[-1]["variants"] = variants_openvino(rt.backend, component, shapes, args.runs)
                for v in rows[-1]["variants"]:
                    print(f"  {v['variant']:<34} " + (f"{v['seconds'] * 1e3:8.1f} ms" if "seconds" in v
                                                     else v["error"]), flush=True)
            print(f"{backend} {component}: {work['macs'] / 1e9:.2f} GMACs in {seconds * 1e3:.1f} ms = "
                  f"{achieved / 1e9:.1f} GFLOP/s, {achieved / peaks[backend]:.0%} of peak", flush=True)
        del engine, rt
    from benchmarks.peers import cpu_model

    return {"model": args.model, "size": args.size, "batch": args.batch, "peak_n": args.peak_n,
            "peaks_gflops": {k: v / 1e9 for k, v in peaks.items()}, "rows": rows, "cpu": cpu_model(),
            "cpu_matrix_flags": cpu_matrix_flags(), "cores": os.cpu_count(), "loadavg": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown(result: dict) -> str:
    head = (f"Roofline: model {result['model']}, {result['size']}², UNet batch {result['batch']}; "
            f"{result['cpu']} ({result['cores']} cores; {', '.join(result['cpu_matrix_flags'])}), "
            f"{result['date']}, load average {result['loadavg'][0]:.1f}. Peak: {result['peak_n']}³ matmul: "
            + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in result["peaks_gflops"].items()))
    lines = [head, "", "| backend | component | GMACs | ms | GFLOP/s | of peak |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {r['component']} | {r['gmacs']:.2f} | {r['seconds'] * 1e3:.1f} | "
                     f"{r['gflops']:.1f} | {r['fraction_of_peak']:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks roofline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--size", type=int, default=512, help="image side (0: the model's native size)")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2: one image with CFG)")
    ap.add_argument("--backends", default="openvino-bf16,openvino-fp32,torch-fp32,torch-bf16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peak-n", type=int, default=2048)
    ap.add_argument("--profile", action="store_true", help="openvino: the UNet's per-layer counters")
    ap.add_argument("--variants", action="store_true", help="openvino: the UNet under other hints/streams/threads")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.backends = args.backends.split(",")
    result = run(args)
    print(markdown(result))
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.out)
    return 0
