"""Precision analysis: curvature of real attention by four methods, locality patterns, and measured sensitivity.

One *probe* is a token sequence x[0 .. P+Q] of an HF decoder: the context x[0, P) is in the cache, the Q query
tokens x[P, P+Q) are fed on top of it, and query i predicts x[P+i+1]. Every score below is per (layer l, KV
head h, cached context position t < P); per block j (positions [jT, (j+1)T)) a score is the **sum** over the
block's positions (errors of positions add, as in the knapsack of kvprec.analysis.precision).

Curvature methods (the attention inputs q, K, V of each layer are captured post-RoPE through a throw-away FP32
AdaptiveCache, kvprec.policy.curvature's recording attend):

* ``attention`` (closed form, the kernel's reduction kvprec.analysis.curvature.curvature_reduce)::

      kappa_t = s^3 a_t^3 |1 - 2 a_t| ||v_t - o||^2 ||q||^3,   mean over the group's query heads and the Q queries

* ``grad_attn`` (autograd of the layer's attention output): mean over the group's query heads and queries of
  ``||d o_i / d K_t||_F`` (torch.func.jacrev of softmax attention in FP64; equals the closed form's ||J_t||);
* ``gradient`` (autograd of the logits, end to end): ``mean_i ||d log p(x[P+i+1] | x[<=P+i]) / d K_t||_2`` with
  the cached K of every layer a leaf tensor and one backward per query;
* ``hessian`` (Hutchinson): with L = sum_i log p(x[P+i+1]) and H = d^2 L / dK^2 over all layers' cached K,
  ``diag(H) ~ (1/S) sum_s z_s (.) H z_s`` for Rademacher z_s (Hessian-vector products by double backward), and
  the position score ``sum_d |diag(H)_{t,d}|``;
* ``hybrid``: ``sqrt((kappa_t / mean kappa) (g_t / mean g))``, the geometric mean of the closed-form local
  curvature and the end-to-end gradient, each normalised by its mean over all (layer, head, position); the
  normalisation is a global scale, so its ranking is that of sqrt(kappa_t g_t);
* ``attention_mass`` (baseline, not curvature): mean over group heads and queries of a_t.

Measured sensitivity of block (l, h, j) at tier tau: the context is prefilled into an FP32 AdaptiveCache with a
host shadow; that block alone is re-tiered to tau (K and V, the cache's own quantizer), the Q query tokens are fed,
and against the all-FP32 pass we record ``d_attn = mean_{i, group heads} ||o_i' - o_i||`` of layer l,
``kl = mean_i KL(p_i || p_i')`` and ``dlogp = mean_i |log p_i'(x) - log p_i(x)|``; then the query positions are
cropped and the block promoted back to FP32 from the shadow (exact). Rank correlations (Spearman) compare each
method's block score with these measurements. Note the tiers quantize V as well as K; the curvature methods see
only K, so a method that ignores V can be expected to miss part of the measured effect.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ...storage.formats import Tier

METHODS = ("attention", "grad_attn", "gradient", "hessian", "hybrid", "attention_mass")

#: built-in calibration prompts (used when no text file is given): prose, code, mixed content, step-by-step
#: reasoning and topic transitions.
BUILTIN_PROMPTS: Dict[str, str] = {
    "prose": ("The river ran slowly past the old mill, and the miller's daughter watched the water carry leaves "
              "toward the town. Every autumn the same leaves came, and every autumn she counted them, because "
              "counting was the only thing that made the long evenings feel shorter. "),
    "code": ("def merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
             "        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n"
             "            out.append(b[j])\n            j += 1\n    return out + a[i:] + b[j:]\n\n"),
    "mixed": ("To parse the header, call `read_header(path)`; it returns a dict such as {'version': 2, "
              "'rows': 128}. If the file is empty the function raises ValueError('empty file'), so wrap it:\n"
              "try:\n    hdr = read_header(p)\nexcept ValueError:\n    hdr = {}\n"),
    "reasoning": ("Question: a box holds 3 red and 5 blue balls; two are drawn without replacement. What is the "
                  "chance both are blue? Step 1: the first is blue with probability 5/8. Step 2: then 4 of the 7 "
                  "left are blue, so 4/7. Step 3: multiply, 5/8 * 4/7 = 20/56 = 5/14. Answer: 5/14.\n"),
    "transitions": ("Meanwhile, in astronomy, the comet returned on schedule. Switching topics: the recipe needs "
                    "two eggs and a cup of flour. Back to the comet, its tail pointed away from the sun. Finally, "
                    "a note on taxes: the form is due in April.\n"),
}


def builtin_text() -> str:
    """The built-in prompts concatenated (their order gives two more topic transitions)."""
    return "".join(BUILTIN_PROMPTS[k] for k in ("prose", "code", "mixed", "reasoning", "transitions"))


# ---------------------------------------------------------------------------------------------------------
# Capture

@dataclass
class LayerInputs:
    """Post-RoPE attention inputs of one layer on one probe: q [Hq, Q, D] (the query tokens), k, v [Hkv, P+Q, D]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float


