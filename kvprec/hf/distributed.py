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
  and sums bytes and elements, with the precision map's heads in global order.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

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


def global_memory_report(cache):
    """Every rank's :meth:`AdaptiveCache.memory_report`, summed: page, tail, table and rotation bytes and elements
    add up over ranks; tokens are the same on every rank; the precision map [L, H_kv, tiers] concatenates the ranks'
    heads in rank order, which is the model's head order. Collective (all_gather_object): every rank must call it.
    On one process it is the cache's own report."""
    import torch.distributed as dist

    local = cache.memory_report()
    rank, world = rank_and_world()
    if world == 1:
        return local
    reports: List = [None] * world
    dist.all_gather_object(reports, local)
    return sum_reports(reports)


def sum_reports(reports):
    """The report of a cache split over ranks by heads, from the ranks' reports in rank order."""
    from dataclasses import replace

    first = reports[0]
    summed = {name: sum(getattr(r, name) for r in reports)
              for name in ("tier_bytes", "tail_bytes", "table_bytes", "rotation_bytes", "shadow_bytes", "elements",
                           "sealed_elements")}
    for r in reports[1:]:
        if not torch.equal(r.tokens, first.tokens):
            raise ValueError(f"tensor parallel memory report: ranks hold different token counts per layer "
                             f"({first.tokens.tolist()} vs {r.tokens.tolist()})")
    return replace(first, precision_map=torch.cat([r.precision_map for r in reports], dim=1), **summed)
