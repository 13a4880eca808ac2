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

The rows (``ROWS``: policy, block size, key rotation) were chosen on one model and one kind, SmolLM2-135M-Instruct
on code, against the other levers tried (``LEVERS``, added by ``--levers``), and are applied unchanged to every
model and kind here. Each kvprec row also records its whole-cache bits split into codes, scales and zeros, tail,
block table and rotation (``bits_parts``), and the JSON the parts of the floor (every block at INT2) at
T = 32 / 64 / 128 (``floor_bits``). ``--plot`` writes the Pareto plot (perplexity change against whole-cache bits, one panel per
kind) beside the JSON.

Each row also carries its figures per window (``per_window``), a 95% interval across windows (``interval_95``,
:func:`window_interval`) and whether its target is met, not met or not settled by that interval (``settled``,
:func:`settled`): a verdict from one run is not a measurement when rounding alone moves it by about a point.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
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


def kv_shape(config) -> tuple:
    """(layers L, KV heads H, head_dim D) of a transformers config."""
    c = config.get_text_config(decoder=True)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return c.num_hidden_layers, heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def kv_elements(config, batch: int, tokens: int) -> int:
    """K and V elements of a cache holding ``tokens`` positions of every layer: 2 * L * B * H * N * D."""
    layers, heads, head_dim = kv_shape(config)
    return 2 * layers * batch * heads * tokens * head_dim


def floor_bits(config, batch: int, tokens: int, block_size: int, dtype_bytes: int, group_size=None) -> dict:
    """What the fewest whole-cache bits per K/V element any policy can reach with ``tokens`` held are made of:
    every sealed block at INT2 and key rotation on. Bits per element, each part over all 2 L B H N D elements:

    * codes: 2 bits per sealed element;
    * scales_zeros: FP16 scale + zero per key channel per block (32 / T bits per key element) and per value group
      per token (32 / G bits per value element), over the sealed elements;
    * tail: the unsealed tail, allocated as a whole block of T positions in the model dtype whatever its fill
      (T * dtype bits / N per element);
    * rotation: one D x D FP32 key rotation per layer (D * 32 / (2 B H N));
    * total (the block table, a few bytes per block, is left out: ~0.1% at these sizes)."""
    layers, heads, head_dim = kv_shape(config)
    geometry = kvprec.BlockGeometry(block_size, head_dim, group_size)
    sealed = tokens // block_size * block_size
    rows = layers * batch * heads
    parts = {"codes": rows * sealed * head_dim * 2 * 2 / 8,
             "scales_zeros": rows * sealed // block_size * geometry.metadata_bytes(kvprec.Tier.INT2),
             "tail": rows * 2 * block_size * head_dim * dtype_bytes,
             "rotation": layers * head_dim * head_dim * 4}
    elements = kv_elements(config, batch, tokens)
    out = {name: b * 8 / elements for name, b in parts.items()}
    out["total"] = sum(out.values())
    return out


