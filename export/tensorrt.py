"""ONNX -> TensorRT engine plans, cached by what made them; refit; the engine runtime.

NOT RUN IN CI: TensorRT cannot be installed in this project's environment (no GPU, no NVIDIA packages), so
the code that calls ``tensorrt`` is written against its documented Python API (TensorRT 10: ``Builder``,
``OnnxParser.parse_from_file``, ``IBuilderConfig`` with ``BuilderFlag.FP16/BF16/REFIT``, optimisation
profiles, timing cache, ``Refitter`` + ``OnnxParserRefitter.refit_from_file``, ``Runtime``,
``IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3``) and has never executed here.
What is tested up to that boundary: the profiles (export.descriptors), the engine cache key and directory,
the ONNX preparation (constant folding + shape inference, checked against the original graph on the CPU EP),
profile range checks, and the MissingDependency error when ``tensorrt`` is absent.

Layout: ``{cache}/{model hash}/{component}/{onnx sha[:16]}-{precision}-{profile}-trt{version}-{gpu}/``
holding ``engine.plan`` and ``manifest.json`` (key: full onnx sha256, precision, every min/opt/max shape,
TensorRT version, GPU name, refittable). The timing cache is shared per GPU + TensorRT version under
``{cache}/timing/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from core.atomic import atomic_file
from core.errors import InvalidRequest
from core.lazy import require
from export.descriptors import ComponentDescriptor, ShapeConfig
from export.manifest import artefact_dir, build_artefact, safe_name, valid_artefact
from export.onnx import (
    DATA_FILE,
    MODEL_FILE,
    OnnxArtefact,
    _files,
    carry_parameter_map,
    fp32_stage_of,
    sha256_files,
    tool_versions,
)

log = logging.getLogger(__name__)

PLAN_FILE = "engine.plan"
PLAN_FORMAT = 2  # 2: the prepared graph carries the parameter map (LoRA refit)
PREPARED_STAGE = "onnx-fp32-trt"
WORKSPACE_BYTES = 8 << 30
TRT_PRECISIONS = ("fp32", "fp16", "bf16")


def import_tensorrt():
    """``import tensorrt`` or MissingDependency naming ``pip install 'sdengine[tensorrt]'``."""
    return require("tensorrt", "tensorrt", "Building and running TensorRT engines")


# -- keys and profiles (pure, tested) -----------------------------------------------------------------------

def engine_precision(desc: ComponentDescriptor, precision: str) -> str:
    precision = getattr(precision, "value", precision)
    if precision not in TRT_PRECISIONS:
        raise InvalidRequest("precision", f"{precision!r}", ", ".join(TRT_PRECISIONS))
    return precision if (precision == "fp32" or desc.fp16) else "fp32"


def engine_key(onnx_sha256: str, precision: str, profile: Mapping[str, tuple], shape_config: ShapeConfig,
               trt_version: str, gpu_name: str, refittable: bool = True) -> dict:
    """The manifest key of an engine: everything that makes a plan valid for reuse."""
    return {
        "format": PLAN_FORMAT,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "shape_config": shape_config.key,
        "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "refittable": refittable,
    }


def engine_dir_name(onnx_sha256: str, precision: str, shape_config: ShapeConfig, trt_version: str,
                    gpu_name: str) -> str:
    """``{onnx sha}-{precision}-{profile}-{runtime version}-{gpu}`` (docs/ARCHITECTURE.md, Artefacts)."""
    return safe_name(f"{onnx_sha256[:16]}-{precision}-{shape_config.key}-trt{trt_version}-{gpu_name}")


def engine_dir(cache: Path, model_hash: str, component: str, onnx_sha256: str, precision: str,
               shape_config: ShapeConfig, trt_version: str, gpu_name: str) -> Path:
    name = engine_dir_name(onnx_sha256, precision, shape_config, trt_version, gpu_name)
    return artefact_dir(cache, model_hash, component, name)


def timing_cache_path(cache: Path, trt_version: str, gpu_name: str) -> Path:
    return Path(cache) / "timing" / safe_name(f"trt{trt_version}-{gpu_name}.cache")


def check_in_profile(profile: Mapping[str, tuple], shapes: Mapping[str, tuple]) -> None:
    """InvalidRequest naming the first input whose shape lies outside the engine's min..max profile."""
    for name, (lo, _, hi) in profile.items():
        shape = tuple(shapes[name])
        if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
            raise InvalidRequest(name, f"shape {shape} is outside the TensorRT engine profile",
                                 f"{tuple(lo)} .. {tuple(hi)}; rebuild with a wider ShapeConfig")


# -- ONNX preparation (runs on CPU, tested) -----------------------------------------------------------------

def prepare_onnx(art, progress=None):
    """The graph TensorRT parses: constant folding and redundant-node elimination (onnxruntime's BASIC level,
    which rewrites only standard ONNX ops), then onnx shape inference; weights in one external data file.

    ``art`` is an export.onnx.OnnxArtefact (fp32). Returns the prepared OnnxArtefact (cached by manifest).
    """
    import onnx
    import onnxruntime as ort

    desc = art.descriptor
    model_hash = art.manifest["key"]["model_hash"]
    cache = art.directory.parent.parent.parent
    directory = artefact_dir(cache, model_hash, desc.component, PREPARED_STAGE)
    key = {"format": PLAN_FORMAT, "stage": PREPARED_STAGE, "model_hash": model_hash, "component": desc.component,
           "parent_sha256": art.sha256,
           "tools": tool_versions("onnx", "onnxruntime")}
    manifest = valid_artefact(directory, key)
    if manifest is None:
        with build_artefact(directory, key, hashed=(MODEL_FILE,)) as (tmp, manifest):
            # the export keeps its weights external (export.onnx): so does the prepared graph
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = str(tmp / MODEL_FILE)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(str(art.path), so, providers=["CPUExecutionProvider"])
            onnx.shape_inference.infer_shapes_path(str(tmp / MODEL_FILE), str(tmp / MODEL_FILE))
            manifest["info"]["sha256"] = sha256_files(_files(tmp))
            manifest["info"]["parameters"] = carry_parameter_map(art.manifest, tmp / MODEL_FILE)
            manifest["info"]["fp32_stage"] = fp32_stage_of(art.manifest)
    if progress:
        progress(f"{desc.component}: {PREPARED_STAGE}", 1, 1)
    return OnnxArtefact(desc.component, directory, manifest, desc)


