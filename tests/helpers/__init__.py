"""Test helpers shared by several test packages: multi-process launcher (multiproc), tiny Megatron GPT
(tiny_gpt), tiny HF models (hf_models), real Trainer runs (loop_cases), the independent float64 loss
reference (loss_reference) and the SGLang stand-in (sglang_standin)."""
