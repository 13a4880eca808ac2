"""kvprec study injection (kvprec/studies/injection/): cache surgery, the batched conditions, every metric on a hand
case, the data, and the command line end to end on the tiny model.

Exactness claims are bit for bit (torch.equal) at FP32 tiers, where the computation is the same one; the moved keys
of a splice that changes the span's length are compared with keys computed at their new positions to 1e-5 (one
FP32 rotation against another, angles of a few hundred radians)."""
import json
import re
import time

import numpy as np
import pytest
import torch

from conftest import FAMILIES, TINY_VOCAB
from helpers import assert_refused_before_writing
from kvprec.hf.cache import AdaptiveCache
from kvprec.models.loading import LoadedModel
from kvprec.storage.formats import Tier
from kvprec.studies.injection import answers, derived, metrics, stats, surgery
from kvprec.studies.injection.data import (CONTROL, Problem, ProblemSet, Version, parse_problems, read_problems,
                                           to_json, write_problems)
from kvprec.studies.injection.layout import Layout
from kvprec.studies.injection.math_problems import CATEGORIES, math_problems
from kvprec.studies.injection.prompt import build_prompt
from kvprec.studies.injection.qa_problems import qa_problems
from kvprec.studies.injection.tiers import SpanTiers
from kvprec.studies.injection.trial import Batch, CacheSettings, PromptMemo, plan_rows, prompt_states, run_problem
from kvprec.studies.platform.rundir import StudyInputError

pytestmark = pytest.mark.filterwarnings("ignore::kvprec.hf.cache.Int2KeysWarning")


# ---------------------------------------------------------------------------------------------------------
# Cache surgery

def _ids(seed, n):
    return torch.randint(3, TINY_VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _cache(model, kind):
    if kind == "adaptive":
        return AdaptiveCache(model.config, policy="uniform:fp32", block_size=8, evict_sliding=False)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()  # sliding layers keep every position, so a splice behind the window works
    return cache


PRE, OLD, NEW, GEN = _ids(1, 13), _ids(2, 9), _ids(3, 12), _ids(4, 6)
NEXT = torch.tensor([[5]])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["adaptive", "dynamic"])
def test_injecting_the_identical_context_reproduces_the_baseline_exactly(tiny_model, family, kind):
    model = tiny_model(family)
    base = _cache(model, kind)
    for ids in (PRE, OLD, GEN):
        surgery.append_span(model, base, ids)
    expected = surgery.append_span(model, base, NEXT).logits
    cache = _cache(model, kind)
    for ids in (PRE, OLD, GEN):
        surgery.append_span(model, cache, ids)
    surgery.replace_span(model, cache, 13, 22, OLD)  # the old span again, mid-sequence, the tail re-appended
    assert cache.get_seq_length() == 28
    assert torch.equal(surgery.append_span(model, cache, NEXT).logits, expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["adaptive", "dynamic"])
