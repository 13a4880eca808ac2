"""Curvature policy: each sealed block takes the tier a calibration run's precision map gives it.

docs/design.md, "Precision policy": for a cached position t with attention weight a_t,

    kappa_t = a_t ||d out / d K_t|| ||d^2 out / d K_t^2|| = s^3 a_t^3 |1 - 2 a_t| ||v_t - o||^2 ||q||^3,
    p_t >= log2(c kappa_t D^2 / eps)                       (the precision obstruction bound)

:meth:`Curvature.calibrate` runs the model once on calibration tokens, feeds every layer's post-RoPE query, key and
value to :class:`~kvprec.analysis.analyzer.KVCacheAnalyzer` (on a GPU the curvature reduction runs there, the Triton
kernel, and only per-position statistics reach the host; on CPU the C++ closed form), and maps (layer, KV head,
block) to tiers by threshold, byte budget (multiple-choice knapsack, exact DP or greedy with an LP bound) or total
predicted error. The policy then assigns block j of head h in layer l the map's tier; blocks past the calibrated
length take the head's default tier (the lower median of its mapped tiers by effective bits). The map is per
position index, not per content: it carries what the calibration text says about where curvature sits (sinks,
recency) to other inputs. Under tensor parallelism every rank gets the rows of its own KV heads of the whole
model's map (kvprec/hf/distributed.py, :func:`~kvprec.hf.distributed.analyze_over_ranks`).

Capture: the model runs under ``kvprec.enabled(model)`` with a throw-away AdaptiveCache whose blocks are FP32
(lossless for FP32/FP16/BF16 models); each of its layers records the query the "kvprec" attention function hands
it together with the layer's K/V gathered back (exactly what ``update`` received) and the attention's softmax
scale. The closed form is plain causal softmax attention: sliding windows and logit softcaps of the model are
not in it (a warning says so when the model uses them).
"""
from __future__ import annotations

import warnings
from typing import Iterable, List, Optional, Sequence, Union

import torch

from ...analysis.analyzer import KVCacheAnalyzer, PrecisionMap, calibration_backend, check_request
from ...storage.formats import Tier
from ...analysis.precision import DEFAULT_EPS
from ..distributed import analyze_over_ranks
from .base import Policy, SealStats
from .uniform import Uniform


class Curvature(Policy):
    """Tiers from ``precision_map`` (a :class:`~kvprec.analysis.analyzer.PrecisionMap`); build it with :meth:`calibrate`.

    The cache must use the map's block geometry (block_size, head_dim, group_size) and KV heads per layer."""

    def __init__(self, precision_map: PrecisionMap):
        if not isinstance(precision_map, PrecisionMap):
            raise ValueError(f"Curvature: precision_map must be a kvprec.analysis.analyzer.PrecisionMap, got "
                             f"{type(precision_map).__name__}; use Curvature.calibrate(model, input_ids, ...)")
        self.map = precision_map
        self.calibration_backends: dict = {}  # calibrate(): add_calibration calls per backend that ran

    @classmethod
    def calibrate(cls, model, input_ids: Union[torch.Tensor, Sequence[torch.Tensor]], *, mode: str = "budget",
                  bits_per_element: Optional[float] = None, budget_bytes: Optional[int] = None,
                  max_error: Optional[float] = None, eps: Optional[float] = None, c: float = 1.0,
                  candidates: Iterable = ("int4", "int8", "fp16"), block_size: int = 64,
                  group_size: Optional[int] = None,
                  query_reduce: str = "mean", method: str = "auto", backend: str = "auto") -> "Curvature":
        """Run ``model`` once on ``input_ids`` and return the policy of the resulting map.

        input_ids: int64 [N] or [B, N] without padding (each row is one calibration input), or a list of such
            tensors (inputs of different lengths are aligned at their first token).
        mode: "budget" (``bits_per_element`` or ``budget_bytes``), "threshold" (``eps``, ``c``) or "quality"
            (``max_error``, the total predicted error ``sum c kappa_sum D^2 2^-p_eff`` allowed).
        bits_per_element: converted to page bytes over every calibrated block of every layer and KV head,
            ``budget = floor(bits * L * Hkv * nb * T * D * 2 / 8)`` with nb = ceil(N_max / T): the map's pages
            (K and V data plus FP16 scales and zeros, BlockGeometry.page_bytes) use at most that many bits per
            element. A budget below every block at the cheapest candidate raises ValueError.
        eps, c: the bound's tolerance (default 2^-11, FP16's unit roundoff) and constant; only threshold mode's
            choice depends on them (the knapsack's errors all scale with c and ignore eps).
        candidates, block_size, group_size: the tiers and the block geometry of the cache the policy is for
            (group_size None: ``formats.default_group_size(head_dim)``, as AdaptiveCache's default).
        query_reduce: "mean" or "max" of curvature over inputs, query heads and queries; method: knapsack
            solver, auto | dp | greedy.
        backend: how each layer's curvature is reduced (:meth:`KVCacheAnalyzer.add_calibration`): "auto" runs the
            Triton kernel where the model is on a GPU (only [B, Hkv, N] statistics per layer reach the host) and
            the C++ accumulator on host copies otherwise; "cpp", "triton" (CUDA, or CPU under TRITON_INTERPRET=1)
            or "torch" (the FP64 reference) force one. The policy's ``calibration_backends`` says which ran.
        """
        check_request(mode, budget_bytes, bits_per_element, max_error, method)
        calibration_backend(backend, model.device)  # refuse an unknown or unavailable backend before the forward
        options = dict(block_size=block_size, group_size=group_size, c=c, eps=DEFAULT_EPS if eps is None else eps,
                       candidates=candidates, query_reduce=query_reduce)
        analyzer = _calibrate(model, _sequences(input_ids), options, backend)
        # under tensor parallelism: the whole model's map, this rank's heads (kvprec/hf/distributed.py)
        policy = cls(analyze_over_ranks(analyzer, model.config, options, lambda a: a.analyze(
            mode, budget_bytes=budget_bytes, bits_per_element=bits_per_element, max_error=max_error, method=method)))
        policy.calibration_backends = dict(analyzer.backends)
        return policy

    # ---- the policy interface ---------------------------------------------------------------------------
    def _check(self, layer_idx: int, kv_heads: int, layer) -> None:
        m, g = self.map, self.map.geometry
        if not 0 <= layer_idx < m.num_layers:
            raise ValueError(f"Curvature: layer {layer_idx} has no map (calibrated {m.num_layers} layers); "
                             "calibrate on the model this cache is for")
        if kv_heads != m.kv_heads(layer_idx):
            raise ValueError(f"Curvature: layer {layer_idx} has {kv_heads} KV heads, the map {m.kv_heads(layer_idx)}")
        have = getattr(layer, "geometry", None)
        if have is not None and have != g:
            raise ValueError(f"Curvature: the cache's block geometry {have} differs from the calibrated {g}; build "
                             f"the AdaptiveCache with block_size={g.block_size}, group_size={g.group_size}")

    def assign(self, layer_idx: int, blocks: range, stats: SealStats) -> torch.Tensor:
        if stats.block_size != self.map.geometry.block_size:
            raise ValueError(f"Curvature: the cache's block_size {stats.block_size} differs from the calibrated "
                             f"{self.map.geometry.block_size}")
        self._check(layer_idx, stats.kv_heads, stats.layer)
        return self.map.seal_tiers(layer_idx, stats.batch, blocks)

    def importance(self, layer) -> torch.Tensor:
        """The block's calibrated kappa_sum (past the map, the head's median), FP32 [B, H_kv, n_sealed]: budget
        wrappers demote the blocks whose predicted error grows least first."""
        b, h, n = layer.tiers().shape
        if n == 0:  # nothing sealed (or no buffer yet): nothing to rank
            return torch.zeros(b, h, 0)
        self._check(layer.layer_idx, h, layer)
        return self.map.block_curvature(layer.layer_idx, n).float().expand(b, h, n)

    def describe(self) -> str:
        m = self.map
        return (f"curvature({m.mode}: {m.bits_per_element:.3f} bits/element over {m.num_layers} layers x "
                f"{m.kv_heads(0)} KV heads x {m.mapped_blocks(0)} blocks of {m.geometry.block_size})")


