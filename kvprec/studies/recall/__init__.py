"""The recall study (``kvprec study recall``): token entropy vs the recall of KV eviction policies, and
entropy-triggered recall from a host shadow. Entry points: study.py (collection), command.py (the subcommand)."""
