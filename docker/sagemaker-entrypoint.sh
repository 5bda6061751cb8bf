#!/usr/bin/env bash
# SageMaker starts the container as `docker run IMAGE serve`; the model and shard count come
# from HF_MODEL_ID / SM_NUM_GPUS / HF_MODEL_REVISION / HF_MODEL_QUANTIZE /
# HF_MODEL_TRUST_REMOTE_CODE, which the launcher maps itself. SageMaker probes /ping and sends
# requests to /invocations on port 8080.
set -euo pipefail
if [[ "${1:-}" == "serve" ]]; then
  shift
fi
exec text-generation-launcher --port 8080 "$@"
