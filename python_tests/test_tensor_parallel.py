"""AdaptiveCache under transformers' tensor parallelism: two CPU ranks (gloo) under torchrun against one process.

One torchrun launch runs every case of python_tests/tp_cases.py on Llama, Mistral (sliding window shorter than the
generation, so blocks are evicted) and Gemma 2 (sliding window and logit softcap); the same cases then run in this
process. Asserted: FP32 tiers give DynamicCache's tokens under TP; every quantized policy gives the tokens of the
one-process run (each rank quantizes its heads as the whole model would); each rank holds half the KV heads; the
global memory report (kvprec.hf.distributed.global_memory_report) is the sum of the ranks' reports, equals the
one-process cache's bytes for per-head policies (uniform, sink_window, attention_mass), and a global byte budget and
a bits-per-element budget are met by the ranks together. Curvature calibration under TP gives each rank the
one-process map's rows for its heads; ``kvprec eval`` run by the ranks gives the one-process figures.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_cases
from kvprec.cli import main

CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 12}),
    "gemma2": ("Gemma2Config", {"sliding_window": 12, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                "head_dim": 16, "query_pre_attn_scalar": 16}),
}


EXPORT_TINY = Path(__file__).resolve().parent.parent / "examples" / "export_tiny_hf.py"


def _export_tiny():
    """examples/export_tiny_hf.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("export_tiny_hf", EXPORT_TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save_models(root: Path) -> dict:
    import transformers

    paths = {"tiny-hf": str(_export_tiny().export(root / "tiny-hf"))}
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
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).parent / "tp_cases.py"), str(root / "models.json"), str(root)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    single = tp_cases.run_cases(models, tensor_parallel=False)
    single["calibration"] = tp_cases.run_calibration(models, tensor_parallel=False)
    assert main(tp_cases.eval_argv(models, str(root / "eval_one.json"))) == 0
    single["eval"] = json.loads((root / "eval_one.json").read_text())
    ranks[0]["eval"] = json.loads((root / "eval_tp.json").read_text())  # rank 0 writes the launch's rows
    return ranks, single


CALIBRATIONS = [f"{f}/{mode}" for f in CONFIGS for mode in ("threshold", "budget", "quality")]
CASES = sorted({f"{f}/{name}" for f in CONFIGS for name, spec, _ in tp_cases.POLICIES
                if spec != "dynamic" and (name != "budget bytes" or f == "llama")})
#: per-head policies: a head's tiers depend on that head alone, so TP stores exactly what one process stores. A
#: budget is met by each rank on its share (bytes) or its own pages (bits per element), demoting the least important
#: of its own heads' blocks, so its demotions (and tokens) may differ from one process.
PER_HEAD = [c for c in CASES if "budget" not in c]


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


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_a_bits_per_element_budget_holds_over_all_ranks(runs, family):
    """A bits-per-element budget is a ratio: each rank meets it on its own sealed pages, so their sum meets it."""
    ranks, single = runs
    case = [rank[f"{family}/budget bits"] for rank in ranks]
    assert case[0]["global_page_bits"] == case[1]["global_page_bits"] <= case[0]["budget"]
    assert single[f"{family}/budget bits"]["global_page_bits"] <= case[0]["budget"]
    assert case[0]["global_page_bits"] < ranks[0][f"{family}/int4"]["global_page_bits"]  # the budget bites


def _config_dir(tmp_path, heads, kv_heads):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=9 * 8, intermediate_size=64, num_hidden_layers=1, num_attention_heads=heads,
                num_key_value_heads=kv_heads).save_pretrained(tmp_path)
    return str(tmp_path)


def test_generate_tp_refuses_what_cannot_be_split(tmp_path, capsys):
    """``kvprec generate --tp N`` checks before launching anything: heads that do not split over N ranks (SmolLM2's 9
    / 3 over 2) and the tiny model, which is not a Hugging Face checkpoint."""
    for argv, words in ((["--model", _config_dir(tmp_path, 9, 3), "--tp", "2"], ["--tp 2", "9 attention heads",
                                                                                  "accepted: 3"]),
                        (["--model", "tiny", "--tp", "2"], ["--tp 2", "not a Hugging Face checkpoint"])):
        with pytest.raises(SystemExit) as stop:
            main(["generate", *argv, "--prompt", "x"])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err


