"""Chat templating, tokenization and the max_prompt_tokens filter."""
import json
import logging

import pytest

from maspo_megatron.config import load_config
from maspo_megatron.data import (
    DataError,
    PromptDataset,
    RawPrompt,
    build_datasets,
    build_tiny_tokenizer,
    load_gsm8k,
    load_math,
)


def raw(prompt, answer="1"):
    return RawPrompt(prompt, answer, {"m": 1}, "test")


def test_chat_template_modes():
    tokenizer = build_tiny_tokenizer()
    via_tokenizer = PromptDataset([raw("2+2=")], tokenizer, chat_template="tokenizer")
    assert via_tokenizer[0].prompt_text == "<|user|>2+2=<eos><|assistant|>"
    assert via_tokenizer[0].prompt_ids == [4, 26, 19, 26, 37, 1, 5]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert PromptDataset([raw(messages)], tokenizer)[0].prompt_text == "<|system|>S<eos><|user|>Q<eos><|assistant|>"
    plain = PromptDataset([raw("2+2=")], tokenizer, chat_template="none")
    assert (plain[0].prompt_text, plain[0].prompt_ids) == ("2+2=", [26, 19, 26, 37])
    formatted = PromptDataset([raw("x^{2}")], tokenizer, chat_template="Q: {prompt}\nA:")
    assert formatted[0].prompt_text == "Q: x^{2}\nA:"
    item = formatted[0]
    assert (item.ground_truth, item.metadata, item.source, item.index) == ("1", {"m": 1}, "test", 0)


def test_template_errors():
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(DataError, match="data.chat_template: 'Q: ' is not 'tokenizer' or 'none'"):
        PromptDataset([raw("a")], tokenizer, chat_template="Q: ")
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        PromptDataset([raw("a")], tokenizer)


def test_long_prompts_are_filtered_and_counted(caplog):
    tokenizer = build_tiny_tokenizer()
    raws = [raw("a" * n) for n in (1, 10, 3, 50, 4)]
    with caplog.at_level(logging.WARNING, logger="maspo_megatron.data.prompts"):
        dataset = PromptDataset(raws, tokenizer, chat_template="none", max_prompt_tokens=4, name="train")
    assert [len(item.prompt_ids) for item in dataset] == [1, 3, 4]
    assert [item.index for item in dataset] == [0, 1, 2]
    assert dataset.num_filtered == 2
    assert "train: dropped 2 of 5 prompts longer than max_prompt_tokens=4" in caplog.text
    with pytest.raises(DataError, match="all 1 prompts are longer than max_prompt_tokens=2"):
        PromptDataset([raw("abc")], tokenizer, chat_template="none", max_prompt_tokens=2)


def test_gsm8k_and_math_loaders(tmp_path):
    tokenizer = build_tiny_tokenizer()
    gsm = tmp_path / "gsm8k_test.jsonl"
    gsm.write_text(json.dumps({"question": "Tom has 3 bags of 4 apples. How many?", "answer": "3*4=12\n#### 12"}) + "\n")
    dataset = load_gsm8k(str(gsm), tokenizer, chat_template="none")
    assert dataset[0].ground_truth == "12"
    math = tmp_path / "math500.jsonl"
    math.write_text(json.dumps({"problem": "Half of one?", "solution": "It is $\\boxed{\\frac12}$", "level": 1}) + "\n")
    assert load_math(str(math), tokenizer)[0].ground_truth == "\\frac12"


def test_build_datasets_from_config(tmp_path):
    tokenizer = build_tiny_tokenizer()
    synthetic_cfg = load_config(overrides=["data.synthetic.num_train=30", "data.synthetic.num_val=5"]).data
    train, val = build_datasets(synthetic_cfg, tokenizer)
    assert len(train) == 30 and list(val) == ["synthetic"] and len(val["synthetic"]) == 5
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "label": str(i + 1)}) + "\n" for i in range(4)))
    files_cfg = load_config(overrides=[f"data.train_files=[{path}]", f"data.val_files={{dev: {path}}}", "data.format=slime"]).data
    train, val = build_datasets(files_cfg, tokenizer)
    assert [item.ground_truth for item in train] == ["1", "2", "3", "4"] and list(val) == ["dev"]
