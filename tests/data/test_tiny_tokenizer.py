"""The tiny character tokenizer: ids by hand, round trips, chat template, save/reload offline."""
from transformers import AutoTokenizer

from maspo_megatron.data import build_tiny_tokenizer


def test_ids_are_the_documented_character_table():
    tokenizer = build_tiny_tokenizer()
    # 6 special tokens, "\n" = 6, "\t" = 7, then printable ASCII from " " = 8: id = ord(c) - 24.
    assert tokenizer("12+7", add_special_tokens=False)["input_ids"] == [25, 26, 19, 31]
    assert tokenizer(" \n", add_special_tokens=False)["input_ids"] == [8, 6]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == 103
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [2]


def test_round_trip_and_special_tokens():
    tokenizer = build_tiny_tokenizer()
    text = "What is 3 plus 4?\n\\boxed{7}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    with_eos = tokenizer("\\boxed{7}<eos>", add_special_tokens=False)["input_ids"]
    assert with_eos[-1] == 1 and len(with_eos) == 10
    assert tokenizer.decode(with_eos, skip_special_tokens=True) == "\\boxed{7}"


def test_chat_template():
    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4="}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be brief.<eos><|user|>3+4=<eos><|assistant|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 3 and ids[-1] == 5 and ids.count(1) == 2


def test_deterministic_and_reloads_from_disk(tmp_path):
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    first.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|user|>9*9=<eos><|assistant|>\\boxed{81}<eos>"
    assert reloaded(text, add_special_tokens=False)["input_ids"] == first(text, add_special_tokens=False)["input_ids"]
    assert reloaded.chat_template == first.chat_template
    assert reloaded.pad_token_id == 0 and reloaded.eos_token_id == 1
