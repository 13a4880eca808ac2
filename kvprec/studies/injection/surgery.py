"""Cache surgery: write new context into a live cache in the middle of generation (docs/design.md, "Capture").

Everything here goes through the public cache interface, so it works on a kvprec ``AdaptiveCache`` and on a
transformers ``DynamicCache`` alike: a layer's stored K/V are read (``AdaptiveLayer.gather()``, a dynamic layer's
``keys`` / ``values``), the cache is cropped (``Cache.crop``) and K/V are appended (``Cache.update``).

* :func:`append_span` runs the new context through the model on top of the cache: its K/V land after everything
  stored, at the positions that follow (RoPE applied for that place by the model itself).
* :func:`replace_span` swaps positions [start, end) for new tokens: the stored K/V of the tail [end, n) are read,
  the cache is cropped to ``start``, the new tokens run through the model at positions start, start + 1, ... (so
  their K/V are exactly what a model that had them there from the start would store), and the tail is appended
  again as it was stored — the model keeps its state: the tail's K/V still carry what it computed from the old
  context. When the new span is longer or shorter by d positions, the tail moves by d: every stored key is
  rotated by d more positions (:func:`shift_keys`; with RoPE, R(p + d) = R(d) R(p) per frequency pair), values
  do not depend on positions. A model without rotary embeddings (GPT-2) adds positions to its input, so its stored
  K/V carry no position to move.
* :func:`splice` is the primitive under both: crop to ``start`` and append given K/V per layer, for callers that
  compute the K/V themselves (one set per batch row, e.g. different contexts in different rows).

At FP32 tiers (``uniform:fp32``) every step is exact: the crop keeps the stored values, the re-appended tail is the
stored tail, and the new span's K/V are the model's own. With a shift (d != 0) the moved keys differ from keys
computed at their new positions by the rounding of one rotation (~1e-7 relative in FP32). A cache whose blocks are
quantized re-quantizes the re-appended tail from its dequantized values (the policy assigns its tiers again), so a
splice behind quantized blocks is not lossless; the study keeps the tail at FP32 (kvprec/studies/injection/tiers.py).

Sliding-window layers: an ``AdaptiveCache(evict_sliding=False)`` keeps every position; one that evicts, or a
``DynamicCache`` sliding layer that dropped positions, refuses a splice that needs dropped positions (ValueError).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ...hf.attention import enabled
from ...hf.cache import AdaptiveCache, AdaptiveLayer, text_config

KV = Tuple[torch.Tensor, torch.Tensor]

#: rope types whose frequencies do not depend on the sequence length, so a rotation by d positions is R(d)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_frequencies(model, layer_idx: int) -> Optional[torch.Tensor]:
    """The rotary frequencies theta [D/2] (float64) of layer ``layer_idx``: the key at position p is rotated by
    p * theta_i in pair (i, i + D/2). None for a model without rotary embeddings (GPT-2). ValueError for a rope
    whose frequencies change with the sequence length ("dynamic", "longrope"), where no fixed rotation moves a key."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        return None
    rope_type = getattr(rotary, "rope_type", "default")
    if isinstance(rope_type, dict):  # Gemma 3: one rotary per layer type (local and global bases)
        kind = text_config(model.config).layer_types[layer_idx]
        rope_type, inv_freq = rope_type[kind], getattr(rotary, f"{kind}_inv_freq")
    else:
        inv_freq = rotary.inv_freq
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"cache surgery: rope type {rope_type!r} has frequencies that change with the sequence "
                         f"length, so stored keys cannot be moved; supported: {', '.join(STATIC_ROPE_TYPES)}")
    return inv_freq.double()


def shift_keys(keys: torch.Tensor, inv_freq: Optional[torch.Tensor], delta) -> torch.Tensor:
    """Keys [B, H, n, D] stored at positions p, as if stored at p + delta (delta: an int, or [B] per batch row).

    With RoPE in the rotate-half layout (transformers' ``apply_rotary_pos_emb``): k' = k cos(delta theta) +
    rotate_half(k) sin(delta theta), theta = cat(inv_freq, inv_freq); the angle in float64, the product in the
    keys' dtype. ``inv_freq`` None (no rotary embedding): keys are returned unchanged."""
    delta = torch.as_tensor(delta, dtype=torch.float64)
    if inv_freq is None or not bool((delta != 0).any()):
        return keys
    d = keys.shape[-1]
    if 2 * inv_freq.numel() != d:
        raise ValueError(f"cache surgery: {inv_freq.numel()} rotary frequencies for head_dim {d} (partial rotary "
                         "embeddings are not supported)")
    theta = torch.cat([inv_freq, inv_freq]).to(keys.device)
    angle = delta.reshape(-1, 1, 1, 1).to(keys.device) * theta            # [B or 1, 1, 1, D]
    cos, sin = angle.cos().to(keys.dtype), angle.sin().to(keys.dtype)
    half = d // 2
    rotated = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    return keys * cos + rotated * sin


