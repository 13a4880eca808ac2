"""The cases of python_tests/test_tensor_parallel.py, run both under ``torchrun --nproc-per-node 2`` (this file is
the worker: ``python -m torch.distributed.run --nproc-per-node 2 python_tests/tp_cases.py MODELS_JSON OUT_DIR``)
and in one process (the test imports :func:`run_cases`). Each case generates greedily from one prompt with one
cache and records the tokens, the cache's stored K/V shape on this rank, its memory report (this rank's and the
global one) and, for the byte-budget case, the budget (halfway between the uniform INT4
and INT2 cases' bytes)."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

PROMPT = [1, 5, 9, 13, 2, 7]  # short: a long prefill briefly holds its whole chunk in the tail, over the budget
NEW_TOKENS = 26  # past the sliding windows of 12 (Mistral, Gemma 2)
BLOCK = 4
#: (name, policy spec or "dynamic", key rotation); the budget case's bytes are set per model in run_cases
POLICIES = (("dynamic", "dynamic", None), ("fp32", "uniform:fp32", None), ("int4", "uniform:int4", None),
            ("int2", "uniform:int2", None), ("int2 rotated", "uniform:int2", "orthogonal"),
            ("sink_window", "sink_window:sinks=4,window=8,rest=int4,recent=fp16", None),
            ("budget bytes", "budget", None))


def run_cases(models: dict, tensor_parallel: bool) -> dict:
    import kvprec
    from kvprec.hf.cache import Int2KeysWarning
    from kvprec.hf.distributed import global_memory_report
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.manual_seed(0)
    out = {}
    for family, path in models.items():
        kwargs = {"tp_plan": "auto"} if tensor_parallel else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
        ids = torch.tensor([PROMPT])
        for name, spec, rotation in POLICIES:
            if spec == "dynamic":
                cache = DynamicCache(config=model.config)
                gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache)
                out[f"{family}/{name}"] = {"tokens": gen[0].tolist()}
                continue
            budget = None
            if spec == "budget" and family != "llama":
                continue  # a byte budget splits equally over layers: sliding-window families' layers differ
            if spec == "budget":
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
                "budget": budget}
    return out


def main() -> int:
    import torch.distributed as dist

    models, out_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    torch.set_num_threads(1)
    result = run_cases(models, tensor_parallel=True)  # from_pretrained(tp_plan=...) sets up the process group
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
