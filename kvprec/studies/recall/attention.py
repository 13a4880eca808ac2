"""The recall study's attention function: exact attention that hands each layer's probabilities to a handler.

Why not ``output_attentions=True`` on the eager implementation: transformers keeps every layer's [B, Hq, Q, N]
map until the forward returns (a 1,000-token prefill of SmolLM2-135M: 30 x 9 x 1000^2 x 4 B = 1.1 GB), where the
study needs per layer only a few reductions (column sums, the last rows); and the study's reruns need a different
mask per KV head, which no stock implementation takes (transformers' masks are per batch row). So the study
registers its own function (transformers' ``AttentionInterface``, under :data:`NAME`) and a handler decides, per
call of one layer, how to attend and what to keep:

* :class:`OracleRecorder`: the full cache (a DynamicCache), ``attend_dense`` of kvprec/ops/reference/attention.py
  (FP32 softmax, bottom-right causal, as eager attention computes it), and the per-KV-head reductions;
* :class:`MaskedRows`: R batch rows of one decode token each, attending over a shared prefix (K/V [H_kv, S, D]
  common to all rows) and each row's own positions (appended by this function, so the model runs without an HF
  cache), under a keep mask per row and KV head; the rows are variants of one step (the entropy gap) or caches
  that evict on their own (the entropy-triggered recall runs).

Probabilities are reported per KV head as the mean over its query heads (GQA groups), the attention a KV head's
positions receive. Only full causal attention without softcap is implemented (:func:`check_model`).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, List, Optional

import torch

from ...ops.reference.attention import attend_dense

NAME = "kvprec_recall"
_HANDLER: contextvars.ContextVar = contextvars.ContextVar("kvprec_recall_handler", default=None)


def model_shape(model) -> tuple:
    """(layers, query heads, KV heads, head_dim) of a decoder's text config."""
    from ...hf.cache import text_config

    tc = text_config(model.config)
    hq = tc.num_attention_heads
    hkv = getattr(tc, "num_key_value_heads", None) or hq
    d = getattr(tc, "head_dim", None) or tc.hidden_size // hq
    return tc.num_hidden_layers, hq, hkv, d


def check_model(model) -> None:
    """Refuse models whose attention this study's function does not implement (sliding windows, softcaps)."""
    from ...hf.cache import check_supported, sliding_windows, text_config

    check_supported(model.config)
    tc = text_config(model.config)
    if any(sliding_windows(tc)) or getattr(tc, "attn_logit_softcapping", None):
        raise ValueError(f"--model: the recall study attends with full causal attention; model_type "
                         f"{tc.model_type!r} uses sliding windows or a logit softcap, which it does not implement")
    if getattr(tc, "model_type", None) == "gpt2":
        raise ValueError("--model: the recall study needs rotary positions passed as position_ids (Llama, Qwen, "
                         "Mistral, Gemma families); GPT-2 is not supported")


