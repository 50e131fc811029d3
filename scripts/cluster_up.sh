#!/usr/bin/env bash
# Start (or update) the cluster in cluster.yaml.
#   scripts/cluster_up.sh                              # uses the image named in cluster.yaml
#   KD_RAY_IMAGE=ghcr.io/me/kd_ray:0.1.0 scripts/cluster_up.sh   # build, push and use this image
#   CLUSTER=cluster-local.yaml scripts/cluster_up.sh   # your own machines, no Docker
# Needs cloud credentials for the provider in cluster.yaml (or SSH access for provider: local).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-cluster.yaml}

# Ray 2.60 token auth: one token for every node and for this machine's job client.
if [ ! -f ~/.ray/auth_token ]; then
    ray get-auth-token --generate >/dev/null
    echo "made ~/.ray/auth_token (cluster.yaml copies it to every node)"
fi

if [ -n "${KD_RAY_IMAGE:-}" ]; then
    docker build -t "$KD_RAY_IMAGE" .
    docker push "$KD_RAY_IMAGE"
    CONFIG=$(mktemp --suffix=.yaml)
    sed "s|^  image: .*|  image: $KD_RAY_IMAGE|" "$CLUSTER" > "$CONFIG"
    CLUSTER=$CONFIG
fi

ray up -y "$CLUSTER"
echo
echo "next: CLUSTER=$CLUSTER scripts/cluster_submit.sh pipeline -c configs/imagenette.yaml"
echo "      CLUSTER=$CLUSTER scripts/cluster_tensorboard.sh   (then open http://localhost:6006)"
echo "done: ray down -y $CLUSTER   (it runs \`ray stop\` on the head: every Ray instance there)"
