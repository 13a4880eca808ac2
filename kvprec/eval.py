"""Quality harness: teacher-forced decoding THROUGH the cache.

For a token sequence x[0..L) and a prefill length P, the model first prefills x[0..P) into the cache, then
is fed one token at a time, x[P], x[P+1], ..., x[L-2], each step reading every earlier position from the cache.
Step i (i = 0..L-P-1) predicts x[P+i] from logits l_i. Reported per cache:

    NLL = -(1/n) sum_i log softmax(l_i)[x[P+i]],   perplexity = exp(NLL),   n = L - P
    top-1 agreement = (1/n) sum_i [argmax l_i == argmax l_i^ref]   (against the unquantized reference cache)

Only the first prediction comes from the prefill's last position; all others come from decode steps whose
attention reads the cache. (Prefill-only perplexity never reads stored K/V and says nothing about cache
quality: this harness does not report it.)
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class TeacherForced:
    """Result of one teacher-forced pass: per-prediction NLL [n] and argmax tokens [n] (batch row 0)."""

    nll: torch.Tensor
    argmax: torch.Tensor
    seconds: float
    bits_per_element: float          # of the cache after the pass: its own accounting, or the dense dtype's bits
    memory: Optional[object] = None  # the cache's memory report, when it has one

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@torch.no_grad()
def teacher_forced(model, tokens: torch.Tensor, prefill: int, cache, *, attn_implementation: Optional[str] = None
                   ) -> TeacherForced:
    """Run ``tokens`` [1, L] (int64) through ``model`` with ``cache`` as described in the module docstring.

    attn_implementation: set on the model for this pass and restored after ("kvprec" for an AdaptiveCache).
    """
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"teacher_forced: tokens must be [1, L], got {tuple(tokens.shape)}")
    length = tokens.shape[1]
    if cache is not None and cache.get_seq_length() != 0:
        raise ValueError(f"teacher_forced: the cache already holds {cache.get_seq_length()} tokens; pass a fresh "
                         "cache for every pass")
    if not 1 <= prefill < length:
        raise ValueError(f"teacher_forced: prefill must be in [1, {length - 1}] for {length} tokens, got {prefill}")
    tokens = tokens.to(model.device)
    restore = contextlib.nullcontext()
    if attn_implementation == "kvprec":
        from .attention import enabled

        restore = enabled(model)
    elif attn_implementation is not None:
        previous = model.config._attn_implementation
        model.set_attn_implementation(attn_implementation)
        restore = contextlib.ExitStack()
        restore.callback(model.set_attn_implementation, previous)
    nll, argmax = [], []
    start = time.perf_counter()
    with restore:
        out = model(input_ids=tokens[:, :prefill], past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        for i in range(prefill, length):
            logp = torch.log_softmax(logits[0], -1)
            nll.append(-logp[tokens[0, i]])
            argmax.append(logits[0].argmax())
            if i == length - 1:
                break
            out = model(input_ids=tokens[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
            logits = out.logits[:, -1].float()
    seconds = time.perf_counter() - start
    report = cache.memory_report() if hasattr(cache, "memory_report") else None
    # A dense cache (DynamicCache) stores every element in its K/V dtype and nothing else.
    bits = report.bits_per_element if report is not None else 8.0 * cache.layers[0].keys.element_size()
    return TeacherForced(torch.stack(nll).cpu(), torch.stack(argmax).cpu(), seconds, bits, report)


@dataclass
class Comparison:
    """Each cache against the reference: perplexity change and top-1 agreement."""

    reference: TeacherForced
    results: Dict[str, TeacherForced] = field(default_factory=dict)

    def agreement(self, name: str) -> float:
        return float((self.results[name].argmax == self.reference.argmax).float().mean())

    def ppl_change(self, name: str) -> float:
        """Relative perplexity change, e.g. 0.005 = +0.5%."""
        return self.results[name].perplexity / self.reference.perplexity - 1.0

    def rows(self) -> List[dict]:
        out = [{"cache": "reference", "perplexity": self.reference.perplexity, "ppl_change": 0.0,
                "top1_agreement": 1.0, "bits_per_element": self.reference.bits_per_element,
                "seconds": self.reference.seconds}]
        for name, r in self.results.items():
            out.append({"cache": name, "perplexity": r.perplexity, "ppl_change": self.ppl_change(name),
                        "top1_agreement": self.agreement(name),
                        "bits_per_element": r.bits_per_element,
                        "seconds": r.seconds})
        return out

    def format(self) -> str:
        lines = [f"{'cache':34s} {'bits/el':>8s} {'ppl':>9s} {'change':>9s} {'top-1 agree':>11s} {'seconds':>8s}"]
        for row in self.rows():
            lines.append(f"{row['cache']:34s} {row['bits_per_element']:8.2f} {row['perplexity']:9.4f} "
                         f"{100 * row['ppl_change']:+8.2f}% {100 * row['top1_agreement']:10.1f}% {row['seconds']:8.2f}")
        return "\n".join(lines)


def compare(model, tokens: torch.Tensor, prefill: int, caches: Dict[str, Callable[[], object]]) -> Comparison:
    """Teacher-forced pass with an unquantized ``DynamicCache()`` + sdpa as the reference, then with each
    ``caches[name]()`` (a fresh AdaptiveCache per call) under the "kvprec" attention."""
    from transformers import DynamicCache

    # SDPA has no logit softcap (Gemma 2): the reference uses eager attention there, as transformers does.
    softcap = getattr(model.config.get_text_config(decoder=True), "attn_logit_softcapping", None)
    ref = teacher_forced(model, tokens, prefill, DynamicCache(), attn_implementation="eager" if softcap else "sdpa")
    comparison = Comparison(ref)
    for name, make in caches.items():
        comparison.results[name] = teacher_forced(model, tokens, prefill, make(), attn_implementation="kvprec")
    return comparison
