"""The quality harness: teacher-forced decoding through the cache (kvprec/hf/eval.py) and the CLI commands."""
import json

import pytest
import torch

import kvprec
from kvprec.ops.reference.attention import ReadCounter
from kvprec.hf.eval import compare, teacher_forced


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 256, (1, 150), generator=torch.Generator().manual_seed(5))


def test_fp32_cache_matches_the_reference(tiny_model, tokens):
    model = tiny_model("llama")
    result = compare(model, tokens, 100, {"fp32": lambda: kvprec.AdaptiveCache(model.config, policy="uniform:fp32",
                                                                               block_size=16)})
    assert result.agreement("fp32") == 1.0
    assert abs(result.ppl_change("fp32")) < 1e-5
    assert result.reference.nll.shape == (1, 50)  # one prediction per position after the prefill


def test_quantized_cache_changes_perplexity_measurably(tiny_model, tokens):
    model = tiny_model("llama")
    make = {t: (lambda t=t: kvprec.AdaptiveCache(model.config, policy=f"uniform:{t}", block_size=16))
            for t in ("int8", "int2")}
    result = compare(model, tokens, 100, make)
    # INT2 moves the NLL far more than INT8 on the same tokens: the harness sees the cache.
    d8 = (result.results["int8"].nll - result.reference.nll).abs().mean()
    d2 = (result.results["int2"].nll - result.reference.nll).abs().mean()
    assert d2 > 4 * d8 > 0
    rows = result.rows()
    assert rows[1]["bits_per_element"] < rows[0]["bits_per_element"] and "top-1" in result.format()


def test_decode_steps_read_the_cache(tiny_model, tokens):
    """Every prediction after the first comes from a decode step that reads sealed blocks of the cache."""
    model = tiny_model("llama")
    cache = kvprec.AdaptiveCache(model.config, policy="uniform:int4", block_size=16, backend="torch")
    cache.read_counter = ReadCounter()
    teacher_forced(model, tokens[:, :60], 40, cache, attn_implementation="kvprec")
    layers = model.config.num_hidden_layers
    assert cache.read_counter.calls == layers * 20  # prefill + 19 decode steps, one call per layer
    # decode step reading n positions reads ceil(n / 16) blocks (sealed + tail), per layer
    expected = layers * sum(-(-n // 16) for n in range(40, 60))
    assert cache.read_counter.blocks_read == expected


@pytest.mark.parametrize("prefill", [0, 150])
def test_bad_prefill(tiny_model, tokens, prefill):
    with pytest.raises(ValueError, match="prefill must be in"):
        teacher_forced(tiny_model("llama"), tokens, prefill, None)


def test_eval_command_on_a_model_directory(tiny_model, tmp_path, tokens):
    """kvprec eval loads a local HF directory (no download) and writes the rows it prints."""
    from kvprec.cli import main
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    vocab = {chr(ord("a") + i): i for i in range(26)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="a").save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(ord("a") + (i * 7) % 26) for i in range(200)))
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tmp_path / "m"), "--text", str(text), "--policy", "uniform:int8",
                 "--prefill", "64", "--tokens", "32", "--block-size", "16", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["cache"] for r in rows] == ["reference", "uniform:int8"] and 0 <= rows[1]["top1_agreement"] <= 1


def test_a_used_cache_is_refused(tiny_model, tokens):
    model = tiny_model("llama")
    cache = kvprec.AdaptiveCache(model.config, policy="uniform:int8", block_size=16)
    teacher_forced(model, tokens[:, :40], 20, cache, attn_implementation="kvprec")
    with pytest.raises(ValueError, match="already holds 39 tokens"):
        teacher_forced(model, tokens[:, :40], 20, cache, attn_implementation="kvprec")


def test_softcapped_model_uses_an_eager_reference(tiny_model, tokens):
    """SDPA cannot apply Gemma 2's logit softcap; the reference must still run (eager) and match FP32 tiers."""
    model = tiny_model("gemma2")
    result = compare(model, tokens[:, :60], 40, {"fp32": lambda: kvprec.AdaptiveCache(
        model.config, policy="uniform:fp32", block_size=16)})
    assert result.agreement("fp32") == 1.0 and abs(result.ppl_change("fp32")) < 1e-5


