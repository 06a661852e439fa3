"""onnxruntime's transformer optimizer for the GPU flavour of an artefact.

``optimize_for_gpu`` runs ``onnxruntime.transformers.optimizer.optimize_model`` with the descriptor's
``optimizer_type`` ("unet", "vae", "clip") and ``use_gpu=True``. Its fusions (MultiHeadAttention, GroupNorm
in NHWC, BiasSplitGelu, NhwcConv) are CUDA-EP kernels: the result runs on the CUDA EP only, which is why the
CPU flavour never uses it (it also gave no CPU speed-up in a probe on this project's machine).

Known problem, guarded: with numpy >= 2.4, onnxruntime <= 1.32's ``FusionAttentionUnet.get_num_heads`` calls
``int()`` on a 1-element array and raises ``TypeError``. :func:`numpy24_fix` swaps in a corrected copy of that
one method for the duration of the optimisation (and restores it); should the fusion still raise
``TypeError``, we retry with attention fusion disabled (the other fusions still apply) and log a warning.
The manifest records which fusions ran.

On the CPU EP, attention fusion (Attention / MultiHeadAttention CPU kernels) with the CUDA-only fusions
disabled was tried on a quarter-width SD1.5 UNet: same output (relL2 9e-7), no reliable speed-up on this
shared 2-core machine (32x32: 1.43 vs 1.40 s; 64x64 inconclusive under load), so the CPU flavour does not
use the optimizer.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

log = logging.getLogger(__name__)


def _num_heads(self, reshape_q, is_torch2: bool = False) -> int:
    """FusionAttentionUnet.get_num_heads without ``int()`` on a 1-element array (a TypeError on numpy >= 2.4)."""
    import numpy as np

    if is_torch2:
        parent = self.model.get_parent(reshape_q, 1)
        if parent and parent.op_type == "Concat" and len(parent.input) == 4:
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.size == 1:
                return max(int(value.reshape(-1)[0]), 0)
    else:
        value = self.model.get_constant_value(reshape_q.input[1])
        if isinstance(value, np.ndarray) and list(value.shape) == [4]:
            return max(int(value[2]), 0)
    return 0


@contextmanager
def numpy24_fix():
    """Swap in :func:`_num_heads` for the duration of one optimisation, then restore onnxruntime's own."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts its folder on sys.path, imports the fusions)

    # the transformer tools import their modules both as "fusion_attention_unet" and under the package
    classes = {m.FusionAttentionUnet for name, m in list(sys.modules.items())
               if name.rsplit(".", 1)[-1] == "fusion_attention_unet" and hasattr(m, "FusionAttentionUnet")}
    originals = {cls: cls.__dict__["get_num_heads"] for cls in classes}
    for cls in classes:
        cls.get_num_heads = _num_heads
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.get_num_heads = original


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
        with numpy24_fix():
            return run(True), {"model_type": model_type, "attention_fusion": True}
    except TypeError as exc:  # another numpy incompatibility in the attention fusion: do without it
        log.warning("onnxruntime attention fusion failed (%s); retrying without it", exc)
        return run(False), {"model_type": model_type, "attention_fusion": False, "attention_error": str(exc)}
