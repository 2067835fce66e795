"""The n-bit rule between 8-bit pixel values and the flow's input (docs/design.md §3), one home
for the loader, the optimum, the MLflow model, the benches and the studies:

    quantise     v -> k = floor(v / 2^(8-n)) = v >> (8 - n)      8-bit values -> n-bit levels
    dequantise   k -> x = (k + u)/2^n - 1/2                       levels -> the flow's input
    to_pixels    k -> v = k << (8 - n)                            levels -> 8-bit values (PNG)

u ~ U[0, 1) per dimension in training, so x ∈ [-1/2, 1/2) up to rounding (float32 can reach 1/2
in the top bin: the loader clamps); u = 1/2 gives the bin midpoints E[x | k]. ``quantise`` undoes
``to_pixels``. Each works on numpy arrays and torch tensors alike and needs neither library: the
dtype is what ``k + u`` promotes to, so callers keep theirs (and their numbers, bit for bit).
"""

from __future__ import annotations

from typing import Any


def quantise(pixels: Any, n_bits: int) -> Any:
    """8-bit pixel values (an unsigned or wider integer array) -> n-bit levels k."""
    return pixels >> (8 - n_bits)


def dequantise(k: Any, n_bits: int, u: Any) -> Any:
    """Levels k -> x = (k + u)/2^n - 1/2, computed in place after the first sum (the loader's hot
    path); u: noise in [0, 1) shaped like k, or 1/2 for the bin midpoints."""
    x = k + u
    x /= 2**n_bits
    x -= 0.5
    return x


def to_pixels(k: Any, n_bits: int) -> Any:
    """n-bit levels -> the 8-bit values whose ``quantise`` is k (the levels in the top bits)."""
    return k << (8 - n_bits)
