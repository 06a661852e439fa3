"""The OpenVINO backend (CPU): our own exported ONNX components, converted once to OpenVINO IR.

Per component:

1. the fp32 ONNX artefact (export.onnx, the same one onnxruntime runs);
2. an OpenVINO IR artefact beside it (``model.xml`` + ``model.bin``), converted once and cached under the same
   manifest rules (key: the ONNX graph's sha256 and the openvino version; any mismatch rebuilds it): fp32
   weights (``openvino-ir``) for f32 inference, fp16-compressed weights (``openvino-ir-fp16``) for bf16
   inference -- the compiled model keeps the IR's constants mapped beside its own bf16 copy, so fp16 weights
   halve that mapped share of its resident memory (docs/DECISIONS.md), and after each compile the mapped
   pages are dropped (:func:`drop_mapped_pages`). The IR is memory-mapped when read, so a load from cache is
   a read of the graph and a compile, not a parse of the ONNX protobuf;
3. one compiled model per set of input shapes (``Model.reshape`` to static shapes, then ``compile_model``),
   kept in a small LRU (:data:`MAX_COMPILED` per component): static shapes let the CPU plugin pick its
   kernels and memory plan once.

LoRA (:meth:`OpenVinoBackend.set_patch`, as onnxruntime does it): the IR is never re-made for a LoRA. OpenVINO's
ONNX frontend keeps each initializer's name as the tensor name of its ``Constant`` (also through
``save_model``'s fp16 compression, where the Constant is fp16 and a Convert follows it), and the ONNX export's
manifest maps each source parameter to its initializer (export.onnx). A patch becomes new values for the
touched constants -- ``apply_delta`` over the base weights read from the fp32 ONNX artefact
(export.onnx.SourceWeights: the torch weights are released once exported), transposed as the graph holds them
and cast to the constant's element type (fp16 in the bf16 IR, as the unpatched compile reads it) --
swapped into the ov.Model read for the compile (:func:`patch_constants`), before ``compile_model``. Compiled
models are cached per (LoRA patch key of the component's source, input shapes): at most :data:`MAX_SETS`
patch keys per component, and the :data:`MAX_COMPILED` bound holds over all of a component's compiled models
(each holds its own copy of the weights), so switching back to a recent set is a lookup, and a request without
LoRA after one with it runs the never-patched compiled model (cached, or compiled again from the unchanged IR).

Inference precision is the plugin's ``INFERENCE_PRECISION_HINT``: ``bf16`` where the CPU has native bf16
(AVX512-BF16 or AMX: OpenVINO lists ``BF16`` in its optimization capabilities), ``f32`` otherwise. The
engine's ``precision`` picks it (``EngineConfig`` resolves an unset precision to bf16 for this backend on
such a CPU, see :func:`engine.config.default_precision`); bf16 asked on a CPU without it falls back to f32
with a warning. The choice is logged and shown as the backend label (``openvino bf16``) in the infotext.

Feeds are numpy arrays or CPU torch tensors, cast to the descriptor's dtypes; outputs are numpy float32.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from typing import Any, Mapping

from engine.backends.base import Array, ComponentsMixin
from engine.config import EngineConfig, Precision
from core.cpu import cpu_threads
from core import mapped
from core.mapped import drop_mapped_pages, dropping_mapped_pages  # noqa: F401 (drop_mapped_pages re-exported)
from core.errors import BackendUnavailable, InvalidRequest
from engine.backends.weights import export_siblings_and_release
from export.manifest import artefact_dir, build_artefact, valid_artefact
from export.onnx import cached_weights_fingerprint, export_component

log = logging.getLogger(__name__)

MAX_COMPILED = 3  # compiled models (static shape sets) kept per component, least recently used dropped
MAX_SETS = 2  # LoRA sets (patch keys, unpatched included) with compiled models kept per component (LRU)
IR_STAGE = "openvino-ir"  # fp32 weights: the f32 inference precision (parity with torch fp32)
IR_FP16_STAGE = "openvino-ir-fp16"  # fp16-compressed weights: the bf16 inference precision
IR_FORMAT = 1
ATTENTION_CHUNKS = 0  # full attention in the ONNX export: the CPU plugin fuses it (OpenVinoBackend.artefact)
IR_XML, IR_BIN = "model.xml", "model.bin"


def import_openvino():
    """The ``openvino`` module, or BackendUnavailable saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(
            "the openvino backend needs the openvino package: pip install 'sdengine[openvino]'"
        ) from exc
    return openvino


