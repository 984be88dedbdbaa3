"""alp-megatron: Adaptive Layerwise Perturbation (ALP) RL post-training on Megatron-Core."""

__version__ = "0.1.0"
