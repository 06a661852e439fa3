"""``sdengine export``: through the click group, on a real model store holding the tiny SD1 model."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from engine.cli import main


@pytest.fixture()
def store(tiny_store, tmp_path):
    """A model store in tmp_path with tiny-sd1 as "tiny"; returns the artefact key the engine uses for it."""
    from engine.models.store import ModelStore

    (tmp_path / "Stable-diffusion").mkdir()
    shutil.copy(tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors",
                tmp_path / "Stable-diffusion" / "tiny.safetensors")
    return ModelStore(tmp_path, bundled=None).load_model("tiny").family.artefact_key


def test_export_command(store, tmp_path):
    runner = CliRunner()
    args = ["export", "tiny", "--components", "vae_decoder,text_encoder", "--models-dir", str(tmp_path)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    cache = tmp_path / "cache" / store
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
    assert missing.exit_code == 1 and "nope" in missing.output and "tiny" in missing.output
    bad = runner.invoke(main, ["export", "tiny", "--components", "refiner", "--models-dir", str(tmp_path)])
    assert bad.exit_code == 1 and "component" in bad.output and "unet" in bad.output
