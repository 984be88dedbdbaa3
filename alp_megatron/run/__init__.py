"""The RL run: the loop and its wiring (build, schedule, scoring, metrics). It drives the Megatron side
(:mod:`alp_megatron.trainer`), the rollout fleet (:mod:`alp_megatron.rollout`) and the weight updates
(:mod:`alp_megatron.bridge`) through their own interfaces, and imports neither Megatron nor SGLang itself.
"""
