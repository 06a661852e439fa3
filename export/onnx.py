"""Components -> ONNX artefacts, cached by a manifest.

Each component of a model goes through up to three stages, each an artefact directory of its own
(``{cache}/{model hash}/{component}/{stage}/model.onnx`` + ``manifest.json``, see export.manifest):

``onnx-fp32``      torch.onnx.export (legacy tracer, ``dynamo=False``) of the export.wrappers module, opset 17,
                   dynamic axes from the descriptor; big models keep their weights in ONE external data file.
                   Attention in export.attention.DEFAULT_CHUNKS query slices (ONNX Runtime on CPU: no fused
                   attention kernel, so the chunks bound the T x T score matrices).
``onnx-fp32-full`` the same with full attention (MatMul -> Softmax -> MatMul), for the runtimes that fuse it
                   into a kernel that never holds the score matrices: OpenVINO's CPU plugin, onnxruntime's GPU
                   optimizer, TensorRT (:func:`fp32_stage`).
``onnx-fp32-gpu``  onnxruntime transformer optimizer, GPU flavour (export.optimize), from ``onnx-fp32-full``.
``onnx-fp16[-gpu]`` fp16 conversion keeping overflow-prone ops fp32 (export.fp16), from the fp32 stage.

Every manifest names the fp32 stage its weights come from (``info.fp32_stage``; absent in caches written before
it: ``onnx-fp32``).

Every stage keeps its weights as external initializers in ONE data file beside the graph (``model.onnx.data``),
so that a runtime can replace some of them when it creates a session (onnxruntime
``SessionOptions.add_external_initializers``, TensorRT refit): LoRA weights without a re-export. The fp32
stage's manifest records ``info.parameters``: source-module parameter name -> ``[initializer name, transposed,
dtype]`` (found by value: the legacy exporter folds ``Linear`` weights into transposed ``onnx::MatMul_N``
initializers), which later stages carry over for the initializers they keep under the same name.

A stage is skipped when its manifest key matches (model hash, component, precision, opset, dynamic axes,
input/output specs, tool versions, the parent stage's sha256) and its graph file's sha256 checks out; any
mismatch rebuilds it. Components whose descriptor forbids fp16 (the SDXL VAE) stay in fp32 when fp16 is asked.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from core.deferred import has_attribute, real_module
from core.mapped import dropping_mapped_pages
from core.errors import InvalidRequest
from core.events import BUILDING, BUILT, UP_TO_DATE
from core.tokens import TOKENS_PER_CHUNK
from export.descriptors import ComponentDescriptor, describe
from export.attention import DEFAULT_CHUNKS, attention_kind, chunked_attention
from export.fp16 import KEEP_FP32_OPS, convert_to_fp16
from export.manifest import artefact_dir, build_artefact, sha256_files, valid_artefact, valid_files
from export.optimize import optimize_for_gpu

log = logging.getLogger(__name__)

EXPORTER_VERSION = 2  # 2: weights always external; parameter map in the manifest
DEFAULT_OPSET = 17
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# above this many bytes of weights the legacy exporter's per-tensor files are streamed (protobuf's limit is 2 GB)
EXTERNAL_DATA_BYTES = 1 << 30
EXTERNAL_MIN_BYTES = 1024  # initializers at least this big live in the data file (the overridable weights)
ONNX_PRECISIONS = ("fp32", "fp16")
MAPPED_WEIGHTS = (".safetensors",)  # the files torch weights are memory-mapped from (safetensors.torch.load_file)

# (what, done, total); what = "{component}: {stage} ({event})", the events of core.events
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class OnnxArtefact:
    """One exported component: its directory, manifest and descriptor."""

    component: str
    directory: Path
    manifest: dict
    descriptor: ComponentDescriptor | None  # None: found by cached_artefact, without the model's modules
    built: bool = False  # built by this call (False: every stage was up to date)

    @property
    def path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def precision(self) -> str:
        return self.manifest["key"]["precision"]

    @property
    def sha256(self) -> str:
        """sha256 of the graph file followed by its external data: what a TensorRT engine is keyed by."""
        return self.manifest["info"]["sha256"]


def tool_versions(*names: str) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def stage_name(precision: str, gpu_optimize: bool) -> str:
    return f"onnx-{precision}" + ("-gpu" if gpu_optimize else "")


FP32_STAGE = "onnx-fp32"
FP32_FULL_STAGE = "onnx-fp32-full"


def attention_chunks_for(gpu_optimize: bool, attention_chunks: int | None = None) -> int:
    """The attention chunks of an export: as asked, else full attention (0) for the GPU optimizer (it fuses
    attention) and export.attention.DEFAULT_CHUNKS otherwise."""
    if attention_chunks is None:
        return 0 if gpu_optimize else DEFAULT_CHUNKS
    return int(attention_chunks)


def fp32_stage(attention_chunks: int) -> str:
    """The fp32 stage's directory for an export with ``attention_chunks`` (0/1: full attention): one directory
    per attention layout, so runtimes that want different ones share a cache without re-exporting in turn."""
    return FP32_STAGE if attention_chunks > 1 else FP32_FULL_STAGE


def fp32_stage_of(manifest: Mapping) -> str:
    """The fp32 stage an artefact's weights come from (its manifest's ``info.fp32_stage``)."""
    return manifest.get("info", {}).get("fp32_stage", FP32_STAGE)


def _weights_bytes(model) -> int:
    return sum(len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer)


def save_onnx(model, path: Path) -> None:
    """Save a ModelProto as graph + ONE external data file holding every initializer of at least
    :data:`EXTERNAL_MIN_BYTES` (so runtimes can override them)."""
    import onnx

    path = Path(path)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=EXTERNAL_MIN_BYTES)


def consolidate(src: Path, dst: Path, move: bool = False) -> None:
    """Copy the graph ``src`` to ``dst`` with all its external tensors (the legacy exporter writes one file
    per tensor above 2 GB of weights) streamed into ONE ``dst.data`` file: the weights are never all in
    memory at once. A graph without external data gets its weights moved to one data file too. ``move``:
    each external file of ``src`` is deleted once its last tensor is copied (the export's own files)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    external = [t for t in _all_tensors(model) if uses_external_data(t)]
    if not external:
        save_onnx(onnx.load(str(src)), dst)
        return
    data_name = dst.name + ".data"
    # a per-tensor file is deleted once its last tensor is copied: the export's disk peak is one copy of the
    # weights, not two (SD1.5 UNet: 3.4 GB, not 6.9)
    last_use = {ExternalDataInfo(t).location: i for i, t in enumerate(external)}
    with open(dst.parent / data_name, "wb") as out:
        for i, tensor in enumerate(external):
            info = ExternalDataInfo(tensor)
            with open(src.parent / info.location, "rb") as f:
                f.seek(info.offset or 0)
                blob = f.read(info.length) if info.length else f.read()
            if move and last_use[info.location] == i and src.parent != dst.parent and info.location != src.name:
                (src.parent / info.location).unlink()
            pad = -out.tell() % 4096  # page-aligned, so runtimes can mmap
            out.write(b"\0" * pad)
            offset = out.tell()
            out.write(blob)
            del tensor.external_data[:]
            for k, v in (("location", data_name), ("offset", offset), ("length", len(blob))):
                entry = tensor.external_data.add()
                entry.key, entry.value = k, str(v)
    onnx.save_model(model, str(dst))


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))


