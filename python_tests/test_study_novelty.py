"""The KV novelty study (kvprec/studies/novelty/, kvprec/analysis/novelty.py's series metrics, `kvprec study
novelty`).

Oracles: hand-computed cases for every metric and statistic; independent numpy formulas (Ledoit and Wolf's paper,
Goh and Barabasi's B); scipy for the tests; an FP32 AdaptiveCache under the "kvprec" attention for the ablation's
cheaper DynamicCache path; raw.npz for the report's numbers."""
import json
import math
import time

import numpy as np
import pytest
import torch

import kvprec
from kvprec.analysis.novelty import ledoit_wolf_shrinkage, mahalanobis, shrinkage_covariance, sliding_novelty
from kvprec.studies.novelty import ablation as abl
from kvprec.studies.novelty import temporal as tm
from kvprec.studies.novelty.analysis import is_trivial

# ---- geometric metrics ------------------------------------------------------------------------------------------


def test_series_metrics_by_hand():
    """Window (0,0), (2,0), (1,3) (mean (1,1)), new key (1,3), window 3, rank 1:
    cosine 1 - 4/sqrt(20); l2 ||(0,2)|| = 2; residual outside the top right singular vector u of the window;
    Mahalanobis: S = diag(2/3, 2), mu = 4/3, delta = 4/9 < beta = 16/27, so s = 1, Sigma = 4/3 I, d = sqrt(3)."""
    x = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [1.0, 3.0], [1.0, 3.0]]])   # [H=1, T=4, D=2]
    got = sliding_novelty(x, 3, 1)
    assert all(math.isnan(got[m][0, t]) for m in got for t in range(3))
    assert got["cosine"][0, 3].item() == pytest.approx(1 - 4 / math.sqrt(20), abs=1e-6)
    assert got["l2"][0, 3].item() == pytest.approx(2.0, abs=1e-6)
    _, vecs = np.linalg.eigh(np.array([[5.0, 3.0], [3.0, 9.0]]))           # X^T X of the window
    u = vecs[:, -1]
    k = np.array([1.0, 3.0])
    assert got["residual"][0, 3].item() == pytest.approx(np.linalg.norm(k - (k @ u) * u) / np.linalg.norm(k),
                                                         abs=1e-6)
    assert got["mahalanobis"][0, 3].item() == pytest.approx(math.sqrt(3), abs=1e-6)
    s, mu, mean = ledoit_wolf_shrinkage(x[:, :3])
    assert (s.item(), mu.item()) == (pytest.approx(1.0), pytest.approx(4 / 3))
    np.testing.assert_allclose(mean[0, 0].numpy(), [1.0, 1.0])


def _ledoit_wolf_paper(x: np.ndarray):
    """Ledoit and Wolf (2004), Lemma 3.2-3.4 with the normalised Frobenius norm <A, B> = tr(A B^T) / p."""
    n, p = x.shape
    y = x - x.mean(0)
    s = y.T @ y / n
    m = np.trace(s) / p
    d2 = ((s - m * np.eye(p)) ** 2).sum() / p
    b2bar = sum(((np.outer(r, r) - s) ** 2).sum() / p for r in y) / n ** 2
    b2 = min(b2bar, d2)
    return b2 / d2, (b2 / d2) * m * np.eye(p) + (1 - b2 / d2) * s


@pytest.mark.parametrize("w, d", [(5, 8), (40, 6), (3, 3), (17, 64)])
def test_ledoit_wolf_and_mahalanobis_match_the_paper_and_a_dense_inverse(w, d):
    g = torch.Generator().manual_seed(w * d)
    scales = torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    window = torch.randn(3, w, d, generator=g, dtype=torch.float64) * scales
    new = torch.randn(3, 4, d, generator=g, dtype=torch.float64) * scales
    s, _, _ = ledoit_wolf_shrinkage(window)
    cov = shrinkage_covariance(window)
    for i in range(3):
        s_ref, cov_ref = _ledoit_wolf_paper(window[i].numpy())
        assert s[i].item() == pytest.approx(s_ref, rel=1e-10)
        np.testing.assert_allclose(cov[i].numpy(), cov_ref, rtol=1e-10, atol=1e-12)
        r = (new[i] - window[i].mean(0)).numpy()
        dense = np.sqrt(np.einsum("nd,de,ne->n", r, np.linalg.inv(cov_ref), r))
        np.testing.assert_allclose(mahalanobis(new[i:i + 1], window[i:i + 1])[0].numpy(), dense, rtol=2e-6)


