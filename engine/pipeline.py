"""The txt2img loop, written once for every backend.

request -> model (store, loader, backend) -> conditioning plan -> webui-seeded noise -> sampler over the
denoiser (CFG, ControlNet) -> VAE decode -> uint8 images, infotexts and the info dict of the API spec.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.config import EngineConfig
from engine.errors import Cancelled, InvalidRequest
from engine.infotext import create_infotext
from engine.request import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
MAX_SEED = 4294967294


def draw_seed(seed: int) -> int:
    """webui: -1 means a random seed in [0, 4294967294)."""
    if seed is None or int(seed) == -1:
        return random.randrange(MAX_SEED)
    return int(seed)


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, start: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
