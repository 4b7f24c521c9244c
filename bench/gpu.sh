#!/usr/bin/env bash
# The GPU checks of docs/performance.md in one go (Qwen2.5-3B shapes, random weights, bf16,
# 2048 tokens): training step vs the floor, then memory with and without checkpointing.
#     bash bench/gpu.sh            # from the repository root, after `make install`
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY train_step.py --shapes qwen2.5-3b --device cuda --dtype bfloat16 --batch-size 1 --seq-len 2048 --repeats 5
$PY memory.py     --shapes qwen2.5-3b --device cuda --dtype bfloat16 --batch-size 1 --seq-len 2048
