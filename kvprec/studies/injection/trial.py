"""One problem, every condition: the decode loop with injections, the teacher-forced references, the per-step
measurements (kvprec/studies/injection/metrics.py).

Conditions are the rows of one AdaptiveCache (kvprec/studies/injection/layout.py), decoded greedily together:

* ``baseline``   the original span, never changed;
* ``oracle``     the injected span from the start (the new context from the start);
* ``injection``  the original span until the point N (generated tokens), then the injected span spliced in, at a
                 tier (fp32, int8, int4, int2: the span's blocks at that tier, everything else FP32);
* ``noise-<kind>`` the same splice at N with a noise control of the injected span's length (FP32).

A splice at N happens before the model reads y_{N-1}: the cache holds the prompt and y_0 .. y_{N-2}, the span
region is replaced, the stored y_0 .. y_{N-2} follow it (moved by the change in length), and the distribution of
y_N is the first one the new span shapes ("step 0 since injection"). At N = 0 the row starts with the injected span:
it is the oracle.

Each row's own greedy tokens are its stream. The references are teacher-forced on every distinct stream: the
oracle (prompt with the injected span, then the stream) and the baseline (original span, then the stream), in
caches of their own at FP32; on its own stream the oracle row is its own oracle reference and the baseline row its
own baseline reference. Everything after a row's end-of-sequence token is left out (``valid``).

The attention shares and each row's own log-probability and entropy are recorded by the study platform's Capture
(kvprec/studies/platform/capture.py: the attention kernel's per-block mass, no second pass over the cache).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ...hf.attention import enabled
from ...hf.cache import AdaptiveCache
from ...hf.policy.uniform import Uniform
from ...storage.formats import Tier
from ..platform.capture import Capture, CaptureSpec, token_statistics
from .layout import Layout
from .metrics import cosine, kl_divergence, log_ratio, region_shares
from .prompt import PromptParts
from .surgery import append_span, rope_frequencies, shift_keys, span_kv, splice, stored_kv
from .tiers import SpanTiers


@dataclass(frozen=True)
class Row:
    """A condition: ``start`` span, the span ``inject``-ed at ``point`` (-1: never), the injected span's tier."""

    condition: str
    point: int
    tier: str
    start: str
    inject: str = ""


def plan_rows(points: Sequence[int], tiers: Sequence[str], noise: Sequence[str]) -> List[Row]:
    """Rows in a fixed order: baseline, oracle, then per point the injections (one per tier) and noise controls."""
    rows = [Row("baseline", -1, "fp32", "original"), Row("oracle", -1, "fp32", "injected")]
    for n in points:
        rows += [Row("injection", n, tier, "injected" if n == 0 else "original", "injected") for tier in tiers]
        rows += [Row(f"noise-{kind}", n, "fp32", f"noise-{kind}" if n == 0 else "original", f"noise-{kind}")
                 for kind in noise]
    return rows


@dataclass
class CacheSettings:
    """The caches of a run: block size, key rotation (None, "hadamard", "orthogonal") and its seed, and how many
    streams one teacher-forced forward takes."""

    block_size: int = 16
    key_rotation: Optional[str] = None
    rotation_seed: int = 0
    tf_batch: int = 8


@dataclass
class SpanState:
    """A span's K/V per layer ([1, H, n, D]) on top of the prompt, with the model's output at its last token."""

    ids: List[int]
    kv: list
    logp: torch.Tensor     # [V] float32: the distribution of the first generated token
    hidden: torch.Tensor   # [L + 1, Dm]: hidden states of the span's last token


def _cache(model, cs: CacheSettings, policy) -> AdaptiveCache:
    return AdaptiveCache(model.config, policy=policy, block_size=cs.block_size, evict_sliding=False,
                         key_rotation=cs.key_rotation, rotation_seed=cs.rotation_seed)


