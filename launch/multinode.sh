#!/usr/bin/env bash
# Training ranks on several nodes, three ways:
#
#   (a) DeepSpeed hostfile: one command on the first node; DeepSpeed starts all nodes over ssh/pdsh.
#         HOSTFILE=hostfile launch/multinode.sh --config configs/celebahq-256.yaml [key=value ...]
#   (b) DeepSpeed --no_ssh: the same command on every node, each with its own node rank.
#         NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multinode.sh --config ...   # on node0
#         NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/multinode.sh --config ...   # on node1
#   (c) torchrun: as (b) with LAUNCHER=torchrun (static rendezvous at MASTER_ADDR:MASTER_PORT).
#
# Knobs (environment):
#   LAUNCHER     deepspeed (default) | torchrun
#   HOSTFILE     DeepSpeed hostfile, lines "hostname slots=<ranks>": mode (a) when NODE_RANK is
#                unset; optional in (b), where the default is NNODES generated nodes of NPROC slots
#   NNODES       nodes in the job, modes (b) and (c) (default 1)
#   NODE_RANK    this node's index in 0..NNODES-1 (default 0; required when NNODES > 1)
#   NPROC        ranks per node (default: the GPUs on this node, else 1 CPU rank;
#                mode (a): the hostfile's slots)
#   MASTER_ADDR  address of node rank 0 that every node can reach (required when NNODES > 1;
#                mode (a) asks the first host over ssh when unset)
#   MASTER_PORT  rendezvous port on node rank 0 (default 29500)
#   PYTHON       interpreter of the environment holding lipflow (see launch/common.sh)
#   DRY_RUN=1    print the launcher command (and a generated hostfile) instead of running it
#
# Every node needs the same checkout and environment at the same path, and a shared run.root (and
# data.cache) so that any node can resume from `latest`. docs/cluster.md has the details.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
LAUNCHER="${LAUNCHER:-deepspeed}"
NNODES="${NNODES:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
nproc_given="${NPROC:-}"
NPROC="${NPROC:-$( [ "$LIPFLOW_GPUS" = "0" ] && echo 1 || echo "$LIPFLOW_GPUS" )}"
generated_hostfile=""

if [ "$LAUNCHER" = deepspeed ] && [ -n "${HOSTFILE:-}" ] && [ -z "${NODE_RANK:-}" ]; then
  # (a) One command for all nodes: the runner reads the hostfile and starts each node over pdsh.
  cmd=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
  if [ -n "${MASTER_ADDR:-}" ]; then cmd+=(--master_addr "$MASTER_ADDR"); fi
  if [ -n "$nproc_given" ]; then cmd+=(--num_gpus "$NPROC"); fi
else
  if [ -z "${NODE_RANK:-}" ] && [ "$NNODES" -gt 1 ]; then
    echo "multinode.sh: NNODES=$NNODES needs NODE_RANK (this node's index), or HOSTFILE for" \
      "DeepSpeed over ssh; see the header of $0" >&2
    exit 2
  fi
  NODE_RANK="${NODE_RANK:-0}"
  if ! [ "$NODE_RANK" -ge 0 ] 2>/dev/null || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "multinode.sh: NODE_RANK=$NODE_RANK is not in 0..$((NNODES - 1)) (NNODES=$NNODES)" >&2
    exit 2
  fi
  if [ -z "${MASTER_ADDR:-}" ]; then
    if [ "$NNODES" -gt 1 ]; then
      echo "multinode.sh: NNODES=$NNODES needs MASTER_ADDR, the address of node rank 0" >&2
      exit 2
    fi
    MASTER_ADDR=127.0.0.1
  fi
  case "$LAUNCHER" in
    deepspeed)
      # (b) Each node starts its own ranks; the hostfile only tells DeepSpeed the world's shape
      # (node names are labels here, nothing connects to them).
      if [ -z "${HOSTFILE:-}" ]; then
        HOSTFILE="$(mktemp "${TMPDIR:-/tmp}/lipflow-hostfile.XXXXXX")"
        generated_hostfile="$HOSTFILE"
        trap 'rm -f "$generated_hostfile"' EXIT
        for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$NPROC"; done >"$HOSTFILE"
      fi
      cmd=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_ssh
        --node_rank "$NODE_RANK" --num_gpus "$NPROC"
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
      ;;
    torchrun)
      cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
        --nproc_per_node "$NPROC" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
      ;;
    *)
      echo "multinode.sh: LAUNCHER=$LAUNCHER; use deepspeed or torchrun" >&2
      exit 2
      ;;
  esac
fi
if [ "$LAUNCHER" = deepspeed ]; then
  cmd+=(--no_local_rank --module pipeline train "$@")
else
  cmd+=(--module pipeline train "$@")
fi

if [ "${DRY_RUN:-0}" = 1 ]; then
  if [ -n "$generated_hostfile" ]; then sed 's/^/# hostfile: /' "$generated_hostfile"; fi
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
echo "multinode.sh: $(printf '%q ' "${cmd[@]}")" >&2
if [ -n "$generated_hostfile" ]; then
  "${cmd[@]}"  # not exec: the EXIT trap removes the generated hostfile
else
  exec "${cmd[@]}"
fi
