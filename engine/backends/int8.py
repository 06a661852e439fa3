"""INT8 UNet on OpenVINO (``precision="int8"``): NNCF's hybrid quantization, calibrated on the model's own data.

The scheme optimum-intel calls *hybrid* (its ``quantization_config`` for diffusion pipelines), done here on our own
IR so that the rest of the backend (static-shape compiles, LoRA-free caching, the manifest) is unchanged:

1. the MatMuls that carry weights (attention projections, feed-forward, time embedding) get INT8 weights
   (``nncf.compress_weights``, symmetric per output channel), their activations stay in the inference
   precision: attention's activations are where INT8 loses the most quality;
2. the rest -- the convolutions, weights *and* activations -- is quantized post-training (``nncf.quantize``,
   model type TRANSFORMER, the weight-compressed MatMuls ignored and SmoothQuant off for MatMuls, as optimum-intel
   does), with activation ranges measured on **calibration feeds of this model**: the UNet inputs (latents,
   timesteps, text embeddings, CFG's negative rows included) that the exact path (bf16, or f32 without native
   bf16) produces on :data:`CALIBRATION_PROMPTS` (engine.pipeline: ``Engine.calibration_feeds``).

The text encoder and the VAE stay in the inference precision (their share of a request is small, and the VAE's
output is the image itself). The INT8 IR is an artefact like the others (``openvino-ir-int8``), keyed by the fp32
IR's ONNX sha, the openvino and nncf versions and the calibration workload: made once, then read from the cache.
INT8 runs fastest on CPUs with AVX512-VNNI or AMX-INT8; elsewhere it still runs (emulated), and more slowly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from core.errors import BackendUnavailable
from core.lazy import require
from export.manifest import artefact_dir, build_artefact, valid_artefact

log = logging.getLogger(__name__)

INT8_STAGE = "openvino-ir-int8"
INT8_FORMAT = 1
INT8_COMPONENTS = ("unet",)  # the components quantized; the others run the bf16/f32 IR
# the calibration workload: prompts of the kind the model is asked (objects, colours, places), CFG 7 with an
# empty negative prompt, CALIBRATION_STEPS of Euler a at the model's native size capped at CALIBRATION_SIZE_CAP
CALIBRATION_PROMPTS = (
    "a large red circle in the middle on a blue background",
    "two small green squares at the top left on a white background",
    "a photograph of an astronaut riding a horse",
    "a portrait of an old man with a beard, oil painting",
)
CALIBRATION_STEPS = 8
CALIBRATION_CFG = 7.0
CALIBRATION_SIZE_CAP = 256  # SD1.5's activations at 256^2 calibrate its 512^2 runs (the same layers and ranges)
CALIBRATION_SEED = 1234


def calibration_workload() -> dict:
    """What the calibration ran: part of the INT8 artefact's key (a change makes a new artefact)."""
    return {"prompts": list(CALIBRATION_PROMPTS), "steps": CALIBRATION_STEPS, "cfg": CALIBRATION_CFG,
            "max_size": CALIBRATION_SIZE_CAP, "seed": CALIBRATION_SEED, "sampler": "Euler a"}


def import_nncf():
    return require("nncf", "int8", "precision int8 (INT8 UNet on OpenVINO)")


def int8_key(onnx_artefact, ov_version: str, nncf_version: str) -> dict:
    return {"format": INT8_FORMAT, "stage": INT8_STAGE, "component": onnx_artefact.component,
            "parent_sha256": onnx_artefact.sha256, "openvino": ov_version, "nncf": nncf_version,
            "scheme": "hybrid: int8 weights of weighted MatMuls, int8 weights+activations elsewhere",
            "calibration": calibration_workload()}


def weighted_matmuls(model) -> list[str]:
    """Friendly names of the MatMuls whose second input is a (maybe converted) constant: the ones whose weights
    are compressed and whose activations are left alone."""
    names = []
    for node in model.get_ops():
        if node.get_type_name() != "MatMul":
            continue
        src = node.input_value(1).get_node()
        while src.get_type_name() in ("Convert", "Transpose", "Reshape") and src.get_input_size() > 0:
            src = src.input_value(0).get_node()
        if src.get_type_name() == "Constant":
            names.append(node.get_friendly_name())
    return names


def quantize_model(model, feeds: list[Mapping[str, Any]]):
    """The hybrid quantization of an ov.Model (fp32 weights) over calibration ``feeds`` (dicts of input name ->
    numpy array). Returns the quantized ov.Model."""
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    if not feeds:
        raise BackendUnavailable("int8: no calibration feeds")
    matmuls = weighted_matmuls(model)
    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM,
                                  ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
    return nncf.quantize(
        model, nncf.Dataset(list(feeds)), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds),
        ignored_scope=nncf.IgnoredScope(names=matmuls, validate=False),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))


def int8_ir(onnx_artefact, fp32_xml: Path, model_hash: str, cache_dir,
            calibration: Callable[[], Iterable[Mapping[str, Any]]] | None, ov) -> Path:
    """The cached INT8 IR of a component (named as its fp32 IR ``fp32_xml``), made from that IR and
    ``calibration()``'s feeds when missing or stale (BackendUnavailable when it must be made and no calibration
    is given); ``ov``: the openvino module (engine.backends.openvino, which imports this module)."""
    IR_XML = fp32_xml.name  # noqa: N806
    nncf = import_nncf()
    directory = artefact_dir(cache_dir, model_hash, onnx_artefact.component, INT8_STAGE)
    key = int8_key(onnx_artefact, ov.__version__, nncf.__version__)
    if valid_artefact(directory, key) is not None:
        return directory / IR_XML
    if calibration is None:
        raise BackendUnavailable(f"{onnx_artefact.component}: no INT8 IR in the cache and no calibration data to "
                                 "make one")
    feeds = list(calibration())
    log.info("%s: INT8 hybrid quantization (NNCF %s) on %d calibration feeds", onnx_artefact.component,
             nncf.__version__, len(feeds))
    with build_artefact(directory, key, hashed=(IR_XML,)) as (tmp, _manifest):
        model = quantize_model(ov.Core().read_model(str(fp32_xml)), feeds)
        ov.save_model(model, str(tmp / IR_XML), compress_to_fp16=False)
        del model
    return directory / IR_XML
