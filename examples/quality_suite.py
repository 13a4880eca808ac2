"""Quality against whole-cache bits, offline, per model and per kind of text, with long contexts.

    python examples/quality_suite.py --model smollm2-135m --out examples/results/quality_suite_smollm2.json
    python examples/quality_suite.py --model examples/models/small_llama_stdlib.safetensors \\
        --out examples/results/quality_suite_small_llama_stdlib.json
    python examples/quality_suite.py --model tiny --out examples/results/quality_suite_tiny.json

Text kinds (nothing is downloaded):

* ``prose``: English technical prose, the documentation topics that ship with Python (``pydoc_data.topics``);
* ``code``: Python source, the standard-library files held out from the tiny models' training
  (kvprec.models.STDLIB_EVAL_FILES);
* ``chat``: chat transcripts SmolLM2-135M-Instruct wrote itself (examples/data/chat_smollm2.txt, made by
  examples/make_chat_transcripts.py).

Per kind, ``--windows`` disjoint windows of ``--prefill + --tokens`` tokens run as one batch through
kvprec.hf.eval.compare: the prefill fills the cache, then every one of the ``--tokens`` predictions is a decode step
that reads the cache (teacher forced). Each row gives the perplexity change and top-1 agreement against the
unquantized DynamicCache, and bits per K/V element two ways: over everything the cache holds (pages, FP16 scales and
zeros, the model-dtype tail, block tables, rotation matrices) at the end of the pass (>= prefill tokens), and over
its sealed pages alone.

Rows are held to the targets by their whole-cache bits: uniform INT4 <= +0.5% and >= 97% top-1; <= 3.0 bits
<= +1.5% and >= 95%; <= 2.6 bits <= +5%; <= 2.2 bits <= +10%. Budgets are whole-cache byte budgets (the policy's
``bytes=``) sized so that the cache at the end of the pass holds at most the target bits per element.

The policy settings below were chosen on one kind and one model (the held-out standard-library code on
examples/models/small_llama_stdlib.safetensors, examples/quality_vs_bits.py) and are applied unchanged to every
model and kind here. ``--plot`` writes the Pareto plot (perplexity change against whole-cache bits, one panel per
kind) beside the JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import kvprec
from kvprec.hf.eval import compare, hf_cache, hf_cache_name
from kvprec.models import STDLIB_EVAL_FILES, load, stdlib_text

KINDS = ("prose", "code", "chat")
CHAT_FILE = Path(__file__).resolve().parent / "data" / "chat_smollm2.txt"
TARGETS = ((2.2, 0.10, None), (2.6, 0.05, None), (3.0, 0.015, 0.95))  # (whole bits, max ppl change, min top-1)


def kind_text(kind: str) -> str:
    if kind == "prose":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if kind == "code":
        return stdlib_text(STDLIB_EVAL_FILES).decode("utf-8", errors="replace")
    if kind == "chat":
        if not CHAT_FILE.is_file():
            raise FileNotFoundError(f"{CHAT_FILE} is missing: run python examples/make_chat_transcripts.py first")
        return CHAT_FILE.read_text()
    raise ValueError(f"--kinds: unknown kind {kind!r}; accepted: {', '.join(KINDS)}")


def windows(encode, text: str, count: int, length: int) -> torch.Tensor:
    ids = encode(text)
    if len(ids) < count * length:
        raise ValueError(f"{count} windows of {length} tokens need {count * length} tokens; the text has {len(ids)}")
    return torch.tensor(ids[:count * length]).view(count, length)


def kv_elements(config, batch: int, tokens: int) -> int:
    """K and V elements of a cache holding ``tokens`` positions of every layer: 2 * L * B * Hkv * N * D."""
    c = config.get_text_config(decoder=True)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * batch * heads * tokens * head_dim


def floor_bits(config, batch: int, tokens: int, block_size: int, dtype_bytes: int) -> float:
    """The fewest whole-cache bits per element any policy can reach with ``tokens`` held: every sealed block at
    INT2 (codes, FP16 scales and zeros), the unsealed tail in the model dtype, and one rotation matrix per layer."""
    c = config.get_text_config(decoder=True)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    geometry = kvprec.BlockGeometry(block_size, head_dim)
    sealed, tail = divmod(tokens, block_size)
    per_row_head = sealed * geometry.page_bytes(kvprec.Tier.INT2) + 2 * tail * head_dim * dtype_bytes
    total = c.num_hidden_layers * (batch * heads * per_row_head + head_dim * head_dim * 4)
    return total * 8 / kv_elements(config, batch, tokens)


def caches(config, batch: int, tokens: int, block_size: int, hf_specs, dtype_bytes: int, skipped: list):
    """Row name -> cache factory. Key rotation (kvprec/storage/rotation.py) is on for every row below 4 bits. Budgets
    below :func:`floor_bits` are skipped (appended to ``skipped`` with the reason): no policy can meet them."""
    def make(policy, rotation=None):
        return lambda: kvprec.AdaptiveCache(config, policy=policy, block_size=block_size, key_rotation=rotation)

    rows = {"uniform:int8": make("uniform:int8"), "uniform:int4": make("uniform:int4"),
            "uniform:int2 rot": make("uniform:int2", "orthogonal"),
            "recent 256 int4, rest int2, rot": make("sink_window:sinks=0,window=256,rest=int2,recent=int4",
                                                     "orthogonal")}
    elements = kv_elements(config, batch, tokens)
    floor = floor_bits(config, batch, tokens, block_size, dtype_bytes)
    for bits, _, _ in TARGETS:
        if bits < floor * 1.01:  # 1%: the block table, which the floor leaves out
            skipped.append(f"budget {bits:g} bits: below the {floor:.2f} bits of every block at INT2 plus the "
                           f"model-dtype tail and rotation matrices at {tokens} tokens; no policy can meet it")
            continue
        budget = int(bits * elements / 8)  # whole-cache bytes: at most `bits` per element once `tokens` are held
        rows[f"budget {bits:g}b over int4, rot"] = make(kvprec.policy.budget("uniform:int4", bytes=budget),
                                                        "orthogonal")
        rows[f"budget {bits:g}b over sink4+recent, rot"] = make(
            kvprec.policy.budget("sink_window:sinks=4,window=128,rest=int4", bytes=budget), "orthogonal")
    for spec in hf_specs:
        try:
            rows[hf_cache_name(spec)] = hf_cache(spec, config)
        except ValueError as exc:
            print(f"skipped {spec}: {exc}", file=sys.stderr)
    return rows


def verdict(row) -> tuple:
    """(target, met) by the row's whole-cache bits; uniform INT4 by name; stock caches are held to none."""
    name, ppl, top1, bits = row["cache"], row["ppl_change"], row["top1_agreement"], row["bits_per_element"]
    if row.get("page_bits_per_element") is None:
        return "-", None
    if name == "uniform:int4":
        return "int4: <= +0.5%, >= 97%", ppl <= 0.005 and top1 >= 0.97
    for limit, max_ppl, min_top1 in TARGETS:
        if bits <= limit:
            label = f"<= {limit:g} bits: <= +{max_ppl:.1%}" + (f", >= {min_top1:.0%}" if min_top1 else "")
            return label, ppl <= max_ppl and (min_top1 is None or top1 >= min_top1)
    return "-", None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result["kinds"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for row in result["kinds"][kind]["rows"][1:]:
            stock = row.get("page_bits_per_element") is None
            ax.scatter(row["bits_per_element"], 100 * row["ppl_change"], marker="s" if stock else "o",
                       color="tab:gray" if stock else ("tab:green" if row.get("meets_target") else "tab:red"))
            ax.annotate(row["cache"], (row["bits_per_element"], 100 * row["ppl_change"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
        for bits, max_ppl, _ in TARGETS:
            ax.plot([0, bits], [100 * max_ppl] * 2, color="tab:blue", lw=0.8, ls=":")
        ax.set_xlabel("bits per K/V element, whole cache")
        ax.set_ylabel("perplexity change vs DynamicCache, %")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(f"{result['model']}: {kind}")
        ax.grid(alpha=0.3)
    fig.suptitle("green: meets its target, red: misses it, gray squares: transformers QuantizedCache; "
                 "dotted: targets", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="what kvprec.models.load accepts: tiny, smollm2-135m, a path")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=256, help="teacher-forced predictions per window")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hf-caches", default="quanto:4,quanto:2,hqq:4,hqq:2",
                   help="transformers QuantizedCache rows (kvprec.hf.eval.hf_cache specs), comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON file; the Pareto plot goes beside it (.png)")
    args = p.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            p.error(f"--kinds: unknown kind {k!r}; accepted: {', '.join(KINDS)}")
    if args.prefill < 1024:
        p.error(f"--prefill {args.prefill}: the suite measures long contexts, use >= 1024")
    torch.set_num_threads(args.threads)
    loaded = load(args.model, dtype=getattr(torch, args.dtype))
    config = loaded.model.config
    length = args.prefill + args.tokens
    name = Path(args.model).stem if args.model.endswith(".safetensors") else loaded.name
    result = {"command": " ".join(["python"] + sys.argv), "args": vars(args), "model": name,
              "versions": {"torch": torch.__version__, "kvprec": kvprec.__version__, "python": platform.python_version()},
              "kinds": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        tokens = windows(loaded.encode, kind_text(kind), args.windows, length)
        skipped = []
        every = caches(config, args.windows, length - 1, args.block_size, [s for s in args.hf_caches.split(",") if s],
                       torch.finfo(getattr(torch, args.dtype)).bits // 8, skipped)
        for note in skipped:
            print(f"{kind}: {note}", file=sys.stderr)
        start = time.perf_counter()
        comparison = compare(loaded.model, tokens, args.prefill, every, progress=True)
        rows = comparison.rows()
        for row in rows[1:]:
            row["target"], row["meets_target"] = verdict(row)
        result["kinds"][kind] = {"predictions": int(comparison.reference.nll.numel()),
                                 "reference_perplexity": comparison.reference.perplexity, "rows": rows,
                                 "skipped": skipped,
                                 "seconds": time.perf_counter() - start}
        print(f"\n== {name} / {kind}: {args.windows} x {args.tokens} predictions after {args.prefill} tokens")
        print(comparison.format())
        for row in rows[1:]:
            met = "-" if row["meets_target"] is None else ("yes" if row["meets_target"] else "NO")
            print(f"  {row['cache']:40s} {row['target']:30s} {met}")
        # written after every kind (whole, through a temporary file), so a long run keeps what it has measured
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
