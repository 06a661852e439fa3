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
    # the webui's short hash of each kind: 12 hex for LoRAs and embeddings, 10 for the rest
    assert all(len(r[2]) == (12 if r[0] in ("lora", "embedding") else 10) for r in rows.values()), rows


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


def test_default_model_is_configurable(tiny_store, tmp_path, monkeypatch):
    """`sdengine models default NAME` writes {home}/config.json; `paths` shows it, `models list` marks it, an
    EngineConfig takes it as its default_model; $SDENGINE_DEFAULT_MODEL overrides the file; an unknown name is
    refused naming the store's checkpoints."""
    from engine.config import EngineConfig

    monkeypatch.setenv("SDENGINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SDENGINE_DEFAULT_MODEL", raising=False)
    monkeypatch.setenv("SDENGINE_MODELS_DIR", str(tiny_store))
    runner = CliRunner()
    assert EngineConfig().default_model is None
    result = runner.invoke(main, ["models", "default", "tiny-sd1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "config.json").exists()
    assert EngineConfig().default_model == "tiny-sd1"
    paths = runner.invoke(main, ["paths"]).stdout
    assert any(line.split()[:2] == ["default", "tiny-sd1"] for line in paths.splitlines()), paths
    listed = [ln for ln in runner.invoke(main, ["models", "list", "--no-hash"]).stdout.splitlines()
              if ln.endswith("(default)")]
    assert [ln.split()[0] for ln in listed] == ["tiny-sd1.safetensors"]
    monkeypatch.setenv("SDENGINE_DEFAULT_MODEL", "tiny-sdxl")
    assert EngineConfig().default_model == "tiny-sdxl"
    monkeypatch.delenv("SDENGINE_DEFAULT_MODEL")
    bad = runner.invoke(main, ["models", "default", "nope"])
    assert bad.exit_code == 1 and "default_model" in bad.output and "tiny-sd1" in bad.output
    assert runner.invoke(main, ["models", "default", "--clear"]).exit_code == 0
    assert EngineConfig().default_model is None


def test_models_info_for_every_kind_with_the_webui_hash(tmp_path, monkeypatch):
    """`models info` answers every kind `models list` shows (the bundled LoRA included) and both show the same
    short hash: the webui's for that kind -- a LoRA's is the one the infotext writes in `Lora hashes`
    (sha256 of the tensor data, 12 hex), a checkpoint's the file's sha256, 10 hex."""
    from core.safetensors_header import data_sha256
    from engine.models.store import bundled_root

    monkeypatch.setenv("SDENGINE_MODELS_DIR", str(tmp_path))
    runner = CliRunner()
    listed = {ln.split()[0]: ln.split() for ln in runner.invoke(main, ["models", "list"]).stdout.splitlines()[1:]}
    lora = bundled_root() / "Lora" / "sdengine-demo-red2blue.safetensors"
    ckpt = bundled_root() / "Stable-diffusion" / "sdengine-demo.safetensors"
    want = {lora.name: data_sha256(lora)[:12], ckpt.name: hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]}
    for name, short in want.items():
        assert listed[name][3] == short, listed[name]
        info = runner.invoke(main, ["models", "info", name.rsplit(".", 1)[0]])
        assert info.exit_code == 0, info.output
        hash_line = next(ln for ln in info.stdout.splitlines() if ln.startswith("hash:"))
        assert hash_line.split()[1] == short and "hex" in hash_line, hash_line