def test_injecting_at_step_0_equals_the_oracle(tiny_model, family, kind):
    model = tiny_model(family)
    cache = _cache(model, kind)
    surgery.append_span(model, cache, PRE)
    surgery.append_span(model, cache, OLD)
    first = surgery.replace_span(model, cache, 13, 22, NEW).logits  # a longer span: nothing after it to move
    oracle = _cache(model, kind)
    surgery.append_span(model, oracle, PRE)
    assert torch.equal(first, surgery.append_span(model, oracle, NEW).logits)
    for token in (NEXT, torch.tensor([[9]])):
        assert torch.equal(surgery.append_span(model, cache, token).logits,
                           surgery.append_span(model, oracle, token).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_appending_a_span_mid_generation_equals_a_prompt_that_had_it_there(tiny_model, family):
    """append_span writes the new context after the generated tokens at the positions that follow: the same K/V
    and next-token distribution as a cache that read prompt, generated tokens and span in one go."""
    model = tiny_model(family)
    cache = _cache(model, "adaptive")
    for ids in (PRE, OLD, GEN):
        surgery.append_span(model, cache, ids)
    injected = surgery.append_span(model, cache, NEW).logits[:, -1]
    whole = _cache(model, "adaptive")
    reference = surgery.append_span(model, whole, torch.cat([PRE, OLD, GEN, NEW], 1)).logits[:, -1]
    torch.testing.assert_close(injected, reference, rtol=1e-5, atol=1e-5)  # one forward against four: FP32 sums
    k, v = surgery.stored_kv(cache.layers[-1], 28, 40)
    rk, rv = surgery.stored_kv(whole.layers[-1], 28, 40)
    torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_splice_that_changes_the_length_moves_the_tail_by_rope(tiny_model, family):
    """Layer 0's keys depend on the token and its position only, so after replacing a 9-token span by 12 tokens the
    moved tail's layer-0 keys must be what a fresh forward stores at the new positions (GPT-2: the same as before,
    its keys carry no position)."""
    model = tiny_model(family)
    cache = _cache(model, "adaptive")
    for ids in (PRE, OLD, GEN):
        surgery.append_span(model, cache, ids)
    before, _ = surgery.stored_kv(cache.layers[0], 22, 28)
    surgery.replace_span(model, cache, 13, 22, NEW)
    moved, _ = surgery.stored_kv(cache.layers[0], 25, 31)
    fresh = _cache(model, "adaptive")
    for ids in (PRE, NEW, GEN):
        surgery.append_span(model, fresh, ids)
    at_new, _ = surgery.stored_kv(fresh.layers[0], 25, 31)
    if family == "gpt2":
        assert surgery.rope_frequencies(model, 0) is None and torch.equal(moved, before)
    else:
        assert not torch.allclose(before, at_new, atol=1e-3)  # the move matters
        torch.testing.assert_close(moved, at_new, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_adaptive_and_dynamic_caches_splice_alike(tiny_model, family):
    model = tiny_model(family)
    out = {}
    for kind in ("adaptive", "dynamic"):
        cache = _cache(model, kind)
        for ids in (PRE, OLD, GEN):
            surgery.append_span(model, cache, ids)
        surgery.replace_span(model, cache, 13, 22, NEW[:, :5])  # shorter: the tail moves back
        out[kind] = surgery.append_span(model, cache, NEXT).logits
    torch.testing.assert_close(out["adaptive"], out["dynamic"], rtol=1e-5, atol=1e-5)


def test_shift_keys_composes_rotations():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    k = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(0))
    once = surgery.shift_keys(k, inv_freq, 7)
    assert torch.allclose(surgery.shift_keys(surgery.shift_keys(k, inv_freq, 3), inv_freq, 4), once, atol=1e-5)
    assert torch.allclose(surgery.shift_keys(once, inv_freq, -7), k, atol=1e-5)
    per_row = surgery.shift_keys(k, inv_freq, torch.tensor([0, 7]))
    assert torch.equal(per_row[0], k[0]) and torch.allclose(per_row[1], once[1])
    assert torch.equal(surgery.shift_keys(k, None, 5), k)
    with pytest.raises(ValueError, match="partial rotary"):
        surgery.shift_keys(k, inv_freq[:2], 1)


def test_surgery_refuses_what_it_cannot_do(tiny_model):
    model = tiny_model("mistral")  # sliding window 12
    evicting = AdaptiveCache(model.config, policy="uniform:fp32", block_size=4)
    surgery.append_span(model, evicting, _ids(5, 40))
    surgery.append_span(model, evicting, NEXT)  # a layer evicts at the update after the window passes
    with pytest.raises(ValueError, match="evict_sliding=False"):
        surgery.replace_span(model, evicting, 2, 4, NEW)
    cache = _cache(model, "adaptive")
    surgery.append_span(model, cache, PRE)
    with pytest.raises(ValueError, match="not inside"):
        surgery.replace_span(model, cache, 10, 20, NEW)
    from transformers import DynamicCache

    plain = DynamicCache(config=model.config)  # no past recording: the sliding layer drops positions
    surgery.append_span(model, plain, _ids(6, 30))
    with pytest.raises(ValueError, match="activate_past_recording"):
        surgery.replace_span(model, plain, 2, 4, NEW)


# ---------------------------------------------------------------------------------------------------------
# Layout and tiers

def test_layout_on_a_hand_case():
    lay = Layout.plan(pre_len=5, block_size=4, longest_span=6, span_len=[3, 6])
    assert (lay.span_start, lay.capacity, lay.gen_start, lay.span_blocks) == (8, 8, 16, range(2, 4))
    assert lay.positions(2, 2).tolist() == [[10, 11], [13, 14]]
    assert lay.mask(18).tolist() == [[1] * 5 + [0] * 3 + [1] * 3 + [0] * 5 + [1, 1],
                                     [1] * 5 + [0] * 3 + [1] * 6 + [0] * 2 + [1, 1]]
    k = torch.arange(6.0).reshape(1, 1, 3, 2)
    rk, _ = lay.region(k, k)
    assert rk.shape == (1, 1, 8, 2) and torch.equal(rk[0, 0, 3:], k[0, 0, -1:].expand(5, 2))


def test_span_tiers_policy():
    class Stats:
        batch, kv_heads = 3, 2

        def full(self, tier, n):
            return torch.full((3, 2, n), int(tier), dtype=torch.int8)

    policy = SpanTiers(Tier.FP32, range(2, 4))
    assert torch.equal(policy.assign(0, range(0, 5), Stats()), torch.zeros(3, 2, 5, dtype=torch.int8))
    policy.set_rows([Tier.FP32, Tier.INT4, Tier.INT2])
    tiers = policy.assign(0, range(1, 5), Stats())
    assert tiers[:, :, [0, 3]].eq(0).all() and tiers[:, :, 1:3].tolist() == [[[0, 0]] * 2, [[4, 4]] * 2,
                                                                              [[5, 5]] * 2]
    with pytest.raises(ValueError, match="2 row tiers"):
        SpanTiers(Tier.FP32, range(0, 1), [0, 0]).assign(0, range(0, 1), Stats())


# ---------------------------------------------------------------------------------------------------------
# Metrics on hand cases

def test_kl_ratio_cosine_and_shares_by_hand():
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.25, 0.25, 0.5])
    kl = metrics.kl_divergence(p.log(), q.log())
    assert kl.item() == pytest.approx(0.5 * np.log(2) * 2)  # sum p log(p/q) = log 2; the p = 0 term is 0
    assert metrics.kl_divergence(q.log(), q.log()).item() == 0.0
    ratio = metrics.log_ratio(p.log()[None], q.log()[None], torch.tensor([1]))
    assert ratio.item() == pytest.approx(np.log(2))
    assert metrics.cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])).item() == pytest.approx(2 ** -0.5)
    assert metrics.cosine(torch.zeros(2), torch.ones(2)).item() == 0.0
    mass = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0, 0.0]])
    pre, span = metrics.region_shares(mass, 2, range(2, 4))
    assert pre[0].item() == pytest.approx(0.3) and span[0].item() == pytest.approx(0.5)
    assert torch.isnan(pre[1]) and torch.isnan(span[1])  # a query that saw nothing has no share