@pytest.mark.parametrize("case", CALIBRATIONS)
def test_a_ranks_curvature_map_is_the_one_process_maps_rows(runs, case):
    """Curvature.calibrate under TP: each rank's map is the rows of its KV head in the one-process map (threshold,
    byte-budget knapsack, error target over all heads), and the ranks' page bytes and predicted errors add up to
    the one-process map's."""
    ranks, single = runs
    one = single["calibration"][case]
    layers = len(one["tiers"])
    for r, rank in enumerate(ranks):
        mine = rank["calibration"][case]
        assert mine["tiers"] == [t[r:r + 1] for t in one["tiers"]]
        assert mine["default_tiers"] == [t[r:r + 1] for t in one["default_tiers"]]
        for got, want in zip(mine["kappa_sum"], one["kappa_sum"]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want)[r:r + 1], rtol=1e-4, atol=0)
        assert mine["heads"] == [r] * layers  # the report's rows: this rank's head, by its index in the model
    parts = [rank["calibration"][case] for rank in ranks]
    assert sum(p["page_bytes"] for p in parts) == one["page_bytes"]
    assert sum(p["predicted_error"] for p in parts) == pytest.approx(one["predicted_error"], rel=1e-4)
    if case.endswith("budget"):
        assert one["page_bytes"] <= one["budget"]


def test_calibrated_maps_choose_more_than_one_tier(runs):
    """The maps the test compares are not trivial: the budget and quality maps mix tiers."""
    _, single = runs
    for case in CALIBRATIONS:
        if not case.endswith("threshold"):
            tiers = {x for layer in single["calibration"][case]["tiers"] for row in layer for x in row}
            assert len(tiers) > 1, case


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_a_calibrated_curvature_policy_gives_the_one_process_tokens(runs, family):
    ranks, single = runs
    got = [rank["calibration"][f"{family}/budget"]["tokens"] for rank in ranks]
    assert got[0] == got[1] == single["calibration"][f"{family}/budget"]["tokens"]


def test_eval_under_tp_gives_the_one_process_figures(runs):
    """``kvprec eval`` run by the two ranks (rank 0 writes the rows) against the same command in one process:
    perplexity within FP32 rounding of the sharded matmuls, top-1 agreement within one prediction of 48, and bits
    per element of all ranks' caches equal to the one-process cache's (per-head policies, DynamicCache)."""
    ranks, single = runs
    tp, one = ranks[0]["eval"], single["eval"]
    assert tp["tensor_parallel_ranks"] == 2 and one["tensor_parallel_ranks"] == 1
    assert [r["cache"] for r in tp["rows"]] == [r["cache"] for r in one["rows"]] == [
        "reference", "uniform:int4", "sink_window:sinks=4,window=32,rest=int2,recent=int8", "DynamicCache"]
    for got, want in zip(tp["rows"], one["rows"]):
        assert got["predictions"] == want["predictions"] == 48
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
        assert got["ppl_change"] == pytest.approx(want["ppl_change"], abs=1e-5)
        assert abs(got["top1_agreement"] - want["top1_agreement"]) <= 1 / 48
        assert got["bits_per_element"] == want["bits_per_element"]
        assert got["page_bits_per_element"] == want["page_bits_per_element"]
    assert abs(one["rows"][2]["ppl_change"]) > 1e-3  # INT2 pages move the perplexity: the comparison is not vacuous


def test_eval_tp_refuses_before_launching(tmp_path, capsys, monkeypatch):
    """``kvprec eval --tp N`` checks everything before launching: heads that do not split, the tiny model, and a
    text too short for the windows (counted with the model's tokenizer alone)."""
    from kvprec.commands import model_args

    monkeypatch.setattr(model_args, "launch_tensor_parallel", lambda args: pytest.fail("launched"))
    tiny = _export_tiny().export(tmp_path / "tiny-hf")
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    capsys.readouterr()  # the export's progress bar
    for argv, words in ((["--model", _config_dir(tmp_path / "c", 9, 3), "--text", str(short)],
                         ["--tp 2", "9 attention heads", "accepted: 3"]),
                        (["--model", "tiny"], ["--tp 2", "not a Hugging Face checkpoint"]),
                        (["--model", str(tiny), "--text", str(short)], ["--text", "100 tokens", "--prefill 512"])):
        with pytest.raises(SystemExit) as stop:
            main(["eval", *argv, "--tp", "2", "--policy", "uniform:int4"])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_tp_relaunches_the_same_command_under_torchrun(monkeypatch):
    """--tp N (either spelling) becomes torchrun --standalone --nproc-per-node N with the other arguments as given."""
    import subprocess as sp

    from kvprec.commands import model_args

    seen = []
    monkeypatch.setattr(sp, "run", lambda cmd: seen.append(cmd) or sp.CompletedProcess(cmd, 3))
    for argv in (["eval", "--tp", "2", "--policy", "uniform:int4"], ["eval", "--tp=2", "--policy", "uniform:int4"]):
        args = type("Args", (), {"tp": 2, "argv": argv})()
        assert model_args.launch_tensor_parallel(args) == 3
    assert seen[0] == seen[1] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  "2", "-m", "kvprec.cli", "eval", "--policy", "uniform:int4"]
