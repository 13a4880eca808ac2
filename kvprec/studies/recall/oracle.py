"""Phase 1 of the recall study, per sample: the oracle run with the full cache and everything measured against it.

The model prefills the prompt (P positions) into a DynamicCache under the study's attention function
(:class:`~kvprec.studies.recall.attention.OracleRecorder`), then decodes greedily. At the decode step whose query
sits at position t (the token x_t is fed; x_{t+1} = argmax of its logits is the next):

* H_t = -sum_v p_t(v) log p_t(v), the entropy in nats of the next-token distribution (and the oracle's NLL of
  x_{t+1}, -log p_t(x_{t+1}));
* a_t: the query's attention over [0, t] per (layer, KV head) (mean of the KV head's query heads), rows
  r = layer * H_kv + head, plus one aggregate row, the mean of all of them;
* per budget fraction b and policy: the retained set before the step (simulated eviction, kvprec/studies/recall/
  policies/, or kvprec's tiering read as kept, kvprec/studies/recall/tiering.py), the needed set (top-K of a_t over
  [0, t)) and recall_t per row (kvprec/studies/recall/recall.py); kvprec's tiering has no aggregate set (it tiers
  per layer and KV head), so its aggregate recall is NaN;
* the entropy gap: the step is run again as a batch of variants over the oracle's cached K/V (positions [0, t),
  shared) with per-(layer, KV head) keep masks (kvprec/studies/recall/attention.py MaskedRows): for each policy
  and budget once with attention restricted to the retained set and once with the missed positions (needed minus
  retained) restored, plus one unrestricted variant that must reproduce the oracle's logits (the check). Only
  this step's attention is restricted: the cached K/V of earlier positions are the full cache's (the oracle
  approximation; the eviction runs of kvprec/studies/recall/eviction.py lift it);
* supporting facts, when the sample has them: the share of needed positions inside them, and the share of their
  positions each policy retained.

Then every simulated policy observes a_t as its own cache would show it (restricted to what it holds) and evicts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from .attention import MaskedRows, OracleRecorder, model_shape, study_attention
from .policies import PolicyOptions, PrefillStats
from .recall import budget_size, needed_set, recall

SIMULATED = ("h2o", "streaming", "tova", "snapkv")
POLICY_NAMES = SIMULATED + ("kvprec",)


def entropy_nll(logits: torch.Tensor, target: torch.Tensor):
    """(entropy [N] in nats, NLL [N] of ``target`` [N]) of logits [N, V]."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1), -logp.gather(-1, target[:, None])[:, 0]


@dataclass
class OracleOptions:
    fractions: List[float]
    max_new_tokens: int = 64
    prefill_chunk: int = 512
    gap_every: int = 1                 # entropy-gap reruns at every n-th decode step (0: none)
    gap_batch: int = 64                # variants per rerun forward
    kvprec_policy: str = "attention_mass:keep={budget},high=int8,low=int4,every=1"
    block_size: int = 16
    policy: PolicyOptions = PolicyOptions()


@dataclass
class OracleSample:
    """Phase 1's results for one sample (arrays over S decode steps; n_pol = len(POLICY_NAMES), n_b budgets,
    R = layers * KV heads rows plus the aggregate row last)."""

    prompt_len: int
    tokens: np.ndarray           # int64 [P + S]: prompt, then the fed generated tokens
    targets: np.ndarray          # int64 [S]: x_{t+1}, the greedy choice at each step
    entropy: np.ndarray          # FP64 [S]
    nll: np.ndarray              # FP64 [S]
    prefill_entropy: float       # H_{P-1}: the distribution that chose the first generated token
    budget: np.ndarray           # int64 [S, n_b]: K(t)
    recall: np.ndarray           # FP32 [S, n_pol, n_b, R + 1]
    kept_ratio: np.ndarray       # FP32 [S, n_b]: kvprec kept positions / K, mean over rows
    gap_entropy: np.ndarray      # FP64 [S, n_pol, n_b, 2]: (restricted, restored); NaN where not run
    gap_nll: np.ndarray          # FP64 [S, n_pol, n_b, 2]
    gap_check: np.ndarray        # FP64 [S]: max |logits| difference of the unrestricted variant vs the oracle
    kvprec_entropy: np.ndarray   # FP64 [S, n_b]: entropy and NLL of x_{t+1} under kvprec's tiered cache
    kvprec_nll: np.ndarray
    kvprec_bytes: np.ndarray     # int64 [n_b]: the tiered caches' resident bytes at the end
    needed_in_sf: np.ndarray     # FP32 [S, n_b]: share of needed positions inside supporting facts (NaN: none)
    retained_sf: np.ndarray      # FP32 [S, n_pol, n_b]: share of supporting-fact positions retained
    seconds: Dict[str, float] = field(default_factory=dict)  # CPU seconds per part
    # kept in memory for phase 2 (kvprec/studies/recall/eviction.py), not saved
    prefill: Optional[PrefillStats] = None
    prefill_kv: Optional[list] = None     # per layer (K, V) [H_kv, P, D]
    rows: Optional[list] = None           # per step the oracle attention [R + 1, t + 1]


