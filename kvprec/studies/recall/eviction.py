"""Phase 2 of the recall study, per sample: caches that really evict, and entropy-triggered recall (ETR).

Every row of one batched decode holds K(n) positions per (layer, KV head) on the "device" and attends only to
those (and the current position): past hidden states, queries and the policy's own attention statistics are those
of the evicting cache, not of the full one (phase 1's oracle approximation is lifted). All rows share the prompt's
K/V from the full prefill (a policy compresses the prompt after the prefill) and keep their own K/V of the decoded
positions; they are teacher-forced on the oracle's tokens, so their NLL of x_{t+1} (the oracle's greedy choice)
is the quality measure, at equal device memory: every row holds K(n) positions of K and V per (layer, KV head).

The rows (:class:`Row`: a budget fraction, a kind, a base policy), by default per budget fraction b every static
policy and, on the bases the study picks from phase 1 (kvprec/studies/recall/study.py ``choose_base``), the two
recall rows:

* ``static``: the base policy alone (h2o, streaming, tova, snapkv);
* ``etr`` (entropy-triggered recall): the base policy, and when the row's own previous next-token entropy
  H_{t-1} exceeds ``threshold`` nats, a recall before the step's attention. From the first trigger on the base
  policy keeps K(n) - r(n) positions (r(n) = ceil(f K(n)), f = ``recall_fraction``) and r(n) slots hold recalled
  positions. At a trigger, per layer and KV head, the host scores every position not in the base policy's set
  with the current query against the host shadow (all K/V ever appended; the full softmax over all positions, as
  exact scoring of the shadow gives) and the r(n) highest become the recall set until the next trigger. Cost per
  trigger, per layer and KV head: the query to the host (g D elements), the shadow keys scored
  ((t - |device set|) D elements) and the K and V of positions that enter the device (2 D each), in the
  cache dtype; the host time of scoring and selection is measured;
* ``random``: the same mechanism triggered at random steps, exactly as many per sample as the ``etr`` row of the same
  budget and base fired (a second batched pass after the first, which runs every other row), at steps drawn with
  the study's seed: does the entropy's timing matter, or only recalling that often?

Recall of a row at step t is against the oracle's needed set of that step (top-K of the full cache's attention).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

from .attention import MaskedRows, model_shape, study_attention
from .oracle import SIMULATED, OracleSample, entropy_nll
from .policies import PolicyOptions, PrefillStats
from .recall import budget_size, needed_set

KINDS = ("static", "etr", "random")


@dataclass(frozen=True)
class Row:
    """One evicting cache of the batch: budget fraction ``fraction``, ``kind`` (one of KINDS), ``base`` policy."""

    fraction: float
    kind: str
    base: str


def default_rows(fractions: List[float], etr_bases: Dict[float, List[str]]) -> List[Row]:
    """Every static policy at every budget, and the etr and random rows on ``etr_bases[b]`` at budget b."""
    rows = [Row(b, "static", base) for b in fractions for base in SIMULATED]
    for b in fractions:
        rows += [Row(b, kind, base) for base in etr_bases[b] for kind in ("etr", "random")]
    return rows


@dataclass
class EvictionOptions:
    rows: List[Row]
    threshold: float = 2.5
    recall_fraction: float = 0.25
    policy: PolicyOptions = PolicyOptions()


@dataclass
class EvictionSample:
    """Arrays [S, n_rows] over the sample's S decode steps (rows as in EvictionOptions.rows)."""

    nll: np.ndarray
    entropy: np.ndarray
    recall: np.ndarray          # mean over (layer, KV head) rows
    triggered: np.ndarray       # bool
    scanned_bytes: np.ndarray   # int64: shadow keys scored + query sent, summed over layers and KV heads
    moved_bytes: np.ndarray     # int64: K and V of recalled positions that entered the device
    trigger_seconds: np.ndarray  # FP64 [S]: host CPU time of scoring and selection, all triggered rows of the step
    step_seconds: np.ndarray     # FP64 [S]: CPU time of the whole batched step (both passes)


def _recall_count(fraction: float, recall_fraction: float, n: int) -> int:
    return max(1, math.ceil(round(recall_fraction * budget_size(fraction, n), 9)))


def run_sample(model, o: OracleSample, opts: EvictionOptions, seed: int) -> EvictionSample:
    """Every row of ``opts.rows`` on one sample: the random rows in a second pass, firing as often as their etr row
    fired in the first, at steps drawn from ``seed``."""
    spec = opts.rows
    if any(r.kind not in KINDS or r.base not in SIMULATED for r in spec):
        raise ValueError(f"eviction rows: kinds {KINDS}, bases {SIMULATED}; got {spec}")
    first = [i for i, r in enumerate(spec) if r.kind != "random"]
    second = [i for i, r in enumerate(spec) if r.kind == "random"]
    a = _run_rows(model, o, [spec[i] for i in first], opts, {})
    steps = len(o.targets)
    rng = np.random.default_rng(seed)
    draws = {}
    for j, i in enumerate(second):
        twin = [k for k, r in enumerate(spec[x] for x in first) if r == Row(spec[i].fraction, "etr", spec[i].base)]
        if not twin:
            raise ValueError(f"eviction rows: the random row {spec[i]} has no etr row of the same budget and base")
        count = int(a.triggered[:, twin[0]].sum())
        draws[j] = set(rng.choice(steps, size=count, replace=False).tolist()) if count else set()
    b = _run_rows(model, o, [spec[i] for i in second], opts, draws) if second else None
    merged = {}
    for name in ("nll", "entropy", "recall", "triggered", "scanned_bytes", "moved_bytes"):
        x = getattr(a, name)
        full = np.zeros((steps, len(spec)), dtype=x.dtype)
        full[:, first] = x
        if b is not None:
            full[:, second] = getattr(b, name)
        merged[name] = full
    extra = (lambda name: getattr(b, name)) if b is not None else (lambda name: 0.0)
    return EvictionSample(**merged, trigger_seconds=a.trigger_seconds + extra("trigger_seconds"),
                          step_seconds=a.step_seconds + extra("step_seconds"))


