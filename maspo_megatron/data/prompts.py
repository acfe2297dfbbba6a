"""Prompt datasets: rows -> chat-templated, tokenized `PromptItem`s, over-long prompts filtered.

    items = load_prompt_files(["train.parquet"], layout="auto")
    dataset = PromptDataset(items, tokenizer, chat_template="tokenizer", max_prompt_tokens=512)
    dataset[0].prompt_ids, dataset[0].ground_truth
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from maspo_megatron.data.layouts import Prompt, detect_layout, map_row
from maspo_megatron.data.records import DataError, read_rows

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RawPrompt:
    """A prompt before templating: as read from a file (or generated), with where it came from."""

    prompt: Prompt
    ground_truth: str
    metadata: dict
    source: str  # "file:row N"


@dataclasses.dataclass(frozen=True)
class PromptItem:
    """One training prompt. `prompt_ids[P]` are the token ids of `prompt_text` (chat template applied)."""

    index: int
    prompt_ids: list
    prompt_text: str
    ground_truth: str
    metadata: dict
    source: str


def load_prompt_file(path: str | Path, layout: str = "auto", prompt_key: Optional[str] = None, answer_key: Optional[str] = None) -> list[RawPrompt]:
    """Every row of one jsonl/parquet file, mapped with `layout` (detected from row 1 when "auto")."""
    raws: list[RawPrompt] = []
    for number, row in read_rows(path):
        where = f"{path}:row {number}"
        if layout == "auto":
            try:
                layout = detect_layout(row)
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
        prompt, answer, metadata = map_row(row, layout, where, prompt_key, answer_key)
        raws.append(RawPrompt(prompt, answer, metadata, where))
    return raws


def load_prompt_files(paths: Sequence[str | Path], layout: str = "auto", prompt_key: Optional[str] = None, answer_key: Optional[str] = None) -> list[RawPrompt]:
    raws: list[RawPrompt] = []
    for path in paths:
        raws.extend(load_prompt_file(path, layout, prompt_key, answer_key))
    return raws


def _messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _plain_text(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def render_prompt(prompt: Prompt, tokenizer: Any, chat_template: str) -> tuple[str, bool]:
    """(prompt text, whether the tokenizer should add its special tokens when encoding it).

    chat_template: "tokenizer" (the tokenizer's own template, generation prompt added), "none"
    (the raw user text), or a format string containing `{prompt}` (e.g. "Q: {prompt}\\nA:").
    """
    if chat_template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.chat_template: the tokenizer has no chat template; use 'none' or a format string with {prompt}")
        text = tokenizer.apply_chat_template(_messages(prompt), tokenize=False, add_generation_prompt=True)
        return text, False  # the template already placed any BOS
    if chat_template == "none":
        return _plain_text(prompt), True
    if "{prompt}" not in chat_template:
        raise DataError(f"data.chat_template: {chat_template!r} is not 'tokenizer' or 'none' and has no {{prompt}} placeholder")
    # replace, not str.format: prompts are full of LaTeX braces
    return chat_template.replace("{prompt}", _plain_text(prompt)), True


class PromptDataset:
    """Templated, tokenized prompts; those over `max_prompt_tokens` are dropped (count logged, kept in `num_filtered`)."""

    def __init__(self, raws: Sequence[RawPrompt], tokenizer: Any, *, chat_template: str = "tokenizer", max_prompt_tokens: int = 512, name: str = "train"):
        if not raws:
            raise DataError(f"{name}: no prompts")
        self.name = name
        texts, add_special = [], []
        for raw in raws:
            text, special = render_prompt(raw.prompt, tokenizer, chat_template)
            texts.append(text)
            add_special.append(special)
        # One batched call per flag value: the fast tokenizer encodes in Rust, all at once.
        ids: list[Optional[list]] = [None] * len(texts)
        for flag in (False, True):
            positions = [i for i, s in enumerate(add_special) if s == flag]
            if positions:
                encoded = tokenizer([texts[i] for i in positions], add_special_tokens=flag)["input_ids"]
                for i, token_ids in zip(positions, encoded, strict=True):
                    ids[i] = list(token_ids)
        self.items: list[PromptItem] = []
        for raw, text, token_ids in zip(raws, texts, ids, strict=True):
            if len(token_ids) > max_prompt_tokens:
                continue
            self.items.append(PromptItem(len(self.items), token_ids, text, raw.ground_truth, raw.metadata, raw.source))
        self.num_filtered = len(raws) - len(self.items)
        if self.num_filtered:
            logger.warning("%s: dropped %d of %d prompts longer than max_prompt_tokens=%d", name, self.num_filtered, len(raws), max_prompt_tokens)
        if not self.items:
            raise DataError(f"{name}: all {len(raws)} prompts are longer than max_prompt_tokens={max_prompt_tokens}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        return self.items[index]

    def __iter__(self):
        return iter(self.items)
