"""A deterministic character-level tokenizer, built offline, for the tiny CPU policy and tests.

One token per printable ASCII character (plus newline and tab), so arithmetic like `12+7` is
`1`,`2`,`+`,`7` and a tiny model learns digits rather than arbitrary merges. Special tokens:
`<pad>`, `<eos>` (end of a turn and of generation), `<unk>`, and the role markers `<|user|>`,
`<|assistant|>`, `<|system|>` used by the chat template:

    <|user|>3+4=<eos><|assistant|>          (add_generation_prompt=True)
    ... the model answers \\boxed{7}<eos>
"""
from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
CHARACTERS = "\n\t" + "".join(chr(c) for c in range(32, 127))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<eos>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tiny_vocab() -> dict[str, int]:
    """token -> id: the special tokens first (pad = 0), then the characters in code-point order."""
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}


def build_tiny_tokenizer():
    """A `transformers.PreTrainedTokenizerFast` (vocab of 103 tokens), the same on every call."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character is its own piece; decoding concatenates them back without spaces.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=4096,
        padding_side="left",  # generation batches left-pad prompts
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
