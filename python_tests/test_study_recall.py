"""The recall study (kvprec/studies/recall/): recall arithmetic, the simulated eviction policies against hand-computed
cases, the study's attention function against the stock model, the data loaders and prompts, the statistics, the
per-row tiering wrapper against separate caches, and an end-to-end run on the tiny model.

Oracles: hand-computed retained sets; transformers' own attention (SDPA and eager ``output_attentions``) for the
recorder; ``attend_dense`` with the mask materialised per head for the masked rows; scipy for ranks and
correlations; separate AdaptiveCaches for the per-row policy.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

import kvprec
from helpers import assert_refused_before_writing, chat_tokenizer
from kvprec.studies.recall import data, prompt, recall, stats, study
from kvprec.studies.recall.attention import MaskedRows, OracleRecorder, attend_scores, scores, study_attention
from kvprec.studies.recall.policies import H2O, TOVA, PrefillStats, SnapKV, StreamingLLM, evict_lowest, make

needs_native = pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")


class Quiet:
    def log(self, message):
        pass

    def bar(self, iterable, total=None, desc=""):
        return iterable


def stats_of(colsum, last_rows=None):
    colsum = torch.tensor(colsum, dtype=torch.float32)[None]
    rows = colsum[None] if last_rows is None else torch.tensor(last_rows, dtype=torch.float32)[:, None]
    return PrefillStats(colsum, rows)


def held(sim):
    return torch.nonzero(sim.retained()[0]).flatten().tolist()


# ---- recall arithmetic ----------------------------------------------------------------------------------------

def test_budget_size():
    assert recall.budget_size(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004 in floating point
    assert recall.budget_size(0.1, 7) == 1 and recall.budget_size(0.1, 11) == 2
    assert recall.budget_size(0.01, 3) == 1  # at least one position
    assert recall.budget_size(1.0, 123) == 123 and recall.budget_size(0.5, 0) == 0
    with pytest.raises(ValueError, match="budget fraction"):
        recall.budget_size(0.0, 10)


def test_recall_arithmetic():
    a = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15], [0.5, 0.1, 0.1, 0.1, 0.2]])
    needed = recall.needed_set(a, 2)
    assert needed.tolist() == [[False, True, False, True, False], [True, False, False, False, True]]
    retained = torch.tensor([[True, True, False, False, False], [True, False, False, False, True]])
    torch.testing.assert_close(recall.recall(needed, retained, 2), torch.tensor([0.5, 1.0]))
    # identical sets give recall 1, disjoint sets 0
    assert recall.recall(needed, needed, 2).tolist() == [1.0, 1.0]
    assert recall.recall(needed, ~needed, 2).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="k must be"):
        recall.recall(needed, retained, 0)


def test_evict_lowest_orders_by_score_then_age_and_spares_protected():
    held_ = torch.tensor([[True, True, True, False, True]])
    score = torch.tensor([[0.2, 0.1, 0.1, 0.0, 0.05]])
    protected = torch.tensor([[False, False, False, False, True]])
    # position 3 is not held; 4 is protected; 1 and 2 tie at 0.1: the older (1) goes first
    assert evict_lowest(held_, score, protected, 1).tolist() == [[1]]
    assert evict_lowest(held_, score, protected, 3).tolist() == [[1, 2, 0]]
    assert evict_lowest(held_, score, protected, 4).tolist() == [[1, 2, 0, 4]]  # protected only when nothing else


# ---- the simulated policies against hand-computed cases --------------------------------------------------------

def test_h2o_retention_hand_computed():
    # P = 8 prompt positions, budget 0.3: K(8) = ceil(2.4) = 3, recent window r = ceil(0.5 * 3) = 2
    sim = H2O(1, 16, 0.3, recent=0.5)
    sim.start(stats_of([5.0, 0.1, 0.3, 2.0, 0.2, 0.4, 0.05, 0.01]))
    assert held(sim) == [0, 6, 7]  # recent 6, 7 and the heaviest of the rest (0: 5.0)
    # step t = 8: the policy sees the attention restricted to {0, 6, 7, 8}: (0.1, 0.1, 0.05, 0.25) / 0.5
    sim.step(torch.tensor([[0.1, 0.3, 0.0, 0.2, 0.0, 0.0, 0.1, 0.05, 0.25]]))
    torch.testing.assert_close(sim.acc[0, [0, 6, 7, 8]], torch.tensor([5.2, 0.25, 0.11, 0.5], dtype=torch.float64))
    # K(9) = 3: protected 7, 8; of 0 (5.2) and 6 (0.25) the lighter goes
    assert held(sim) == [0, 7, 8]
    a9 = torch.tensor([[0.3, 0.05, 0.0, 0.2, 0.0, 0.0, 0.25, 0.1, 0.05, 0.05]])
    needed = recall.needed_set(a9[:, :9], recall.budget_size(0.3, 9))  # {0, 3, 6}
    assert recall.recall(needed, sim.retained(), 3).tolist() == [pytest.approx(1 / 3)]
    sim.step(a9)  # restricted to {0, 7, 8, 9}: (0.6, 0.2, 0.1, 0.1): acc 7 = 0.31 < acc 0; 9 (0.1) is recent
    assert held(sim) == [0, 8, 9]


def test_streaming_keeps_sinks_and_the_newest():
    sim = StreamingLLM(1, 16, 0.5, sinks=2)
    sim.start(stats_of([0.1] * 10))
    assert held(sim) == [0, 1, 7, 8, 9]  # K(10) = 5
    sim.step(torch.full((1, 11), 1 / 11))  # K(11) = 6: no eviction
    assert held(sim) == [0, 1, 7, 8, 9, 10]
    sim.step(torch.full((1, 12), 1 / 12))  # K(12) = 6: the oldest non-sink goes
    assert held(sim) == [0, 1, 8, 9, 10, 11]


def test_tova_keeps_what_the_last_query_attends():
    last = [0.05, 0.3, 0.05, 0.2, 0.1, 0.3]
    sim = TOVA(1, 16, 0.4)
    sim.start(stats_of([0.0] * 6, [last]))
    assert held(sim) == [1, 3, 5]  # K(6) = ceil(2.4) = 3
    # step 6 over {1, 3, 5, 6}, K(7) = ceil(2.8) = 3: the new position has the lowest attention and goes itself
    sim.step(torch.tensor([[0.0, 0.3, 0.0, 0.3, 0.0, 0.3, 0.1]]))
    assert held(sim) == [1, 3, 5] and sim.retained().shape[-1] == 7
    sim.step(torch.full((1, 8), 0.125))  # K(8) = ceil(3.2) = 4: the new position stays, nothing goes
    assert held(sim) == [1, 3, 5, 7]
    sim.step(torch.tensor([[0.0, 0.1, 0.0, 0.5, 0.0, 0.2, 0.9, 0.3, 0.4]]))  # K(9) = 4; over {1, 3, 5, 7, 8}
    assert held(sim) == [3, 5, 7, 8]  # 1 had the lowest attention (6, evicted before, does not count)


def test_tova_at_the_prefill_end_retains_exactly_the_needed_set():
    """Identical policies give recall 1: TOVA's prefill selection is the top-K of the last prompt query, which is the
    oracle's needed set of that same query."""
    torch.manual_seed(0)
    p, rows = 37, 5
    last = torch.softmax(torch.randn(rows, p), -1)
    stats = PrefillStats(torch.rand(rows, p), last[None])
    for b in (0.1, 0.3, 0.77):
        sim = TOVA(rows, 64, b)
        sim.start(stats)
        k = recall.budget_size(b, p)
        assert recall.recall(recall.needed_set(last, k), sim.retained(), k).tolist() == [1.0] * rows


