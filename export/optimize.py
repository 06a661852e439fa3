"""onnxruntime's transformer optimizer for the GPU flavour of an artefact.

``optimize_for_gpu`` runs ``onnxruntime.transformers.optimizer.optimize_model`` with the descriptor's
``optimizer_type`` ("unet", "vae", "clip") and ``use_gpu=True``. Its fusions (MultiHeadAttention, GroupNorm
in NHWC, BiasSplitGelu, NhwcConv) are CUDA-EP kernels: the result runs on the CUDA EP only, which is why the
CPU flavour never uses it (it also gave no CPU speed-up, see /work/shared/GPU.md).

Known problem, guarded: with numpy >= 2.4, onnxruntime <= 1.32's ``FusionAttentionUnet.get_num_heads`` calls
``int()`` on a 1-element array and raises ``TypeError``. We then retry with attention fusion disabled (the
other fusions still apply) and log a warning; the manifest records which fusions ran.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _options(model_type: str, attention: bool):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    options.enable_attention = attention
    return options


def optimize_for_gpu(model_path: str, model_type: str):
    """Return the optimised ``OnnxModel`` (call ``.save_model_to_file``) and a dict of what was applied."""
    from onnxruntime.transformers.optimizer import optimize_model

    def run(attention: bool):
        return optimize_model(
            str(model_path), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
            optimization_options=_options(model_type, attention), use_gpu=True,
        )

    try:
        return run(True), {"model_type": model_type, "attention_fusion": True}
    except TypeError as exc:  # numpy >= 2.4 in fusion_attention_unet, see the module docstring
        log.warning("onnxruntime attention fusion failed (%s); retrying without it", exc)
        return run(False), {"model_type": model_type, "attention_fusion": False, "attention_error": str(exc)}
