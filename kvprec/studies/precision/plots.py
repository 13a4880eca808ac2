"""Plots of a precision-study run, from raw.npz and analysis.json (kvprec/studies/precision/study.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from . import measure as pr
from .report import SCORE_METHODS, _num


# ---------------------------------------------------------------------------------------------------------
# Plots

def make_plots(raw: Dict[str, np.ndarray], a: dict, config: dict, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    n_layers, hkv, p = raw["attention"].shape
    labels = [f"L{l}h{h}" for l in range(n_layers) for h in range(hkv)]
    for m in SCORE_METHODS:
        x = raw[m].reshape(n_layers * hkv, p)
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) + 1.5))
        im = ax.imshow(np.log10(np.maximum(x, 1e-30)), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("cached position")
        ax.set_title(f"{m}: log10 score per (layer, KV head) and position")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"curvature_{m}.png", dpi=80)
        plt.close(fig)
        written.append(f"curvature_{m}.png")

    tiers = raw["map_tiers"]
    bits = raw["map_page_bits"][tiers].reshape(n_layers * hkv, -1)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.5))
    im = ax.imshow(bits, aspect="auto", interpolation="nearest", cmap="magma")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("block")
    ax.set_title(f"precision map: page bits/element ({a['precision_map']['bits_per_element']:.3f} overall)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "precision_map.png", dpi=80)
    plt.close(fig)
    written.append("precision_map.png")

    rows = a["comparison"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for fam in dict.fromkeys(r["family"] for r in rows):
        rs = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["bits_per_element"])
        xs = [r["bits_per_element"] for r in rs]
        axes[0].plot(xs, [100 * r["ppl_change"] for r in rs], "o-", label=fam)
        axes[1].plot(xs, [100 * r["top1_agreement"] for r in rs], "o-", label=fam)
    axes[0].set_ylabel("perplexity change (%)")
    axes[1].set_ylabel("top-1 agreement (%)")
    for ax in axes:
        ax.set_xlabel("effective bits/element (measured)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=80)
    plt.close(fig)
    written.append("pareto.png")

    loc = a["locality"]
    keys = ("recency_share", "anchor_share", "cluster_top_share")
    hq = len(loc["recency_share"][0])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    xs = np.arange(n_layers)
    for ax, k in zip(axes, keys):
        vals = np.array(loc[k])
        for h in range(hq):
            ax.bar(xs + h / (hq + 1), vals[:, h], width=1 / (hq + 1), label=f"q-head {h}")
        if k == "recency_share":
            ax.plot(xs + 0.4, np.array(loc["recency_uniform"])[:, 0], "k_", markersize=20, label="uniform")
        ax.set_xticks(xs + 0.4, [f"L{l}" for l in xs])
        ax.set_title(k)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "locality.png", dpi=80)
    plt.close(fig)
    written.append("locality.png")

    items = raw["items"]
    idx = tuple(items.T)
    tier_names = list(config["tiers"])
    ti = tier_names.index("int4") if "int4" in tier_names else 0
    y = raw["sens_kl"][:, ti]
    fig, axes = plt.subplots(1, len(SCORE_METHODS), figsize=(3 * len(SCORE_METHODS), 3))
    for ax, m in zip(axes, SCORE_METHODS):
        x = pr.block_sums(raw[m], int(config["block_size"]))[idx]
        ax.loglog(np.maximum(x, 1e-30), np.maximum(y, 1e-30), ".")
        rho = a["correlations"]["kl"][tier_names[ti]][m]
        ax.set_title(f"{m}\nrho={_num(rho, '.2f')}", fontsize=9)
        ax.set_xlabel("block score")
    axes[0].set_ylabel(f"measured KL at {tier_names[ti]}")
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=80)
    plt.close(fig)
    written.append("sensitivity.png")
    return written + _probe_plots(a["probes"], config, out, plt)


def _bars(ax, groups: List[str], series: Dict[str, list], title: str):
    width = 0.8 / max(1, len(series))
    xs = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(xs + i * width, [np.nan if v is None else v for v in vals], width=width, label=name)
    ax.set_xticks(xs + 0.4 - width / 2, groups, fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylim(-1, 1)
    ax.set_ylabel("Spearman rho")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def _probe_plots(p: dict, config: dict, out: Path, plt) -> List[str]:
    """kinds.png (in-sample rho per kind and method) and heldout.png (rho per method and setting), KL at the report
    tier; nothing where the run has no probes."""
    from .heldout import SETTING_TITLES, SETTINGS, report_tier

    if "skipped" in p:
        return []
    tier = report_tier(list(config["tiers"]))
    fig, ax = plt.subplots(figsize=(10, 3.8))
    _bars(ax, p["kinds"], {m: [p["per_kind"][k]["correlations"]["in_sample"]["kl"][tier][m] for k in p["kinds"]]
                           for m in SCORE_METHODS}, f"in-sample rho vs measured KL at {tier}, per prompt kind")
    fig.tight_layout()
    fig.savefig(out / "kinds.png", dpi=80)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(11, 3.8))
    _bars(ax, list(SCORE_METHODS), {SETTING_TITLES[x]: [p["overall"][x]["kl"][tier][m] for m in SCORE_METHODS]
                                    for x in SETTINGS},
          f"rho vs measured KL at {tier}: in-sample vs held-out (mean over {p['n_probes']} probes)")
    fig.tight_layout()
    fig.savefig(out / "heldout.png", dpi=80)
    plt.close(fig)
    return ["kinds.png", "heldout.png"]
