"""`LocalEngine`: an in-process `transformers` causal LM that samples in batches with a KV cache.

It is the embedded default (CPU tests, laptop runs). Weight sync writes into it through
`load_hf_state_dict`, the same HF-named tensors that SGLang servers receive.
"""
from __future__ import annotations

import inspect
import threading
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch

from maspo_megatron.rollout.local.sampling import sample_next, sequence_seed
from maspo_megatron.rollout.types import RolloutError, Sample, SamplingParams


def _eos_ids_of(model: torch.nn.Module) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    return tuple(sorted({int(i) for i in ids}))


def load_hf_causal_lm(path: Union[str, Path]) -> torch.nn.Module:
    """An fp32 `AutoModelForCausalLM` from a checkpoint dir, or randomly initialised from a config.json
    (or a dir holding only config.json)."""
    import transformers

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path}: does not exist (expected a HF model dir or config.json)")
    config_dir = path.parent if path.is_file() else path
    if path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        return transformers.AutoModelForCausalLM.from_pretrained(path).float()
    config = transformers.AutoConfig.from_pretrained(config_dir)
    return transformers.AutoModelForCausalLM.from_config(config).float()


def local_engine_dtype(choice: str, device: torch.device) -> torch.dtype:
    """`rollout.local_dtype` on this device: auto = bf16 on a GPU, fp32 on the CPU."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]


def hf_causal_lm_for_sync(hf_config, device: torch.device, dtype_choice: str, tokenizer, seed: int) -> torch.nn.Module:
    """A fresh HF model of the policy's architecture on `device` (weights seeded; the first weight sync sets
    them, so engine and trainer start from the same parameters), ending generation at the tokenizer's EOS."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).to(device, local_engine_dtype(dtype_choice, device))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