def _forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
             **kwargs):
    handler = _HANDLER.get()
    if handler is None:
        raise RuntimeError(f"attention {NAME!r} runs only inside kvprec.studies.recall.attention.study_attention()")
    scale = scaling or 1.0 / math.sqrt(query.shape[-1])
    out = handler.attend(module.layer_idx, query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def study_attention(model, handler):
    """Run ``model`` with this module's attention function and ``handler`` for the duration of the block; the
    model's attention implementation is restored on exit."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS.get(NAME) is not _forward:
        AttentionInterface.register(NAME, _forward)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    token = _HANDLER.set(handler)
    try:
        yield handler
    finally:
        _HANDLER.reset(token)
        model.set_attn_implementation(previous)


def group_mean(p: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Probabilities [B, Hq, Q, N] -> FP32 [B, H_kv, Q, N], the mean over each KV head's query heads."""
    b, hq, q, n = p.shape
    return p.float().reshape(b, kv_heads, hq // kv_heads, q, n).mean(2)


class OracleRecorder:
    """The full cache: ``attend_dense`` over the K/V the model passes (batch 1), recording per layer

    * for a prefill call (Q > 1, possibly one chunk of several): the column sums over its queries, added to
      ``colsum[layer]`` FP32 [H_kv, N], and the last ``window`` query rows, kept in ``last_rows[layer]``
      [<= window, H_kv, N] (rows of earlier chunks are zero-padded to the newest length);
    * for a decode call (Q = 1): ``row[layer]`` FP32 [H_kv, N], the attention of the new query (N includes it).
    """

    def __init__(self, layers: int, kv_heads: int, window: int):
        self.kv_heads, self.window = kv_heads, int(window)
        self.colsum: List[Optional[torch.Tensor]] = [None] * layers
        self.last_rows: List[Optional[torch.Tensor]] = [None] * layers
        self.row: List[Optional[torch.Tensor]] = [None] * layers

    def attend(self, layer: int, q, k, v, scale: float):
        if q.shape[0] != 1:
            raise ValueError(f"OracleRecorder: batch of {q.shape[0]}; the oracle runs one sequence at a time")
        out, _, weights = attend_dense(q, k, v, None, scale, 0, 0.0, "bottom_right")
        p = group_mean(weights, self.kv_heads)[0].cpu()  # [H_kv, Q, N], on the host with the simulations
        n = p.shape[-1]
        if p.shape[1] == 1:
            self.row[layer] = p[:, 0]
            return out
        grow = lambda x: torch.nn.functional.pad(x, (0, n - x.shape[-1]))  # noqa: E731
        col = p.sum(1)
        self.colsum[layer] = col if self.colsum[layer] is None else grow(self.colsum[layer]) + col
        rows = p[:, -self.window:].transpose(0, 1)  # [<= window, H_kv, N]
        if self.last_rows[layer] is not None and rows.shape[0] < self.window:
            rows = torch.cat([grow(self.last_rows[layer]), rows])[-self.window:]
        self.last_rows[layer] = rows
        return out


def scores(q: torch.Tensor, k_shared: torch.Tensor, k_own: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Attention logits FP32 [R, H_kv, g, S + m] of q [R, Hq, 1, D] over a shared prefix k_shared [H_kv, S, D]
    followed by each row's own keys k_own [R, H_kv, m, D] (None: m = 0)."""
    r, hq, _, d = q.shape
    hkv = k_shared.shape[0]
    qg = q.float().reshape(r, hkv, hq // hkv, d) * scale
    s = torch.einsum("rhgd,hsd->rhgs", qg, k_shared.float())
    if k_own is not None and k_own.shape[2]:
        s = torch.cat([s, torch.einsum("rhgd,rhmd->rhgm", qg, k_own.float())], -1)
    return s


def attend_scores(s: torch.Tensor, keep: torch.Tensor, v_shared: torch.Tensor, v_own: Optional[torch.Tensor],
                  dtype: torch.dtype):
    """Softmax of logits ``s`` [R, H_kv, g, N] over the positions ``keep`` (bool [R, H_kv, N]) and the weighted sum
    of v_shared [H_kv, S, D] then v_own [R, H_kv, m, D]. Returns (out [R, Hq, 1, D] in ``dtype``, probabilities
    FP32 [R, H_kv, g, N])."""
    r, hkv, g, n = s.shape
    p = torch.softmax(s.masked_fill(~keep[:, :, None], float("-inf")), -1)
    size = v_shared.shape[1]
    out = torch.einsum("rhgs,hsd->rhgd", p[..., :size], v_shared.float())
    if v_own is not None and v_own.shape[2]:
        out = out + torch.einsum("rhgm,rhmd->rhgd", p[..., size:], v_own.float())
    return out.reshape(r, hkv * g, 1, -1).to(dtype), p


class MaskedRows:
    """R rows of one decode token each over a shared prefix plus their own positions, with per-row, per-KV-head
    keep masks.

    shared_k, shared_v: per layer [H_kv, S, D] (views are fine: e.g. the oracle's cache up to the step);
    keep: ``keep(layer, logits)`` -> bool [R, H_kv, N] over the N = S + m positions of the call (the row's current
    position last; it must be kept), given the logits FP32 [R, H_kv, g, N] on the model's device (so a row may pick
    what to recall); the mask may be on the host;
    own: True to keep the rows' own K/V across calls (caches that grow), False for one-step variants.
    After a forward, ``probs[layer]`` holds FP32 [R, H_kv, N] on the host, the group-mean attention of each row.
    """

    def __init__(self, shared_k: List[torch.Tensor], shared_v: List[torch.Tensor],
                 keep: Callable[[int, torch.Tensor], torch.Tensor], own: bool = False):
        self.shared_k, self.shared_v, self.keep, self.own = shared_k, shared_v, keep, own
        layers = len(shared_k)
        self.own_k: List[Optional[torch.Tensor]] = [None] * layers
        self.own_v: List[Optional[torch.Tensor]] = [None] * layers
        self.probs: List[Optional[torch.Tensor]] = [None] * layers

    def attend(self, layer: int, q, k, v, scale: float):
        if q.shape[2] != 1:
            raise ValueError(f"MaskedRows: {q.shape[2]} query positions per row; the rows decode one token at a time")
        if self.own and self.own_k[layer] is not None:
            k_own, v_own = torch.cat([self.own_k[layer], k], 2), torch.cat([self.own_v[layer], v], 2)
        else:
            k_own, v_own = k, v
        if self.own:
            self.own_k[layer], self.own_v[layer] = k_own, v_own
        s = scores(q, self.shared_k[layer], k_own, scale)
        keep = self.keep(layer, s).to(s.device)
        if keep.shape != (s.shape[0], s.shape[1], s.shape[-1]) or not bool(keep[..., -1].all()):
            raise ValueError(f"MaskedRows: keep mask of shape {tuple(keep.shape)} for logits {tuple(s.shape)}; it "
                             "must be [R, H_kv, N] and keep each row's current position (the last)")
        out, p = attend_scores(s, keep, self.shared_v[layer], v_own, q.dtype)
        self.probs[layer] = p.mean(2).cpu()
        return out