def test_derived_measures_by_hand():
    d = derived.Definitions(smooth=1, band_halfwidth=0, fraction=0.5, window=2, converged_kl=0.1)
    assert derived.trailing_mean(np.array([3.0, 1.0, 2.0]), 2).tolist() == [3.0, 2.0, 1.5]
    unadapted = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    kl = np.array([0.9, 0.6, 0.4, 0.6, 0.2, 0.1])
    noise = [np.array([0.8, 0.8, 0.8, 0.8, 0.8, 0.8])]
    m = derived.derived(kl, unadapted, noise, d)
    assert m["detection_latency"] == 1.0          # 0.6 < 0.8 first at s = 1
    assert m["adaptation_point"] == 2.0           # 1 - 0.4 = 0.6 >= 0.5 first at s = 2
    assert m["stabilisation"] == 2.0              # it reopens at s = 3, stays closed from s = 4
    assert m["remaining_gap"] == pytest.approx(0.15) and m["relative_gap"] == pytest.approx(0.15)
    assert m["converged"] == 0.0
    never = derived.derived(np.ones(4), np.ones(4), [np.ones(4)], d)
    assert np.isnan(never["detection_latency"]) and np.isnan(never["adaptation_point"])
    assert np.isnan(never["stabilisation"])
    nothing_to_adapt = derived.derived(np.zeros(3), np.zeros(3), [], d)
    assert np.isnan(nothing_to_adapt["adaptation_point"]) and np.isnan(nothing_to_adapt["relative_gap"])
    assert np.isnan(nothing_to_adapt["detection_latency"])  # no noise control: nothing to detect against
    assert nothing_to_adapt["converged"] == 1.0
    # the band: the smallest noise over the controls and s - h .. s + h
    band = derived.noise_band([np.array([0.5, 0.2, 0.9]), np.array([0.4, 0.6, 0.3])], 3,
                              derived.Definitions(smooth=1, band_halfwidth=1))
    assert band.tolist() == pytest.approx([0.2, 0.2, 0.2])