def test_mahalanobis_edge_cases():
    const = torch.ones(1, 4, 3)
    assert torch.isnan(mahalanobis(torch.zeros(1, 1, 3), const)).all()     # no covariance at all
    two = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])                          # s = 0: the ridge keeps Sigma invertible
    d = mahalanobis(torch.tensor([[[2.0, 0.0], [3.0, 0.0]]]), two)
    assert d[0, 0].item() == 0.0 and d[0, 1].item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="leading dimensions"):
        mahalanobis(torch.zeros(2, 1, 3), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="rank"):
        sliding_novelty(torch.zeros(1, 10, 4), 3, 4)


def test_sliding_novelty_equals_the_op_window_by_window():
    from kvprec.analysis.novelty import novelty

    x = torch.randn(6, 37, 16, generator=torch.Generator().manual_seed(2))
    got = sliding_novelty(x, 8, 3, chunk=5)
    for t in (8, 9, 20, 36):
        ref = novelty(x[:, t:t + 1].unsqueeze(0), x[:, t - 8:t].unsqueeze(0), 3)
        torch.testing.assert_close(got["cosine"][:, t], ref.cosine[0, :, 0])
        torch.testing.assert_close(got["residual"][:, t], ref.residual[0, :, 0])
        torch.testing.assert_close(got["mahalanobis"][:, t], mahalanobis(x[:, t:t + 1], x[:, t - 8:t])[:, 0])


# ---- temporal statistics ----------------------------------------------------------------------------------------


def test_robust_z_and_spikes_by_hand():
    x = np.array([1, 2, 1, 2, 1, 2, 1, 2, 10, 1.5])
    z = tm.robust_z(x, window=8, min_history=8)
    assert np.isnan(z[:8]).all()
    # median 1.5, MAD 0.5: z = 8.5 / (1.4826 * 0.5)
    assert z[8] == pytest.approx(8.5 / (1.4826 * 0.5))
    # the next window holds 2,1,2,1,2,1,2,10: median 2, |deviations| 0,0,0,0,1,1,1,8 -> MAD 0.5
    assert z[9] == pytest.approx(-0.5 / (1.4826 * 0.5))
    assert tm.spikes(x, 8).tolist() == [8]
    # a flat majority: window 1,1,1,1,1,1,2,2 has median 1 and MAD 0 -> the smallest spacing of its values, 1
    y = np.array([1, 1, 1, 1, 1, 1, 2, 2, 3.0])
    assert tm.robust_z(y, 8)[8] == pytest.approx(2.0)
    flat = np.array([4.0] * 8 + [4.0, 5.0])
    z = tm.robust_z(flat, 8)
    assert z[8] == 0 and z[9] > 1e6  # all equal: any larger value is a spike


def test_burstiness_by_hand():
    assert tm.burstiness([0, 10, 20, 30]) == -1.0                 # periodic
    tau = np.array([1, 1, 48, 1, 1], dtype=float)
    mu, sigma = tau.mean(), tau.std()
    assert tm.burstiness([0, 1, 2, 50, 51, 52]) == pytest.approx((sigma - mu) / (sigma + mu))
    assert tm.burstiness([3, 7]) is None


def test_burstiness_of_poisson_is_near_zero_and_of_clusters_clearly_above():
    rng = np.random.default_rng(0)
    poisson = np.cumsum(rng.exponential(1.0, 20000))
    assert abs(tm.burstiness(poisson)) < 0.02
    # discrete time at a low rate (the study's setting: a Bernoulli process is Poisson in discrete time)
    bernoulli = np.flatnonzero(rng.random(200000) < 0.02)
    assert abs(tm.burstiness(bernoulli)) < 0.02
    # bursts: cluster starts Poisson, 6 events one step apart in each
    starts = np.cumsum(rng.exponential(200.0, 300))
    clustered = np.sort((starts[:, None] + np.arange(6)[None, :]).ravel())
    assert tm.burstiness(clustered) > 0.4