def _files(directory: Path) -> list[Path]:
    paths = [directory / MODEL_FILE]
    if (directory / DATA_FILE).exists():
        paths.append(directory / DATA_FILE)
    return paths


def _initializer_bytes(path: Path):
    """``(name, dims, onnx dtype, raw bytes)`` of every initializer of the graph at ``path`` (external data
    read from its file), one at a time."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            with open(Path(path).parent / info.location, "rb") as f:
                f.seek(info.offset or 0)
                blob = f.read(info.length) if info.length else f.read()
        elif tensor.raw_data:
            blob = tensor.raw_data
        else:
            blob = numpy_helper.to_array(tensor).tobytes()
        yield tensor.name, tuple(tensor.dims), tensor.data_type, blob


def _digest(shape, blob: bytes) -> str:
    return hashlib.blake2b(repr(tuple(shape)).encode() + blob, digest_size=20).hexdigest()


def parameter_map(module, path: Path) -> dict[str, list]:
    """Source-module parameter name -> ``[initializer name, transposed, "float32"]`` for every parameter of
    two or more dimensions found by value among the fp32 graph's initializers (as is, or transposed: a
    folded ``Linear`` weight). A value that several parameters or several initializers share is left out:
    it cannot be replaced unambiguously."""
    import onnx
    import torch

    found: dict[str, list] = {}
    for name, dims, dtype, blob in _initializer_bytes(path):
        if dtype == onnx.TensorProto.FLOAT and len(dims) >= 2:
            found.setdefault(_digest(dims, blob), []).append(name)
    out: dict[str, list] = {}
    claims: dict[str, int] = {}
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if p.dim() < 2:
                continue
            t = p.detach().to("cpu", torch.float32)
            candidates = [(t, False)] + ([(t.t(), True)] if t.dim() == 2 else [])
            for value, transposed in candidates:
                names = found.get(_digest(value.shape, value.contiguous().numpy().tobytes()))
                if names:
                    if len(names) == 1:
                        out[pname] = [names[0], transposed, "float32"]
                        claims[names[0]] = claims.get(names[0], 0) + 1
                    break
    return {k: v for k, v in out.items() if claims[v[0]] == 1}


class SourceWeights:
    """The source module's weights as an exported graph holds them, read from the artefacts (the torch weights
    may have been released).

    ``graph_mapping``: the graph's own parameter map (parameter -> ``[initializer, transposed, dtype]``; a later
    stage such as fp16 carries the names with its dtype). ``weights(param)``: the fp32 value of a mapped
    parameter in the module's own layout (a folded ``Linear`` weight transposed back), read by offset from the
    external data of the component's ``onnx-fp32`` stage -- bit-identical to the module's fp32 weight at
    export (the map was found by value). A runtime merges a LoRA over these (engine.networks.lora).
    """

    def __init__(self, artefact: "OnnxArtefact"):
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data

        self.graph_mapping: dict[str, list] | None = artefact.manifest.get("info", {}).get("parameters")
        fp32 = artefact.directory.parent / fp32_stage_of(artefact.manifest)
        manifest = json.loads((fp32 / "manifest.json").read_text())
        self.mapping: dict[str, list] = manifest.get("info", {}).get("parameters") or {}
        wanted = {name for name, _, _ in self.mapping.values()}
        self._where: dict[str, tuple] = {}  # initializer -> (file, offset, dims, numpy dtype)
        model = onnx.load(str(fp32 / MODEL_FILE), load_external_data=False)
        for t in model.graph.initializer:
            if t.name in wanted and uses_external_data(t):
                info = ExternalDataInfo(t)
                self._where[t.name] = (fp32 / info.location, info.offset or 0, tuple(t.dims),
                                       onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        del model

    def __contains__(self, param: str) -> bool:
        return param in self.mapping and self.mapping[param][0] in self._where

    def __call__(self, param: str):
        import numpy as np

        name, transposed, _ = self.mapping[param]
        path, offset, dims, dtype = self._where[name]
        count = int(np.prod(dims, dtype=np.int64))
        value = np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(dims)
        return np.ascontiguousarray(value.T if transposed else value, dtype=np.float32)


def carry_parameter_map(parent_manifest: dict, path: Path) -> dict[str, list]:
    """The parent stage's parameter map, kept for the initializers the graph at ``path`` still has under the
    same name and shape (with their dtype now: fp16 after conversion)."""
    import onnx

    names = {}
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        names[t.name] = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
    parent = parent_manifest.get("info", {}).get("parameters", {})
    return {p: [n, tr, names[n]] for p, (n, tr, _) in parent.items() if n in names}


def _fp32_cpu(module):
    import torch

    p = next(module.parameters(), None)
    if p is None or (p.dtype == torch.float32 and p.device.type == "cpu"):
        return module
    return copy.deepcopy(module).to("cpu", torch.float32)


RELEASED = "_sdengine_released_fingerprint"  # set on a module whose weights were released after export


def weights_fingerprint(module, samples: int = 4096) -> str:
    """sha256 over every parameter/buffer's name, shape, dtype and up to ``samples`` strided values.

    Cheap (a few MB hashed for an SD UNet) and deterministic; part of the fp32 stage's key, so changed
    weights re-export even if a caller passes a stale model hash. A released module (:func:`release_weights`)
    answers the fingerprint it had.
    """
    import torch

    released = getattr(module, RELEASED, None)
    if released is not None:
        return released

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(flat[::step].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def release_weights(module) -> None:
    """Free the torch weights of ``module`` (moved to the meta device) once every artefact made from it exists:
    its config stays, and its fingerprint is remembered, so the artefacts' keys still match. Exporting from
    a released module is refused (:func:`export_component` says so)."""
    import torch

    if getattr(module, RELEASED, None) is not None:
        return
    fingerprint = weights_fingerprint(module)
    torch.nn.Module.to(module, device="meta")  # the nn.Module method: no library-specific checks
    setattr(module, RELEASED, fingerprint)
    gc.collect()


def is_released(module) -> bool:
    return getattr(module, RELEASED, None) is not None


LOADER = "_sdengine_weights_loader"  # set on a released module whose weights can be loaded back (a callable)
UNLOADED = "_sdengine_unloaded"  # set on a module built without its weights whose artefacts are not all cached


def mark_released(module, fingerprint: str, loader: Callable[[], None] | None = None) -> None:
    """Mark ``module`` (built without its weights, on the meta device) as released with the weights
    ``fingerprint`` its artefacts were made with: its cached artefacts are found without its weights.
    ``loader()`` puts the weights back when an export is needed after all (:func:`export_component` calls it)."""
    setattr(module, RELEASED, fingerprint)
    if loader is not None:
        setattr(module, LOADER, loader)


def mark_unloaded(module, loader: Callable[[], None]) -> None:
    """Mark ``module`` (built without its weights, on the meta device) as not loaded yet: :func:`export_component`
    calls ``loader()`` (which loads this module's weights only, and marks it loaded) before its first export, so
    a cold start holds the torch weights of the module being exported and no other's."""
    setattr(module, UNLOADED, True)
    setattr(module, LOADER, loader)


def is_unloaded(module) -> bool:
    return bool(getattr(module, UNLOADED, False))


def mark_loaded(module) -> None:
    """``module`` has its weights again (released / meta-built, then loaded): it exports and fingerprints as any."""
    module = real_module(module)
    for attr in (RELEASED, LOADER, UNLOADED):
        if attr in module.__dict__:
            delattr(module, attr)


def trace_inputs(desc: ComponentDescriptor) -> dict:
    """Small sample inputs for tracing: batch 2, latent height != width (so no axis is specialised)."""
    m = desc.latent_multiple
    h = m * -(-8 // m)
    return desc.sample_inputs(batch=2, height=h, width=h + m, tokens=TOKENS_PER_CHUNK, seed=0)


def torch_export(wrapper, desc: ComponentDescriptor, path: Path, opset: int) -> None:
    """torch.onnx.export (legacy tracer) of ``wrapper`` into ``path`` (may write external files beside it)."""
    import torch

    inputs = trace_inputs(desc)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, tuple(inputs[n] for n in desc.input_names), str(path),
            input_names=desc.input_names, output_names=desc.output_names,
            dynamic_axes=desc.dynamic_axes(), opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def _key(desc: ComponentDescriptor, model_hash: str, stage: str, precision: str, opset: int,
         parent_sha: str | None, tools: Mapping[str, str], extra: Mapping | None = None) -> dict:
    return {
        "format": EXPORTER_VERSION,
        "model_hash": model_hash,
        "component": desc.component,
        "stage": stage,
        "precision": precision,
        "opset": opset,
        "inputs": [[t.name, t.dtype, list(t.shape)] for t in desc.inputs],
        "outputs": [[t.name, t.dtype, list(t.shape)] for t in desc.outputs],
        "dynamic_axes": {k: {str(i): v for i, v in a.items()} for k, a in desc.dynamic_axes().items()},
        "parent_sha256": parent_sha,
        "tools": dict(tools),
        **(extra or {}),
    }


def _finish(tmp: Path, manifest: dict, desc: ComponentDescriptor) -> None:
    manifest["info"]["sha256"] = sha256_files(_files(tmp))
    manifest["info"]["latent_multiple"] = desc.latent_multiple
    manifest["info"]["image_scale"] = desc.image_scale
    manifest["info"]["trace_shapes"] = {k: list(v.shape) for k, v in trace_inputs(desc).items()}


def _stage(desc, model_hash, cache_dir, stage, key, build, progress, step) -> OnnxArtefact:
    directory = artefact_dir(cache_dir, model_hash, desc.component, stage)
    manifest = valid_artefact(directory, key)
    what = f"{desc.component}: {stage}"
    built = manifest is None
    if not built:
        log.info("%s: up to date (%s)", what, directory)
    else:
        log.info("%s: building into %s", what, directory)
        if progress:
            progress(f"{what} ({BUILDING})", step[0] - 1, step[1])
        with build_artefact(directory, key, hashed=(MODEL_FILE,)) as (tmp, manifest):
            build(tmp, manifest)
            _finish(tmp, manifest, desc)
    if progress:
        progress(f"{what} ({BUILT if built else UP_TO_DATE})", *step)
    return OnnxArtefact(desc.component, directory, manifest, desc, built)


def _tools_for(stage: str) -> dict[str, str]:
    tools = tool_versions("torch", "onnx", "diffusers", "transformers")
    if stage.endswith("-gpu") and stage.startswith("onnx-fp32"):
        return {**tools, **tool_versions("onnxruntime", "onnxruntime-gpu", "numpy")}
    if stage.startswith("onnx-fp16"):
        return {**tools, **tool_versions("onnxruntime", "onnxruntime-gpu")}
    return tools


def cached_artefact(component: str, model_hash: str, cache_dir: Path, *, precision: str = "fp32",
                    gpu_optimize: bool = False, opset: int = DEFAULT_OPSET,
                    attention_chunks: int | None = None) -> OnnxArtefact | None:
    """The artefact :func:`export_component` would return, found WITHOUT the model's modules (no model load):
    every stage's manifest is read and its key checked on what does not need the modules (exporter format,
    model hash -- the checkpoint file's hash, cached by path/size/mtime --, component, stage, precision, opset,
    tool versions, the parent stage's sha256) and its files checked (sizes, the graph's sha256). None when
    anything is missing or differs; :func:`export_component` then decides, with the full key."""
    stages = [fp32_stage(attention_chunks_for(gpu_optimize, attention_chunks))]
    stages += [stage_name("fp32", True)] if gpu_optimize else []
    if precision == "fp16":
        stages.append(stage_name("fp16", gpu_optimize))
    parent_sha, art = None, None
    for stage in stages:
        directory = artefact_dir(cache_dir, model_hash, component, stage)
        manifest = valid_files(directory)
        if manifest is None:
            return None
        key = manifest.get("key", {})
        expected = {"format": EXPORTER_VERSION, "model_hash": model_hash, "component": component, "stage": stage,
                    "precision": "fp16" if stage.startswith("onnx-fp16") else "fp32", "opset": opset,
                    "parent_sha256": parent_sha, "tools": _tools_for(stage)}
        if any(key.get(k) != v for k, v in expected.items()):
            return None
        parent_sha = manifest["info"]["sha256"]
        art = OnnxArtefact(component, directory, manifest, None)
    return art


def cached_weights_fingerprint(component: str, model_hash: str, cache_dir: Path, *, precision: str = "fp32",
                               gpu_optimize: bool = False, attention_chunks: int | None = None) -> str | None:
    """The weights fingerprint the cached artefacts of ``component`` were exported with (the fp32 stage's key),
    found without the model's modules (:func:`cached_artefact`; an fp16 request falls back to the fp32 stages,
    as :func:`export_component` does for components that stay fp32); None when not cached."""
    where = {"gpu_optimize": gpu_optimize, "attention_chunks": attention_chunks}
    art = cached_artefact(component, model_hash, cache_dir, precision=precision, **where)
    if art is None and precision != "fp32":
        art = cached_artefact(component, model_hash, cache_dir, precision="fp32", **where)
    if art is None:
        return None
    fp32 = art.directory.parent / fp32_stage_of(art.manifest) / "manifest.json"
    try:
        return json.loads(fp32.read_text())["key"]["weights"]
    except (OSError, ValueError, KeyError):
        return None


def export_component(component: str, modules: Mapping[str, Any], model_hash: str, cache_dir: Path, *,
                     precision: str = "fp32", gpu_optimize: bool = False, opset: int = DEFAULT_OPSET,
                     progress: ProgressCallback | None = None, attention_chunks: int | None = None) -> OnnxArtefact:
    """Export ``component`` of the model whose diffusers modules are ``modules`` (hash ``model_hash``).

    Returns the cached artefact when its manifest matches; otherwise exports (and optimises / converts)
    and returns the new one. ``precision`` "fp16" falls back to fp32 for components that must stay fp32.
    ``attention_chunks``: attention computed in that many query slices (export.attention; 0/1: full attention,
    for runtimes that fuse it); default: chunked (DEFAULT_CHUNKS) unless ``gpu_optimize``. Part of the key.
    """
    import onnx

    precision = getattr(precision, "value", precision)
    if precision not in ONNX_PRECISIONS:
        raise InvalidRequest("precision", f"{precision!r} has no ONNX export", ", ".join(ONNX_PRECISIONS))
    if opset < 17:
        raise InvalidRequest("opset", f"{opset}", ">= 17")
    desc = describe(component, modules)
    if is_unloaded(modules[desc.source]):  # built without weights: this module's weights only, now
        log.info("%s: loading the weights of %r to export it", component, desc.source)
        getattr(modules[desc.source], LOADER)()
    if precision == "fp16" and not desc.fp16:
        log.info("%s stays fp32 by policy (fp16 overflows in it)", component)
        precision = "fp32"
    total = 1 + int(gpu_optimize) + int(precision == "fp16")
    step = iter(range(1, total + 1))
    tools = tool_versions("torch", "onnx", "diffusers", "transformers")

    attention_chunks = attention_chunks_for(gpu_optimize, attention_chunks)
    fp32_name = fp32_stage(attention_chunks)

    def build_fp32(tmp: Path, manifest: dict) -> None:
        loader = getattr(modules[desc.source], LOADER, None)
        if is_released(modules[desc.source]) and loader is not None:
            log.info("%s: loading the weights of %r back to export it", component, desc.source)
            loader()
        if is_released(modules[desc.source]):
            raise RuntimeError(f"{component}: the torch weights of {desc.source!r} were released after their export "
                               f"and the artefact is gone from {cache_dir}: load the model again")
        raw = tmp / "raw"
        raw.mkdir()
        source = _fp32_cpu(real_module(modules[desc.source]))
        # the module's weights are mapped from the checkpoint (safetensors): the pages the tracer and the
        # exporter read would stay resident beside the exporter's own copies (the folded Linear weights);
        # dropped while it runs, they fault back from the page cache when read again (core.mapped)
        with dropping_mapped_pages(suffixes=MAPPED_WEIGHTS):
            with chunked_attention(source, attention_chunks):
                torch_export(desc.wrapper(source).eval(), desc, raw / MODEL_FILE, opset)
            # the legacy exporter writes one file per big tensor: consolidate into one
            consolidate(raw / MODEL_FILE, tmp / MODEL_FILE, move=True)
            shutil.rmtree(raw)
            manifest["info"]["parameters"] = parameter_map(source, tmp / MODEL_FILE)
        manifest["info"]["fp32_stage"] = fp32_name

    key = _key(desc, model_hash, fp32_name, "fp32", opset, None, tools,
               {"weights": weights_fingerprint(modules[desc.source]),
                "attention": attention_kind(attention_chunks) if has_attribute(modules[desc.source], "set_attn_processor")
                else "full"})
    art = _stage(desc, model_hash, cache_dir, fp32_name, key, build_fp32, progress, (next(step), total))
    built = art.built

    if gpu_optimize:
        parent = art
        tools_gpu = {**tools, **tool_versions("onnxruntime", "onnxruntime-gpu", "numpy")}

        def build_gpu(tmp: Path, manifest: dict) -> None:
            optimized, applied = optimize_for_gpu(parent.path, desc.optimizer_type)
            save_onnx(optimized.model, tmp / MODEL_FILE)
            manifest["info"]["optimizer"] = applied
            manifest["info"]["parameters"] = carry_parameter_map(parent.manifest, tmp / MODEL_FILE)
            manifest["info"]["fp32_stage"] = fp32_stage_of(parent.manifest)

        stage = stage_name("fp32", True)
        key = _key(desc, model_hash, stage, "fp32", opset, parent.sha256, tools_gpu)
        art = _stage(desc, model_hash, cache_dir, stage, key, build_gpu, progress, (next(step), total))
        built = built or art.built

    if precision == "fp16":
        parent = art
        tools_fp16 = {**tools, **tool_versions("onnxruntime", "onnxruntime-gpu")}

        def build_fp16(tmp: Path, manifest: dict) -> None:
            model = onnx.load(str(parent.path))
            big = _weights_bytes(model) > EXTERNAL_DATA_BYTES
            save_onnx(convert_to_fp16(model, desc.fp16_keep_fp32_ops, big=big), tmp / MODEL_FILE)
            manifest["info"]["parameters"] = carry_parameter_map(parent.manifest, tmp / MODEL_FILE)
            manifest["info"]["kept_fp32_ops"] = sorted(set(KEEP_FP32_OPS) | set(desc.fp16_keep_fp32_ops))
            manifest["info"]["fp32_stage"] = fp32_stage_of(parent.manifest)

        stage = stage_name("fp16", gpu_optimize)
        key = _key(desc, model_hash, stage, "fp16", opset, parent.sha256, tools_fp16)
        art = _stage(desc, model_hash, cache_dir, stage, key, build_fp16, progress, (next(step), total))
        built = built or art.built
    return dataclasses.replace(art, built=built)