def _logp(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities in FP32 (the references and the KL need the whole distribution of every step; FP64 would
    double the time of the largest arrays for digits below the model's own FP32 rounding)."""
    return torch.log_softmax(logits.float(), dim=-1)


def _hidden(out) -> torch.Tensor:
    """[B, Q, L + 1, Dm] from a forward's hidden states (embeddings, then each layer's output)."""
    return torch.stack([h.float() for h in out.hidden_states], dim=2)


class PromptMemo:
    """The cache of the last prompt prefix run (problems of one set share their examples): reused while the next
    problem's ``pre`` ids are the same, so the prefix runs once per set instead of once per problem."""

    def __init__(self):
        self.key, self.cache, self.pre_kv = None, None, None

    def get(self, model, pre: List[int], cs: CacheSettings):
        if self.key != (tuple(pre), id(model)):
            self.release()
            cache = _cache(model, cs, Uniform(Tier.FP32))
            append_span(model, cache, torch.tensor([pre]))
            self.key, self.cache = (tuple(pre), id(model)), cache
            self.pre_kv = [tuple(t.clone() for t in stored_kv(layer, 0, len(pre))) for layer in cache.layers]
        return self.cache, self.pre_kv

    def release(self) -> None:
        """Free the held cache's buffers now (a cache and its layers refer to each other, so without this its
        memory waits for Python's cycle collector)."""
        if self.cache is not None:
            self.cache.reset()
        self.key, self.cache, self.pre_kv = None, None, None


def prompt_states(model, parts: PromptParts, cs: CacheSettings, memo: Optional[PromptMemo] = None):
    """(pre K/V per layer, {span name: SpanState}): the prompt before the span run once (or taken from ``memo``),
    each span run on top of it at positions P, P + 1, ... (kvprec/studies/injection/surgery.py: span_kv, which
    leaves the prefix cache as it was)."""
    cache, pre_kv = (memo or PromptMemo()).get(model, parts.pre, cs)
    spans = {}
    for name, ids in parts.spans.items():
        kv, out = span_kv(model, cache, torch.tensor([ids]), output_hidden_states=True)
        spans[name] = SpanState(list(ids), kv, _logp(out.logits[0, -1]), _hidden(out)[0, -1])
    return pre_kv, spans


class Batch:
    """The decode loop over the rows of one or more problems (module docstring). Every row decodes from the start
    (a row injected at N is the baseline until N): copying the baseline row into new rows at N instead
    (``batch_select_indices`` copies every page of the cache) cost more than the steps it saves when profiled on
    SmolLM2-135M."""

    def __init__(self, model, rows: List[Row], pre_kv, spans: Dict[str, SpanState], cs: CacheSettings):
        self.model, self.rows, self.pre_kv, self.spans, self.cs = model, rows, pre_kv, spans, cs
        self.current = [r.start for r in rows]
        longest = max(len(s.ids) for s in spans.values())
        self.layout = Layout.plan(pre_kv[0][0].shape[-2], cs.block_size, longest,
                                  [len(spans[name].ids) for name in self.current])
        self.policy = SpanTiers(Tier.FP32, self.layout.span_blocks)
        self.policy.set_rows([self._tier(i) for i in range(len(rows))])
        self.cache = _cache(model, cs, self.policy)
        self.capture = Capture(CaptureSpec(keys=False, values=False, block_mass=True))
        self.capture.attach(self.cache)
        self.frequencies = [rope_frequencies(model, i) for i in range(len(pre_kv))]
        splice(model, self.cache, 0, [self._layer_kv(i, None) for i in range(len(pre_kv))])

    def _tier(self, i: int) -> int:
        row = self.rows[i]
        injected = bool(row.inject) and self.current[i] == row.inject
        return int(Tier.parse(row.tier)) if injected else int(Tier.FP32)

    def _region(self, layer: int):
        parts = [self.layout.region(*self.spans[name].kv[layer]) for name in self.current]
        return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])

    def _layer_kv(self, layer: int, tail):
        """Slots of one layer from S0 (``tail`` given: the span region and the tail) or from 0 (the whole prefix)."""
        k, v = self._region(layer)
        if tail is None:
            pk, pv = self.layout.prefix(*self.pre_kv[layer], len(self.rows))
            return torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2)
        return torch.cat([k, tail[0]], dim=-2), torch.cat([v, tail[1]], dim=-2)

    def inject(self, rows: List[int]) -> None:
        """Splice the ``inject`` span of ``rows`` into their span region; the generated tokens move with it."""
        start, gen = self.layout.span_start, self.layout.gen_start
        n = self.cache.get_seq_length()
        delta = torch.zeros(len(self.rows), dtype=torch.long)
        for i in rows:
            new = self.rows[i].inject
            delta[i] = len(self.spans[new].ids) - len(self.spans[self.current[i]].ids)
            self.current[i] = new
            self.layout.span_len[i] = len(self.spans[new].ids)
        self.policy.set_rows([self._tier(i) for i in range(len(self.rows))])
        kv = []
        for layer_idx, layer in enumerate(self.cache.layers):
            k, v = stored_kv(layer, gen, n)
            tail = (shift_keys(k.clone(), self.frequencies[layer_idx], delta), v.clone())
            kv.append(self._layer_kv(layer_idx, tail))
        splice(self.model, self.cache, start, kv)

    def run(self, max_new_tokens: int, eos: Sequence[int]):
        """Greedy decode of every row: tokens [R, M] long, ends [R] (number of valid steps: up to and including
        the end-of-sequence token), logp [R, M, V], hidden [R, M, L + 1, Dm], and the capture's record of the decode
        steps 1, 2, ... (block mass, log-probability and entropy; None when no step ran)."""
        r, m = len(self.rows), max_new_tokens
        first = [self.spans[name] for name in self.current]
        tokens = torch.zeros(r, m, dtype=torch.long)
        logp = torch.empty(r, m, first[0].logp.shape[-1])
        hidden = torch.empty(r, m, *first[0].hidden.shape)
        logp[:, 0], hidden[:, 0] = torch.stack([s.logp for s in first]), torch.stack([s.hidden for s in first])
        tokens[:, 0] = logp[:, 0].argmax(-1)
        eos_t = torch.tensor(sorted(set(eos)) or [-1])
        ended = torch.isin(tokens[:, 0], eos_t)
        ends = torch.where(ended, 1, m)
        scorer = self.capture.scorer()
        steps = 1
        with torch.no_grad(), enabled(self.model):
            for t in range(1, m):
                if bool(ended.all()):
                    break
                due = [i for i, row in enumerate(self.rows) if row.point == t]
                if due:
                    self.inject(due)
                n, device = self.cache.get_seq_length(), self.model.device
                out = self.model(input_ids=tokens[:, t - 1:t].to(device),
                                 position_ids=self.layout.positions(t - 1, 1).to(device),
                                 attention_mask=self.layout.mask(n + 1).to(device), past_key_values=self.cache,
                                 use_cache=True, output_hidden_states=True)
                scorer(tokens[:, :t], out.logits[:, -1])
                logp[:, t], hidden[:, t] = _logp(out.logits[:, -1]), _hidden(out)[:, -1]
                tokens[:, t] = logp[:, t].argmax(-1)  # logp lives on the host: the tokens too
                now = torch.isin(tokens[:, t], eos_t) & ~ended
                ends = torch.where(now, t + 1, ends)
                ended |= now
                steps = t + 1
        record = self.capture.finish(tokens[:, :steps]) if steps > 1 else None
        return tokens[:, :steps], ends.clamp(max=steps), logp[:, :steps], hidden[:, :steps], record


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def teacher_force(model, pre_kv, span: SpanState, streams: List[List[int]], cs: CacheSettings):
    """The distributions (float32 [n_u, V]) and hidden states ([n_u, L + 1, Dm]) of the prompt with ``span``
    teacher-forced on each stream u (a token list of length n_u >= 1): step 0 is the span's own output, step t the
    output after y_0 .. y_{t-1}. FP32 cache with contiguous positions (no holes).

    Streams share prefixes (a row injected at N has the baseline's first N tokens), and a step depends only on the
    tokens before it, so the first stream is the trunk, forced once; a stream that agrees with it on its first f
    tokens takes the trunk's steps 0 .. g (g = min(f, n_trunk - 1)) and is forced from there on a copy of the trunk's
    cache cropped to its first g tokens (forks at the same g share one forward of up to ``cs.tf_batch`` rows)."""
    trunk = streams[0]
    cache = _cache(model, cs, Uniform(Tier.FP32))
    splice(model, cache, 0, [(torch.cat([pk, sk], dim=-2), torch.cat([pv, sv], dim=-2))
                             for (pk, pv), (sk, sv) in zip(pre_kv, span.kv)])
    base = cache.get_seq_length()

    def forced(ids: List[List[int]]):
        out = append_span(model, cache, torch.tensor(ids), output_hidden_states=True)
        return _logp(out.logits), _hidden(out)

    logp = torch.empty(len(trunk), span.logp.shape[-1])
    hidden = torch.empty(len(trunk), *span.hidden.shape)
    logp[0], hidden[0] = span.logp, span.hidden
    if len(trunk) > 1:
        logp[1:], hidden[1:] = (x[0] for x in forced([trunk[:-1]]))
    results = [(logp, hidden)]
    forks: Dict[int, List[int]] = {}
    for u, stream in enumerate(streams[1:], 1):
        f = _common_prefix(stream, trunk)
        if f >= len(stream):  # a prefix of the trunk
            results.append((logp[:len(stream)], hidden[:len(stream)]))
            continue
        results.append(None)
        forks.setdefault(min(f, len(trunk) - 1), []).append(u)
    for g in sorted(forks, reverse=True):
        members = forks[g]
        for s in range(0, len(members), cs.tf_batch):
            group = members[s:s + cs.tf_batch]
            splice(model, cache, base + g, [(k[..., :0, :], v[..., :0, :]) for k, v in span.kv])
            cache.batch_select_indices(torch.zeros(len(group), dtype=torch.long))
            width = max(len(streams[u]) - 1 - g for u in group)
            ids = [streams[u][g:-1] + [streams[u][-1]] * (width - (len(streams[u]) - 1 - g)) for u in group]
            fl, fh = forced(ids) if width else (None, None)
            for j, u in enumerate(group):
                n = len(streams[u])
                lp = torch.cat([logp[:g + 1], fl[j, :n - 1 - g]]) if width else logp[:n]
                hd = torch.cat([hidden[:g + 1], fh[j, :n - 1 - g]]) if width else hidden[:n]
                results[u] = (lp, hd)
            cache.batch_select_indices(torch.zeros(1, dtype=torch.long))
    cache.reset()  # free the buffers now, not at the next cycle collection
    return results


