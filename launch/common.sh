# shellcheck shell=bash
# Sourced by the launch scripts: the interpreter, this node's GPU count, CPU-only settings.
#
#   PYTHON  interpreter of the environment holding lipflow (default: .venv/bin/python of this
#           checkout, else python3); the same path must exist on every node
#
# Sets LIPFLOW_GPUS: the GPUs on this node, or 0 when DS_ACCELERATOR=cpu asks for CPU ranks. Without
# a GPU, DeepSpeed runs on its CPU accelerator with the gloo backend (DS_ACCELERATOR=cpu), and one
# intra-op thread per rank avoids oversubscribing the cores.
lipflow_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$lipflow_root/.venv/bin/python" ]; then
    PYTHON="$lipflow_root/.venv/bin/python"
  else
    PYTHON="$(command -v python3)"
  fi
fi
if [ "${DS_ACCELERATOR:-}" = cpu ]; then
  LIPFLOW_GPUS=0  # asked for CPU ranks: no need to import torch to count GPUs
else
  LIPFLOW_GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
fi
if [ "$LIPFLOW_GPUS" = "0" ]; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