# -- building, refitting, running (need tensorrt + a GPU: NOT RUN IN CI) ------------------------------------

def gpu_name(device: str = "cuda") -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _parse(trt, builder, logger, onnx_path: Path):
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the ONNX graph: {errors}")
    return network, parser


def build_engine(prepared, shape_config: ShapeConfig, precision: str, cache: Path, *, device: str = "cuda",
                 refittable: bool = True, workspace_bytes: int = WORKSPACE_BYTES, progress=None) -> Path:
    """Build (or find in the cache) the engine plan of a prepared ONNX artefact; returns the plan's path.

    NOT RUN IN CI (see the module docstring).
    """
    trt = import_tensorrt()
    desc = prepared.descriptor
    precision = engine_precision(desc, precision)
    profile = desc.profile(shape_config)
    gpu = gpu_name(device)
    key = engine_key(prepared.sha256, precision, profile, shape_config, trt.__version__, gpu, refittable)
    directory = engine_dir(cache, prepared.manifest["key"]["model_hash"], desc.component, prepared.sha256,
                           precision, shape_config, trt.__version__, gpu)
    if valid_artefact(directory, key) is None:
        log.info("%s: building TensorRT engine (%s) into %s", desc.component, precision, directory)
        logger = _logger(trt)
        builder = trt.Builder(logger)
        network, _parser = _parse(trt, builder, logger, prepared.path)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        if refittable:
            config.set_flag(trt.BuilderFlag.REFIT)
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
        timing_path = timing_cache_path(cache, trt.__version__, gpu)
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"{prepared.path}: TensorRT engine build failed (see the TensorRT log)")
        with build_artefact(directory, key, info={"component": desc.component}) as (tmp, manifest):
            (tmp / PLAN_FILE).write_bytes(bytes(plan))
        _write_atomic(timing_path, bytes(config.get_timing_cache().serialize()))
    if progress:
        progress(f"{desc.component}: tensorrt {precision}", 1, 1)
    return directory / PLAN_FILE


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def refit_engine(engine, onnx_path: Path, named_weights: Mapping[str, Any] | None = None) -> None:
    """Replace the weights of a refittable ``ICudaEngine`` in place with those of ``onnx_path`` (same
    architecture, new weights, e.g. another fine-tune of the same base), then the ``named_weights``
    (ONNX initializer name -> numpy array: a LoRA set's patched tensors, ``Refitter.set_named_weights``).
    NOT RUN IN CI."""
    trt = import_tensorrt()
    logger = _logger(trt)
    try:
        refitter = trt.Refitter(engine, logger)
    except TypeError as exc:  # the binding returns no refitter for an engine built without REFIT
        raise RuntimeError(f"the engine is not refittable (built without BuilderFlag.REFIT): {exc}") from exc
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT refit could not read the weights: {errors}")
    keep = []  # the arrays must stay alive until refit_cuda_engine
    for name, array in (named_weights or {}).items():
        weights = trt.Weights(array)
        keep.append((array, weights))
        if not refitter.set_named_weights(name, weights):
            raise RuntimeError(f"{onnx_path}: TensorRT refit has no refittable weight named {name!r}")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise RuntimeError(f"{onnx_path}: TensorRT refit lacks {len(missing)} weights, e.g. {missing[:5]}")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"{onnx_path}: TensorRT refit_cuda_engine failed")


class TensorRTEngine:
    """One deserialised engine with its execution context. Inputs are torch CUDA tensors; outputs are written
    into buffers preallocated per output shape and returned as float32 clones. Runs on the given torch CUDA
    stream (``execute_async_v3``). NOT RUN IN CI (see the module docstring)."""

    def __init__(self, plan_path: Path, device: str = "cuda"):
        import torch

        trt = import_tensorrt()
        self.trt = trt
        self.device = torch.device(device)
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: TensorRT could not deserialise the plan")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._buffers: dict[tuple, Any] = {}

    def refit(self, onnx_path: Path, named_weights: Mapping[str, Any] | None = None) -> None:
        refit_engine(self.engine, onnx_path, named_weights)

    def run(self, feeds: Mapping[str, Any], stream=None) -> dict:
        import torch

        stream = stream or torch.cuda.current_stream(self.device)
        keep = []
        for name in self.inputs:
            t = torch.as_tensor(feeds[name], device=self.device).to(self.dtypes[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            buf = self._buffers.get((name, shape))
            if buf is None:
                buf = self._buffers[(name, shape)] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, buf.data_ptr())
            out[name] = buf
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        # clones are ordered after the engine on the same stream; the inputs in ``keep`` stay alive until here
        result = {n: b.float().clone() for n, b in out.items()}
        del keep
        return result


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
             trt.int32: torch.int32, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]
