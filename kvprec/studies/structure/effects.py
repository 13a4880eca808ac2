"""Every compression of the context cache the study measures, with its bytes and the per-prediction NLL of the
continuation (kvprec/studies/structure/scoring.py), as raw arrays.

One row per variant: var_name, var_family, var_which ("kv", "k" or "v": the tensors it compresses), var_target
(the compression ratio asked for; NaN when the variant has none), var_layer (the one layer it touches; -1: all),
var_bytes (stored bytes of the whole context cache: compressed tensors plus the untouched ones at FP16),
var_resident_bytes (kvprec tiers: the cache's resident bytes, which add the allocated unsealed tail; -1
otherwise), var_error_k / var_error_v (||x' - x|| / ||x|| over all layers), var_params (JSON), var_nll /
var_kl [n_variants, C - 1] (per-prediction NLL, KL from the exact cache's distribution), var_top1 uint8
[n_variants, C - 1] (argmax agrees with the exact cache's); and ref_nll [C - 1], dense_bytes.

Families: tucker, lowrank, drop (kvprec/studies/structure/compress.py); tier (kvprec's uniform tiers, keys as
given or rotated), budget (kvprec's budget policy at a target's bytes: a mix of two adjacent tiers, keys as given or
rotated, :func:`budget_cache`); prune_layer, prune_head, prune (user's or chosen sets).

kvprec bytes (families tier and budget) are the cache's own accounting (``AdaptiveCache.memory_report()``):
pages (codes, FP16 scales and zeros) + block table + key rotation matrices (FP32 D x D per layer). The unsealed
tail the cache allocates for the next tokens holds no context position (the context is whole blocks), so it is
left out of var_bytes and kept in var_resident_bytes.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...storage.formats import BlockGeometry, Tier
from . import compress as cp
from .observe import rotation_kind
from .scoring import ContinuationScorer, through_adaptive_cache

TIERS = ("int8", "int4", "int2")


@dataclass
class Variant:
    name: str
    family: str
    which: str
    target: float
    layer: int
    kv_bytes: int
    nll: np.ndarray
    kl: np.ndarray
    top1: np.ndarray
    error_k: float
    error_v: float
    resident_bytes: int = -1
    params: Dict[str, object] = field(default_factory=dict)


def relative_error(kv, ref, index: int) -> float:
    num = sum(float((a[index].double() - b[index].double()).pow(2).sum()) for a, b in zip(kv, ref))
    den = sum(float(b[index].double().pow(2).sum()) for b in ref)
    return math.sqrt(num / den) if den > 0 else 0.0


class Effects:
    """Collects variants: each transforms the context cache, is scored, and becomes one row."""

    def __init__(self, model, kv, continuation: torch.Tensor, progress: Optional[Callable[[], None]] = None):
        self.model, self.kv = model, kv
        self.scorer = ContinuationScorer(model, continuation)
        self.ref = self.scorer.score(kv)
        self.ref_nll = self.ref.nll
        self.dense = cp.dense_bytes(kv)
        self.rows: List[Variant] = []
        self.progress = progress

    def add(self, name, family, which, kv, kv_bytes, target=math.nan, layer=-1, resident=-1, params=None):
        scored = self.scorer.score(kv)
        kl, top1 = scored.against(self.ref)
        self.rows.append(Variant(name, family, which, float(target), int(layer), int(kv_bytes), scored.nll, kl, top1,
                                 relative_error(kv, self.kv, 0), relative_error(kv, self.kv, 1), int(resident),
                                 dict(params or {})))
        if self.progress:
            self.progress()
        return self.rows[-1]

    def add_compressed(self, name, family, which, c: cp.Compressed, target=math.nan, layer=-1):
        return self.add(name, family, which, c.kv, c.kv_bytes, target, layer, params=c.params)

    def _stack(self, values, dtype) -> np.ndarray:
        return np.stack(values).astype(dtype) if values else np.zeros((0, self.ref_nll.shape[0]), dtype=dtype)

    def arrays(self) -> Dict[str, np.ndarray]:
        rows = self.rows
        return {
            "ref_nll": self.ref_nll, "dense_bytes": np.array(self.dense, dtype=np.int64),
            "var_name": np.array([r.name for r in rows], dtype=str),
            "var_family": np.array([r.family for r in rows], dtype=str),
            "var_which": np.array([r.which for r in rows], dtype=str),
            "var_target": np.array([r.target for r in rows], dtype=np.float64),
            "var_layer": np.array([r.layer for r in rows], dtype=np.int64),
            "var_bytes": np.array([r.kv_bytes for r in rows], dtype=np.int64),
            "var_resident_bytes": np.array([r.resident_bytes for r in rows], dtype=np.int64),
            "var_error_k": np.array([r.error_k for r in rows], dtype=np.float64),
            "var_error_v": np.array([r.error_v for r in rows], dtype=np.float64),
            "var_params": np.array([json.dumps(r.params, sort_keys=True) for r in rows], dtype=str),
            "var_nll": self._stack([r.nll for r in rows], np.float64),
            "var_kl": self._stack([r.kl for r in rows], np.float64),
            "var_top1": self._stack([r.top1 for r in rows], np.uint8),
        }


# ---- plans: how many scoring calls each part makes, so progress bars know their length -------------------------

def compression_targets(ratios: Sequence[float], curve: Sequence[float]) -> List[float]:
    return sorted(set(float(r) for r in ratios) | set(float(r) for r in curve))


def tucker_variants(fx: Effects, tucker: cp.TuckerCache, ratios, curve, sweep_ratio: float) -> Dict[str, np.ndarray]:
    """All layers at every target (kv), keys only and values only at the table ratios, and every layer alone at
    ``sweep_ratio`` (kv). Returns the error tables of the tradeoff plot: tucker_error [2 (K, V), n_rt, n_rd] (mean over
    layers) at tucker_token_ranks x tucker_channel_ranks, tucker_numbers [n_rt, n_rd], tucker_shape [3]."""
    for target in compression_targets(ratios, curve):
        try:
            rk, rv = tucker.ranks_for("k", target), tucker.ranks_for("v", target)
        except ValueError:
            continue
        fx.add_compressed(f"tucker {target:g}x", "tucker", "kv", tucker.apply(rk, rv), target)
    for target in ratios:
        for which in ("k", "v"):
            try:
                r = tucker.ranks_for(which, target)
            except ValueError:
                continue
            fx.add_compressed(f"tucker {which.upper()} only {target:g}x", "tucker", which,
                              tucker.apply(r, r, which=which), target)
    rk, rv = tucker.ranks_for("k", sweep_ratio), tucker.ranks_for("v", sweep_ratio)
    for layer in range(len(fx.kv)):
        fx.add_compressed(f"tucker {sweep_ratio:g}x layer {layer}", "tucker", "kv",
                          tucker.apply(rk, rv, layers=[layer]), sweep_ratio, layer)
    return {"tucker_shape": np.array(tucker.shape, dtype=np.int64),
            "tucker_token_ranks": np.array(tucker.token_ranks, dtype=np.int64),
            "tucker_channel_ranks": np.array(tucker.channel_ranks, dtype=np.int64),
            "tucker_numbers": tucker.numbers().numpy(),
            "tucker_error": np.stack([tucker.errors("k").numpy(), tucker.errors("v").numpy()])}


def tucker_calls(n_ratios: int, n_targets: int, n_layers: int) -> int:
    return n_targets + 2 * n_ratios + n_layers


def channel_variants(fx: Effects, query_norms: Sequence[torch.Tensor], ratios, curve) -> None:
    """Palu-style low rank and ThinK-style channel drop: kv at every target, keys / values only at the table
    ratios."""
    shape = fx.kv[0][0].shape
    for family, bytes_of, make in (
            ("lowrank", cp.lowrank_bytes, lambda r, which: cp.lowrank(fx.kv, r, r, which)),
            ("drop", cp.drop_bytes, lambda r, which: cp.drop(fx.kv, r, r, query_norms, which))):
        plans = [(t, "kv") for t in compression_targets(ratios, curve)]
        plans += [(t, w) for t in ratios for w in ("k", "v")]
        for target, which in plans:
            try:
                r = cp.channel_rank_for(shape, target, bytes_of)
            except ValueError:
                continue
            label = f"{family} {target:g}x" if which == "kv" else f"{family} {which.upper()} only {target:g}x"
            fx.add_compressed(label, family, which, make(r, which), target)


def channel_calls(n_ratios: int, n_targets: int) -> int:
    return 2 * (n_targets + 2 * n_ratios)


def _tier_row(fx: Effects, name, family, policy, block_size, rotation, target=math.nan, rotation_seed=0,
              sweep=False, tc=None):
    tc = tc or through_adaptive_cache(fx.model, fx.kv, policy, block_size, rotation, rotation_seed)
    params = {"policy": policy.describe(), "key_rotation": rotation, "page_bits_per_element": tc.page_bits,
              "block_size": block_size, "rotation_bytes": tc.rotation_bytes, "table_bytes": tc.table_bytes}
    fx.add(name, family, "kv", tc.kv, tier_bytes(tc), target, resident=tc.resident_bytes, params=params)
    if sweep:  # every layer alone at this tier, the others exact
        for layer in range(len(fx.kv)):
            kv = [tc.kv[i] if i == layer else fx.kv[i] for i in range(len(fx.kv))]
            dense_others = sum(cp.tensor_bytes(k) + cp.tensor_bytes(v) for i, (k, v) in enumerate(fx.kv) if i != layer)
            fx.add(f"{name} layer {layer}", family, "kv", kv, int(tc.layer_bytes[layer]) + dense_others, target, layer,
                   params=params)


def tier_bytes(tc) -> int:
    """kvprec's bytes of the context (module docstring): pages + block tables + key rotation matrices."""
    return tc.page_bytes + tc.table_bytes + tc.rotation_bytes


