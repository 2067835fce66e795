#!/usr/bin/env bash
# SLURM and MUNGE for tests/test_launch.py, which starts its own one-node cluster from these
# binaries (config, key and state in a temporary folder; no system service is configured).
# Idempotent: returns at once when the packages are installed. Debian/Ubuntu; root or sudo.
set -euo pipefail
if dpkg -s slurm-wlm munge >/dev/null 2>&1; then
  exit 0
fi
sudo=()
if [ "$(id -u)" != 0 ]; then sudo=(sudo); fi
${sudo[@]+"${sudo[@]}"} apt-get update -qq
${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends slurm-wlm munge
