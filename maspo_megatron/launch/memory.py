"""Memory per GPU of a training config on a cluster shape: the numbers behind `python -m maspo_megatron plan`.

Everything is computed from the HF config's shape fields (`ModelMeta`) and the training config,
with these stated assumptions (bytes per parameter unless said otherwise):

  weights      2 (bf16/fp16) or 4 (fp32); FP8 training (TE) adds 1 for the FP8 weight copy
  grads        4: Megatron's DDP accumulates main grads in fp32
  optimizer    Adam moments 4 + 4, plus a 4-byte fp32 master copy when weights are not fp32;
               divided by the data-parallel size with the distributed optimizer
  activations  per token and layer, in the model dtype (flash attention: no s^2 term):
               h-sized tensors (attention input, norm outputs, MLP input) 4h, divided by TP only
               with sequence parallel; TP-split tensors qkv (nh + 2 nkv) hd, attention output
               nh hd, SwiGLU fc1 2 ffn and its output ffn. Full recompute keeps only the layer
               input (h) plus one layer's full set. Pipeline 1F1B: the first stage holds PP
               micro-batches in flight. Tokens per micro-batch: trainer.micro_batch_tokens / CP.
               The last stage adds fp32 logits: tokens x padded_vocab / TP x 4.
  rollout      SGLang takes mem_fraction_static x GPU memory for its weights (2 bytes per
               parameter, 1 with fp8 quantization, / sglang TP) and a KV pool (the rest). A token
               costs 2 (K,V) x layers x nkv x hd x 2 bytes (1 with --kv-cache-dtype fp8*) / sglang TP.
               The plan is refused when the pool cannot hold one full-length sequence
               (max_prompt_tokens + max_new_tokens); fewer than the wanted concurrent sequences
               (min(max_concurrency, a server's share of prompts_per_step x n_samples)) only queue.

The rollout terms count for an engine whose registry traits say `sglang_servers` (rollout/registry.py);
any other engine adds nothing here (mode "local"). Phases: colocated GPUs hold the training state during rollout (SGLang's memory is released
during training when enable_memory_saver); disaggregated rollout GPUs hold only SGLang.
The layer count of the heaviest pipeline stage is ceil(layers / PP).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from maspo_megatron.config.schema import Config
from maspo_megatron.rollout.registry import engine_traits

GIB = 1024**3


class PlanError(ValueError):
    """A plan that cannot run (layout does not divide, or memory does not fit); one-line message."""


@dataclasses.dataclass(frozen=True)
class ClusterShape:
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float = 80.0
    rollout_nodes: int = 0  # > 0: disaggregated, the LAST rollout_nodes nodes run SGLang only
    reserve_gib: float = 3.0  # CUDA context, NCCL buffers, allocator fragmentation

    @property
    def trainer_gpus(self) -> int:
        return (self.nodes - self.rollout_nodes) * self.gpus_per_node

    @property
    def rollout_gpus(self) -> int:
        return self.rollout_nodes * self.gpus_per_node


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per GPU. `train_*` on training GPUs; `rollout_*` where SGLang runs."""
    mode: str  # colocated | disaggregated | external | local
    total_params: int
    params_per_gpu: int  # heaviest pipeline stage, TP-sharded
    dp: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    rollout_weights: int
    kv_cache: int
    kv_tokens_per_server: int  # tokens the KV pool of one server holds
    kv_full_sequences: int  # full-length sequences a server holds at once
    kv_wanted_sequences: int  # sequences a server is asked for at once
    train_phase: int  # peak on a training GPU while Megatron trains
    rollout_phase: int  # peak on a GPU running SGLang (colocated: includes the training state)
    usable: int

    @property
    def peak(self) -> int:
        return max(self.train_phase, self.rollout_phase)

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable


