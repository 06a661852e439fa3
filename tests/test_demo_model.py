"""The bundled demo model through the real pipeline (store -> loader -> backend -> sampler -> VAE).

Golden image: tests/golden/demo-seed1-euler-a.png, made by the torch backend; every backend must reproduce it
within 2/255 mean absolute difference (reference: that PNG), and the automatic evaluator of training/ must read
the prompt's scene in it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.pipeline import Engine
from engine.request import GenerationRequest

GOLDEN = Path(__file__).parent / "golden" / "demo-seed1-euler-a.png"
PROMPT = "a large red circle in the middle on a blue background"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_demo_model_golden_image(backend, tmp_path):
    from training.evaluate import analyse

    engine = Engine(models_dir=tmp_path / "empty-store", backend=backend, cache_dir=tmp_path / "cache")
    assert engine.default_model_name().startswith("sdengine-demo")
    res = engine.generate(GenerationRequest(prompt=PROMPT, steps=20, cfg_scale=1.5, seed=1, sampler_name="Euler a"))
    img = res.images[0]
    assert img.shape == (64, 64, 3) and res.info["sd_model_name"] == "sdengine-demo"
    golden = np.asarray(Image.open(GOLDEN).convert("RGB"))
    diff = float(np.abs(img.astype(np.float64) - golden).mean())
    assert diff <= 2.0, f"{backend}: mean abs diff {diff:.3f}/255 to the golden image > 2/255"
    det = analyse(img)
    assert (det.count, det.size, det.colour, det.shape, det.position, det.background) == (
        1, "large", "red", "circle", "middle", "blue")