@functools.cache
def _core():
    return import_openvino().Core()


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's CPU optimization capabilities (e.g. FP32, BF16, INT8)."""
    return tuple(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def inference_precision(precision: Precision, capabilities: tuple[str, ...]) -> str:
    """The CPU plugin's inference precision hint for the engine precision on a CPU with ``capabilities``."""
    if precision == Precision.FP16:
        raise InvalidRequest("precision", "fp16 is not supported by the openvino backend on CPU",
                             "fp32, bf16, int8")
    if precision in (Precision.BF16, Precision.INT8):  # int8: the UNet's INT8 IR, the rest as bf16
        if "BF16" in capabilities:
            return "bf16"
        log.warning("precision bf16: this CPU has no native bf16 (AVX512-BF16/AMX); openvino runs f32")
    return "f32"


def ir_stage(inference_precision: str) -> str:
    """The IR artefact a compile in ``inference_precision`` reads: bf16 compiles read fp16-compressed weights
    (half the bytes mapped beside the compiled model; fp32 -> fp16 -> bf16 rounds as fp32 -> bf16 does but
    for ties, and SD weights lie well inside fp16's range), f32 compiles the fp32 weights."""
    return IR_FP16_STAGE if inference_precision == "bf16" else IR_STAGE


def ir_key(onnx_artefact, version: str, stage: str = IR_STAGE) -> dict:
    return {"format": IR_FORMAT, "stage": stage, "component": onnx_artefact.component,
            "parent_sha256": onnx_artefact.sha256, "openvino": version, "compress_to_fp16": stage == IR_FP16_STAGE}


def convert_to_ir(onnx_artefact, model_hash: str, cache_dir, stage: str = IR_STAGE) -> Any:
    """The cached IR artefact directory of an ONNX artefact (converted when missing or stale)."""
    ov = import_openvino()
    directory = artefact_dir(cache_dir, model_hash, onnx_artefact.component, stage)
    key = ir_key(onnx_artefact, ov.__version__, stage)
    if valid_artefact(directory, key) is not None:
        log.info("%s: %s up to date (%s)", onnx_artefact.component, stage, directory)
        return directory
    log.info("%s: converting %s to OpenVINO IR (%s)", onnx_artefact.component, onnx_artefact.path, stage)
    with build_artefact(directory, key, hashed=(IR_XML,)) as (tmp, _manifest):
        # the ONNX frontend through Core.read_model (openvino.convert_model does the same, seconds slower)
        # the frontend maps the ONNX graph's external data: the pages it reads need not stay resident beside the
        # (fp16-compressed) copy save_model makes (core.mapped)
        with mapped.dropping_mapped_pages(onnx_artefact.path.with_name(onnx_artefact.path.name + ".data")):
            model = _core().read_model(str(onnx_artefact.path))
            ov.save_model(model, str(tmp / IR_XML), compress_to_fp16=stage == IR_FP16_STAGE)
            del model
    return directory


def patch_constants(model, tensors, where: str) -> int:
    """Replace, in the ov.Model ``model``, the Constant whose output tensor is named after each initializer of
    ``tensors`` (``[(ONNX initializer name, numpy value)]``, engine.networks.lora.patched_tensors) by a new
    Constant holding the value cast to the old one's element type (fp16 in a compressed IR: the value is cast
    from fp32 as ``save_model``'s compression casts the unpatched weight; a patched value beyond fp16's range
    stays fp32 before the Convert). Returns the number of constants replaced; raises BackendUnavailable naming
    ``where`` when a tensor is not a constant of the IR or has another shape (nothing is replaced then)."""
    import numpy as np

    ov = import_openvino()
    wanted = {name for name, _ in tensors}
    found = {}
    for node in model.get_ops():
        if node.get_type_name() == "Constant":
            for name in node.output(0).get_names() & wanted:
                found[name] = node
    plan = []
    for name, value in tensors:
        node = found.get(name)
        if node is None or tuple(node.get_output_shape(0)) != tuple(value.shape):
            what = "is not a constant of the IR" if node is None else \
                f"is {tuple(node.get_output_shape(0))} in the IR, the patch gives {tuple(value.shape)}"
            raise BackendUnavailable(f"{where}: the LoRA weight {name} {what}; openvino cannot apply this LoRA")
        dtype = node.get_element_type().to_dtype()
        if dtype == np.float16 and np.abs(value).max(initial=0.0) > np.finfo(np.float16).max:
            dtype = np.float32  # the Convert after it takes f32 as well
        plan.append((node, np.ascontiguousarray(value, dtype=dtype)))
    for node, value in plan:
        new = ov.op.Constant(value)  # a copy: the compiled model may keep reading its constants
        new.set_friendly_name(node.get_friendly_name())
        node.output(0).replace(new.output(0))
    return len(plan)


def _cache_key(component: str, patch_key: str):
    """The compiled-model cache of a component: its name, with the LoRA patch key if any."""
    return (component, patch_key) if patch_key else component


class OpenVinoBackend(ComponentsMixin):
    """``run(component, feeds)`` over OpenVINO compiled models; see the module docstring."""

    def __init__(self, config: EngineConfig, components: Mapping[str, Any], model_hash: str, *,
                 progress=None, max_compiled: int = MAX_COMPILED, max_sets: int = MAX_SETS,
                 capabilities: tuple[str, ...] | None = None, release_weights: bool = False):
        ov = import_openvino()
        if config.device != "cpu":
            raise InvalidRequest("device", f"{config.device!r} is not supported by the openvino backend", "cpu")
        self._init_components(components)
        self.config = config
        self.model_hash = model_hash
        self.progress = progress
        self.max_compiled = max(1, int(max_compiled))
        self.max_sets = max(1, int(max_sets))
        self.release_weights = release_weights  # see engine.backends.weights
        caps = cpu_capabilities() if capabilities is None else tuple(capabilities)
        self.inference_precision = inference_precision(config.precision, caps)
        self.int8 = config.precision == Precision.INT8
        # precision int8: () -> the UNet's calibration feeds (Engine.calibration_feeds), needed once per model
        self.calibration = None
        self.version = ov.__version__
        log.info("openvino %s on CPU, inference precision %s (CPU capabilities: %s)", self.version,
                 self.inference_precision, ", ".join(caps))
        self._ir: dict[str, Any] = {}  # component -> IR path
        self._onnx: dict[str, Any] = {}  # component -> the ONNX artefact its IR was converted from
        # component (unpatched) or (component, LoRA patch key) -> {shapes: (compiled, infer request)}
        self._compiled: dict[Any, OrderedDict] = {}
        self._recent: dict[str, OrderedDict] = {}  # component -> {(patch key, shapes): None}, least recent first
        self._patch = None  # engine.networks.lora.WeightPatch
        self._bases: dict = {}  # ONNX artefact directory -> export.onnx.SourceWeights (LoRA base weights)
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        """What the infotext's and the info dict's backend field say: ``openvino bf16`` / ``openvino f32``."""
        return f"openvino {self.inference_precision}" + (" int8 unet" if self.int8 else "")

    # -- models -------------------------------------------------------------------------------------------
    def artefact(self, component: str):
        """The fp32 ONNX artefact of ``component`` with full attention (exported or found through its manifest):
        the CPU plugin fuses MatMul -> Softmax -> MatMul into its own attention kernel, which computes in blocks
        and never holds the T x T scores (measured: tiny-sd1 UNet at 1024^2 bf16, peak +137 MiB full vs +269
        MiB in 16 query chunks; 64^2: 1.2 vs 2.2 ms per call), so the query chunks ONNX Runtime needs only cost
        here (:data:`ATTENTION_CHUNKS`)."""
        return export_component(component, self._components, self.model_hash, self.config.artefacts_dir,
                                precision="fp32", progress=self.progress, attention_chunks=ATTENTION_CHUNKS)

    def cached_fingerprint(self, component: str) -> str | None:
        """The weights fingerprint of ``component``'s cached fp32 ONNX artefact, found without the modules'
        weights (engine.backends.weights.adopt_cached; the IR is converted from the ONNX graph, no weights
        needed); None when something must be exported."""
        return cached_weights_fingerprint(component, self.model_hash, self.config.artefacts_dir,
                                          attention_chunks=ATTENTION_CHUNKS)

    def ir_path(self, component: str, artefact=None):
        from engine.backends import int8

        if self.int8 and component in int8.INT8_COMPONENTS:
            artefact = artefact or self.artefact(component)
            fp32 = convert_to_ir(artefact, self.model_hash, self.config.artefacts_dir, IR_STAGE) / IR_XML
            return int8.int8_ir(artefact, fp32, self.model_hash, self.config.artefacts_dir, self.calibration,
                                import_openvino())
        return convert_to_ir(artefact or self.artefact(component), self.model_hash, self.config.artefacts_dir,
                             ir_stage(self.inference_precision)) / IR_XML

    def model(self, component: str):
        """The component's ov.Model (dynamic shapes), read from its IR: memory-mapped weights, read per compile
        and dropped after it, so only the compiled models hold weights."""
        if component not in self._ir:
            if not self.has(component):
                self.descriptor(component)  # raises InvalidRequest naming what the model has
            art = self.artefact(component)
            if self.release_weights:  # before the IR conversion and the compile: the ONNX artefact is all they read
                export_siblings_and_release(self, component)
            path = self.ir_path(component, art)
            self._ir[component], self._onnx[component] = path, art
        return _core().read_model(str(self._ir[component]))

    def set_patch(self, patch) -> None:
        """Use the weights of ``patch`` (engine.networks.lora.WeightPatch; ``EMPTY`` for none) from the next run
        on: the compiled models of its set are found in the cache or compiled from the patched IR."""
        self._patch = patch

    def patch_key(self, component: str) -> str:
        """The current patch's key for ``component``'s source module ("" when it leaves it unpatched)."""
        from export.descriptors import source_of

        return self._patch.key(source_of(component)) if self._patch is not None else ""

    def patched_constants(self, component: str) -> list[tuple[str, Any]]:
        """``[(initializer name, fp32 numpy value)]`` of the current patch for ``component``: merged over the base
        weights read from the fp32 ONNX artefact its IR was converted from (export.onnx.SourceWeights), not the
        torch module's, which may be released (and is never exported again); the tensors onnxruntime overrides."""
        from engine.networks.lora import patched_tensors
        from export.descriptors import source_of
        from export.onnx import SourceWeights

        if component not in self._onnx:
            self.model(component)
        art = self._onnx[component]
        base = self._bases.get(art.directory)
        if base is None:
            base = self._bases[art.directory] = SourceWeights(art)
        if base.graph_mapping is None:
            raise BackendUnavailable(f"{component}: this ONNX artefact has no parameter map; re-export it")
        return patched_tensors(self._patch, source_of(component), base, f"{component} ({art.directory.name})")

    def compile_properties(self) -> dict:
        return {
            "INFERENCE_PRECISION_HINT": self.inference_precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(cpu_threads(self.config.num_threads)),
        }

    def compiled(self, component: str, shapes: Mapping[str, tuple]) -> Any:
        """The compiled model of ``component`` for these static input shapes and the current LoRA patch (LRU of
        :attr:`max_compiled` per component, over at most :attr:`max_sets` patch keys)."""
        shape_key = tuple(sorted(shapes.items()))
        with self._lock:
            patch_key = self.patch_key(component)
            cache = self._compiled.setdefault(_cache_key(component, patch_key), OrderedDict())
            entry = cache.get(shape_key)
            if entry is None:
                model = self.model(component)
                if patch_key:
                    count = patch_constants(model, self.patched_constants(component), component)
                    log.info("%s: openvino model with LoRA patch %s (%d constants replaced)", component,
                             patch_key, count)
                model.reshape({name: list(shape) for name, shape in shapes.items()})
                log.info("%s: compiling for %s (%s)", component, dict(shapes), self.inference_precision)
                # the compiled model runs its own copy of the weights: the IR's mapped pages need not stay
                # resident, neither while it compiles nor after
                with dropping_mapped_pages(self._ir[component].with_suffix(".bin")):
                    compiled = _core().compile_model(model, "CPU", self.compile_properties())
                    del model
                entry = cache[shape_key] = (compiled, compiled.create_infer_request())
            cache.move_to_end(shape_key)
            recent = self._recent.setdefault(component, OrderedDict())
            recent[(patch_key, shape_key)] = None
            recent.move_to_end((patch_key, shape_key))
            self._evict(component)
            return entry

    def _evict(self, component: str) -> None:
        """Drop ``component``'s compiled models of all but the :attr:`max_sets` most recent patch keys, then the
        least recently used ones beyond :attr:`max_compiled`."""
        recent = self._recent[component]
        sets: list[str] = []
        for patch_key, _ in reversed(recent):
            if patch_key not in sets:
                sets.append(patch_key)
        stale = [k for k in recent if k[0] not in sets[:self.max_sets]]
        while len(recent) - len(stale) > self.max_compiled:
            stale.append(next(k for k in recent if k not in stale))
        for patch_key, shape_key in stale:
            del recent[(patch_key, shape_key)]
            cache = self._compiled[_cache_key(component, patch_key)]
            del cache[shape_key]
            if patch_key and not cache:
                del self._compiled[_cache_key(component, patch_key)]

    # -- running ------------------------------------------------------------------------------------------
    def run(self, component: str, feeds: Mapping[str, Array]) -> dict[str, Array]:
        import numpy as np

        desc = self.descriptor(component)
        self._check_feeds(desc, feeds)
        arrays = {}
        for spec in desc.inputs:
            value = feeds[spec.name]
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            arrays[spec.name] = np.ascontiguousarray(value, dtype=spec.dtype)
        compiled, request = self.compiled(component, {n: a.shape for n, a in arrays.items()})
        with self._lock:  # one infer request per compiled model
            # the feeds are our own contiguous arrays of the right dtypes: the request reads them in place, and
            # its output tensors are copied out here, before the next infer reuses them
            result = request.infer(arrays, share_inputs=True, share_outputs=True)
            out = {}
            for name in desc.output_names:
                out[name] = np.array(result[compiled.output(name)], dtype=np.float32, copy=True)
        return out
