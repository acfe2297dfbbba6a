"""Shared test helpers: multi-process launcher (multiproc), tiny Megatron GPT (tiny_gpt), the independent
float64 loss reference (loss_reference) and the SGLang stand-in (sglang_standin)."""
