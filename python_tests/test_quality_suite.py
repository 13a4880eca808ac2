"""examples/quality_suite.py's bits arithmetic against a live cache's memory report, its verdicts, its figures per
window and the interval across windows that settles a verdict, and examples/quality_rows.py's row parsing."""
import math
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
    ("uniform:int4|64|none|rot", "expected policy|block_size|rotation[|value_rotation]"),
    ("uniform:int4|64|none|none|none", "expected policy|block_size|rotation[|value_rotation]"),
    ("curvature:bits=3|64|none", "a curvature row needs the model to calibrate on"),
])
def test_quality_rows_refuses_bad_rows(tiny_model, text, error):
    with pytest.raises(ValueError, match=error.replace("|", r"\|").replace("[", r"\[")):
        quality_rows.parse_row(text, tiny_model("llama").config)


def test_quality_rows_value_rotation_field(tiny_model):
    """A fourth field rotates values; left out, values are stored as given."""
    config = tiny_model("llama").config
    cache = quality_rows.parse_row("uniform:int4|64|orthogonal|hadamard", config)()
    assert (cache.key_rotation, cache.value_rotation) == ("orthogonal", "hadamard")
    assert quality_rows.parse_row("uniform:int4|64|orthogonal", config)().value_rotation is None


@pytest.mark.parametrize("spec, error", [("curvature:bit=3", "expected curvature:bits=B"),
                                         ("curvature:bits=x", "bits='x' is not a number"),
                                         ("curvature:candidates=int2+int4", "expected curvature:bits=B")])
def test_quality_rows_refuses_bad_curvature_specs(tiny_model, spec, error):
    with pytest.raises(ValueError, match=error):
        quality_rows.curvature_policy(spec, tiny_model("llama"), torch.zeros(1, 8, dtype=torch.long), 8)


def teacher_forced(nll, argmax):
    from kvprec.hf.eval import TeacherForced

    return TeacherForced(nll, argmax, 0.0, 32.0)


def test_per_window_figures_make_up_the_overall_row():
    from kvprec.hf.eval import Comparison

    gen = torch.Generator().manual_seed(0)
    nll = torch.rand(5, 7, generator=gen) * 4  # 5 windows x 7 predictions: awkward sizes
    argmax = torch.randint(0, 3, (5, 7), generator=gen)
    comparison = Comparison(teacher_forced(nll, argmax))
    shifted = nll + torch.linspace(-0.2, 0.3, 5)[:, None]  # window b's mean NLL moves by its own d_b
    flipped = argmax.clone()
    flipped[1, :3] += 1  # window 1 disagrees on 3 of 7 predictions
    comparison.results["x"] = teacher_forced(shifted, flipped)
    figures = quality_suite.per_window(comparison, "x")
    assert figures["ppl_change"] == pytest.approx(torch.expm1(torch.linspace(-0.2, 0.3, 5)).tolist(), abs=1e-6)
    assert figures["top1_agreement"] == pytest.approx([1, 4 / 7, 1, 1, 1])
    overall = torch.expm1(torch.log1p(torch.tensor(figures["ppl_change"], dtype=torch.float64)).mean())
    assert float(overall) == pytest.approx(comparison.ppl_change("x"), abs=1e-6)
    assert sum(figures["top1_agreement"]) / 5 == pytest.approx(comparison.agreement("x"), abs=1e-7)


def test_window_interval_is_student_t_across_windows():
    figures = {"ppl_change": [0.01, -0.005, 0.02, 0.0], "top1_agreement": [0.96, 0.98, 0.95, 0.99]}
    interval = quality_suite.window_interval(figures, predictions=10 ** 6)  # the binomial floor far below
    t3 = 3.182446305284263  # t_{0.975, 3}
    d = [0.00995033085, -0.00501254182, 0.0198026273, 0.0]  # log1p of the changes
    mean = sum(d) / 4
    sd = (sum((x - mean) ** 2 for x in d) / 3) ** 0.5
    assert interval["ppl_change"] == pytest.approx([math.expm1(mean - t3 * sd / 2), math.expm1(mean + t3 * sd / 2)],
                                                   rel=1e-8)
    a_sd = (sum((a - 0.97) ** 2 for a in figures["top1_agreement"]) / 3) ** 0.5
    assert interval["top1_agreement"] == pytest.approx([0.97 - t3 * a_sd / 2, 0.97 + t3 * a_sd / 2], rel=1e-12)
    # a wider confidence, a wider interval; top-1 clipped to [0, 1]; one window, none
    wide = quality_suite.window_interval(figures, 10 ** 6, confidence=0.99)
    assert wide["ppl_change"][0] < interval["ppl_change"][0] and wide["ppl_change"][1] > interval["ppl_change"][1]
    assert quality_suite.window_interval({"ppl_change": [0, 0], "top1_agreement": [0.5, 1.0]}, 128)[
        "top1_agreement"] == [0.0, 1.0]
    assert quality_suite.window_interval({"ppl_change": [0.01], "top1_agreement": [1.0]}, 128) is None