def capture(model, ids: torch.Tensor, queries: int, block_size: int = 64) -> List[LayerInputs]:
    """One forward of ``ids`` [1, P+Q] through a throw-away FP32 AdaptiveCache; per layer the last ``queries``
    queries and all keys/values (kvprec.policy.curvature's recording attend: exactly what ``update`` received)."""
    from ...hf.attention import enabled
    from ...hf.cache import AdaptiveCache
    from ...hf.policy.curvature import _recording
    from ...hf.policy.uniform import Uniform

    found: Dict[int, LayerInputs] = {}

    def record(layer, q, scale, sliding_window, softcap):
        k, v = layer.gather()
        d = q.shape[-1]
        found[layer.layer_idx] = LayerInputs(q[0, :, -queries:].detach().double().cpu(), k[0].double().cpu(),
                                             v[0].double().cpu(), float(scale or 1.0 / math.sqrt(d)))

    cache = AdaptiveCache(model.config, policy=Uniform(Tier.FP32), block_size=block_size)
    for layer in cache.layers:
        layer.attend = _recording(layer, record)
    with torch.no_grad(), enabled(model):
        model(input_ids=ids.to(model.device), past_key_values=cache, use_cache=True)
    if not found:
        raise ValueError("capture: the model never called the 'kvprec' attention")
    return [found[i] for i in sorted(found)]


# ---------------------------------------------------------------------------------------------------------
# Layer-local methods

def attention_scores(inp: LayerInputs, context: int):
    """(kappa, attention mass) per (KV head, position < context), FP64 numpy [Hkv, context]: means over the group's
    query heads and the queries (all Q queries see every context position)."""
    from ...analysis.curvature import attention_curvature_reference

    r = attention_curvature_reference(inp.q, inp.k, inp.v, inp.scale, causal=True)  # [Hq, Q, N]
    hq, hkv = inp.q.shape[0], inp.k.shape[0]
    g = hq // hkv

    def per_kv(x):
        return x[..., :context].reshape(hkv, g, -1, context).mean(dim=(1, 2)).double().numpy()
    return per_kv(r.kappa), per_kv(r.attn)


