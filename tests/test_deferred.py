"""Module cards (core.deferred): a load from cache answers each component with a module that knows its config
from the card and builds itself on first real use -- the same module a load without a card builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from core.deferred import PROBED, DeferredModule, card_of, deferred_components, has_attribute, real_module
from export.onnx import LOADER, RELEASED, is_released, mark_released

ROOT = Path(__file__).resolve().parents[1]


def _config_dict(module) -> dict:
    cfg = module.config
    return json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), default=list))


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sd1-diffusers", "tiny-sdxl"])
def test_card_answers_what_the_built_modules_answer(tiny_store, tmp_path, model):
    """A store load with a card (written by the load before) gives deferred modules whose configs, probed
    attributes, family and schedule equal a load without a card; building one gives the meta-built module."""
    from engine.models.store import ModelStore

    first = ModelStore(tiny_store, bundled=None, cache_dir=tmp_path).load_model(model, meta=True)
    assert not any(isinstance(m, DeferredModule) for m in first.components.values())
    assert list((tmp_path / "modules").glob("*.json"))
    second = ModelStore(tiny_store, bundled=None, cache_dir=tmp_path).load_model(model, meta=True)
    assert (second.arch, second.prediction_type, second.native_size) == (first.arch, first.prediction_type,
                                                                          first.native_size)
    assert second.family.artefact_key == first.family.artefact_key
    np.testing.assert_array_equal(second.alphas_cumprod, first.alphas_cumprod)
    for key, module in first.components.items():
        if not hasattr(module, "parameters"):
            assert second.components[key] is not None
            continue
        deferred = second.components[key]
        assert isinstance(deferred, DeferredModule) and not deferred.built, key
        assert _config_dict(deferred) == _config_dict(module), key
        for name in PROBED:
            assert has_attribute(deferred, name) == hasattr(module, name), (key, name)
        assert not deferred.built, key
    # the first real use builds the modules (all at once, once), as the load without a card did
    unet = second.components["unet"]
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in first.components["unet"].state_dict().items()}
    assert unet.built
    assert type(real_module(unet)) is type(first.components["unet"])


def test_deferred_module_builds_once_and_keeps_marks():
    """Marks set before the build are handed to the built module; unset marks and attributes the card says the
    class lacks are answered without a build; anything else builds once for all components."""
    import torch

    calls = []

    def build_all():
        calls.append(1)
        return {"a": torch.nn.Linear(2, 3), "b": torch.nn.Linear(3, 1)}

    card = {"components": {k: {"class": "Linear", "library": "torch", "config": {"width": w}, "attrs": []}
                           for k, w in (("a", 3), ("b", 1))}}
    mods = deferred_components(card, build_all, "toy")
    a, b = mods["a"], mods["b"]
    assert a.config.width == 3 and a.config["width"] == 3 and not is_released(a)
    assert not has_attribute(a, "set_attn_processor") and not hasattr(a, "text_projection")
    mark_released(a, "fingerprint", loader=lambda: None)
    assert is_released(a) and callable(getattr(a, LOADER)) and calls == []
    assert a(torch.ones(1, 2)).shape == (1, 3)  # a call builds
    assert calls == [1] and a.built and not b.built
    assert getattr(real_module(a), RELEASED) == "fingerprint"  # handed over
    assert b.out_features == 1 and calls == [1] and b.built  # one build for both
    b.extra = 5
    assert real_module(b).extra == 5


def test_stale_card_is_rebuilt(tiny_store, tmp_path):
    """A card written by other library versions (or another format) is not used: the modules are built and a
    current card replaces it."""
    from engine.models.store import ModelStore

    ModelStore(tiny_store, bundled=None, cache_dir=tmp_path).load_model("tiny-sd1", meta=True)
    (path,) = (tmp_path / "modules").glob("*.json")
    card = json.loads(path.read_text())
    card["versions"]["diffusers"] = "0.0.1"
    path.write_text(json.dumps(card))
    model = ModelStore(tiny_store, bundled=None, cache_dir=tmp_path).load_model("tiny-sd1", meta=True)
    assert not isinstance(model.components["unet"], DeferredModule)
    assert json.loads(path.read_text())["versions"] == card_of(model.components, "", None)["versions"]


LOAD_FROM_CACHE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from engine.pipeline import Engine
    from engine.request import GenerationRequest, InitImage

    models, cache, backend = sys.argv[1:4]
    engine = Engine(models_dir=models, cache_dir=cache, backend=backend, precision="fp32")
    init = np.full((64, 64, 3), 90, np.uint8)
    requests = [GenerationRequest(model="tiny-sd1", prompt="a red house", steps=4, width=64, height=64, seed=5),
                GenerationRequest(model="tiny-sd1", prompt="a red house", steps=4, width=64, height=64, seed=6,
                                  init=InitImage(init, 0.6))]
    images = [np.asarray(engine.generate(r).images[0]).tolist() for r in requests]
    print(json.dumps({"images": images, "diffusers": "diffusers" in sys.modules,
                      "clip": "transformers.models.clip.modeling_clip" in sys.modules}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("openvino") is None, reason="openvino extra"))])
def test_load_from_cache_imports_no_model_library(backend, tiny_store, tmp_path):
    """In a fresh process on a warm cache (artefacts and card written by a first process), txt2img and img2img
    run without importing diffusers or transformers' CLIP model code, and paint the first process's images."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run():
        proc = subprocess.run([sys.executable, "-c", LOAD_FROM_CACHE, str(tiny_store), str(tmp_path), backend],
                              capture_output=True, env=env, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        return json.loads(proc.stdout.decode().strip().splitlines()[-1])

    first, second = run(), run()
    assert first["diffusers"]  # the first process built the modules to export them
    assert not second["diffusers"] and not second["clip"]
    assert second["images"] == first["images"]
