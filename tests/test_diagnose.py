"""Fixed-context diagnostic (lab.diagnose) on tiny random Qwen2 models: a 6-context x 8-token bank."""

import copy
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from support import make_model, make_tokenizer, save_pair, write_prompts
from lab import diagnose as D
from tip_ext.stats import STAT_NAMES, token_stats

torch.set_num_threads(1)  # tiny tensors: more threads only add contention

PROMPTS = [f"{i}+{i + 1}=" for i in (0, 3, 9, 10, 12, 7)]  # prompts of 4 to 6 tokens
SELECTORS = ("random", "forward_kl_topk", "teachability", "teachability_incompatible")
BUDGETS = (0.1, 0.3)
LR = 1e-2


@pytest.fixture(scope="module")
def pair():
    tok = make_tokenizer()
    student = make_model(len(tok), hidden=64, seed=0)
    teacher = make_model(len(tok), hidden=128, seed=1)
    return student, teacher, tok


@pytest.fixture(scope="module")
def result(pair, tmp_path_factory):
    student, teacher, tok = pair
    out = tmp_path_factory.mktemp("diag")
    res = D.run_diagnostic(student, teacher, tok, PROMPTS, max_tokens=8, budgets=BUDGETS, selectors=SELECTORS,
                           steps=2, lr=LR, seed=0, bootstrap=200, predict_bootstrap=50, output_dir=str(out),
                           keep_models=True, progress=False, batch_size=2)
    res["_dir"] = str(out)
    return res


# ------------------------------------------------------------------ independent references


# Rule scores divide statistics by a batch range (q95 - q05 of D and C, max - min of KL): two float32 passes that agree
# to ~1e-6 (different padding, chunking or batch size) can differ by ~1e-6 / range after normalization.
NORMALIZED = {"teachability", "incompatible", "soft_or", "q3", "teachability_entropy"}


# AdamW's update lr * m / (sqrt(v) + eps) has slope up to lr / eps in the gradient where |g| ~ eps (1e-8): two
# float32 gradient passes that differ by ~1e-10 (measured 3e-11 on k_proj, 1e-8 on the embeddings, whose |g| ~ 1e-2
# makes Adam insensitive) can move such an entry by lr * 1e-10 / 1e-8 = 1e-2 * lr per step. Parameters after a few
# AdamW steps are compared with that bound; the loss values, which Adam does not amplify, with a tight tolerance.
def adam_atol(steps, lr=LR):
    return steps * lr * 1e-2


def assert_scores_close(got, want, name):
    atol = 2e-4 if name in NORMALIZED else 1e-5
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=name)


def direct_logits(model, bank, b):
    """Logits predicting each response token of context b, from one unpadded forward pass."""
    p, r = bank.prompt_ids[b], bank.response_ids[b]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return logits[len(p) - 1 : len(p) - 1 + len(r)]


def direct_all(model, bank):
    return torch.cat([direct_logits(model, bank, b) for b in range(bank.n_contexts)])


def robust(z, q_low=0.05, q_high=0.95, eps=1e-8):
    z = np.asarray(z, np.float64)
    lo, hi = np.quantile(z, q_low), np.quantile(z, q_high)
    return np.clip((z - lo) / (hi - lo + eps), 0, 1)


# ------------------------------------------------------------------ bank


def test_bank_is_the_students_sample(pair):
    student, _, tok = pair
    bank = D.build_bank(student, tok, PROMPTS, max_tokens=8, seed=3)
    again = D.build_bank(student, tok, PROMPTS, max_tokens=8, seed=3)
    other = D.build_bank(student, tok, PROMPTS, max_tokens=8, seed=4)
    assert bank.response_ids == again.response_ids
    assert bank.response_ids != other.response_ids
    assert bank.prompt_ids == [tok(p)["input_ids"] for p in PROMPTS]
    eos = tok.eos_token_id
    for r in bank.response_ids:
        assert 1 <= len(r) <= 8
        assert eos not in r[:-1]  # cut right after the first EOS
    assert bank.n_tokens == sum(len(r) for r in bank.response_ids)
    # flat order: context by context, positions increasing
    assert bank.sequence_ids.tolist() == [b for b, r in enumerate(bank.response_ids) for _ in r]
    assert bank.positions.tolist() == [j for r in bank.response_ids for j in range(len(r))]
    restored = D.Bank.from_dict(json.loads(json.dumps(bank.to_dict())))
    assert restored.response_ids == bank.response_ids and restored.n_tokens == bank.n_tokens


