"""The measured effect of a compression: teacher-forced NLL of a continuation over a transformed context cache.

For tokens x[0..P+C) the context x[0..P) is prefilled once and its K/V captured (exact, post-RoPE). A compression
transforms those K/V; they are loaded into a fresh ``transformers.DynamicCache`` and the continuation x[P..P+C)
is fed in one forward pass, whose logits at x[P+i] predict x[P+i+1]. Per prediction i = 0 .. C-2,

    nll_i = -log softmax(logits_i)[x[P+i+1]],

and a compression's NLL change is mean_i (nll_i - nll_i^ref) against the untransformed cache, with the paired
standard error std_i(nll_i - nll_i^ref) / sqrt(C - 1). Two lower-variance measures of the same predictions come
with it: KL_i = sum_v p_i^ref(v) (log p_i^ref(v) - log p_i(v)), the divergence of the next-token distribution
from the exact cache's (>= 0, and 0 only when nothing changed), and top-1 agreement [argmax p_i = argmax p_i^ref].
Every prediction reads the whole context cache through the model's own attention; the continuation's own K/V are
computed exactly, so the change measures the context cache alone. (The first continuation token is predicted by
the prefill, which never reads the stored cache: it is left out.) One forward pass of C tokens is exactly what C
teacher-forced decode steps compute, in one call.

kvprec's quantized tiers enter the same way: the context K/V are appended to an ``AdaptiveCache`` whose policy
seals every context block at the tier under comparison (a context of whole blocks, so nothing stays in the
unsealed tail), and what the cache returns — its blocks dequantized, rotated keys rotated back — is loaded and
scored as above. Attending over dequantized blocks is what kvprec's reference attention computes; the bytes are the
cache's own exact accounting (``AdaptiveCache.memory_report()``: pages with scales and zeros, block table, key
rotation matrices).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

KV = List[Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Scored:
    """One scored pass: nll FP64 [C - 1]; log_probs FP64 [C - 1, V] (kept only for the reference)."""

    nll: np.ndarray
    log_probs: torch.Tensor

    def against(self, ref: "Scored"):
        """(KL(p_ref || p) FP64 [C - 1], top-1 agreement bool [C - 1]) of this pass against ``ref``."""
        kl = (ref.log_probs.exp() * (ref.log_probs - self.log_probs)).sum(-1).clamp_min(0.0)
        return kl.numpy(), (self.log_probs.argmax(-1) == ref.log_probs.argmax(-1)).numpy()


class ContinuationScorer:
    """nll(kv) of ``continuation`` [C] token ids over a context cache ``kv`` (module docstring)."""

    def __init__(self, model, continuation: torch.Tensor):
        if continuation.dim() != 1 or continuation.numel() < 2:
            raise ValueError(f"continuation: need at least 2 token ids [C], got shape {tuple(continuation.shape)}")
        self.model = model
        self.ids = continuation.to(torch.long)[None].to(model.device)
        self.calls = 0

    def nll(self, kv: KV) -> np.ndarray:
        """FP64 [C - 1]: per-prediction NLL with the context cache ``kv`` (list of (k, v) [H, P, D])."""
        return self.score(kv).nll

    @torch.no_grad()
    def score(self, kv: KV) -> Scored:
        """NLL and next-token log-probabilities with the context cache ``kv``."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        dtype = next(self.model.parameters()).dtype
        for i, (k, v) in enumerate(kv):
            cache.update(k[None].to(self.model.device, dtype), v[None].to(self.model.device, dtype), i)
        out = self.model(input_ids=self.ids, past_key_values=cache, use_cache=True)
        logp = torch.log_softmax(out.logits[0, :-1].double(), -1).cpu()
        self.calls += 1
        return Scored((-logp.gather(1, self.ids[0, 1:, None].cpu())[:, 0]).numpy(), logp)


@dataclass
class TierCache:
    """Context K/V as an AdaptiveCache returns them after storing them under ``policy``, with its bytes (from
    ``memory_report()``): pages (codes, scales, zeros), block tables and key rotation matrices, in all and per layer
    (``layer_bytes``: the three summed, int64 [L]); resident bytes add the allocated unsealed tail."""

    kv: KV
    resident_bytes: int
    page_bytes: int
    table_bytes: int
    rotation_bytes: int
    layer_bytes: torch.Tensor
    page_bits: float


def through_adaptive_cache(model, kv: KV, policy, block_size: int, key_rotation: Optional[str] = None,
                           rotation_seed: int = 0) -> TierCache:
    """Append the context ``kv`` to an AdaptiveCache (``policy``, ``block_size``, ``key_rotation``) and read it
    back. The context must be whole blocks."""
    from ...hf.cache import AdaptiveCache, Int2KeysWarning

    t = kv[0][0].shape[1]
    if t % block_size:
        raise ValueError(f"through_adaptive_cache: {t} context tokens are not whole blocks of {block_size}")
    cache = AdaptiveCache(model.config, policy=policy, block_size=block_size, key_rotation=key_rotation,
                          rotation_seed=rotation_seed)
    dtype = next(model.parameters()).dtype
    out = []
    with warnings.catch_warnings():
        # Plain INT2 keys are compared on purpose; the model runs its stock attention here, so the cache returns
        # gathered tensors (the slow path it warns about is what this read-back wants).
        warnings.simplefilter("ignore", Int2KeysWarning)
        warnings.filterwarnings("ignore", message="kvprec.AdaptiveCache: the model is not using")
        for i, (k, v) in enumerate(kv):
            k2, v2 = cache.update(k[None].to(model.device, dtype), v[None].to(model.device, dtype), i)
            out.append((k2[0].float().cpu(), v2[0].float().cpu()))
    r = cache.memory_report()
    return TierCache(out, r.resident_bytes, int(r.tier_bytes.sum()), int(r.table_bytes.sum()),
                     int(r.rotation_bytes.sum()), r.tier_bytes.sum(1) + r.table_bytes + r.rotation_bytes,
                     r.page_bits_per_element)