def layer_params(meta) -> int:
    """Parameters of one transformer layer (attention, SwiGLU MLP, two norms, optional biases/qk norms)."""
    h, hd = meta.hidden_size, meta.head_dim
    qkv_out = (meta.num_heads + 2 * meta.num_kv_heads) * hd
    attn = h * qkv_out + meta.num_heads * hd * h + (qkv_out if meta.qkv_bias else 0) + (2 * hd if meta.qk_norm else 0)
    return attn + 3 * h * meta.ffn_hidden_size + 2 * h


def total_params(meta) -> int:
    """Whole-model parameters with Megatron's padded vocab (the output layer counted once if tied)."""
    embed = meta.padded_vocab_size * meta.hidden_size
    return meta.num_layers * layer_params(meta) + embed * (1 if meta.tied_embeddings else 2) + meta.hidden_size


def params_per_gpu(meta, tp: int, pp: int) -> int:
    """Parameters on the heaviest pipeline stage of one TP rank (norms are replicated, not split)."""
    h = meta.hidden_size
    layers = math.ceil(meta.num_layers / pp)
    norm_like = 2 * h + (2 * meta.head_dim if meta.qk_norm else 0)
    per_layer = (layer_params(meta) - norm_like) // tp + norm_like
    embed = meta.padded_vocab_size * h // tp
    if pp == 1:
        ends = embed * (1 if meta.tied_embeddings else 2) + h
    else:
        # first stage: embedding; last stage: output layer (a copy of the embedding when tied) + final norm
        ends = embed + h
    return layers * per_layer + ends


