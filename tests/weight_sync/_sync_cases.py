"""Multi-process cases (run by tests/helpers/multiproc.run_distributed): a TP2 x PP2 Megatron policy
built from a tiny Qwen2 HF config, synced into the CPU engine or a stand-in SGLang server."""
from __future__ import annotations

import torch

VOCAB = 100  # padded to 256 rows on the Megatron side at TP2: the sync must trim them
SEED_POLICY, SEED_ENGINE = 11, 22


def hf_config(tied: bool, heads: int = 4, kv_heads: int = 2):
    import transformers

    return transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=tied, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, use_sliding_window=False, hidden_act="silu",
        eos_token_id=VOCAB + 5)  # no eos inside the vocab: sampled sequences run to max_new_tokens


def hf_model(tied: bool, seed: int, **heads):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(tied, **heads)).float().eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise so every tensor is distinctive
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def reference_state(tied: bool, **heads) -> dict:
    return {k: v.clone() for k, v in hf_model(tied, SEED_POLICY, **heads).state_dict().items()}


def build_policy(tied: bool, tp: int = 2, pp: int = 2, **heads):
    """(dims, chunks, wmap) with the policy's weights loaded from the reference HF model;
    heads: `heads` / `kv_heads` of `hf_config` (TP4 needs 4 query groups)."""
    from maspo_megatron.checkpoint.hf_weights import load_hf_weights
    from maspo_megatron.config.model import ModelConfig
    from maspo_megatron.config.parallel import ParallelConfig
    from maspo_megatron.models import WeightMap
    from maspo_megatron.models.config_builder import build_model_config
    from maspo_megatron.models.provider import gpt_model_provider
    from maspo_megatron.parallel import init_distributed

    parallel = ParallelConfig(tp=tp, pp=pp)
    dims = init_distributed(parallel, seed=1)
    config, meta = build_model_config(hf_config(tied, **heads), ModelConfig(dtype="fp32"), parallel)
    chunk = gpt_model_provider(config, meta, pre_process=dims.is_first_stage, post_process=dims.is_last_stage)
    wmap = WeightMap.from_hf_config(hf_config(tied, **heads), tp=tp)
    assert meta.padded_vocab_size > VOCAB
    reference = reference_state(tied, **heads)
    load_hf_weights(chunk, wmap, reference.__getitem__, dims.tp_rank, dims.tp)
    return dims, [chunk], wmap


def export_reference(dims, chunks, wmap) -> dict:
    """The models package's own HF export (C's export_hf_weights with an all-gather), on rank 0."""
    import torch.distributed as dist

    from maspo_megatron.checkpoint.hf_weights import export_hf_weights

    def gather(shard, name):
        parts = [torch.empty_like(shard) for _ in range(dims.tp)]
        dist.all_gather(parts, shard.contiguous(), group=dims.tp_group)
        return parts

    mine = {n: t.clone() for chunk in chunks for n, t in export_hf_weights(chunk, wmap, gather)}
    if dims.tp_rank != 0:
        mine = {}
    everything = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everything, dst=0)
    if dist.get_rank() != 0:
        return {}
    return {k: v for part in everything for k, v in part.items()}


def weight_sync_cfg(**overrides):
    from maspo_megatron.config.rollout import WeightSyncConfig

    cfg = WeightSyncConfig(bucket_bytes=6000, verify_weights=True)  # smaller than the 25.6 kB embedding
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


# ---- training step and trainer log-probs (Megatron pipeline schedule) ----------------------------
def _forward_step_factory(dims, collect: list):
    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    def forward_step(data_iterator, model):
        tokens, targets, mask = next(data_iterator)
        length = tokens.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)[None, None]
        output = model(tokens, torch.arange(length)[None], causal)

        def loss_func(logits):
            # Megatron's padded vocab rows produce real logits: mask them, the engine has no such tokens
            logits = logits.float()
            shard = logits.shape[-1]
            global_ids = torch.arange(dims.tp_rank * shard, (dims.tp_rank + 1) * shard)
            logits = logits.masked_fill(global_ids >= VOCAB, -1e30)
            log_prob, _ = vocab_parallel_logprobs_entropy(logits, targets, dims.tp_group)
            collect.append(log_prob.detach().clone())
            loss = -(log_prob * mask).sum()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    return forward_step


