"""The local engine against a teacher-forced forward of the same model (fp32)."""
import pytest
import torch

from maspo_megatron.config import RolloutConfig
from maspo_megatron.rollout import RolloutEngine, SamplingParams, build_engine
from maspo_megatron.rollout.local import LocalEngine
from tests.rollout.conftest import EOS_ID, tiny_model

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]  # different lengths: left padding is exercised


def teacher_forced_logprobs(model, prompt, response, temperature):
    """log_softmax(logits / T) of each response token, from ONE unpadded forward over prompt+response."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("top_p,top_k", [(1.0, -1), (0.8, 20)])
def test_logprobs_equal_teacher_forced_forward(top_p, top_k):
    model = tiny_model(1)
    engine = LocalEngine(model, batch_size=4)
    sampling = SamplingParams(temperature=0.7, top_p=top_p, top_k=top_k, max_new_tokens=24, seed=11)
    groups = engine.generate(PROMPTS, 3, sampling)
    assert [len(g) for g in groups] == [3, 3, 3]
    lengths = set()
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for sample in group:
            assert sample.log_probs.dtype == torch.float32
            assert len(sample.token_ids) == sample.log_probs.numel() >= 1
            expected = teacher_forced_logprobs(model, prompt, sample.token_ids, 0.7)
            torch.testing.assert_close(sample.log_probs, expected, atol=1e-5, rtol=0)
            lengths.add(len(sample.token_ids))
    # The temperature matters: at T=1 the same tokens have different log-probs.
    sample = groups[0][0]
    assert not torch.allclose(teacher_forced_logprobs(model, PROMPTS[0], sample.token_ids, 1.0), sample.log_probs, atol=1e-3)


def test_top_k_restricts_support():
    model = tiny_model(2)
    engine = LocalEngine(model)
    groups = engine.generate([PROMPTS[0]], 16, SamplingParams(temperature=1.0, top_k=2, max_new_tokens=1, ignore_eos=True, seed=0))
    with torch.no_grad():
        top2 = set(model(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1].topk(2).indices.tolist())
    drawn = {s.token_ids[0] for s in groups[0]}
    assert drawn <= top2 and len(drawn) == 2


def test_deterministic_given_seed_and_independent_of_batching():
    model = tiny_model(3)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
    a = LocalEngine(model, batch_size=64).generate(PROMPTS, 2, sampling)
    b = LocalEngine(model, batch_size=1).generate(PROMPTS, 2, sampling)
    c = LocalEngine(model, batch_size=64).generate(PROMPTS, 2, SamplingParams(temperature=1.0, max_new_tokens=12, seed=6))
    tokens = lambda groups: [s.token_ids for g in groups for s in g]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert tokens(a) != tokens(c)
    for x, y in zip(a, b, strict=True):
        for s, t in zip(x, y, strict=True):
            torch.testing.assert_close(s.log_probs, t.log_probs, atol=1e-5, rtol=0)


def test_length_stop_and_ignore_eos():
    model = tiny_model(4)
    engine = LocalEngine(model)
    with torch.no_grad():
        greedy_first = int(model(input_ids=torch.tensor([PROMPTS[1]])).logits[0, -1].argmax())
    # Greedy (top_k=1) first token made a stop token: every sample stops right there, token included.
    stopped = engine.generate([PROMPTS[1]], 2, SamplingParams(top_k=1, max_new_tokens=9, stop_token_ids=(greedy_first,)))
    for sample in stopped[0]:
        assert (sample.token_ids, sample.finish_reason) == ([greedy_first], "stop")
    # ignore_eos + no stop ids: every sample runs to max_new_tokens.
    long = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=7, ignore_eos=True, seed=1))
    assert all(s.finish_reason == "length" and len(s.token_ids) == 7 for g in long for s in g)
    # eos from the model config ends a sample and is kept as its last token.
    eos_model = LocalEngine(model, eos_token_ids=[t for t in range(64)])
    for sample in eos_model.generate(PROMPTS, 1, SamplingParams(max_new_tokens=5, seed=2))[0]:
        assert sample.finish_reason == "stop" and len(sample.token_ids) == 1
    assert LocalEngine(model).eos_token_ids == (EOS_ID,)


def test_load_hf_state_dict_in_place_and_errors():
    engine = LocalEngine(tiny_model(5), weight_version=0)
    other = tiny_model(6)
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True, seed=3)
    before = engine.generate(PROMPTS, 1, sampling)
    state = other.state_dict()
    names = list(state)
    engine.load_hf_state_dict({k: state[k] for k in names[: len(names) // 2]})  # one "bucket"
    engine.load_hf_state_dict({k: state[k] for k in names[len(names) // 2 :]}, weight_version=7)
    assert engine.weight_version == 7
    for name, tensor in engine.named_hf_tensors():
        torch.testing.assert_close(tensor, state[name], atol=0, rtol=0)
    after = engine.generate(PROMPTS, 1, sampling)
    assert after[0][0].weight_version == 7 and before[0][0].weight_version == 0
    reference = LocalEngine(other).generate(PROMPTS, 1, sampling)
    assert [s.token_ids for g in after for s in g] == [s.token_ids for g in reference for s in g]
    with pytest.raises(ValueError, match="model.nope"):
        engine.load_hf_state_dict({"model.nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="lm_head.weight.*shape"):
        engine.load_hf_state_dict({"lm_head.weight": torch.zeros(3, 3)})
    assert engine.weight_version == 7


def test_bad_inputs_and_registry(tiny_model_dir):
    engine = build_engine(RolloutConfig(engine="local", local_batch_size=2), model_path=tiny_model_dir)
    assert isinstance(engine, RolloutEngine) and engine.batch_size == 2
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty"):
        engine.generate([[1], []], 1, SamplingParams())
    with pytest.raises(ValueError, match=r"prompts\[0\]: token id 999"):
        engine.generate([[999]], 1, SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="rollout.engine"):
        build_engine(_named("nope"))
    sampling = SamplingParams.from_config(RolloutConfig(temperature=0.5, max_new_tokens=3))
    assert (sampling.temperature, sampling.max_new_tokens) == (0.5, 3)


def _named(name):
    cfg = RolloutConfig()
    cfg.engine = name
    return cfg
