"""`WeightMap`: a family table bound to one model's shapes: Megatron <-> HF tensors, by name.

    wmap = WeightMap.from_hf_config(hf_config, tp=2)
    for hf_name, t in wmap.megatron_to_hf("decoder.layers.3.self_attention.linear_qkv.weight", qkv_full, layer_offset=8):
        ...  # model.layers.11.self_attn.{q,k,v}_proj.weight, ALL three (a fused tensor travels together)
    qkv_full = wmap.hf_to_megatron("decoder.layers.11.self_attention.linear_qkv.weight", hf_state.__getitem__)

Megatron names may be given as the model's parameter names (local or TE spec, with or without
`module.` wrapper prefixes, layer index local to a PP stage + `layer_offset`) or as the
checkpoint names; tensors are always FULL (TP-gathered; see `tp_split` / layouts.gather_tp) and
vocab tensors are PADDED on the Megatron side, unpadded on the HF side.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator, Optional

import torch

from maspo_megatron.models import layouts
from maspo_megatron.models.families import FAMILIES, LOCAL_TO_TE_NAMES, Family, Rule
from maspo_megatron.models.meta import ModelMeta, model_meta

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class MegatronTensor:
    """One full Megatron tensor of the model: `name` carries the global layer index."""

    name: str  # e.g. decoder.layers.3.mlp.linear_fc1.weight
    ckpt_key: str  # dist-checkpoint key, e.g. decoder.layers.mlp.linear_fc1.weight (layers stacked on dim 0)
    layer: Optional[int]
    shape: tuple[int, ...]  # full (TP-gathered, vocab-padded) shape
    rule: Rule


class WeightMap:
    def __init__(self, family: Family, meta: ModelMeta):
        self.family = family
        self.meta = meta
        flags = meta.flags()
        self.rules = tuple(r for r in family.rules if r.when is None or flags[r.when])
        self._by_suffix = {r.megatron: r for r in self.rules}

    @classmethod
    def from_hf_config(cls, hf_config: Any, tp: int = 1) -> WeightMap:
        meta = model_meta(hf_config, tp=tp)
        return cls(FAMILIES[meta.family], meta)

    # ----- names -----------------------------------------------------------------------------
    def resolve(self, megatron_name: str, layer_offset: int = 0) -> tuple[Rule, Optional[int]]:
        """(rule, global layer index or None) for a Megatron parameter / checkpoint name."""
        name = megatron_name
        while name.startswith("module."):
            name = name[len("module."):]
        match = _LAYER_RE.match(name)
        if match:
            layer = int(match.group(1)) + layer_offset
            suffix = LOCAL_TO_TE_NAMES.get(match.group(2), match.group(2))
            rule = self._by_suffix.get(suffix)
            if rule is not None and rule.per_layer:
                if not 0 <= layer < self.meta.num_layers:
                    raise KeyError(f"{megatron_name}: layer {layer} out of range (model has {self.meta.num_layers})")
                return rule, layer
        else:
            rule = self._by_suffix.get(name)
            if rule is not None and not rule.per_layer:
                return rule, None
        raise KeyError(f"{megatron_name}: no {self.family.name} mapping rule for this Megatron tensor")

    def hf_names(self, megatron_name: str, layer_offset: int = 0) -> list[str]:
        """The HF tensors that make up (and must travel with) this Megatron tensor."""
        rule, layer = self.resolve(megatron_name, layer_offset)
        return [n.format(i=layer) for n in rule.hf]

    def tp_split(self, megatron_name: str) -> tuple[Optional[int], bool]:
        """(dim, glu): how TP shards of this parameter concatenate (layouts.gather_tp)."""
        rule, _ = self.resolve(megatron_name)
        return rule.tp_dim, rule.tp_glu

    def full_shape(self, rule: Rule) -> tuple[int, ...]:
        m = self.meta
        qkv_rows = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
        shapes = {
            "embedding.word_embeddings.weight": (m.padded_vocab_size, m.hidden_size),
            "output_layer.weight": (m.padded_vocab_size, m.hidden_size),
            "decoder.final_layernorm.weight": (m.hidden_size,),
            "self_attention.linear_qkv.layer_norm_weight": (m.hidden_size,),
            "self_attention.linear_qkv.weight": (qkv_rows, m.hidden_size),
            "self_attention.linear_qkv.bias": (qkv_rows,),
            "self_attention.q_layernorm.weight": (m.head_dim,),
            "self_attention.k_layernorm.weight": (m.head_dim,),
            "self_attention.linear_proj.weight": (m.hidden_size, m.num_heads * m.head_dim),
            "mlp.linear_fc1.layer_norm_weight": (m.hidden_size,),
            "mlp.linear_fc1.weight": (2 * m.ffn_hidden_size, m.hidden_size),
            "mlp.linear_fc2.weight": (m.hidden_size, m.ffn_hidden_size),
        }
        if rule.megatron not in shapes:
            raise KeyError(f"{rule.megatron}: no shape rule (add it to WeightMap.full_shape)")
        return shapes[rule.megatron]

    def megatron_tensors(self) -> Iterator[MegatronTensor]:
        """Every full Megatron tensor of the model, embedding first, then layer by layer."""
        globals_first = [r for r in self.rules if not r.per_layer and r.megatron.startswith("embedding.")]
        globals_last = [r for r in self.rules if not r.per_layer and not r.megatron.startswith("embedding.")]
        for rule in globals_first:
            yield MegatronTensor(rule.megatron, rule.megatron, None, self.full_shape(rule), rule)
        for layer in range(self.meta.num_layers):
            for rule in (r for r in self.rules if r.per_layer):
                yield MegatronTensor(
                    f"decoder.layers.{layer}.{rule.megatron}", f"decoder.layers.{rule.megatron}", layer,
                    self.full_shape(rule), rule,
                )
        for rule in globals_last:
            yield MegatronTensor(rule.megatron, rule.megatron, None, self.full_shape(rule), rule)

    def hf_tensor_names(self) -> list[str]:
        """Every HF tensor name the model has (the order HF -> Megatron reads them)."""
        return [n.format(i=t.layer) for t in self.megatron_tensors() for n in t.rule.hf]

    # ----- tensors ---------------------------------------------------------------------------
    def megatron_to_hf(self, megatron_name: str, full: torch.Tensor, layer_offset: int = 0) -> list[tuple[str, torch.Tensor]]:
        """A full Megatron tensor -> its HF tensors (vocab padding removed, fused tensors split)."""
        rule, layer = self.resolve(megatron_name, layer_offset)
        names = [n.format(i=layer) for n in rule.hf]
        expected = self.full_shape(rule)
        if rule.layout == "vocab":
            if tuple(full.shape[1:]) != expected[1:] or full.shape[0] < self.meta.vocab_size:
                raise ValueError(f"{megatron_name}: shape {tuple(full.shape)} does not fit vocab {self.meta.vocab_size} x {expected[1:]}")
            return [(names[0], layouts.unpad_rows(full, self.meta.vocab_size))]
        if tuple(full.shape) != expected:
            raise ValueError(f"{megatron_name}: shape {tuple(full.shape)}, expected {expected}")
        if rule.layout == "copy":
            return [(names[0], full)]
        if rule.layout == "qkv":
            return list(zip(names, layouts.split_qkv(full, self.meta.num_heads, self.meta.num_kv_heads), strict=True))
        if rule.layout == "gate_up":
            return list(zip(names, layouts.split_gate_up(full), strict=True))
        raise ValueError(f"{rule.megatron}: unknown layout {rule.layout!r}")

    def hf_to_megatron(
        self, megatron_name: str, get_hf: Callable[[str], torch.Tensor], layer_offset: int = 0
    ) -> torch.Tensor:
        """The full Megatron tensor built from HF tensors fetched by name with `get_hf`."""
        rule, layer = self.resolve(megatron_name, layer_offset)
        names = [n.format(i=layer) for n in rule.hf]
        parts = [get_hf(n) for n in names]
        for hf_name, part, shape in zip(names, parts, self.hf_shapes(rule), strict=True):
            if tuple(part.shape) != shape:
                raise ValueError(f"{hf_name}: shape {tuple(part.shape)}, expected {shape} from the config")
        if rule.layout == "vocab":
            return layouts.pad_rows(parts[0], self.meta.padded_vocab_size)
        if rule.layout == "copy":
            return parts[0]
        if rule.layout == "qkv":
            return layouts.merge_qkv(*parts, self.meta.num_heads, self.meta.num_kv_heads)
        if rule.layout == "gate_up":
            return layouts.merge_gate_up(*parts)
        raise ValueError(f"{rule.megatron}: unknown layout {rule.layout!r}")

    def hf_shapes(self, rule: Rule) -> list[tuple[int, ...]]:
        """Expected shapes of the rule's HF tensors, in `rule.hf` order."""
        m = self.meta
        full = self.full_shape(rule)
        if rule.layout == "vocab":
            return [(m.vocab_size, *full[1:])]
        if rule.layout == "qkv":
            rest = full[1:]
            return [(m.num_heads * m.head_dim, *rest), (m.num_kv_heads * m.head_dim, *rest), (m.num_kv_heads * m.head_dim, *rest)]
        if rule.layout == "gate_up":
            return [(full[0] // 2, *full[1:])] * 2
        return [full]


def stage_layer_offset(model: torch.nn.Module) -> int:
    """Global index of this chunk's first transformer layer (0 when it has none)."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1