def test_scores_equal_token_stats_on_materialized_logits(pair, result):
    student, teacher, _ = pair
    bank, scores = result["_bank"], result["_scores"]
    ref = token_stats(direct_all(student, bank), direct_all(teacher, bank), top_k=16)
    for name in STAT_NAMES:
        torch.testing.assert_close(scores[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)
    d, c = ref["local_forward_kl"].numpy(), ref["support_mass"].numpy()
    np.testing.assert_allclose(scores["teachability"].numpy(), robust(d) * robust(c), atol=2e-4)
    np.testing.assert_allclose(scores["incompatible"].numpy(), robust(d) * (1 - robust(c)), atol=2e-4)
    assert set(D.SCORES) <= set(scores)


# ------------------------------------------------------------------ selection


@pytest.mark.parametrize("budget", [0.03, 0.1, 0.5])
def test_selectors_keep_exactly_the_budget(result, budget):
    bank, scores = result["_bank"], result["_scores"]
    n = bank.n_tokens
    k = math.ceil(budget * n)
    for name in D.DEFAULT_SELECTORS:
        sel, target = D.select_on_bank(name, scores, bank, budget, seed=0)
        assert target == k
        assert int(sel.keep.sum()) == k, name
        if sel.score is not None and name != "random":  # score rules keep their top k
            kept, dropped = sel.score[sel.keep], sel.score[~sel.keep]
            assert dropped.numel() == 0 or kept.min() >= dropped.max(), name
    fkl, _ = D.select_on_bank("forward_kl_topk", scores, bank, budget)
    top = torch.sort(-scores["forward_kl"], stable=True).indices[:k]
    assert set(torch.nonzero(fkl.keep).flatten().tolist()) == set(top.tolist())
    rkl, _ = D.select_on_bank("divergence_topk", scores, bank, budget)
    top = torch.sort(-scores["reverse_kl"], stable=True).indices[:k]
    assert set(torch.nonzero(rkl.keep).flatten().tolist()) == set(top.tolist())


def test_runs_report_budgeted_sizes(result):
    n = result["bank"]["tokens"]
    keys = [r["key"] for r in result["runs"]]
    assert keys == ["reference"] + [f"{s}@{b:g}" for s in SELECTORS for b in BUDGETS]
    for r in result["runs"]:
        keep = result["_runs"][r["key"]]["keep"]
        assert r["kept"] == int(keep.sum())
        expected = n if r["key"] == "reference" else math.ceil(r["budget"] * n)
        assert r["kept"] == r["target_k"] == expected


# ------------------------------------------------------------------ update and gains


def test_gains_equal_kl_before_minus_after(pair, result):
    _, teacher, _ = pair
    bank = result["_bank"]
    zt = direct_all(teacher, bank)
    before = result["_scores"]["forward_kl"].double().numpy()
    for key, model in result["_models"].items():
        after = token_stats(direct_all(model, bank), zt, names=("forward_kl",))["forward_kl"].double().numpy()
        gain = result["_runs"][key]["gain"]
        np.testing.assert_allclose(gain, before - after, atol=2e-6, err_msg=key)
        assert np.abs(gain).max() > 1e-6, key  # the update did something
        rel = (before - after) / np.maximum(before, 1e-8)
        lo, hi = np.quantile(rel, 0.01), np.quantile(rel, 0.99)
        np.testing.assert_allclose(result["_runs"][key]["rel_gain"], np.clip(rel, lo, hi), rtol=1e-3, atol=1e-5)


def test_update_is_mean_reverse_kl_over_kept_tokens(pair, result):
    """Re-run one selector's update by hand (unpadded sequences, plain AdamW) and compare the weights."""
    student, teacher, _ = pair
    bank = result["_bank"]
    key = f"teachability@{BUDGETS[1]:g}"  # kept tokens spread over several micro-batches
    keep = result["_runs"][key]["keep"]
    zt = direct_all(teacher, bank)
    model = copy.deepcopy(student)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    ref_losses = []
    for _ in range(2):
        opt.zero_grad()
        zs = torch.cat([model(input_ids=torch.tensor([bank.prompt_ids[b] + bank.response_ids[b]])).logits[0][
            len(bank.prompt_ids[b]) - 1 : len(bank.prompt_ids[b]) - 1 + len(bank.response_ids[b])]
            for b in range(bank.n_contexts)])
        ls, lt = torch.log_softmax(zs[keep], -1), torch.log_softmax(zt[keep], -1)
        loss = (ls.exp() * (ls - lt)).sum(-1).mean()
        ref_losses.append(loss.item())
        loss.backward()
        opt.step()
    ours_losses = next(r["losses"] for r in result["runs"] if r["key"] == key)
    assert ours_losses == pytest.approx(ref_losses, rel=1e-5)  # the loss values: no Adam amplification
    ours = dict(result["_models"][key].named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p, atol=adam_atol(2), rtol=1e-4, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), student.parameters()))


