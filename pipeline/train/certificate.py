"""The step's spectral-norm certificate: held once per optimizer step and, on several
data-parallel ranks, split between them (docs/design.md §5).

Every rank holds the same weights at a step's start, so the certificates (flows/lipschitz.py:
Grams at every frequency, a power step, a Cholesky ladder, per group of same-shaped convs) would
be the same on every rank. Each rank certifies its share of the groups, assigned greedily by
their cost from shapes (largest first, to the least loaded rank), and one all_gather of a flat
buffer per rank hands every rank the rest: each group's Top (phases, direction, factor) and its
warm-start vectors, so that every rank forms bit-for-bit the scales, kernels and vectors of the
unshared computation, and a checkpoint saved from any rank resumes exactly.

Gathering the vectors every step is the bulk of the bytes (a Fourier group's vectors are
[B, F, m, 2]); it keeps every rank's model whole at every moment, so validation, the guard's
checks on rank 0 and checkpoints need no collective of their own. `describe` says what it costs.
"""

from __future__ import annotations

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


class Certificate:
    """Holds the model's normalisation for each optimizer step (`hold`), shared between the
    ranks when `share` and there are several."""

    def __init__(self, model: torch.nn.Module, share: bool, world: int | None = None):
        self.model = model
        self.world = dist.world_size() if world is None else world
        groups = model.normalised_groups()
        self.costs = [group_cost(convs) for convs in groups]
        self.numels = [top_numel(convs) for convs in groups]
        self.owners = assign(self.costs, self.world) if share and self.world > 1 else None
        param = next(model.parameters())
        self.itemsize = (
            torch.finfo(torch.float64 if param.dtype == torch.float64 else torch.float32).bits // 8
        )

    def hold(self, micro_batches: int) -> HeldNormalisation:
        share = None if self.owners is None else Share(self.owners, dist.rank(), dist.all_gather)
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
        groups = len(self.costs)
        if self.owners is None:
            return f"certificate: {groups} conv groups certified on every rank, once per step"
        loads = [0.0] * self.world
        for owner, cost in zip(self.owners, self.costs, strict=True):
            loads[owner] += cost
        balance = max(loads) / (sum(loads) / self.world) if sum(loads) else 1.0
        sent = self.buffer_bytes()
        return (
            f"certificate: {groups} conv groups shared by {self.world} ranks (largest share "
            f"{balance:.2f}x the mean cost), one all_gather per step: each rank sends "
            f"{sent / 1e6:.2f} MB and receives {(self.world - 1) * sent / 1e6:.2f} MB"
        )
