"""Plots of the recall study (from raw.npz and analysis.json only):

* ``recall_by_entropy_bin.png``: mean recall per entropy bin, one line per policy (colour) and budget (line style);
* ``entropy_vs_recall_b<budget>.png``: per budget, one panel per policy, every decode step as a point (token entropy,
  mean recall over layers and KV heads) with the least-squares line and Spearman rho;
* ``etr_nll.png``: NLL increase over the full cache of each evicting cache (static, entropy-triggered, random
  trigger) per budget.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from .analysis import recall_views


def make_plots(raw: Dict[str, np.ndarray], analysis: dict, config: dict, plots_dir: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    budgets, policies = analysis["budgets"], analysis["policies"]
    labels = analysis["entropy_bins"]
    colors = {p: f"C{i}" for i, p in enumerate(policies)}
    styles = ["-", "--", ":", "-."]
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for p in policies:
        for bi, b in enumerate(budgets):
            means = [e["mean"] if e["mean"] is not None else np.nan for e in analysis["bins"][p][f"{b:g}"]]
            ax.plot(range(len(labels)), means, styles[bi % len(styles)], color=colors[p], marker="o",
                    label=f"{p} @ {b:g}")
    counts = analysis["overview"]["bin_counts"]
    ax.set_xticks(range(len(labels)), [f"{lab}\nn={c}" for lab, c in zip(labels, counts)])
    ax.set_xlabel("token entropy H_t (nats)")
    ax.set_ylabel("mean recall of the needed set")
    ax.set_ylim(0, 1.02)
    ax.set_title("Recall per entropy bin (line style: budget fraction)")
    ax.legend(fontsize=7, ncol=len(budgets), loc="lower left")
    fig.tight_layout()
    fig.savefig(plots_dir / "recall_by_entropy_bin.png", dpi=120)
    plt.close(fig)
    written.append("recall_by_entropy_bin.png")

    entropy = raw["entropy"].astype(np.float64)
    rmean, _ = recall_views(raw)
    for bi, b in enumerate(budgets):
        fig, axes = plt.subplots(1, len(policies), figsize=(3.2 * len(policies), 3.4), sharey=True, squeeze=False)
        for pi, (p, ax) in enumerate(zip(policies, axes[0])):
            y = rmean[:, pi, bi]
            ax.scatter(entropy, y, s=6, alpha=0.5, color=colors[p])
            if np.ptp(entropy) > 0 and np.ptp(y) > 0:
                slope, intercept = np.polyfit(entropy, y, 1)
                xs = np.linspace(entropy.min(), entropy.max(), 50)
                ax.plot(xs, slope * xs + intercept, color="k", lw=1)
            rho = analysis["correlations"][f"{p}@{b:g}"]["spearman"]["r"]
            ax.set_title(f"{p}" + (f"  rho={rho:+.2f}" if rho is not None else ""), fontsize=9)
            ax.set_xlabel("token entropy (nats)")
        axes[0][0].set_ylabel("mean recall")
        fig.suptitle(f"Entropy vs recall at budget {b:g} of the sequence ({len(entropy)} steps)", fontsize=10)
        fig.tight_layout()
        name = f"entropy_vs_recall_b{b:g}.png"
        fig.savefig(plots_dir / name, dpi=120)
        plt.close(fig)
        written.append(name)

    etr = analysis["etr"]["rows"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.8), sharey=True, squeeze=False)
    kind_colors = {"static": "C7", "etr": "C3", "random": "C0"}
    for b, ax in zip(budgets, axes[0]):
        rows = etr[f"{b:g}"]["rows"]
        names = list(rows)
        ax.bar(range(len(names)), [rows[k]["nll_vs_full"] for k in names],
               color=[kind_colors[k.split(":")[0]] for k in names])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"budget {b:g}", fontsize=9)
    axes[0][0].set_ylabel("mean NLL - full cache NLL (nats)")
    fig.suptitle("Evicting caches at equal device memory (grey static, red entropy-triggered recall, blue random "
                 "trigger)", fontsize=9)
    fig.tight_layout()
    fig.savefig(plots_dir / "etr_nll.png", dpi=120)
    plt.close(fig)
    written.append("etr_nll.png")
    return written
