"""``kvprec study injection``: how many tokens a model needs to adapt when new context is written into its KV cache
in the middle of generation, and how close it gets to a model that had the new context from the start.

Per problem (kvprec/studies/injection/data.py), every condition runs in one batched cache
(kvprec/studies/injection/trial.py): baseline, oracle, the injected span spliced in after N generated tokens at each
tier, the noise controls. raw.npz holds the per-step measurements of every (problem, condition); analysis.json the
derived measures (kvprec/studies/injection/derived.py) and the paired statistics across problems and injection
points (kvprec/studies/injection/stats.py), computed from raw.npz and config.json alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ...storage.formats import Tier
from ..platform.inputs import check_device, load_model
from ..platform.progress import Progress
from ..platform.rundir import Study, StudyInputError, run_config
from .data import ProblemSet, read_problems, take
from .layout import check_windows
from .prompt import NOISE_KINDS, build_prompt
from .trial import CacheSettings, PromptMemo, plan_rows, run_problems

BUILTIN = {"builtin-math": 500, "builtin-qa": 300}
KEY_ROTATIONS = ("none", "hadamard", "orthogonal")


@dataclass
class Settings:
    """The command's arguments (kvprec/studies/injection/command.py), checked by :func:`validate`."""

    model: str = "smollm2-135m"
    dataset: str = "builtin-math"
    problems: Optional[int] = 100
    injection_points: List[int] = field(default_factory=lambda: [5, 10, 15])
    tiers: List[str] = field(default_factory=lambda: ["fp32", "int8", "int4", "int2"])
    noise: List[str] = field(default_factory=lambda: ["shuffled"])
    max_new_tokens: int = 40
    block_size: int = 16
    key_rotation: str = "hadamard"
    seed: int = 0
    smooth: int = 3
    band_halfwidth: int = 1
    adapt_fraction: float = 0.5
    final_window: int = 5
    converged_kl: float = 0.1
    bootstrap: int = 2000
    batch_problems: int = 3
    device: str = "cpu"


def validate(s: Settings) -> None:
    """StudyInputError naming the argument for anything the study cannot run with."""
    if s.problems is not None and s.problems < 1:
        raise StudyInputError(f"--problems {s.problems}: use a whole number >= 1")
    if s.max_new_tokens < 2:
        raise StudyInputError(f"--max-new-tokens {s.max_new_tokens}: use at least 2")
    points = s.injection_points
    if not points or len(set(points)) != len(points) or min(points) < 0 or max(points) >= s.max_new_tokens - 1:
        raise StudyInputError(f"--injection-points {','.join(map(str, points))}: give distinct whole numbers from 0 to "
                              f"--max-new-tokens - 2 = {s.max_new_tokens - 2} (generated tokens before the splice)")
    s.injection_points = sorted(points)
    for tier in s.tiers:
        try:
            Tier.parse(tier)
        except ValueError:
            raise StudyInputError(f"--tiers {tier}: use tiers from {', '.join(str(t) for t in Tier)}") from None
    if not s.tiers or len(set(s.tiers)) != len(s.tiers):
        raise StudyInputError("--tiers: give one or more distinct tiers, e.g. fp32,int8,int4,int2")
    if not s.noise or any(k not in NOISE_KINDS for k in s.noise) or len(set(s.noise)) != len(s.noise):
        raise StudyInputError(f"--noise {','.join(s.noise)}: give one or more of {', '.join(NOISE_KINDS)}")
    if s.block_size < 1 or s.block_size & (s.block_size - 1):
        raise StudyInputError(f"--block-size {s.block_size}: use a power of two")
    if s.key_rotation not in KEY_ROTATIONS:
        raise StudyInputError(f"--key-rotation {s.key_rotation}: use one of {', '.join(KEY_ROTATIONS)}")
    for name, value, low in (("--smooth", s.smooth, 1), ("--band-halfwidth", s.band_halfwidth, 0),
                             ("--final-window", s.final_window, 1), ("--bootstrap", s.bootstrap, 100),
                             ("--batch-problems", s.batch_problems, 1)):
        if value < low:
            raise StudyInputError(f"{name} {value}: use a whole number >= {low}")
    if not 0 < s.adapt_fraction <= 1:
        raise StudyInputError(f"--adapt-fraction {s.adapt_fraction}: use a number in (0, 1]")
    if not s.converged_kl > 0:
        raise StudyInputError(f"--converged-kl {s.converged_kl}: use a number > 0 (nats)")
    check_device(s.device)
    problem_set(s)  # a missing or malformed --dataset is refused before the model loads


def problem_set(s: Settings) -> ProblemSet:
    """The problems of ``--dataset`` (the first ``--problems``)."""
    if s.dataset in BUILTIN:
        n = max(BUILTIN[s.dataset], s.problems or 0)
        if s.dataset == "builtin-math":
            from .math_problems import math_problems

            return take(math_problems(n, seed=s.seed), s.problems)
        from .qa_problems import qa_problems

        return take(qa_problems(n, seed=s.seed), s.problems)
    return read_problems(s.dataset, s.problems)


