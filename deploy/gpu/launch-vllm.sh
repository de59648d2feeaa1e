#!/usr/bin/env bash
# vLLM (CUDA build) with runtime LoRA, for hosts or images that run vLLM without the
# project installed. The same launch as `tuneshield engine --model "$MODEL"` on a GPU
# machine (engine/_supervisor.py: engine_command), with policies/engine.yaml's values as
# defaults: its dtype `auto` is bfloat16 on GPUs, and max_lora_rank 16 must be at least
# the rank the learner trains (policies/training.yaml) and no larger (vLLM pads every
# adapter to it). tests/deploy checks these defaults against the policy.
#   MODEL=/models/chatbot bash deploy/gpu/launch-vllm.sh
#   MODEL=/models/chatbot TP=2 bash deploy/gpu/launch-vllm.sh      # split over 2 GPUs
#   MODEL=... TP=4 PP=2 bash deploy/gpu/launch-vllm.sh   # + pipeline parallel over 2 nodes (Ray)
set -euo pipefail
MODEL=${MODEL:?set MODEL to a local folder or a hub id}
TP=${TP:-1}
PP=${PP:-1}
HOST=${HOST:-127.0.0.1}   # loopback unless a network policy keeps everyone but the gateways and the learner out
PORT=${PORT:-8000}
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
# No usage reports: the engine sees users' dialogs (policies/engine.yaml env).
export VLLM_NO_USAGE_STATS=1
export DO_NOT_TRACK=1
exec vllm serve "$MODEL" \
  --served-model-name "${SERVED_MODEL_NAME:-base}" \
  --host "$HOST" --port "$PORT" \
  --dtype "${DTYPE:-bfloat16}" \
  --max-model-len "${MAX_MODEL_LEN:-2048}" \
  --enable-lora \
  --max-lora-rank "${MAX_LORA_RANK:-16}" \
  --max-loras "${MAX_LORAS:-4}" \
  --tensor-parallel-size "$TP" --pipeline-parallel-size "$PP" \
  --gpu-memory-utilization "${GPU_MEMORY_UTILIZATION:-0.9}" \
  "$@"
