"""The "kvprec" attention function for transformers, its mask function, and enable/disable on a model.

Nothing is registered at import. :func:`register` (called by :func:`enable`) adds, idempotently,

* ``AttentionInterface.register("kvprec", kvprec_attention_forward)``
* ``AttentionMaskInterface.register("kvprec", sdpa_mask)`` — without it a custom name gets no mask and
  left-padded batches silently diverge; with it, a None mask means "causal, bottom-right aligned".

Registering a name is global but changes no model; :func:`enable` switches one model to "kvprec" and
returns a handle that restores the previous implementation (also a context manager, :func:`enabled`).

The attention function, per call of one layer (query [B, Hq, Q, D]; Q = 1 decode, Q > 1 prefill, chunked
prefill or speculative verify):

* key is a :class:`~kvprec.hf.cache.KVHandle`: attention over the layer's buffer, reading each sealed block in its
  own tier (native ``attend`` or the pure-torch reference), with the HF mask ([B, 1, Q, N] bool, or None =
  causal bottom-right), GQA, ``scaling``, ``sliding_window``, ``softcap``; the per-block attention mass goes
  to the layer's policy when it asks for it. On the CPU a prefill chunk (Q >= kvprec.hf.prefill.MIN_QUERIES, no
  softcap, no block mass wanted) reads the same stored K/V back part by part through torch's flash-attention kernel
  and merges the parts by log-sum-exp (kvprec/hf/prefill.py; bench/bench_prefill_attention.py times both).
  Attention weights, only when requested, come from a dense pass over the gathered K/V (that case only).
* key is a tensor (no cache, a DynamicCache, training): ``sdpa_attention_forward``, or a dense FP32 pass when
  the call needs softcap or weights, which SDPA cannot give.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..ops.reference.attention import attend_dense
from .cache import ATTENTION_NAME, AdaptiveCache, KVHandle, check_supported, is_kvprec_attention

NAME = ATTENTION_NAME


def kvprec_attention_forward(module: torch.nn.Module, query: torch.Tensor, key, value,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                             softcap: Optional[float] = None, **kwargs):
    """transformers attention function: returns (out [B, Q, Hq, D], weights [B, Hq, Q, N] or None)."""
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"kvprec attention does not implement learned attention sinks ({name}=, "
                                      "e.g. gpt-oss); this model is not supported")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("kvprec attention does not implement position_bias (T5-style relative bias)")
    want_weights = bool(kwargs.get("output_attentions")) or _collecting_attentions()

    if not isinstance(key, KVHandle):
        if softcap or want_weights:  # SDPA raises on softcap and cannot return weights
            causal = "none"
            if attention_mask is None and getattr(module, "is_causal", True) and query.shape[2] > 1:
                causal = "top_left"  # what SDPA's is_causal does when the mask was skipped
            out, _, weights = attend_dense(query, key, value, _bool_mask(attention_mask, query, key.shape[2]),
                                           scaling or 0.0, 0, softcap or 0.0, causal)
            return out.transpose(1, 2).contiguous(), weights if want_weights else None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)

    layer = key.layer
    if dropout:
        raise ValueError(f"kvprec attention got dropout={dropout}: the cache is for inference, call model.eval()")
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise NotImplementedError("kvprec attention over the cache is causal (bottom-right); this call asked for "
                                  "non-causal attention")
    n = layer.get_seq_length()
    mask = _bool_mask(attention_mask, query, n)
    want_mass = layer.wants_attention_mass
    out, _, block_mass = layer.attend(query, mask, float(scaling or 0.0), int(sliding_window or 0),
                                      float(softcap or 0.0), want_mass)
    if want_mass:
        layer.record_attention(block_mass)
    weights = None
    if want_weights:
        k, v = layer.gather()
        _, _, weights = attend_dense(query, k, v, mask, scaling or 0.0, int(sliding_window or 0),
                                     float(softcap or 0.0), "bottom_right")
    return out.transpose(1, 2).contiguous(), weights


def _bool_mask(attention_mask: Optional[torch.Tensor], query: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """HF 4D mask [B|1, 1, Q, N] (bool, True = attend; or additive float) -> bool [B, Q, N], or None."""
    if attention_mask is None:
        return None
    b, _, q, _ = query.shape
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[-1] != n:
        raise ValueError(f"kvprec attention: expected a [B, 1, Q, {n}] mask (from the 'kvprec' mask function), got "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool:  # additive: 0 where allowed, a large negative number elsewhere
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask[:, 0, -q:].expand(b, q, n).contiguous()


def _collecting_attentions() -> bool:
    """Whether transformers is recording attention weights in this forward. GPT-2 pops output_attentions
    before the attention call, so the flag is read from the output collector as well."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without output capturing passes output_attentions in kwargs
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