def test_snapkv_votes_of_the_window_with_pooling():
    # window 2 (positions 4, 5 protected), kernel 1: the votes of the last two queries pick the rest
    rows = [[0.0, 0.5, 0.1, 0.3, 0.1, 0.0], [0.2, 0.1, 0.0, 0.4, 0.1, 0.2]]
    sim = SnapKV(1, 16, 4 / 6, window=2, kernel=1)
    sim.start(stats_of([0.0] * 6, rows))
    assert held(sim) == [1, 3, 4, 5]  # votes 0: 0.2, 1: 0.6, 2: 0.1, 3: 0.7
    # kernel 3 averages neighbours (the edges over the positions that exist): 0: 0.4, 1: 0.3, 2: 0.467, 3: 0.333
    sim = SnapKV(1, 16, 3 / 6, window=2, kernel=3)
    sim.start(stats_of([0.0] * 6, rows))
    assert held(sim) == [2, 4, 5]


def test_budget_100_percent_keeps_everything():
    torch.manual_seed(1)
    p = 20
    st = PrefillStats(torch.rand(3, p), torch.softmax(torch.randn(4, 3, p), -1))
    for name in ("h2o", "streaming", "tova", "snapkv"):
        sim = make(name, 3, 40, 1.0)
        sim.start(st)
        for t in range(p, p + 5):
            assert bool(sim.retained().all())
            a = torch.softmax(torch.randn(3, t + 1), -1)
            assert recall.recall(recall.needed_set(a[:, :t], t), sim.retained(), t).tolist() == [1.0] * 3
            sim.step(a)


