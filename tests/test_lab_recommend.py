"""lab.recommend: the regime measured from token statistics (against direct float64 counts), the decision rules,
the check against a study's best rule, and the CLI on a lab task."""

import numpy as np
import pytest
import torch

from lab.recommend import check_recommendation, main, recommend, regime_from_stats


def _stats(n=640, seed=0, low_entropy_disagreement=False, saturated_support=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(n, generator=g, dtype=torch.float64)
    kl = torch.rand(n, generator=g, dtype=torch.float64)
    top = torch.zeros(n, dtype=torch.bool)
    top[: n // 10] = True  # the planted top-10% KL tokens
    kl[top] = 5.0 + torch.rand(int(top.sum()), generator=g, dtype=torch.float64)
    # the planted tokens' entropy: all below the median (confident disagreement) or all above it (hesitation)
    low = 0.01 * torch.rand(int(top.sum()), generator=g, dtype=torch.float64)
    h[top] = low if low_entropy_disagreement else 0.9 + 10 * low
    support = torch.ones(n, dtype=torch.float64) if saturated_support else torch.rand(n, generator=g, dtype=torch.float64)
    support[:3] = 0.0
    return {"entropy_norm": h.float(), "reverse_kl": kl.float(), "support_mass": support.float(),
            "local_forward_kl": torch.rand(n, generator=g).float()}


def test_regime_counts_match_a_direct_reference():
    stats = _stats(seed=3)
    regime = regime_from_stats(stats)
    h, kl = stats["entropy_norm"].double().numpy(), stats["reverse_kl"].double().numpy()
    # torch's median of an even count is the lower middle value: use the same cut-offs in the reference
    mh, mk = np.sort(h)[(len(h) - 1) // 2], np.sort(kl)[(len(kl) - 1) // 2]
    q = {"Q1": (h >= mh) & (kl >= mk), "Q2": (h >= mh) & (kl < mk), "Q3": (h < mh) & (kl >= mk),
         "Q4": (h < mh) & (kl < mk)}
    top = np.argsort(-kl, kind="stable")[: round(0.1 * len(kl))]
    for name, m in q.items():
        assert regime["census_all"][name] == pytest.approx(m.mean())
        assert regime["census_top_kl"][name] == pytest.approx(m[top].mean())
    assert sum(regime["census_all"].values()) == pytest.approx(1.0)
    assert regime["tokens"] == 640 and regime["degenerate_axes"] == []
    assert regime_from_stats(_stats(saturated_support=True))["degenerate_axes"] == ["support_mass"]
    with pytest.raises(ValueError, match="no tokens"):
        regime_from_stats({"entropy_norm": torch.zeros(0), "reverse_kl": torch.zeros(0)})


def test_decision_rules():
    hesitant = recommend(regime_from_stats(_stats()))  # disagreement at high entropy (reverse_sum-like)
    assert hesitant["config"] == "soft_or@0.2" and hesitant["normalization"] == "quantile"
    confident = recommend(regime_from_stats(_stats(low_entropy_disagreement=True, saturated_support=True)))
    assert confident["config"] == "entropy_kl_sample@0.2" and confident["normalization"] == "minmax"
    assert any("avoid top-k of raw KL and Q3-only" in r for r in confident["reasons"])
    assert "--gamma 1" in confident["flags"]


def _run(config, seed, correct):
    return {"config": config, "seed": seed, "correct": correct}


def test_check_against_the_study():
    summary = [{"config": "all_tokens", "selector": "none (all tokens)", "exact_match": 0.9},
               {"config": "soft_or@0.2", "selector": "soft_or", "exact_match": 0.5},
               {"config": "entropy_kl_sample@0.2", "selector": "entropy_sample", "exact_match": 0.6},
               {"config": "random@0.2", "selector": "random", "exact_match": 0.1}]
    ones, zeros = [1.0] * 50, [0.0] * 50
    runs = [_run("soft_or@0.2", s, ones[:25] + zeros[:25]) for s in (0, 1)] + \
           [_run("entropy_kl_sample@0.2", s, ones[:26] + zeros[:24]) for s in (0, 1)] + \
           [_run("random@0.2", s, zeros) for s in (0, 1)]
    assert check_recommendation(summary, runs, "entropy_kl_sample@0.2", 200)["verdict"] == "best"
    tied = check_recommendation(summary, runs, "soft_or@0.2", 200)
    assert tied["best"] == "entropy_kl_sample@0.2" and tied["verdict"] == "tied"
    assert tied["interval"]["mean"] == pytest.approx(-0.02)
    worse = check_recommendation(summary, runs, "random@0.2", 200)
    assert worse["verdict"] == "worse" and worse["interval"]["hi"] < 0
    assert check_recommendation(summary, runs, "q3@0.1", 200)["verdict"] == "not run"


def test_cli_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--student", "x"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --student, --teacher and --prompts")
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "error: give either --lab_task" in capsys.readouterr().err


def test_cli_on_a_shipped_lab_task(tmp_path, capsys):
    out = tmp_path / "rec.json"
    assert main(["--lab_task", "reverse_sum", "--lab_cache", str(tmp_path / "cache"), "--limit", "24",
                 "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Recommendation:" in text and "census of the top-10% reverse-KL tokens" in text
    import json

    saved = json.loads(out.read_text())
    assert saved["recommendation"]["config"] in ("soft_or@0.2", "entropy_kl_sample@0.2")
    assert saved["regime"]["tokens"] > 0