def test_statistics():
    ci = stats.bootstrap_ci([2.0, 2.0, 2.0, np.nan], n_boot=200)
    assert ci == {"n": 3, "value": 2.0, "lo": 2.0, "hi": 2.0}
    assert stats.bootstrap_ci([], n_boot=200)["value"] is None
    t = stats.paired_test([1.0, 2.0, 3.0, -0.5], [0.0, 0.0, 0.0, 0.0], n_boot=200)
    # signed ranks of |d| = 1, 2, 3, 0.5: W+ = 2 + 3 + 4 = 9, W- = 1; exact two-sided p = 2 * 2 / 16
    assert (t["n"], t["statistic"], t["p"]) == (4, 1.0, pytest.approx(0.25))
    assert t["median_diff"] == pytest.approx(1.5)
    same = stats.paired_test([1.0, 2.0], [1.0, 2.0], n_boot=200)
    assert same["statistic"] is None and same["median_diff"] == 0.0
    band = stats.curve_band(np.array([[1.0, np.nan], [3.0, np.nan]]), n_boot=200)
    assert band["mean"] == [2.0, None] and band["n"] == [2, 0] and band["lo"][0] <= 2.0 <= band["hi"][0]


# ---------------------------------------------------------------------------------------------------------
# Answers and data

def test_answer_extraction():
    assert answers.math_answer("Kim has 4 + 3 = 7 pens. The answer is 7.") == "7"
    assert answers.math_answer("so 12 - 4 = 8 left") == "8"
    assert answers.math_answer("#### 1,200") == "1200"
    assert answers.math_answer("The answer is: -3") == "-3"
    assert answers.math_answer("no numbers here") is None
    assert answers.matches("math", "so 2 * 5 = 10 stickers", "10") and not answers.matches("math", "= 11", "10")
    assert answers.matches("qa", "Anna lives in Paris. The answer is Paris.", "Paris")
    assert not answers.matches("qa", "Ben is a painter. The answer is painter.", "pilot")
    assert not answers.matches("qa", "The answer is Parisian.", "Paris")


