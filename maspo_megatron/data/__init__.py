"""Prompt data: datasets (jsonl/parquet, verl/slime/plain/gsm8k/math layouts), a resumable
sampler, the synthetic arithmetic task and the tiny tokenizer. No RL logic: DAPO dynamic sampling
lives beside the rollout phase (`trainer/dynamic_sampling.py`).

    from maspo_megatron.data import build_datasets, PromptSampler, build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer()
    train, val = build_datasets(cfg.data, tokenizer)
    sampler = PromptSampler(len(train), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    batch = sampler.next_items(train, 8)           # [PromptItem(prompt_ids, prompt_text, ground_truth, metadata)]
"""
from maspo_megatron.data.layouts import detect_layout, map_row
from maspo_megatron.data.loaders import build_datasets, load_gsm8k, load_math
from maspo_megatron.data.prompts import (
    PromptDataset,
    PromptItem,
    RawPrompt,
    load_prompt_file,
    load_prompt_files,
    render_prompt,
)
from maspo_megatron.data.records import DataError, read_rows
from maspo_megatron.data.sampler import PromptSampler
from maspo_megatron.data.synthetic import ArithmeticTask, format_answer, reference_response
from maspo_megatron.data.tiny_tokenizer import build_tiny_tokenizer

__all__ = [
    "ArithmeticTask", "DataError", "PromptDataset", "PromptItem", "PromptSampler", "RawPrompt",
    "build_datasets", "build_tiny_tokenizer", "detect_layout", "format_answer", "load_gsm8k",
    "load_math", "load_prompt_file", "load_prompt_files", "map_row", "read_rows", "reference_response", "render_prompt",
]
