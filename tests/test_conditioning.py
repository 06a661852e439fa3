"""Conditioning: parity with diffusers' encode_prompt, emphasis, chunk concatenation, schedules, cache.

References: diffusers 0.42 ``StableDiffusionPipeline.encode_prompt`` / ``StableDiffusionXLPipeline.encode_prompt``
on the tiny models (random weights, fp32 on CPU). Tolerance: ``atol=1e-5`` (both sides run the same torch
modules; the difference is the order of float operations only).
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

from engine.conditioning import (
    EmbeddingCache,
    StepConditioning,
    TextModelInfo,
    apply_emphasis,
    encode_request,
)
from core.errors import InvalidRequest
from engine.models.family import FAMILIES, Arch
from engine.models.tiny import build_tiny
from engine.models.tokenizer import BOS_ID, EOS_ID, clip_tokenizer
from export.wrappers import TextEncoderWrapper

ATOL = 1e-5


class WrapperBackend:
    """Minimal backend: runs export.wrappers.TextEncoderWrapper (what the torch backend runs, what ONNX traces).

    ``numpy=True`` returns numpy arrays, as the onnxruntime backend does. ``calls`` counts runs per component.
    """

    def __init__(self, components: dict, numpy: bool = False):
        self.wrappers = {name: TextEncoderWrapper(components[name]).eval()
                         for name in ("text_encoder", "text_encoder_2") if name in components}
        self.numpy = numpy
        self.calls: list[tuple[str, int]] = []

        self.components = components

    def has(self, component: str) -> bool:
        return component in self.wrappers

    def descriptor(self, component: str):
        from export.descriptors import describe

        return describe(component, self.components)

    def run(self, component, feeds):
        ids = torch.as_tensor(np.asarray(feeds["input_ids"]), dtype=torch.int64)
        skip = torch.as_tensor(np.asarray(feeds["clip_skip"]), dtype=torch.int64)
        width = self.components[component].config.hidden_size
        extra = torch.as_tensor(np.asarray(feeds.get("extra_embeddings", np.zeros((1, width)))), dtype=torch.float32)
        self.calls.append((component, ids.shape[0]))
        with torch.no_grad():
            hidden, raw, pooled = self.wrappers[component](ids, skip, extra)
        out = {"hidden_state": hidden, "hidden_state_raw": raw, "pooled": pooled}
        return {k: v.numpy() for k, v in out.items()} if self.numpy else out


def _patch_text_model(text_encoder):
    """diffusers 0.42 reads ``text_encoder.text_model.final_layer_norm`` for clip_skip; transformers 5 flattened
    CLIPTextModel. Give it the attribute, pointing at the same layer norm."""
    if not hasattr(text_encoder, "text_model"):
        object.__setattr__(text_encoder, "text_model", types.SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm))


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


@pytest.fixture(scope="module")
def sd2():
    return build_tiny("sd2v")


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny("sdxl")


def _sd_pipeline(tiny):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from engine.schedule import scheduler_config

    c = tiny.components
    _patch_text_model(c["text_encoder"])
    return StableDiffusionPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
        scheduler=DDIMScheduler(**scheduler_config(tiny.prediction_type)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


SD1 = TextModelInfo(FAMILIES[Arch.SD1].text, "tiny-sd1")
SD2 = TextModelInfo(FAMILIES[Arch.SD2].text, "tiny-sd2v")
SDXL = TextModelInfo(FAMILIES[Arch.SDXL].text, "tiny-sdxl")


# ----------------------------------------------------------------------------------- diffusers parity

@pytest.mark.parametrize("clip_skip", [1, 2, 3])
@pytest.mark.parametrize("kind,info", [("sd1", SD1), ("sd2v", SD2)])
def test_matches_diffusers_encode_prompt(kind, info, clip_skip, sd1, sd2):
    """Webui clip skip N == diffusers clip_skip=N-1 (SD1 EOS padding, SD2 "!" padding); atol 1e-5."""
    tiny = sd1 if kind == "sd1" else sd2
    pipe = _sd_pipeline(tiny)
    prompt, negative = "a photo of a red cat, high detail", "blurry, low quality"
    with torch.no_grad():  # diffusers applies clip_skip to the positive prompt only: encode each as a prompt
        ref_pos = pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=clip_skip - 1)[0]
        ref_neg = pipe.encode_prompt(negative, "cpu", 1, False, clip_skip=clip_skip - 1)[0]
    plan = encode_request(WrapperBackend(tiny.components), info, [prompt], [negative], steps=4, clip_skip=clip_skip)
    step = plan.at(0)
    assert step.context.shape == (2, 77, 32)
    assert step.positive == (((0, 1.0),),) and step.negative == (1,)
    np.testing.assert_allclose(_np(step.context[0]), _np(ref_pos[0]), atol=ATOL)
    np.testing.assert_allclose(_np(step.context[1]), _np(ref_neg[0]), atol=ATOL)
    assert step.pooled is None and step.time_ids is None


def test_clip_skip_changes_the_embedding(sd1):
    backend = WrapperBackend(sd1.components)
    a = encode_request(backend, SD1, ["a cat"], [""], 4, clip_skip=1).at(0).context
    b = encode_request(backend, SD1, ["a cat"], [""], 4, clip_skip=2).at(0).context
    assert float((a - b).abs().max()) > 1e-2


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sdxl_matches_diffusers_encode_prompt(sdxl, clip_skip):
    """Both encoders' hidden_states[-(N+1)] concatenated (32+32), pooled of encoder 2, zeros for an empty
    negative prompt, add_time_ids; diffusers StableDiffusionXLPipeline.encode_prompt(clip_skip=N-1); atol 1e-5."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from engine.schedule import scheduler_config

    c = sdxl.components
    pipe = StableDiffusionXLPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
        tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"], unet=c["unet"],
        scheduler=DDIMScheduler(**scheduler_config()),
    )
    backend = WrapperBackend(c)
    prompts = ["a castle on a hill, sunset", "a dog"]
    negatives = ["ugly, blurry", ""]
    plan = encode_request(backend, SDXL, prompts, negatives, steps=4, clip_skip=clip_skip, width=96, height=64)
    step = plan.at(0)
    assert step.context.shape == (4, 77, 64) and step.pooled.shape == (4, 32) and step.time_ids.shape == (4, 6)
    # diffusers applies clip_skip to the positive prompt only: encode every text as a prompt
    for row, text in enumerate(prompts + negatives[:1]):
        with torch.no_grad():
            ref, _, ref_pooled, _ = pipe.encode_prompt(text, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False, clip_skip=clip_skip - 1)
        np.testing.assert_allclose(_np(step.context[row]), _np(ref[0]), atol=ATOL)
        np.testing.assert_allclose(_np(step.pooled[row]), _np(ref_pooled[0]), atol=ATOL)
    with torch.no_grad():  # empty negative -> zeros (webui; diffusers force_zeros_for_empty_prompt with None)
        _, neg, _, neg_pooled = pipe.encode_prompt("a dog", device="cpu", do_classifier_free_guidance=True,
                                                   negative_prompt=None)
    assert float(neg.abs().max()) == 0.0 and float(neg_pooled.abs().max()) == 0.0
    assert float(step.context[3].abs().max()) == 0.0 and float(step.pooled[3].abs().max()) == 0.0
    time_ids = pipe._get_add_time_ids((64, 96), (0, 0), (64, 96), torch.float32,
                                      text_encoder_projection_dim=c["text_encoder_2"].config.projection_dim)
    for row in range(4):
        np.testing.assert_array_equal(_np(step.time_ids[row]), _np(time_ids[0]))