def test_policy_options_are_checked():
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make("lru", 1, 4, 0.5)
    with pytest.raises(ValueError, match="kernel"):
        SnapKV(1, 4, 0.5, kernel=2)
    with pytest.raises(ValueError, match="recent"):
        H2O(1, 4, 0.5, recent=1.0)


# ---- the study's attention function ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from kvprec.models.loading import load

    return load("tiny")


def test_masked_attention_matches_the_dense_reference_per_head():
    from kvprec.ops.reference.attention import attend_dense

    g = torch.Generator().manual_seed(2)
    r, hq, hkv, d, s, m = 3, 4, 2, 8, 7, 2
    q = torch.randn(r, hq, 1, d, generator=g)
    ks, vs = torch.randn(hkv, s, d, generator=g), torch.randn(hkv, s, d, generator=g)
    ko, vo = torch.randn(r, hkv, m, d, generator=g), torch.randn(r, hkv, m, d, generator=g)
    keep = torch.rand(r, hkv, s + m, generator=g) > 0.4
    keep[..., -1] = True
    out, p = attend_scores(scores(q, ks, ko, 0.3), keep, vs, vo, q.dtype)
    for row in range(r):
        for h in range(hkv):
            k_full = torch.cat([ks[h], ko[row, h]])[None, None]
            v_full = torch.cat([vs[h], vo[row, h]])[None, None]
            qh = q[row:row + 1, h * 2:(h + 1) * 2]
            ref, _, w = attend_dense(qh, k_full, v_full, keep[row, h][None, None], 0.3, 0, 0.0, "none")
            torch.testing.assert_close(out[row:row + 1, h * 2:(h + 1) * 2], ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p[row, h], w[0, :, 0], rtol=1e-5, atol=1e-6)