def test_cli_bad_input_is_a_clear_error(capsys):
    from kvprec.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "/nonexistent/model", "--policy", "uniform:int4"])
    assert exit_info.value.code == 2
    assert "--model: '/nonexistent/model' is neither" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--policy", "uniform:int3"])
    assert "accepted fp32, fp16, bf16, int8, int4, int2" in capsys.readouterr().err


def test_windows_run_as_one_batch_give_each_rows_own_result(tiny_model):
    """Rows of a batch are independent: each row's NLL and argmax equal a pass over that row alone, and the
    pooled figures are means over every prediction."""
    model = tiny_model("llama")
    rows = torch.randint(3, 256, (3, 70), generator=torch.Generator().manual_seed(9))
    make = lambda: kvprec.AdaptiveCache(model.config, policy="uniform:int4", block_size=16)  # noqa: E731
    both = teacher_forced(model, rows, 40, make(), attn_implementation="kvprec")
    assert both.nll.shape == both.argmax.shape == (3, 30)
    for b in range(3):
        alone = teacher_forced(model, rows[b:b + 1], 40, make(), attn_implementation="kvprec")
        torch.testing.assert_close(both.nll[b], alone.nll[0], rtol=0, atol=1e-4)
        assert torch.equal(both.argmax[b], alone.argmax[0])
    result = compare(model, rows, 40, {"int4": make})
    assert result.reference.nll.numel() == 90 and result.rows()[1]["predictions"] == 90


def test_page_bits_count_sealed_pages_only(tiny_model, tokens):
    """bits/element counts everything the cache holds; page bits only the sealed pages: for uniform INT4 with
    head_dim 32, T = 16, G = 32: keys 4 + 2*16/16 bits, values 4 + 2*16/32 bits, so (6 + 5) / 2 = 5.5."""
    model = tiny_model("llama")
    cache = kvprec.AdaptiveCache(model.config, policy="uniform:int4", block_size=16)
    result = teacher_forced(model, tokens[:, :70], 40, cache, attn_implementation="kvprec")
    report = cache.memory_report()
    assert result.page_bits_per_element == report.page_bits_per_element == 5.5
    assert report.bits_per_element > 5.5  # the FP32 tail and the block table on top
    assert int(report.sealed_elements.sum()) == 2 * 4 * 2 * 16 * 32 * 2  # layers x blocks x KV heads x T x D x K,V


def test_eval_command_windows_and_budget(tmp_path, capsys):
    """--windows N pools N disjoint windows; --bits-per-element wraps each policy in a budget that holds."""
    from kvprec.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "--model", "tiny", "--policy", "uniform:int4", "--policy", "sink_window",
                 "--prefill", "64", "--tokens", "16", "--windows", "3", "--bits-per-element", "4",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["windows"] == 3 and data["bits_per_element_budget"] == 4.0
    assert [r["cache"] for r in data["rows"]] == ["reference", "uniform:int4 @4b", "sink_window @4b"]
    for row in data["rows"][1:]:
        assert row["predictions"] == 48 and row["page_bits_per_element"] <= 4.0
    with pytest.raises(SystemExit, match="need 3000000 tokens"):
        main(["eval", "--model", "tiny", "--policy", "uniform:int4", "--prefill", "500000", "--tokens", "500000",
              "--windows", "3"])
    with pytest.raises(SystemExit, match="cannot be met"):
        main(["eval", "--model", "tiny", "--policy", "uniform:int4", "--bits-per-element", "2"])


def test_eval_command_key_rotation(tmp_path, capsys):
    """--key-rotation builds every cache with rotated keys: the row names say so and the memory counts the matrices
    (4 layers x 32 x 32 FP32 on the built-in tiny model)."""
    from kvprec.cli import main

    rows = {}
    for rotation, seed in (("none", "0"), ("orthogonal", "0"), ("orthogonal", "1")):
        out = tmp_path / f"{rotation}{seed}.json"
        assert main(["eval", "--model", "tiny", "--policy", "uniform:int2", "--prefill", "64", "--tokens", "16",
                     "--key-rotation", rotation, "--rotation-seed", seed, "--json", str(out)]) == 0
        rows[rotation if seed == "0" else "seed 1"] = json.loads(out.read_text())["rows"][1]
    assert rows["seed 1"]["perplexity"] != rows["orthogonal"]["perplexity"]  # another rotation
    assert rows["none"]["cache"] == "uniform:int2" and rows["orthogonal"]["cache"] == "uniform:int2 rot:orthogonal"
    # 2 bits + FP16 scale and zero per channel per 64-token block (keys) and per 32-channel group per token (values)
    assert rows["orthogonal"]["page_bits_per_element"] == rows["none"]["page_bits_per_element"] == 2.75
    elements = rows["none"]["bits_per_element"]
    assert rows["orthogonal"]["bits_per_element"] > elements  # the same pages plus 16 KiB of rotations
    assert rows["orthogonal"]["perplexity"] != rows["none"]["perplexity"]
    with pytest.raises(SystemExit):
        main(["eval", "--model", "tiny", "--policy", "uniform:int2", "--key-rotation", "givens"])
    assert "invalid choice: 'givens'" in capsys.readouterr().err


