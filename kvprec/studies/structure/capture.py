"""What the structure study reads from one run of the model: the context's K/V and queries, and a greedy
generation after it.

The model runs its "kvprec" attention over a throw-away FP32 ``AdaptiveCache`` (uniform FP32 tier: the stored K/V
are the model's, bit for bit) whose layers record the queries each attention call receives — post-RoPE, with
the call's scale, sliding window and logit softcap, exactly what the attention computes with — the way the
precision study captures them (kvprec/studies/precision/measure.py). K/V are read back from the cache
(``gather()``), so they are what the cache received.

Recorded: the prefill of the context x[0..P) (per layer q [Hq, P, D], k, v [H, P, D]; per position the
log-probability of the next context token and the entropy of the next-token distribution), then N greedy decode
steps (per layer the step queries q [Hq, N, D] and the K/V of all P + N positions; per step the chosen token, its
log-probability and the entropy).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch


@dataclass
class LayerCall:
    """One layer's attention parameters: scale, sliding window (0: full) and logit softcap (0: none)."""

    scale: float
    sliding_window: int
    softcap: float


@dataclass
class Capture:
    context: torch.Tensor                 # int64 [P]
    q: List[torch.Tensor]                 # per layer FP32 [Hq, P, D]
    k: List[torch.Tensor]                 # per layer FP32 [H, P, D]
    v: List[torch.Tensor]
    calls: List[LayerCall]
    context_logprob: torch.Tensor         # FP64 [P - 1]: log p(x[t+1] | x[..t])
    context_entropy: torch.Tensor         # FP64 [P - 1]: entropy of the distribution at t
    generated: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # int64 [N]
    step_logprob: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    step_entropy: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    step_q: List[torch.Tensor] = field(default_factory=list)   # per layer FP32 [Hq, N, D]
    all_k: List[torch.Tensor] = field(default_factory=list)    # per layer FP32 [H, P + N, D]
    all_v: List[torch.Tensor] = field(default_factory=list)

    @property
    def kv(self):
        return list(zip(self.k, self.v))


def _logprob_entropy(logits: torch.Tensor, targets: torch.Tensor):
    logp = torch.log_softmax(logits.double(), -1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def capture(model, context: torch.Tensor, generate: int = 0, block_size: int = 64, progress=None) -> Capture:
    """Prefill ``context`` [P] (int64) and decode ``generate`` greedy tokens, recording as the module docstring
    says. ``progress``: optional callable(steps_done) after every decode step."""
    from ...hf.attention import enabled
    from ...hf.cache import AdaptiveCache
    from ...hf.policy.uniform import Uniform

    if context.dim() != 1 or context.numel() < 2:
        raise ValueError(f"capture: the context must be [P] token ids with P >= 2, got {tuple(context.shape)}")
    cache = AdaptiveCache(model.config, policy=Uniform("fp32"), block_size=block_size, evict_sliding=False)
    queries: Dict[int, List[torch.Tensor]] = {}
    calls: Dict[int, LayerCall] = {}

    for layer in cache.layers:
        attend = layer.attend

        def recording(q, mask, scale, sliding_window, softcap, block_mass, _layer=layer, _attend=attend):
            d = q.shape[-1]
            queries.setdefault(_layer.layer_idx, []).append(q[0].detach().float().cpu())
            calls[_layer.layer_idx] = LayerCall(float(scale or d ** -0.5), int(sliding_window or 0),
                                                float(softcap or 0.0))
            return _attend(q, mask, scale, sliding_window, softcap, block_mass)
        layer.attend = recording

    device = model.device
    with enabled(model):
        out = model(input_ids=context[None].to(device), past_key_values=cache, use_cache=True)
        if not queries:
            raise ValueError("capture: the model never called the 'kvprec' attention; is it a supported decoder "
                             "(kvprec.hf.cache.SUPPORTED_MODEL_TYPES)?")
        lp, ent = _logprob_entropy(out.logits[0, :-1].cpu(), context[1:].cpu())
        n_layers = len(queries)
        kv = [layer.gather() for layer in cache.layers[:n_layers]]
        result = Capture(context.cpu(), [queries[i][0] for i in range(n_layers)],
                         [k[0].float().cpu() for k, _ in kv], [v[0].float().cpu() for _, v in kv],
                         [calls[i] for i in range(n_layers)], lp, ent)
        logits = out.logits[0, -1]
        tokens, step_lp, step_ent = [], [], []
        for step in range(generate):
            token = logits.argmax()
            lp, ent = _logprob_entropy(logits[None].cpu(), token[None].cpu())
            tokens.append(int(token))
            step_lp.append(float(lp[0]))
            step_ent.append(float(ent[0]))
            out = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
            logits = out.logits[0, -1]
            if progress is not None:
                progress(step + 1)
    if generate:
        result.generated = torch.tensor(tokens, dtype=torch.long)
        result.step_logprob = torch.tensor(step_lp, dtype=torch.float64)
        result.step_entropy = torch.tensor(step_ent, dtype=torch.float64)
        result.step_q = [torch.cat(queries[i][1:], dim=1) for i in range(n_layers)]
        kv = [layer.gather() for layer in cache.layers[:n_layers]]
        result.all_k = [k[0].float().cpu() for k, _ in kv]
        result.all_v = [v[0].float().cpu() for _, v in kv]
    return result
