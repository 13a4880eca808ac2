"""What the structure study reads from one run of the model, through the platform's capture layer
(kvprec/studies/platform/capture.py): the context's K/V and queries, and a greedy generation after it.

The model runs its "kvprec" attention over a throw-away FP32 ``AdaptiveCache`` (uniform FP32 tier: the stored K/V
are the model's, bit for bit) to which a ``Capture`` is attached: K/V exactly as the cache receives them (post-RoPE)
and the queries the attention hands each layer. Without decode steps the context x[0..P) is teacher-forced in one
forward. With N decode steps, x[0..P-1) is teacher-forced and ``generate`` continues on the same cache from x[0..P):
its first call feeds x[P-1], then greedy tokens g_0, g_1, ...; N + 1 tokens are generated so that N decode queries
(positions P .. P+N-1, fed g_0 .. g_{N-1}) exist. Per decode step i: the query at P + i, and the log-probability and
entropy of the distribution g_i was chosen from (at position P + i - 1).

The capture does not record the scale, sliding window and logit softcap each attention call used; they are read
from the model (each attention module's ``scaling`` and ``attn_logit_softcapping``, the sliding windows
``DynamicCache(config=...)`` would use) and checked against the attention kernel's own per-block mass of the last
context queries (``block_mass`` of the capture): the recomputed softmax must put the same mass on every block, else
the run stops rather than report attention the model did not compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch

#: |recomputed block mass - kernel block mass| allowed (FP32 softmax of the same scores: ~1e-6; a wrong scale or
#: window moves mass by far more than this).
MASS_TOLERANCE = 1e-3
CHECKED_QUERIES = 8


@dataclass
class LayerCall:
    """One layer's attention parameters: scale, sliding window (0: full) and logit softcap (0: none)."""

    scale: float
    sliding_window: int
    softcap: float


@dataclass
class Recorded:
    context: torch.Tensor                 # int64 [P]
    q: List[torch.Tensor]                 # per layer FP32 [Hq, P, D]
    k: List[torch.Tensor]                 # per layer FP32 [H, P, D]
    v: List[torch.Tensor]
    calls: List[LayerCall]
    context_logprob: torch.Tensor         # FP64: log p(x[t+1] | x[..t]) for the teacher-forced positions
    context_entropy: torch.Tensor         # FP64: entropy of the next-token distribution there
    generated: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # int64 [N]
    step_logprob: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    step_entropy: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    step_q: List[torch.Tensor] = field(default_factory=list)   # per layer FP32 [Hq, N, D]
    all_k: List[torch.Tensor] = field(default_factory=list)    # per layer FP32 [H, P + N, D]
    all_v: List[torch.Tensor] = field(default_factory=list)

    @property
    def kv(self):
        return list(zip(self.k, self.v))


