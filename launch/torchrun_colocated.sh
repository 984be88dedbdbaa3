#!/usr/bin/env bash
# One node, colocated: SGLang and the Megatron trainer share this node's GPUs (SGLang releases its memory
# while Megatron trains). The trainer's global rank 0 launches the SGLang server(s) itself.
#
# Environment:
#   CONFIG       run config (required), e.g. examples/qwen3_8b_colocated.yaml
#   NPROC        trainer ranks on this node (default: the number of GPUs; 2 without a GPU)
#   OUTPUT_DIR   optional, overrides run.output_dir
#   RESUME=1     continue from the latest checkpoint in the output directory
# Any arguments are passed to alp-train as config overrides (section.key=value).
#
#   CONFIG=examples/cpu_tiny.yaml launch/torchrun_colocated.sh run.steps=10
set -euo pipefail
: "${CONFIG:?set CONFIG to a run config, e.g. CONFIG=examples/cpu_tiny.yaml}"
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=2
fi
ARGS=(--config "$CONFIG")
[ -n "${OUTPUT_DIR:-}" ] && ARGS+=(--output-dir "$OUTPUT_DIR")
[ "${RESUME:-0}" = 1 ] && ARGS+=(--resume)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m alp_megatron.cli "${ARGS[@]}" "$@"
