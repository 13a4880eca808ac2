"""Per-step measurements of a condition against the oracle (pure functions of tensors; hand-checked in
python_tests/test_study_injection.py).

For a condition's step t (the distribution of its t-th generated token y_t), with O_t the oracle's next-token
log-probabilities teacher-forced on the same tokens, B_t the baseline's (original context only) and C_t the
condition's own:

* KL to the oracle            KL(O_t || C_t) = sum_v exp(O_t[v]) (O_t[v] - C_t[v])   (nats; 0 when equal);
* the unadapted gap           KL(O_t || B_t): what the original context alone would leave on the same tokens;
* probability ratio           log P(y_t | new) / P(y_t | old) = O_t[y_t] - B_t[y_t] (nats; > 0: the token the
                              condition chose is one the new context favours);
* hidden-state cosine         cos(h_t, h^O_t) per layer, of the hidden states that produced the distributions;
* attention share             per block region (the prompt before the span, the span, the generated tokens), the
                              attention probability that fell there, from the kernel's per-block attention mass.
"""
from __future__ import annotations

from typing import Tuple

import torch


def kl_divergence(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || p) over the last axis of log-probabilities [..., V], in their dtype, summed in float64 (terms
    where ref = 0 are 0; identical distributions give exactly 0)."""
    p = logp_ref.exp()
    terms = (p * (logp_ref - logp)).masked_fill(p == 0, 0.0)
    return terms.sum(-1, dtype=torch.float64).clamp(min=0.0)


def log_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log P(token | new) - log P(token | old) for log-probabilities [..., V] and tokens [...] (long)."""
    idx = tokens.long().unsqueeze(-1)
    return (logp_new.double().gather(-1, idx) - logp_old.double().gather(-1, idx))[..., 0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last axis (float64); 0 where either vector is 0."""
    a, b = a.double(), b.double()
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, (a * b).sum(-1) / norms.clamp(min=1e-300), torch.zeros_like(norms))


def region_shares(block_mass: torch.Tensor, pre_blocks: int, span_blocks: range) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shares of the attention mass [..., n_blocks] on the blocks before the span (< pre_blocks), and on the span's
    blocks, each [...]; the rest fell on the generated tokens. NaN entries (blocks a query did not see) count 0."""
    mass = torch.nan_to_num(block_mass.double(), nan=0.0)
    total = mass.sum(-1)
    pre = mass[..., :pre_blocks].sum(-1)
    span = mass[..., span_blocks.start:span_blocks.stop].sum(-1)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    nan = torch.full_like(total, float("nan"))
    return torch.where(total > 0, pre / safe, nan), torch.where(total > 0, span / safe, nan)
