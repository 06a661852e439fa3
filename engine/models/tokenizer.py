"""The CLIP BPE tokenizer, built offline from the vocabulary shipped as package data.

The vocabulary (vocab.json + merges.txt) is OpenAI CLIP's BPE (the ``bpe_simple_vocab_16e6`` file that
open_clip ships), converted once to the Hugging Face layout. SD1.x, SD2.x (OpenCLIP-H) and both SDXL
encoders share it; they differ only in the padding token.
"""

from __future__ import annotations

import json
import threading
from importlib import resources

from core.lazy import load
from core.tokens import TOKENS_PER_CHUNK

BOS_ID = 49406
EOS_ID = 49407
MAX_LENGTH = TOKENS_PER_CHUNK


def _data_file(name: str):
    return resources.files("engine.models").joinpath("data", name)


_tokenizers: dict[str, object] = {}
_tokenizers_lock = threading.Lock()


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A ``transformers.CLIPTokenizer`` with ``model_max_length=77``, built once per ``pad_token`` (concurrent
    first calls wait for that one build).

    ``pad_token`` is ``"<|endoftext|>"`` for SD1.x and SDXL encoder 1, ``"!"`` for OpenCLIP encoders (SD2.x,
    SDXL encoder 2), as in the published diffusers checkpoints.
    """
    tok = _tokenizers.get(pad_token)
    if tok is None:
        with _tokenizers_lock:
            tok = _tokenizers.get(pad_token)
            if tok is None:
                tok = _tokenizers[pad_token] = _build_tokenizer(pad_token)
    return tok


def _build_tokenizer(pad_token: str):
    CLIPTokenizer = load("transformers", "CLIPTokenizer")

    vocab = json.loads(_data_file("vocab.json").read_text(encoding="utf-8"))
    lines = _data_file("merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )
    if len(tok) != len(vocab):  # transformers 5 silently ignores arguments it does not know
        raise RuntimeError(f"CLIP tokenizer built with {len(tok)} tokens instead of {len(vocab)}")
    return tok


def tokenize(text: str, pad_token: str = "<|endoftext|>") -> list[int]:
    """Token ids of ``text`` without padding or truncation, with BOS and EOS."""
    return clip_tokenizer(pad_token)(text, add_special_tokens=True, truncation=False)["input_ids"]