def test_stock_caches_run_with_the_stock_attention(tiny_model, tokens):
    """hf_cache("dynamic") reproduces the reference exactly and counts 32 bits per FP32 element (every tensor its
    layers hold); a bad spec and a missing backend package are named."""
    import sys

    from kvprec.hf.eval import hf_cache

    model = tiny_model("llama")
    result = compare(model, tokens, 100, {"dynamic": hf_cache("dynamic", model.config)})
    assert torch.equal(result.results["dynamic"].nll, result.reference.nll)
    assert result.results["dynamic"].bits_per_element == 32.0
    assert result.rows()[1]["page_bits_per_element"] is None
    with pytest.raises(ValueError, match="accepted 'dynamic', 'quanto:4'"):
        hf_cache("quanto:3", model.config)
    saved = sys.modules.get("optimum.quanto")
    sys.modules["optimum.quanto"] = None  # import raises ImportError
    try:
        with pytest.raises(ValueError, match="needs the optimum-quanto package"):
            hf_cache("quanto:4", model.config)
    finally:
        if saved is None:
            del sys.modules["optimum.quanto"]
        else:
            sys.modules["optimum.quanto"] = saved


def test_quanto_cache_bits_count_its_packed_codes(tiny_model, tokens):
    """QuantizedCache(quanto, 4 bits) on the FP32 tiny model: its packed codes (a PackedTensor inside a QTensor:
    held_bytes follows __tensor_flatten__ down both), FP32 scale and shift per 64-element group, and the FP32
    residual."""
    pytest.importorskip("optimum.quanto")
    from kvprec.hf.eval import hf_cache

    model = tiny_model("llama")
    result = compare(model, tokens, 100, {"quanto": hf_cache("quanto:4", model.config)})
    # 149 positions held after the pass: the prefill's 100 quantized, the 49 decoded since kept in FP32 (the
    # residual holds up to 128). Quantized: 4-bit codes + (32 + 32) bits of scale and shift per 64 elements.
    quantized, residual = 100, 49
    expected = (quantized * (4 + 64 / 64) + residual * 32) / (quantized + residual)
    assert result.results["quanto"].bits_per_element == pytest.approx(expected)
    assert 0 < abs(result.ppl_change("quanto")) < 0.05


def test_eval_command_hf_cache(tmp_path, capsys):
    from kvprec.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "--model", "tiny", "--hf-cache", "dynamic", "--prefill", "64", "--tokens", "8",
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][1]
    assert row["cache"] == "DynamicCache" and row["ppl_change"] == 0.0 and row["bits_per_element"] == 32.0
    with pytest.raises(SystemExit, match="give at least one --policy or --hf-cache"):
        main(["eval", "--model", "tiny"])
    with pytest.raises(SystemExit, match="accepted 'dynamic'"):
        main(["eval", "--model", "tiny", "--hf-cache", "kivi:2"])


def test_demo_runs_end_to_end(capsys):
    """`kvprec demo` (the README's main job) on short lengths: every default row, the rotated INT2 one among them,
    and no advice to rotate (the table shows plain INT2 beside rotated INT2 on purpose)."""
    import warnings

    from kvprec.hf.cache import Int2KeysWarning
    from kvprec.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("error", Int2KeysWarning)
        assert main(["demo", "--model", "tiny", "--prefill", "64", "--tokens", "16", "--generate", "4",
                     "--block-size", "16"]) == 0
    out = capsys.readouterr().out
    for row in ("uniform:int8", "uniform:int4", "sink_window", "attention_mass", "uniform:int2 rot:orthogonal",
                "curvature@"):
        assert row in out
    assert "greedy continuation of 4 tokens" in out and "precision map" in out
