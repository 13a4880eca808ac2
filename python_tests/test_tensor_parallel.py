"""AdaptiveCache under transformers' tensor parallelism: two CPU ranks (gloo) under torchrun against one process.

One torchrun launch runs every case of python_tests/tp_cases.py on Llama, Mistral (sliding window shorter than the
generation, so blocks are evicted) and Gemma 2 (sliding window and logit softcap); the same cases then run in this
process. Asserted: FP32 tiers give DynamicCache's tokens under TP; every quantized policy gives the tokens of the
one-process run (each rank quantizes its heads as the whole model would); each rank holds half the KV heads; the
global memory report (kvprec.hf.distributed.global_memory_report) is the sum of the ranks' reports, equals the
one-process cache's bytes for per-head policies, and a global byte budget is met by the ranks together.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_cases

CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 12}),
    "gemma2": ("Gemma2Config", {"sliding_window": 12, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                "head_dim": 16, "query_pre_attn_scalar": 16}),
}


def _save_models(root: Path) -> dict:
    import transformers

    paths = {}
    for family, (config_name, extra) in CONFIGS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_name)(vocab_size=64, hidden_size=64, intermediate_size=128,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    num_key_value_heads=2, max_position_embeddings=128, **extra)
        model = transformers.AutoModelForCausalLM.from_config(config)
        paths[family] = str(root / family)
        model.save_pretrained(paths[family])
    return paths


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    models = _save_models(root)
    (root / "models.json").write_text(json.dumps(models))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29517", str(Path(__file__).parent / "tp_cases.py"),
                           str(root / "models.json"), str(root)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    single = tp_cases.run_cases(models, tensor_parallel=False)
    return ranks, single


CASES = sorted({f"{f}/{name}" for f in CONFIGS for name, spec, _ in tp_cases.POLICIES
                if spec != "dynamic" and (spec != "budget" or f == "llama")})
#: per-head policies: a head's tiers depend on that head alone, so TP stores exactly what one process stores. A byte
#: budget is met by each rank on its share of the bytes, so its demotions (and tokens) may differ from one process.
PER_HEAD = [c for c in CASES if not c.endswith("budget bytes")]


@pytest.mark.parametrize("case", CASES)
def test_ranks_agree_and_hold_half_the_heads(runs, case):
    ranks, single = runs
    assert ranks[0][case]["tokens"] == ranks[1][case]["tokens"]
    assert ranks[0][case]["local_heads"] == ranks[1][case]["local_heads"] == 1  # 2 KV heads over 2 ranks
    assert single[case]["local_heads"] == 2


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_fp32_tiers_give_dynamic_cache_tokens_under_tp(runs, family):
    ranks, _ = runs
    assert ranks[0][f"{family}/fp32"]["tokens"] == ranks[0][f"{family}/dynamic"]["tokens"]


@pytest.mark.parametrize("case", PER_HEAD)
def test_tokens_equal_the_one_process_run(runs, case):
    ranks, single = runs
    assert ranks[0][case]["tokens"] == single[case]["tokens"]


@pytest.mark.parametrize("case", CASES)
def test_global_report_sums_the_ranks(runs, case):
    ranks, single = runs
    r0, r1, one = ranks[0][case], ranks[1][case], single[case]
    assert r0["global_resident_bytes"] == r1["global_resident_bytes"]
    assert r0["global_resident_bytes"] == r0["local_resident_bytes"] + r1["local_resident_bytes"]
    assert r0["global_elements"] == one["global_elements"]
    if case not in PER_HEAD:
        return
    assert r0["global_precision_map"] == one["global_precision_map"]
    if case.endswith("int2 rotated"):  # each rank holds its own copy of the rotation matrices
        assert r0["global_resident_bytes"] > one["global_resident_bytes"]
    else:
        assert r0["global_resident_bytes"] == one["global_resident_bytes"]


def test_a_global_byte_budget_is_met_by_the_ranks_together(runs):
    """Each rank takes its heads' share of the bytes (kvprec.hf.distributed.head_share), so together they meet it."""
    ranks, single = runs
    case = ranks[0]["llama/budget bytes"]
    assert case["global_resident_bytes"] <= case["budget"]
    assert single["llama/budget bytes"]["global_resident_bytes"] <= case["budget"]
    # the budget bites: the ranks hold less than uniform INT4 would
    assert case["global_resident_bytes"] < ranks[0]["llama/int4"]["global_resident_bytes"]


def _config_dir(tmp_path, heads, kv_heads):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=9 * 8, intermediate_size=64, num_hidden_layers=1, num_attention_heads=heads,
                num_key_value_heads=kv_heads).save_pretrained(tmp_path)
    return str(tmp_path)


def test_generate_tp_refuses_what_cannot_be_split(tmp_path, capsys):
    """``kvprec generate --tp N`` checks before launching anything: heads that do not split over N ranks (SmolLM2's 9
    / 3 over 2) and the tiny model, which is not a Hugging Face checkpoint."""
    from kvprec.cli import main

    for argv, words in ((["--model", _config_dir(tmp_path, 9, 3), "--tp", "2"], ["--tp 2", "9 attention heads",
                                                                                  "accepted: 3"]),
                        (["--model", "tiny", "--tp", "2"], ["--tp 2", "not a Hugging Face checkpoint"])):
        with pytest.raises(SystemExit) as stop:
            main(["generate", *argv, "--prompt", "x"])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