def attention_parameters(model) -> List[LayerCall]:
    """Per decoder layer, the scale, sliding window and softcap of its attention (module docstring)."""
    from ...hf.cache import sliding_windows, text_config

    config = text_config(model.config)
    windows = sliding_windows(config)
    found = {}
    for module in model.modules():
        idx, scale = getattr(module, "layer_idx", None), getattr(module, "scaling", None)
        if isinstance(idx, int) and isinstance(scale, (int, float)) and idx not in found:
            found[idx] = (float(scale), float(getattr(module, "attn_logit_softcapping", None) or 0.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [LayerCall(*(found.get(i, (head_dim ** -0.5, 0.0))[:1]), int(w), found.get(i, (0.0, 0.0))[1])
            for i, w in enumerate(windows)]


def _per_layer(series: dict, n_layers: int) -> List[torch.Tensor]:
    """Time-major capture arrays [T, 1, H, D] -> per layer torch FP32 [H, T, D]."""
    return [torch.from_numpy(np.asarray(series[i][:, 0], dtype=np.float32)).transpose(0, 1).contiguous()
            for i in range(n_layers)]


def check_parameters(calls: List[LayerCall], q, k, record, p: int, block_size: int) -> None:
    """The recomputed softmax of the last context queries puts the kernel's mass on every block (module docstring)."""
    from .stats import attention_weights

    for i, call in enumerate(calls):
        mass = record.block_mass(i)  # [Tq, 1, Hq, n_blocks]: NaN past the blocks of the query's call
        rows = np.nonzero(record.query_positions[i] < p)[0][-CHECKED_QUERIES:]
        first = int(record.query_positions[i][rows[0]])
        w, _ = attention_weights(q[i][:, first:first + len(rows)], k[i], k[i], first, call.scale, call.sliding_window,
                                 call.softcap)
        for r, row in enumerate(rows):
            kernel = mass[row, 0]
            blocks = int((~np.isnan(kernel[0])).sum())
            ours = w[:, r, :blocks * block_size]  # positions after the query's own carry no weight
            ours = torch.nn.functional.pad(ours, (0, blocks * block_size - ours.shape[-1]))
            ours = ours.reshape(w.shape[0], blocks, block_size).sum(-1).numpy()
            if np.abs(ours - kernel[:, :blocks]).max() > MASS_TOLERANCE:
                raise ValueError(f"structure study: cannot reproduce layer {i}'s attention from its queries and keys "
                                 f"(scale {call.scale}, sliding window {call.sliding_window}, softcap {call.softcap} "
                                 "read from the model); its attention statistics would be wrong")


def _ticking(on_step):
    """A LogitsProcessor calling ``on_step()`` at every generated token (progress), changing nothing."""
    from transformers import LogitsProcessor

    class Ticking(LogitsProcessor):
        def __call__(self, input_ids, scores):
            on_step()
            return scores
    return Ticking()


@torch.no_grad()
def capture(model, context: torch.Tensor, generate: int = 0, block_size: int = 64, on_step=None) -> Recorded:
    """Teacher-force ``context`` [P] (int64) and decode ``generate`` greedy tokens after it (module docstring);
    ``on_step()`` is called at every generated token."""
    from ...hf.cache import AdaptiveCache
    from ...hf.policy.uniform import Uniform
    from ..platform.capture import Capture, CaptureSpec

    p = context.numel()
    if context.dim() != 1 or p < 2:
        raise ValueError(f"capture: the context must be [P] token ids with P >= 2, got {tuple(context.shape)}")
    cache = AdaptiveCache(model.config, policy=Uniform("fp32"), block_size=block_size, evict_sliding=False)
    cap = Capture(CaptureSpec(queries=True, block_mass=True))
    ids = context[None].to(torch.long)
    first = cap.teacher_force(model, ids[:, :p - 1] if generate else ids, cache)
    record = first
    if generate:
        kwargs = dict(max_new_tokens=generate + 1, min_new_tokens=generate + 1, do_sample=False,
                      logits_processor=[_ticking(on_step)] if on_step else None)
        if getattr(model.generation_config, "pad_token_id", None) is None:
            kwargs["pad_token_id"] = getattr(model.generation_config, "eos_token_id", None) or 0
        record = cap.generate(model, ids, cache, **kwargs)
    n_layers = len(record.layers)
    q, k, v = _per_layer(record.queries, n_layers), _per_layer(record.keys, n_layers), _per_layer(record.values,
                                                                                                  n_layers)
    calls = attention_parameters(model)[:n_layers]
    check_parameters(calls, q, k, record, p, block_size)
    out = Recorded(context.cpu(), [x[:, :p] for x in q], [x[:, :p] for x in k], [x[:, :p] for x in v], calls,
                   torch.from_numpy(first.logprob[0]).double(), torch.from_numpy(first.entropy[0]).double())
    if generate:
        out.generated = torch.from_numpy(record.tokens[0, p:p + generate]).long()
        out.step_logprob = torch.from_numpy(record.logprob[0, :generate]).double()
        out.step_entropy = torch.from_numpy(record.entropy[0, :generate]).double()
        out.step_q = [x[:, p:p + generate] for x in q]
        out.all_k, out.all_v = [x[:, :p + generate] for x in k], [x[:, :p + generate] for x in v]
    return out
