"""The KV structure study (``kvprec study structure``): what the cache looks like, next to what each compression
that structure suggests does to the model's output.

* inputs.py      built-in samples and WikiText-style files (``--text FILE``, ``--sample-index N``)
* capture.py     the context's K/V and queries, and a greedy generation, from one run of the model
* stats.py       layer, head, token and channel statistics
* similarity.py  similarity of tokens, heads and layers; redundancy clusters
* tucker.py      truncated HOSVD of a layer's [heads, tokens, channels] tensor
* compress.py    Tucker, low-rank, channel-drop and pruning transforms with their exact bytes
* scoring.py     teacher-forced NLL of a continuation over a transformed cache; kvprec's tiers read back
* observe.py     the statistics of a capture as raw arrays
* effects.py     every scored compression as raw arrays
* analysis.py, report.py, plots.py   analysis.json, report.md and plots/ from the raw arrays
* study.py       settings, collection and the run directory (kvprec/studies/platform/rundir.py)
* command.py     the command line's arguments
"""