def test_sdxl_numpy_backend(sdxl):
    """The onnxruntime backend returns numpy: the plan is numpy too, equal to the torch one (atol 1e-6)."""
    prompts, negatives = ["a (castle:1.3) BREAK on a hill"], [""]
    a = encode_request(WrapperBackend(sdxl.components, numpy=True), SDXL, prompts, negatives, 4, width=64, height=64)
    b = encode_request(WrapperBackend(sdxl.components), SDXL, prompts, negatives, 4, width=64, height=64)
    sa, sb = a.at(0), b.at(0)
    assert isinstance(sa.context, np.ndarray) and isinstance(sa.pooled, np.ndarray)
    assert sa.time_ids.dtype == np.float32 and sa.time_ids.tolist()[0] == [64, 64, 0, 0, 64, 64]
    assert sa.context.shape == (2, 154, 64)
    for x, y in [(sa.context, sb.context), (sa.pooled, sb.pooled), (sa.time_ids, sb.time_ids)]:
        np.testing.assert_allclose(x, _np(y), atol=1e-6)


# ------------------------------------------------------------------------------- emphasis and chunks

def _raw(backend, component, ids, clip_skip=1, output="hidden_state"):
    out = backend.run(component, {"input_ids": np.array(ids, dtype=np.int64),
                                  "clip_skip": np.array([clip_skip], dtype=np.int64)})
    return _np(out[output])


