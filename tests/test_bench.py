"""lab.bench: every variant runs the real loss step and they agree on the loss; the driver writes its table."""

import json

import pytest
import torch

from lab import bench


def _inputs(frozen=False):
    return bench._inputs(96, 16, 64, torch.float64, torch.device("cpu"), frozen, seed=3)


def test_full_token_variants_compute_the_same_loss_and_gradient():
    """trl, chunked, fused and the upstream-style step are four ways to the mean reverse KL and its gradient."""
    losses, grads = {}, {}
    for variant in ("trl_full", "chunked_full", "upstream_full", "fused_full"):
        h_s, w_s, h_t, w_t, seq = _inputs()
        losses[variant], rows = bench.loss_step(variant, 32, h_s, w_s, h_t, w_t, seq, top_k=4)
        grads[variant] = (h_s.grad.clone(), w_s.grad.clone())
        assert rows == 96
    for variant in losses:
        assert losses[variant] == pytest.approx(losses["upstream_full"], rel=1e-5)
        for got, ref in zip(grads[variant], grads["upstream_full"]):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)
    h_s, w_s, h_t, w_t, seq = _inputs(frozen=True)
    frozen, _ = bench.loss_step("fused_frozen", 32, h_s, w_s, h_t, w_t, seq, top_k=4)
    assert frozen == pytest.approx(losses["fused_full"], rel=1e-9) and w_s.grad is None
    torch.testing.assert_close(h_s.grad, grads["fused_full"][0])


@pytest.mark.parametrize("rule", ["random", "teachability", "soft_or"])
def test_selective_variant_keeps_about_rho_of_the_rows(rule):
    h_s, w_s, h_t, w_t, seq = _inputs()
    loss, rows = bench.loss_step(f"{rule}@0.25", 32, h_s, w_s, h_t, w_t, seq, top_k=4)
    assert 0 < rows <= 0.3 * 96 and loss > 0
    assert (h_s.grad.abs().sum(-1) > 0).sum() == rows  # only the kept rows get a gradient


def test_targets_are_checked_against_the_reference_at_the_largest_n():
    results = [{"variant": "upstream_full", "n": 8, "time_s": 10.0, "peak_extra_gb": 1.0},
               {"variant": "trl_full", "n": 8, "time_s": 20.0, "peak_extra_gb": 3.0},
               {"variant": "fused_full", "n": 8, "time_s": 8.0, "peak_extra_gb": 0.5},
               {"variant": "q3@0.1", "n": 8, "time_s": 6.0, "peak_extra_gb": 0.2},
               {"variant": "random@0.1", "n": 8, "time_s": 1.0, "peak_extra_gb": 0.1}]
    bench._ratios(results)
    got = {(t["variant"], t["target"]): t["met"] for t in bench.check_targets(results)}
    assert got == {("fused_full", "time <= 0.9x upstream_full, memory <= 0.3x"): False,  # memory 0.5x
                   ("q3@0.1", "time <= 0.65x upstream_full"): True, ("q3@0.1", "time <= 0.35x trl_full"): True}


def test_driver_runs_variants_in_subprocesses_and_writes_json(tmp_path):
    out = tmp_path / "b.json"
    bench.main(["--n", "64", "--h", "16", "--v", "64", "--full", "upstream_full", "fused_full", "--rules", "q3",
                "--rhos", "0.5", "--repeats", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["upstream_full", "fused_full", "q3@0.5"]
    assert all("error" not in r and r["time_vs_upstream"] > 0 for r in report["results"]), report["results"]
    assert report["meta"]["threads"] == 1 and report["targets"]


def test_bad_flags_are_refused():
    with pytest.raises(SystemExit):
        bench.main(["--rules", "no_such_rule"])
    with pytest.raises(SystemExit):
        bench.main(["--full", "nope"])