def test_poisson_tests_tell_clusters_from_poisson():
    rng = np.random.default_rng(1)
    n = 4000
    poisson = np.flatnonzero(rng.random(n) < 0.05)
    clustered = np.unique(np.concatenate([s + np.arange(5) for s in rng.choice(n - 5, 40, replace=False)]))
    p = tm.poisson_tests(poisson, n, 40)
    c = tm.poisson_tests(clustered, n, 40)
    assert p["dispersion_p"] > 0.01 and c["dispersion_p"] < 1e-6
    assert p["ks_p"] > 0.001 and c["ks_p"] < 1e-6
    assert p["bins"] == 100
    null = tm.burstiness_null(len(clustered), n, 500, np.random.default_rng(2))
    assert abs(null.mean()) < 0.05 and tm.burstiness(clustered) > null.max()


def test_autocorrelation_ljung_box_and_shape_by_hand():
    from scipy import stats

    r = tm.autocorrelation(np.array([1.0, 2.0, 3.0, 4.0]), 3)
    # mean 2.5; y = -1.5 -0.5 0.5 1.5; sum y^2 = 5; lag 1: 1.25, lag 2: -1.75 (0.75 - 0.25 - 0.75... by hand below)
    assert r[0] == pytest.approx(1.25 / 5)
    assert r[1] == pytest.approx(((-1.5) * 0.5 + (-0.5) * 1.5) / 5)
    assert r[2] == pytest.approx((-1.5 * 1.5) / 5)
    x = np.random.default_rng(3).normal(size=300)
    lb = tm.ljung_box(x, 5)
    rr = tm.autocorrelation(x, 5)
    q = 300 * 302 * sum(rr[k] ** 2 / (300 - k - 1) for k in range(5))
    assert lb["q"] == pytest.approx(q) and lb["p"] == pytest.approx(stats.chi2.sf(q, 5))
    sh = tm.shape(np.random.default_rng(4).exponential(size=500))
    assert sh["skew"] > 1 and sh["kurtosis"] > 2 and sh["skew_p"] < 1e-6 and sh["kurtosis_p"] < 1e-6
    assert tm.shape(np.ones(10))["skew"] is None


def test_p_values_merged_under_dependence():
    from kvprec.studies.novelty.analysis import merge_dependent

    assert merge_dependent([0.01, 0.02, 0.5]) == pytest.approx(0.04)
    assert merge_dependent([0.3, None, 0.9]) == 1.0 and merge_dependent([None]) is None
    # identical p-values (complete dependence): never below the p of one test, so never anti-conservative
    u = np.random.default_rng(5).random(2000)
    assert np.mean([merge_dependent([x] * 10) < 0.05 for x in u]) <= 0.05


def test_trivial_tokens():
    assert all(is_trivial(t) for t in ("", " ", "\n\n", ",", " .", "()", "_", "**"))
    assert not any(is_trivial(t) for t in ("a", " the", "2", "x_1", "é"))


# ---- ablation ---------------------------------------------------------------------------------------------------


def test_split_block_novelty_and_choices():
    sp = abl.split(n_tokens=200, prompt_length=80, block_size=16, window=32)
    assert (sp.prefix, sp.first, sp.last) == (128, 2, 8)      # 80 + 60 = 140 -> 128; blocks 2..7 are candidates
    assert abl.split(60, 50, 16, 32) == abl.Split(48, 2, 3)   # block 2 = [32, 48): its positions have full windows
    assert abl.split(40, 35, 16, 32) is None                   # prefix 32: no block after the first window
    series = np.ones((2, 1, 200))
    series[0, 0, 5 * 16:6 * 16] = 3.0                          # block 5 of layer 0 is the novel one
    nov = abl.block_novelty(series, sp, 16)
    assert np.isnan(nov[..., :2]).all() and nov[0, 0, 5] == pytest.approx(3.0) and nov[1, 0, 2:].tolist() == [1] * 6
    assert abl.choose(nov, 1, "most", None).tolist() == [5]
    conds = abl.conditions(nov, [0.25], n_random=2, seed=0)
    assert [(c[0], c[1]) for c in conds] == [("tier", "most"), ("tier", "least"), ("tier", "random"),
                                             ("tier", "random"), ("drop", "most"), ("drop", "least"),
                                             ("drop", "random"), ("drop", "random")]
    tier_most, drop_most = conds[0][4], conds[4][4]
    assert tier_most.sum() == 3 and tier_most[0, 0, 5]           # round(0.25 * 12 items) = 3
    assert drop_most.shape == (2, 1, 8) and drop_most[:, :, 5].all() and drop_most.sum() == 2 * 2
    for c in conds:                                               # never outside the candidates
        assert not c[4][..., :2].any()
    again = abl.conditions(nov, [0.25], n_random=2, seed=0)
    assert all(np.array_equal(a[4], b[4]) for a, b in zip(conds, again))
    assert not np.array_equal(conds[2][4], conds[3][4])           # two random draws differ