def budget_tiers(bits: float, block_size: int, head_dim: int):
    """(hi, lo): the two adjacent integer tiers whose mix stores ``bits`` per element in pages — hi the lowest that
    does not fit alone, lo the one below it, which does; None when INT8 fits alone or INT2 does not."""
    geometry = BlockGeometry(block_size, head_dim)
    ladder = [Tier.INT8, Tier.INT4, Tier.INT2]
    page_bits = [8.0 * geometry.page_bytes(t) / (2 * block_size * head_dim) for t in ladder]
    for hi, lo, hi_bits, lo_bits in zip(ladder, ladder[1:], page_bits, page_bits[1:]):
        if hi_bits > bits >= lo_bits:
            return hi, lo
    return None


def budget_cache(fx: Effects, target: float, block_size: int, rotation, rotation_seed: int):
    """kvprec's budget policy storing the context in at most dense / target bytes (block tables and rotation
    matrices included: the page budget is 8 (dense / target - overhead) / elements bits per element, the overhead
    measured by a first pass), as a mix of two adjacent tiers (:func:`budget_tiers`): every block starts at hi and
    the budget demotes the least important to lo, the importance of a sink-and-window policy (the block holding
    positions 0..3 and the newest block last, then newer before older). (policy, TierCache, "hi/lo"), or None when
    kvprec cannot store that few bytes or INT8 fits alone."""
    from ...hf.policy import BudgetError, SinkWindow, budget

    elements = fx.dense // cp.FP16_BYTES
    head_dim = fx.kv[0][0].shape[-1]
    bits = 16.0 / target
    for _ in range(2):
        tiers = budget_tiers(bits, block_size, head_dim)
        if tiers is None:
            return None
        hi, lo = tiers
        try:
            policy = budget(SinkWindow(sinks=4, window=block_size, rest=hi, recent=hi), bits_per_element=bits,
                            floor=lo)
            tc = through_adaptive_cache(fx.model, fx.kv, policy, block_size, rotation, rotation_seed)
        except BudgetError:
            return None
        bits = 8.0 * (fx.dense / target - tc.table_bytes - tc.rotation_bytes) / elements
    return (policy, tc, f"{hi}/{lo}") if tier_bytes(tc) * target <= fx.dense * (1 + 1e-9) else None