def test_oracle_recorder_is_the_models_attention(tiny):
    """Logits under the study's function equal the stock implementation's; the recorded prefill column sums and
    decode rows equal eager attention's output_attentions (mean over each KV head's query heads)."""
    from transformers import DynamicCache

    model = tiny.model
    ids = torch.tensor([list(b"def f(x):\n    return x + 1\n" * 3)])
    p = ids.shape[1] - 1
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        eager = model(ids, use_cache=False, output_attentions=True).attentions
        model.set_attn_implementation(previous)
        rec = OracleRecorder(4, 2, 5)
        cache = DynamicCache()
        with study_attention(model, rec):
            a = model(ids[:, :20], past_key_values=cache, use_cache=True).logits  # two prefill chunks
            b = model(ids[:, 20:p], past_key_values=cache, use_cache=True).logits
            c = model(ids[:, p:], past_key_values=cache, use_cache=True).logits  # one decode step
    assert model.config._attn_implementation == previous
    torch.testing.assert_close(torch.cat([a, b, c], 1), ref, rtol=1e-4, atol=1e-4)
    for layer in range(4):
        w = eager[layer][0].reshape(2, 2, p + 1, p + 1).mean(1)  # [H_kv, Q, N]
        torch.testing.assert_close(rec.colsum[layer], w[:, :p, :p].sum(1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rec.last_rows[layer], w[:, p - 5:p, :p].transpose(0, 1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rec.row[layer], w[:, p], rtol=1e-4, atol=1e-5)


def test_masked_rows_with_everything_kept_reproduce_the_next_step(tiny):
    from transformers import DynamicCache

    model = tiny.model
    ids = torch.tensor([list(b"import os\nprint(os.getcwd())\n")])
    t = ids.shape[1] - 1
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits[0, -1]
        cache = DynamicCache()
        model(ids[:, :t], past_key_values=cache, use_cache=True)
        shared_k = [layer.keys[0] for layer in cache.layers]
        shared_v = [layer.values[0] for layer in cache.layers]
        keep = lambda layer, s: torch.ones(s.shape[0], s.shape[1], s.shape[-1], dtype=torch.bool)  # noqa: E731
        with study_attention(model, MaskedRows(shared_k, shared_v, keep)):
            out = model(input_ids=torch.full((2, 1), int(ids[0, t])), position_ids=torch.full((2, 1), t),
                        use_cache=False).logits[:, -1]
    torch.testing.assert_close(out, ref.expand(2, -1), rtol=1e-4, atol=1e-4)


def test_study_attention_refuses_unsupported_models():
    from kvprec.studies.recall.attention import check_model
    from conftest import build_tiny

    check_model(build_tiny("llama"))
    for family in ("mistral", "gemma2", "gpt2"):
        with pytest.raises(ValueError, match="--model"):
            check_model(build_tiny(family))


# ---- data and prompts -----------------------------------------------------------------------------------------------

HOTPOT = {"_id": "h1", "question": "Where was X born?", "answer": "Y", "type": "bridge",
          "context": [["A", ["A is a thing.", " It was made by X."]], ["X", ["X was born in Y.", " X liked tea."]]],
          "supporting_facts": [["A", 1], ["X", 0]]}
MUSIQUE = {"id": "m1", "question": "Q?", "answer": "Z", "answer_aliases": ["z"],
           "paragraphs": [{"idx": 0, "title": "T0", "paragraph_text": "Nothing here.", "is_supporting": False},
                          {"idx": 1, "title": "T1", "paragraph_text": "Z is the answer.", "is_supporting": True}]}
LONGBENCH = {"_id": "l1", "input": "Which?", "context": "Passage 1:\nT\nSome text.", "answers": ["a", "b"],
             "dataset": "hotpotqa"}


def test_loaders_normalize_every_format(tmp_path):
    h, m, lb = data.normalize(HOTPOT), data.normalize(MUSIQUE), data.normalize(LONGBENCH)
    assert h.context == "Passage 1:\nA\nA is a thing. It was made by X.\n\nPassage 2:\nX\nX was born in Y. X liked tea."
    assert h.supporting == ["It was made by X.", "X was born in Y."] and h.answers == ["Y"]
    assert m.context == "Passage 1:\nT0\nNothing here.\n\nPassage 2:\nT1\nZ is the answer."
    assert m.supporting == ["Z is the answer."] and m.answers == ["Z", "z"]
    assert lb.question == "Which?" and lb.answers == ["a", "b"] and lb.source == "longbench:hotpotqa"
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (HOTPOT, MUSIQUE, LONGBENCH)) + "\n\n")
    assert [s.id for s in data.load_dataset(str(f))] == ["h1", "m1", "l1"]
    assert [s.id for s in data.load_dataset(str(f), max_samples=2)] == ["h1", "m1"]
    g = tmp_path / "list.json"
    g.write_text(json.dumps([HOTPOT, HOTPOT]))
    assert len(data.load_dataset(str(g))) == 2