@pytest.mark.skipif(not kvprec.native_available(), reason="native library not built")
@pytest.mark.filterwarnings("ignore::kvprec.hf.cache.Int2KeysWarning")  # INT2 keys as given: the ablation's point
def test_ablation_matches_an_adaptive_cache_with_blocks_retiered_or_evicted(tiny_model):
    """The DynamicCache path of ablation.measure against the real thing: an FP32 AdaptiveCache with a host shadow,
    the chosen blocks re-tiered to INT2 (tier) or masked out (drop), under the "kvprec" attention."""
    model = tiny_model("llama")
    tokens = torch.randint(3, 256, (70,), generator=torch.Generator().manual_seed(7))
    sp = abl.split(70, 20, 8, 8)                                   # prefix 40: blocks 1..4 are candidates
    mask_tier = np.zeros((2, 2, 5), bool)
    mask_tier[0, 1, 2] = mask_tier[1, 0, 1] = mask_tier[1, 1, 4] = True
    mask_drop = np.zeros((2, 2, 5), bool)
    mask_drop[:, :, 3] = True
    conds = [("tier", "most", 0.1, -1, mask_tier), ("drop", "most", 0.1, -1, mask_drop)]
    got = abl.measure(model, tokens, sp, conds, [0, 1], 8, "int2")
    ids = tokens[None]
    with torch.no_grad(), kvprec.enabled(model):
        for c, (mode, _, _, _, mask) in enumerate([("none", None, None, None, None)] + conds):
            cache = kvprec.AdaptiveCache(model.config, policy="uniform:fp32", block_size=8, shadow="cpu")
            model(input_ids=ids[:, :40], past_key_values=cache, use_cache=True)
            kwargs = {}
            if mode == "tier":
                for layer in range(2):
                    for b in range(5):
                        row = torch.tensor([[5 if mask[layer, h, b] else 0 for h in range(2)]], dtype=torch.int8)
                        if row.any():
                            cache.layers[layer].set_block_tiers(b, row)
            if mode == "drop":
                keep = torch.ones(1, 70, dtype=torch.long)
                keep[0, 24:32] = 0
                kwargs["attention_mask"] = keep
            logits = model(input_ids=ids[:, 40:], past_key_values=cache, use_cache=True, **kwargs).logits[0, :-1]
            want = -torch.log_softmax(logits.double(), -1).gather(-1, ids[0, 41:, None])[:, 0]
            np.testing.assert_allclose(got["abl_nll"][c], want.numpy(), rtol=1e-4, atol=1e-5)
    assert got["abl_nll"].shape == (3, 29) and got["abl_mode"].tolist() == ["none", "tier", "drop"]
    assert not np.allclose(got["abl_nll"][1], got["abl_nll"][0])  # INT2 moves the NLL
    assert not np.allclose(got["abl_nll"][2], got["abl_nll"][0])


# ---- inputs -----------------------------------------------------------------------------------------------------