def run_problems(model, group: List[PromptParts], rows: List[Row], cs: CacheSettings, max_new_tokens: int,
                 eos: Sequence[int], memo: Optional[PromptMemo] = None) -> List[Dict[str, np.ndarray]]:
    """Every measurement of each problem in ``group``, as arrays with the row axis first (study.py stacks them):

    tokens [R, M] int32 (-1 after the end); valid [R, M] bool; kl, kl_unadapted, log_ratio, logprob, entropy
    [R, M] float32 (NaN where not valid); cosine [R, M, L + 1] float32; attn_pre, attn_span [R, M, L] float16 (mean
    over query heads; NaN at step 0, computed by the span's own forward); attn_span_heads [R, L, Hq] float32 (the
    span share per head, averaged over the row's valid steps from its injection point on, or from step 1);
    span_len [R] int32 (the row's span at the end); seconds, cpu_seconds (wall and process CPU time of the group
    divided among its problems: on a shared machine the wall time depends on the load, the CPU time much less).

    Problems whose prompts share the part before the span (a set's examples, no per-problem context) decode as one
    batch, the rows of problem j being rows j R .. (j + 1) R - 1: a decode step costs a fixed part (every weight read
    once, the Python of every layer) and a part per row, so one batch of 3R rows costs less than three of R. Each
    problem's references and measures are its own."""
    began, began_cpu = time.perf_counter(), time.process_time()
    if any(parts.pre != group[0].pre for parts in group):
        raise ValueError("run_problems: the problems of one batch must share the prompt before the span")
    combined_rows, combined_spans, per_problem = [], {}, []
    for j, parts in enumerate(group):
        pre_kv, spans = prompt_states(model, parts, cs, memo)
        per_problem.append(spans)
        combined_spans.update({f"{j}/{name}": state for name, state in spans.items()})
        combined_rows += [replace(r, start=f"{j}/{r.start}", inject=f"{j}/{r.inject}" if r.inject else "")
                          for r in rows]
    batch = Batch(model, combined_rows, pre_kv, combined_spans, cs)
    tokens, ends, own, own_hidden, record = batch.run(max_new_tokens, eos)
    masses = None if record is None else [record.block_mass(i) for i in range(own_hidden.shape[2] - 1)]
    outs = []
    for j, spans in enumerate(per_problem):
        rs = slice(j * len(rows), (j + 1) * len(rows))
        out = _measure(model, pre_kv, spans, rows, tokens[rs], ends[rs], own[rs], own_hidden[rs], cs, max_new_tokens)
        steps = tokens.shape[1]
        first_logp, first_entropy = token_statistics(own[rs, 0])
        out["logprob"][:, 0] = first_logp.gather(-1, tokens[rs, :1])[:, 0].numpy()
        out["entropy"][:, 0] = first_entropy.numpy()
        if record is not None:  # later steps as the capture's scorer recorded them
            out["logprob"][:, 1:steps], out["entropy"][:, 1:steps] = record.logprob[rs], record.entropy[rs]
        out["logprob"][~out["valid"]], out["entropy"][~out["valid"]] = np.nan, np.nan
        out.update(_attention(masses, rs, batch.layout, rows, ends[rs], max_new_tokens, own_hidden.shape[2] - 1))
        out["span_len"] = np.array(batch.layout.span_len[rs], np.int32)
        outs.append(out)
    batch.cache.reset()  # a batch cache holds ~0.5 GB for 51 rows of SmolLM2: free it now, not at a later collection
    del batch, own, own_hidden, masses
    gc.collect()  # the capture's hooks and the cache's layers form reference cycles
    for out in outs:
        out["seconds"] = np.float64((time.perf_counter() - began) / len(group))
        out["cpu_seconds"] = np.float64((time.process_time() - began_cpu) / len(group))
    return outs


