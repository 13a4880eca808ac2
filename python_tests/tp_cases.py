"""The cases of python_tests/test_tensor_parallel.py, run both under ``torchrun --nproc-per-node 2`` (this file is
the worker: ``python -m torch.distributed.run --nproc-per-node 2 python_tests/tp_cases.py MODELS_JSON OUT_DIR``)
and in one process (the test imports :func:`run_cases`). Each case generates greedily from one prompt with one
cache and records the tokens, the cache's stored K/V shape on this rank, its memory report (this rank's and the
global one) and, for the byte-budget case, the budget (halfway between the uniform INT4
and INT2 cases' bytes). :func:`run_calibration` calibrates the curvature policy in each mode and records the maps;
:func:`eval_argv` is a ``kvprec eval`` command, run by the ranks (one JSON from rank 0) and by the test."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

PROMPT = [1, 5, 9, 13, 2, 7]  # short: a long prefill briefly holds its whole chunk in the tail, over the budget
NEW_TOKENS = 26  # past the sliding windows of 12 (Mistral, Gemma 2)
BLOCK = 4
#: (name, policy spec or "dynamic", key rotation); the budget cases' budgets are set per model in run_cases
POLICIES = (("dynamic", "dynamic", None), ("fp32", "uniform:fp32", None), ("int4", "uniform:int4", None),
            ("int2", "uniform:int2", None), ("int2 rotated", "uniform:int2", "orthogonal"),
            ("sink_window", "sink_window:sinks=4,window=8,rest=int4,recent=fp16", None),
            ("attention_mass", "attention_mass:keep=0.5,high=fp16,low=int2", None),
            ("budget bytes", "budget", None), ("budget bits", "budget", None))


def load(path: str, tensor_parallel: bool):
    """The FP32 model at ``path``; sharded over the launch's ranks by transformers' "auto" plan (the
    DistributedConfig of transformers 5; its tp_plan= argument is deprecated)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    kwargs = {"distributed_config": DistributedConfig(tp_plan="auto")} if tensor_parallel else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def cache_head_dim(config) -> int:
    text = config.get_text_config(decoder=True)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def run_cases(models: dict, tensor_parallel: bool) -> dict:
    import kvprec
    from kvprec.hf.cache import Int2KeysWarning
    from kvprec.hf.distributed import global_memory_report
    from transformers import DynamicCache

    torch.manual_seed(0)
    out = {}
    for family, path in models.items():
        if family == "tiny-hf":
            continue  # kvprec eval's model (eval_argv)
        model = load(path, tensor_parallel)
        ids = torch.tensor([PROMPT])
        for name, spec, rotation in POLICIES:
            if spec == "dynamic":
                cache = DynamicCache(config=model.config)
                gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache)
                out[f"{family}/{name}"] = {"tokens": gen[0].tolist()}
                continue
            budget = None
            if name == "budget bytes" and family != "llama":
                continue  # a byte budget splits equally over layers: sliding-window families' layers differ
            if name == "budget bits":
                # halfway between INT4 and INT2 pages: per layer, over the heads this rank holds
                from kvprec.storage.formats import BlockGeometry, Tier

                g = BlockGeometry(BLOCK, cache_head_dim(model.config))
                budget = sum(8 * g.page_bytes(t) / (2 * BLOCK * g.head_dim) for t in (Tier.INT4, Tier.INT2)) / 2
                spec = kvprec.policy.budget("uniform:int4", bits_per_element=budget)
            elif spec == "budget":
                # halfway between what uniform INT4 and uniform INT2 held: some blocks must go to INT2, and the
                # floor (everything at INT2) fits at every length up to the last
                budget = (out[f"{family}/int4"]["global_resident_bytes"] + out[f"{family}/int2"]["global_resident_bytes"]) // 2
                spec = kvprec.policy.budget("uniform:int4", bytes=budget)
            cache = kvprec.AdaptiveCache(model.config, policy=spec, block_size=BLOCK, key_rotation=rotation)
            with kvprec.enabled(model), warnings.catch_warnings():
                warnings.simplefilter("ignore", Int2KeysWarning)  # INT2 without rotation is compared on purpose
                gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache)
            local, total = cache.memory_report(), global_memory_report(cache)
            out[f"{family}/{name}"] = {
                "tokens": gen[0].tolist(), "local_heads": int(cache.layers[0].tiers().shape[1]),
                "local_resident_bytes": local.resident_bytes, "global_resident_bytes": total.resident_bytes,
                "global_elements": int(total.elements.sum()), "global_precision_map": total.precision_map.tolist(),
                "global_page_bits": total.page_bits_per_element, "budget": budget}
    return out