def bits_parts(memory, block_size: int, head_dim: int) -> dict:
    """A kvprec cache's measured whole-cache bits per element split as :func:`floor_bits` splits them: codes
    (the page bytes of every tier's data), scales_zeros (the rest of the page bytes), tail, table, rotation."""
    elements = int(memory.elements.sum())
    pages = memory.precision_map.sum(dim=(0, 1))  # sealed blocks per tier, every layer, head and batch row
    codes = sum(int(n) * 2 * block_size * head_dim * t.bits // 8 for t, n in zip(kvprec.Tier, pages.tolist()))
    byte_parts = {"codes": codes, "scales_zeros": int(memory.tier_bytes.sum()) - codes,
                  "tail": int(memory.tail_bytes.sum()), "table": int(memory.table_bytes.sum()),
                  "rotation": int(memory.rotation_bytes.sum())}
    return {name: b * 8 / elements for name, b in byte_parts.items()}


#: name -> (policy spec, block size, key rotation[, value rotation]). Chosen on SmolLM2-135M-Instruct, code, against the rows of
#: LEVERS (README "Quality on a real model"), applied unchanged to every model and kind.
ROWS = {
    "uniform:int8": ("uniform:int8", 64, None),
    "uniform:int4": ("uniform:int4", 64, None),
    "uniform:int4 rot": ("uniform:int4", 64, "orthogonal"),
    "uniform:int2 rot": ("uniform:int2", 64, "orthogonal"),
    "attention_mass 1/4 int4, rest int2, rot": ("attention_mass:keep=0.25,high=int4,low=int2", 64, "orthogonal"),
    # values rotated too (chosen for the sub-4-bit rows on SmolLM2 code; it cost INT4 perplexity there)
    "uniform:int2 rot k+v": ("uniform:int2", 64, "orthogonal", "orthogonal"),
    "attention_mass 1/4 int4, rest int2, rot k+v": ("attention_mass:keep=0.25,high=int4,low=int2", 64, "orthogonal",
                                                    "orthogonal"),
    "attention_mass 1/32 int4, rest int2, rot k+v": ("attention_mass:keep=0.03125,high=int4,low=int2", 64,
                                                     "orthogonal", "orthogonal"),
}
#: the other levers tried (``--levers``): block size T, rotation kind, sinks and window.
LEVERS = {
    "uniform:int4 T32": ("uniform:int4", 32, None),
    "uniform:int4 T128": ("uniform:int4", 128, None),
    "uniform:int4 rot:hadamard": ("uniform:int4", 64, "hadamard"),
    "uniform:int4 T32 rot:hadamard": ("uniform:int4", 32, "hadamard"),
    "sinks 64 int8, rest int4": ("sink_window:sinks=64,window=0,rest=int4,recent=int8", 64, None),
    "uniform:int2 rot:hadamard": ("uniform:int2", 64, "hadamard"),
    "uniform:int2 T32 rot": ("uniform:int2", 32, "orthogonal"),
    "sinks 64 + recent 256 int4, rest int2, rot": ("sink_window:sinks=64,window=256,rest=int2,recent=int4", 64,
                                                   "orthogonal"),
    "sinks 64 + recent 256 int8, rest int2, rot": ("sink_window:sinks=64,window=256,rest=int2,recent=int8", 64,
                                                   "orthogonal"),
    "uniform:int4 rot k+v": ("uniform:int4", 64, "orthogonal", "orthogonal"),
}


def caches(config, batch: int, tokens: int, hf_specs, dtype_bytes: int, skipped: list, levers: bool = False,
           names=None):
    """Row name -> (cache factory, block size or None for a stock cache). ``names``: only these rows of ROWS and
    LEVERS (and no budget rows); None: ROWS (with LEVERS if ``levers``) and the budget rows. Budgets below
    :func:`floor_bits` (at T = 64) are skipped (appended to ``skipped`` with the reason): no policy can meet them."""
    def make(policy, block_size, rotation, value_rotation=None):
        return lambda: kvprec.AdaptiveCache(config, policy=policy, block_size=block_size, key_rotation=rotation,
                                            value_rotation=value_rotation)

    chosen = {**ROWS, **(LEVERS if levers else {})}
    if names is not None:
        chosen = {name: {**ROWS, **LEVERS}[name] for name in names}
    rows = {name: (make(*row), row[1]) for name, row in chosen.items()}
    elements = kv_elements(config, batch, tokens)
    floor = floor_bits(config, batch, tokens, 64, dtype_bytes)["total"]
    for bits, _, _ in TARGETS if names is None else ():
        if bits < floor * 1.01:  # 1%: the block table, which the floor leaves out
            skipped.append(f"budget {bits:g} bits: below the {floor:.2f} bits of every block at INT2 plus the "
                           f"model-dtype tail and rotation matrices at {tokens} tokens; no policy can meet it")
            continue
        budget = int(bits * elements / 8)  # whole-cache bytes: at most `bits` per element once `tokens` are held
        rows[f"budget {bits:g}b over attention_mass int8/int4, rot"] = (make(kvprec.policy.budget(
            "attention_mass:keep=0.25,high=int8,low=int4", bytes=budget), 64, "orthogonal"), 64)
    for spec in hf_specs:
        try:
            rows[hf_cache_name(spec)] = (hf_cache(spec, config), None)
        except ValueError as exc:
            print(f"skipped {spec}: {exc}", file=sys.stderr)
    return rows


def target(row) -> tuple:
    """(label, max perplexity change, min top-1 or None) of the row's target, by its whole-cache bits; uniform INT4
    by name; ("-", None, None) where none applies (stock caches, sub-4-bit rows above 3.0 bits)."""
    if row.get("page_bits_per_element") is None:
        return "-", None, None
    if row["cache"].split(" ")[0] == "uniform:int4":  # every uniform INT4 variant (block size, rotation)
        return "int4: <= +0.5%, >= 97%", 0.005, 0.97
    for limit, max_ppl, min_top1 in TARGETS:
        if row["bits_per_element"] <= limit:
            label = f"<= {limit:g} bits: <= +{max_ppl:.1%}" + (f", >= {min_top1:.0%}" if min_top1 else "")
            return label, max_ppl, min_top1
    return "-", None, None


def verdict(row) -> tuple:
    """(target, met) of the row's figures over all windows together; met is None where no target applies."""
    label, max_ppl, min_top1 = target(row)
    if max_ppl is None:
        return label, None
    return label, row["ppl_change"] <= max_ppl and (min_top1 is None or row["top1_agreement"] >= min_top1)


def per_window(comparison, name: str) -> dict:
    """One cache's figures per window (row b of the batch): perplexity change exp(d_b) - 1 with d_b the mean NLL
    difference to the reference over the window's predictions, and top-1 agreement a_b. With the same number of
    predictions per window, the row's overall figures are exp(mean_b d_b) - 1 and mean_b a_b."""
    ref, res = comparison.reference, comparison.results[name]
    diff = (res.nll.double() - ref.nll.double()).mean(1)
    agree = (res.argmax == ref.argmax).double().mean(1)
    return {"ppl_change": torch.expm1(diff).tolist(), "top1_agreement": agree.tolist()}


def window_interval(figures: dict, predictions: int, confidence: float = 0.95):
    """A ``confidence`` interval across windows from :func:`per_window`'s figures (``predictions`` per window), or
    None for one window.

    Student-t over the n windows as independent samples (the predictions inside one window are not: a rounding
    flip early in the window moves every later one): mean +- t_{(1+confidence)/2, n-1} s / sqrt(n), with s the
    windows' sample standard deviation; for perplexity on the mean NLL difference d_b = log1p(ppl change), mapped
    back by exp(.) - 1. For top-1, s is at least the binomial sqrt(a (1 - a) / m) of one window's m predictions at
    the mean agreement a: correlated predictions spread windows more than independent ones, never less, and a few
    windows can show no spread at all (top-1 moves in steps of 1 / m: two windows at 96.1% each); clipped to [0, 1].
    Returns {"ppl_change": [lo, hi], "top1_agreement": [lo, hi]}."""
    from scipy.stats import t as student_t

    n = len(figures["top1_agreement"])
    if n < 2:
        return None
    half = student_t.ppf((1 + confidence) / 2, n - 1) / n ** 0.5
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    d = torch.log1p(torch.tensor(figures["ppl_change"], dtype=torch.float64))
    a = torch.tensor(figures["top1_agreement"], dtype=torch.float64)
    a_sd = max(float(a.std()), float(a.mean() * (1 - a.mean()) / predictions) ** 0.5)
    ppl = torch.expm1(d.mean() + half * d.std() * sign)
    top1 = (a.mean() + half * a_sd * sign).clamp(0, 1)
    return {"ppl_change": ppl.tolist(), "top1_agreement": top1.tolist()}


def settled(row):
    """Whether the row's interval settles its target: "met" (every bound on the good side of every limit), "not
    met" (some interval wholly on the bad side), "not settled" (an interval straddles a limit and none is wholly
    bad); None where no target applies or the row has no interval."""
    _, max_ppl, min_top1 = target(row)
    interval = row.get("interval_95")
    if max_ppl is None or interval is None:
        return None
    (ppl_lo, ppl_hi), (top1_lo, top1_hi) = interval["ppl_change"], interval["top1_agreement"]
    checks = [(ppl_hi <= max_ppl, ppl_lo > max_ppl)]  # (surely met, surely missed)
    if min_top1 is not None:
        checks.append((top1_lo >= min_top1, top1_hi < min_top1))
    if any(missed for _, missed in checks):
        return "not met"
    return "met" if all(met for met, _ in checks) else "not settled"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result["kinds"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for row in result["kinds"][kind]["rows"][1:]:
            stock = row.get("page_bits_per_element") is None
            met = row.get("meets_target")
            ax.scatter(row["bits_per_element"], 100 * row["ppl_change"], marker="s" if stock else "o",
                       color="tab:gray" if stock else {True: "tab:green", False: "tab:red", None: "tab:blue"}[met])
            ax.annotate(row["cache"], (row["bits_per_element"], 100 * row["ppl_change"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
        for bits, max_ppl, _ in TARGETS:
            ax.plot([0, bits], [100 * max_ppl] * 2, color="tab:blue", lw=0.8, ls=":")
        ax.set_xlabel("bits per K/V element, whole cache")
        ax.set_ylabel("perplexity change vs DynamicCache, %")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(f"{result['model']}: {kind}")
        ax.grid(alpha=0.3)
    fig.suptitle("green: meets its target, red: misses it, blue: no target at its bits, gray squares: transformers "
                 "QuantizedCache; dotted: targets", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="what kvprec.models.load accepts: tiny, smollm2-135m, a path")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--windows", type=int, default=2,
                   help="disjoint windows per kind (>= 2 for the interval across windows)")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=256, help="teacher-forced predictions per window")
    p.add_argument("--levers", action="store_true",
                   help="add the rows of every lever tried (LEVERS: block size, rotation kind, sinks, attention mass)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hf-caches", default="quanto:4,quanto:2,hqq:4,hqq:2",
                   help="transformers QuantizedCache rows (kvprec.hf.eval.hf_cache specs), comma-separated")
    p.add_argument("--row", action="append", dest="rows", metavar="NAME",
                   help="run only this row of ROWS or LEVERS, by name (repeatable; no budget rows then)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON file; the Pareto plot goes beside it (.png)")
    args = p.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            p.error(f"--kinds: unknown kind {k!r}; accepted: {', '.join(KINDS)}")
    if args.prefill < 1024:
        p.error(f"--prefill {args.prefill}: the suite measures long contexts, use >= 1024")
    if args.windows < 1:
        p.error(f"--windows {args.windows}: use >= 1 (>= 2 for an interval across windows)")
    for row in args.rows or ():
        if row not in {**ROWS, **LEVERS}:
            p.error(f"--row {row!r}: accepted: {'; '.join({**ROWS, **LEVERS})}")
    torch.set_num_threads(args.threads)
    loaded = load(args.model, dtype=getattr(torch, args.dtype))
    config = loaded.model.config
    length = args.prefill + args.tokens
    name = Path(args.model).stem if args.model.endswith(".safetensors") else loaded.name
    # quoted as a shell reads it: row names hold spaces (--row "uniform:int4 rot"), --hf-caches may be empty
    result = {"command": shlex.join(["python"] + sys.argv), "args": vars(args), "model": name,
              "versions": {"torch": torch.__version__, "kvprec": kvprec.__version__, "python": platform.python_version()},
              "kinds": {}}
    dtype_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    head_dim = kv_shape(config)[2]
    # The floor of the whole-cache bits (every block INT2, rotation on) and its parts, per block size.
    result["floor_bits"] = {str(t): floor_bits(config, args.windows, length - 1, t, dtype_bytes) for t in (32, 64, 128)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    texts = {}
    for kind in kinds:  # every kind's windows before the first pass: too short a text fails at once
        try:
            texts[kind] = windows(loaded.encode, kind_text(kind), args.windows, length)
        except (ValueError, FileNotFoundError) as exc:
            p.error(f"--kinds {kind} --windows {args.windows}: {exc}")
    for kind in kinds:
        tokens = texts[kind]
        skipped = []
        every = caches(config, args.windows, length - 1, [s for s in args.hf_caches.split(",") if s], dtype_bytes,
                       skipped, args.levers, args.rows)
        for note in skipped:
            print(f"{kind}: {note}", file=sys.stderr)
        start = time.perf_counter()
        comparison = compare(loaded.model, tokens, args.prefill, {n: make for n, (make, _) in every.items()},
                             progress=True)
        rows = comparison.rows()
        rows[0]["per_window"] = {"perplexity": torch.exp(comparison.reference.nll.double().mean(1)).tolist()}
        for row in rows[1:]:
            row["target"], row["meets_target"] = verdict(row)
            row["per_window"] = per_window(comparison, row["cache"])
            row["interval_95"] = window_interval(row["per_window"], args.tokens)
            row["settled"] = settled(row)
            block_size = every[row["cache"]][1]
            if block_size is not None:
                row["block_size"] = block_size
                row["bits_parts"] = bits_parts(comparison.results[row["cache"]].memory, block_size, head_dim)
        result["kinds"][kind] = {"predictions": int(comparison.reference.nll.numel()), "windows": args.windows,
                                 "interval": "95%, Student-t across windows, top-1 spread at least binomial (window_interval)",
                                 "reference_perplexity": comparison.reference.perplexity, "rows": rows,
                                 "skipped": skipped,
                                 "seconds": time.perf_counter() - start}
        print(f"\n== {name} / {kind}: {args.windows} x {args.tokens} predictions after {args.prefill} tokens")
        print(comparison.format())
        for row in rows[1:]:
            met = "-" if row["meets_target"] is None else ("yes" if row["meets_target"] else "NO")
            ci = row["interval_95"]
            ci = "" if ci is None else ("95%: {:+.2f}..{:+.2f}% / {:.1f}..{:.1f}%".format(
                *(100 * v for v in ci["ppl_change"] + ci["top1_agreement"])))
            print(f"  {row['cache']:40s} {row['target']:30s} {met:4s} {ci} {row['settled'] or ''}")
        # written after every kind (whole, through a temporary file), so a long run keeps what it has measured
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
