"""The recall study: when do static KV eviction policies lose what the model needs, and does token entropy say so?

Per sample of multi-hop QA (kvprec/studies/recall/data.py; the prompt: kvprec/studies/recall/prompt.py):

1. phase 1, the oracle (kvprec/studies/recall/oracle.py): the model answers with the full cache, greedily; per
   decode step the token entropy, the needed set (top-K of the step's attention) and the recall of each policy's
   retained set (H2O, StreamingLLM, TOVA, SnapKV simulated; kvprec's tiering read as kept at INT8 and above), and
   the entropy gap (the step re-run restricted to the retained set and with the missed positions restored);
2. phase 2, once every sample has been through phase 1: caches that really evict, with and without
   entropy-triggered recall from a host shadow (kvprec/studies/recall/eviction.py), teacher-forced on the oracle's
   tokens. Every static policy runs at every budget; the recall rows (etr, random) run on the bases of
   ``etr_bases``, per budget: "best-nll", the simulated policy whose restricted re-runs of phase 1 (the entropy
   gap's) had the lowest mean NLL, the best static policy as far as phase 1 can tell; "best-recall", the one with
   the highest mean oracle recall; or a policy's name.

Raw arrays (raw.npz), N decode steps over all samples, M samples, n_pol policies, n_b budgets, R rows:

    budgets [n_b], policies [n_pol], entropy_edges, model_layers, model_kv_heads, model_head_dim, elem_bytes
    step_sample, step_index, step_position, token, target [N]; token_text [N] (str)
    entropy, nll [N]; budget_k [N, n_b]; recall FP32 [N, n_pol, n_b, R + 1]; kept_ratio [N, n_b]
    gap_entropy, gap_nll [N, n_pol, n_b, 2] (restricted, restored); gap_check [N]
    kvprec_entropy, kvprec_nll [N, n_b]; needed_in_sf [N, n_b]; retained_sf [N, n_pol, n_b]; sf_share [N]
    ev_row_fraction, ev_row_kind, ev_row_base [n_rows]: the evicting caches of phase 2
    ev_nll, ev_entropy, ev_recall, ev_triggered, ev_scanned_bytes, ev_moved_bytes [N, n_rows]
    ev_trigger_seconds, ev_step_seconds [N]
    sample_id, sample_source, sample_answers, sample_generated (str) [M]; sample_prompt_len, sample_steps,
    sample_truncated, sample_supporting_found, sample_supporting_missing [M]; sample_prefill_entropy [M];
    sample_kvprec_bytes [M, n_b]; sample_full_cache_bytes [M]; seconds_<phase> [M] (CPU seconds)
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from ...models.chat import CHAT_MODES
from ..platform.rundir import StudyInputError
from .eviction import EvictionOptions, default_rows, run_sample as evict_sample
from .oracle import POLICY_NAMES, SIMULATED, OracleOptions, run_sample as oracle_sample
from .policies import PolicyOptions

NAME = "recall"
SELECTORS = ("best-nll", "best-recall")


@dataclass
class RecallSettings:
    model: str = "tiny"
    dataset: str = "builtin"
    max_samples: Optional[int] = None
    budgets: List[float] = field(default_factory=lambda: [0.1, 0.2, 0.3])
    max_new_tokens: int = 40
    max_prompt_tokens: Optional[int] = 2048
    chat: str = "auto"
    prompt_style: str = "reason"
    entropy_bins: List[float] = field(default_factory=lambda: [1.0, 2.5])
    block_size: int = 16
    kvprec_policy: str = "attention_mass:keep={budget},high=int8,low=int4,every=1"
    h2o_recent: float = 0.5
    sinks: int = 4
    snapkv_window: int = 32
    snapkv_kernel: int = 5
    gap_every: int = 4
    etr_threshold: float = 2.5
    etr_fraction: float = 0.25
    etr_bases: List[str] = field(default_factory=lambda: ["best-nll", "best-recall"])
    bootstrap: int = 2000
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"

    def check(self) -> None:
        """StudyInputError (a ValueError) naming the setting as its command-line flag, for values the study cannot
        run with."""
        if not self.budgets or any(not 0.0 < b <= 1.0 for b in self.budgets) or len(set(self.budgets)) != len(
                self.budgets):
            raise StudyInputError(f"--budgets {self.budgets}: distinct fractions of the sequence in (0, 1], e.g. "
                                  "0.1,0.2,0.3")
        if len(self.entropy_bins) < 1 or list(self.entropy_bins) != sorted(set(self.entropy_bins)) or any(
                e < 0 for e in self.entropy_bins):
            raise StudyInputError(f"--entropy-bins {self.entropy_bins}: increasing edges in nats >= 0, e.g. 1.0,2.5")
        for flag, value, low in (("--max-new-tokens", self.max_new_tokens, 3), ("--block-size", self.block_size, 1),
                                 ("--snapkv-window", self.snapkv_window, 1), ("--bootstrap", self.bootstrap, 100),
                                 ("--gap-every", self.gap_every, 0), ("--sinks", self.sinks, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StudyInputError(f"{flag} {value}: a whole number >= {low}")
        if self.block_size & (self.block_size - 1):
            raise StudyInputError(f"--block-size {self.block_size}: a power of two")
        if self.snapkv_kernel < 1 or self.snapkv_kernel % 2 == 0:
            raise StudyInputError(f"--snapkv-kernel {self.snapkv_kernel}: an odd number >= 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise StudyInputError(f"--max-samples {self.max_samples}: a whole number >= 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 16:
            raise StudyInputError(f"--max-prompt-tokens {self.max_prompt_tokens}: at least 16")
        if not 0.0 <= self.h2o_recent < 1.0:
            raise StudyInputError(f"--h2o-recent {self.h2o_recent}: a fraction of the budget in [0, 1)")
        if not 0.0 < self.etr_fraction < 1.0:
            raise StudyInputError(f"--etr-fraction {self.etr_fraction}: a fraction of the budget in (0, 1)")
        if not self.etr_bases or any(b not in SIMULATED + SELECTORS for b in self.etr_bases) or len(
                set(self.etr_bases)) != len(self.etr_bases):
            raise StudyInputError(f"--etr-bases {self.etr_bases}: a comma list of {', '.join(SELECTORS + SIMULATED)}")
        if self.gap_every == 0 and "best-nll" in self.etr_bases:
            raise StudyInputError("--etr-bases best-nll needs the entropy gap's re-runs (--gap-every >= 1)")
        if self.chat not in CHAT_MODES:
            raise StudyInputError(f"--chat {self.chat!r}: {', '.join(CHAT_MODES[:-1])} or {CHAT_MODES[-1]}")
        if self.prompt_style not in ("reason", "answer"):
            raise StudyInputError(f"--prompt-style {self.prompt_style!r}: reason or answer")
        if not math.isfinite(self.etr_threshold) or self.etr_threshold < 0:
            raise StudyInputError(f"--etr-threshold {self.etr_threshold}: a finite number of nats >= 0")
        if "{budget}" not in self.kvprec_policy:
            raise StudyInputError(f"--kvprec-policy {self.kvprec_policy!r}: a kvprec policy string with {{budget}} "
                                  "where the budget fraction goes, e.g. "
                                  "attention_mass:keep={budget},high=int8,low=int4")
        from ...hf.policy import get

        try:
            get(self.kvprec_policy.format(budget=self.budgets[0]))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise StudyInputError(f"--kvprec-policy {self.kvprec_policy!r}: {exc}") from None


def eos_ids(loaded, tokenizer) -> set:
    """Token ids that end a generation: the tokenizer's and the generation config's EOS (none for the tiny model)."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def collect(settings: RecallSettings, loaded, tokenizer, progress) -> Dict[str, np.ndarray]:
    """Run both phases on every sample; returns the raw arrays (module docstring). ``loaded``: a
    kvprec.models.loading.LoadedModel; ``tokenizer``: its Hugging Face tokenizer (None for the tiny model);
    ``progress``: ``log(str)`` and ``bar(iterable, total=, desc=)``."""
    from .attention import check_model, model_shape
    from .data import load_dataset
    from .prompt import encode

    settings.check()
    model = loaded.model
    check_model(model)
    layers, _, kv_heads, head_dim = model_shape(model)
    samples = load_dataset(settings.dataset, settings.max_samples)
    prompts = [encode(s, tokenizer, chat=settings.chat, style=settings.prompt_style,
                      max_tokens=settings.max_prompt_tokens) for s in samples]
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p.ids) for p in prompts) + settings.max_new_tokens
    if limit is not None and longest > limit:
        raise StudyInputError(f"--max-prompt-tokens / --max-new-tokens: a sample needs {longest} positions, the model "
                         f"has {limit}")
    eos = eos_ids(loaded, tokenizer)
    common = dict(policy=PolicyOptions(settings.h2o_recent, settings.sinks, settings.snapkv_window,
                                       settings.snapkv_kernel))
    oopts = OracleOptions(fractions=list(settings.budgets), max_new_tokens=settings.max_new_tokens,
                          gap_every=settings.gap_every, kvprec_policy=settings.kvprec_policy,
                          block_size=settings.block_size, **common)
    elem = torch.tensor([], dtype=getattr(torch, settings.dtype)).element_size()
    steps: Dict[str, list] = {}
    per_sample: Dict[str, list] = {}

    def add(store, **arrays):
        for k, v in arrays.items():
            store.setdefault(k, []).append(v)

    runs = []
    for i, (sample, prompt) in enumerate(progress.bar(list(zip(samples, prompts)), total=len(samples),
                                                      desc="oracle")):
        progress.log(f"sample {i + 1}/{len(samples)} {sample.id}: {len(prompt.ids)} prompt tokens")
        o = oracle_sample(model, prompt, oopts, eos, log=progress.log)
        runs.append(o)
        s, p = len(o.targets), o.prompt_len
        positions = np.arange(p, p + s)
        sf = np.zeros(p + s, dtype=bool)
        for a, b in prompt.supporting:
            sf[a:b] = True
        past_sf = np.cumsum(sf)[positions - 1] if s else np.zeros(0)
        generated = loaded.decode([int(x) for x in o.tokens[p:]])
        add(steps, step_sample=np.full(s, i), step_index=np.arange(s), step_position=positions,
            token=o.tokens[p:], target=o.targets, entropy=o.entropy, nll=o.nll, budget_k=o.budget, recall=o.recall,
            kept_ratio=o.kept_ratio, gap_entropy=o.gap_entropy, gap_nll=o.gap_nll, gap_check=o.gap_check,
            kvprec_entropy=o.kvprec_entropy, kvprec_nll=o.kvprec_nll, needed_in_sf=o.needed_in_sf,
            retained_sf=o.retained_sf, sf_share=np.where(sf.any(), past_sf / positions, np.nan),
            token_text=np.array([loaded.decode([int(x)]) for x in o.tokens[p:]], dtype=str))
        add(per_sample, sample_id=sample.id, sample_source=sample.source, sample_answers=" | ".join(sample.answers),
            sample_generated=generated, sample_prompt_len=p, sample_steps=s, sample_truncated=prompt.truncated,
            sample_supporting_found=len(prompt.supporting), sample_supporting_missing=prompt.missing_supporting,
            sample_prefill_entropy=o.prefill_entropy, sample_kvprec_bytes=o.kvprec_bytes,
            sample_full_cache_bytes=(p + s) * layers * kv_heads * head_dim * 2 * elem,
            **{f"seconds_{k}": v for k, v in o.seconds.items()})
        progress.log(f"  answer: {generated[:160]!r}")

    # phase 2: the recall rows go on the bases asked for (module docstring)
    bases = {b: list(dict.fromkeys(choose_base(name, runs, bi) for name in settings.etr_bases))
             for bi, b in enumerate(settings.budgets)}
    rows = default_rows(list(settings.budgets), bases)
    eopts = EvictionOptions(rows=rows, threshold=settings.etr_threshold, recall_fraction=settings.etr_fraction,
                            **common)
    progress.log(f"eviction runs: {len(rows)} caches per step; recall rows on " + ", ".join(
        f"{'/'.join(v)} at {b:g}" for b, v in bases.items()))
    for i, o in enumerate(progress.bar(runs, total=len(runs), desc="eviction")):
        start = time.process_time()
        e = evict_sample(model, o, eopts, seed=settings.seed * 100003 + i)
        add(steps, ev_nll=e.nll, ev_entropy=e.entropy, ev_recall=e.recall, ev_triggered=e.triggered,
            ev_scanned_bytes=e.scanned_bytes, ev_moved_bytes=e.moved_bytes, ev_trigger_seconds=e.trigger_seconds,
            ev_step_seconds=e.step_seconds)
        add(per_sample, seconds_eviction=time.process_time() - start)
        o.rows = o.prefill_kv = o.prefill = None  # phase 2 was their last use
    raw = {k: np.concatenate(v) for k, v in steps.items()}
    raw.update({k: np.array(v) for k, v in per_sample.items()})
    raw.update(budgets=np.array(settings.budgets, dtype=np.float64), policies=np.array(POLICY_NAMES),
               entropy_edges=np.array(settings.entropy_bins, dtype=np.float64),
               ev_row_fraction=np.array([r.fraction for r in rows]), ev_row_kind=np.array([r.kind for r in rows]),
               ev_row_base=np.array([r.base for r in rows]), model_layers=np.array(layers),
               model_kv_heads=np.array(kv_heads), model_head_dim=np.array(head_dim), elem_bytes=np.array(elem))
    if raw["entropy"].size < 3:
        raise ValueError(f"the run decoded {raw['entropy'].size} steps; raise --max-new-tokens or --max-samples "
                         "(correlations need at least 3)")
    return raw


def choose_base(name: str, runs, budget_index: int) -> str:
    """The simulated policy ``name`` names at one budget: itself, or by phase 1's results over every sample,
    "best-nll" (lowest mean NLL of the restricted re-runs) or "best-recall" (highest mean recall over the rows)."""
    if name in SIMULATED:
        return name
    index = [POLICY_NAMES.index(p) for p in SIMULATED]
    if name == "best-recall":
        rec = np.concatenate([o.recall for o in runs]).astype(np.float64)[:, index, budget_index, :-1]
        return SIMULATED[int(np.argmax(rec.mean((0, 2))))]
    nll = np.concatenate([o.gap_nll for o in runs])[:, index, budget_index, 0]  # [N, 4]; NaN off the gap steps
    return SIMULATED[int(np.argmin(np.nanmean(nll, 0)))]


def settings_dict(settings: RecallSettings) -> dict:
    return asdict(settings)