def attention_output_jacobian_norms(inp: LayerInputs, context: int) -> np.ndarray:
    """mean over the group's query heads and the queries of ||d o_i / d K_t||_F by autograd (torch.func.jacrev of
    causal softmax attention in FP64): numpy [Hkv, context]."""
    q, k, v = inp.q.double(), inp.k.double(), inp.v.double()
    hq, nq, _ = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    limits = torch.arange(n - nq, n)
    positions = torch.arange(n)

    def out(qi, limit, kh, vh):
        s = inp.scale * (kh @ qi)
        s = s.masked_fill(positions > limit, float("-inf"))
        return torch.softmax(s, -1) @ vh

    jac = torch.func.vmap(torch.func.jacrev(out, argnums=2), in_dims=(0, 0, None, None))
    result = np.zeros((hkv, context))
    step = max(1, (1 << 23) // (v.shape[-1] * n * k.shape[-1]))  # queries per chunk: <= 64 MiB of Jacobian
    for h in range(hq):
        kv = h // g
        for i in range(0, nq, step):
            j = jac(q[h, i:i + step], limits[i:i + step], k[kv], v[kv])  # [chunk, Dv, N, D]
            result[kv] += j.pow(2).sum(dim=(1, 3)).sqrt()[:, :context].sum(0).numpy() / (g * nq)
    return result


# ---------------------------------------------------------------------------------------------------------
# End-to-end methods: gradients and Hutchinson Hessian diagonal of the next-token log-likelihood w.r.t. cached K

def hutchinson_diagonal(grads: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor], samples: int,
                        generator: torch.Generator) -> List[torch.Tensor]:
    """Hutchinson estimate of diag(H) for H the Hessian of a scalar whose gradient ``grads`` (built with
    ``create_graph=True``) w.r.t. ``leaves`` is given: (1/S) sum_s z_s (.) H z_s, z_s Rademacher over all leaves at
    once (E[z z^T] = I, so the expectation is exactly diag(H)); H z by double backward."""
    if samples < 1:
        raise ValueError(f"hutchinson samples: {samples} is not accepted; use >= 1")
    acc = [torch.zeros_like(x) for x in leaves]
    for _ in range(samples):
        zs = [(torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x.dtype).to(x.device) for x in leaves]
        hz = torch.autograd.grad(grads, leaves, grad_outputs=zs, retain_graph=True)
        for a, z, h in zip(acc, zs, hz):
            a += z * h
    return [a / samples for a in acc]


def end_to_end_scores(model, ids: torch.Tensor, context: int, *, hutchinson_samples: int = 8, seed: int = 0,
                      query_index: Optional[Sequence[int]] = None):
    """(gradient, hessian) per (layer, KV head, position < context), numpy [L, Hkv, context] (module docstring).

    ``ids`` [1, P+Q+1]: the context x[0, P) is prefilled into a DynamicCache without grad, each layer's cached keys
    become leaf tensors, the Q query tokens are fed with eager attention (differentiable twice), and query i's
    log-probability of x[P+i+1] is differentiated. ``query_index`` (default: all Q) picks the queries whose
    log-probabilities enter both scores (the others are fed, unscored: held-out queries after a gap)."""
    from transformers import DynamicCache

    ids = ids.to(model.device)
    nq = ids.shape[1] - context - 1
    if nq < 1 or context < 1:
        raise ValueError(f"end_to_end_scores: ids of length {ids.shape[1]} leave no query after context {context}")
    chosen = list(range(nq)) if query_index is None else [int(i) for i in query_index]
    if not chosen or min(chosen) < 0 or max(chosen) >= nq:
        raise ValueError(f"end_to_end_scores: query_index {chosen} is not a non-empty subset of range({nq})")
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True)
        leaves = []
        for layer in cache.layers:
            layer.keys = layer.keys.detach().clone().requires_grad_(True)
            layer.values = layer.values.detach()
            leaves.append(layer.keys)
        with torch.enable_grad():
            logits = model(input_ids=ids[:, context:context + nq], past_key_values=cache, use_cache=True).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            target = logp.gather(-1, ids[0, context + 1:context + nq + 1, None].to(logp.device))[:, 0]  # [Q]
            grad = np.zeros((len(leaves), *leaves[0].shape[1:3]))
            for i in chosen:
                gs = torch.autograd.grad(target[i], leaves, retain_graph=True)
                grad += np.stack([x[0].norm(dim=-1).double().cpu().numpy() for x in gs]) / len(chosen)
            total = target[chosen].sum()
            gs = torch.autograd.grad(total, leaves, create_graph=True)
            diag = hutchinson_diagonal(gs, leaves, hutchinson_samples, torch.Generator().manual_seed(seed))
        hess = np.stack([d[0].abs().sum(-1).double().detach().cpu().numpy() for d in diag])
    finally:
        model.set_attn_implementation(previous)
    return grad, hess