def _stack_rows(per_layer: List[torch.Tensor]) -> torch.Tensor:
    """Per-layer [H_kv, ...] -> [L * H_kv + 1, ...] with the aggregate (mean) row appended."""
    rows = torch.cat(per_layer)
    return torch.cat([rows, rows.mean(0, keepdim=True)])


@torch.no_grad()
def run_sample(model, prompt, opts: OracleOptions, eos: set, log=None) -> OracleSample:
    """Phase 1 for one encoded prompt (:class:`~kvprec.studies.recall.prompt.EncodedPrompt`)."""
    from transformers import DynamicCache

    from .prompt import position_mask
    from .tiering import TieringRun

    layers, _, hkv, _ = model_shape(model)
    rows_n = layers * hkv
    ids = prompt.ids
    p = int(ids.shape[0])
    cap = p + opts.max_new_tokens
    nb = len(opts.fractions)
    clock = {"oracle": 0.0, "kvprec": 0.0, "gap": 0.0, "simulate": 0.0}

    start = time.process_time()
    recorder = OracleRecorder(layers, hkv, max(opts.policy.snapkv_window, 1))
    cache = DynamicCache()
    with study_attention(model, recorder):
        for c in range(0, p, opts.prefill_chunk):
            out = model(input_ids=ids[None, c:c + opts.prefill_chunk].to(model.device), past_key_values=cache,
                        use_cache=True)
    logits = out.logits[0, -1].float().cpu()
    stats = PrefillStats(_stack_rows(recorder.colsum), torch.cat(recorder.last_rows, 1))
    stats.last_rows = torch.cat([stats.last_rows, stats.last_rows.mean(1, keepdim=True)], 1)
    prefill_kv = [(layer.keys[0, :, :p].clone(), layer.values[0, :, :p].clone()) for layer in cache.layers]  # device
    clock["oracle"] += time.process_time() - start

    start = time.process_time()
    tiering = TieringRun(model, opts.kvprec_policy, opts.fractions, opts.block_size)
    tiering.feed(ids)
    clock["kvprec"] += time.process_time() - start

    sims = {(name, bi): opts.policy.make(name, rows_n + 1, cap, b)
            for name in SIMULATED for bi, b in enumerate(opts.fractions)}
    for sim in sims.values():
        sim.start(stats)

    sf = position_mask(prompt.supporting, cap)
    has_sf = bool(sf.any())
    prefill_entropy = float(entropy_nll(logits[None], logits.argmax()[None])[0])
    tokens, targets, ent, nll, rows_kept, budgets = list(ids.tolist()), [], [], [], [], []
    rec, kept_ratio, gap_h, gap_n, check, k_ent, k_nll, need_sf, ret_sf = ([] for _ in range(9))
    for step in range(opts.max_new_tokens):
        x = int(logits.argmax())
        if x in eos:
            break
        t = len(tokens)
        tokens.append(x)
        x_t = torch.tensor([x])
        start = time.process_time()
        with study_attention(model, recorder):
            out = model(input_ids=x_t[None].to(model.device), past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1].float().cpu()
        a = _stack_rows(recorder.row)  # [R + 1, t + 1]
        target = logits.argmax()[None]
        h, n = entropy_nll(logits[None], target)
        clock["oracle"] += time.process_time() - start
        start = time.process_time()
        kv_logits = tiering.feed(x_t)
        kept = tiering.kept(t)  # [n_b, R, t]
        kh, kn = entropy_nll(kv_logits, target.expand(nb))
        clock["kvprec"] += time.process_time() - start

        start = time.process_time()
        ks = [budget_size(b, t) for b in opts.fractions]
        needed = [needed_set(a[:, :t], k) for k in ks]
        retained = {}
        for (name, bi), sim in sims.items():
            retained[name, bi] = sim.retained()
        for bi in range(nb):
            pad = torch.zeros(1, t, dtype=torch.bool)
            retained["kvprec", bi] = torch.cat([kept[bi], pad])
        r_step = torch.full((len(POLICY_NAMES), nb, rows_n + 1), float("nan"))
        s_step = torch.full((len(POLICY_NAMES), nb), float("nan"))
        for pi, name in enumerate(POLICY_NAMES):
            for bi, k in enumerate(ks):
                r = recall(needed[bi], retained[name, bi], k)
                if name == "kvprec":
                    r[-1] = float("nan")
                r_step[pi, bi] = r
                if has_sf:
                    hold = retained[name, bi][:rows_n]
                    s_step[pi, bi] = float((hold & sf[:t]).sum(-1).float().mean() / sf[:t].sum().clamp_min(1))
        rec.append(r_step)
        kept_ratio.append(torch.tensor([float(kept[bi].sum(-1).float().mean()) / k for bi, k in enumerate(ks)]))
        need_sf.append(torch.tensor([float((needed[bi][:rows_n] & sf[:t]).sum(-1).float().mean()) / k
                                     if has_sf else float("nan") for bi, k in enumerate(ks)]))
        ret_sf.append(s_step)
        clock["simulate"] += time.process_time() - start

        start = time.process_time()
        gh = torch.full((len(POLICY_NAMES), nb, 2), float("nan"), dtype=torch.float64)
        gn = gh.clone()
        diff = float("nan")
        if opts.gap_every and step % opts.gap_every == 0:
            variants = [torch.ones(rows_n, t, dtype=torch.bool)]
            for pi, name in enumerate(POLICY_NAMES):
                for bi in range(nb):
                    hold = retained[name, bi][:rows_n]
                    variants += [hold, hold | needed[bi][:rows_n]]
            vh, vn, vlogits0 = _rerun(model, cache, t, x, target, torch.stack(variants), layers, hkv,
                                      opts.gap_batch)
            diff = float((vlogits0 - logits).abs().max())
            gh[:] = vh[1:].reshape(len(POLICY_NAMES), nb, 2).double()
            gn[:] = vn[1:].reshape(len(POLICY_NAMES), nb, 2).double()
        gap_h.append(gh)
        gap_n.append(gn)
        check.append(diff)
        clock["gap"] += time.process_time() - start

        start = time.process_time()
        for sim in sims.values():
            sim.step(a)
        clock["simulate"] += time.process_time() - start
        rows_kept.append(a)
        targets.append(int(target))
        ent.append(float(h))
        nll.append(float(n))
        budgets.append(ks)
        k_ent.append(kh.double())
        k_nll.append(kn.double())
    if log is not None:
        log(f"  {len(targets)} steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in clock.items()))

    s = len(targets)
    stack = lambda xs, shape, dtype=np.float64: (  # noqa: E731
        torch.stack(xs).numpy() if xs else np.zeros((0,) + shape)).astype(dtype)
    npol = len(POLICY_NAMES)
    return OracleSample(
        prompt_len=p, tokens=np.array(tokens, dtype=np.int64), targets=np.array(targets, dtype=np.int64),
        entropy=np.array(ent), nll=np.array(nll), prefill_entropy=prefill_entropy,
        budget=np.array(budgets, dtype=np.int64).reshape(s, nb),
        recall=stack(rec, (npol, nb, rows_n + 1), np.float32), kept_ratio=stack(kept_ratio, (nb,), np.float32),
        gap_entropy=stack(gap_h, (npol, nb, 2)), gap_nll=stack(gap_n, (npol, nb, 2)), gap_check=np.array(check),
        kvprec_entropy=stack(k_ent, (nb,)), kvprec_nll=stack(k_nll, (nb,)),
        kvprec_bytes=np.array(tiering.resident_bytes(), dtype=np.int64),
        needed_in_sf=stack(need_sf, (nb,), np.float32), retained_sf=stack(ret_sf, (npol, nb), np.float32),
        seconds=clock, prefill=stats, prefill_kv=prefill_kv, rows=rows_kept)


def _rerun(model, cache, t: int, token: int, target: torch.Tensor, keep: torch.Tensor, layers: int, hkv: int,
           batch: int):
    """Run the step at position t again for each keep mask ``keep`` [V, L * H_kv, t] over the oracle's cached K/V
    of [0, t); returns (entropy [V], NLL [V] of ``target``, logits FP32 [V', vocab] of variant 0)."""
    shared_k = [layer.keys[0, :, :t] for layer in cache.layers]
    shared_v = [layer.values[0, :, :t] for layer in cache.layers]
    ents, nlls, first = [], [], None
    for lo in range(0, keep.shape[0], batch):
        part = keep[lo:lo + batch].reshape(-1, layers, hkv, t)
        rows = part.shape[0]
        current = torch.ones(rows, hkv, 1, dtype=torch.bool)
        masked = MaskedRows(shared_k, shared_v, lambda layer, s, part=part, current=current:
                            torch.cat([part[:, layer], current], -1))
        with study_attention(model, masked):
            logits = model(input_ids=torch.full((rows, 1), token, device=model.device),
                           position_ids=torch.full((rows, 1), t, device=model.device),
                           use_cache=False).logits[:, -1].float().cpu()
        h, n = entropy_nll(logits, target.expand(rows))
        ents.append(h)
        nlls.append(n)
        if first is None:
            first = logits[0]
    return torch.cat(ents), torch.cat(nlls), first
