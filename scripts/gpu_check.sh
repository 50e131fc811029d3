#!/usr/bin/env bash
# GPU check of the teacher-logit cache (issue 4): needs only PyTorch + torchvision and a CUDA GPU.
# Runs in about a minute on an H100/H200 (8-minute hard limit); any arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 python scripts/gpu_check.py "$@"
