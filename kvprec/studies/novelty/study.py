"""The KV novelty study (``kvprec study novelty``): is the information the K/V cache receives sparse, bursty and
structured in time, and does novelty mark what matters?

Collection, per model and prompt (kvprec/studies/platform/inputs.py: a built-in prompt type, the suite, --text or
--dataset): the model generates up to ``max_tokens`` tokens (temperature T, seeded; greedy at T = 0) through an FP32
AdaptiveCache (lossless: the model's own behaviour) with the capture layer attached (kvprec/studies/platform/
capture.py), which records the true post-RoPE K and V of every chosen layer as the cache receives them and, per step,
the log-probability of the chosen token and the entropy of the next-token distribution. Then:

* geometric novelty of every position t >= window, per captured layer (``--layer``; default: all layers of a model
  with at most DEFAULT_LAYERS, else that many evenly spaced) and KV head, for keys and values, against the window of
  the ``window`` positions before it (kvprec.analysis.novelty.sliding_novelty): cosine distance and L2 distance from
  the window mean, the residual outside the window's top-``rank`` subspace (the novelty op: the Triton kernel where
  it runs, the reference elsewhere), and the Mahalanobis distance under a Ledoit-Wolf shrinkage covariance;
* the causal ablation (kvprec/studies/novelty/ablation.py) on the generated text, ranking blocks by the chosen
  metric.

raw.npz holds per run r: ``r{r}_tokens`` [N], ``r{r}_prompt_length``, ``r{r}_token_text`` [N] (each token decoded
alone), ``r{r}_prompt_text``, ``r{r}_generated_text``, ``r{r}_logprob`` / ``r{r}_entropy`` [N - prompt] (token p
scored at index p - prompt), ``r{r}_{key|value}_{cosine|l2|residual|mahalanobis}`` [L, H, N - 1] (position t's K/V;
NaN for t < window; the last token is never fed, so it has none), ``r{r}_layers`` [L] (model layer of each row),
``r{r}_abl_*`` (the ablation, or ``r{r}_abl_skipped``: why not), with ``--save-kv`` also ``r{r}_keys`` /
``r{r}_values`` [L, H, N - 1, D] float16; and per run ``runs_model``, ``runs_type``, ``runs_source``, ``models``.
analysis.json, report.md, plots/ and generated.txt follow from raw.npz alone (kvprec/studies/novelty/analysis.py,
report.py, plots.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from ...analysis.novelty import SERIES_METRICS, sliding_novelty
from ..platform.capture import Capture, CaptureSpec
from ..platform.inputs import PROMPT_SUITE, check_device, load_model, prompt_ids, select_prompts
from ..platform.progress import QUIET, Progress
from ..platform.rundir import Study, StudyInputError, check_out, run_config, write_run
from . import ablation
from .analysis import analyze
from .plots import make_plots
from .report import generated_text, render_report

#: the model ``--model`` defaults to
DEFAULT_MODEL = "smollm2-135m"
KINDS = ("key", "value")
METRICS = tuple(f"{k}_{m}" for k in KINDS for m in SERIES_METRICS)


@dataclass
class NoveltyConfig:
    models: List[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    prompt_types: List[str] = field(default_factory=list)   # built-in types; none of the sources given: "prose"
    suite: bool = False
    text: Optional[str] = None
    dataset: Optional[str] = None
    dataset_limit: Optional[int] = None
    max_prompt_tokens: int = 512
    max_tokens: int = 160
    temperature: float = 0.7
    seed: int = 0
    block_size: int = 16
    window: int = 32
    rank: int = 8
    metric: str = "key_residual"
    layers: Optional[List[int]] = None
    spike_window: int = 32
    spike_threshold: float = 3.5
    bin_size: int = 16
    max_lag: int = 10
    null_reps: int = 2000
    ablation: bool = True
    ablation_fractions: List[float] = field(default_factory=lambda: [0.1, 0.25])
    ablation_random: int = 3
    ablation_tier: str = "int2"
    save_kv: bool = False
    dtype: str = "float32"
    device: str = "cpu"


def _whole(flag: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise StudyInputError(f"{flag} {value}: use a whole number >= {low}")


def validate(cfg: NoveltyConfig) -> None:
    """Refuse settings the study cannot run, naming the argument, before anything is loaded or created."""
    from ...storage.formats import Tier

    if not cfg.models:
        raise StudyInputError("--model: give at least one model")
    if len(set(cfg.models)) != len(cfg.models):
        raise StudyInputError(f"--model: {cfg.models} names a model twice")
    select_prompts(prompt_types=cfg.prompt_types, suite=cfg.suite, text=cfg.text, dataset=cfg.dataset,
                   dataset_limit=cfg.dataset_limit)
    for flag, value in (("--max-tokens", cfg.max_tokens), ("--max-prompt-tokens", cfg.max_prompt_tokens),
                        ("--window", cfg.window), ("--rank", cfg.rank), ("--spike-window", cfg.spike_window),
                        ("--bin-size", cfg.bin_size), ("--max-lag", cfg.max_lag), ("--null-reps", cfg.null_reps)):
        _whole(flag, value)
    _whole("--ablation-random", cfg.ablation_random, 0)
    if cfg.dataset_limit is not None:
        _whole("--dataset-limit", cfg.dataset_limit)
    t = cfg.block_size
    if isinstance(t, bool) or not isinstance(t, int) or t < 1 or t & (t - 1):
        raise StudyInputError(f"--block-size {t}: use a power of two >= 1 (e.g. 16)")
    if cfg.rank > cfg.window:
        raise StudyInputError(f"--rank {cfg.rank}: at most --window ({cfg.window})")
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        raise StudyInputError(f"--temperature {cfg.temperature}: use a number >= 0 (0: greedy)")
    if not (math.isfinite(cfg.spike_threshold) and cfg.spike_threshold > 0):
        raise StudyInputError(f"--spike-threshold {cfg.spike_threshold}: use a number > 0")
    if cfg.metric not in METRICS:
        raise StudyInputError(f"--metric {cfg.metric}: use one of {', '.join(METRICS)}")
    for f in cfg.ablation_fractions:
        if not (0 < f < 1):
            raise StudyInputError(f"--ablation-fraction {f}: use a fraction in (0, 1)")
    try:
        tier = Tier.parse(cfg.ablation_tier)
    except ValueError as exc:
        raise StudyInputError(f"--ablation-tier: {exc}") from None
    if tier == Tier.FP32:
        raise StudyInputError("--ablation-tier fp32: the ablation needs a lossy tier (e.g. int2, int4)")
    if cfg.layers is not None:
        if not cfg.layers:
            raise StudyInputError("--layer: give at least one layer index")
        for i in cfg.layers:
            _whole("--layer", i, 0)
    if cfg.dtype not in ("float32", "float16", "bfloat16"):
        raise StudyInputError(f"--dtype {cfg.dtype}: use float32, float16 or bfloat16")
    check_device(cfg.device)


#: without --layer, at most this many layers are captured, evenly spaced from the first to the last: the novelty
#: metrics cost one SVD and one W x W solve per (layer, head, position, K or V), which dominates on a CPU
DEFAULT_LAYERS = 12


def default_layers(n_layers: int) -> List[int]:
    """All layers of a model with at most DEFAULT_LAYERS, else DEFAULT_LAYERS evenly spaced, first and last included."""
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(n_layers, DEFAULT_LAYERS))})


def prompts_of(cfg: NoveltyConfig):
    types = cfg.prompt_types or ([] if (cfg.suite or cfg.text or cfg.dataset) else ["prose"])
    return select_prompts(prompt_types=types, suite=cfg.suite, text=cfg.text, dataset=cfg.dataset,
                          dataset_limit=cfg.dataset_limit)


# ---------------------------------------------------------------------------------------------------------
# Collection

def _generate(loaded, ids: List[int], cfg: NoveltyConfig, seed: int, progress: Progress):
    """Generate through an FP32 AdaptiveCache with the capture attached; returns the CaptureRecord."""
    from transformers import LogitsProcessor

    from ...hf.cache import AdaptiveCache, text_config

    model = loaded.model
    capture = Capture(CaptureSpec(layers=cfg.layers or default_layers(text_config(model.config).num_hidden_layers),
                                  keys=True, values=True, dtype="float32"))
    cache = capture.attach(AdaptiveCache(model.config, policy="uniform:fp32", block_size=cfg.block_size,
                                         evict_sliding=False))
    bar = progress.counter(cfg.max_tokens, desc="generate")

    class Tick(LogitsProcessor):
        def __call__(self, input_ids, scores):
            bar.update(1)
            return scores

    kwargs = dict(max_new_tokens=cfg.max_tokens, logits_processor=[Tick()])
    if cfg.temperature > 0:
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        kwargs["pad_token_id"] = getattr(model.generation_config, "eos_token_id", None) or 0
    torch.manual_seed(seed)
    try:
        return capture.generate(model, torch.tensor([ids]), cache, **kwargs)
    finally:
        bar.close()


def _novelty(rec, cfg: NoveltyConfig) -> Dict[str, np.ndarray]:
    """{kind_metric: [L, H, T] float32} over the captured positions (sliding_novelty per kind)."""
    out = {}
    for kind, store in (("key", rec.keys), ("value", rec.values)):
        x = torch.from_numpy(np.stack([np.asarray(store[i])[:, 0] for i in rec.layers]))   # [L, T, H, D]
        l, t, h, d = x.shape
        series = sliding_novelty(x.permute(0, 2, 1, 3).reshape(l * h, t, d).contiguous(), cfg.window,
                                 min(cfg.rank, d))
        for m, v in series.items():
            out[f"{kind}_{m}"] = v.reshape(l, h, t).numpy().astype(np.float32)
    return out


def collect_run(cfg: NoveltyConfig, progress: Progress = QUIET, loaded_models: Optional[Dict[str, object]] = None):
    """(raw arrays, config.json's content) of a run (module docstring). ``loaded_models``: name -> LoadedModel to
    use instead of loading (tests)."""
    from ...hf.cache import text_config

    validate(cfg)
    prompts = prompts_of(cfg)
    raw: Dict[str, np.ndarray] = {}
    runs_model, runs_type, runs_source, model_info = [], [], [], []
    r = 0
    for mi, name in enumerate(cfg.models):
        progress.log(f"model {name}: loading")
        loaded = (loaded_models or {}).get(name) or load_model(name, cfg.dtype, cfg.device)
        n_layers = int(text_config(loaded.model.config).num_hidden_layers)
        if cfg.layers is not None and max(cfg.layers) >= n_layers:
            raise StudyInputError(f"--layer {max(cfg.layers)}: model {name} has layers 0-{n_layers - 1}")
        model_info.append({"argument": name, "name": loaded.name, "layers": n_layers,
                           "chat_template": bool(getattr(getattr(loaded, "tokenizer", None), "chat_template", None))})
        for prompt in prompts:
            ids = prompt_ids(loaded, prompt.text, max_tokens=cfg.max_prompt_tokens)
            start = time.perf_counter()
            rec = _generate(loaded, ids, cfg, cfg.seed + r, progress)
            seconds = time.perf_counter() - start
            tokens = rec.tokens[0]
            n_new = len(tokens) - len(ids)
            progress.log(f"run {r} ({name}, {prompt.type}): {len(ids)} prompt + {n_new} generated tokens "
                         f"({seconds:.1f} s, {n_new / max(seconds, 1e-9):.1f} tokens/s); novelty metrics")
            nov = _novelty(rec, cfg)
            pre = f"r{r}_"
            raw.update({pre + "tokens": tokens, pre + "prompt_length": np.array(len(ids)),
                        pre + "token_text": np.array([loaded.decode([int(x)]) for x in tokens]),
                        pre + "prompt_text": np.array(loaded.decode(tokens[:len(ids)].tolist())),
                        pre + "generated_text": np.array(loaded.decode(tokens[len(ids):].tolist())),
                        pre + "logprob": rec.logprob[0], pre + "entropy": rec.entropy[0],
                        pre + "layers": np.array(rec.layers, dtype=np.int64), pre + "seconds": np.array(seconds)})
            raw.update({pre + k: v for k, v in nov.items()})
            if cfg.save_kv:
                for kind, store in (("keys", rec.keys), ("values", rec.values)):
                    raw[pre + kind] = np.stack([np.asarray(store[i])[:, 0].transpose(1, 0, 2)
                                                for i in rec.layers]).astype(np.float16)
            raw.update({pre + k: v for k, v in _ablate(loaded.model, rec, nov, cfg, r, progress).items()})
            runs_model.append(mi)
            runs_type.append(prompt.type)
            runs_source.append(prompt.source)
            r += 1
    raw.update({"models": np.array([m["name"] for m in model_info]), "runs_model": np.array(runs_model),
                "runs_type": np.array(runs_type), "runs_source": np.array(runs_source)})
    settings = asdict(cfg)
    config = run_config("novelty", settings, model={"models": model_info},
                        data={"prompts": [{"type": p.type, "source": p.source, "text": p.text} for p in prompts]},
                        seeds={"generation": [cfg.seed + i for i in range(r)], "ablation": cfg.seed})
    return raw, config


def _ablate(model, rec, nov: Dict[str, np.ndarray], cfg: NoveltyConfig, r: int, progress: Progress):
    """The ablation arrays of one run (``abl_*``), or ``abl_skipped`` with the reason."""
    if not cfg.ablation:
        return {"abl_skipped": np.array("disabled (--no-ablation)")}
    tokens = rec.tokens[0]
    sp = ablation.split(len(tokens), rec.prompt_length, cfg.block_size, cfg.window)
    if sp is None:
        return {"abl_skipped": np.array(f"too short: {len(tokens)} tokens after a prompt of {rec.prompt_length} leave "
                                        f"no candidate block of {cfg.block_size} at positions >= {cfg.window} "
                                        "before the middle of the generated text")}
    scores = ablation.block_novelty(nov[cfg.metric], sp, cfg.block_size)
    conds = ablation.conditions(scores, cfg.ablation_fractions, cfg.ablation_random, cfg.seed + r)
    progress.log(f"run {r}: ablation of the prefix [0, {sp.prefix}) ({len(conds) + 1} teacher-forced passes of "
                 f"{len(tokens) - sp.prefix} tokens)")
    return ablation.measure(model, torch.from_numpy(tokens), sp, conds, rec.layers, cfg.block_size,
                            cfg.ablation_tier, progress)


STUDY = Study("novelty", analyze, render_report, make_plots, generated_text)


def run(cfg: NoveltyConfig, out_dir, progress: Progress = QUIET, force: bool = False,
        loaded_models: Optional[Dict[str, object]] = None) -> dict:
    """Collect and write the run directory ``out_dir`` (atomically); returns analysis.json's content."""
    validate(cfg)
    check_out(out_dir, force=force)
    raw, config = collect_run(cfg, progress, loaded_models)
    return write_run(STUDY, out_dir, config, raw, force=force)


__all__ = ["NoveltyConfig", "STUDY", "validate", "collect_run", "run", "METRICS", "PROMPT_SUITE", "DEFAULT_MODEL"]
