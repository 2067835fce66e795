"""The step's spectral-norm certificate: held once per optimizer step and, on several
data-parallel ranks, split between them (docs/design.md §5).

Every rank holds the same weights at a step's start, so the certificates (flows/lipschitz.py:
Grams at every frequency, a power step, a Cholesky ladder, per group of same-shaped convs) would
be the same on every rank. Each rank certifies its share of the groups, assigned greedily by
their cost from shapes (largest first, to the least loaded rank; a group costing more than a
rank's fair share is sliced, as a published config's 18 groups would leave most of 64 ranks
idle), and one all_gather of a flat
buffer per rank hands every rank the rest: each group's Top (phases, direction, factor) and its
warm-start vectors, so that every rank forms bit-for-bit the scales, kernels and vectors of the
unshared computation, and a checkpoint saved from any rank resumes exactly.

Gathering the vectors every step is the bulk of the bytes (a Fourier group's vectors are
[B, F, m, 2]); it keeps every rank's model whole at every moment, so validation, the guard's
checks on rank 0 and checkpoints need no collective of their own. `describe` says what it costs.
"""

from __future__ import annotations

import math

import torch

from pipeline import distributed as dist
from pipeline.flows.lipschitz import HeldNormalisation, Share, group_cost, top_numel


def assign(costs: list[float], world: int) -> list[int]:
    """The owner rank of each cost: largest first, each to the least loaded rank (the lowest on
    ties); deterministic, so every rank computes the same plan."""
    loads = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def split(costs: list[float], sizes: list[int], world: int) -> list[tuple[int, int, int]]:
    """Units of work (group, start, stop): a group costing more than a rank's fair share
    (total/world) is cut into that many near-equal slices of its convs (at most one conv each),
    so that a few large groups do not leave most ranks idle."""
    fair = sum(costs) / world if world else 0.0
    units = []
    for g, (cost, size) in enumerate(zip(costs, sizes, strict=True)):
        pieces = min(size, max(1, math.ceil(cost / fair - 1e-9))) if fair > 0 else 1
        bounds = [round(k * size / pieces) for k in range(pieces + 1)]
        units += [(g, start, stop) for start, stop in zip(bounds, bounds[1:]) if stop > start]
    return units


class Certificate:
    """Holds the model's normalisation for each optimizer step (`hold`), shared between the
    ranks when `share` and there are several."""

    def __init__(self, model: torch.nn.Module, share: bool, world: int | None = None):
        self.model = model
        self.world = dist.world_size() if world is None else world
        groups = model.normalised_groups()
        self.units, self.owners = None, None
        if share and self.world > 1 and groups:
            costs = [group_cost(convs) for convs in groups]
            self.units = split(costs, [len(convs) for convs in groups], self.world)
            self.costs = [group_cost(groups[g][a:b]) for g, a, b in self.units]
            self.numels = [top_numel(groups[g][a:b]) for g, a, b in self.units]
            self.owners = assign(self.costs, self.world)
        self.groups = len(groups)
        param = next(model.parameters())
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.itemsize = torch.finfo(dtype).bits // 8

    def hold(self, micro_batches: int) -> HeldNormalisation:
        share = None
        if self.owners is not None:
            share = Share(self.units, self.owners, dist.rank(), dist.all_gather)
        return self.model.hold_normalisation(micro_batches, share)

    def buffer_bytes(self) -> int:
        """Bytes of each rank's gather buffer (the largest share's, padded): 0 unshared."""
        if self.owners is None:
            return 0
        shares = [0] * self.world
        for owner, numel in zip(self.owners, self.numels, strict=True):
            shares[owner] += numel
        return max(shares) * self.itemsize

    def describe(self) -> str:
        if self.owners is None:
            return f"certificate: {self.groups} conv groups certified on every rank, once per step"
        loads = [0.0] * self.world
        for owner, cost in zip(self.owners, self.costs, strict=True):
            loads[owner] += cost
        balance = max(loads) / (sum(loads) / self.world) if sum(loads) else 1.0
        sent = self.buffer_bytes()
        return (
            f"certificate: {self.groups} conv groups in {len(self.units)} units shared by "
            f"{self.world} ranks (largest share {balance:.2f}x the mean cost), one all_gather per "
            f"step: each rank sends {sent / 1e6:.2f} MB and receives "
            f"{(self.world - 1) * sent / 1e6:.2f} MB"
        )
