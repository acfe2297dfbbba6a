"""Policy models from Hugging Face configs and the HF <-> Megatron weight mapping.

    from maspo_megatron.models import WeightMap, get_family, model_meta
    wmap = WeightMap.from_hf_config("path/to/hf_dir", tp=2)

`build_model_config` / `gpt_model_provider` (Megatron-Core) live in config_builder.py and
provider.py and are imported lazily so that the table can be used without Megatron.
"""
from maspo_megatron.models.families import FAMILIES, LOCAL_TO_TE_NAMES, Family, Rule, get_family
from maspo_megatron.models.meta import ModelMeta, load_hf_config_dict, model_meta
from maspo_megatron.models.weight_map import MegatronTensor, WeightMap

__all__ = [
    "FAMILIES", "LOCAL_TO_TE_NAMES", "Family", "MegatronTensor", "ModelMeta", "Rule", "WeightMap",
    "get_family", "load_hf_config_dict", "model_meta",
]
