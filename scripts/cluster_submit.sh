#!/usr/bin/env bash
# Run a kd-ray command as a Ray job on the cluster in cluster.yaml, following its logs:
#   scripts/cluster_submit.sh pipeline -c configs/imagenette.yaml
#   scripts/cluster_submit.sh distill -c configs/imagenette.yaml \
#       --set distill.teacher_path=results/imagenette/teacher/teacher.pt
#   CLUSTER=cluster-local.yaml scripts/cluster_submit.sh --no-wait train-teacher -c configs/small.yaml
# It syncs this checkout to ~/kd_ray on the head, then `ray submit` runs scripts/cluster_job.py
# there, which submits the job to the head's own job server (`kd-ray submit`) from ~/kd_ray: `-c`
# is relative to this checkout, and options of `kd-ray submit` go before COMMAND. Relative paths
# in the config resolve against $KD_RAY_HEAD_DIR on the head (/mnt/shared/kd_ray in cluster.yaml).
# Exit status: the job's.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-cluster.yaml}
[ $# -gt 0 ] || { echo "usage: $0 [SUBMIT OPTIONS] COMMAND -c CONFIG [--set section.key=value ...]" >&2; exit 2; }

ray rsync-up "$CLUSTER"   # file_mounts: this checkout -> ~/kd_ray (rsync_exclude applies)
exec ray submit "$CLUSTER" scripts/cluster_job.py -- "$@"

# Alternative from this machine, with the job API through an SSH tunnel (needs the same token in
# ~/.ray/auth_token here):
#   ray dashboard cluster.yaml &        # forwards the head's 127.0.0.1:8265
#   kd-ray submit --address http://127.0.0.1:8265 pipeline -c configs/imagenette.yaml
