"""KVCacheAnalyzer: calibration attention inputs -> curvature -> a precision map per (layer, KV head, block).

The Python face of the C++ analyzer (``csrc/include/kvprec/analyzer.h``, exposed as
``torch.classes.kvprec.KVCacheAnalyzer``). Pipeline (formulas in ``kvprec/curvature.h`` and
``kvprec/precision_mapper.h``; docs/design.md, "Precision policy"):

1. ``add_calibration(layer, q, k, v, backend=...)``: per-position curvature of one layer on one calibration
   input, ``kappa_t = s^3 a_t^3 |1 - 2 a_t| ||v_t - o||^2 ||q||^3``, reduced over inputs, the query heads of each
   GQA group and the queries that see t (``query_reduce``: mean or max), per KV head: [Hkv, N_max]. Inputs of
   different lengths are aligned at their first token; each batch row counts as one input. On a GPU the
   reduction over query heads and queries runs there (the Triton curvature kernel) and only [B?, Hkv, N]
   statistics reach the host; on CPU the C++ accumulator computes it from host copies.
2. Per block of T positions: ``kappa_max`` (threshold mode: every position's bound must hold) and ``kappa_sum``
   (knapsack modes: predicted errors of positions add).
3. ``analyze(mode)``:

   * ``threshold``: tier = the cheapest candidate with effective bits >= ``p = log2(c kappa_max D^2 / eps)``;
   * ``budget``: one multiple-choice knapsack over all (layer, head, block) items, error
     ``c kappa_sum D^2 2^-p_eff(tier)``, cost ``BlockGeometry.page_bytes(tier)``, total page bytes <= budget;
   * ``quality``: the fewest page bytes with total predicted error <= ``max_error``.

Bits per element of a map are ``8 * page_bytes / (items * T * D * 2)`` (K and V, FP16 scales and zeros
included), items = sum over layers of Hkv * ceil(N / T); a partial last block counts as a whole page, as it will
once it seals. :meth:`KVCacheAnalyzer.budget_bytes` inverts that for a bits-per-element budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional

import torch

from .._native import require_native
from ..storage.formats import BlockGeometry, Tier
from .precision import DEFAULT_C, DEFAULT_CANDIDATES, DEFAULT_EPS, METHODS

MODES = ("threshold", "budget", "quality")
QUERY_REDUCTIONS = ("mean", "max")

__all__ = ["KVCacheAnalyzer", "PrecisionMap", "HeadReport", "LayerCurvature", "MODES", "check_request",
           "calibration_backend", "visible_count"]


@dataclass(frozen=True)
class HeadReport:
    """One (layer, KV head) row of the report: blocks per tier name, page bytes, bits per element
    (``8 * page_bytes / (blocks * T * D * 2)``), predicted error ``sum_blocks c kappa_sum D^2 2^-p_eff``, the
    largest required bits of its blocks and how many blocks are saturated (required bits above their tier's)."""

    layer: int
    head: int
    blocks: int
    tier_blocks: Dict[str, int]
    page_bytes: int
    bits_per_element: float
    predicted_error: float
    max_required_bits: float
    saturated: int


class LayerCurvature(NamedTuple):
    """Accumulated per-position statistics of one layer, FP64 [Hkv, N_max], over every (input, query head of the
    group, query that sees t): ``sum``, ``max`` and ``count``; ``inputs`` calibration rows added."""

    sum: torch.Tensor
    max: torch.Tensor
    count: torch.Tensor
    inputs: int


@dataclass
class PrecisionMap:
    """A precision map: one tier per (layer, KV head, calibrated block), its curvature and its report.

    tiers / kappa_max / kappa_sum: per layer, int8 tier ids / FP64 / FP64 [Hkv, nb];
    default_tiers: per layer, int8 [Hkv], the tier of blocks past the calibrated length: the lower median of the
    head's mapped tiers by effective bits (ties by tier id), i.e. the typical block of that head (C++
    ``PrecisionMap::default_tiers``). page_bytes, bits_per_element, predicted_error: totals of the report;
    exact / lower_bound: knapsack modes, whether the DP solved it and a lower bound on the optimal error (budget)
    or bytes (quality); threshold mode is exact with bound 0.
    """

    geometry: BlockGeometry
    mode: str
    tiers: List[torch.Tensor]
    kappa_max: List[torch.Tensor]
    kappa_sum: List[torch.Tensor]
    default_tiers: List[torch.Tensor]
    page_bytes: int
    bits_per_element: float
    predicted_error: float
    exact: bool
    lower_bound: float
    heads: List[HeadReport]
    markdown: str

    @property
    def num_layers(self) -> int:
        return len(self.tiers)

    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: {layer} is out of range; the map has {self.num_layers} layers")
        return layer

    def kv_heads(self, layer: int) -> int:
        return self.tiers[self._layer(layer)].shape[0]

    def mapped_blocks(self, layer: int) -> int:
        return self.tiers[self._layer(layer)].shape[1]

    def tier(self, layer: int, head: int, block: int) -> Tier:
        """The tier of block ``block`` of KV head ``head``; past the calibrated blocks, the head's default tier."""
        h = self.kv_heads(layer)
        if not 0 <= head < h:
            raise ValueError(f"head: {head} is out of range; layer {layer} has {h} KV heads")
        if block < 0:
            raise ValueError(f"block: {block} is not accepted; expected >= 0")
        if block < self.mapped_blocks(layer):
            return Tier(int(self.tiers[layer][head, block]))
        return Tier(int(self.default_tiers[layer][head]))

    def seal_tiers(self, layer: int, batch: int, blocks: range) -> torch.Tensor:
        """Tiers of blocks ``blocks`` for every batch row: int8 [batch, Hkv, len(blocks)] (C++ ``seal_tiers``)."""
        nb = self.mapped_blocks(layer)
        if batch < 1 or blocks.start < 0 or blocks.step != 1:
            raise ValueError(f"seal_tiers: batch {batch} and blocks {blocks} are not accepted; expected batch >= 1 "
                             "and a contiguous range of block indices >= 0")
        idx = torch.arange(blocks.start, blocks.stop)
        mapped = self.tiers[layer][:, idx.clamp(max=nb - 1)]  # a map has >= 1 block per layer
        row = torch.where(idx < nb, mapped, self.default_tiers[layer][:, None])
        return row.to(torch.int8).unsqueeze(0).expand(batch, -1, -1).contiguous()

    def block_curvature(self, layer: int, blocks: int) -> torch.Tensor:
        """kappa_sum of blocks 0..blocks-1, FP64 [Hkv, blocks]; past the map, the lower median of the head's
        kappa_sum (C++ ``PrecisionMap::block_curvature``): the importance of a block for budget wrappers."""
        ks = self.kappa_sum[self._layer(layer)]
        nb = ks.shape[1]
        if blocks <= nb:
            return ks[:, :blocks]
        median = ks.sort(dim=1).values[:, (nb - 1) // 2]
        return torch.cat([ks, median[:, None].expand(-1, blocks - nb)], dim=1)

    def to_markdown(self) -> str:
        """The report: totals, then one row per (layer, head) with its tier histogram (the C++ text)."""
        return self.markdown


class KVCacheAnalyzer:
    """Collects calibration attention inputs per layer and maps them to tiers (see the module docstring).

    Args:
        head_dim: D of the keys (and the block geometry). block_size: T, a power of two. group_size: G, the
            value quantization group (divides D; None: ``formats.default_group_size(D)``); T, D and G fix the page
            bytes of each tier.
        c, eps: the bound's constant and error tolerance, ``p = log2(c kappa D^2 / eps)`` (defaults 1, 2^-11).
        candidates: the tiers the map may choose (names, Tier or ids).
        scale: softmax scale of the model's attention; None = 1/sqrt(D).
        causal: calibration queries are the last Q positions, causal (a prefill).
        query_reduce: "mean" or "max" over inputs, the group's query heads and the queries that see a position.
    """

    def __init__(self, head_dim: int = 128, block_size: int = 64, group_size: Optional[int] = None, *,
                 c: float = DEFAULT_C,
                 eps: float = DEFAULT_EPS, candidates: Iterable = DEFAULT_CANDIDATES, scale: Optional[float] = None,
                 causal: bool = True, query_reduce: str = "mean"):
        require_native("KVCacheAnalyzer")
        if query_reduce not in QUERY_REDUCTIONS:
            raise ValueError(f"query_reduce: {query_reduce!r} is not accepted; use mean or max (a sum would grow "
                             "with the number of calibration inputs)")
        self.geometry = BlockGeometry(int(block_size), int(head_dim), None if group_size is None else int(group_size))
        self.candidates = [Tier.parse(t) for t in candidates]
        self.c, self.eps = float(c), float(eps)
        self.scale, self.causal = float(0.0 if scale is None else scale), bool(causal)  # 0: 1/sqrt(D)
        self.backends: Dict[str, int] = {}  # add_calibration calls per backend that ran
        self._impl = torch.classes.kvprec.KVCacheAnalyzer(
            self.c, self.eps, self.geometry.block_size, self.geometry.head_dim, self.geometry.group_size,
            [int(t) for t in self.candidates], self.scale, self.causal, query_reduce)

    def add_calibration(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        backend: str = "auto") -> str:
        """Add one layer's attention inputs on one calibration input (post-RoPE): q [B?, Hq, Q, D], k/v
        [B?, Hkv, N, D]. Every call for a layer must have the same Hkv. Returns the backend that ran.

        backend (:func:`calibration_backend`):

        * ``"cpp"``: q, k, v are copied to the host and the C++ accumulator computes the closed form there (FP64);
        * ``"triton"`` (what ``"auto"`` picks for CUDA tensors; also CPU tensors under TRITON_INTERPRET=1): the
          curvature reduction runs where q is (``curvature_sum_max``: its first pass shared by the sum and the max
          over queries), and only the position
          statistics pos_sum, pos_max [B?, Hkv, N] come to the host, where :meth:`add_reduced` adds them with the
          count of (query head, query) pairs that see each position (:func:`visible_count`, from the shapes).
          FP32 arithmetic: within the kernel's tolerance of the C++ path (kvprec/ops/triton/curvature.py);
        * ``"torch"``: the same reduced path with the FP64 pure-torch reference on q's device (an oracle: it
          materialises [B, Hq, Q, N] several times);
        * ``"auto"``: triton where the op registry resolves curvature_reduce to it for q's device (CUDA), else cpp.
        """
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"add_calibration: {name} must be a tensor, got {type(t).__name__}")
        which = calibration_backend(backend, q.device)
        if which == "cpp":
            self._impl.add_calibration(int(layer), q.detach().cpu(), k.detach().cpu(), v.detach().cpu())
        else:
            from .curvature import curvature_sum_max

            if int(layer) < 0:
                raise ValueError(f"layer: {layer} is not accepted; expected >= 0")
            d = self.geometry.head_dim
            if k.dim() >= 1 and k.shape[-1] != d:  # the native path's check, before any kernel runs
                raise ValueError(f"add_calibration: k has head_dim {k.shape[-1]} but the geometry's head_dim is {d} "
                                 "(head_dim=)")
            q, k, v = q.detach(), k.detach(), v.detach()
            pos_sum, pos_max = curvature_sum_max(q, k, v, self.scale, self.causal, backend=which)
            # curvature_sum_max checked the shapes: q [B?, Hq, Q, D], k [B?, Hkv, N, D], Hq % Hkv == 0, causal Q <= N.
            batch = q.shape[0] if q.dim() == 4 else 1
            count = visible_count(batch, q.shape[-3] // k.shape[-3], q.shape[-2], k.shape[-2], self.causal)
            self._impl.add_reduced(int(layer), pos_sum.cpu(), pos_max.cpu(), count)
        self.backends[which] = self.backends.get(which, 0) + 1
        return which

    def add_reduced(self, layer: int, pos_sum: torch.Tensor, pos_max: torch.Tensor, count: torch.Tensor) -> None:
        """Add one layer's statistics on one calibration input, already reduced (C++
        ``CurvatureAccumulator::add_reduced``): pos_sum / pos_max [B?, Hkv, N], the sum / max of kappa over the
        group's query heads and the queries that see each position (``curvature_reduce`` with query_reduce "sum" /
        "max", computed with this analyzer's scale and causality); count [N] or [Hkv, N], :func:`visible_count`.
        Copied to the host if they are not there."""
        for name, t in (("pos_sum", pos_sum), ("pos_max", pos_max), ("count", count)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"add_reduced: {name} must be a tensor, got {type(t).__name__}")
        self._impl.add_reduced(int(layer), pos_sum.detach().cpu(), pos_max.detach().cpu(), count.detach().cpu())

    @property
    def num_layers(self) -> int:
        """Layers seen so far: 1 + the largest layer index given to add_calibration."""
        return self._impl.num_layers()

    def curvature(self, layer: int) -> LayerCurvature:
        return LayerCurvature(*self._impl.curvature(int(layer)))

    def items(self) -> int:
        """(layer, KV head, block) items of the map: sum over layers of Hkv * ceil(N_max / T)."""
        total = 0
        for layer in range(self.num_layers):
            h, n = self.curvature(layer).sum.shape
            total += h * math.ceil(n / self.geometry.block_size)
        return total

    def budget_bytes(self, bits_per_element: float) -> int:
        """Page bytes of a bits-per-element budget: floor(bits * items * T * D * 2 / 8) (metadata included)."""
        if not (math.isfinite(bits_per_element) and bits_per_element > 0):
            raise ValueError(f"bits_per_element: {bits_per_element} is not accepted; use a positive number")
        g = self.geometry
        return math.floor(bits_per_element * self.items() * g.block_size * g.head_dim * 2 / 8)

    def min_bytes(self) -> int:
        """The smallest page bytes any map can have: every item at the cheapest candidate."""
        return self.items() * min(self.geometry.page_bytes(t) for t in self.candidates)

    def analyze(self, mode: str = "threshold", *, budget_bytes: Optional[int] = None,
                bits_per_element: Optional[float] = None, max_error: Optional[float] = None,
                method: str = "auto") -> PrecisionMap:
        """The precision map of everything added so far. Budget mode takes exactly one of ``budget_bytes`` (total
        page bytes of every (layer, head, block) of one sequence) or ``bits_per_element`` (converted by
        :meth:`budget_bytes`); quality mode takes ``max_error`` (total predicted error); method: auto, dp or
        greedy (knapsack modes)."""
        check_request(mode, budget_bytes, bits_per_element, max_error, method)
        budget = 0
        if mode == "budget":
            budget = int(budget_bytes) if budget_bytes is not None else self.budget_bytes(bits_per_element)
            least = self.min_bytes()
            if budget < least:
                g = self.geometry
                floor_bits = 8 * least / (self.items() * g.block_size * g.head_dim * 2)
                asked = (f"budget_bytes={budget}" if bits_per_element is None
                         else f"bits_per_element={bits_per_element} ({budget} bytes)")
                raise ValueError(f"{asked} is below the minimum achievable {least} bytes ({floor_bits:.4g} "
                                 f"bits/element: all {self.items()} blocks at the cheapest candidate); raise the "
                                 "budget or add a cheaper candidate")
        out = self._impl.analyze(mode, budget, float(max_error or 0.0), method)
        tiers, kmax, ksum, defaults, markdown, page_bytes, bits, error, exact, bound, ints, reals = out
        return PrecisionMap(self.geometry, mode, list(tiers), list(kmax), list(ksum), list(defaults), int(page_bytes),
                            float(bits), float(error), bool(exact), float(bound), _heads(ints, reals), markdown)

    def __repr__(self) -> str:
        g = self.geometry
        return (f"KVCacheAnalyzer(head_dim={g.head_dim}, block_size={g.block_size}, group_size={g.group_size}, "
                f"c={self.c}, eps={self.eps}, candidates={[str(t) for t in self.candidates]}, "
                f"layers={self.num_layers})")


def calibration_backend(backend: str, device: torch.device) -> str:
    """The backend :meth:`KVCacheAnalyzer.add_calibration` runs for q on ``device``: "cpp", "triton" or "torch"
    (see there). ``auto`` takes the curvature_reduce op's choice (kvprec.ops.resolve_backend) where it is a device
    kernel (triton: CUDA tensors), else cpp; an explicit backend the registry cannot run on ``device`` raises."""
    from .. import ops  # late: kvprec.ops imports kvprec.analysis

    device = torch.device(device)
    if backend == "cpp":
        return "cpp"  # host copies: any device
    if backend == "auto":
        which = ops.resolve_backend("curvature_reduce", "auto", device)
        return which if which == "triton" else "cpp"
    if backend in ("torch", "triton"):
        return ops.resolve_backend("curvature_reduce", backend, device)  # raises, saying why, if it cannot run
    raise ValueError(f"backend: {backend!r} is not accepted; use auto, cpp, triton or torch")


def visible_count(batch: int, group: int, queries: int, positions: int, causal: bool = True) -> torch.Tensor:
    """FP64 [N]: the (batch row, query head, query) triples that see each position of one calibration input,
    ``count_t = B * G * (causal ? min(Q, N - t) : Q)`` (query i sits at N - Q + i; G = Hq / Hkv). The count
    :meth:`KVCacheAnalyzer.add_reduced` takes, computed from the shapes on the host."""
    if min(batch, group, queries, positions) < 1 or (causal and queries > positions):
        raise ValueError(f"visible_count: batch {batch}, group {group}, queries {queries}, positions {positions} "
                         "are not accepted; expected all >= 1 and, causal, queries <= positions")
    t = torch.arange(positions, dtype=torch.float64)
    seen = (positions - t).clamp(max=queries) if causal else torch.full_like(t, float(queries))
    return seen * (batch * group)


def check_request(mode: str, budget_bytes: Optional[int], bits_per_element: Optional[float],
                  max_error: Optional[float], method: str = "auto") -> None:
    """Raise ValueError naming the argument unless the arguments fit the mode: budget takes exactly one of
    budget_bytes / bits_per_element, quality takes max_error, threshold neither."""
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not accepted; use threshold, budget or quality")
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not accepted; use auto, dp or greedy")
    given = {"budget_bytes": budget_bytes, "bits_per_element": bits_per_element, "max_error": max_error}
    wanted = {"threshold": (), "budget": ("budget_bytes", "bits_per_element"), "quality": ("max_error",)}[mode]
    stray = [k for k, x in given.items() if x is not None and k not in wanted]
    if stray:
        raise ValueError(f"{stray[0]}: not used by mode={mode!r} (budget takes budget_bytes or bits_per_element, "
                         "quality takes max_error, threshold neither)")
    if mode == "budget" and (budget_bytes is None) == (bits_per_element is None):
        raise ValueError("mode='budget' needs exactly one of budget_bytes= or bits_per_element=")
    if mode == "quality" and max_error is None:
        raise ValueError("mode='quality' needs max_error= (the total predicted error allowed)")


def _heads(ints: torch.Tensor, reals: torch.Tensor) -> List[HeadReport]:
    """Rows of the glue's flat report: ints (layer, head, blocks, blocks per tier id, page_bytes, saturated),
    reals (bits_per_element, predicted_error, max_required_bits)."""
    n = len(Tier)
    rows = []
    for i, r in zip(ints.tolist(), reals.tolist()):
        rows.append(HeadReport(i[0], i[1], i[2], {str(Tier(t)): i[3 + t] for t in range(n)}, i[3 + n], r[0], r[1],
                               r[2], i[4 + n]))
    return rows