def test_loader_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(HOTPOT) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: not a LongBench"):
        data.load_dataset(str(bad))
    bad.write_text(json.dumps(dict(HOTPOT, supporting_facts=[["A", 7]])) + "\n")
    with pytest.raises(ValueError, match="line 1: supporting fact"):
        data.load_dataset(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1"):
        data.load_dataset(str(bad))
    with pytest.raises(ValueError, match="--dataset"):
        data.load_dataset(str(tmp_path / "missing.jsonl"))


def test_builtin_sample_supporting_facts_are_in_the_context():
    samples = data.load_dataset("builtin")
    assert len(samples) >= 8
    for s in samples:
        assert s.answers and s.question.endswith("?") and len(s.supporting) >= 2
        assert all(f in s.context for f in s.supporting)
        assert any(a.lower().removeprefix("the ") in s.context.lower() for a in s.answers)


def test_prompt_spans_point_at_the_supporting_facts_and_survive_truncation():
    s = data.normalize(HOTPOT)
    enc = prompt.encode(s, None)  # byte-level: one token per UTF-8 byte
    text = prompt.user_message(s, "reason").encode()
    assert enc.ids.tolist() == list(text) and not enc.chat
    for (a, b), fact in zip(enc.supporting, s.supporting):
        assert bytes(enc.ids[a:b].tolist()).decode() == fact
    assert bytes(enc.ids[enc.context[0]:enc.context[1]].tolist()).decode() == s.context
    cut = prompt.encode(s, None, max_tokens=len(text) - 10)
    assert cut.truncated == 10 and len(cut.ids) == len(text) - 10
    assert cut.context[1] - cut.context[0] == len(s.context) - 10
    kept = [bytes(cut.ids[a:b].tolist()).decode() for a, b in cut.supporting]
    assert all(k in s.context for k in kept) and len(kept) + cut.missing_supporting == 2
    with pytest.raises(ValueError, match="--max-prompt-tokens"):
        prompt.encode(s, None, max_tokens=20)


def test_chat_formatting_for_instruct_models():
    tok = chat_tokenizer()
    s = data.normalize(HOTPOT)
    enc = prompt.encode(s, tok)
    text = tok.apply_chat_template([{"role": "user", "content": prompt.user_message(s, "reason")}], tokenize=False,
                                   add_generation_prompt=True)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert enc.chat and text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert int(enc.ids[0]) == tok.convert_tokens_to_ids("<|im_start|>") and len(enc.ids) == len(offsets)
    assert [text[offsets[a][0]:offsets[b - 1][1]] for a, b in enc.supporting] == s.supporting
    assert not prompt.encode(s, tok, chat="off").chat
    with pytest.raises(ValueError, match="--chat on"):
        prompt.encode(s, None, chat="on")


# ---- statistics ----------------------------------------------------------------------------------------------------

def test_midranks_are_the_ranks_of_the_resampled_data():
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, 17).astype(float)  # ties
    w = rng.integers(0, 3, (6, 17)).astype(float)
    ranks = stats._midranks(values, w)
    for b in range(6):
        rep = np.repeat(values, w[b].astype(int))
        expect = {v: rankdata(rep)[rep == v][0] for v in np.unique(rep)}
        for i in np.flatnonzero(w[b]):
            assert ranks[b, i] == pytest.approx(expect[values[i]])


def test_correlations_match_scipy_and_cover_the_truth():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(2)  # a draw whose sample r (-0.597) is typical: a 95% interval need not cover
    x = rng.normal(size=400)
    y = -0.6 * x + 0.8 * rng.normal(size=400)
    groups = np.repeat(np.arange(20), 20)
    c = stats.correlations(x, {"y": y, "flat": np.ones(400)}, groups, n_boot=500, seed=0)
    assert c["y"]["pearson"]["r"] == pytest.approx(pearsonr(x, y).statistic)
    assert c["y"]["spearman"]["r"] == pytest.approx(spearmanr(x, y).statistic)
    assert c["y"]["spearman"]["p"] == pytest.approx(spearmanr(x, y).pvalue)
    # the population values: r = -0.6, Spearman rho = (6 / pi) asin(r / 2) for a bivariate normal
    for method, truth in (("pearson", -0.6), ("spearman", 6 / math.pi * math.asin(-0.3))):
        for unit in ("step", "sample"):
            lo, hi = c["y"][method][f"ci_{unit}"]
            assert lo < c["y"][method]["r"] < hi and lo < truth < hi and hi < -0.3
    assert c["flat"]["spearman"]["r"] is None
    # paired differences: y against a weaker copy of itself
    z = -0.2 * x + rng.normal(size=400)
    d = stats.correlations(x, {"y": y, "z": z}, groups, n_boot=500, seed=0, differences=[("y", "z")])["y - z"]
    assert d["spearman"]["ci_sample"][1] < 0


def test_entropy_bins():
    assert stats.bin_index([0.0, 0.99, 1.0, 2.5, 2.51, 9.0], (1.0, 2.5)).tolist() == [0, 0, 1, 1, 2, 2]
    assert stats.bin_labels((1.0, 2.5)) == ["low (< 1)", "medium (1..2.5)", "high (> 2.5)"]


# ---- kvprec's tiering, one cache row per budget ----------------------------------------------------------------