def _eos_ids(loaded) -> List[int]:
    ids = set()
    for source in (getattr(loaded.model, "generation_config", None), getattr(loaded, "tokenizer", None)):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else list(value or []))
    return sorted(ids)


def collect(s: Settings, progress: Progress):
    """Run every problem (module docstring); returns (raw arrays, config.json's content)."""
    import torch

    problems = problem_set(s)
    progress.log(f"loading {s.model}")
    loaded = load_model(s.model, "float32", s.device)
    model = loaded.model
    rows = plan_rows(s.injection_points, s.tiers, s.noise)
    cs = CacheSettings(block_size=s.block_size, key_rotation=None if s.key_rotation == "none" else s.key_rotation,
                       rotation_seed=s.seed)
    eos = _eos_ids(loaded)
    memo = PromptMemo()
    per_problem: Dict[str, list] = {}
    replies, token_text = [], []
    progress.log(f"{len(problems.problems)} problems x {len(rows)} conditions, {s.max_new_tokens} tokens each")
    groups = _groups(loaded, problems, s)
    for group in progress.bar(groups, total=len(groups), desc=f"batches of {s.batch_problems} problems"):
        longest = max(len(ids) for parts in group for ids in parts.spans.values())
        try:
            check_windows(model.config, len(group[0].pre) + 2 * s.block_size + longest + s.max_new_tokens)
        except ValueError as exc:
            raise StudyInputError(f"--model {s.model}: {exc}") from None
        with torch.no_grad():
            outs = run_problems(model, group, rows, cs, s.max_new_tokens, eos, memo)
        for parts, out in zip(group, outs):
            for name, value in out.items():
                per_problem.setdefault(name, []).append(value)
            replies.append([_reply(loaded, row, eos) for row in out["tokens"]])
            token_text.append([[loaded.decode([int(t)]) if t >= 0 else "" for t in row] for row in out["tokens"]])
            per_problem.setdefault("pre_len", []).append(len(parts.pre))
    raw = {name: np.stack(values) for name, values in per_problem.items()}
    raw.update(_problem_arrays(problems))
    raw["reply"] = np.array(replies, dtype=str)
    raw["token_text"] = np.array(token_text, dtype=str)
    raw["row_condition"] = np.array([r.condition for r in rows])
    raw["row_point"] = np.array([r.point for r in rows], np.int32)
    raw["row_tier"] = np.array([r.tier for r in rows])
    settings = asdict(s)
    config = run_config("injection", settings, model={"name": s.model, "dtype": "float32", "device": s.device,
                                                      "model_type": getattr(model.config, "model_type", None),
                                                      "torch_threads": torch.get_num_threads(),
                                                      "layers": len(raw["cosine"][0, 0, 0]) - 1},
                        data={"dataset": s.dataset, "kind": problems.kind, "problems": len(problems.problems),
                              "instruction": problems.instruction,
                              "examples": [{"question": q, "reply": r} for q, r in problems.examples]},
                        seeds={"seed": s.seed, "noise": "seed * 1000003 + problem index", "bootstrap": s.seed})
    return raw, config


def _groups(loaded, problems: ProblemSet, s: Settings) -> List[list]:
    """The problems' PromptParts in batches of up to ``batch_problems`` consecutive problems sharing the prompt
    before the span (kvprec/studies/injection/trial.py: run_problems)."""
    groups: List[list] = []
    for index, problem in enumerate(problems.problems):
        parts = build_prompt(loaded, problems, problem, s.noise, seed=s.seed * 1_000_003 + index)
        if groups and len(groups[-1]) < s.batch_problems and groups[-1][0].pre == parts.pre:
            groups[-1].append(parts)
        else:
            groups.append([parts])
    return groups


def _reply(loaded, tokens, eos: List[int]) -> str:
    ids = [int(t) for t in tokens if t >= 0]
    if ids and ids[-1] in eos:
        ids = ids[:-1]
    return loaded.decode(ids)


def _problem_arrays(problems: ProblemSet) -> Dict[str, np.ndarray]:
    ps = problems.problems
    return {"problem_id": np.array([p.id for p in ps]), "category": np.array([p.category for p in ps]),
            "context": np.array([p.context for p in ps]),
            "original_text": np.array([p.original.text for p in ps]),
            "injected_text": np.array([p.injected.text for p in ps]),
            "original_answer": np.array([p.original.answer for p in ps]),
            "injected_answer": np.array([p.injected.answer for p in ps])}


def _study() -> Study:
    from .analysis import analyze, derived_files
    from .plots import make_plots
    from .report import render_report

    return Study("injection", analyze, render_report, make_plots, derived_files)


STUDY = _study()
