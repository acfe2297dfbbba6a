"""Policy models from Hugging Face configs and the HF <-> Megatron weight mapping.

    from maspo_megatron.models import WeightMap, get_family, model_meta
    wmap = WeightMap.from_hf_config("path/to/hf_dir", tp=2)

`build_model_config` / `gpt_model_provider` (Megatron-Core) live in config_builder.py and
provider.py and are imported lazily so that the table can be used without Megatron.
"""
from maspo_megatron.models.families import FAMILIES, LOCAL_TO_TE_NAMES, Family, Rule, get_family
from maspo_megatron.models.meta import ModelMeta, load_hf_config_dict, model_meta
from maspo_megatron.models.weight_map import MegatronTensor, WeightMap

_LAZY = {
    "build_model_config": "maspo_megatron.models.config_builder",
    "gpt_model_provider": "maspo_megatron.models.provider",
    "make_model_provider": "maspo_megatron.models.provider",
    "layer_spec": "maspo_megatron.models.provider",
    "attention_backend": "maspo_megatron.models.provider",
    "check_attention_parallel": "maspo_megatron.models.provider",
    "packed_layer_spec": "maspo_megatron.models.provider",
    "thd_packed_seq_params": "maspo_megatron.models.packed_attention",
    "tiny_hf_config": "maspo_megatron.models.tiny",
    "validate_fp8": "maspo_megatron.models.fp8",
}


def __getattr__(name):  # PEP 562: Megatron / transformers are imported only when these are used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'maspo_megatron.models' has no attribute {name!r}")


__all__ = [*_LAZY,
    "FAMILIES", "LOCAL_TO_TE_NAMES", "Family", "MegatronTensor", "ModelMeta", "Rule", "WeightMap",
    "get_family", "load_hf_config_dict", "model_meta",
]
