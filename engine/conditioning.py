"""Prompt conditioning: token chunks -> embeddings through a backend.

The type below is the contract between conditioning (which builds it) and the denoiser (which consumes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Array = Any  # numpy.ndarray or torch.Tensor


@dataclass(frozen=True)
class StepConditioning:
    """Everything the denoiser needs about the prompts at one sampling step, for a batch of B images.

    ``context`` holds M rows: every positive AND-part of every image, then the negative prompt of every
    image (all rows padded to the same token count, 77*k). ``positive[b]`` lists ``(row, weight)`` of the
    AND-parts of image b, ``negative[b]`` the row of its negative prompt. CFG, as the webui does it:
    ``x0_b = uncond_b + sum_(row, w) w * cfg_scale * (x0[row] - uncond_b)``; with cfg_scale <= 1 the
    negative rows are not run at all (``x0_b = sum w * x0[row]`` with weights normalised to 1).
    ``pooled`` (M, P) and ``time_ids`` (M, 6) are set for SDXL only.
    """

    context: Array
    positive: tuple[tuple[tuple[int, float], ...], ...]
    negative: tuple[int, ...]
    pooled: Array | None = None
    time_ids: Array | None = None

    @property
    def batch_size(self) -> int:
        return len(self.positive)
