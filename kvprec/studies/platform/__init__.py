"""What every study shares (docs/design.md, "Capture" and "Studies"):

* rundir.py   the run-directory contract: config.json, raw.npz, analysis.json, report.md, plots/, written
              atomically; ``--reanalyze``; refusal to overwrite without ``--force``
* progress.py progress bars and log lines on stderr
* capture.py  what the cache receives (K/V after RoPE, queries, per-block attention mass) and what the model
              predicts (log-probability of the chosen token, entropy), during generate or teacher forcing
* inputs.py   study inputs: the built-in prompt suite, ``--text FILE``, ``--dataset FILE``, the model by name
* command.py  the arguments every ``kvprec study <name>`` takes and the one way to run a study from them
"""
