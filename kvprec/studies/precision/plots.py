"""Plots of a precision-study run, from raw.npz and analysis.json (kvprec/studies/precision/study.py).

Saved at DPI 110 with fonts of at least 9 pt; discrete tiers get a discrete legend; counts in titles are those the
report gives; a panel without data says why instead of staying blank."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from ...storage.formats import Tier
from . import measure as pr
from .report import SCORE_METHODS, _num

DPI = 110
#: one colour per tier, from high precision (dark) to low (light)
TIER_COLOURS = {"fp32": "#1b1b3a", "fp16": "#3b4cc0", "bf16": "#6a8fd8", "int8": "#7fbf7b", "int4": "#f4a259",
                "int2": "#d7301f"}


def empty_panel(ax, why: str) -> None:
    """Say in the panel why it has no data."""
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------------------
# Plots

def make_plots(raw: Dict[str, np.ndarray], a: dict, config: dict, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 9,
                         "xtick.labelsize": 9, "ytick.labelsize": 9})
    out.mkdir(parents=True, exist_ok=True)
    written = []
    n_layers, hkv, p = raw["attention"].shape
    labels = [f"L{l}h{h}" for l in range(n_layers) for h in range(hkv)]
    for m in SCORE_METHODS:
        x = raw[m].reshape(n_layers * hkv, p)
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) + 1.8))
        im = ax.imshow(np.log10(np.maximum(x, 1e-30)), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel(f"cached position (the {p} context positions of the probe)")
        ax.set_title(f"{m}: log10 score per (layer, KV head) and position")
        fig.colorbar(im, ax=ax, label="log10 score")
        fig.tight_layout()
        fig.savefig(out / f"curvature_{m}.png", dpi=DPI)
        plt.close(fig)
        written.append(f"curvature_{m}.png")

    written.append(_precision_map(raw, a, config, labels, out, plt))

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
    fig.savefig(out / "pareto.png", dpi=DPI)
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
    axes[0].legend(loc="best")
    fig.tight_layout()
    fig.savefig(out / "locality.png", dpi=DPI)
    plt.close(fig)
    written.append("locality.png")

    items = raw["items"]
    idx = tuple(items.T)
    tier_names = list(config["tiers"])
    ti = tier_names.index("int4") if "int4" in tier_names else 0
    y = raw["sens_kl"][:, ti]
    fig, axes = plt.subplots(1, len(SCORE_METHODS), figsize=(3.2 * len(SCORE_METHODS), 3.4))
    for ax, m in zip(axes, SCORE_METHODS):
        x = pr.block_sums(raw[m], int(config["block_size"]))[idx]
        rho = a["correlations"]["kl"][tier_names[ti]][m]
        ax.set_title(f"{m}\nrho={_num(rho, '.2f')}")
        if len(x) == 0:
            empty_panel(ax, "no sampled blocks")
            continue
        zero = int(((x <= 0) | (y <= 0)).sum())
        ax.plot(np.log10(np.maximum(x, 1e-30)), np.log10(np.maximum(y, 1e-30)), ".")
        ax.grid(alpha=0.3)
        ax.set_xlabel("log10 block score" + (f"\n({zero} zero values drawn at -30)" if zero else ""))
    axes[0].set_ylabel(f"log10 measured KL at {tier_names[ti]}")
    fig.suptitle(f"{len(items)} sampled (layer, KV head, block) items: block score vs measured KL at "
                 f"{tier_names[ti]} (Spearman rho as in the report)")
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=DPI)
    plt.close(fig)
    written.append("sensitivity.png")
    return written + _probe_plots(a["probes"], config, out, plt)


def _precision_map(raw, a: dict, config: dict, labels: List[str], out: Path, plt) -> str:
    """precision_map.png: the map's tier per (layer, KV head) and block, one colour per tier with the block counts of
    the report's section 2 in the legend."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    tiers = raw["map_tiers"].reshape(len(labels), -1)
    n_blocks = tiers.shape[1]
    names = [str(t) for t in Tier]
    cmap = ListedColormap([TIER_COLOURS[n] for n in names])
    norm = BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.5 * n_blocks + 5), 0.35 * len(labels) + 2.2))
    ax.imshow(tiers, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xticks(range(n_blocks))
    t = int(config["block_size"])
    context = int(raw["context"])
    ax.set_xlabel(f"block of {t} positions\n(blocks 0-{context // t - 1}: the {context} context positions; "
                  "later blocks: the query positions)" if n_blocks > context // t else f"block of {t} positions")
    counts = a["precision_map"]["tier_blocks"]
    ax.legend(handles=[Patch(color=TIER_COLOURS[n], label=f"{n}: {counts[n]} blocks") for n in names if n in counts],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), title="tier")
    ax.set_title(f"precision map: {tiers.size} blocks = {len(labels)} (layer, KV head) x {n_blocks}\n"
                 f"{a['precision_map']['bits_per_element']:.3f} page bits/element")
    fig.tight_layout()
    fig.savefig(out / "precision_map.png", dpi=DPI)
    plt.close(fig)
    return "precision_map.png"


def _bars(ax, groups: List[str], series: Dict[str, list], title: str):
    """Grouped bars of rho; an undefined rho (None) is marked "n/a" at 0 rather than left as a gap."""
    width = 0.8 / max(1, len(series))
    xs = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(xs + i * width, [np.nan if v is None else v for v in vals], width=width, label=name)
        for j, v in enumerate(vals):
            if v is None:
                ax.text(xs[j] + i * width, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=9)
    ax.set_xticks(xs + 0.4 - width / 2, groups)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylim(-1, 1)
    ax.set_ylabel("Spearman rho")
    ax.set_title(title + ("; n/a: rho undefined (constant scores or measurements)"
                          if any(v is None for vals in series.values() for v in vals) else ""))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


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
    fig.savefig(out / "kinds.png", dpi=DPI)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(11, 3.8))
    _bars(ax, list(SCORE_METHODS), {SETTING_TITLES[x]: [p["overall"][x]["kl"][tier][m] for m in SCORE_METHODS]
                                    for x in SETTINGS},
          f"rho vs measured KL at {tier}: in-sample vs held-out (mean over {p['n_probes']} probes)")
    fig.tight_layout()
    fig.savefig(out / "heldout.png", dpi=DPI)
    plt.close(fig)
    return ["kinds.png", "heldout.png"]