def run_schedule(dims, chunks, tokens: list, prompt_len: int, forward_only: bool) -> torch.Tensor:
    """Log-probs of tokens[prompt_len:] (on the last stage; empty elsewhere); backward too unless forward_only."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids = torch.tensor([tokens[:-1]])
    targets = torch.tensor([tokens[1:]])
    mask = torch.zeros_like(targets, dtype=torch.float32)
    mask[0, prompt_len - 1:] = 1.0
    collect: list = []
    get_forward_backward_func()(
        forward_step_func=_forward_step_factory(dims, collect), data_iterator=iter([(ids, targets, mask)]),
        model=chunks, num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=1, forward_only=forward_only)
    if not collect:
        return torch.empty(0)
    return collect[0][0, prompt_len - 1:]


def sgd_step(dims, chunks, tokens, prompt_len, lr: float = 0.5) -> None:
    """One real training step: Megatron schedule backward + plain SGD on every local shard."""
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    run_schedule(dims, chunks, tokens, prompt_len, forward_only=False)
    if dims.pp > 1 and (dims.is_first_stage or dims.is_last_stage):
        # tied embeddings: the first stage's embedding and the last stage's output-layer copy get the
        # summed gradient (what Megatron's finalize_model_grads does), so both copies stay equal
        from megatron.core import parallel_state as ps

        for chunk in chunks:
            if chunk.share_embeddings_and_output_weights:
                weight = chunk.shared_embedding_or_output_weight()
                torch.distributed.all_reduce(weight.grad, group=ps.get_embedding_group())
    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.parameters():
                if param.grad is not None:
                    param.add_(param.grad, alpha=-lr)


def _engine(tied: bool):
    from maspo_megatron.rollout.local.engine import LocalEngine

    return LocalEngine(hf_model(tied, SEED_ENGINE), batch_size=4, seed=5)


# ---- cases -----------------------------------------------------------------------------------------
def case_local(tied: bool, fp8: bool = False) -> dict:
    """TP2 x PP2 -> CPU engine: bit-exact weights, version, then train + sync + log-prob agreement."""
    import torch.distributed as dist

    from maspo_megatron.rollout.types import SamplingParams
    from maspo_megatron.rollout.weight_sync.syncer import WeightSyncer

    dims, chunks, wmap = build_policy(tied)
    rank0 = dist.get_rank() == 0
    engine = _engine(tied) if rank0 else None
    syncer = WeightSyncer(weight_sync_cfg(transport="local"), chunks, wmap, dims, engine=engine, engine_kind="local")
    out: dict = {}
    report = syncer.sync(weight_version=1)
    if rank0:
        out["after_first"] = {k: v.clone() for k, v in engine.state_dict().items()}
        out["version_1"] = engine.weight_version
        out["report"] = report

    prompt = [3, 17, 42, 8, 99]
    sequence = [None]
    if rank0:
        sample = engine.generate([prompt], 1, SamplingParams(max_new_tokens=10, seed=7))[0][0]
        sequence[0] = prompt + sample.token_ids
    dist.broadcast_object_list(sequence, src=0)
    sgd_step(dims, chunks, sequence[0], len(prompt))
    syncer.sync(weight_version=2)
    exported = export_reference(dims, chunks, wmap)

    sampled = [None]
    if rank0:
        out["after_second"] = {k: v.clone() for k, v in engine.state_dict().items()}
        out["export"] = exported
        out["version_2"] = engine.weight_version
        sample = engine.generate([prompt], 1, SamplingParams(max_new_tokens=12, seed=9))[0][0]
        out["engine_log_probs"] = sample.log_probs.clone()
        sampled[0] = prompt + sample.token_ids
    dist.broadcast_object_list(sampled, src=0)
    trainer_log_probs = run_schedule(dims, chunks, sampled[0], len(prompt), forward_only=True)
    if dims.is_last_stage and dims.tp_rank == 0:
        out["trainer_log_probs"] = trainer_log_probs
    out["_policy"] = (dims, chunks, wmap)
    return out


class _CorruptingEngine:
    """A CPU engine that silently damages one tensor (its flat element `index`) on load: verify_weights must notice."""

    def __init__(self, engine, victim: str, index: int = 3):
        self._engine, self._victim, self._index = engine, victim, index

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def load_hf_state_dict(self, state_dict, weight_version=None):
        self._engine.load_hf_state_dict(state_dict, weight_version)
        if self._victim in state_dict:
            with torch.no_grad():
                dict(self._engine.model.named_parameters())[self._victim].view(-1)[self._index] += 1e-3


def case_corrupted(dims, chunks, wmap, victim: str) -> str:
    """One more sync into an engine that damages `victim` on load; returns the error every rank saw."""
    import torch.distributed as dist

    from maspo_megatron.rollout.weight_sync.syncer import WeightSyncer
    from maspo_megatron.rollout.weight_sync.transports import WeightSyncError

    engine = _CorruptingEngine(_engine(False), victim) if dist.get_rank() == 0 else None
    syncer = WeightSyncer(weight_sync_cfg(transport="local"), chunks, wmap, dims, engine=engine, engine_kind="local")
    try:
        syncer.sync(weight_version=3)
    except WeightSyncError as exc:
        return str(exc)
    return ""


def case_verify_rows_follow_the_trait(victim: str) -> dict:
    """One process (TP1 x PP1), two throwaway engines (the CPU engine under other names) whose sync damages the
    LAST element of `victim`, compared with verify_rows=1: {engine name: the sync's error, "" if none}."""
    from maspo_megatron.rollout.registry import EngineTraits, register_engine, unregister_engine
    from maspo_megatron.rollout.weight_sync.syncer import WeightSyncer
    from maspo_megatron.rollout.weight_sync.transports import WeightSyncError

    dims, chunks, wmap = build_policy(False, tp=1, pp=1)
    out = {}
    for name, traits in (("scratch_whole", EngineTraits(reads_back_whole_tensors=True)),
                         ("scratch_rows", EngineTraits())):
        register_engine(name, lambda rollout_cfg, **_: None, default_transport=lambda cuda: "local", traits=traits)
        try:
            engine = _CorruptingEngine(_engine(False), victim, index=-1)
            syncer = WeightSyncer(weight_sync_cfg(transport="local", verify_rows=1), chunks, wmap, dims,
                                  engine=engine, engine_kind=name)
            syncer.sync(weight_version=1)
            out[name] = ""
        except WeightSyncError as exc:
            out[name] = str(exc)
        finally:
            unregister_engine(name)
    return out


def gather_paths_agree(dims, chunks, wmap) -> dict:
    """The shared-memory TP gather (used on one CPU host) and the collective one (GPUs, several hosts)
    give the same full tensors; returns {"compared": n, "mismatched": [names]} on TP sources."""
    from maspo_megatron.rollout.weight_sync.hf_stream import mapped_parameters
    from maspo_megatron.rollout.weight_sync.tp_gather import TPGatherer

    params = [(n, p) for chunk in chunks for n, p in mapped_parameters(chunk, wmap)]
    results = []
    for shared in (True, False):
        with TPGatherer([p for _, p in params], dims, use_shared_memory=shared) as gatherer:
            assert gatherer.shared == shared
            results.append({n: gatherer.gather_full(p, *wmap.tp_split(n)) for n, p in params})
    names = [n for n in results[0] if results[0][n] is not None]
    return {"compared": len(names), "mismatched": [n for n in names if not torch.equal(results[0][n], results[1][n])]}


def case_local_all(victim: str) -> dict:
    """Untied (with a corrupted sync at the end) and tied models, in the same four processes."""
    untied = case_local(False)
    dims, chunks, wmap = untied.pop("_policy")
    untied["gather_paths"] = gather_paths_agree(dims, chunks, wmap)
    untied["corrupted_message"] = case_corrupted(dims, chunks, wmap, victim)
    tied = case_local(True)
    tied.pop("_policy")
    return {"untied": untied, "tied": tied}


def server_weights(engine, names) -> dict:
    """Every named tensor as the server holds it, read back through /get_weights_by_name."""
    out = {}
    for name in names:
        (body,) = engine.get_weights_by_name(name, truncate_size=1 << 30).values()
        out[name] = torch.tensor(body, dtype=torch.float32)
    return out


def case_sglang(urls: dict, disk_dir: str, plan: list) -> dict:
    """TP2 x PP2 -> stand-in SGLang servers over each transport in turn. Before each sync the policy
    moves (every parameter + 0.01 * k), so each transport must deliver new values; rank 0 returns
    what the server holds and the models package's export of what it should hold."""
    import torch.distributed as dist

    from maspo_megatron.config.rollout import SGLangConfig
    from maspo_megatron.rollout.sglang.engine import SGLangEngine
    from maspo_megatron.rollout.weight_sync.syncer import WeightSyncer, close_rollout

    dims, chunks, wmap = build_policy(False)
    rank0 = dist.get_rank() == 0
    out = []
    for step, (label, transport) in enumerate(plan, start=1):
        with torch.no_grad():
            for chunk in chunks:
                for param in chunk.parameters():
                    param.add_(0.01 * step)
        engine = SGLangEngine(SGLangConfig(urls=[urls[label]])) if rank0 else None
        cfg = weight_sync_cfg(transport=transport, disk_dir=disk_dir, verify_rows=3, group_timeout_s=60.0)
        syncer = WeightSyncer(cfg, chunks, wmap, dims, engine=engine, engine_kind="sglang")
        try:
            report = syncer.sync(weight_version=10 + step)
            expected = export_reference(dims, chunks, wmap)
            if rank0:
                out.append({"key": (label, transport), "report": report, "expected": expected,
                            "held": server_weights(engine, expected), "version": engine.get("/model_info")})
        finally:
            close_rollout(syncer, engine)  # the trainer's order: syncer (destroys the groups) before engine
    return out


# ---- export paths: shared bucket vs collective vs general --------------------------------------------
def _export_pass(dims, chunks, wmap, bucket_bytes: int, buffers) -> dict:
    """One export per path on every rank; on stage sources the buckets (names + cloned tensors)."""
    from maspo_megatron.rollout.weight_sync.bucket_writer import iter_export_buckets
    from maspo_megatron.rollout.weight_sync.bucketing import iter_buckets
    from maspo_megatron.rollout.weight_sync.hf_stream import megatron_hf_stream

    def collect(buckets):
        return [[(n, t.clone()) for n, t in bucket] for bucket in buckets]

    def collect_lagging(buckets):
        """count=2: bucket i must still be intact after bucket i + 1 was produced; cloned only then."""
        out, previous = [], None
        for bucket in buckets:
            if previous is not None:
                out.append([(n, t.clone()) for n, t in previous])
            previous = bucket
        if previous is not None:
            out.append([(n, t.clone()) for n, t in previous])
        return out

    return {"shared": collect(iter_export_buckets(chunks, wmap, dims, buffers["shared"], shared=True)),
            "shared_two": collect_lagging(iter_export_buckets(chunks, wmap, dims, buffers["shared_two"], shared=True)),
            "auto": collect(iter_export_buckets(chunks, wmap, dims, buffers["auto"])),
            "collective": collect(iter_export_buckets(chunks, wmap, dims, buffers["collective"], shared=False)),
            "general": collect(iter_buckets(megatron_hf_stream(chunks, wmap, dims), bucket_bytes))}


def case_export_paths(tp: int, plans: list) -> list:
    """For each (tied, bucket_bytes, heads): the shared-bucket, auto, collective and general exports of a
    TP x PP2 policy, twice through the same (kept) buffers with the policy moved in between."""
    from maspo_megatron.rollout.weight_sync.bucket_writer import BucketBuffers

    out = []
    for tied, bucket_bytes, heads in plans:
        dims, chunks, wmap = build_policy(tied, tp=tp, pp=2, **heads)
        buffers = {key: BucketBuffers(bucket_bytes) for key in ("shared", "auto", "collective")}
        buffers["shared_two"] = BucketBuffers(bucket_bytes, count=2)
        passes = [_export_pass(dims, chunks, wmap, bucket_bytes, buffers)]
        mapped = buffers["shared"].shared.tensor.data_ptr()
        with torch.no_grad():
            for chunk in chunks:
                for param in chunk.parameters():
                    param.mul_(-1.5).add_(0.25)  # the second pass must not see the first's bytes
        passes.append(_export_pass(dims, chunks, wmap, bucket_bytes, buffers))
        out.append({"tied": tied, "bucket_bytes": bucket_bytes, "heads": heads, "passes": passes,
                    "source": dims.tp_rank == 0, "auto_picked_shared": buffers["auto"].shared is not None,
                    "kept_mapping": buffers["shared"].shared.tensor.data_ptr() == mapped,
                    "shared_nbytes": buffers["shared"].shared.nbytes, "padded_vocab": wmap.meta.padded_vocab_size})
    return out


def case_verify_refused(url: str) -> str:
    """verify_weights against a server that cannot read weights back: every rank's WeightSyncer raises."""
    import torch.distributed as dist

    from maspo_megatron.config.rollout import SGLangConfig
    from maspo_megatron.rollout.sglang.engine import SGLangEngine
    from maspo_megatron.rollout.weight_sync.syncer import WeightSyncer
    from maspo_megatron.rollout.weight_sync.transports import WeightSyncError

    dims, chunks, wmap = build_policy(False, tp=2, pp=1)
    engine = SGLangEngine(SGLangConfig(urls=[url])) if dist.get_rank() == 0 else None
    try:
        WeightSyncer(weight_sync_cfg(transport="disk", disk_dir="/nonexistent-never-written"), chunks, wmap, dims,
                     engine=engine, engine_kind="sglang")
    except WeightSyncError as exc:
        return str(exc)
    finally:
        if engine is not None:
            engine.shutdown()
    return "no error"
