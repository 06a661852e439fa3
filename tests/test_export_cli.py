"""``sdengine export``: through the click group, on a real model store holding the tiny SD1 model."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from cli import main


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
    args = ["export", "tiny", "--components", "vae_decoder,text_encoder", "--models-dir", str(tmp_path),
            "--backend", "onnxruntime"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    cache = tmp_path / "cache" / store
    for component in ("vae_decoder", "text_encoder"):
        assert (cache / component / "onnx-fp32" / "manifest.json").is_file()
        assert f"{component}: built: {cache / component / 'onnx-fp32' / 'model.onnx'} (fp32)" in result.output
    assert "tiny: built text_encoder, vae_decoder for onnxruntime" in result.output or \
        "tiny: built vae_decoder, text_encoder for onnxruntime" in result.output
    stamp = (cache / "vae_decoder" / "onnx-fp32" / "model.onnx").stat().st_mtime_ns
    again = runner.invoke(main, args + ["--precision", "fp16"])
    assert again.exit_code == 0, again.output
    assert (cache / "vae_decoder" / "onnx-fp16" / "manifest.json").is_file()
    assert (cache / "vae_decoder" / "onnx-fp32" / "model.onnx").stat().st_mtime_ns == stamp


def test_export_errors_are_messages(store, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["export", "nope", "--models-dir", str(tmp_path), "--backend", "onnxruntime"])
    assert missing.exit_code == 1 and "nope" in missing.output and "tiny" in missing.output
    bad = runner.invoke(main, ["export", "tiny", "--components", "refiner", "--models-dir", str(tmp_path),
                               "--backend", "onnxruntime"])
    assert bad.exit_code == 1 and "component" in bad.output and "unet" in bad.output


def test_export_cache_hit_says_up_to_date_without_loading_or_rehashing(store, tmp_path, monkeypatch):
    """A cache hit is found from the manifests and the cached file hash: the model is neither loaded nor
    hashed again (counted, not timed); a touched file is hashed once more, and still up to date."""
    import engine.models.checkpoints as checkpoints
    import engine.models.hashing as hashing

    runner = CliRunner()
    args = ["export", "tiny", "--components", "vae_decoder", "--models-dir", str(tmp_path), "--backend", "onnxruntime"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0 and "vae_decoder: built:" in first.output, first.output
    counts = {"hash": 0, "load": 0}
    real_hash, real_load = hashing.sha256_file, checkpoints.load_checkpoint

    def counting_hash(path):
        counts["hash"] += 1
        return real_hash(path)

    def counting_load(*args, **kwargs):
        counts["load"] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(hashing, "sha256_file", counting_hash)
    monkeypatch.setattr(checkpoints, "load_checkpoint", counting_load)
    again = runner.invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "vae_decoder: up to date:" in again.output and "tiny: up to date" in again.output
    assert "built" not in again.output
    assert counts == {"hash": 0, "load": 0}
    # same bytes, new mtime: hashed again (once), same hash, still up to date, still no load
    ckpt = tmp_path / "Stable-diffusion" / "tiny.safetensors"
    st = ckpt.stat()
    import os

    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = runner.invoke(main, args)
    assert touched.exit_code == 0 and "vae_decoder: up to date:" in touched.output, touched.output
    assert counts == {"hash": 1, "load": 0}
    # a removed artefact file: the quick check fails, the model is loaded and the component rebuilt
    (tmp_path / "cache" / store / "vae_decoder" / "onnx-fp32" / "model.onnx").unlink()
    rebuilt = runner.invoke(main, args)
    assert rebuilt.exit_code == 0 and "vae_decoder: built:" in rebuilt.output, rebuilt.output
    assert counts["load"] == 1


@pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None, reason="openvino extra")
def test_export_prepares_what_the_default_backend_loads(store, tmp_path):
    """With no --backend, `export` prepares for the configured default (openvino here: its full-attention ONNX
    and the IR its precision compiles from) -- what a txt2img loads, not unet_control nor vae_encoder; an engine
    on that backend then finds everything cached and exports nothing (its exporter's events are counted)."""
    from engine.config import default_backend
    from engine.pipeline import Engine
    from engine.request import GenerationRequest

    assert default_backend("cpu").value == "openvino"
    result = CliRunner().invoke(main, ["export", "tiny", "--models-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "built text_encoder, unet, vae_decoder for openvino" in result.output, result.output
    cache = tmp_path / "cache" / store
    assert {p.name for p in cache.iterdir() if p.is_dir()} == {"text_encoder", "unet", "vae_decoder"}
    for component in ("text_encoder", "unet", "vae_decoder"):
        assert any(p.name.startswith("openvino-ir") for p in (cache / component).iterdir()), component
    again = CliRunner().invoke(main, ["export", "tiny", "--models-dir", str(tmp_path)])
    assert again.exit_code == 0 and "up to date for openvino" in again.output, again.output
    engine = Engine(models_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert engine.config.backend.value == "openvino"
    seen = []
    engine.generate(GenerationRequest(model="tiny", prompt="a", steps=2, width=64, height=64, seed=1),
                    progress=lambda p: seen.append(getattr(p, "phase", None)))
    assert "exporting" not in seen, seen