def tier_variants(fx: Effects, block_size: int, ratios, rotation_seed: int, sweep: bool) -> None:
    """Uniform INT8 / INT4 / INT2 with keys as given and rotated; the budget mix at each table ratio that kvprec
    can reach, keys as given and rotated; with ``sweep``, every layer alone at rotated INT2."""
    from ...hf.policy.uniform import Uniform

    rotation = rotation_kind(fx.kv[0][0].shape[-1])
    for tier in TIERS:
        _tier_row(fx, f"kvprec {tier}", "tier", Uniform(tier), block_size, None)
        _tier_row(fx, f"kvprec {tier} rotated", "tier", Uniform(tier), block_size, rotation,
                  rotation_seed=rotation_seed, sweep=sweep and tier == "int2")
    for target in ratios:
        for rot, suffix in ((None, ""), (rotation, " rotated")):
            found = budget_cache(fx, target, block_size, rot, rotation_seed)
            if found is not None:
                _tier_row(fx, f"kvprec {found[2]} mix {target:g}x{suffix}", "budget", found[0], block_size, rot,
                          target, rotation_seed, tc=found[1])


def tier_calls(n_layers: int, sweep: bool, n_ratios: int) -> int:
    return 2 * len(TIERS) + (n_layers if sweep else 0) + 2 * n_ratios


