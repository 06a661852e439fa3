"""``sdengine export``: through the click group, with a stand-in model store (the real one lives in
engine.models.store on another branch; only ModelStore.from_config / load_model / load_controlnet are used)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.errors import ModelNotFound
from engine.models.tiny import build_tiny


@dataclass
class Loaded:
    components: dict
    short_hash: str = "abc1234567"
    vae_path: object = None
    module: object = field(default=None)


@pytest.fixture()
def store(monkeypatch):
    sd1 = build_tiny("sd1").components

    class ModelStore:
        @classmethod
        def from_config(cls, config):
            return cls()

        def load_model(self, name, allow_pickle=False):
            if name != "tiny":
                raise ModelNotFound(name, "no such model")
            return Loaded(sd1)

    module = types.ModuleType("engine.models.store")
    module.ModelStore = ModelStore
    monkeypatch.setitem(sys.modules, "engine.models.store", module)
    return sd1


def test_export_command(store, tmp_path):
    runner = CliRunner()
    args = ["export", "tiny", "--components", "vae_decoder,text_encoder", "--models-dir", str(tmp_path)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    cache = tmp_path / "cache" / "abc1234567"
    for component in ("vae_decoder", "text_encoder"):
        assert (cache / component / "onnx-fp32" / "manifest.json").is_file()
        assert f"{component}: {cache / component / 'onnx-fp32' / 'model.onnx'} (fp32)" in result.output
    stamp = (cache / "vae_decoder" / "onnx-fp32" / "model.onnx").stat().st_mtime_ns
    again = runner.invoke(main, args + ["--precision", "fp16"])
    assert again.exit_code == 0, again.output
    assert (cache / "vae_decoder" / "onnx-fp16" / "manifest.json").is_file()
    assert (cache / "vae_decoder" / "onnx-fp32" / "model.onnx").stat().st_mtime_ns == stamp


def test_export_errors_are_messages(store, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["export", "nope", "--models-dir", str(tmp_path)])
    assert missing.exit_code == 1 and "nope: no such model" in missing.output
    bad = runner.invoke(main, ["export", "tiny", "--components", "refiner", "--models-dir", str(tmp_path)])
    assert bad.exit_code == 1 and "component" in bad.output and "unet" in bad.output
