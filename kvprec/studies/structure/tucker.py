"""Tucker decomposition of one layer's K or V tensor, X [H, T, D] (KV heads x tokens x channels), by truncated
higher-order SVD (HOSVD, De Lathauwer, De Moor and Vandewalle 2000).

For each mode n the factor U_n holds the left singular vectors of the mode-n unfolding X_(n) [I_n, prod others],
and the core is G = X x_1 U_1^T x_2 U_2^T x_3 U_3^T. Truncating to ranks (r_1, r_2, r_3) keeps the leading r_n
columns of every U_n; the reconstruction X' = G_r x_1 U_1r x_2 U_2r x_3 U_3r is the orthogonal projection of X
onto the span of the kept columns, so

    ||X - X'||^2 = ||X||^2 - ||G[:r_1, :r_2, :r_3]||^2                                   (1)

which gives the error of every rank choice from one full core (``relative_error``, ``error_table``).

Why an explicit HOSVD in torch and not ``tensorly.decomposition.tucker``: it adds no dependency; it is exact at
full rank (G keeps every singular direction, so X' = X to rounding: tested); and it is deterministic (one SVD
per mode, no random initialisation or iteration count; tensorly's default is HOOI, an alternating
least-squares refinement whose result depends on its initialisation and stopping rule). HOOI can lower the error
of a truncation a little; HOSVD's error is within sqrt(3) of the best rank-(r_1, r_2, r_3) approximation
(De Lathauwer et al., Property 10), and (1) lets one full decomposition serve a sweep over every rank.

Storage (``tucker_numbers``): the core, prod r_n numbers, and each factor whose rank is below its dimension,
I_n r_n numbers. A mode kept at full rank (r_n = I_n) stores no factor: multiplying the core by the orthogonal
U_n along that mode gives an equivalent core of the same size with the identity as factor. At 2 bytes per number
(FP16 storage), ``compression_ratio`` = prod I_n / numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch


def unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding of a 3-way tensor: [I_mode, product of the other dimensions]."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def mode_product(x: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """x x_mode m for m [J, I_mode]: the mode's dimension I_mode becomes J."""
    return torch.tensordot(m, x.movedim(mode, 0), dims=1).movedim(0, mode)


@dataclass
class HOSVD:
    """The full HOSVD of X: factors U_n [I_n, R_n] with R_n = min(I_n, prod of the other dimensions) (orthonormal
    columns, by decreasing singular value), core G [R_1, R_2, R_3] and ||X||^2. FP64."""

    factors: List[torch.Tensor]
    core: torch.Tensor
    norm2: float
    shape: Tuple[int, ...]

    def check_ranks(self, ranks: Sequence[int]) -> Tuple[int, ...]:
        if len(ranks) != len(self.shape) or any(not 1 <= int(r) <= n for r, n in zip(ranks, self.shape)):
            raise ValueError(f"tucker ranks {tuple(ranks)}: need one rank per mode, each in 1..{self.shape}")
        return tuple(int(r) for r in ranks)

    def kept(self, ranks: Sequence[int]) -> Tuple[int, ...]:
        """The core size ranks select: r_n capped at R_n (a larger rank adds only zero singular directions)."""
        return tuple(min(r, f.shape[1]) for r, f in zip(self.check_ranks(ranks), self.factors))

    def relative_error(self, ranks: Sequence[int]) -> float:
        """||X - X'|| / ||X|| of the rank-``ranks`` truncation, from (1) in the module docstring."""
        if self.norm2 == 0.0:
            return 0.0
        a, b, c = self.kept(ranks)
        kept = float(self.core[:a, :b, :c].pow(2).sum())
        return math.sqrt(max(0.0, 1.0 - kept / self.norm2))

    def error_table(self, token_ranks: Sequence[int], channel_ranks: Sequence[int]) -> torch.Tensor:
        """FP64 [len(token_ranks), len(channel_ranks)]: relative error (1) of ranks (H, r_t, r_d) for every pair, the
        head mode at full rank; from one cumulative sum of the core's energy."""
        energy = self.core.pow(2).sum(0).cumsum(0).cumsum(1)  # [R_t, R_d]: energy kept by ranks (i + 1, j + 1)
        rt = torch.tensor([min(r, energy.shape[0]) - 1 for r in token_ranks])
        rd = torch.tensor([min(r, energy.shape[1]) - 1 for r in channel_ranks])
        if self.norm2 == 0.0:
            return torch.zeros(len(rt), len(rd), dtype=torch.float64)
        kept = energy[rt][:, rd]
        return (1.0 - kept / self.norm2).clamp_min(0.0).sqrt()

    def reconstruct(self, ranks: Sequence[int]) -> torch.Tensor:
        """X' [I_1, I_2, I_3] (FP64) of the rank-``ranks`` truncation."""
        kept = self.kept(ranks)
        x = self.core[tuple(slice(0, r) for r in kept)]
        for mode, (u, r) in enumerate(zip(self.factors, kept)):
            x = mode_product(x, u[:, :r], mode)
        return x


def hosvd(x: torch.Tensor) -> HOSVD:
    """The full HOSVD of a 3-way tensor ``x`` (computed in FP64)."""
    if x.dim() != 3:
        raise ValueError(f"hosvd: expected a 3-way tensor [H, T, D], got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    factors = []
    for mode in range(3):
        u, _, _ = torch.linalg.svd(unfold(x, mode), full_matrices=False)
        factors.append(u)
    core = x
    for mode, u in enumerate(factors):
        core = mode_product(core, u.T, mode)
    return HOSVD(factors, core, float(x.pow(2).sum()), tuple(x.shape))


def tucker_numbers(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Numbers stored by a Tucker representation of ranks ``ranks`` (module docstring): core + factors of the
    modes below full rank."""
    if len(shape) != len(ranks) or any(not 1 <= r <= n for r, n in zip(ranks, shape)):
        raise ValueError(f"tucker ranks {tuple(ranks)}: need one rank per mode of {tuple(shape)}, each in 1..dim")
    return math.prod(ranks) + sum(n * r for n, r in zip(shape, ranks) if r < n)


def compression_ratio(shape: Sequence[int], ranks: Sequence[int]) -> float:
    """Dense numbers over stored numbers (the same bytes per number on both sides)."""
    return math.prod(shape) / tucker_numbers(shape, ranks)


def mode_ranks(shape: Sequence[int], mode: int) -> List[int]:
    """The ranks worth trying along ``mode``: 1 .. R_n (R_n = min(I_n, prod of the other dimensions); a rank above
    it adds only zero singular directions) and I_n itself (the mode kept whole, no factor stored)."""
    dims = list(shape)
    limit = min(dims[mode], math.prod(dims[:mode] + dims[mode + 1:]))
    return sorted(set(range(1, limit + 1)) | {dims[mode]})