def _numbers(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def test_math_generator_is_balanced_and_correct():
    problems = math_problems(400, seed=3).problems
    assert [p.category for p in problems[:8]] == list(CATEGORIES) * 2
    assert {c: sum(p.category == c for p in problems) for c in CATEGORIES} == dict.fromkeys(CATEGORIES, 100)
    assert math_problems(400, seed=3) == math_problems(400, seed=3)
    ops = {"buys": "+", "gives him": "+", "gives her": "+", "to": "-", "holds": "*"}
    for p in problems:
        a, b = _numbers(p.original.text)
        op = next(o for key, o in ops.items() if key in p.original.text.split(".")[1])
        assert int(p.original.answer) == eval(f"{a} {op} {b}") >= 0
        if p.category == CONTROL:
            assert p.injected == p.original
        elif p.category == "single_number":
            na, nb = _numbers(p.injected.text)
            assert (na != a) + (nb != b) == 1 and int(p.injected.answer) == eval(f"{na} {op} {nb}")
        elif p.category == "multiple_numbers":
            na, nb = _numbers(p.injected.text)
            assert na != a and nb != b and int(p.injected.answer) == eval(f"{na} {op} {nb}")
        else:
            assert p.injected.text.startswith(p.original.text.rsplit(" How", 1)[0]) and "Then" in p.injected.text
            c = _numbers(p.injected.text)[2]
            step = -c if "gives" in p.injected.text.split("Then")[1] else c
            assert int(p.injected.answer) == int(p.original.answer) + step >= 1
        if p.category != CONTROL:
            assert p.injected.answer != p.original.answer


def test_qa_generator_asks_about_facts_of_its_text():
    for p in qa_problems(30, seed=1).problems:
        assert p.original.answer in p.context and p.injected.answer in p.context
        assert (p.original == p.injected) == (p.category == CONTROL)


def test_problem_files_round_trip_and_refusals(tmp_path):
    problems = math_problems(6)
    path = tmp_path / "p.json"
    write_problems(problems, str(path))
    assert read_problems(str(path)) == problems and read_problems(str(path), 2).problems == problems.problems[:2]
    good = to_json(problems)
    cases = [({"kind": "poem"}, "\"kind\""), ({"problems": []}, "non-empty list"),
             ({"problems": [{"original": {"text": "a", "answer": "x"}, "injected": {"text": "b", "answer": "1"}}]},
              "problem 0 (math-0000), original: a math answer must be a whole number"),
             ({"problems": [{"id": "a", "category": "control", "original": {"text": "a", "answer": "1"},
                             "injected": {"text": "b", "answer": "1"}}]}, "identical"),
             ({"examples": "none"}, "\"examples\" must be a list")]
    for change, message in cases:
        with pytest.raises(StudyInputError, match=re.escape(message)):
            parse_problems({**good, **change}, "f.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(StudyInputError, match="broken.json: not a JSON document"):
        read_problems(str(tmp_path / "broken.json"))


# ---------------------------------------------------------------------------------------------------------
# One problem through the study's batch (the tiny llama of conftest, bytes as tokens)

def _loaded(model):
    return LoadedModel(model, lambda s: list(s.encode("utf-8")),
                       lambda ids: bytes(int(i) for i in ids).decode("utf-8", "replace"), "tiny-test")


def _set(*problems):
    return ProblemSet("math", list(problems), "", (("Q: 1 + 1?", "A: 2"),))


ADDED = Problem("p0", "added_step", Version("Ann has 5 figs. How many?", "5"),
                Version("Ann has 5 figs. Then she finds 2 more. How many?", "7"))
SAME = Problem("p1", "control", Version("Ann has 5 figs. How many?", "5"), Version("Ann has 5 figs. How many?", "5"))


def test_batch_rows_start_as_the_oracle_and_as_the_baseline_exactly(tiny_model):
    """At FP32 without key rotation: a row injected at point 0 is the oracle row bit for bit (the span differs in
    length from the original, so the layout has holes), and injecting the identical text at a later point leaves
    the row the baseline bit for bit."""
    model = tiny_model("llama")
    cs = CacheSettings(block_size=8)
    rows = plan_rows([0, 3], ["fp32", "int2"], ["shuffled"])
    for problem in (ADDED, SAME):
        parts = build_prompt(_loaded(model), _set(problem), problem, ["shuffled"], seed=0)
        out = run_problem(model, parts, rows, cs, 7, eos=[])
        keys = [(r.condition, r.point, r.tier) for r in rows]
        oracle, base = keys.index(("oracle", -1, "fp32")), keys.index(("baseline", -1, "fp32"))
        at0, at3 = keys.index(("injection", 0, "fp32")), keys.index(("injection", 3, "fp32"))
        assert np.array_equal(out["tokens"][at0], out["tokens"][oracle])
        assert np.all(out["kl"][at0] == 0.0) and np.all(out["kl"][oracle] == 0.0)
        assert np.all(out["cosine"][oracle] == pytest.approx(1.0, abs=1e-6))
        if problem is SAME:
            assert np.array_equal(out["tokens"][at3], out["tokens"][base])
            assert np.array_equal(out["kl"][at3], out["kl"][base])
        int2 = keys.index(("injection", 0, "int2"))
        assert np.nanmax(out["kl"][int2]) > 0  # the tier is not free
        assert np.all(np.isnan(out["attn_span"][:, 0])) and np.all(out["attn_span"][:, 1:] >= 0)
        assert out["attn_span_heads"].shape == (len(rows), 2, 4)


def test_batch_stores_exactly_the_injected_span_at_its_tier(tiny_model):
    model = tiny_model("llama")
    cs = CacheSettings(block_size=4)
    parts = build_prompt(_loaded(model), _set(ADDED), ADDED, ["shuffled"], seed=0)
    pre_kv, spans = prompt_states(model, parts, cs, PromptMemo())
    rows = plan_rows([2], ["int4", "int8"], ["shuffled"])
    batch = Batch(model, rows, pre_kv, spans, cs)
    batch.run(6, eos=[])
    tiers = batch.cache.layers[0].tiers()            # [R, H, blocks]
    span = batch.layout.span_blocks
    for i, row in enumerate(rows):
        want = int(Tier.parse(row.tier)) if row.condition == "injection" else int(Tier.FP32)
        assert tiers[i, :, span.start:span.stop].eq(want).all(), row
        assert tiers[i, :, :span.start].eq(0).all() and tiers[i, :, span.stop:].eq(0).all()


# ---------------------------------------------------------------------------------------------------------
# The command line

TINY_RUN = ["study", "injection", "--model", "tiny", "--problems", "4", "--injection-points", "0,3",
            "--tiers", "fp32,int4", "--max-new-tokens", "6", "--bootstrap", "200", "--threads", "1", "--quiet"]


def test_end_to_end_on_the_tiny_model(tmp_path):
    from kvprec.cli import main
    from kvprec.studies.platform.rundir import load_raw

    start = time.process_time()
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "config.json", "dataset.json", "plots",
                                                    "problems.jsonl", "raw.npz", "report.md"]
    raw = load_raw(out / "raw.npz")
    assert raw["kl"].shape == (4, 2 + 2 * 3, 6) and raw["row_condition"].tolist()[:2] == ["baseline", "oracle"]
    a = json.loads((out / "analysis.json").read_text())
    assert a["problems"] == 4 and a["control_problems"] == 1 and a["points"] == [0, 3]
    assert set(a["derived"]) == {"injection:fp32@0", "injection:int4@0", "noise-shuffled@0", "injection:fp32@3",
                                 "injection:int4@3", "noise-shuffled@3"}
    assert a["derived"]["injection:fp32@0"]["remaining_gap"]["value"] == 0.0  # at point 0 it is the oracle
    assert a["controls"]["injection:fp32@3"]["problems"] == 1
    text = (out / "report.md").read_text()
    for heading in ("## Summary", "## Model accuracy", "## Adaptation after injection", "## Paired tests",
                    "## Adaptation curves", "## Controls"):
        assert heading in text
    lines = (out / "problems.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 4 and len(first["conditions"]) == 8 and first["conditions"][0]["steps"][0]["t"] == 0
    assert read_problems(str(out / "dataset.json")).problems == math_problems(4).problems
    files = ("analysis.json", "report.md", "problems.jsonl")
    before = [(out / f).read_bytes() for f in files]
    assert main(["study", "injection", "--reanalyze", str(out), "--quiet"]) == 0
    assert [(out / f).read_bytes() for f in files] == before
    assert time.process_time() - start < 60


def test_builtin_qa_runs_with_its_context_in_the_prompt(tmp_path):
    from kvprec.cli import main

    out = tmp_path / "qa"
    assert main(["study", "injection", "--model", "tiny", "--dataset", "builtin-qa", "--problems", "3",
                 "--injection-points", "2", "--tiers", "fp32", "--max-new-tokens", "4", "--bootstrap", "200",
                 "--threads", "1", "--quiet", "--out", str(out)]) == 0
    a = json.loads((out / "analysis.json").read_text())
    assert a["kind"] == "qa" and a["problems"] == 3 and a["control_problems"] == 1
    first = json.loads((out / "problems.jsonl").read_text().splitlines()[0])
    assert first["context"] and first["original"]["answer"] in first["context"]


def test_command_line_refusals_name_the_argument(tmp_path, capsys):
    from kvprec.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "math", "problems": [{"original": {"text": "x", "answer": "y"}}]}))
    cases = [(["--injection-points", "5,40"], "--injection-points"), (["--injection-points", "a"],
                                                                        "--injection-points"),
             (["--tiers", "int3"], "--tiers"), (["--noise", "loud"], "--noise"), (["--block-size", "6"], "--block-size"),
             (["--dataset", str(tmp_path / "missing.json")], "--dataset"), (["--dataset", str(bad)], "problem 0"),
             (["--key-rotation", "spin"], "--key-rotation"), (["--adapt-fraction", "0"], "--adapt-fraction"),
             (["--problems", "0"], "--problems")]
    assert_refused_before_writing(main, TINY_RUN, cases, tmp_path, capsys)