def test_prompt_sources(tmp_path):
    from kvprec.studies.platform.inputs import PROMPT_SUITE, Prompt, prompt_ids, select_prompts
    from kvprec.studies.platform.rundir import StudyInputError
    from kvprec.models.loading import LoadedModel

    assert [p.type for p in select_prompts(suite=True)] == list(PROMPT_SUITE) == ["prose", "code", "mixed",
                                                                                  "reasoning", "transitions"]
    assert [p.type for p in select_prompts(prompt_types=["code", "code", "prose"])] == ["code", "prose"]
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a b", "type": "qa"}\n\n{"prompt": "c"}\n{"prompt": "e"}\n')
    assert select_prompts(dataset=str(data), dataset_limit=2) == [Prompt("qa", f"{data}:1", "a b"),
                                                                   Prompt("dataset", f"{data}:3", "c")]
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert select_prompts(text=str(text)) == [Prompt("file", str(text), "hello")]
    for kwargs, match in (({"prompt_types": ["poetry"]}, "--prompt-type poetry: use one of"),
                          ({"suite": True, "text": str(text)}, "--suite and --text: give one source"),
                          ({"text": str(tmp_path)}, "--text .*a directory"),
                          ({"dataset": str(text)}, "line 1: not JSON")):
        with pytest.raises(StudyInputError, match=match):
            select_prompts(**kwargs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(StudyInputError, match="line 2: expected an object with a non-empty string"):
        select_prompts(dataset=str(bad))
    byte_model = LoadedModel(None, lambda s: list(s.encode()), lambda ids: bytes(ids).decode(), "bytes")
    assert prompt_ids(byte_model, "hi", max_tokens=1) == list(b"h\n\n")

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and tokenize and messages == [{"role": "user", "content": "hi"}]
            return {"input_ids": [7, 8, 9]}
    chat = LoadedModel(None, byte_model.encode, byte_model.decode, "chat")
    chat.tokenizer = Chat()
    assert prompt_ids(chat, "hi") == [7, 8, 9] and prompt_ids(chat, "hi", chat=False) == list(b"hi\n\n")


# ---- the study end to end ---------------------------------------------------------------------------------------

CLI = ["--model", "tiny", "--suite", "--max-tokens", "40", "--null-reps", "300", "--ablation-random", "1",
       "--ablation-fraction", "0.25", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    from kvprec.cli import main

    out = tmp_path_factory.mktemp("novelty") / "run"
    start = time.process_time()
    assert main(["study", "novelty", *CLI, "--out", str(out)]) == 0
    return out, time.process_time() - start


def test_suite_end_to_end_on_the_tiny_model_under_a_minute(suite_run):
    """Under a minute of CPU time on one thread (wall time on the shared 2-core machine varies with its load)."""
    out, seconds = suite_run
    assert seconds < 60, seconds
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "raw.npz", "analysis.json", "report.md", "plots", "generated.txt"}
    assert {p.name for p in (out / "plots").iterdir()} == {
        "novelty_over_time.png", "distribution.png", "inter_arrival.png", "novelty_vs_entropy.png", "by_type.png",
        "layers.png", "ablation.png"}
    a = json.loads((out / "analysis.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["study"] == "novelty" and config["suite"] and config["models"] == ["tiny"]
    assert [p["type"] for p in config["data"]["prompts"]] == ["prose", "code", "mixed", "reasoning", "transitions"]
    (m,) = a["models"]
    assert [h["id"] for h in m["hypotheses"]] == ["H1", "H2", "H3", "H4", "H5", "H6", "H7"]
    assert all(h["verdict"] in ("holds", "partly", "does not hold", "not testable") for h in m["hypotheses"])
    assert set(m["by_type"]) == {"prose", "code", "mixed", "reasoning", "transitions"}
    assert len(m["per_layer"]) == 4 and set(m["ablation"]) == {"tier@0.25", "drop@0.25"}
    assert all(x["ablation"]["selection_recomputed"] for x in m["runs"])
    report = (out / "report.md").read_text()
    for h in m["hypotheses"]:
        assert f"| {h['id']} | {h['claim']} |" in report and f"**{h['verdict']}**" in report
    text = (out / "generated.txt").read_text()
    assert text.count("=== run ") == 5 and "--- generated ---" in text


def test_report_numbers_come_from_the_raw_data(suite_run):
    from kvprec.studies.novelty.analysis import analysed_positions
    from kvprec.studies.platform.rundir import load_raw

    out, _ = suite_run
    raw = load_raw(out / "raw.npz")
    a = json.loads((out / "analysis.json").read_text())
    config = json.loads((out / "config.json").read_text())
    (m,) = a["models"]
    # the aggregate novelty recomputed here from the per-(layer, head) series, then its spikes and burstiness
    metric, window = config["metric"], config["window"]
    pos = {r: analysed_positions(raw, r, window) for r in range(5)}
    series = {r: raw[f"r{r}_{metric}"][:, :, pos[r]].astype(np.float64) for r in range(5)}
    med = np.median(np.concatenate(list(series.values()), -1), axis=-1)
    for x in m["runs"]:
        r = x["run"]
        agg = (series[r] / med[..., None]).mean(axis=(0, 1))
        sp = tm.spikes(agg, config["spike_window"], config["spike_threshold"])
        assert x["novelty"]["spikes"]["steps"] == sp.tolist()
        assert x["novelty"]["median"] == pytest.approx(float(np.median(agg)), rel=1e-9)
        b = tm.burstiness(sp)
        assert x["novelty"]["burstiness"]["B"] == (None if b is None else pytest.approx(b))
        assert x["generated_tokens"] == len(raw[f"r{r}_tokens"]) - int(raw[f"r{r}_prompt_length"])
        # dNLL of the most-novel tier ablation: mean over the continuation of NLL - baseline NLL
        nll, rules, modes = raw[f"r{r}_abl_nll"], raw[f"r{r}_abl_rule"].tolist(), raw[f"r{r}_abl_mode"].tolist()
        c = next(i for i in range(len(rules)) if rules[i] == "most" and modes[i] == "tier")
        assert x["ablation"]["cells"]["tier@0.25"]["dnll"]["most"] == pytest.approx(float((nll[c] - nll[0]).mean()))
    report = (out / "report.md").read_text()
    h1 = m["hypotheses"][0]["levels"]
    assert f"skewness {h1['aggregate']['skew']:.3g}" in report and f"skewness {h1['heads']['skew']:.3g}" in report
    # the heads' level: one entry per (layer, head) of each run, and its merged p-value is 2 x the median
    heads = [h for x in m["runs"] for h in x["heads"]]
    assert len(heads) == 5 * 4 * 2
    assert h1["heads"]["skew_p"] == pytest.approx(min(1.0, 2 * float(np.median([h["skew_p"] for h in heads]))))


def test_reanalyze_reproduces_the_run(suite_run):
    from kvprec.cli import main

    out, _ = suite_run
    files = ("analysis.json", "report.md", "generated.txt")
    before = {f: (out / f).read_bytes() for f in files}
    assert main(["study", "novelty", "--reanalyze", str(out)]) == 0
    assert {f: (out / f).read_bytes() for f in files} == before


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "--max-tokens 0: use a whole number >= 1"),
    (["--rank", "40"], "--rank 40: at most --window"),
    (["--block-size", "0"], "--block-size 0: use a power of two"),
    (["--ablation-fraction", "1.5"], "--ablation-fraction 1.5: use a fraction in"),
    (["--ablation-tier", "fp32"], "--ablation-tier fp32: the ablation needs a lossy tier"),
    (["--temperature", "-1"], "--temperature -1.0: use a number >= 0"),
    (["--model", "tiny", "--model", "tiny"], "names a model twice"),
    (["--dataset", "/no/such.jsonl"], "--dataset /no/such.jsonl: no such file"),
])
def test_bad_arguments_fail_in_one_line_before_anything_runs(tmp_path, capsys, args, message):
    from kvprec.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["study", "novelty", *args, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_default_layers_and_a_layer_the_model_lacks(tmp_path, capsys):
    from kvprec.cli import main
    from kvprec.studies.novelty.study import DEFAULT_LAYERS, default_layers

    assert default_layers(4) == [0, 1, 2, 3]
    thirty = default_layers(30)
    assert len(thirty) == DEFAULT_LAYERS == 12 and thirty[0] == 0 and thirty[-1] == 29
    assert all(0 < b - a <= 3 for a, b in zip(thirty, thirty[1:]))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["study", "novelty", "--model", "tiny", "--layer", "9", "--out", str(out), "--quiet"])
    assert e.value.code == 2 and "--layer 9: model tiny has layers 0-3" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