def prune_variants(fx: Effects, head_scores: Optional[np.ndarray], layers_spec, heads_spec, fraction: float,
                   seed: int, sweep_heads: bool = True) -> None:
    """Every layer alone; every (layer, KV head) alone; the ``fraction`` of KV heads with the lowest structural
    score (``head_scores`` [L, H]: attention output norm), the same number with the lowest measured single-head
    change, and as many random heads; the user's sets."""
    n, h = len(fx.kv), fx.kv[0][0].shape[0]
    for layer in range(n):
        fx.add_compressed(f"prune layer {layer}", "prune_layer", "kv", cp.prune(fx.kv, layers=[layer]), layer=layer)
    single: Dict[Tuple[int, int], float] = {}
    if sweep_heads:
        for layer in range(n):
            for head in range(h):
                row = fx.add_compressed(f"prune head {layer}:{head}", "prune_head", "kv",
                                        cp.prune(fx.kv, heads=[(layer, head)]), layer=layer)
                single[(layer, head)] = float(np.mean(row.kl))
    count = cp.prune_count(fraction, n * h)
    sets = []
    if head_scores is not None:
        sets.append(("structure", cp.lowest_heads(head_scores, count)))
    if single:
        sets.append(("measured", sorted(single, key=lambda k: (single[k], k))[:count]))
    rng = random.Random(seed)
    sets.append(("random", sorted(rng.sample([(a, b) for a in range(n) for b in range(h)], count))))
    for label, heads in sets:
        fx.add_compressed(f"prune {count} heads ({label})", "prune", "kv", cp.prune(fx.kv, heads=heads))
    if layers_spec:
        fx.add_compressed("prune layers " + ",".join(map(str, layers_spec)), "prune", "kv",
                          cp.prune(fx.kv, layers=layers_spec))
    if heads_spec:
        fx.add_compressed("prune heads " + ",".join(f"{a}:{b}" for a, b in heads_spec), "prune", "kv",
                          cp.prune(fx.kv, heads=heads_spec))


def prune_calls(n_layers: int, n_heads: int, sweep_heads: bool, has_scores: bool, user_sets: int) -> int:
    return n_layers + (n_layers * n_heads if sweep_heads else 0) + 1 + int(has_scores) + int(sweep_heads) + user_sets
