"""`python -m tests.memory_helpers CONFIG [a.b=value ...]`: how far one forward + backward of the
config's model, in each memory mode, raises this fresh process's resident set (Linux VmHWM);
prints {mode: bytes} as JSON.

Each mode is measured in a warm process: a warm-up step at batch 1 first (the spectral vectors'
one-time eigen-solve, the math libraries' first-use buffers), the heap's free pages returned
(malloc_trim), the peak reset (/proc/self/clear_refs), then the step, on gradients allocated
beforehand (the plan counts them as model states). Run it with MALLOC_MMAP_THRESHOLD_=65536:
glibc then maps every tensor of 64 KiB or more on its own and unmaps it when freed; with its
default, rising threshold freed tensors stay in the heap, and the peak of such steps was 28-45%
above the tensors alive at once.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.flows import build_flow
from pipeline.train.plan import MODES, step

STATUS = Path("/proc/self/status")
LIBC = ctypes.CDLL("libc.so.6")


def resident(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset), in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", STATUS.read_text()).group(1)) * 1024


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    cfg = load_config(argv[0], argv[1:])
    r, bf16 = cfg.data.resolution, cfg.train.precision == "bf16"
    flow = build_flow(cfg.model, (3, r, r), cfg.data.n_bits)
    for p in flow.parameters():
        p.grad = torch.zeros_like(p)
    peaks = {}
    for mode in MODES:
        flow.memory = mode
        step(flow, torch.rand(1, 3, r, r) - 0.5, bf16)
        LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = resident("VmRSS")
        step(flow, torch.rand(cfg.train.micro_batch, 3, r, r) - 0.5, bf16)
        peaks[mode] = resident("VmHWM") - before
    print(json.dumps(peaks))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
