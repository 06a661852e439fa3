"""``sdengine models list`` on the tiny store (through the top-level lazy CLI group)."""

from __future__ import annotations

import hashlib

from click.testing import CliRunner

from cli import main


def test_models_list(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setenv("SDENGINE_MODELS_DIR", str(tmp_path / "elsewhere"))  # --models-dir wins
    result = CliRunner().invoke(main, ["models", "list", "--models-dir", str(tiny_store)])
    assert result.exit_code == 0, result.output
    lines = [ln.split() for ln in result.stdout.splitlines()]
    assert lines[0][:4] == ["NAME", "KIND", "ARCHITECTURE", "HASH"]
    rows = {ln[0]: ln[1:] for ln in lines[1:]}
    sd1 = hashlib.sha256((tiny_store / "Stable-diffusion" / "tiny-sd1.safetensors").read_bytes()).hexdigest()
    assert rows["tiny-sd1.safetensors"][:3] == ["checkpoint", "sd1", sd1[:10]]
    assert rows["tiny-sd2v-diffusers"][:2] == ["checkpoint", "sd2"]
    assert rows["tiny-sdxl.safetensors"][:2] == ["checkpoint", "sdxl"]
    assert rows["tiny-controlnet-sd1.safetensors"][:2] == ["controlnet", "controlnet_sd1"]
    assert rows["tiny-controlnet-sdxl-diffusers"][:2] == ["controlnet", "controlnet_sdxl"]
    assert all(len(r[2]) == 10 for r in rows.values())


def test_models_list_env_and_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("SDENGINE_MODELS_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["models", "list", "--no-hash"])
    assert result.exit_code == 0
    # only the bundled models (none yet, or the demo model once it ships) are listed; no crash on an empty store
    assert "tiny-sd1" not in result.stdout


def test_to_single_file(tiny_store, tmp_path):
    """`sdengine models to-single-file` on the tiny SDXL diffusers folder gives the same tensors as the store's
    single file (written from the in-memory modules)."""
    from safetensors.torch import load_file

    out = tmp_path / "converted.safetensors"
    result = CliRunner().invoke(main, ["models", "to-single-file",
                                       str(tiny_store / "Stable-diffusion" / "tiny-sdxl-diffusers"), str(out)])
    assert result.exit_code == 0, result.output
    a, b = load_file(str(out)), load_file(str(tiny_store / "Stable-diffusion" / "tiny-sdxl.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
