"""The synthetic arithmetic task: deterministic, configurable, and its answers verify with math-verify."""
import ast
import operator

import pytest

from maspo_megatron.config import ConfigError, SyntheticTaskConfig, load_config
from maspo_megatron.data import ArithmeticTask, PromptDataset, build_tiny_tokenizer, reference_response
from maspo_megatron.rewards import math_reward

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def independent_value(expression: str) -> int:
    """Evaluates '3+4*2' with Python's own grammar (not the task's evaluator)."""
    def walk(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        return node.value
    return walk(ast.parse(expression, mode="eval").body)


def task(seed=0, **fields):
    return ArithmeticTask(SyntheticTaskConfig(**fields), seed=seed)


def test_deterministic_by_seed_and_split():
    a = ArithmeticTask(SyntheticTaskConfig(), seed=1).generate(50)
    assert a == ArithmeticTask(SyntheticTaskConfig(), seed=1).generate(50)
    assert a != ArithmeticTask(SyntheticTaskConfig(), seed=2).generate(50)
    assert a != ArithmeticTask(SyntheticTaskConfig(), seed=1).generate(50, split="val")


def test_symbolic_answers_are_right():
    raws = task(num_operands=3, max_operand=12, operations=["+", "-", "*"]).generate(300)
    for item in raws:
        expression = item.prompt.rstrip("=")
        assert int(item.ground_truth) == independent_value(expression), item.prompt
        assert int(item.ground_truth) >= 0
        assert item.metadata["reference"] == "\\boxed{" + item.ground_truth + "}"


def test_difficulty_knobs():
    raws = task(num_operands=4, min_operand=10, max_operand=99, operations=["*"]).generate(50)
    for item in raws:
        operands = item.metadata["operands"]
        assert len(operands) == 4 and all(10 <= x <= 99 for x in operands)
        assert item.prompt.count("*") == 3
    words = task(templates="words", operations=["-"]).generate(30)
    assert all("minus" in r.prompt and "=" not in r.prompt for r in words)
    short = task().generate(200)
    assert max(len(r.prompt) for r in short) == 4  # "9+9=": a few characters
    assert max(len(reference_response(r)) for r in short) <= len("\\boxed{18}")


def test_references_score_correct_with_math_verify():
    raws = task(num_operands=3, operations=["+", "-", "*"], templates="mixed").generate(40)
    raws += task(answer_format="hash").generate(10)
    for item in raws:
        response = reference_response(item)
        assert math_reward(response, item.ground_truth).reason == "correct", (item.prompt, response)
        wrong = str(int(item.ground_truth) + 1)
        assert math_reward("\\boxed{" + wrong + "}", item.ground_truth).reason == "wrong"
    assert task(answer_format="hash").generate(1)[0].metadata["reference"].startswith("#### ")


def test_prompts_tokenize_short():
    dataset = PromptDataset(task().generate(20), build_tiny_tokenizer(), max_prompt_tokens=16)
    assert dataset.num_filtered == 0 and max(len(i.prompt_ids) for i in dataset) <= 7


def test_bad_config_is_named():
    with pytest.raises(ConfigError, match="data.synthetic.operations"):
        load_config(overrides=["data.synthetic.operations=['/']"])
    with pytest.raises(ConfigError, match="data.synthetic.min_operand: 5 must be <= max_operand"):
        load_config(overrides=["data.synthetic.min_operand=5", "data.synthetic.max_operand=3"])


def test_plain_answers_score_with_an_anchored_pattern():
    pattern = r"^\s*(\d+)\s*$"
    for item in task(answer_format="plain", max_operand=49).generate(20):
        response = reference_response(item)
        assert response == item.ground_truth  # the number alone: every response token is a digit
        assert math_reward(response, item.ground_truth, answer_pattern=pattern).reason == "correct"
        assert math_reward(str(int(response) + 1), item.ground_truth, answer_pattern=pattern).reason == "wrong"
        assert math_reward(response + " 7", item.ground_truth, answer_pattern=pattern).reason.startswith("unparsable")
    with pytest.raises(ConfigError, match="data.synthetic.answer_format: 'plain' .* reward.answer_pattern"):
        load_config(overrides=["data.synthetic.answer_format=plain"])
    config = load_config(overrides=["data.synthetic.answer_format=plain", r"reward.answer_pattern=^\s*(\d+)\s*$"])
    assert config.reward.answer_pattern == r"^\s*(\d+)\s*$"


def test_reference_noise_changes_one_digit_of_train_references_only():
    clean = task(max_operand=49, answer_format="plain").generate(2000)
    noisy = task(max_operand=49, answer_format="plain", reference_noise=0.2).generate(2000)
    changed = 0
    for a, b in zip(clean, noisy, strict=True):
        assert (a.prompt, a.ground_truth) == (b.prompt, b.ground_truth)  # same problems, same rewards
        ref, truth = b.metadata["reference"], b.ground_truth
        if ref != truth:
            changed += 1
            assert len(ref) == len(truth) and sum(x != y for x, y in zip(ref, truth, strict=True)) == 1, (ref, truth)
            assert len(ref) == 1 or ref[0] != "0"
    assert 0.17 < changed / 2000 < 0.23  # binomial(2000, 0.2): sd 0.009
    held_out = task(max_operand=49, answer_format="plain", reference_noise=0.2).generate(200, split="val")
    assert all(r.metadata["reference"] == r.ground_truth for r in held_out)
    with pytest.raises(ConfigError, match="data.synthetic.reference_noise"):
        load_config(overrides=["data.synthetic.reference_noise=1.0"])
