"""Model store, checkpoint formats, architecture detection, bundled configs, tokenizer, tiny test models."""
