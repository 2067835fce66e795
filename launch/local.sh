#!/usr/bin/env bash
# N training ranks on this node through the DeepSpeed launcher.
#
#   launch/local.sh --config configs/demo.yaml [section.key=value ...]
#
# Knobs (environment):
#   NPROC        ranks on this node (default: the number of GPUs, else 2 CPU ranks)
#   PYTHON       interpreter of the environment holding lipflow (default: .venv/bin/python, else python3)
#   MASTER_PORT  rendezvous port (default 29500)
# Without a GPU, DeepSpeed runs on its CPU accelerator with the gloo backend (DS_ACCELERATOR=cpu).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
NPROC="${NPROC:-$( [ "$LIPFLOW_GPUS" = "0" ] && echo 2 || echo "$LIPFLOW_GPUS" )}"
MASTER_PORT="${MASTER_PORT:-29500}"
exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$MASTER_PORT" \
  --no_local_rank --module pipeline train "$@"