@pytest.fixture(scope="module")
def sd1_biased_norm(sd1):
    """The tiny SD1 text encoder with a random final layer norm: with the initial weight 1 / bias 0 every
    token vector has mean 0, and the emphasis' mean restoration (a ratio of two means) would divide noise
    by noise. Trained models have a learned bias."""
    encoder = copy.deepcopy(sd1.components["text_encoder"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        norm = encoder.final_layer_norm
        norm.weight.copy_(1 + 0.2 * torch.randn(norm.weight.shape, generator=g))
        norm.bias.copy_(0.3 + 0.2 * torch.randn(norm.bias.shape, generator=g))
    return {"text_encoder": encoder}


@pytest.mark.parametrize("numpy_backend", [False, True])
def test_weighted_prompt_is_hand_computed_emphasis(sd1_biased_norm, numpy_backend):
    """(red:1.5) and [cat] scale those token vectors of the unweighted embedding, then the chunk mean is
    restored (webui "Original" emphasis); numpy and torch backends alike; rtol 1e-5."""
    backend = WrapperBackend(sd1_biased_norm, numpy=numpy_backend)
    weighted = encode_request(backend, SD1, ["a (red:1.5) [cat]"], [""], 4).at(0).context
    ids = clip_tokenizer()("a red cat", padding="max_length", max_length=77)["input_ids"]
    z = _raw(backend, "text_encoder", [ids])[0]
    w = np.ones(77, dtype=np.float32)
    w[2], w[3] = 1.5, 1 / 1.1  # BOS, a, red, cat, EOS...
    expected = z * w[:, None]
    expected *= z.mean() / expected.mean()
    assert type(weighted) is (np.ndarray if numpy_backend else torch.Tensor)
    np.testing.assert_allclose(_np(weighted[0]), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(_np(weighted[0]) - z).max() > 1e-3


def test_apply_emphasis_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 77, 8)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, (2, 77))
    a = apply_emphasis(z, w)
    b = apply_emphasis(torch.from_numpy(z), w)
    np.testing.assert_allclose(a, b.numpy(), rtol=1e-6)
    for i in range(2):
        assert abs(a[i].mean() - z[i].mean()) < 1e-6
        np.testing.assert_allclose(a[i] / (z[i] * w[i][:, None]), a[i, 0, 0] / (z[i, 0, 0] * w[i, 0]), rtol=1e-4)


def test_long_prompt_concatenates_chunks(sd1):
    """A 100-token prompt is two chunks (75 + 25) encoded separately and concatenated to 154 tokens."""
    backend = WrapperBackend(sd1.components)
    words = " ".join(["cat"] * 100)
    context = encode_request(backend, SD1, [words], [""], 4, clip_skip=2).at(0).context
    assert context.shape == (2, 154, 32)
    cat = clip_tokenizer()("cat", add_special_tokens=False)["input_ids"][0]
    first = [BOS_ID] + [cat] * 75 + [EOS_ID]
    second = [BOS_ID] + [cat] * 25 + [EOS_ID] * 51
    z = _raw(backend, "text_encoder", [first, second], clip_skip=2)
    np.testing.assert_allclose(_np(context[0]), z.reshape(154, 32), atol=ATOL)
    # the one-chunk negative prompt is padded with the encoded empty chunk
    empty = _raw(backend, "text_encoder", [[BOS_ID] + [EOS_ID] * 76], clip_skip=2)[0]
    np.testing.assert_allclose(_np(context[1, :77]), empty, atol=ATOL)
    np.testing.assert_allclose(_np(context[1, 77:]), empty, atol=ATOL)


def test_break_makes_a_new_chunk(sd1):
    backend = WrapperBackend(sd1.components)
    context = encode_request(backend, SD1, ["a cat BREAK a dog"], [""], 4).at(0).context
    assert context.shape == (2, 154, 32)
    a = encode_request(backend, SD1, ["a cat"], [""], 4).at(0).context
    b = encode_request(backend, SD1, ["a dog"], [""], 4).at(0).context
    np.testing.assert_allclose(_np(context[0]), np.concatenate([_np(a[0]), _np(b[0])]), atol=ATOL)


# ------------------------------------------------------------------------------ plan: AND, schedules

def test_and_parts_rows_and_weights(sd1):
    backend = WrapperBackend(sd1.components)
    plan = encode_request(backend, SD1, ["a cat AND a dog:0.5", "a tree"], ["ugly", ""], 4)
    step = plan.at(0)
    assert isinstance(step, StepConditioning)
    assert step.positive == (((0, 1.0), (1, 0.5)), ((2, 1.0),))
    assert step.negative == (3, 4)
    assert step.batch_size == 2 and step.context.shape == (5, 77, 32)
    single = encode_request(backend, SD1, ["a dog"], ["ugly"], 4).at(0).context
    np.testing.assert_allclose(_np(step.context[1]), _np(single[0]), atol=ATOL)
    np.testing.assert_allclose(_np(step.context[3]), _np(single[1]), atol=ATOL)
    assert not plan.changes


def test_prompt_editing_switches_at_the_webui_step(sd1):
    """[red:blue:3] over 10 steps: 'red' while step <= 3 (0-based, the webui's CFGDenoiser.step), then 'blue'."""
    backend = WrapperBackend(sd1.components)
    plan = encode_request(backend, SD1, ["a [red:blue:3] cat"], [""], 10)
    red = encode_request(backend, SD1, ["a red cat"], [""], 10).at(0).context
    blue = encode_request(backend, SD1, ["a blue cat"], [""], 10).at(0).context
    for step in range(10):
        expected = red if step <= 3 else blue
        np.testing.assert_allclose(_np(plan.at(step).context), _np(expected), atol=ATOL)
    assert plan.ends == (3, 10)
    assert plan.at(0) is plan.at(3) and plan.at(4) is plan.at(9)  # built once per segment


def test_alternation_and_shared_segments(sd1):
    """[cat|dog] over 4 steps: schedule (1 cat)(2 dog)(3 cat)(4 dog); step s uses the first end >= s."""
    backend = WrapperBackend(sd1.components)
    plan = encode_request(backend, SD1, ["a [cat|dog]"], [""], 4)
    texts = [plan.texts[plan.ends.index(next(e for e in plan.ends if s <= e))][0] for s in range(4)]
    assert texts == ["a cat", "a cat", "a dog", "a cat"]
    assert plan.at(0) is plan.at(3)  # identical selections share one StepConditioning
    assert plan.at(2) is not plan.at(0)


def test_editing_in_negative_prompt_and_mixed_lengths(sd1):
    backend = WrapperBackend(sd1.components)
    long_text = " ".join(["dog"] * 80)
    plan = encode_request(backend, SD1, ["a cat"], [f"[{long_text}:ugly:2]"], 6)
    assert plan.at(0).context.shape == (2, 154, 32)  # the positive row is padded to 2 chunks
    assert plan.at(5).context.shape == (2, 77, 32)


# ------------------------------------------------------------------------------------ cache and limits

def test_cache_encodes_a_prompt_once(sd1):
    backend = WrapperBackend(sd1.components)
    cache = EmbeddingCache()
    encode_request(backend, SD1, ["a cat", "a cat"], ["", ""], 4, cache=cache)
    assert backend.calls == [("text_encoder", 2)]  # "a cat" and "" in one call, once each
    first = encode_request(backend, SD1, ["a cat"], [""], 4, cache=cache).at(0).context
    assert backend.calls == [("text_encoder", 2)]  # everything from the cache
    encode_request(backend, SD1, ["a cat"], [""], 4, clip_skip=2, cache=cache)
    assert backend.calls[-1] == ("text_encoder", 2)  # clip skip is part of the key
    no_cache = encode_request(WrapperBackend(sd1.components), SD1, ["a cat"], [""], 4).at(0).context
    np.testing.assert_allclose(_np(first), _np(no_cache), atol=0)


def test_cache_is_lru():
    cache = EmbeddingCache(max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3


@pytest.mark.parametrize("which,field", [("prompt", "prompt"), ("negative", "negative_prompt")])
def test_too_many_chunks_is_invalid_request(sd1, which, field):
    backend = WrapperBackend(sd1.components)
    long_text = " ".join(["cat"] * 76)  # two chunks
    prompts, negatives = (["x"], [""])
    if which == "prompt":
        prompts = [long_text]
    else:
        negatives = [long_text]
    with pytest.raises(InvalidRequest) as err:
        encode_request(backend, SD1, prompts, negatives, 4, max_chunks=1)
    assert err.value.field == field
    assert backend.calls == []  # checked before anything is encoded
    encode_request(backend, SD1, prompts, negatives, 4, max_chunks=2)


def test_bad_arguments(sd1):
    backend = WrapperBackend(sd1.components)
    with pytest.raises(InvalidRequest) as err:
        encode_request(backend, SD1, ["a"], [""], 4, clip_skip=0)
    assert err.value.field == "clip_skip"
    with pytest.raises(InvalidRequest) as err:
        encode_request(backend, SD1, ["a"], [""], 0)
    assert err.value.field == "steps"
    with pytest.raises(InvalidRequest) as err:
        encode_request(backend, SD1, [], [], 4)
    assert err.value.field == "prompt"
    # the family definitions carry the text encoders and their pad tokens (engine/models/family.py)
    assert FAMILIES[Arch.SDXL].text_encoders == ("text_encoder", "text_encoder_2")
    assert FAMILIES[Arch.SDXL].text_pads == ("<|endoftext|>", "!") and FAMILIES[Arch.SD2].text_pads == ("!",)
    assert FAMILIES[Arch.CONTROLNET_SD1].text is None