@needs_native
def test_per_row_policy_equals_separate_caches(tiny):
    from kvprec.studies.recall.tiering import TieringRun, kept_mask

    model = tiny.model
    ids = torch.tensor(list(b"class A:\n    def f(self):\n        return 1\n" * 4))
    spec = "attention_mass:keep={budget},high=int8,low=int4,every=1"
    run = TieringRun(model, spec, [0.1, 0.5], 16)
    with torch.no_grad():
        logits = run.feed(ids[:100])
        for t in range(100, 110):
            logits = run.feed(ids[t:t + 1])
        single = []
        for b in (0.1, 0.5):
            cache = kvprec.AdaptiveCache(model.config, policy=kvprec.policy.get(spec.format(budget=b)), block_size=16)
            with kvprec.enabled(model):
                out = model(ids[None, :100], past_key_values=cache, use_cache=True)
                for t in range(100, 110):
                    out = model(ids[None, t:t + 1], past_key_values=cache, use_cache=True)
            single.append((cache, out.logits[0, -1]))
    for row, (cache, ref) in enumerate(single):
        for mine, theirs in zip(run.cache.layers, cache.layers):
            assert torch.equal(mine.tiers()[row], theirs.tiers()[0])
        assert torch.equal(run.kept(110)[row], kept_mask(cache, 110)[0])
        torch.testing.assert_close(logits[row], ref.float(), rtol=1e-4, atol=1e-4)
        assert run.resident_bytes()[row] == pytest.approx(cache.memory_report().resident_bytes, rel=0.02)
    assert bool(run.kept(110)[0].sum() < run.kept(110)[1].sum())


# ---- end to end on the tiny model ---------------------------------------------------------------------------------

