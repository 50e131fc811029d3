#!/usr/bin/env bash
# TensorBoard on the head over every run's files, shown at http://localhost:6006 through SSH.
#   scripts/cluster_tensorboard.sh                 # every run under $KD_RAY_HEAD_DIR on the head
#   scripts/cluster_tensorboard.sh /mnt/shared/kd_ray/imagenette
# The TensorBoard files are written on the head (by the Train controller next to the job driver),
# so this needs no access to the worker nodes. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-cluster.yaml}
LOGDIR=${1:-'${KD_RAY_HEAD_DIR:-$HOME/kd_ray_jobs}'}

exec ray exec "$CLUSTER" --port-forward 6006 \
    "tensorboard --logdir \"$LOGDIR\" --host 127.0.0.1 --port 6006"
