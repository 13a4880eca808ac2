"""Quality harness: teacher-forced decoding THROUGH the cache.

For token sequences x[b, 0..L) (B rows, e.g. disjoint windows of a text, run as one batch) and a prefill length
P, the model first prefills x[:, 0..P) into the cache, then is fed one token per row at a time, x[:, P], ...,
x[:, L-2], each step reading every earlier position from the cache. Step i (i = 0..L-P-1) predicts x[b, P+i]
from logits l_{b,i}. Reported per cache, over all n = B (L - P) predictions:

    NLL = -(1/n) sum_{b,i} log softmax(l_{b,i})[x[b, P+i]],   perplexity = exp(NLL)
    top-1 agreement = (1/n) sum_{b,i} [argmax l_{b,i} == argmax l_{b,i}^ref]   (against the unquantized reference)

and the cache's effective bits per element after the pass, two ways: over everything it holds (pages, the
model-dtype tail, block tables) and over its sealed pages only (what a policy or budget controls; the tail is a
fixed overhead of at most one block per row and head, which weighs less as the context grows).

Other transformers caches (DynamicCache, ``QuantizedCache(backend="quanto" | "hqq")``: :func:`hf_cache`) run through
the same schedule with the model's stock attention; their bits per element are the bytes of every tensor their
layers hold (quantized data, scales, zero points, the full-precision residual), times 8, over the K/V elements.

Only the first prediction comes from the prefill's last position; all others come from decode steps whose
attention reads the cache. (Prefill-only perplexity never reads stored K/V and says nothing about cache
quality: this harness does not report it.)
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm


@dataclass
class TeacherForced:
    """Result of one teacher-forced pass: per-prediction NLL and argmax tokens, [B, L - P] each."""

    nll: torch.Tensor
    argmax: torch.Tensor
    seconds: float
    bits_per_element: float          # of the cache after the pass: its own accounting, or the dense dtype's bits
    memory: Optional[object] = None  # the cache's memory report, when it has one
    page_bits_per_element: Optional[float] = None  # sealed pages only (None for a dense cache)

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@torch.no_grad()
def teacher_forced(model, tokens: torch.Tensor, prefill: int, cache, *, attn_implementation: Optional[str] = None,
                   on_step: Optional[Callable[[], object]] = None) -> TeacherForced:
    """Run ``tokens`` [B, L] (int64) through ``model`` with ``cache`` as described in the module docstring.

    attn_implementation: set on the model for this pass and restored after ("kvprec" for an AdaptiveCache).
    on_step: called after each model call (the prefill, then each decode step: L - P calls in all), for progress.
    """
    if tokens.dim() != 2 or tokens.shape[0] < 1:
        raise ValueError(f"teacher_forced: tokens must be [B, L] token ids, got {tuple(tokens.shape)}")
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
        if on_step is not None:
            on_step()
        for i in range(prefill, length):
            logp = torch.log_softmax(logits, -1)
            nll.append(-logp.gather(1, tokens[:, i:i + 1])[:, 0])
            argmax.append(logits.argmax(-1))
            if i == length - 1:
                break
            out = model(input_ids=tokens[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
            logits = out.logits[:, -1].float()
            if on_step is not None:
                on_step()
    seconds = time.perf_counter() - start
    from .distributed import global_memory_report  # under tensor parallelism: every rank's heads

    report = global_memory_report(cache) if hasattr(cache, "memory_report") else None
    bits = report.bits_per_element if report is not None else held_bits_per_element(cache, model, tokens.shape[0])
    page_bits = report.page_bits_per_element if report is not None else None
    return TeacherForced(torch.stack(nll, 1).cpu(), torch.stack(argmax, 1).cpu(), seconds, bits, report, page_bits)


def held_bytes(obj) -> int:
    """Bytes of every tensor in ``obj``: a tensor (a tensor subclass such as quanto's QTensor through
    ``__tensor_flatten__``, down to its plain tensors), or a list, tuple or dict of them (hqq's (codes, meta)).
    Anything else counts 0."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(held_bytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(held_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v) for v in obj)
    return 0


def held_bits_per_element(cache, model, batch: int) -> float:
    """A transformers cache's bits per K/V element: the bytes of every tensor its layers hold (:func:`held_bytes`
    of each layer's attributes) * 8 over 2 * batch * kv_heads * head_dim * tokens per layer. Under tensor
    parallelism the bytes are summed over the ranks (each holds its share of the model's kv_heads)."""
    from .distributed import sum_over_ranks

    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    elements = sum(2 * batch * heads * head_dim * cache.get_seq_length(i) for i in range(len(cache.layers)))
    total = sum_over_ranks(sum(held_bytes(list(vars(layer).values())) for layer in cache.layers))
    return total * 8 / elements if elements else 0.0


def hf_cache_name(spec: str) -> str:
    """The row name of :func:`hf_cache`'s ``spec``: "DynamicCache", "QuantizedCache quanto int4", ..."""
    return "DynamicCache" if spec == "dynamic" else f"QuantizedCache {spec.replace(':', ' int')}"


def hf_cache(spec: str, config) -> Callable[[], object]:
    """A factory for a stock transformers cache named by ``spec``: "dynamic" (DynamicCache()), or "quanto:N" /
    "hqq:N" (``QuantizedCache(backend, config=config, nbits=N)`` with transformers' defaults: groups of 64, the last
    128 tokens kept in the model dtype). Raises ValueError for another spec or a backend that is not installed."""
    from transformers import DynamicCache

    if spec == "dynamic":
        return DynamicCache
    backend, _, bits = spec.partition(":")
    modules = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq.core.quantize", "hqq")}
    if backend not in modules or bits not in ("2", "4"):
        raise ValueError(f"hf cache {spec!r}: accepted 'dynamic', 'quanto:4', 'quanto:2', 'hqq:4', 'hqq:2'")
    try:
        __import__(modules[backend][0])
    except ImportError as exc:
        raise ValueError(f"hf cache {spec!r} needs the {modules[backend][1]} package ({exc}); install it, or see "
                         "scripts/fetch_bench_wheels.sh for pinned wheels") from exc
    from transformers import QuantizedCache

    return lambda: QuantizedCache(backend=backend, config=config, nbits=int(bits))


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
                "page_bits_per_element": None, "predictions": self.reference.nll.numel(),
                "seconds": self.reference.seconds}]
        for name, r in self.results.items():
            out.append({"cache": name, "perplexity": r.perplexity, "ppl_change": self.ppl_change(name),
                        "top1_agreement": self.agreement(name),
                        "bits_per_element": r.bits_per_element, "page_bits_per_element": r.page_bits_per_element,
                        "predictions": r.nll.numel(), "seconds": r.seconds})
        return out

    def format(self) -> str:
        lines = [f"{'cache':40s} {'bits/el':>8s} {'pages':>6s} {'ppl':>9s} {'change':>9s} {'top-1 agree':>11s} "
                 f"{'seconds':>8s}",
                 f"({self.reference.nll.numel()} predictions; bits/el: everything the cache holds, pages: sealed "
                 "pages only)"]
        for row in self.rows():
            pages = "-" if row["page_bits_per_element"] is None else f"{row['page_bits_per_element']:.2f}"
            lines.append(f"{row['cache']:40s} {row['bits_per_element']:8.2f} {pages:>6s} {row['perplexity']:9.4f} "
                         f"{100 * row['ppl_change']:+8.2f}% {100 * row['top1_agreement']:10.1f}% {row['seconds']:8.2f}")
        return "\n".join(lines)