def run_problem(model, parts: PromptParts, rows: List[Row], cs: CacheSettings, max_new_tokens: int,
                eos: Sequence[int], memo: Optional[PromptMemo] = None) -> Dict[str, np.ndarray]:
    """:func:`run_problems` for one problem."""
    return run_problems(model, [parts], rows, cs, max_new_tokens, eos, memo)[0]


def _measure(model, pre_kv, spans: Dict[str, SpanState], rows: List[Row], tokens, ends, own, own_hidden,
             cs: CacheSettings, max_new_tokens: int) -> Dict[str, np.ndarray]:
    """One problem's per-step measures against its teacher-forced references (module docstring)."""
    r = tokens.shape[0]
    streams = [tokens[i, :int(ends[i])].tolist() for i in range(r)]
    oracle_row = next(i for i, row in enumerate(rows) if row.condition == "oracle")
    baseline_row = next(i for i, row in enumerate(rows) if row.condition == "baseline")
    refs = {}
    for ctx, own_row in (("injected", oracle_row), ("original", baseline_row)):
        own_key = tuple(streams[own_row])
        needed = [k for k in dict.fromkeys(tuple(x) for x in streams) if k != own_key]
        forced = {}
        if needed:  # the baseline's stream is the trunk: rows injected at N share its first N tokens
            trunk = tuple(streams[baseline_row])
            order = [trunk] + [k for k in needed if k != trunk]
            forced = dict(zip(order, teacher_force(model, pre_kv, spans[ctx], [list(k) for k in order], cs)))
        for i in range(r):
            key = tuple(streams[i])
            refs[(ctx, i)] = (own[own_row, :len(key)], own_hidden[own_row, :len(key)]) if key == own_key \
                else forced[key]
    layers = own_hidden.shape[2]
    out = {name: np.full((r, max_new_tokens), np.nan, np.float32)
           for name in ("kl", "kl_unadapted", "log_ratio", "logprob", "entropy")}
    out["cosine"] = np.full((r, max_new_tokens, layers), np.nan, np.float32)
    out["tokens"] = np.full((r, max_new_tokens), -1, np.int32)
    out["valid"] = np.zeros((r, max_new_tokens), bool)
    for i in range(r):
        n = int(ends[i])
        o_logp, o_hidden = refs[("injected", i)]
        b_logp = refs[("original", i)][0]
        toks = tokens[i, :n]
        out["tokens"][i, :n] = toks.numpy()
        out["valid"][i, :n] = True
        out["kl"][i, :n] = kl_divergence(o_logp[:n], own[i, :n]).numpy()
        out["kl_unadapted"][i, :n] = kl_divergence(o_logp[:n], b_logp[:n]).numpy()
        out["log_ratio"][i, :n] = log_ratio(o_logp[:n], b_logp[:n], toks).numpy()
        out["cosine"][i, :n] = cosine(own_hidden[i, :n], o_hidden[:n]).numpy()
    return out


