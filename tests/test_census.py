import pytest
import torch

from tip_ext import quadrant_census, summarize_kept

H = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], dtype=torch.float64)
D = torch.tensor([0.8, 0.7, 0.6, 0.1, 0.5, 0.2, 0.3, 0.4], dtype=torch.float64)
KEEP = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool)


def test_median_census_by_hand():
    # medians 0.45 / 0.45: high H = tokens 4-7, high D = tokens 0, 1, 2, 4
    # Q1 = {4}, Q2 = {5, 6, 7}, Q3 = {0, 1, 2}, Q4 = {3}; kept {0, 2, 4, 5} -> Q3, Q3, Q1, Q2
    out = quadrant_census(H, D, keep=KEEP)
    assert out["threshold/entropy"] == pytest.approx(0.45)
    assert out["threshold/divergence"] == pytest.approx(0.45)
    assert [out[f"all/Q{i}"] for i in range(1, 5)] == [1 / 8, 3 / 8, 3 / 8, 1 / 8]
    assert [out[f"kept/Q{i}"] for i in range(1, 5)] == [1 / 4, 1 / 4, 2 / 4, 0.0]
    assert [out[f"kept_frac/Q{i}"] for i in range(1, 5)] == [1.0, 1 / 3, 2 / 3, 0.0]


def test_explicit_thresholds_equal_counts_as_low():
    # H > 0.5: tokens 5-7 (token 4 equals the threshold); D > 0.6: tokens 0, 1 (token 2 equals it)
    out = quadrant_census(H, D, entropy_threshold=0.5, divergence_threshold=0.6)
    assert [out[f"all/Q{i}"] for i in range(1, 5)] == [0.0, 3 / 8, 2 / 8, 3 / 8]
    assert "kept/Q1" not in out


def test_quantile_option():
    # 75th percentiles (linear interpolation): H 0.625 -> high {6, 7}; D 0.625 -> high {0, 1}
    out = quadrant_census(H, D, quantile=0.75)
    assert out["threshold/entropy"] == pytest.approx(0.625)
    assert [out[f"all/Q{i}"] for i in range(1, 5)] == [0.0, 2 / 8, 2 / 8, 4 / 8]


def test_empty_and_nothing_kept():
    out = quadrant_census(torch.zeros(0), torch.zeros(0), keep=torch.zeros(0, dtype=torch.bool))
    assert all(v == 0.0 for v in out.values()) and len(out) == 14
    out = quadrant_census(H, D, keep=torch.zeros(8, dtype=torch.bool))
    assert all(out[f"kept/Q{i}"] == 0.0 and out[f"kept_frac/Q{i}"] == 0.0 for i in range(1, 5))
    with pytest.raises(ValueError):
        quadrant_census(H, D[:5])


def test_summarize_kept():
    out = summarize_kept({"entropy": H, "reverse_kl": D}, KEEP)
    assert out["kept_fraction"] == 0.5
    assert out["kept/entropy"] == pytest.approx((0.1 + 0.3 + 0.5 + 0.6) / 4)
    assert out["dropped/entropy"] == pytest.approx((0.2 + 0.4 + 0.7 + 0.8) / 4)
    assert out["kept/reverse_kl"] == pytest.approx((0.8 + 0.6 + 0.5 + 0.2) / 4)
    assert out["dropped/reverse_kl"] == pytest.approx((0.7 + 0.1 + 0.3 + 0.4) / 4)
    all_kept = summarize_kept({"entropy": H}, torch.ones(8, dtype=torch.bool))
    assert all_kept["dropped/entropy"] == 0.0 and all_kept["kept_fraction"] == 1.0
    empty = summarize_kept({"entropy": torch.zeros(0)}, torch.zeros(0, dtype=torch.bool))
    assert empty == {"kept_fraction": 0.0, "kept/entropy": 0.0, "dropped/entropy": 0.0}