def test_problems_batched_together_measure_as_alone(tiny_model):
    """run_problems decodes problems that share the prompt before the span as one batch; each problem's measures
    equal its own run's up to FP32 rounding (the layout's span region fits the longest span of the batch, so the
    generated tokens sit in other slots)."""
    from kvprec.studies.injection.trial import run_problems

    model = tiny_model("llama")
    cs = CacheSettings(block_size=8)
    rows = plan_rows([2], ["fp32", "int4"], ["shuffled"])
    group = [build_prompt(_loaded(model), _set(p), p, ["shuffled"], seed=i) for i, p in enumerate((ADDED, SAME))]
    together = run_problems(model, group, rows, cs, 6, eos=[])
    for parts, batched in zip(group, together):
        alone = run_problem(model, parts, rows, cs, 6, eos=[])
        assert np.array_equal(batched["tokens"], alone["tokens"]) and np.array_equal(batched["valid"], alone["valid"])
        for name in ("kl", "kl_unadapted", "log_ratio", "logprob", "cosine", "attn_span"):
            np.testing.assert_allclose(batched[name].astype(np.float64), alone[name].astype(np.float64), rtol=1e-3,
                                       atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="share the prompt"):
        other = build_prompt(_loaded(model), ProblemSet("math", [SAME], "", ()), SAME, ["shuffled"], seed=0)
        run_problems(model, [group[0], other], rows, cs, 4, eos=[])
