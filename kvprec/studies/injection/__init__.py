"""``kvprec study injection``: new context written into a live KV cache in the middle of generation.

* data.py, math_problems.py, qa_problems.py   the problems (JSON format, MAWPS-style generator, QA generator)
* answers.py     reading and checking answers
* prompt.py      token ids of a problem's prompt, cut where the injected span begins; noise controls
* surgery.py     cache surgery over the public cache interface (AdaptiveCache and DynamicCache): append a span,
                 replace a span, splice given K/V, move stored keys by RoPE
* tiers.py       the policy that stores the injected span at its own tier
* layout.py      every condition as a row of one batched cache, spans on whole blocks
* trial.py       one problem: the decode loop with injections, the teacher-forced references, per-step measures
* metrics.py     KL, probability ratio, hidden-state cosine, attention shares
* derived.py     detection latency, adaptation point, stabilisation, remaining gap, convergence
* stats.py       bootstrap intervals and Wilcoxon tests across problems
* analysis.py, report.py, plots.py, study.py, command.py   the run directory (kvprec/studies/platform/)
"""
