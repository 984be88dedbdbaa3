"""The bridge between Megatron-Core and Hugging Face weights: name/layout mapping, import, bucketed export,
HF folders and the converter's Megatron checkpoints. ``transports/`` sends exported buckets to SGLang."""

from alp_megatron.bridge.export import export_hf_buckets
from alp_megatron.bridge.hf_folder import arch_from_hf_folder, read_hf_config, save_hf_folder
from alp_megatron.bridge.hf_import import load_hf_weights
from alp_megatron.bridge.mapping import NOT_MODEL_WEIGHTS, WeightMappingError, hf_tensor_names, table_for

__all__ = [
    "NOT_MODEL_WEIGHTS",
    "WeightMappingError",
    "arch_from_hf_folder",
    "export_hf_buckets",
    "hf_tensor_names",
    "load_hf_weights",
    "read_hf_config",
    "save_hf_folder",
    "table_for",
]
