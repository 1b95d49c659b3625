"""Flax linen models: image tokenizer, denoisers, text encoders."""