def stored_kv(layer, start: int, end: int) -> KV:
    """The K/V a cache layer holds for positions [start, end), [B, H, end - start, D] in the model dtype (an
    AdaptiveLayer's keys with its key rotation undone). ValueError when the layer no longer holds all of them."""
    n = layer.get_seq_length()
    if not 0 <= start <= end <= n:
        raise ValueError(f"cache surgery: positions [{start}, {end}) are outside the {n} the layer holds")
    if isinstance(layer, AdaptiveLayer):
        held = layer.evicted_blocks * layer.block_size
        if start < held:
            raise ValueError(f"cache surgery: layer {layer.layer_idx} evicted positions < {held} (sliding window); "
                             "build the AdaptiveCache with evict_sliding=False to splice behind the window")
        k, v = layer.gather()
        return k[..., start:end, :], v[..., start:end, :]
    offset = n - layer.keys.shape[-2]  # a DynamicSlidingWindowLayer keeps only the last positions
    if start < offset:
        raise ValueError(f"cache surgery: the sliding-window layer holds positions >= {offset} only; call "
                         "cache.activate_past_recording() before the prompt to keep them all")
    return layer.keys[..., start - offset:end - offset, :], layer.values[..., start - offset:end - offset, :]


def _check_uniform(cache) -> int:
    lengths = {layer.get_seq_length() for layer in cache.layers}
    if len(lengths) != 1:
        raise ValueError(f"cache surgery: the layers hold different numbers of positions {sorted(lengths)}")
    return lengths.pop()


def splice(model, cache, start: int, kv: Sequence[KV]) -> None:
    """Crop every layer to ``start`` positions and append ``kv[i]`` = (K, V) [B, H, n, D] to layer i, as the
    cache's own ``update`` stores them (an AdaptiveCache seals and tiers the blocks that fill through its policy)."""
    n = _check_uniform(cache)
    if not 0 <= start <= n:
        raise ValueError(f"cache surgery: start {start} is outside the {n} positions the cache holds")
    if len(kv) != len(cache.layers):
        raise ValueError(f"cache surgery: {len(kv)} K/V pairs for {len(cache.layers)} layers")
    with _updating(model, cache):
        if start < n:
            cache.crop(start - n)
        for i, (k, v) in enumerate(kv):
            if k.shape[-2]:
                cache.update(k, v, i)


def _updating(model, cache):
    """An AdaptiveCache returns its handles (no gather) only while the model runs the "kvprec" attention."""
    if isinstance(cache, AdaptiveCache):
        return enabled(model)
    import contextlib

    return contextlib.nullcontext()


def _forward(model, cache, ids: torch.Tensor, positions: torch.Tensor, attention_mask=None, **kwargs):
    with torch.no_grad(), _updating(model, cache):
        return model(input_ids=ids.to(model.device), position_ids=positions.to(model.device),
                     attention_mask=attention_mask, past_key_values=cache, use_cache=True, **kwargs)


def append_span(model, cache, ids: torch.Tensor, *, first_position: Optional[int] = None, **kwargs):
    """Run ``ids`` [B, m] through the model on top of ``cache`` at positions first_position, first_position + 1, ...
    (default: the cache's length, the next positions); returns the model output (logits [B, m, V])."""
    n = _check_uniform(cache)
    p0 = n if first_position is None else int(first_position)
    positions = torch.arange(p0, p0 + ids.shape[1]).expand(ids.shape[0], -1)
    return _forward(model, cache, ids, positions, **kwargs)


def replace_span(model, cache, start: int, end: int, ids: torch.Tensor, **kwargs):
    """Replace positions [start, end) of every layer by ``ids`` [B, m] (module docstring); the stored tail [end, n)
    follows them, moved by m - (end - start) positions. Returns the model output of the new span (its logits
    [B, m, V]: the last one is the next-token distribution when the span ends the sequence)."""
    n = _check_uniform(cache)
    if not 0 <= start <= end <= n:
        raise ValueError(f"replace_span: [{start}, {end}) is not inside the {n} positions the cache holds")
    tail = [stored_kv(layer, end, n) for layer in cache.layers]
    tail = [(k.clone(), v.clone()) for k, v in tail]  # the crop may free the storage the views read
    splice(model, cache, start, [(k[..., :0, :], v[..., :0, :]) for k, v in tail])
    out = append_span(model, cache, ids, first_position=start, **kwargs)
    delta = ids.shape[1] - (end - start)
    moved = [(shift_keys(k, rope_frequencies(model, i), delta), v) for i, (k, v) in enumerate(tail)]
    splice(model, cache, start + ids.shape[1], moved)
    return out


def span_kv(model, cache, ids: torch.Tensor, **kwargs) -> Tuple[List[KV], object]:
    """The K/V the model stores for ``ids`` [B, m] placed right after the cache's contents, and the output of that
    forward; the cache is left as it was (the span is cropped off again). For callers that place the same span in
    several caches or rows (:func:`splice`)."""
    n = _check_uniform(cache)
    out = append_span(model, cache, ids, **kwargs)
    kv = [tuple(t.clone() for t in stored_kv(layer, n, n + ids.shape[1])) for layer in cache.layers]
    splice(model, cache, n, [(k[..., :0, :], v[..., :0, :]) for k, v in kv])
    return kv, out