# ---------------------------------------------------------------------------------------------------------

def is_registered() -> bool:
    """Whether "kvprec" names this module's attention function (or a wrapper of it that keeps ``__wrapped__``, e.g.
    a profiler's: :func:`register` leaves it in place) and the SDPA mask in transformers."""
    return (is_kvprec_attention(ALL_ATTENTION_FUNCTIONS.get(NAME))
            and ALL_MASK_ATTENTION_FUNCTIONS.get(NAME) is sdpa_mask)


# The cache recognises the function by this mark (also through wrappers), without importing this module.
kvprec_attention_forward.__kvprec_attention__ = True


def register() -> None:
    """Register the "kvprec" attention and mask functions (idempotent; a registered wrapper of the attention function
    is kept). Needed before ``from_pretrained(..., attn_implementation="kvprec")``; :func:`enable` calls it."""
    if not is_kvprec_attention(ALL_ATTENTION_FUNCTIONS.get(NAME)):
        AttentionInterface.register(NAME, kvprec_attention_forward)
    if ALL_MASK_ATTENTION_FUNCTIONS.get(NAME) is not sdpa_mask:
        AttentionMaskInterface.register(NAME, sdpa_mask)


def _configs(model) -> list:
    """The model's config and every distinct config of its sub-models (each has its own implementation)."""
    seen, configs = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal") and id(config) not in seen:
            seen.add(id(config))
            configs.append(config)
    return configs


def _bind_cache(model, args, kwargs) -> None:
    """Forward pre-hook of an enabled model: an AdaptiveCache passed as ``past_key_values`` is bound to the model's
    config (built as ``AdaptiveCache()``, or unpickled with a copy of the config); a no-op once bound."""
    cache = kwargs.get("past_key_values")
    if isinstance(cache, AdaptiveCache):
        cache.bind(model.config)


class Enabled:
    """The result of :func:`enable`: ``disable()`` (or leaving the ``with`` block) restores the attention
    implementation every config of the model had before and removes the hook that binds caches to the model.
    Restoring twice is harmless."""

    def __init__(self, model):
        check_supported(model.config)
        register()
        self.model = model
        self._saved = [(config, config._attn_implementation_internal) for config in _configs(model)]
        model.set_attn_implementation(NAME)
        self._hook = model.register_forward_pre_hook(_bind_cache, with_kwargs=True)
        self.active = True

    def disable(self) -> None:
        if not self.active:
            return
        self.active = False
        self._hook.remove()
        if self._saved[0][1] is not None:
            self.model.set_attn_implementation(self._saved[0][1])
        for config, implementation in self._saved:  # sub-models may have had their own implementation
            config._attn_implementation_internal = implementation

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()
        return False


def enable(model) -> Enabled:
    """Run ``model``'s attention through kvprec: registers the functions and sets the model's attention
    implementation to "kvprec". Returns an :class:`Enabled` handle: call ``.disable()`` or use it in ``with``."""
    return Enabled(model)


def enabled(model) -> Enabled:
    """Context manager form: ``with kvprec.enabled(model): model.generate(..., past_key_values=cache)``."""
    return Enabled(model)