def test_restricted_update_lowers_kept_kl_and_empty_set_changes_nothing(pair, result):
    student, teacher, tok = pair
    bank, scores = result["_bank"], result["_scores"]
    before = scores["forward_kl"].double()
    sel, _ = D.select_on_bank("forward_kl_topk", scores, bank, 0.3)
    model, losses = D.train_on_bank(student, teacher, bank, sel.keep, steps=5, lr=LR, tokenizer=tok)
    after = D.bank_stats(model, teacher, bank, names=("forward_kl",), tokenizer=tok)["forward_kl"].double()
    gain = before - after
    assert gain[sel.keep].mean() > 1e-3 * before[sel.keep].mean()
    assert gain[sel.keep].mean() > gain[~sel.keep].mean()
    assert losses[-1] < losses[0]

    none = torch.zeros(bank.n_tokens, dtype=torch.bool)
    same, losses = D.train_on_bank(student, teacher, bank, none, steps=5, lr=LR, tokenizer=tok)
    assert losses == []
    for p, q in zip(same.parameters(), student.parameters()):
        assert torch.equal(p, q)
    after0 = D.bank_stats(same, teacher, bank, names=("forward_kl",), tokenizer=tok)["forward_kl"].double()
    # a separate statistics pass (other batching than the scoring pass): equal up to float32 rounding
    torch.testing.assert_close(after0, before, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ bootstrap and statistics


def test_bootstrap_intervals_contain_the_point_estimate(result):
    n_checked = 0
    for r in result["runs"]:
        for field in ("kept_gain", "all_gain", "kept_rel_gain", "all_rel_gain", "kept_gain_under_reference"):
            d = r[field]
            assert math.isfinite(d["lo"]) and math.isfinite(d["hi"]), (r["key"], field)
            assert d["lo"] - 1e-12 <= d["mean"] <= d["hi"] + 1e-12, (r["key"], field, d)
            n_checked += 1
    for target in result["predictiveness"]["correlations"].values():
        for d in target.values():
            for kind in ("pearson", "spearman"):
                iv = d[kind]
                if math.isfinite(iv["mean"]):
                    assert iv["lo"] - 1e-9 <= iv["mean"] <= iv["hi"] + 1e-9
    assert n_checked == 5 * len(result["runs"])


def test_bootstrap_ratio_is_the_resampled_token_mean():
    seq = np.array([0, 0, 1, 1, 1, 2])
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    mask = np.array([True, False, True, True, False, True])
    resamples = np.array([[0, 0, 0], [1, 2, 2], [0, 1, 2]])
    out = D.bootstrap_ratio(values, mask, seq, 3, resamples)
    assert out["mean"] == pytest.approx((1 + 3 + 4 + 6) / 4)
    boots = [1.0, (3 + 4 + 6 + 6) / 4, (1 + 3 + 4 + 6) / 4]
    assert out["lo"] == pytest.approx(np.percentile(boots, 2.5))
    assert out["hi"] == pytest.approx(np.percentile(boots, 97.5))
    idx = D._resample_tokens(np.array([0, 2, 5, 6]), np.array([2, 0, 1]))
    assert idx.tolist() == [5, 0, 1, 2, 3, 4]


def test_rank_correlation_and_regression_helpers():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 200).astype(float)  # ties
    y = x + rng.normal(size=200)
    np.testing.assert_allclose(D.rankdata(x), pd.Series(x).rank().to_numpy())
    assert D.spearman(x, y) == pytest.approx(np.corrcoef(pd.Series(x).rank(), pd.Series(y).rank())[0, 1])
    assert D.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    a, b = rng.normal(size=500), rng.normal(size=500)
    g = 2.0 * a + 1.0 * b + 0.1 * rng.normal(size=500)
    beta, r2 = D.standardized_ols(np.c_[a, b], g)
    assert beta == pytest.approx([2.0 * a.std() / g.std(), 1.0 * b.std() / g.std()], rel=0.02)
    assert 0.99 < r2 <= 1.0
    beta1, _ = D.standardized_ols(a[:, None], g)
    assert beta1[0] == pytest.approx(np.corrcoef(a, g)[0, 1])
    assert np.isnan(D.standardized_ols(np.c_[a, np.ones(500)], g)[0][1])
    w = D.winsorize(np.arange(101.0))
    assert w.min() == 1.0 and w.max() == 99.0


