#!/usr/bin/env bash
# vLLM (CUDA build) with runtime LoRA, the model split over the GPUs of this node.
# The same launch as `tuneshield engine --model "$MODEL" --tensor-parallel-size N` on a GPU
# machine (learner/engine.py builds it); this script is for hosts or images that run
# vLLM without the project installed.
#   MODEL=/models/chatbot TP=2 bash deploy/gpu/launch-vllm.sh
#   MODEL=... TP=4 PP=2 bash deploy/gpu/launch-vllm.sh   # + pipeline parallel over 2 nodes (Ray)
set -euo pipefail
MODEL=${MODEL:?set MODEL to a local folder or a hub id}
TP=${TP:-$(nvidia-smi -L | wc -l)}
PP=${PP:-1}
HOST=${HOST:-127.0.0.1}   # loopback unless a network policy keeps everyone but the gateway out
PORT=${PORT:-8000}
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
export VLLM_NO_USAGE_STATS=1
exec vllm serve "$MODEL" \
  --served-model-name base \
  --host "$HOST" --port "$PORT" \
  --dtype bfloat16 \
  --max-model-len "${MAX_MODEL_LEN:-4096}" \
  --enable-lora --max-lora-rank "${MAX_LORA_RANK:-64}" --max-loras "${MAX_LORAS:-4}" \
  --tensor-parallel-size "$TP" --pipeline-parallel-size "$PP" \
  --gpu-memory-utilization "${GPU_MEMORY_UTILIZATION:-0.9}" \
  "$@"