def _attention(masses, rs: slice, layout: Layout, rows: List[Row], ends, m: int, layers: int) -> Dict[str, np.ndarray]:
    """Attention shares of batch rows ``rs`` (one problem's ``rows``) from the capture's block mass per layer
    (``masses[layer]`` [steps - 1, B, Hq, n_blocks], CaptureRecord.block_mass; its query rows are decode steps 1, 2,
    ...):
    attn_pre / attn_span [R, M, L] (mean over query heads; NaN at step 0, made by the span's own forward, and where
    not valid) and attn_span_heads [R, L, Hq] (the span share per head, averaged over the row's valid steps from its
    injection point on, or from step 1)."""
    r = len(rows)
    pre_share = np.full((r, m, layers), np.nan, np.float32)
    span_share = np.full((r, m, layers), np.nan, np.float32)
    heads = np.full((r, layers, 1), np.nan, np.float32)
    if masses is not None:
        for layer in range(layers):
            mass = torch.from_numpy(np.ascontiguousarray(masses[layer][:, rs]))       # [steps - 1, R, Hq, nb]
            pre, span = region_shares(mass, layout.span_start // layout.block_size, layout.span_blocks)
            steps = pre.shape[0]
            pre_share[:, 1:1 + steps, layer] = pre.mean(-1).T.numpy()
            span_share[:, 1:1 + steps, layer] = span.mean(-1).T.numpy()
            if heads.shape[-1] != span.shape[-1]:
                heads = np.full((r, layers, span.shape[-1]), np.nan, np.float32)
            for i, row in enumerate(rows):
                first, last = max(row.point, 1), int(ends[i])
                if last > first:
                    heads[i, layer] = span[first - 1:last - 1, i].mean(0).numpy()
    valid = np.arange(m)[None, :] < np.asarray(ends)[:, None]
    pre_share[~valid], span_share[~valid] = np.nan, np.nan
    return {"attn_pre": pre_share.astype(np.float16), "attn_span": span_share.astype(np.float16),
            "attn_span_heads": heads}
