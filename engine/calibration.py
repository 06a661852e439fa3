"""INT8 calibration data (engine.backends.int8): the UNet inputs the exact path produces on the calibration
workload, recorded from a twin engine of the same configuration at the exact precision (bf16 on a CPU with
native bf16, else f32), over the same model store and artefact cache (the ONNX export is shared)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from engine.backends import int8

log = logging.getLogger(__name__)


def calibration_feeds(engine_class, config, name: str, vae: str = "Automatic") -> list[dict]:
    """``[{input name: array}]``: one per UNet call (CFG's negative rows included) of
    :data:`int8.CALIBRATION_PROMPTS`, each :data:`int8.CALIBRATION_STEPS` steps of Euler a at the model's native
    size capped at :data:`int8.CALIBRATION_SIZE_CAP`, run by a twin ``engine_class`` (engine.pipeline's Engine,
    passed in: this module is imported by it) on the exact path."""
    from engine.request import GenerationRequest

    twin = engine_class(dataclasses.replace(config, precision=None))  # the backend's default: the exact path
    rt = twin.runtime(name, vae)
    size = min(rt.model.family.native_size, int8.CALIBRATION_SIZE_CAP)
    feeds: list[dict] = []
    run = rt.backend.run

    def record(component, inputs):
        if component in int8.INT8_COMPONENTS:
            feeds.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return run(component, inputs)

    rt.backend.run = record  # the pipeline calls rt.backend.run per model call
    try:
        for i, prompt in enumerate(int8.CALIBRATION_PROMPTS):
            twin.generate(GenerationRequest(model=name, vae=vae, prompt=prompt, steps=int8.CALIBRATION_STEPS,
                                            cfg_scale=int8.CALIBRATION_CFG, width=size, height=size,
                                            seed=int8.CALIBRATION_SEED + i, sampler_name="Euler a"))
    finally:
        del rt.backend.run
    log.info("int8 calibration of %s: %d UNet calls at %dx%d", name, len(feeds), size, size)
    return feeds