@torch.no_grad()
def _run_rows(model, o: OracleSample, spec: List[Row], opts: EvictionOptions, random_steps: Dict[int, set]
              ) -> EvictionSample:
    """One batched teacher-forced pass of the rows ``spec``; a random row i fires at the steps ``random_steps[i]``."""
    layers, hq, hkv, d = model_shape(model)
    rows_n, g = layers * hkv, hq // hkv
    p, steps = o.prompt_len, len(o.targets)
    cap = p + steps
    n = len(spec)
    stats = PrefillStats(o.prefill.colsum[:rows_n], o.prefill.last_rows[:, :rows_n])
    sims = []
    for row in spec:
        sim = opts.policy.make(row.base, rows_n, cap, row.fraction)
        sim.start(stats)
        sims.append(sim)
    recall_set = torch.zeros(n, rows_n, cap, dtype=torch.bool)
    active = [False] * n
    elem = o.prefill_kv[0][0].element_size()

    prev_entropy = torch.full((n,), o.prefill_entropy, dtype=torch.float64)

    out = {k: np.zeros((steps, n)) for k in ("nll", "entropy", "recall")}
    trig = np.zeros((steps, n), dtype=bool)
    scanned = np.zeros((steps, n), dtype=np.int64)
    moved = np.zeros_like(scanned)
    trig_sec, step_sec = np.zeros(steps), np.zeros(steps)
    masked = MaskedRows([kv[0] for kv in o.prefill_kv], [kv[1] for kv in o.prefill_kv], None, own=True)
    fractions = sorted({row.fraction for row in spec})

    for s in range(steps):
        t = p + s
        begin = time.process_time()
        fire = [i for i, row in enumerate(spec) if (row.kind == "etr" and float(prev_entropy[i]) > opts.threshold)
                or (row.kind == "random" and s in random_steps[i])]
        for i in fire:
            if not active[i]:  # the base policy gives up r(n) of its positions to the recall slots
                f = spec[i].fraction
                sims[i].reserve = lambda m, f=f: _recall_count(f, opts.recall_fraction, m)
                sims[i].shrink()
                active[i] = True
        core = torch.stack([sim.held[:, :t] for sim in sims])  # [N, R, t]
        spent = [0.0]

        def keep(layer: int, logits: torch.Tensor) -> torch.Tensor:
            rows = slice(layer * hkv, (layer + 1) * hkv)
            if fire:
                tick = time.process_time()
                for i in fire:
                    c, old = core[i, rows], recall_set[i, rows, :t]
                    r = _recall_count(spec[i].fraction, opts.recall_fraction, t)
                    probs = torch.softmax(logits[i], -1).mean(1)[:, :t].cpu()  # [H_kv, t]: every position scored
                    candidates = ~c
                    r = min(r, int(candidates.sum(-1).min()))
                    new = torch.zeros_like(c)
                    if r > 0:
                        new.scatter_(-1, torch.topk(probs.masked_fill(c, -1.0), r, -1).indices, True)
                    new &= candidates
                    on_host = int((~(c | old)).sum())
                    scanned[s, i] += (on_host * d + hkv * g * d) * elem
                    moved[s, i] += int((new & ~old).sum()) * 2 * d * elem
                    recall_set[i, rows, :t] = new
                spent[0] += time.process_time() - tick
            held = core[:, rows] | recall_set[:, rows, :t]
            return torch.cat([held, torch.ones(n, hkv, 1, dtype=torch.bool)], -1)

        masked.keep = keep
        token = int(o.tokens[t])
        with study_attention(model, masked):
            logits = model(input_ids=torch.full((n, 1), token, device=model.device),
                           position_ids=torch.full((n, 1), t, device=model.device),
                           use_cache=False).logits[:, -1].float().cpu()
        h, nll = entropy_nll(logits, torch.full((n,), int(o.targets[s])))
        prev_entropy = h.double()
        used = core | recall_set[:, :, :t]  # [N, R, t]: what each row's query attended (with t)
        a = o.rows[s][:rows_n, :t]
        needed = {b: needed_set(a, budget_size(b, t)) for b in fractions}
        probs = torch.cat([masked.probs[layer] for layer in range(layers)], 1)  # [N, R, t + 1]
        for i, sim in enumerate(sims):
            k = budget_size(spec[i].fraction, t)
            out["recall"][s, i] = float((needed[spec[i].fraction] & used[i]).sum(-1).float().mean()) / k
            out["nll"][s, i], out["entropy"][s, i] = float(nll[i]), float(h[i])
            trig[s, i] = i in fire
            visible = torch.cat([used[i], torch.ones(rows_n, 1, dtype=torch.bool)], -1)
            sim.step(probs[i], visible)
        trig_sec[s], step_sec[s] = spent[0], time.process_time() - begin
    return EvictionSample(out["nll"], out["entropy"], out["recall"], trig, scanned, moved, trig_sec, step_sec)
