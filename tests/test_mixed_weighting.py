"""`weighting="mixed"` (tip_ext/selectors.py): every token kept, the rule's kept set K (k of N) weighted
(1 - mix) + mix N / k, the rest 1 - mix; checked against a float64 reference built from the hard rule's keep mask."""

import pytest
import torch

from tip_ext.selectors import select
from tip_ext.trainer import SelectorConfig, TipSelector


def _stats(n=640, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"entropy_norm": torch.rand(n, generator=g), "reverse_kl": torch.rand(n, generator=g) * 3}, \
        torch.arange(n) // 64  # 10 sequences of 64 tokens


def _reference(keep: torch.Tensor, mix: float) -> torch.Tensor:
    n, k = keep.numel(), int(keep.sum())
    w = torch.tensor([(1 - mix) + (mix * n / k if kept else 0.0) for kept in keep.tolist()], dtype=torch.float64)
    return w


@pytest.mark.parametrize("rule,ratio,options", [("soft_or", 0.2, {}), ("position_first", 0.3, {}),
                                                ("entropy_sample", 0.2, {"gamma": 1.0}),
                                                ("divergence_topk", 0.1, {})])
@pytest.mark.parametrize("mix", [0.5, 0.25, 1.0])
def test_weights_match_the_reference(rule, ratio, options, mix):
    stats, seq = _stats()
    hard = select(rule, stats, ratio, sequence_ids=seq, generator=torch.Generator().manual_seed(1), **options)
    got = select(rule, stats, ratio, sequence_ids=seq, generator=torch.Generator().manual_seed(1), weighting="mixed",
                 mix=mix, **options)
    assert got.keep.all()
    want = _reference(hard.keep, mix)
    torch.testing.assert_close(got.weights.double(), want, rtol=1e-6, atol=1e-6)
    assert got.weights.double().mean().item() == pytest.approx(1.0, abs=1e-6)
    if mix == 1.0:  # the hard rule's tokens only, at weight N/k
        assert torch.equal(got.weights > 0, hard.keep)


def test_edge_cases():
    stats, seq = _stats(n=64)
    everything = select("position_first", stats, 1.0, sequence_ids=seq, weighting="mixed", mix=0.5)
    torch.testing.assert_close(everything.weights, torch.ones(64))  # k = N: plain all-token weights
    one = select("position_first", {"x": torch.zeros(1)}, 0.5, weighting="mixed", mix=0.3)
    torch.testing.assert_close(one.weights, torch.ones(1))  # one token, kept by min_keep
    with pytest.raises(ValueError, match="mix must be in"):
        select("position_first", stats, 0.3, sequence_ids=seq, weighting="mixed", mix=0.0)
    with pytest.raises(ValueError, match="weighting must be one of"):
        select("position_first", stats, 0.3, sequence_ids=seq, weighting="fuzzy")


def test_selector_config_and_tip_selector():
    with pytest.raises(ValueError, match="--selector_mix"):
        SelectorConfig(selector="soft_or", selector_weighting="mixed", selector_mix=1.5)
    with pytest.raises(ValueError, match="'hard', 'soft' or 'mixed'"):
        SelectorConfig(selector="soft_or", selector_weighting="fuzzy")
    stats, seq = _stats()
    cfg = SelectorConfig(selector="soft_or", ratio=0.2, selector_weighting="mixed", selector_mix=0.25, census=False)
    choice = TipSelector(cfg).choose(stats, seq, seq * 0, torch.Generator().manual_seed(0))
    hard = select("soft_or", stats, 0.2, sequence_ids=seq)
    torch.testing.assert_close(choice.weights.double(), _reference(hard.keep, 0.25), rtol=1e-6, atol=1e-6)