def _sequences(input_ids) -> List[torch.Tensor]:
    """Calibration inputs as a list of int64 [B, N] tensors."""
    seqs = list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]
    if not seqs:
        raise ValueError("input_ids: empty list; give at least one calibration input")
    out = []
    for s in seqs:
        if not isinstance(s, torch.Tensor) or s.dtype.is_floating_point or s.dim() not in (1, 2) or s.shape[-1] < 1:
            got = f"{s.dtype} {list(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"input_ids: expected integer token ids [N] or [B, N] (N >= 1), got {got}")
        out.append((s if s.dim() == 2 else s[None]).long())
    return out


def _calibrate(model, sequences: List[torch.Tensor], options: dict, backend: str = "auto") -> KVCacheAnalyzer:
    """One forward per calibration tensor; every layer's (q, k, v) into an analyzer made at the first attention
    call (head_dim and softmax scale are the model's), reduced by ``backend``."""
    from ..attention import enabled  # transformers is needed here only
    from ..cache import AdaptiveCache

    state: dict = {}

    def record(layer, q: torch.Tensor, scale: float, sliding_window: int, softcap: float) -> None:
        k, v = layer.gather()  # FP32 pages: exactly the K/V update() received, in the model dtype
        if "analyzer" not in state:
            state["analyzer"] = KVCacheAnalyzer(head_dim=q.shape[-1], scale=scale or None, **options)
            state["scale"] = scale
        elif scale != state["scale"]:
            raise ValueError(f"Curvature.calibrate: layer {layer.layer_idx} uses softmax scale {scale}, an earlier "
                             f"layer {state['scale']}; the analyzer takes one scale for all layers")
        if (sliding_window or softcap) and not state.get("warned"):
            state["warned"] = True
            warnings.warn(f"Curvature.calibrate: layer {layer.layer_idx} uses a sliding window ({sliding_window}) or "
                          f"a logit softcap ({softcap}); the curvature is computed for plain causal softmax "
                          "attention over all positions", stacklevel=2)
        state["analyzer"].add_calibration(layer.layer_idx, q, k, v, backend=backend)

    for ids in sequences:
        cache = AdaptiveCache(model.config, policy=Uniform(Tier.FP32), block_size=options["block_size"],
                              group_size=options["group_size"])
        for layer in cache.layers:
            layer.attend = _recording(layer, record)  # this throw-away cache's own layers only
        with torch.no_grad(), enabled(model):
            model(input_ids=ids.to(model.device), past_key_values=cache, use_cache=True)
    if "analyzer" not in state:
        raise ValueError("Curvature.calibrate: the model never called the 'kvprec' attention; is it a supported "
                         "decoder (kvprec.hf.cache.SUPPORTED_MODEL_TYPES)?")
    return state["analyzer"]


def _recording(layer, record):
    attend = layer.attend

    def recording_attend(q, mask, scale, sliding_window, softcap, block_mass):
        record(layer, q, scale, sliding_window, softcap)
        return attend(q, mask, scale, sliding_window, softcap, block_mass)

    return recording_attend