#: calibration of the curvature policy: a prompt of CALIBRATION_TOKENS tokens (vocabulary 64), blocks of BLOCK
CALIBRATION_TOKENS = 23  # a partial last block


def run_calibration(models: dict, tensor_parallel: bool) -> dict:
    """Curvature.calibrate on every family in each mode: threshold; a byte budget halfway between every block at
    INT4 and every block at FP16 (the knapsack over every layer, head and block of the model); quality with half
    the predicted error of the threshold map (summed over the ranks). Records each map's rows (this rank's heads)
    and, for the budget map, the tokens the policy generates."""
    import kvprec
    from kvprec.hf.distributed import sum_over_ranks
    from kvprec.storage.formats import BlockGeometry, Tier

    out = {}
    ids = torch.tensor([[(7 * i + 3) % 64 for i in range(CALIBRATION_TOKENS)]])
    for family, path in models.items():
        if family == "tiny-hf":
            continue
        model = load(path, tensor_parallel)
        text = model.config.get_text_config(decoder=True)
        g = BlockGeometry(BLOCK, cache_head_dim(model.config))
        items = text.num_hidden_layers * text.num_key_value_heads * -(-CALIBRATION_TOKENS // BLOCK)
        budget = items * (g.page_bytes(Tier.INT4) + g.page_bytes(Tier.FP16)) // 2
        calibrate = kvprec.policy.Curvature.calibrate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sliding windows / softcaps are outside the closed form: warned
            maps = {"threshold": calibrate(model, ids, mode="threshold", block_size=BLOCK),
                    "budget": calibrate(model, ids, mode="budget", budget_bytes=budget, block_size=BLOCK)}
            error = sum_over_ranks(maps["threshold"].map.predicted_error)  # the whole model's
            maps["quality"] = calibrate(model, ids, mode="quality", max_error=error / 2, block_size=BLOCK)
        for mode, policy in maps.items():
            m = policy.map
            out[f"{family}/{mode}"] = {
                "tiers": [t.tolist() for t in m.tiers], "default_tiers": [t.tolist() for t in m.default_tiers],
                "kappa_sum": [t.tolist() for t in m.kappa_sum], "page_bytes": m.page_bytes,
                "predicted_error": m.predicted_error, "heads": [h.head for h in m.heads], "budget": budget}
        cache = kvprec.AdaptiveCache(model.config, policy=maps["budget"], block_size=BLOCK)
        with kvprec.enabled(model):
            gen = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 past_key_values=cache)
        out[f"{family}/budget"]["tokens"] = gen[0].tolist()
    return out


def eval_argv(models: dict, json_path: str) -> list:
    """``kvprec eval`` on the tiny model saved as a Hugging Face directory (examples/export_tiny_hf.py): two
    windows, per-head policies and a stock DynamicCache row."""
    tiny = models["tiny-hf"]
    return ["eval", "--model", tiny, "--text", str(Path(tiny) / "eval.txt"), "--policy", "uniform:int4",
            "--policy", "sink_window:sinks=4,window=32,rest=int2,recent=int8", "--hf-cache", "dynamic",
            "--prefill", "96", "--tokens", "24", "--windows", "2", "--block-size", "16", "--json", json_path]


def main() -> int:
    import torch.distributed as dist

    from kvprec.cli import main as cli

    models, out_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    torch.set_num_threads(1)
    result = run_cases(models, tensor_parallel=True)  # the sharded from_pretrained sets up the process group
    result["calibration"] = run_calibration(models, tensor_parallel=True)
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    if cli(eval_argv(models, str(out_dir / "eval_tp.json"))) != 0:  # under torchrun: each rank is one of the ranks
        return 1
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
