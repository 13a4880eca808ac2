"""Plots of an injection run, from analysis.json: the adaptation curves (mean KL to the oracle against steps since
injection, one panel per injection point, a 95% bootstrap band per condition, drawn while at least 20% of the
problems still have a step) and the attention share on the span per layer at the middle injection point. Saved at
DPI 110; a panel without data says why."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

DPI = 110
#: curves stop where fewer than this share of the problems still have a step
MIN_SHARE = 0.2


def _array(values) -> np.ndarray:
    """A list from analysis.json with None for missing values, as a float array with NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def make_plots(raw: Dict[str, np.ndarray], a: dict, config: dict, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 10, "legend.fontsize": 8})
    out.mkdir(parents=True, exist_ok=True)
    written = []

    panels = list(a["curves"].items())
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, (point, panel) in zip(axes[0], panels):
        drawn = False
        for label, c in panel.items():
            mean, lo, hi = _array(c["mean"]), _array(c["lo"]), _array(c["hi"])
            few = np.asarray(c["n"]) < MIN_SHARE * max(c["n"] + [1])  # a tail of few long replies: not drawn
            mean[few], lo[few], hi[few] = np.nan, np.nan, np.nan
            if not np.isfinite(mean).any():
                continue
            s = np.arange(mean.size)
            style = "--" if label.startswith(("baseline", "unadapted")) else "-"
            width = 3.0 if label.startswith("injection:fp32") else 1.4  # int8 often lies on it: fp32 shows around it
            line, = ax.plot(s, mean, style, label=label.split("@")[0], linewidth=width)
            ax.fill_between(s, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            drawn = True
        ax.set_title(f"injection after {point} tokens ({a['changed_problems']} problems)")
        ax.set_xlabel("steps since injection")
        ax.set_ylabel("KL to the oracle (nats)")
        if drawn:
            ax.set_yscale("symlog", linthresh=1e-2)
            ax.legend(loc="upper right")
        else:
            _empty(ax, "no valid steps after this point")
    written.append(_save(plt, fig, out, "adaptation_curves.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    drawn = False
    middle = a["points"][len(a["points"]) // 2] if a["points"] else None
    for key, t in a["token"].items():
        layers = _array(t["attn_span_by_layer"])
        if (key in ("baseline", "oracle") or key.endswith(f"@{middle}")) and np.isfinite(layers).any():
            style = "--" if key in ("baseline", "oracle") else "-"
            ax.plot(np.arange(layers.size), layers, style, marker=".", label=key, linewidth=1.0)
            drawn = True
    # mean over heads, the steps after the injection (baseline and oracle: every step after the first), problems
    ax.set_title(f"attention share on the span per layer (injection after {middle} tokens)")
    ax.set_xlabel("layer")
    ax.set_ylabel("share")
    if drawn:
        ax.legend(fontsize=7, ncol=2)
    else:
        _empty(ax, "no attention recorded")
    written.append(_save(plt, fig, out, "attention_by_layer.png"))
    return written


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)


def _save(plt, fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name