class LocalEngine:
    """Rollout engine over an in-process HF model (on its device and dtype; the model object is used, not copied).

    batch_size: sequences per forward; seed: base of the per-sequence sampling streams (a call's
    `SamplingParams.seed` overrides it; otherwise each call advances a counter so calls differ).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        batch_size: int = 64,
        seed: int = 1234,
        eos_token_ids: Optional[Iterable[int]] = None,
        weight_version: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be >= 1")
        self.model = model.eval()
        self.batch_size = batch_size
        self.seed = seed
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else _eos_ids_of(model)
        self._weight_version = int(weight_version)
        self._calls = 0
        self._lock = threading.Lock()  # generate vs load_hf_state_dict from another thread
        config = model.config
        self.vocab_size = int(config.vocab_size)
        self.max_positions = int(getattr(config, "max_position_embeddings", 1 << 30))
        # HF names -> live tensors (tied weights appear under each of their names).
        self._params = dict(model.state_dict(keep_vars=True))
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns); accept both.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], **kwargs) -> LocalEngine:
        """From a HF model dir (weights) or a config.json / config-only dir (random init)."""
        return cls(load_hf_causal_lm(path), **kwargs)

    # ---- interface -------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._weight_version

    def set_weight_version(self, weight_version: int) -> None:
        self._weight_version = int(weight_version)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[list[Sample]]:
        """prompts[P][len_p] -> P lists of n `Sample`s (prompt-major, sample order stable)."""
        if n < 1:
            raise ValueError(f"n: {n} must be >= 1")
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompts[{index}]: empty prompt")
            bad = [t for t in prompt if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise ValueError(f"prompts[{index}]: token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
            if len(prompt) >= self.max_positions:
                raise ValueError(f"prompts[{index}]: {len(prompt)} tokens leave no room under max_position_embeddings={self.max_positions}")
        with self._lock:
            base_seed = sampling.seed if sampling.seed is not None else self.seed + 1_000_003 * self._calls
            self._calls += 1
            jobs = [(p, s) for p in range(len(prompts)) for s in range(n)]
            results: dict[tuple[int, int], Sample] = {}
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start : start + self.batch_size]
                samples = self._generate_chunk([list(map(int, prompts[p])) for p, _ in chunk], chunk, sampling, base_seed)
                results.update(zip(chunk, samples, strict=True))
            return [[results[(p, s)] for s in range(n)] for p in range(len(prompts))]

    def pause_generation(self) -> None:
        """No-op: `generate` is synchronous, nothing runs between calls."""

    def continue_generation(self) -> None:
        """No-op (see pause_generation)."""

    def flush_cache(self) -> None:
        """No-op: the KV cache lives only inside one `generate` call."""

    def release_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None:
        """No-op on CPU: the engine shares host memory with the trainer."""

    def resume_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None:
        """No-op (see release_memory_occupation)."""

    def shutdown(self) -> None:
        self._params = {}

    # ---- weights ---------------------------------------------------------------------------------
    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor], weight_version: Optional[int] = None) -> None:
        """Copies HF-named tensors into the model in place (any subset, e.g. one bucket); casts dtype.

        Unknown names or shape mismatches raise ValueError naming the tensor; nothing is written then.
        `weight_version`, when given, becomes the engine's version after the copy.
        """
        checked = []
        for name, tensor in state_dict.items():
            target = self._params.get(name)
            if target is None:
                raise ValueError(f"load_hf_state_dict: {name!r} is not a tensor of this model")
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"load_hf_state_dict: {name!r} has shape {tuple(tensor.shape)}, model expects {tuple(target.shape)}")
            checked.append((target, tensor))
        with self._lock, torch.no_grad():
            for target, tensor in checked:
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            if weight_version is not None:
                self._weight_version = int(weight_version)

    def named_hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for every entry of the model's state dict (tied weights appear under each name)."""
        yield from self.model.state_dict().items()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    @staticmethod
    def _cache_of(out) -> object:
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    # ---- sampling loop ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _generate_chunk(
        self,
        prompts: list[list[int]],
        jobs: list[tuple[int, int]],
        sampling: SamplingParams,
        base_seed: int,
    ) -> list[Sample]:
        batch = len(prompts)
        device = next(self.model.parameters()).device
        lengths = torch.tensor([len(p) for p in prompts])
        width = int(lengths.max())
        # Left padding keeps every sequence's next token in the last column.
        input_ids = torch.zeros(batch, width, dtype=torch.long)
        attention_mask = torch.zeros(batch, width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
        input_ids, attention_mask, position_ids = (t.to(device) for t in (input_ids, attention_mask, position_ids))

        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        # Each sequence may not run past the model's context.
        budgets = torch.clamp(self.max_positions - lengths, max=sampling.max_new_tokens).to(device)
        generators = [torch.Generator().manual_seed(sequence_seed(base_seed, p, s)) for p, s in jobs]

        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        past = self._cache_of(out)
        logits = out.logits[:, -1, :]
        tokens_steps, logprob_steps = [], []
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        finish_step = torch.full((batch,), -1, dtype=torch.long, device=device)
        reasons = ["length"] * batch
        for step in range(int(budgets.max())):
            tokens, log_probs = sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p, generators)
            tokens = tokens.to(device)
            tokens_steps.append(tokens)
            logprob_steps.append(log_probs)
            hit_stop = torch.isin(tokens, stop_tensor) & ~finished
            hit_length = (budgets == step + 1) & ~finished & ~hit_stop
            for row in hit_stop.nonzero().flatten().tolist():
                reasons[row] = "stop"
            newly = hit_stop | hit_length
            finish_step[newly] = step
            finished |= newly
            if bool(finished.all()):
                break
            # Finished rows keep decoding (rows are independent); their extra tokens are dropped.
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
            position_ids = position_ids[:, -1:] + 1
            out = self.model(
                input_ids=tokens.unsqueeze(-1),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{self._cache_kwarg: past},
            )
            past = self._cache_of(out)
            logits = out.logits[:, -1, :]
        if not bool(finished.all()):
            raise RolloutError("local engine: generation loop ended with unfinished sequences (internal error)")
        all_tokens = torch.stack(tokens_steps, dim=1).cpu()  # [B, steps]
        all_logprobs = torch.stack(logprob_steps, dim=1).cpu()  # [B, steps] fp32
        samples = []
        for row in range(batch):
            length = int(finish_step[row]) + 1
            samples.append(
                Sample(
                    token_ids=all_tokens[row, :length].tolist(),
                    log_probs=all_logprobs[row, :length].clone(),
                    finish_reason=reasons[row],
                    weight_version=self._weight_version,
                )
            )
        return samples
