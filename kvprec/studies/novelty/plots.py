"""Plots of a novelty-study run, from raw.npz and analysis.json (the aggregate series are recomputed from raw.npz
with the analysis' own functions, so they are the series the report's numbers come from)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from .analysis import _mean_heads, analysed_positions, medians, normalised

DPI = 110


def _series(raw, a: dict, config: dict) -> List[dict]:
    """Per run: model, type, aggregate novelty [n], entropy [n], token texts [n], spike steps."""
    window, metric = int(config["window"]), config["metric"]
    out = []
    for mi, m in enumerate(a["models"]):
        runs = [x["run"] for x in m["runs"]]
        med = medians(raw, runs, metric, window)
        for x in m["runs"]:
            r = x["run"]
            pos = analysed_positions(raw, r, window)
            agg = _mean_heads(normalised(raw, r, metric, med, window), (0, 1))
            ent = raw[f"r{r}_entropy"][pos - int(raw[f"r{r}_prompt_length"])]
            out.append({"run": r, "model": m["model"], "type": x["type"], "agg": agg, "entropy": ent,
                        "text": [str(raw[f"r{r}_token_text"][p]) for p in pos],
                        "spikes": np.array(x["novelty"]["spikes"]["steps"], dtype=np.int64), "summary": x})
    return out


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _label(text: str) -> str:
    return repr(text)[1:-1][:12] or "''"


def make_plots(raw: Dict[str, np.ndarray], a: dict, config: dict, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 10, "legend.fontsize": 9})
    out.mkdir(parents=True, exist_ok=True)
    runs = _series(raw, a, config)
    metric = config["metric"]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=DPI)
        plt.close(fig)
        written.append(name)

    # novelty over time, spikes labelled with their tokens, entropy on a second axis
    fig, axes = plt.subplots(len(runs), 1, figsize=(13, 2.9 * len(runs)), squeeze=False)
    for ax, s in zip(axes[:, 0], runs):
        ax.set_title(f"run {s['run']}: {s['model']}, {s['type']}: aggregate {metric} (normalised) per decode step")
        if not len(s["agg"]):
            _empty(ax, "no analysed steps (generation shorter than the novelty window)")
            continue
        xs = np.arange(len(s["agg"]))
        ax.plot(xs, s["agg"], lw=1, color="C0", label="novelty")
        sp = s["spikes"]
        ax.plot(sp, s["agg"][sp], "o", color="C3", ms=5, label=f"spikes ({len(sp)})")
        for i in sp.tolist():
            ax.annotate(_label(s["text"][i]), (i, s["agg"][i]), xytext=(0, 6), textcoords="offset points",
                        rotation=60, fontsize=9, ha="left", va="bottom", color="C3", annotation_clip=False)
        ax.margins(y=0.3)  # room above the spikes for their labels
        ax2 = ax.twinx()
        ax2.plot(xs, s["entropy"], lw=0.8, color="C2", alpha=0.6)
        ax2.set_ylabel("entropy (nats)", color="C2")
        ax.set_ylabel("novelty")
        ax.set_xlabel("decode step (analysed)")
        ax.legend(loc="upper left")
    save(fig, "novelty_over_time.png")

    # distribution with a fitted normal
    cols = min(3, max(1, len(runs)))
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(runs):]:
        ax.axis("off")
    for ax, s in zip(axes.ravel(), runs):
        x = s["agg"]
        ax.set_title(f"run {s['run']} ({s['type']})")
        if len(x) < 2 or np.ptp(x) == 0:
            _empty(ax, "fewer than 2 distinct values")
            continue
        ax.hist(x, bins=min(40, max(8, len(x) // 6)), density=True, alpha=0.6, color="C0")
        mu, sd = x.mean(), x.std(ddof=1)
        grid = np.linspace(x.min(), x.max(), 200)
        ax.plot(grid, np.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)), "k-",
                label=f"normal fit\nmean {mu:.3g}, sd {sd:.3g}")
        sh = s["summary"]["novelty"]["shape"]
        ax.set_xlabel(f"novelty (skew {_fmt(sh['skew'])}, excess kurtosis {_fmt(sh['kurtosis'])})")
        ax.legend()
    save(fig, "distribution.png")

    # spike inter-arrival times against the geometric law of a Poisson process in discrete time, same mean
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    head_intervals = [np.diff(h["spike_steps"]) for s in runs for h in s["summary"]["heads"]]
    for ax, (what, parts, b_key) in zip(axes, (
            ("aggregate novelty", [np.diff(s["spikes"]) for s in runs], "aggregate"),
            ("each (layer, head) series, pooled", head_intervals, "heads"))):
        intervals = np.concatenate(parts) if parts else np.zeros(0)
        if len(intervals) < 2:
            _empty(ax, f"{what}: fewer than 2 spike intervals ({len(intervals)}), nothing to compare")
            continue
        ax.hist(intervals, bins=np.arange(0.5, intervals.max() + 1.5), density=True, alpha=0.6,
                label=f"{len(intervals)} intervals")
        grid = np.arange(1, intervals.max() + 1)
        p = 1.0 / intervals.mean()
        ax.plot(grid, p * (1 - p) ** (grid - 1), "k.-", ms=3, label="geometric (Poisson in discrete time), same mean")
        h2 = [h for m in a["models"] for h in m["hypotheses"] if h["id"] == "H2"]
        b = h2[0]["levels"][b_key] if h2 else None
        ax.set_title(f"spike intervals, {what}" + (f"\nB {_fmt(b['B'])} vs {_fmt(b['B_null'])} at random, p "
                                                    f"{_fmt(b['B_p'])}" if b else ""))
        ax.set_xlabel("decode steps between consecutive spikes")
        ax.set_ylabel("density")
        ax.legend()
    save(fig, "inter_arrival.png")

    # novelty vs entropy
    fig, ax = plt.subplots(figsize=(7, 5))
    types = list(dict.fromkeys(s["type"] for s in runs))
    for s in runs:
        ax.scatter(s["entropy"], s["agg"], s=8, alpha=0.5, color=f"C{types.index(s['type']) % 10}",
                   label=f"{s['type']} (rho {_fmt(s['summary']['predictive']['correlation']['entropy']['rho'])})")
    if not runs:
        _empty(ax, "no runs")
    else:
        ax.set_xlabel("entropy of the distribution the token was drawn from (nats)")
        ax.set_ylabel(f"aggregate {metric} (normalised)")
        h5 = [h for m in a["models"] for h in m["hypotheses"] if h["id"] == "H5"]
        rho = h5[0]["levels"]["aggregate"]["rho"] if h5 else None
        ax.set_title("novelty vs entropy" + (f"; pooled within-run rho {_fmt(rho)}" if h5 else ""))
        ax.legend(markerscale=2)
    save(fig, "novelty_vs_entropy.png")

    # across prompt types
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(types) + 2), 4))
    data = [np.concatenate([s["agg"] for s in runs if s["type"] == t]) for t in types]
    if not any(len(d) for d in data):
        _empty(ax, "no analysed steps")
    else:
        ax.boxplot([d for d in data], showfliers=True)
        ax.set_xticks(range(1, len(types) + 1), types)
        ax.set_ylabel(f"aggregate {metric} (normalised)")
        h7 = [h for m in a["models"] for h in m["hypotheses"] if h["id"] == "H7"]
        kw = h7[0]["levels"]["aggregate"]["p"] if h7 else None
        ax.set_title("novelty per prompt type" + (f"; Kruskal-Wallis p {_fmt(kw)}" if h7 else ""))
    save(fig, "by_type.png")

    # per layer
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for m in a["models"]:
        layers = [r["layer"] for r in m["per_layer"]]
        for ax, key in zip(axes, ("kurtosis", "spike_rate", "acf1")):
            ax.plot(layers, [np.nan if r[key] is None else r[key] for r in m["per_layer"]], "o-", label=m["model"])
            ax.set_xlabel("layer")
            ax.set_title(f"{key} of the layer's novelty (mean over runs)")
    axes[0].legend()
    save(fig, "layers.png")

    # ablation
    cells = [(m["model"], k, c) for m in a["models"] for k, c in m["ablation"].items()]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cells) + 2), 4))
    if not cells:
        reasons = sorted({x["ablation"].get("skipped", "") for m in a["models"] for x in m["runs"]} - {""})
        _empty(ax, "no ablation: " + "; ".join(reasons))
    else:
        xs = np.arange(len(cells))
        for i, (rule, colour) in enumerate((("most", "C3"), ("random", "C7"), ("least", "C0"))):
            ax.bar(xs + (i - 1) * 0.27, [np.nan if c[f"dnll_{rule}"] is None else c[f"dnll_{rule}"]
                                         for _, _, c in cells], width=0.27, color=colour, label=f"{rule} novel"
                   if rule != "random" else "random")
        ax.set_xticks(xs, [f"{k}" + (f"\n{name}" if len(a["models"]) > 1 else "") for name, k, _ in cells])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel("dNLL of the continuation (nats/token)")
        ax.set_title("causal ablation: blocks at a low tier (tier) or masked out (drop)")
        ax.legend()
    save(fig, "ablation.png")
    return written


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"
