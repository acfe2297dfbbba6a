"""Shared test helpers: multi-process launcher (multiproc) and tiny Megatron GPT (tiny_gpt)."""