def compare(model, tokens: torch.Tensor, prefill: int, caches: Dict[str, Callable[[], object]], *,
            progress: bool = False) -> Comparison:
    """Teacher-forced pass with an unquantized ``DynamicCache()`` + sdpa as the reference, then with each
    ``caches[name]()`` (a fresh cache per call): an AdaptiveCache under the "kvprec" attention, any other
    transformers cache (:func:`hf_cache`) under the reference's attention.

    progress: a tqdm bar on stderr over the model calls of all passes ((1 + len(caches)) * (L - P)), named after
    the pass that runs."""
    from transformers import DynamicCache

    from .cache import AdaptiveCache

    # SDPA has no logit softcap (Gemma 2): the reference uses eager attention there, as transformers does.
    softcap = getattr(model.config.get_text_config(decoder=True), "attn_logit_softcapping", None)
    stock = "eager" if softcap else "sdpa"
    passes = [("reference", DynamicCache), *caches.items()]
    with tqdm(total=len(passes) * (tokens.shape[1] - prefill), unit="step", file=sys.stderr,
              disable=not progress) as bar:
        results = []
        for name, make in passes:
            bar.set_description(name)
            cache = make()
            results.append(teacher_forced(model, tokens, prefill, cache, on_step=bar.update,
                                          attn_implementation="kvprec" if isinstance(cache, AdaptiveCache) else stock))
    comparison = Comparison(results[0])
    comparison.results.update(zip(caches, results[1:]))
    return comparison
