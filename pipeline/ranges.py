"""What values a numeric config key allows. Each section lists its keys' ranges in a ``RANGES``
class attribute beside the fields; pipeline/config.py checks them when a config is loaded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows: ``lo``/``hi`` bounds, each inclusive unless ``open``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def allows(self, value: float) -> bool:
        if value != value:  # NaN fits no range
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '≥'} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '≤'} {self.hi:g}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"


def at_least(lo: float) -> Range:
    return Range(lo=lo)


POSITIVE = Range(lo=0, lo_open=True)  # > 0
NON_NEGATIVE = Range(lo=0)  # ≥ 0
OPEN_UNIT = Range(lo=0, hi=1, lo_open=True, hi_open=True)  # a fraction strictly between 0 and 1