def activation_bytes(meta, cfg: Config) -> int:
    """Activations of the heaviest stage on one GPU (see the module docstring)."""
    par, dtype_bytes = cfg.parallel, (4 if cfg.model.dtype == "fp32" else 2)
    tokens = math.ceil(cfg.trainer.micro_batch_tokens / par.cp)
    h, hd = meta.hidden_size, meta.head_dim
    h_split = par.tp if par.sequence_parallel else 1
    full_layer = dtype_bytes * (4 * h // h_split + ((meta.num_heads + 2 * meta.num_kv_heads) * hd
                                                     + meta.num_heads * hd + 3 * meta.ffn_hidden_size) // par.tp)
    layers = math.ceil(meta.num_layers / par.pp)
    if cfg.model.recompute == "full":
        per_microbatch = tokens * (layers * dtype_bytes * h // h_split + full_layer)
    else:
        per_microbatch = tokens * layers * full_layer
    logits = tokens * (meta.padded_vocab_size // par.tp) * 4
    first_stage = par.pp * per_microbatch + (logits if par.pp == 1 else 0)
    last_stage = per_microbatch + logits
    return max(first_stage, last_stage)


def _kv_bytes_per_elem(cfg: Config) -> int:
    args = " ".join(cfg.rollout.sglang.extra_args)
    return 1 if "--kv-cache-dtype fp8" in args or "--kv-cache-dtype=fp8" in args else 2


def _mode(cfg: Config, shape: ClusterShape) -> str:
    if not engine_traits(cfg.rollout.engine).sglang_servers:
        return "local"
    if cfg.rollout.sglang.urls:
        return "external"
    return "disaggregated" if shape.rollout_nodes else "colocated"


def check_layout(meta, cfg: Config, shape: ClusterShape) -> int:
    """Raises PlanError when the parallel layout cannot run on `shape`; returns the DP size."""
    par = cfg.parallel
    if shape.rollout_nodes >= shape.nodes:
        raise PlanError(f"--rollout-nodes {shape.rollout_nodes} leaves no training node out of {shape.nodes}")
    model_parallel = par.tp * par.pp * par.cp
    if shape.trainer_gpus % model_parallel:
        raise PlanError(f"parallel: tp*pp*cp = {model_parallel} does not divide the {shape.trainer_gpus} training GPUs")
    if par.tp > shape.gpus_per_node:
        raise PlanError(f"parallel.tp: {par.tp} spans nodes ({shape.gpus_per_node} GPUs per node); keep TP inside a node")
    if meta.num_heads % par.tp or meta.num_kv_heads % par.tp:
        raise PlanError(f"parallel.tp: {par.tp} must divide num_attention_heads ({meta.num_heads}) "
                        f"and num_key_value_heads ({meta.num_kv_heads})")
    if meta.num_layers % par.pp:
        raise PlanError(f"parallel.pp: {par.pp} must divide num_hidden_layers ({meta.num_layers})")
    sgl = cfg.rollout.sglang
    if _mode(cfg, shape) in ("colocated", "disaggregated") and sgl.tp_size > shape.gpus_per_node:
        raise PlanError(f"rollout.sglang.tp_size: {sgl.tp_size} is more than the {shape.gpus_per_node} GPUs of a node")
    kv_split = meta.num_kv_heads % sgl.tp_size and sgl.tp_size % meta.num_kv_heads
    if kv_split and engine_traits(cfg.rollout.engine).sglang_servers:
        raise PlanError(f"rollout.sglang.tp_size: {sgl.tp_size} and num_key_value_heads ({meta.num_kv_heads}) "
                        "must divide one another")
    return shape.trainer_gpus // model_parallel


def plan_memory(meta, cfg: Config, shape: ClusterShape) -> MemoryPlan:
    """Estimated bytes per GPU; raises PlanError for layouts that cannot run (never for 'does not fit')."""
    dp = check_layout(meta, cfg, shape)
    par, model = cfg.parallel, cfg.model
    n_gpu = params_per_gpu(meta, par.tp, par.pp)
    weight_bytes = (4 if model.dtype == "fp32" else 2) + (1 if model.fp8 else 0)
    weights = n_gpu * weight_bytes
    grads = n_gpu * 4
    optimizer = n_gpu * (8 + (0 if model.dtype == "fp32" else 4))
    if par.distributed_optimizer:
        optimizer = math.ceil(optimizer / dp)
    activations = activation_bytes(meta, cfg)
    mode = _mode(cfg, shape)
    rollout_weights = kv_cache = kv_tokens = full_seqs = wanted = 0
    if mode in ("colocated", "disaggregated"):
        sgl, ro = cfg.rollout.sglang, cfg.rollout
        engine_gpus = shape.trainer_gpus if mode == "colocated" else shape.rollout_gpus
        servers = max(1, engine_gpus // sgl.tp_size)
        wanted = min(sgl.max_concurrency, math.ceil(cfg.trainer.prompts_per_step * ro.n_samples_per_prompt / servers))
        rollout_weights = math.ceil(total_params(meta) * (1 if sgl.quantization == "fp8" else 2) / sgl.tp_size)
        claimed = int(sgl.mem_fraction_static * shape.gpu_mem_gib * GIB)
        kv_cache = claimed - rollout_weights
        if kv_cache <= 0:
            raise PlanError(f"rollout.sglang.mem_fraction_static: {sgl.mem_fraction_static:g} x {shape.gpu_mem_gib:g} GiB "
                            f"does not even hold the SGLang weights ({rollout_weights / GIB:.1f} GiB per GPU)")
        kv_per_token = 2 * meta.num_layers * meta.num_kv_heads * meta.head_dim * _kv_bytes_per_elem(cfg)
        kv_tokens = kv_cache * sgl.tp_size // kv_per_token
        seq_len = cfg.data.max_prompt_tokens + ro.max_new_tokens
        full_seqs = kv_tokens // seq_len
        if full_seqs < 1:
            raise PlanError(f"rollout.sglang.mem_fraction_static: the KV pool ({kv_cache / GIB:.1f} GiB per GPU, "
                            f"{kv_tokens} tokens per server) cannot hold one {seq_len}-token sequence")
    static = weights + grads + optimizer
    train_phase = static + activations
    rollout_phase = 0
    if mode == "colocated":
        if not cfg.rollout.sglang.enable_memory_saver:
            train_phase += rollout_weights + kv_cache  # SGLang keeps its memory while Megatron trains
        rollout_phase = static + rollout_weights + kv_cache
    elif mode == "disaggregated":
        rollout_phase = rollout_weights + kv_cache
    usable = int((shape.gpu_mem_gib - shape.reserve_gib) * GIB)
    return MemoryPlan(mode=mode, total_params=total_params(meta), params_per_gpu=n_gpu, dp=dp, weights=weights,
                      grads=grads, optimizer=optimizer, activations=activations, rollout_weights=rollout_weights,
                      kv_cache=kv_cache, kv_tokens_per_server=kv_tokens, kv_full_sequences=full_seqs,
                      kv_wanted_sequences=wanted, train_phase=train_phase,
                      rollout_phase=rollout_phase, usable=usable)


def format_plan(plan: MemoryPlan, meta, cfg: Config, shape: ClusterShape, source: Optional[str] = None) -> str:
    """The human-readable table `python -m maspo_megatron plan` prints."""
    par, model = cfg.parallel, cfg.model

    def gib(value: int) -> str:
        return f"{value / GIB:8.2f}" if value else "       -"

    colocated = plan.mode == "colocated"
    wdt = model.dtype + (f"+fp8 {model.fp8}" if model.fp8 else "")
    lines = [
        f"model: {meta.family} {meta.num_layers} layers, hidden {meta.hidden_size}, {plan.total_params / 1e9:.2f} B params"
        + (f" ({source})" if source else ""),
        f"cluster: {shape.nodes} node(s) x {shape.gpus_per_node} GPU(s) of {shape.gpu_mem_gib:g} GiB, rollout {plan.mode}"
        + (f" on {shape.rollout_nodes} node(s)" if plan.mode == "disaggregated" else ""),
        f"layout: TP {par.tp} PP {par.pp} CP {par.cp} DP {plan.dp}, SP {par.sequence_parallel}, "
        f"distributed optimizer {par.distributed_optimizer}, recompute {model.recompute}",
        f"{'per GPU (GiB)':34s}{'training':>10s}{'rollout':>10s}",
        f"  {'weights (' + wdt + ')':32s}{gib(plan.weights)}  {gib(plan.weights if colocated else 0)}",
        f"  {'grads (fp32)':32s}{gib(plan.grads)}  {gib(plan.grads if colocated else 0)}",
        f"  {'optimizer state (Adam)':32s}{gib(plan.optimizer)}  {gib(plan.optimizer if colocated else 0)}",
        f"  {'activations':32s}{gib(plan.activations)}  {gib(0)}",
        f"  {'rollout weights (SGLang)':32s}{gib(plan.train_phase - plan.weights - plan.grads - plan.optimizer - plan.activations)}"
        f"  {gib(plan.rollout_weights)}",
        f"  {'KV cache (SGLang pool)':32s}{gib(0)}  {gib(plan.kv_cache)}",
        f"  {'total':32s}{gib(plan.train_phase)}  {gib(plan.rollout_phase)}",
    ]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: peak {plan.peak / GIB:.2f} GiB of {plan.usable / GIB:.2f} GiB usable per GPU "
                 f"({shape.gpu_mem_gib:g} - {shape.reserve_gib:g} reserved)")
    if plan.rollout_weights:
        lines.append(f"rollout: each server's KV pool holds {plan.kv_tokens_per_server} tokens = "
                     f"{plan.kv_full_sequences} full-length sequences at once ({plan.kv_wanted_sequences} wanted"
                     + ("; the rest queue)" if plan.kv_full_sequences < plan.kv_wanted_sequences else ")"))
    return "\n".join(lines)


def suggestion(plan: MemoryPlan, cfg: Config) -> str:
    """What to change when a plan does not fit, largest lever first."""
    hints = []
    if not cfg.parallel.distributed_optimizer:
        hints.append("parallel.distributed_optimizer=true")
    if plan.activations > plan.optimizer and cfg.model.recompute != "full":
        hints.append("model.recompute=full or a smaller trainer.micro_batch_tokens")
    hints.append("more GPUs or larger parallel.tp / parallel.pp")
    if plan.mode == "colocated" and not cfg.rollout.sglang.enable_memory_saver:
        hints.append("rollout.sglang.enable_memory_saver=true")
    return "; ".join(hints)
