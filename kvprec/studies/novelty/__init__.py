"""The KV novelty study (``kvprec study novelty``): geometric and predictive novelty of the true K/V over decode
steps, their temporal statistics, a comparison across prompt types and a causal ablation. Entry point: study.py."""
