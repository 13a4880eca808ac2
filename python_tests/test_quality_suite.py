"""examples/quality_suite.py's bits arithmetic against a live cache's memory report, its verdicts, and
examples/quality_rows.py's row parsing."""
import sys
from pathlib import Path

import pytest
import torch

import kvprec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import quality_rows  # noqa: E402
import quality_suite  # noqa: E402

native = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


@native
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_floor_parts_are_what_an_int2_rotated_cache_holds(tiny_model, block_size):
    model = tiny_model("llama")
    tokens = 75  # 75 mod T != 0: a part-filled tail, allocated whole
    cache = kvprec.AdaptiveCache(model.config, policy="uniform:int2", block_size=block_size,
                                 key_rotation="orthogonal")
    ids = torch.randint(3, model.config.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(0))
    with kvprec.enabled(model), torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    report = cache.memory_report()
    measured = quality_suite.bits_parts(report, block_size, quality_suite.kv_shape(model.config)[2])
    floor = quality_suite.floor_bits(model.config, 2, tokens, block_size, dtype_bytes=4)
    for part in ("codes", "scales_zeros", "tail", "rotation"):
        assert measured[part] == pytest.approx(floor[part], rel=1e-12), part
    assert report.bits_per_element == pytest.approx(floor["total"] + measured["table"], rel=1e-12)
    assert quality_suite.kv_elements(model.config, 2, tokens) == int(report.elements.sum())


def row(cache, bits, ppl, top1, pages=1.0):
    return {"cache": cache, "bits_per_element": bits, "page_bits_per_element": pages, "ppl_change": ppl,
            "top1_agreement": top1}


def test_verdicts():
    verdict = quality_suite.verdict
    assert verdict(row("uniform:int4", 5.3, 0.004, 0.97)) == ("int4: <= +0.5%, >= 97%", True)
    assert verdict(row("uniform:int4 rot", 5.4, 0.004, 0.969))[1] is False  # every INT4 variant, top-1 too
    assert verdict(row("uniform:int2 rot", 2.9, 0.014, 0.95)) == ("<= 3 bits: <= +1.5%, >= 95%", True)
    assert verdict(row("x", 2.5, 0.049, 0.5))[1] is True and verdict(row("x", 2.5, 0.051, 0.99))[1] is False
    assert verdict(row("x", 2.1, 0.09, 0.1))[0] == "<= 2.2 bits: <= +10.0%"
    assert verdict(row("attention_mass", 3.9, 0.08, 0.9)) == ("-", None)  # no target above 3 bits
    assert verdict(row("QuantizedCache quanto int2", 2.0, 0.0, 1.0, pages=None)) == ("-", None)


@pytest.mark.parametrize("text, error", [
    ("uniform:int4|64", "expected policy|block_size|rotation"),
    ("uniform:int4|64|rot", "expected policy|block_size|rotation"),
    ("uniform:int4|x|none", "expected policy|block_size|rotation"),
    ("uniform:int4|48|none", "block_size 48 is not accepted"),
    ("nope:int4|64|none", "unknown policy 'nope'"),
    ("hf:quanto:3", "accepted 'dynamic'"),
])
def test_quality_rows_refuses_bad_rows(tiny_model, text, error):
    with pytest.raises(ValueError, match=error.replace("|", r"\|")):
        quality_rows.parse_row(text, tiny_model("llama").config)
