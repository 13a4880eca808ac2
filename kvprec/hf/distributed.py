"""AdaptiveCache under tensor parallelism: what spans ranks.

transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``) splits the attention
heads over the ranks: rank r computes, caches and attends over its own contiguous slice of the KV heads,
``[r * H_kv / W, (r + 1) * H_kv / W)`` for W ranks. Each rank's AdaptiveCache sees only those heads, and the
per-head storage formats make that exact: a head is quantized, tiered and attended the same way whether the
model runs on one process or many (python_tests/test_tensor_parallel.py checks the tokens against a one-process
run). Only what sums over heads needs the other ranks:

* a byte budget (``kvprec.policy.budget(..., bytes=N)``) is global: each rank takes the exact share of its heads,
  ``N * H_local / H_kv`` (:func:`head_share`). No communication is needed, every rank meets its share, so the
  ranks together meet N. A ``bits_per_element`` budget is a ratio and holds per rank, hence globally, unchanged;
* the memory report: :func:`global_memory_report` gathers every rank's report (a collective: every rank calls it)
  and sums bytes and elements, with the precision map's heads in global order; the quality harness
  (kvprec/hf/eval.py) reports the bits per element of that sum, and of a stock transformers cache the bytes summed
  over the ranks (:func:`sum_over_ranks`);
* curvature calibration (``kvprec.policy.Curvature.calibrate``): the map is the whole model's. Each rank measures
  the curvature of its own heads; :func:`analyze_over_ranks` gathers the per-head statistics (sum, max and count per
  position: [H_local, N] per layer, small) into one analyzer over all H_kv heads in the model's order, every rank
  solves the same map from it (threshold, or the knapsack of a byte / bits budget or an error target over every
  (layer, head, block) of the model), and keeps the rows of its own heads (:func:`head_rows`). A rank's map is
  therefore the one-process map's rows for its heads, and a budget is met by the ranks together exactly as by one
  process.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, List, Optional, Tuple

import torch


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def config_kv_heads(config) -> Optional[int]:
    """The model's number of KV heads, from its (text) config; None without a config."""
    if config is None:
        return None
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", None)


def head_share(cache, layer) -> float:
    """The fraction of the model's KV heads this rank's ``layer`` holds: H_local / H_kv (1.0 on one process, and
    where the cache has no config to say how many heads the model has)."""
    total = config_kv_heads(getattr(cache, "config", None))
    local = layer.tiers().shape[1]
    if not total or local >= total:
        return 1.0
    if total % local:
        raise ValueError(f"tensor parallelism: this rank holds {local} of {total} KV heads, not an equal share; "
                         "kvprec expects the heads split evenly over the ranks")
    return local / total


def sum_over_ranks(value):
    """``value`` (an int, or a float summed in FP64) summed over the ranks (all_reduce): every rank must call it;
    ``value`` itself on one process."""
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.int64)
    dist.all_reduce(total)
    return type(value)(total.item())


def gather_memory_reports(cache) -> List:
    """Every rank's :meth:`AdaptiveCache.memory_report`, in rank order (``[cache.memory_report()]`` on one process).
    Collective (all_gather_object): every rank must call it."""
    import torch.distributed as dist

    local = cache.memory_report()
    rank, world = rank_and_world()
    if world == 1:
        return [local]
    reports: List = [None] * world
    dist.all_gather_object(reports, local)
    return reports


def global_memory_report(cache):
    """Every rank's :meth:`AdaptiveCache.memory_report`, summed: page, tail, table and rotation bytes and elements
    add up over ranks; tokens are the same on every rank; the precision map [L, H_kv, tiers] concatenates the ranks'
    heads in rank order, which is the model's head order. Collective: every rank must call it. On one process it is
    the cache's own report."""
    return sum_reports(gather_memory_reports(cache))


def sum_reports(reports):
    """The report of a cache split over ranks by heads, from the ranks' reports in rank order."""
    if len(reports) == 1:
        return reports[0]
    first = reports[0]
    summed = {name: sum(getattr(r, name) for r in reports)
              for name in ("tier_bytes", "tail_bytes", "table_bytes", "rotation_bytes", "shadow_bytes", "elements",
                           "sealed_elements")}
    for r in reports[1:]:
        if not torch.equal(r.tokens, first.tokens):
            raise ValueError(f"tensor parallel memory report: ranks hold different token counts per layer "
                             f"({first.tokens.tolist()} vs {r.tokens.tolist()})")
    return replace(first, precision_map=torch.cat([r.precision_map for r in reports], dim=1), **summed)


def analyze_over_ranks(analyzer, config, options: dict, analyze: Callable):
    """``analyze(analyzer)`` -> PrecisionMap on one process; under tensor parallelism (this rank's ``analyzer``,
    a :class:`~kvprec.analysis.analyzer.KVCacheAnalyzer`, holds fewer KV heads than ``config`` names), the map of
    the whole model restricted to this rank's heads: the ranks' statistics are gathered in rank order into an
    analyzer built like this one (``options``: the KVCacheAnalyzer keyword arguments it was built with, besides
    head_dim, scale and causal), ``analyze`` runs on it on every rank (the same input, the same map), and
    :func:`head_rows` keeps this rank's rows. Collective: every rank must call it."""
    import torch.distributed as dist

    from ..analysis.analyzer import KVCacheAnalyzer

    rank, world = rank_and_world()
    total, local = config_kv_heads(config), analyzer.curvature(0).sum.shape[0]
    if world == 1 or not total or local >= total:
        return analyze(analyzer)
    mine = [tuple(analyzer.curvature(layer)[:3]) for layer in range(analyzer.num_layers)]
    gathered: List = [None] * world
    dist.all_gather_object(gathered, mine)
    heads = [stats[0][0].shape[0] for stats in gathered]
    if sum(heads) != total:
        raise ValueError(f"Curvature.calibrate under tensor parallelism: the ranks hold {heads} KV heads, not the "
                         f"model's {total} in all")
    whole = KVCacheAnalyzer(head_dim=analyzer.geometry.head_dim, scale=analyzer.scale or None, causal=analyzer.causal,
                            **options)
    for layer in range(analyzer.num_layers):
        # the accumulated sum, max and count of every rank's heads: adding them to an empty accumulator as one
        # input reproduces them exactly (the count is given per head)
        whole.add_reduced(layer, *(torch.cat([stats[layer][i] for stats in gathered]) for i in range(3)))
    first = sum(heads[:rank])
    return head_rows(analyze(whole), first, first + local)


def head_rows(precision_map, start: int, stop: int):
    """The rows of KV heads [start, stop) of ``precision_map`` (every layer): tiers, curvature and default tiers
    sliced; the report's rows of those heads (their global head index kept); page bytes, bits per element and
    predicted error their totals. ``exact``, ``lower_bound`` and the markdown report stay those of the whole map's
    solve."""
    heads = [h for h in precision_map.heads if start <= h.head < stop]
    page_bytes, blocks = sum(h.page_bytes for h in heads), sum(h.blocks for h in heads)
    g = precision_map.geometry
    rows = lambda tensors: [t[start:stop].clone() for t in tensors]  # noqa: E731
    return replace(precision_map, tiers=rows(precision_map.tiers), kappa_max=rows(precision_map.kappa_max),
                   kappa_sum=rows(precision_map.kappa_sum), default_tiers=rows(precision_map.default_tiers),
                   page_bytes=page_bytes, predicted_error=sum(h.predicted_error for h in heads), heads=heads,
                   bits_per_element=8 * page_bytes / (blocks * g.block_size * g.head_dim * 2) if blocks else 0.0)
