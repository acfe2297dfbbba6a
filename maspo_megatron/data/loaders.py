"""Building the train / validation prompt datasets a `DataConfig` describes.

No file is ever fetched: GSM8K and MATH-style sets are read from files the user downloaded
(docs/data.md says where from and which layout to name).
"""
from __future__ import annotations

from typing import Any

from maspo_megatron.data.prompts import PromptDataset, RawPrompt, load_prompt_files
from maspo_megatron.data.synthetic import ArithmeticTask


def load_gsm8k(path: str, tokenizer: Any, **dataset_options: Any) -> PromptDataset:
    """GSM8K jsonl/parquet (`question`, `answer` ending in `#### n`)."""
    return PromptDataset(load_prompt_files([path], layout="gsm8k"), tokenizer, name=str(path), **dataset_options)


def load_math(path: str, tokenizer: Any, **dataset_options: Any) -> PromptDataset:
    """MATH / MATH-500 style jsonl/parquet (`problem`, and `answer` or a boxed answer in `solution`)."""
    return PromptDataset(load_prompt_files([path], layout="math"), tokenizer, name=str(path), **dataset_options)


def _raws(config: Any, paths: list[str]) -> list[RawPrompt]:
    return load_prompt_files(paths, layout=config.format, prompt_key=config.prompt_key, answer_key=config.answer_key)


def build_datasets(config: Any, tokenizer: Any) -> tuple[PromptDataset, dict[str, PromptDataset]]:
    """(train dataset, validation datasets by name) for `config: DataConfig`.

    With no `train_files`, the synthetic arithmetic task (`config.synthetic`) is used for training
    and, unless `val_files` names others, for validation ("synthetic").
    """
    options = {"chat_template": config.chat_template, "max_prompt_tokens": config.max_prompt_tokens}
    if config.train_files:
        train = PromptDataset(_raws(config, list(config.train_files)), tokenizer, name="train", **options)
    else:
        task = ArithmeticTask(config.synthetic, seed=config.seed)
        train = PromptDataset(task.generate(config.synthetic.num_train, "train"), tokenizer, name="train", **options)
    val = {name: PromptDataset(_raws(config, [path]), tokenizer, name=name, **options) for name, path in config.val_files.items()}
    if not config.train_files and not config.val_files:
        task = ArithmeticTask(config.synthetic, seed=config.seed)
        val["synthetic"] = PromptDataset(task.generate(config.synthetic.num_val, "val"), tokenizer, name="synthetic", **options)
    return train, val
