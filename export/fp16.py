"""fp32 -> fp16 ONNX conversion that keeps in fp32 what overflows or loses precision in fp16.

Uses onnxruntime's ``float16.convert_float_to_float16`` with ``keep_io_types=True`` (the graph's inputs and
outputs stay fp32, so every backend feeds the same dtypes) and an op block list. What stays fp32, and why
(the same choices torch autocast makes):

- normalisations (GroupNorm is exported as InstanceNormalization; LayerNormalization): their variance of
  activations above ~256 overflows fp16;
- Softmax, Exp, Pow, ReduceMean, Sqrt: reductions and exponentials that overflow or underflow;
- Sin/Cos: the timestep embedding takes sin(t * f) with t up to 999, where fp16 keeps only ~0.5 absolute
  precision.

Components whose descriptor says ``fp16=False`` (the SDXL VAE, see export.descriptors) are not converted.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

KEEP_FP32_OPS = (
    "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    "Softmax", "Exp", "Pow", "ReduceMean", "Sqrt", "Sin", "Cos",
)


def convert_to_fp16(model, keep_fp32_ops: tuple[str, ...] = (), *, big: bool = False):
    """Return an fp16 copy of the ``onnx.ModelProto`` ``model`` (fp32 inputs/outputs kept).

    ``big``: the model exceeds protobuf's 2 GB limit, so onnx shape inference (which serialises) is skipped.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(KEEP_FP32_OPS) | set(keep_fp32_ops))
    log.info("converting to fp16, keeping %s in fp32", ", ".join(sorted(set(KEEP_FP32_OPS) | set(keep_fp32_ops))))
    return convert_float_to_float16(
        model, keep_io_types=True, op_block_list=block, disable_shape_infer=big,
    )