def test_window_interval_top1_spread_is_at_least_binomial():
    """Windows that agree by chance (top-1 moves in steps of 1 / m) settle nothing: the spread is at least that of
    m independent predictions. Perplexity has no floor; a sample spread above the floor is used as it is."""
    same = quality_suite.window_interval({"ppl_change": [0.01, 0.01], "top1_agreement": [123 / 128] * 2}, 128)
    t1 = 12.706204736174694  # t_{0.975, 1}
    a = 123 / 128
    half = t1 * (a * (1 - a) / 128) ** 0.5 / 2 ** 0.5
    assert same["top1_agreement"] == pytest.approx([a - half, 1.0], rel=1e-12)
    assert same["ppl_change"] == pytest.approx([0.01, 0.01])
    spread = {"ppl_change": [0.0] * 3, "top1_agreement": [0.8, 0.86, 0.89]}
    sd = float(torch.tensor(spread["top1_agreement"], dtype=torch.float64).std())
    assert sd > (0.85 * 0.15 / 128) ** 0.5
    lo, hi = quality_suite.window_interval(spread, 128)["top1_agreement"]
    assert hi - lo == pytest.approx(2 * 4.302652729911275 * sd / 3 ** 0.5, rel=1e-9)  # t_{0.975, 2}


@pytest.mark.parametrize("name, bits, ppl, top1, expected", [
    ("uniform:int4", 5.3, (-0.01, 0.004), (0.97, 0.99), "met"),
    ("uniform:int4", 5.3, (-0.01, 0.006), (0.97, 0.99), "not settled"),  # perplexity straddles +0.5%
    ("uniform:int4 rot", 5.4, (-0.01, 0.004), (0.96, 0.98), "not settled"),  # top-1 straddles 97%
    ("uniform:int4 rot", 5.4, (-0.01, 0.006), (0.95, 0.969), "not met"),  # top-1 wholly below, ppl open
    ("uniform:int4 T32", 5.2, (0.0051, 0.02), (0.98, 0.99), "not met"),  # perplexity wholly above
    ("x", 2.5, (0.0, 0.04), (0.1, 0.2), "met"),  # <= 2.6 bits: no top-1 limit
    ("attention_mass", 3.9, (0.0, 0.1), (0.5, 0.9), None),  # no target above 3 bits
])
def test_settled_by_the_interval(name, bits, ppl, top1, expected):
    r = {**row(name, bits, sum(ppl) / 2, sum(top1) / 2), "interval_95": {"ppl_change": ppl, "top1_agreement": top1}}
    assert quality_suite.settled(r) == expected
    assert quality_suite.settled({**r, "interval_95": None}) is None


def test_quality_rows_curvature_row_calibrates_to_its_budget(tiny_model):
    """'curvature:bits=B' calibrates kvprec.policy.Curvature on the given tokens with INT2 / INT4 candidates and a
    page budget of B bits per element (a mix of both here); the row's caches share that policy."""
    model = tiny_model("llama")
    calibration = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    # T = 8, head_dim 32: INT2 pages take 2 + 16 / 8 + 16 / 32 = 4.5 bits per element, INT4 6.5
    policy = quality_rows.curvature_policy("curvature:bits=5.5", model, calibration, 8)
    assert isinstance(policy, kvprec.policy.Curvature)
    assert 4.5 < policy.map.bits_per_element <= 5.5
    tiers = torch.cat([t.flatten() for t in policy.map.tiers]).unique().tolist()
    assert tiers == sorted([int(kvprec.Tier.INT4), int(kvprec.Tier.INT2)])  # both candidates, nothing else
    make = quality_rows.parse_row("curvature:bits=5.5|8|orthogonal|orthogonal", model.config,
                                  lambda spec, block_size: policy)
    assert make().policy is policy
