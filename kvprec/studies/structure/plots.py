"""Plots of a structure run, from raw.npz and analysis.json only (``make_plots``); each is drawn when its part
was measured: layer_statistics, head_sparsity, token_importance, channel_consistency, generation_stages,
similarity, tucker_tradeoff, layer_sensitivity (.png)."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from .observe import STAGES

KV_COLORS = {"keys": "tab:blue", "values": "tab:orange", "keys_rotated": "tab:green"}
FAMILY_STYLE = {"tucker": ("tab:blue", "o"), "lowrank": ("tab:orange", "s"), "drop": ("tab:green", "^"),
                "tier": ("tab:red", "D"), "budget": ("tab:purple", "P"), "prune": ("tab:gray", "x")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, axes, labels, path: Path) -> str:
    """Title and axis labels per panel (``labels``: (title, xlabel, ylabel) in the order of ``axes.flat``), legends,
    grids; saved to ``path``."""
    for ax, (title, xlabel, ylabel) in zip(axes.flat, labels):
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path.name


def layer_statistics(raw, analysis, path: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    n = raw["layer_erank"].shape[1]
    x = np.arange(n)
    thr = raw["sparsity_thresholds"]
    for j, kind in enumerate(("keys", "values")):
        c = KV_COLORS[kind]
        axes[0, 0].plot(x, raw["layer_erank"][j].mean(-1), "-o", ms=3, color=c, label=f"{kind}: effective rank")
        axes[0, 0].plot(x, raw["layer_rank90"][j].mean(-1), "--", color=c, label=f"{kind}: rank for 90% energy")
        for a, t in enumerate(thr):
            axes[0, 1].plot(x, raw["layer_sparsity"][j, :, a], "-" if j == 0 else "--", color=c,
                            alpha=0.35 + 0.65 * (a + 1) / len(thr), label=f"{kind}: |x| < {t:g} RMS")
        axes[1, 0].errorbar(x, raw["layer_norm_mean"][j].mean(-1), yerr=raw["layer_norm_std"][j].mean(-1), fmt="-o",
                            ms=3, color=c, capsize=2, label=f"{kind}: token norm (mean, std)")
        axes[1, 1].plot(x, raw["layer_top10"][j], "-o", ms=3, color=c, label=f"{kind}")
    return _finish(fig, axes, [("rank per head (mean over KV heads)", "layer", "rank"),
                               ("magnitude sparsity", "layer", "fraction of entries"),
                               ("token L2 norms", "layer", "norm"),
                               ("energy held by the largest 10% of entries", "layer", "share of sum x^2")], path)


def head_sparsity(raw, analysis, path: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.8))
    panels = (("attn_entropy", "normalised attention entropy", "viridis"),
              ("attn_sink", "attention mass on positions 0-3", "magma"),
              ("attn_recent", "attention mass on the last 32 positions", "magma"),
              ("head_output_norm", "KV head: mean |attention output|\n(x: the heads a pruning would remove)",
               "cividis"))
    for ax, (key, title, cmap) in zip(axes, panels):
        im = ax.imshow(raw[key], aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set(title=title, xlabel="query head" if key != "head_output_norm" else "KV head", ylabel="layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for layer, head in analysis["heads"]["prune_candidates"]:
        axes[3].plot(head, layer, "x", color="red", ms=8, mew=2)
    return _save(fig, path)


def token_importance(raw, analysis, path: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    rec = raw["attn_received_window"].mean((0, 1))
    seen = raw["attn_received"].mean((0, 1))
    axes[0].semilogy(np.arange(len(rec)), np.maximum(rec, 1e-12), lw=0.8, label="from the last prompt queries")
    axes[0].semilogy(np.arange(len(seen)), np.maximum(seen, 1e-12), lw=0.6, alpha=0.6,
                     label="per query that sees it (whole prefill)")
    for item in analysis["tokens"]["top_positions"][:5]:
        axes[0].annotate(repr(item["token"])[:12], (item["position"], item["received"]), fontsize=7)
    axes[0].set(title="attention each position receives (mean over layers, heads)",
                xlabel="context position", ylabel="mean weight")
    axes[0].legend(fontsize=7)
    prof = np.nanmean(raw["attn_recency"], axis=(0, 1))
    d = np.arange(1, len(prof) + 1)
    axes[1].loglog(d, np.maximum(prof, 1e-12))
    axes[1].set(title="recency profile", xlabel="distance to the query + 1", ylabel="mean weight")
    show = min(64, raw["attn_received"].shape[-1])
    im = axes[2].imshow(np.log10(np.maximum(raw["attn_received"].mean(1)[:, :show], 1e-6)), aspect="auto",
                        cmap="viridis", interpolation="nearest")
    axes[2].set(title=f"log10 received attention, first {show} positions", xlabel="position", ylabel="layer")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes[:2]:
        ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def channel_consistency(raw, analysis, path: Path) -> str:
    plt = _plt()
    mag, freq = raw["chan_mag"], raw["chan_topk_freq"]
    ratio = mag.max(-1) / np.maximum(np.median(mag, -1), 1e-30)
    layer = int(np.argmax(ratio[0].mean(-1)))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    names = ("keys", "values", "keys_rotated")
    d = mag.shape[-1]
    for j, name in enumerate(names):
        axes[0, 0].plot(np.arange(d), mag[j, layer, 0], "-", lw=1, color=KV_COLORS[name], label=name)
        axes[0, 1].plot(np.arange(d), freq[j, layer, 0], "-", lw=1, color=KV_COLORS[name], label=name)
        axes[1, 0].plot(ratio[j].mean(-1), "-o", ms=3, color=KV_COLORS[name], label=name)
    q = analysis["channels"]["per_kind"]
    labels = list(q["keys"]["quant_error"])
    width = 0.27
    for j, name in enumerate(names):
        vals = [q[name]["quant_error"][k] or 0.0 for k in labels]
        axes[1, 1].bar(np.arange(len(labels)) + (j - 1) * width, vals, width, color=KV_COLORS[name], label=name)
    axes[1, 1].set_xticks(np.arange(len(labels)), [l.replace("_", " ") for l in labels], fontsize=8)
    axes[1, 1].set_yscale("log")
    return _finish(fig, axes, [(f"mean |x| per channel, layer {layer} KV head 0", "channel", "mean |x|"),
                               (f"share of tokens where the channel is in the top {analysis['channels']['top_k']}",
                                "channel", "frequency"),
                               ("outlier ratio max_c / median_c of mean |x| (mean over heads)", "layer", "ratio"),
                               ("relative quantization error (kvprec's quantizer)", "", "||x - x'|| / ||x||")], path)


def generation_stages(raw, analysis, path: Path) -> str:
    plt = _plt()
    st = analysis["stages"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    step = raw["step_attn"]
    n = step.shape[-1]
    for a, (metric, color) in enumerate((("entropy", "tab:blue"), ("mass90", "tab:cyan"), ("sink_mass", "tab:red"),
                                         ("recent_mass", "tab:green"))):
        axes[0, 0].plot(np.arange(n), np.nanmean(step[a], axis=(0, 1)), color=color, lw=1, label=metric)
        axes[0, 0].axhline(st["per_stage"]["prefill"][metric], color=color, ls=":", lw=1)
    for b in (n // 3, 2 * n // 3):
        axes[0, 0].axvline(b, color="k", lw=0.5)
    for s, stage in enumerate(STAGES):
        axes[0, 1].plot(st["per_stage"][stage]["per_layer"]["entropy"], "-o", ms=3, label=stage)
        axes[1, 0].plot(st["per_stage"][stage]["keys"]["per_layer"]["norm"], "-o", ms=3, label=f"{stage}")
    axes[1, 1].plot(raw["step_entropy"], lw=1, label="next-token entropy")
    axes[1, 1].plot(-raw["step_logprob"], lw=1, label="-log p(chosen token)")
    return _finish(fig, axes, [("attention per decode step (mean over layers, heads; dotted: prefill tail)",
                                "decode step", "value"),
                               ("normalised attention entropy by stage", "layer", "entropy / log n"),
                               ("mean key norm of the stage's tokens", "layer", "norm"),
                               ("model confidence per decode step", "decode step", "nats")], path)


def similarity(raw, analysis, path: Path) -> str:
    plt = _plt()
    sim = analysis["similarity"]["per_kind"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for kind in ("keys", "values"):
        c = KV_COLORS[kind]
        axes[0, 0].plot(sim[kind]["per_layer_adjacent"], "-o", ms=3, color=c, label=f"{kind}: adjacent tokens")
        axes[0, 0].plot(sim[kind]["per_layer_pairs"], "--", color=c, label=f"{kind}: random pairs")
        axes[0, 1].plot(sim[kind]["per_layer_cross_cosine"], "-o", ms=3, color=c, label=f"{kind}: cosine")
        axes[0, 1].plot(sim[kind]["per_layer_cross_cka"], "--", color=c, label=f"{kind}: CKA")
        for a, entry in enumerate(sim[kind]["allowed"]):
            if entry["per_layer_kept_fraction"] is not None:
                axes[1, 1].plot(entry["per_layer_kept_fraction"], "-" if a == 0 else ":", color=c,
                                label=f"{kind}, cos >= {entry['tau']:g}")
    hk = raw["sim_head_cka"]
    h = hk.shape[-1]
    if h > 1:
        off = ~np.eye(h, dtype=bool)
        for j, kind in enumerate(("keys", "values")):
            axes[1, 0].plot(hk[j][:, off].mean(-1), "-o", ms=3, color=KV_COLORS[kind], label=f"{kind}: CKA")
            axes[1, 0].plot(raw["sim_head_cos"][j][:, off].mean(-1), "--", color=KV_COLORS[kind],
                            label=f"{kind}: cosine")
    return _finish(fig, axes, [("cosine similarity of tokens' entries", "layer", "mean cosine"),
                               ("same head, layer l vs l + 1", "layer l", "similarity"),
                               ("heads of a layer (mean over pairs)", "layer", "similarity"),
                               ("tokens kept by leader clustering", "layer", "clusters / tokens")], path)


def tucker_tradeoff(raw, analysis, path: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    if "tucker" in analysis:
        t = analysis["tucker"]
        for kind in ("keys", "values"):
            front = t["front"][kind]
            axes[0].plot([f["ratio"] for f in front], [f["error"] for f in front], "-", color=KV_COLORS[kind],
                         label=f"{kind}: best ranks (H, r_t, r_d) at each size")
        for c in t["chosen"]:
            if c["which"] == "kv":
                axes[0].plot([c["ratio"]] * 2, [c["error_k"], c["error_v"]], "k.", ms=6)
        axes[0].set_xscale("log")
        axes[0].set(title=f"Tucker (HOSVD) of each layer's {t['shape']} tensor: error vs compression\n"
                          "(dots: the ranks measured below)", xlabel="compression ratio (FP16)",
                    ylabel="||x - x'|| / ||x|| (mean over layers)")
        axes[0].grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=7)
    rows = [r for r in analysis["variants"] if r["layer"] == -1 and r["family"] in FAMILY_STYLE]
    for family, (color, marker) in FAMILY_STYLE.items():
        for which, fill in (("kv", color), ("k", "none"), ("v", "none")):
            pts = sorted((r["ratio"], r["kl"], r["kl_se"] or 0.0) for r in rows
                         if r["family"] == family and r["which"] == which)
            if not pts:
                continue
            x, y, e = map(np.array, zip(*pts))
            style = "-" if family in ("tucker", "lowrank", "drop") and which == "kv" else "none"
            axes[1].errorbar(x, y, yerr=e, ls=style, marker=marker, color=color, mfc=fill, ms=5, capsize=2,
                             label=f"{family}" + ("" if which == "kv" else f" ({which.upper()} only)"))
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set(title="measured KL from the exact cache's next-token distribution vs bytes\n(continuation, teacher "
                      "forced; the NLL changes are in the report)", xlabel="compression ratio (FP16)",
                ylabel="mean KL (nats / token)")
    axes[1].grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def layer_sensitivity(raw, analysis, path: Path) -> str:
    plt = _plt()
    sweeps = analysis["sensitivity"]["sweeps"]
    head = analysis.get("pruning", {}).get("head_kl")
    fig, axes = plt.subplots(1, 2 if head else 1, figsize=(14 if head else 8, 5), squeeze=False)
    for label, values in sorted(sweeps.items()):
        y = np.array([np.nan if v is None else v for v in values["kl"]])
        axes[0, 0].plot(np.arange(len(y)), y, "-o", ms=3, label=label)
    axes[0, 0].set_yscale("log")
    axes[0, 0].set(title="one layer compressed, the others exact", xlabel="layer",
                   ylabel="mean KL from the exact cache (nats / token)")
    axes[0, 0].grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7)
    if head:
        m = np.array([[np.nan if v is None else v for v in row] for row in head])
        im = axes[0, 1].imshow(m, aspect="auto", cmap="magma", interpolation="nearest")
        axes[0, 1].set(title="KL when one KV head's cache is pruned", xlabel="KV head", ylabel="layer")
        fig.colorbar(im, ax=axes[0, 1], fraction=0.046)
    return _save(fig, path)


def make_plots(raw, analysis, config, plots_dir) -> List[str]:
    """Write every plot whose part was measured into ``plots_dir``; returns the file names."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    jobs = [("layer_statistics.png", "layer_erank" in raw, layer_statistics),
            ("head_sparsity.png", "heads" in analysis, head_sparsity),
            ("token_importance.png", "tokens" in analysis, token_importance),
            ("channel_consistency.png", "channels" in analysis, channel_consistency),
            ("generation_stages.png", "stages" in analysis, generation_stages),
            ("similarity.png", "similarity" in analysis, similarity),
            ("tucker_tradeoff.png", "variants" in analysis, tucker_tradeoff),
            ("layer_sensitivity.png", bool(analysis.get("sensitivity", {}).get("sweeps")), layer_sensitivity)]
    return [fn(raw, analysis, plots_dir / name) for name, wanted, fn in jobs if wanted]


PLOT_FOR_SECTION = {"layers": "layer_statistics.png", "heads": "head_sparsity.png", "tokens": "token_importance.png",
                    "channels": "channel_consistency.png", "stages": "generation_stages.png",
                    "similarity": "similarity.png", "variants": "tucker_tradeoff.png",
                    "sensitivity": "layer_sensitivity.png"}
