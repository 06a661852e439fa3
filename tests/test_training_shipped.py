"""The shipped demo model: small, in the bundled store, loadable by the engine's own single-file loaders."""

import pytest

from training.export import CHECKPOINT, CONTROLNET

pytest.importorskip("engine.models.checkpoints", reason="needs the model loaders (engine.models.checkpoints)")
pytestmark = pytest.mark.skipif(not CHECKPOINT.exists(), reason="demo model not exported yet")


def test_weights_fit_the_budget():
    total = CHECKPOINT.stat().st_size + (CONTROLNET.stat().st_size if CONTROLNET.exists() else 0)
    assert total <= 30 * 2**20, f"{total / 2**20:.1f} MiB > 30 MiB"


def test_checkpoint_loads_as_tiny_sd1_with_real_vocab():
    from engine.models.checkpoints import Arch, load_single_file

    from training.train import SCHEDULER, TEXT, UNET

    m = load_single_file(CHECKPOINT)
    assert m.arch is Arch.SD1 and m.prediction_type == "epsilon" and m.native_size == 64
    te, unet, vae = m.components["text_encoder"], m.components["unet"], m.components["vae"]
    assert te.config.vocab_size == 49408 and te.config.hidden_size == TEXT["hidden_size"]
    assert tuple(unet.config.block_out_channels) == UNET["block_out_channels"]
    assert len(vae.config.block_out_channels) == 4  # x8, as ControlNet's hint embedding needs
    assert 0.05 < vae.config.scaling_factor < 20  # 1/std of the latents, not SD's 0.18215 by accident
    assert m.scheduler_config["beta_schedule"] == SCHEDULER["beta_schedule"]
    # the loader's noise schedule is the one the model was trained with (float32 training copy: 1e-6)
    from training.train import alphas_cumprod

    assert abs(m.alphas_cumprod - alphas_cumprod().double().numpy()).max() < 1e-6


@pytest.mark.skipif(not CONTROLNET.exists(), reason="ControlNet not exported yet")
def test_controlnet_matches_the_unet():
    from engine.models.checkpoints import load_controlnet

    from training.train import UNET

    cn = load_controlnet(CONTROLNET).module
    assert tuple(cn.config.block_out_channels) == UNET["block_out_channels"]
    assert cn.config.cross_attention_dim == UNET["cross_attention_dim"]
