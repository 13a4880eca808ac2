"""The causal test of the novelty study: does novelty mark the K/V that matter?

A run's tokens x[0, N) (prompt and generated text) are split at P, a block multiple near the middle of the
generated part: the prefix x[0, P) is prefilled (all of it in sealed blocks) and the continuation x[P, N) is
teacher-forced on top of it; its per-token NLL ``-log p(x[t] | x[<t])`` for t in (P, N) is
compared with the unablated pass. (x[P] itself is predicted by the prefill, before any ablation.)

Ablations of the prefix, each for a fraction f of the candidates, chosen three ways from the block novelty:

* ``tier`` mode: items are (layer, KV head, block); the chosen ones are stored at a low tier (default INT2, the
  cache's own quantizer, keys as given), the rest stay FP32;
* ``drop`` mode: items are blocks (all layers and heads at once); the continuation cannot attend to the chosen blocks'
  positions (an attention mask with zeros there: eviction of those tokens from the cache, positions unchanged);
* rules: ``most`` (the f most novel), ``least`` (the f least novel), ``random`` (f drawn uniformly, one per seed).

Block novelty of (layer l, head h, block j): the mean over the block's positions of the chosen novelty metric
divided by the median of that metric over (l, h)'s candidate blocks (so heads of different scale rank alike); a
block's novelty in drop mode is the mean of this over layers and heads. Candidates: the prefix's blocks whose every
position has a full novelty window before it (t >= window), so the first block (the attention sink) never is one.
Each condition starts from the same prefix K/V (:func:`measure` says how).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ...storage.formats import Tier

RULES = ("most", "least", "random")
MODES = ("tier", "drop")


@dataclass
class Split:
    """P (prefix length, a block multiple) and the candidate blocks [first, last) of the prefix."""

    prefix: int
    first: int
    last: int


def split(n_tokens: int, prompt_length: int, block_size: int, window: int) -> Optional[Split]:
    """The prefix / continuation split of a run (module docstring), or None when no block is a candidate or fewer
    than 2 continuation tokens would remain."""
    generated = n_tokens - prompt_length
    p = (prompt_length + generated // 2) // block_size * block_size
    first = -(-window // block_size)
    if p // block_size <= first or n_tokens - p < 2:
        return None
    return Split(p, first, p // block_size)


def block_novelty(series: np.ndarray, sp: Split, block_size: int) -> np.ndarray:
    """[L, H, T] novelty per position -> [L, H, B] normalised block novelty of the candidate blocks (module
    docstring; NaN outside [first, last))."""
    l, h, _ = series.shape
    out = np.full((l, h, sp.last), np.nan)
    blocks = series[:, :, sp.first * block_size:sp.last * block_size].astype(np.float64)
    means = blocks.reshape(l, h, sp.last - sp.first, block_size).mean(-1)
    med = np.median(means, axis=-1, keepdims=True)
    out[:, :, sp.first:] = np.where(med > 0, means / np.where(med > 0, med, 1.0), means)
    return out


def choose(scores: np.ndarray, k: int, rule: str, rng: Optional[np.random.Generator]) -> np.ndarray:
    """Flat indices of k of the finite ``scores`` (ravelled) by ``rule``; ties broken by index (stable sort)."""
    flat = scores.ravel()
    valid = np.flatnonzero(np.isfinite(flat))
    if rule == "random":
        return np.sort(rng.choice(valid, size=k, replace=False))
    order = valid[np.argsort(flat[valid], kind="stable")]
    return np.sort(order[-k:] if rule == "most" else order[:k])


def conditions(novelty: np.ndarray, fractions: Sequence[float], n_random: int, seed: int):
    """The ablation conditions of one run: (mode, rule, fraction, seed, mask [L, H, B] bool) for both modes, every
    fraction and rule (``n_random`` seeds of ``random``); ``novelty`` [L, H, B] from :func:`block_novelty`."""
    per_block = novelty.mean(axis=(0, 1))  # candidates are the same blocks in every (layer, head)
    out = []
    rng_seed = np.random.SeedSequence(seed)
    for mode in MODES:
        scores = novelty if mode == "tier" else per_block
        n = int(np.isfinite(scores).sum())
        for f in fractions:
            k = min(n, max(1, int(round(f * n))))
            for rule in RULES:
                for s in (range(n_random) if rule == "random" else [-1]):
                    rng = np.random.default_rng(rng_seed.spawn(1)[0]) if rule == "random" else None
                    idx = choose(scores, k, rule, rng)
                    mask = np.zeros(scores.shape, dtype=bool)
                    mask.ravel()[idx] = True
                    if mode == "drop":
                        mask = np.broadcast_to(mask, novelty.shape).copy()
                    out.append((mode, rule, float(f), int(s), mask))
    return out


def low_tier_copy(k: torch.Tensor, v: torch.Tensor, block_size: int, tier) -> tuple:
    """K, V [1, H, P, D] (P a block multiple) as an AdaptiveCache stores them at ``tier``: appended to a
    MixedPrecisionBuffer whose blocks seal at that tier, then dequantized (the cache's own quantizer; keys as given,
    values grouped by the default group size). Quantization is per (row, head, block), so any subset of blocks of
    this copy is what storing only that subset at the tier gives."""
    from ...storage.buffer import MixedPrecisionBuffer

    _, h, p, d = k.shape
    buf = MixedPrecisionBuffer(batch=1, kv_heads=h, head_dim=d, block_size=block_size, dtype=k.dtype,
                               device=k.device, default_tier=tier)
    buf.append(k, v)
    return buf.gather(0, p)


def measure(model, tokens: torch.Tensor, sp: Split, conds, layers: Sequence[int], block_size: int, tier: str,
            progress=None) -> Dict[str, np.ndarray]:
    """Per-token NLL of the continuation under the baseline and every condition: raw arrays ``abl_*`` (mode, rule,
    fraction, seed, mask [C, L, H, B] over the model layers ``layers``, nll [C, N - P - 1]; condition 0 is the
    unablated baseline).

    How: the prefix is prefilled once into a DynamicCache (the model's own attention); each condition builds a
    DynamicCache from those K/V with the chosen blocks replaced by their :func:`low_tier_copy` (``tier`` mode) and
    feeds the continuation, with an attention mask that is 0 on the dropped blocks' positions (``drop`` mode). This
    is what an FP32 AdaptiveCache with those blocks re-tiered or evicted computes (tested against it in
    python_tests/test_study_novelty.py), at the cost of a plain forward."""
    from transformers import DynamicCache

    ids = tokens.reshape(1, -1).to(model.device)
    n, p = ids.shape[1], sp.prefix
    low = Tier.parse(tier)
    target = ids[0, p + 1:]
    names = [("none", "baseline", 0.0, -1, None)] + list(conds)
    nll = np.zeros((len(names), n - p - 1))
    rows = enumerate(names) if progress is None else progress.bar(enumerate(names), total=len(names),
                                                                    desc="ablation")
    with torch.no_grad():
        prefill = DynamicCache()
        model(input_ids=ids[:, :p], past_key_values=prefill, use_cache=True)
        full = [(layer.keys, layer.values) for layer in prefill.layers]
        lossy = {i: low_tier_copy(*full[layer], block_size, low) for i, layer in enumerate(layers)}
        for c, (mode, _, _, _, mask) in rows:
            cache = DynamicCache()
            for layer, (k, v) in enumerate(full):
                i = layers.index(layer) if (mode == "tier" and layer in layers) else None
                if i is not None and mask[i].any():
                    at = torch.from_numpy(np.repeat(mask[i], block_size, axis=-1)).to(k.device)[None, :, :, None]
                    k, v = torch.where(at, lossy[i][0], k), torch.where(at, lossy[i][1], v)
                cache.update(k, v, layer)
            kwargs = {}
            if mode == "drop":
                keep = torch.ones(1, n, dtype=torch.long, device=ids.device)
                keep[0, :p] = torch.from_numpy(~np.repeat(mask[0, 0], block_size)).to(ids.device)
                kwargs["attention_mask"] = keep
            logits = model(input_ids=ids[:, p:], past_key_values=cache, use_cache=True, **kwargs).logits[0, :-1]
            logp = torch.log_softmax(logits.double(), -1)
            nll[c] = -logp.gather(-1, target[:, None])[:, 0].cpu().numpy()
    shape = conds[0][4].shape if conds else (0, 0, 0)
    return {"abl_mode": np.array([x[0] for x in names]), "abl_rule": np.array([x[1] for x in names]),
            "abl_fraction": np.array([x[2] for x in names]), "abl_seed": np.array([x[3] for x in names]),
            "abl_mask": np.stack([np.zeros(shape, bool) if x[4] is None else x[4] for x in names]),
            "abl_nll": nll, "abl_prefix": np.array(p), "abl_first_block": np.array(sp.first)}
