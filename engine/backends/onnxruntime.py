"""The onnxruntime backend: one InferenceSession per component, created lazily, exported on demand.

Execution providers come from :class:`EngineConfig`: ``providers`` if given, else the CPU EP for
``device="cpu"`` and CUDA EP (+ CPU fallback) for ``device="cuda[:N]"``. A requested provider that this
onnxruntime build lacks raises :class:`BackendUnavailable` naming it and listing the available ones.

- CPU EP: intra-op threads = ``config.num_threads``, else ``$OMP_NUM_THREADS``, else the core count
  (:func:`core.cpu.cpu_threads`), ``ORT_ENABLE_ALL``; numpy in/out.
- CUDA EP: IO binding over torch CUDA tensors. Per (component, input shapes) the backend keeps static
  input and output tensors and one binding: feeds are copied into the static inputs, the outputs are
  preallocated from the descriptor's output shapes, and ORT runs on torch's current stream
  (``user_compute_stream``). With ``cuda_graph=True`` the CUDA EP captures one CUDA graph per shape
  (``enable_cuda_graph`` + the ``gpu_graph_id`` run option), which the static buffers make legal; ORT then
  keeps its own stream (capture is illegal on torch's legacy default stream) and torch's stream is
  synchronised before each run, and ORT synchronises its stream at the end of every run. Without CUDA
  graphs ORT runs on torch's stream and skips that end-of-run synchronisation
  (``disable_synchronize_execution_providers``): the copies in and out are ordered on the same stream, so
  the sampler loop has no host sync per model call. A component whose graph cannot be captured (nodes that
  the CUDA EP leaves to the CPU) gets a session without CUDA graph, with a warning.
  Outputs are returned as clones, so they stay valid after the next run. The CUDA libraries of
  onnxruntime-gpu come from the CUDA torch of the process (``onnxruntime.preload_dlls``, once).
- TensorRT EP: fp16 flag, engine and timing caches under the artefact directory, and min/opt/max profile
  shapes from the descriptor and a ShapeConfig.

LoRA (:meth:`OnnxRuntimeBackend.set_patch`): the exported graphs keep their weights as external initializers
and the export manifest maps each source parameter to its initializer (export.onnx). A patch becomes new
values for the touched initializers, merged on the host once (``apply_delta`` over the base weights read
from the artefact's external data, export.onnx.SourceWeights, transposed / cast as the graph holds them: the
torch weights are released once exported), handed to a new session through
``SessionOptions.add_external_initializers``. Sessions are cached per (component, patch of its source) in a
bounded LRU (``max_sessions`` per component): switching back to a recent set reuses its session, and no
ONNX export ever happens because of a LoRA.

The CUDA and TensorRT EP paths cannot run in this project's CI (no GPU, CPU onnxruntime): what is tested
here is the provider selection and option dicts, and the IO-binding path itself over CPU torch tensors on
the CPU EP (``io_binding=True``), which is the same code with device type "cpu".
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

from engine.backends.base import Array, ComponentsMixin
from engine.config import EngineConfig, Precision
from core.cpu import cpu_threads
from core.errors import BackendUnavailable, InvalidRequest
from engine.backends.weights import export_siblings_and_release
from engine.networks.lora import patched_tensors
from export.descriptors import ShapeConfig, source_of
from export.onnx import SourceWeights, cached_weights_fingerprint, export_component

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
MAX_BOUND_SHAPES = 8  # static buffer sets kept per component (LRU)
MAX_SESSIONS = 2  # sessions kept per component, one per LoRA set (LRU; each holds its patched weights)

_NP_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(double)": "float64"}


def device_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def requested_providers(config: EngineConfig) -> list[str]:
    if config.providers:
        return list(config.providers)
    return [CPU] if config.device == "cpu" else [CUDA, CPU]


def check_providers(requested: list[str], available: list[str]) -> None:
    """Raise BackendUnavailable naming the first requested provider this onnxruntime lacks."""
    for name in requested:
        if name not in available:
            hint = " (install onnxruntime-gpu: pip install 'sdengine[gpu]')" if name != CPU else ""
            raise BackendUnavailable(
                f"onnxruntime execution provider {name!r} is not available{hint}; "
                f"available: {', '.join(available)}"
            )


def profile_shapes_option(profile: Mapping[str, tuple]) -> tuple[str, str, str]:
    """TensorRT EP ``trt_profile_{min,opt,max}_shapes`` strings: ``name:1x4x64x64,name2:...``."""
    return tuple(
        ",".join(f"{name}:{'x'.join(str(d) for d in shapes[i])}" for name, shapes in profile.items())
        for i in range(3)
    )


def provider_options(name: str, config: EngineConfig, *, cuda_graph: bool = False, cache_dir: Path | None = None,
                     profile: Mapping[str, tuple] | None = None, stream: int | None = None) -> dict:
    """The option dict of one execution provider (empty for the CPU EP)."""
    if name == CUDA:
        opts = {"device_id": str(device_index(config.device)), "cudnn_conv_algo_search": "EXHAUSTIVE",
                "arena_extend_strategy": "kSameAsRequested"}
        if cuda_graph:
            opts["enable_cuda_graph"] = "1"
        if stream is not None:
            opts["has_user_compute_stream"] = "1"
            opts["user_compute_stream"] = str(stream)
        return opts
    if name == TENSORRT:
        opts = {"device_id": str(device_index(config.device)),
                "trt_fp16_enable": "1" if config.precision == Precision.FP16 else "0",
                "trt_builder_optimization_level": "3"}
        if cache_dir is not None:
            opts.update({
                "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache_dir),
                "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(cache_dir),
            })
        if profile:
            lo, opt, hi = profile_shapes_option(profile)
            opts.update({"trt_profile_min_shapes": lo, "trt_profile_opt_shapes": opt, "trt_profile_max_shapes": hi})
        return opts
    return {}


def session_options(config: EngineConfig):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = cpu_threads(config.num_threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if config.device == "cpu":
        # No memory pattern on CPU: with it, the second run of a shape allocates the recorded pattern as one new
        # block while the arena keeps the first run's chunks (SD1.5 VAE decoder at 256^2: resident 594 -> 818
        # MiB on the second run, 594 without the pattern, same speed). The arena alone reuses its chunks.
        so.enable_mem_pattern = False
    return so


class _Bound:
    """Static inputs, preallocated outputs and an IO binding for one component at one set of shapes."""

    def __init__(self, session, desc, shapes: Mapping[str, tuple], device: str, graph_id: int | None,
                 sync: bool = True):
        import torch

        kind = "cpu" if device == "cpu" else "cuda"
        index = 0 if kind == "cpu" else device_index(device)
        types = {i.name: _NP_DTYPES[i.type] for i in session.get_inputs()}
        types.update({o.name: _NP_DTYPES[o.type] for o in session.get_outputs()})
        env = desc.env_from_inputs(shapes)
        out_shapes = desc.output_shapes(env)
        self.binding = session.io_binding()
        self.inputs = {n: torch.empty(shapes[n], dtype=getattr(torch, types[n]), device=device) for n in shapes}
        self.outputs = {n: torch.empty(s, dtype=getattr(torch, types[n]), device=device)
                        for n, s in out_shapes.items()}
        for group, bind in ((self.inputs, self.binding.bind_input), (self.outputs, self.binding.bind_output)):
            for name, t in group.items():
                bind(name, kind, index, _np(types[name]), tuple(t.shape), t.data_ptr())
        self.run_options = run_options(graph_id, sync=sync or kind == "cpu")


def run_options(graph_id: int | None, sync: bool):
    """RunOptions of one bound shape: its CUDA graph id; ``sync=False`` leaves the end-of-run stream
    synchronisation out (ORT then runs on torch's stream, which orders everything after it)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    if graph_id is not None:
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
    if not sync:
        options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return options


def _bound_key(component: str, patch_key: str):
    """The IO-binding cache of a component's session: the component's name, with the LoRA patch key if any."""
    return (component, patch_key) if patch_key else component


def _np(name: str):
    import numpy as np

    return getattr(np, name)


class OnnxRuntimeBackend(ComponentsMixin):
    def __init__(self, config: EngineConfig, components: Mapping[str, Any], model_hash: str, *,
                 progress=None, cuda_graph: bool = False, io_binding: bool | None = None,
                 gpu_optimize: bool | None = None, shape_config=None, available: list[str] | None = None,
                 max_sessions: int = MAX_SESSIONS, release_weights: bool = False):
        import onnxruntime as ort

        self._init_components(components)
        self.config = config
        self.model_hash = model_hash
        self.progress = progress
        self.providers = requested_providers(config)
        check_providers(self.providers, available if available is not None else ort.get_available_providers())
        if config.precision == Precision.BF16:
            raise InvalidRequest("precision", "bf16 is not supported by the onnxruntime backend", "fp32, fp16")
        self.use_trt_ep = TENSORRT in self.providers
        # the TensorRT EP builds fp16 itself from the fp32 graph (trt_fp16_enable)
        self.onnx_precision = "fp32" if self.use_trt_ep else config.precision.value
        self.gpu_optimize = (self.providers[0] == CUDA) if gpu_optimize is None else gpu_optimize
        self.cuda_graph = cuda_graph
        self.io_binding = (config.device != "cpu") if io_binding is None else io_binding
        self.shape_config = shape_config
        self.release_weights = release_weights  # see engine.backends.weights
        self._sessions: OrderedDict = OrderedDict()  # (component, patch key) -> (session, kept values)
        self.max_sessions = max(1, max_sessions)
        self._patch = None  # engine.networks.lora.WeightPatch
        self._bases: dict = {}  # artefact directory -> export.onnx.SourceWeights (LoRA base weights)
        self._bound: dict[tuple, OrderedDict] = {}
        self._graph_ids = 0
        self._no_graph: set[str] = set()  # components whose session could not capture a CUDA graph
        self._lock = threading.Lock()  # one export / session creation at a time

    # -- sessions ---------------------------------------------------------------------------------------
    def artefact(self, component: str):
        """Export (or find in the manifest cache) the ONNX artefact of ``component``."""
        return export_component(component, self._components, self.model_hash, self.config.artefacts_dir,
                                precision=self.onnx_precision, gpu_optimize=self.gpu_optimize,
                                progress=self.progress)

    def cached_fingerprint(self, component: str) -> str | None:
        """The weights fingerprint of ``component``'s cached artefacts, found without the modules' weights
        (engine.backends.weights.adopt_cached); None when something must be exported."""
        return cached_weights_fingerprint(component, self.model_hash, self.config.artefacts_dir,
                                          precision=self.onnx_precision, gpu_optimize=self.gpu_optimize)

    def providers_for(self, component: str, artefact_dir: Path | None = None) -> list[tuple[str, dict]]:
        stream = None
        # CUDA graphs cannot be captured on torch's legacy default stream: ORT keeps its own stream then
        if self.io_binding and self.config.device != "cpu" and not self.cuda_graph:
            import torch

            stream = torch.cuda.current_stream(self.config.device).cuda_stream
        profile = None
        if self.use_trt_ep:
            profile = self.descriptor(component).profile(self.shape_config or ShapeConfig())
        cache = artefact_dir / "ort-tensorrt" if artefact_dir is not None else None
        return [(p, provider_options(p, self.config, cuda_graph=self.cuda_graph, cache_dir=cache,
                                     profile=profile, stream=stream)) for p in self.providers]

    def set_patch(self, patch) -> None:
        """Use the weights of ``patch`` (engine.networks.lora.WeightPatch) from the next run on."""
        self._patch = patch

    def _patch_key(self, component: str) -> str:
        return self._patch.key(source_of(component)) if self._patch is not None else ""

    def session(self, component: str):
        key = (component, self._patch_key(component))
        entry = self._sessions.get(key)
        if entry is None:
            with self._lock:
                entry = self._sessions.get(key)
                if entry is None:
                    entry = self._create_session(component, key[1])
                    self._sessions[key] = entry
                    same = [k for k in self._sessions if k[0] == component]
                    while len(same) > self.max_sessions:
                        old = same.pop(0)
                        del self._sessions[old]
                        self._bound.pop(_bound_key(*old), None)
        self._sessions.move_to_end(key)
        return entry[0]

    def patched_initializers(self, component: str, art) -> list[tuple[str, Any]]:
        """``[(initializer name, numpy value)]`` of the current patch for ``component``'s graph ``art``: merged over
        the base weights read from the artefact (export.onnx.SourceWeights), not the torch module's, which
        may be released."""
        base = self._bases.get(art.directory)
        if base is None:
            base = self._bases[art.directory] = SourceWeights(art)
        if base.graph_mapping is None:
            raise BackendUnavailable(f"{component}: this ONNX artefact has no parameter map; re-export it")
        return patched_tensors(self._patch, source_of(component), base, f"{component} ({art.directory.name})")

    def _create_session(self, component: str, patch_key: str = ""):
        import onnxruntime as ort

        if not self.has(component):
            self.descriptor(component)  # raises InvalidRequest naming what the model has
        art = self.artefact(component)
        if self.release_weights:
            export_siblings_and_release(self, component)
        providers = self.providers_for(component, art.directory)
        if self.use_trt_ep:
            (art.directory / "ort-tensorrt").mkdir(exist_ok=True)
        tensors, kept = [], []
        if patch_key:
            tensors = self.patched_initializers(component, art)
            names = [n for n, _ in tensors]
            kept = [ort.OrtValue.ortvalue_from_numpy(v) for _, v in tensors]  # must outlive the session
            kept.append(tensors)
            log.info("%s: onnxruntime session with LoRA patch %s (%d initializers replaced)", component,
                     patch_key, len(names))
        log.info("%s: onnxruntime session on %s", component, [p for p, _ in providers])
        if self.config.device != "cpu":
            _preload_cuda_libraries()

        def create(providers):
            options = session_options(self.config)
            if patch_key:
                options.add_external_initializers([n for n, _ in tensors], kept[:len(tensors)])
            return ort.InferenceSession(
                str(art.path), sess_options=options,
                providers=[p for p, _ in providers], provider_options=[o for _, o in providers],
            )

        try:
            return create(providers), kept
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, RuntimeException)
            if not self.cuda_graph or "graph" not in str(exc).lower():
                raise
            log.warning("%s: no CUDA graph (%s); running it without", component, str(exc)[:300])
            self._no_graph.add(component)
            return create([(p, {k: v for k, v in o.items() if k != "enable_cuda_graph"}) for p, o in providers]), kept

    # -- running ----------------------------------------------------------------------------------------
    def run(self, component: str, feeds: Mapping[str, Array]) -> dict[str, Array]:
        desc = self.descriptor(component)
        self._check_feeds(desc, feeds)
        if self.io_binding:
            return self._run_bound(component, desc, feeds)
        import numpy as np

        session = self.session(component)
        arrays = {}
        for info in session.get_inputs():
            value = feeds[info.name]
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            arrays[info.name] = np.asarray(value, dtype=_NP_DTYPES[info.type])
        names = desc.output_names
        outputs = session.run(names, arrays)
        return {n: o.astype(np.float32, copy=False) for n, o in zip(names, outputs)}

    def _run_bound(self, component: str, desc, feeds: Mapping[str, Array]) -> dict[str, Array]:
        import torch

        session = self.session(component)
        shapes = {n: tuple(feeds[n].shape) for n in desc.input_names}
        key = tuple(sorted(shapes.items()))
        cache = self._bound.setdefault(_bound_key(component, self._patch_key(component)), OrderedDict())
        bound = cache.get(key)
        if bound is None:
            graph_id = None
            if self.cuda_graph and component not in self._no_graph:
                graph_id = self._graph_ids
                self._graph_ids += 1
            # ORT on torch's stream (no CUDA graph mode) needs no end-of-run sync; on its own stream it does
            bound = cache[key] = _Bound(session, desc, shapes, self.config.device, graph_id, sync=self.cuda_graph)
            while len(cache) > MAX_BOUND_SHAPES and not self.cuda_graph:
                cache.popitem(last=False)
        cache.move_to_end(key)
        with torch.no_grad():
            for name, static in bound.inputs.items():
                static.copy_(torch.as_tensor(feeds[name]))
        if self.cuda_graph and self.config.device != "cpu":
            torch.cuda.current_stream(self.config.device).synchronize()  # ORT runs on its own stream
        session.run_with_iobinding(bound.binding, bound.run_options)
        out = {n: t.float().clone() for n, t in bound.outputs.items()}
        if self.config.device == "cpu":
            return {n: t.numpy() for n, t in out.items()}
        return out


_preloaded = False


def _preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries onnxruntime-gpu needs from the CUDA torch of this process, once."""
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    try:
        import torch  # noqa: F401  (its CUDA libraries first: then onnxruntime finds them loaded)
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    except Exception as exc:  # a missing library shows up, named, when the session is created
        log.info("onnxruntime.preload_dlls: %s", exc)
