"""What the demo model knows, from the file itself: `sdengine models info` prints the vocabulary the file
carries (a changed file prints the change), the card is written without touching the tensors, README's
vocabulary block is rendered from the shipped file; a size far from the native one is served with a warning
(result info and CLI); ControlNet infotext carries the preprocessor values actually used."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from engine.models import card
from training.export import CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not CHECKPOINT.exists(), reason="demo model not exported yet")


def test_shipped_file_carries_the_training_vocabulary():
    from training.scenes import BEST_SETTINGS, vocabulary

    meta = card.read_metadata(CHECKPOINT)
    assert json.loads(meta[card.VOCABULARY_KEY]) == vocabulary()
    assert json.loads(meta[card.SETTINGS_KEY]) == BEST_SETTINGS
    assert "purple" not in vocabulary()["backgrounds"]  # the "purple background" is not a word it knows


def test_models_info_prints_the_vocabulary_of_the_file(tmp_path):
    """A copy of the demo model whose card says otherwise: `models info` prints what the file says."""
    store = tmp_path / "models"
    (store / "Stable-diffusion").mkdir(parents=True)
    copy = store / "Stable-diffusion" / "mine.safetensors"
    shutil.copy(CHECKPOINT, copy)
    vocab = json.loads(card.read_metadata(copy)[card.VOCABULARY_KEY])
    vocab["backgrounds"] = [*vocab["backgrounds"], "teal"]
    before = card.data_sha256(copy)
    card.write_metadata(copy, {card.VOCABULARY_KEY: json.dumps(vocab)})
    assert card.data_sha256(copy) == before  # only the header changed
    result = CliRunner().invoke(main, ["models", "info", "mine", "--models-dir", str(store)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "backgrounds (5): black, white, gray, blue, teal" in out
    assert "colours (5): red, green, blue, yellow, purple" in out
    for line in ("family:          sd1", "native size:     64x64", "prediction type: epsilon",
                 "controlnets:     sdengine-demo-canny.safetensors", "best settings:   cfg_scale 1.5"):
        assert line in out, line
    import hashlib

    assert f"hash:            {hashlib.sha256(copy.read_bytes()).hexdigest()[:10]}" in out
    # and the default model (the bundled one) prints the shipped vocabulary
    default = CliRunner().invoke(main, ["models", "info", "--models-dir", str(tmp_path / "empty")])
    assert default.exit_code == 0 and "backgrounds (4): black, white, gray, blue" in default.output


def test_write_metadata_keeps_tensors_and_loads(tmp_path):
    from safetensors.numpy import load_file

    copy = tmp_path / "m.safetensors"
    shutil.copy(CHECKPOINT, copy)
    card.write_metadata(copy, {"sdengine.test": "x" * 1001})  # a header of another length
    a, b = load_file(str(CHECKPOINT)), load_file(str(copy))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert card.read_metadata(copy)["sdengine.test"] == "x" * 1001
    assert card.read_metadata(copy)[card.VOCABULARY_KEY] == card.read_metadata(CHECKPOINT)[card.VOCABULARY_KEY]


def test_readme_vocabulary_is_rendered_from_the_file():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert card.render_readme(text) == text, "README is out of date: run python -m engine.models.card --readme"
    assert "backgrounds (4): black, white, gray, blue" in text


def test_far_from_native_size_is_served_with_a_warning(tmp_path):
    from engine.pipeline import Engine
    from engine.request import GenerationRequest

    engine = Engine(models_dir=tmp_path / "empty", backend="torch", cache_dir=tmp_path / "cache")
    native = engine.generate(GenerationRequest(prompt="a large red circle in the middle on a blue background",
                                               steps=1, seed=1))
    assert native.info["warnings"] == []
    big = engine.generate(GenerationRequest(prompt="a red circle", steps=1, seed=1, width=256, height=256))
    assert big.images[0].shape == (256, 256, 3)
    assert len(big.info["warnings"]) == 1 and "native size 64x64" in big.info["warnings"][0]


def test_cli_prints_the_size_warning(tmp_path):
    result = CliRunner().invoke(main, ["txt2img", "--prompt", "a red circle", "--steps", "1", "--seed", "1",
                                       "--width", "192", "--height", "192", "--backend", "torch",
                                       "--models-dir", str(tmp_path / "empty"), "--results-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "warning: 192x192 is far from the model's native size 64x64" in result.output
    png = [line for line in result.output.splitlines() if line.endswith(".png")]
    assert png and all(Path(p).is_absolute() and Path(p).is_file() for p in png)


def test_controlnet_infotext_has_the_values_used(tiny_store, tmp_path):
    from engine.pipeline import Engine
    from engine.request import ControlNetUnit, GenerationRequest

    pytest.importorskip("cv2")
    engine = Engine(models_dir=tiny_store, backend="torch", cache_dir=tmp_path)
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = 255
    base = GenerationRequest(model="tiny-sd1", prompt="a square", steps=1, seed=3, sampler_name="Euler")
    canny = ControlNetUnit(model="tiny-controlnet-sd1", image=img, module="canny")
    res = engine.generate(dataclasses.replace(base, controlnet_units=(canny,)))
    assert "Processor Res: 512, Threshold A: 100, Threshold B: 200" in res.infotexts[0]
    given = dataclasses.replace(canny, processor_res=256, threshold_a=50, threshold_b=150)
    res = engine.generate(dataclasses.replace(base, controlnet_units=(given,)))
    assert "Processor Res: 256, Threshold A: 50, Threshold B: 150" in res.infotexts[0]
    perfect = dataclasses.replace(canny, pixel_perfect=True)  # the resolution from the target size (64)
    res = engine.generate(dataclasses.replace(base, controlnet_units=(perfect,)))
    assert "Processor Res: 64, Threshold A: 100, Threshold B: 200" in res.infotexts[0]
    none = dataclasses.replace(canny, module="none")  # no sliders: the payload's values, as the extension
    res = engine.generate(dataclasses.replace(base, controlnet_units=(none,)))
    assert "Processor Res: -1, Threshold A: -1, Threshold B: -1" in res.infotexts[0]