def test_predictiveness_matches_direct_correlations(result):
    gain = result["_runs"]["reference"]["gain"]
    scores = result["_scores"]
    corr = result["predictiveness"]["correlations"]["gain"]
    for name in ("forward_kl", "teachability", "entropy"):
        x = scores[name].double().numpy()
        assert corr[name]["pearson"]["mean"] == pytest.approx(np.corrcoef(x, gain)[0, 1], abs=1e-9)
        ref = np.corrcoef(pd.Series(x).rank(), pd.Series(gain).rank())[0, 1]  # pandas spearman needs scipy
        assert corr[name]["spearman"]["mean"] == pytest.approx(ref, abs=1e-9)
    reg = result["predictiveness"]["regressions"]["gain"]["learnable+incompatible"]
    beta, _ = D.standardized_ols(np.c_[scores["teachability"].double().numpy(),
                                       scores["incompatible"].double().numpy()], gain)
    assert reg["coefficients"]["teachability"]["mean"] == pytest.approx(beta[0])
    assert reg["coefficients"]["incompatible"]["mean"] == pytest.approx(beta[1])


# ------------------------------------------------------------------ report files and CLI


def test_report_files(result):
    out = result["_dir"]
    with open(os.path.join(out, "diagnostic.json")) as f:
        report = json.load(f)
    assert report["bank"]["tokens"] == result["_bank"].n_tokens
    assert len(report["runs"]) == 1 + len(SELECTORS) * len(BUDGETS)
    assert {"correlations", "regressions"} <= set(report["predictiveness"])
    assert "| score | Pearson G" in D.markdown_report(report)  # NaN came back as null
    D.plot_gains(report, os.path.join(out, "replot.png"))
    md = open(os.path.join(out, "diagnostic.md")).read()
    assert "| score | Pearson G" in md and "| selector | budget | kept" in md and "teachability_incompatible" in md
    with open(os.path.join(out, "gain_vs_budget.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    tokens = pd.read_csv(os.path.join(out, "tokens.csv"))
    assert len(tokens) == result["_bank"].n_tokens
    np.testing.assert_allclose(tokens["gain:reference"], result["_runs"]["reference"]["gain"], rtol=1e-4, atol=1e-9)
    assert tokens["kept:teachability@0.1"].sum() == math.ceil(0.1 * len(tokens))


def test_cli_on_a_saved_pair(tmp_path, capsys):
    student_dir, teacher_dir = save_pair(str(tmp_path))
    prompts = write_prompts(str(tmp_path / "prompts.jsonl"), n=5)
    out = tmp_path / "out"
    rc = D.main(["--teacher", teacher_dir, "--student", student_dir, "--prompts", prompts, "--contexts", "4",
                 "--max_tokens", "6", "--steps", "1", "--budgets", "0.2", "--selectors", "random", "teachability",
                 "--bootstrap", "50", "--predict_bootstrap", "10", "--output_dir", str(out), "--no_progress",
                 "--threads", "1", "--save_bank", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Fixed-context diagnostic" in printed and "teachability" in printed
    report = json.load(open(out / "diagnostic.json"))
    assert report["bank"]["contexts"] == 4
    assert [r["key"] for r in report["runs"]] == ["reference", "random@0.2", "teachability@0.2"]
    for name in ("diagnostic.md", "gain_vs_budget.png", "tokens.csv", "bank.json"):
        assert (out / name).is_file(), name


def test_rejects_unknown_selector(pair):
    student, teacher, tok = pair
    with pytest.raises(ValueError, match="unknown selector"):
        D.run_diagnostic(student, teacher, tok, PROMPTS, selectors=["nope"], progress=False)


def test_uncached_teacher_gives_the_same_scores_and_update(pair, result):
    student, teacher, tok = pair
    bank, scores = result["_bank"], result["_scores"]
    vocab = len(tok)
    cached = D.TeacherStates(teacher, bank, vocab, batch_size=4)
    uncached = D.TeacherStates(teacher, bank, vocab, batch_size=4, cache_gb=0)
    assert cached.cache is not None and uncached.cache is None
    again = D.score_bank(student, uncached, bank, batch_size=3)
    for name in D.SCORES:
        assert_scores_close(again[name], scores[name], name)
    sel, _ = D.select_on_bank("teachability", scores, bank, 0.3)
    a, la = D.train_on_bank(student, cached, bank, sel.keep, steps=2, lr=LR, batch_size=2)
    b, lb = D.train_on_bank(student, uncached, bank, sel.keep, steps=2, lr=LR, batch_size=5)
    assert la == pytest.approx(lb, rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=adam_atol(2), rtol=1e-4)


def test_cli_defaults_to_the_lab(tmp_path, monkeypatch):
    import lab.models

    student_dir, teacher_dir = save_pair(str(tmp_path))
    prompts = write_prompts(str(tmp_path / "eval_prompts.jsonl"), n=4)
    calls = []

    def fake_prepare(cache_dir, cfg=None, force=False, progress=True):
        calls.append(cache_dir)
        return {"paths": {"dir": str(tmp_path), "teacher": teacher_dir, "student": student_dir,
                          "tokenizer": student_dir, "eval_prompts": prompts}, "key": "fake", "cached": True}

    monkeypatch.setattr(lab.models, "prepare_lab_models", fake_prepare)
    out = tmp_path / "out"
    assert D.main(["--contexts", "3", "--max_tokens", "4", "--steps", "1", "--budgets", "0.3", "--selectors",
                   "soft_or", "--bootstrap", "20", "--predict_bootstrap", "0", "--output_dir", str(out),
                   "--no_progress", "--lab_cache", str(tmp_path / "cache"), "--no_tokens_csv"]) == 0
    assert calls == [str(tmp_path / "cache")]
    report = json.load(open(out / "diagnostic.json"))
    assert report["config"]["models"]["lab_key"] == "fake" and report["bank"]["contexts"] == 3
    assert not (out / "tokens.csv").exists()