@needs_native
def test_budget_100_percent_gives_recall_1_and_the_full_cache(tiny):
    settings = study.RecallSettings(max_samples=1, max_new_tokens=4, max_prompt_tokens=500, budgets=[1.0], gap_every=1,
                                    etr_threshold=0.0)
    raw = study.collect(settings, tiny, None, Quiet())
    assert np.all(raw["recall"][:, :4] == 1.0)  # the simulated policies (kvprec's tiering keeps blocks, not K)
    assert np.allclose(raw["ev_recall"], 1.0)
    static = raw["ev_row_kind"] == "static"
    assert static.sum() == 4 and raw["ev_row_kind"].tolist().count("etr") == 1
    np.testing.assert_allclose(raw["ev_nll"][:, static], raw["nll"][:, None].repeat(4, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(raw["gap_nll"][:, :4, 0, 0], raw["nll"][:, None].repeat(4, 1), rtol=1e-4, atol=1e-4)
    assert np.nanmax(raw["gap_check"]) < 1e-3


TINY_RUN = ["study", "recall", "--model", "tiny", "--max-samples", "2", "--max-new-tokens", "6",
            "--max-prompt-tokens", "600", "--bootstrap", "200", "--etr-threshold", "0.5", "--gap-every", "1",
            "--etr-bases", "best-recall,h2o", "--threads", "1", "--quiet"]


@needs_native
def test_end_to_end_on_the_tiny_model(tmp_path):
    """kvprec study recall through the command line: the run directory, its numbers' invariants, and --reanalyze
    rebuilding analysis.json, report.md and the step logs byte for byte."""
    from kvprec.cli import main
    from kvprec.studies.platform.rundir import load_raw

    start = time.process_time()  # CPU time: the busy shared machine stretches wall time, not the work
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "config.json", "plots", "raw.npz", "report.md",
                                                    "steps_b0.1.jsonl", "steps_b0.2.jsonl", "steps_b0.3.jsonl"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "entropy_vs_recall_b0.1.png", "entropy_vs_recall_b0.2.png", "entropy_vs_recall_b0.3.png", "etr_nll.png",
        "recall_by_entropy_bin.png"]
    raw = load_raw(out / "raw.npz")
    n = raw["entropy"].size
    assert n == 12 and raw["recall"].shape == (n, 5, 3, 4 * 2 + 1)
    finite = raw["recall"][:, :4]
    assert np.all((finite >= 0) & (finite <= 1)) and np.all(np.isnan(raw["recall"][:, 4, :, -1]))
    # every budget runs the four static caches and the recall rows on the best-recall base and on h2o
    kinds = raw["ev_row_kind"].tolist()
    assert kinds.count("static") == 12 and 3 <= kinds.count("etr") <= 6 and kinds.count("etr") == kinds.count("random")
    moved = raw["ev_moved_bytes"]
    assert np.all(moved[:, raw["ev_row_kind"] == "static"] == 0) and np.all(moved[~raw["ev_triggered"]] == 0)
    assert np.all(moved % (2 * int(raw["model_head_dim"]) * int(raw["elem_bytes"])) == 0)
    for j in np.flatnonzero(raw["ev_row_kind"] == "random"):  # as many recalls per sample as its etr twin
        twin = np.flatnonzero((raw["ev_row_kind"] == "etr") & (raw["ev_row_base"] == raw["ev_row_base"][j])
                              & (raw["ev_row_fraction"] == raw["ev_row_fraction"][j]))[0]
        for sample in range(2):
            steps = raw["step_sample"] == sample
            assert raw["ev_triggered"][steps, j].sum() == raw["ev_triggered"][steps, twin].sum()
    a = json.loads((out / "analysis.json").read_text())
    assert set(a["h1"]) == set(raw["policies"].tolist()) and a["steps"] == n
    assert a["verdicts"]["h1"]["verdict"].split(" (")[0] in ("holds", "weak", "does not hold", "undefined")
    text = (out / "report.md").read_text()
    assert "**H1**" in text and "**H2**" in text and "Entropy-triggered recall" in text
    first = json.loads((out / "steps_b0.1.jsonl").read_text().splitlines()[0])
    assert set(first["recall"]) == set(raw["policies"].tolist()) and first["k"] >= 1
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == "recall" and config["budgets"] == [0.1, 0.2, 0.3]
    assert config["model_info"]["name"] == "tiny"
    files = ("analysis.json", "report.md", "steps_b0.2.jsonl")
    before = [(out / f).read_bytes() for f in files]
    assert main(["study", "recall", "--reanalyze", str(out), "--quiet"]) == 0
    assert [(out / f).read_bytes() for f in files] == before
    assert time.process_time() - start < 60


def test_command_line_refusals_name_the_argument(tmp_path, capsys):
    from kvprec.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    cases = [(["--budgets", "0.1,1.5"], "--budgets"), (["--budgets", "a"], "--budgets"),
             (["--dataset", str(tmp_path / "missing.jsonl")], "--dataset"), (["--dataset", str(bad)], "line 1"),
             (["--etr-bases", "lru"], "--etr-bases"), (["--kvprec-policy", "uniform:int4"], "--kvprec-policy"),
             (["--entropy-bins", "2,1"], "--entropy-bins"), (["--device", "tpu"], "--device")]
    assert_refused_before_writing(main, TINY_RUN, cases, tmp_path, capsys)


def test_choose_base_reads_phase_one():
    from types import SimpleNamespace

    from kvprec.studies.recall.oracle import POLICY_NAMES

    recall_ = np.zeros((3, len(POLICY_NAMES), 2, 5), dtype=np.float32)
    recall_[:, POLICY_NAMES.index("tova"), 0] = 0.9  # the highest recall at budget 0
    recall_[:, POLICY_NAMES.index("snapkv"), 1] = 0.8
    nll = np.full((3, len(POLICY_NAMES), 2, 2), 2.0)
    nll[1::2] = np.nan  # steps without a re-run
    nll[:, POLICY_NAMES.index("streaming"), 0, 0] = 1.0  # the lowest restricted NLL at budget 0
    nll[:, POLICY_NAMES.index("kvprec"), :, 0] = 0.1  # kvprec's tiering is not an eviction base
    runs = [SimpleNamespace(recall=recall_, gap_nll=nll)]
    assert study.choose_base("best-recall", runs, 0) == "tova" and study.choose_base("best-recall", runs, 1) == "snapkv"
    assert study.choose_base("best-nll", runs, 0) == "streaming" and study.choose_base("h2o", runs, 0) == "h2o"


def test_settings_are_checked():
    for bad, match in ((dict(budgets=[0.0]), "--budgets"), (dict(budgets=[0.1, 0.1]), "--budgets"),
                       (dict(entropy_bins=[2.5, 1.0]), "--entropy-bins"), (dict(max_new_tokens=2), "--max-new-tokens"),
                       (dict(block_size=12), "--block-size"), (dict(etr_bases=["lru"]), "--etr-bases"),
                       (dict(etr_bases=["best-nll"], gap_every=0), "--etr-bases"),
                       (dict(kvprec_policy="uniform:int4"), "--kvprec-policy"),
                       (dict(kvprec_policy="nope:{budget}"), "--kvprec-policy"), (dict(chat="yes"), "--chat")):
        with pytest.raises(ValueError, match=match):
            study.RecallSettings(**bad).check()