def hybrid_scores(kappa: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """sqrt((kappa / mean kappa) (g / mean g)) elementwise (module docstring)."""
    kn = kappa / max(float(kappa.mean()), np.finfo(float).tiny)
    gn = grad / max(float(grad.mean()), np.finfo(float).tiny)
    return np.sqrt(kn * gn)


def block_sums(position: np.ndarray, block_size: int) -> np.ndarray:
    """[..., P] -> [..., ceil(P / T)] sums over each block's positions."""
    p = position.shape[-1]
    nb = -(-p // block_size)
    pad = np.zeros((*position.shape[:-1], nb * block_size - p))
    return np.concatenate([position, pad], -1).reshape(*position.shape[:-1], nb, block_size).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# Locality

def locality(inputs: List[LayerInputs], window: int, **kw) -> Dict[str, np.ndarray]:
    """Per layer and query head: recency_share, recency_uniform, anchor_share, cluster_top_share [L, Hq]; per layer
    and KV head: cluster_count [L, Hkv]; anchors [L, Hq, N] (bool): kvprec.analysis.curvature.attention_locality."""
    from ...analysis.curvature import attention_locality_reference

    parts = [attention_locality_reference(x.q, x.k, x.scale, True, window, **kw) for x in inputs]
    return {"recency_share": np.stack([p.recency_share.numpy() for p in parts]),
            "recency_uniform": np.stack([p.recency_uniform.numpy() for p in parts]),
            "anchor_share": np.stack([p.anchor_share.numpy() for p in parts]),
            "cluster_top_share": np.stack([p.cluster_top_share.numpy() for p in parts]),
            "cluster_count": np.stack([p.cluster_count.numpy() for p in parts]),
            "anchors": np.stack([p.anchor_mask.numpy() for p in parts])}


# ---------------------------------------------------------------------------------------------------------
# Measured sensitivity

def measure_sensitivity(model, ids: torch.Tensor, context: int, items: np.ndarray, tiers: Sequence,
                        block_size: int, progress=None) -> Dict[str, np.ndarray]:
    """For each item (layer, KV head, block) [M, 3] and tier: d_attn, kl, dlogp [M, n_tiers] (module docstring):
    the means over the Q queries of :func:`measure_sensitivity_per_query`."""
    per_query = measure_sensitivity_per_query(model, ids, context, items, tiers, block_size, progress)
    return {k: v.mean(-1) for k, v in per_query.items()}


def measure_sensitivity_per_query(model, ids: torch.Tensor, context: int, items: np.ndarray, tiers: Sequence,
                                  block_size: int, progress=None) -> Dict[str, np.ndarray]:
    """For each item (layer, KV head, block) [M, 3], tier and query i: d_attn, kl, dlogp [M, n_tiers, Q], i.e. the
    module docstring's measures before the mean over queries (d_attn still a mean over the group's query heads).
    ``context`` must be a multiple of ``block_size`` so the query positions never share a block with the context.
    ``progress`` (kvprec.studies.platform.progress.Progress): a bar over the items."""
    from ...hf.attention import enabled
    from ...hf.cache import AdaptiveCache, Int2KeysWarning
    from ...hf.policy.uniform import Uniform

    if context % block_size:
        raise ValueError(f"measure_sensitivity: context {context} is not a multiple of block_size {block_size}")
    ids = ids.to(model.device)
    nq = ids.shape[1] - context - 1
    tiers = [Tier.parse(t) for t in tiers]
    # Every block is probed, also those a sliding window has passed (whose sensitivity is then zero): keep them all.
    cache = AdaptiveCache(model.config, policy=Uniform(Tier.FP32), block_size=block_size, shadow="cpu",
                          evict_sliding=False)
    outputs: Dict[int, torch.Tensor] = {}

    def wrap(layer):
        attend = layer.attend

        def recording(q, mask, scale, sliding_window, softcap, block_mass):
            res = attend(q, mask, scale, sliding_window, softcap, block_mass)
            outputs[layer.layer_idx] = res[0][0].double().cpu()  # [Hq, Q, D]
            return res
        return recording

    target = ids[0, context + 1:context + nq + 1].cpu()
    with torch.no_grad(), enabled(model), warnings.catch_warnings():
        # the probes measure keys as stored without rotation on purpose: no advice to rotate them
        warnings.simplefilter("ignore", Int2KeysWarning)
        model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            layer.attend = wrap(layer)

        def query_pass():
            logits = model(input_ids=ids[:, context:context + nq], past_key_values=cache, use_cache=True).logits[0]
            cache.crop(-nq)
            return torch.log_softmax(logits.double().cpu(), -1), dict(outputs)

        ref_logp, ref_out = query_pass()
        hkv = cache.layers[0].tiers().shape[1]
        hq = ref_out[0].shape[0]
        g = hq // hkv
        res = {k: np.zeros((len(items), len(tiers), nq)) for k in ("d_attn", "kl", "dlogp")}
        rows = enumerate(np.asarray(items).tolist())
        if progress is not None:
            rows = progress.bar(rows, total=len(items), desc="sensitivity (blocks)")
        for m, (layer_idx, head, block) in rows:
            layer = cache.layers[layer_idx]
            for ti, tier in enumerate(tiers):
                row = torch.zeros(1, hkv, dtype=torch.int8)
                row[0, head] = int(tier)
                layer.set_block_tiers(block, row)
                logp, out = query_pass()
                layer.set_block_tiers(block, torch.zeros(1, hkv, dtype=torch.int8))  # promotion from the shadow
                d = (out[layer_idx] - ref_out[layer_idx])[head * g:(head + 1) * g]
                res["d_attn"][m, ti] = d.norm(dim=-1).mean(0).numpy()
                res["kl"][m, ti] = (ref_logp.exp() * (ref_logp - logp)).sum(-1).numpy()
                res["dlogp"][m, ti] = (logp.gather(-1, target[:, None]) - ref_logp.gather(-1, target[:, None])
                                       )[:, 0].abs().numpy()
    return res


def sample_items(layers: int, kv_heads: int, blocks: int, max_items: int, seed: int) -> np.ndarray:
    """(layer, KV head, block) int64 [M, 3]: all of them if there are at most ``max_items``, else a seeded sample
    without replacement (sorted)."""
    grid = np.stack(np.meshgrid(np.arange(layers), np.arange(kv_heads), np.arange(blocks), indexing="ij"),
                    -1).reshape(-1, 3)
    if len(grid) <= max_items:
        return grid.astype(np.int64)
    pick = np.sort(np.random.default_rng(seed).choice(len(grid), size=max_items, replace=False))
    return grid[pick].astype(np.int64)


def rank_correlations(block_scores: Dict[str, np.ndarray], items: np.ndarray, measured: Dict[str, np.ndarray],
                      tier_names: Sequence[str]) -> Dict[str, Dict[str, Dict[str, Optional[float]]]]:
    """Spearman rho (scipy.stats.spearmanr) of each method's block score at the items vs each measurement, per tier:
    ``{measure: {tier: {method: rho}}}``; None where either side is constant (rho undefined)."""
    from scipy.stats import spearmanr

    idx = tuple(np.asarray(items).T)
    out: Dict[str, Dict[str, Dict[str, Optional[float]]]] = {}
    for measure, values in measured.items():
        out[measure] = {}
        for ti, tier in enumerate(tier_names):
            y = values[:, ti]
            row = {}
            for method, scores in block_scores.items():
                x = scores[idx]
                if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
                    row[method] = None
                else:
                    row[method] = float(spearmanr(x, y).statistic)
            out[measure][tier] = row
    return out
