"""Helpers shared by the benchmarks: machine facts, the matmul rate, JSON from subprocesses."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout: launch/ and configs/ are found there


def machine(threads: int) -> dict:
    """What the numbers depend on. The load average matters: the CPU machine is shared."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }


def matmul_rate(
    n: int = 2048, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of an n×n matmul (2n³ FLOPs) in `dtype`, best of `repeats`: the ceiling a step is
    compared with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up (allocation, kernel selection)
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_bytes() -> int:
    """Resident set size now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_json(cmd: list[str], env: dict | None = None, timeout: float = 1800) -> dict:
    """Run a command that writes its JSON result to the file ``--json-out PATH`` names (appended
    here); that object, read from the file, not from stdout. Its stderr passes through."""
    with tempfile.TemporaryDirectory(prefix="lipflow-bench-") as tmp:
        path = Path(tmp) / "result.json"
        out = subprocess.run(
            [*cmd, "--json-out", str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0 or not path.is_file():
            return {"error": f"exit {out.returncode}", "stdout_tail": out.stdout[-2000:]}
        return json.loads(path.read_text())


def emit(result: dict) -> None:
    print(json.dumps(result, indent=1), flush=True)
