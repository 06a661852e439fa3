"""CLIP token constants shared by the prompt parser, the conditioning, the tokenizer and the export shapes."""

from __future__ import annotations

CHUNK_LENGTH = 75  # prompt tokens per chunk, without BOS/EOS (the webui's chunk)
TOKENS_PER_CHUNK = CHUNK_LENGTH + 2  # a text encoder's input: BOS, 75 tokens or padding, EOS (77)
