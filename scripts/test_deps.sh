#!/usr/bin/env bash
# What the tests need outside Python: tests/test_launcher.py brings a cluster up over SSH to
# 127.0.0.1, so it needs sshd, ssh and rsync. Idempotent and quiet: does nothing when they are
# there, else installs openssh-server and rsync with apt-get (through sudo when not root).
# Called by `make test` (which .ci/run calls).
set -euo pipefail

have() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null; }  # sshd lives in sbin

if have sshd && have ssh && have rsync; then
    exit 0
fi
fix="install openssh-server and rsync (tests/test_launcher.py needs sshd, ssh and rsync)"
if ! have apt-get; then
    echo "scripts/test_deps.sh: no apt-get here: $fix" >&2
    exit 1
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
    have sudo || { echo "scripts/test_deps.sh: not root and no sudo: $fix" >&2; exit 1; }
    SUDO=(sudo)
fi
quiet() {  # apt's chatter (debconf notes) only when a step fails
    local out
    out=$("$@" 2>&1) || { echo "$out" >&2; echo "scripts/test_deps.sh: failed: $*" >&2; return 1; }
}
quiet "${SUDO[@]}" apt-get update -qq
quiet "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    openssh-server rsync
