import math

import numpy as np
import pytest
import torch

import tip_ext.stats as stats_mod
from opsd.core.heads import LMHead
from tip_ext import STAT_NAMES, token_stats, token_stats_from_hidden


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z[np.isfinite(z)].max()
    e = np.exp(z - m)
    return z - m - np.log(e.sum())


def _kl(p, lp, lq):
    nz = p > 0
    return float((p[nz] * (lp[nz] - lq[nz])).sum())


def reference(zs: torch.Tensor, zt: torch.Tensor, top_k: int, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Float64, row by row, straight from docs/METHODS.md section 3."""
    zs = zs.double().numpy() / temperature
    zt = zt.double().numpy() / temperature
    out = {name: [] for name in STAT_NAMES}
    with np.errstate(divide="ignore", invalid="ignore"):
        for s_row, t_row in zip(zs, zt):
            vocab = s_row.size
            ls, lt = _log_softmax(s_row), _log_softmax(t_row)
            ps, pt = np.exp(ls), np.exp(lt)
            h = -float((ps[ps > 0] * ls[ps > 0]).sum())
            out["entropy"].append(h)
            out["entropy_norm"].append(h / math.log(vocab) if vocab > 1 else 0.0)
            out["reverse_kl"].append(_kl(ps, ls, lt))
            out["forward_kl"].append(_kl(pt, lt, ls))
            out["teacher_entropy"].append(-float((pt[pt > 0] * lt[pt > 0]).sum()))
            k = min(top_k, vocab)
            top_s = set(np.argsort(-s_row, kind="stable")[:k].tolist())
            top_t = set(np.argsort(-t_row, kind="stable")[:k].tolist())
            out["support_mass"].append(float(sum(pt[v] for v in top_s)))
            u = sorted(top_s | top_t)
            ps_u = ps[u] / ps[u].sum()
            pt_u = pt[u] / pt[u].sum()
            out["local_forward_kl"].append(_kl(pt_u, np.log(pt_u), np.log(ps_u)))
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in out.items()}


def assert_matches(got: dict, ref: dict, names=STAT_NAMES):
    assert set(got) == set(names)
    for name in names:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def random_logits(n, vocab, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale, torch.randn(n, vocab, generator=g) * scale


@pytest.mark.parametrize(
    "n,vocab,top_k,chunk_size",
    [(13, 50, 16, 4), (9, 7, 16, 1024), (10, 300, 8, 3), (5, 1000, 32, 5), (1, 40, 16, 1), (4, 2, 1, 3), (3, 1, 16, 2)],
)
def test_matches_reference(n, vocab, top_k, chunk_size):
    zs, zt = random_logits(n, vocab, seed=n * 1000 + vocab)
    got = token_stats(zs, zt, top_k=top_k, chunk_size=chunk_size)
    assert_matches(got, reference(zs, zt, top_k))


def test_temperature_and_low_precision_input():
    zs, zt = random_logits(6, 64, seed=1)
    zs, zt = zs.bfloat16(), zt.bfloat16()
    got = token_stats(zs, zt, top_k=5, chunk_size=4, temperature=0.7)
    assert_matches(got, reference(zs, zt, 5, temperature=0.7))


def test_neg_inf_logits_shared_mask():
    zs, zt = random_logits(8, 30, seed=2)
    mask = torch.rand(8, 30, generator=torch.Generator().manual_seed(3)) < 0.6
    mask[:, 0] = False  # at least one finite logit per row
    mask[0, 1:] = True  # a row with a single finite entry: fewer finite ids than top_k
    zs, zt = zs.masked_fill(mask, -math.inf), zt.masked_fill(mask, -math.inf)
    got = token_stats(zs, zt, top_k=16, chunk_size=3)
    for value in got.values():
        assert torch.isfinite(value).all()
    assert_matches(got, reference(zs, zt, 16))
    assert got["entropy"][0] == 0 and got["reverse_kl"][0] == 0 and got["support_mass"][0] == pytest.approx(1.0)


def test_teacher_zero_where_student_has_mass_gives_infinite_reverse_kl():
    zs, zt = random_logits(4, 20, seed=4)
    zt[:, 19] = -math.inf  # the student has mass there
    got = token_stats(zs, zt, top_k=4, chunk_size=2)
    ref = reference(zs, zt, 4)
    assert torch.isinf(got["reverse_kl"]).all()
    assert torch.isfinite(got["forward_kl"]).all()
    assert_matches(got, ref)


def test_identical_distributions():
    zs, _ = random_logits(7, 100, seed=5)
    got = token_stats(zs, zs.clone(), top_k=10, chunk_size=3)
    for name in ("reverse_kl", "forward_kl", "local_forward_kl"):
        assert torch.all(got[name].abs() <= 1e-6), name
    torch.testing.assert_close(got["teacher_entropy"], got["entropy"])
    top_mass = torch.softmax(zs.double(), -1).topk(10, -1).values.sum(-1)
    torch.testing.assert_close(got["support_mass"].double(), top_mass, rtol=1e-6, atol=1e-6)


def test_uniform_student_has_entropy_norm_one():
    got = token_stats(torch.zeros(2, 37), torch.randn(2, 37), names=["entropy_norm", "entropy"])
    torch.testing.assert_close(got["entropy_norm"], torch.ones(2))
    torch.testing.assert_close(got["entropy"], torch.full((2,), math.log(37)))


def test_names_restrict_and_skip_top_k(monkeypatch):
    zs, zt = random_logits(5, 20, seed=6)
    full = token_stats(zs, zt)

    def no_topk(*args, **kwargs):
        raise AssertionError("top-K computed although no support statistic was requested")

    monkeypatch.setattr(torch.Tensor, "topk", no_topk)
    got = token_stats(zs, zt, names=("reverse_kl", "entropy_norm"))
    assert set(got) == {"reverse_kl", "entropy_norm"}
    torch.testing.assert_close(got["reverse_kl"], full["reverse_kl"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["entropy_norm"], full["entropy_norm"], rtol=1e-6, atol=1e-7)
    monkeypatch.undo()
    got = token_stats(zs, zt, names=["support_mass"])
    assert set(got) == {"support_mass"}
    torch.testing.assert_close(got["support_mass"], full["support_mass"], rtol=1e-6, atol=1e-7)


def test_chunks_bound_rows(monkeypatch):
    seen = []
    original = stats_mod._chunk_stats

    def spy(zs, zt, names, top_k):
        seen.append(zs.shape[0])
        return original(zs, zt, names, top_k)

    monkeypatch.setattr(stats_mod, "_chunk_stats", spy)
    zs, zt = random_logits(11, 9, seed=7)
    token_stats(zs, zt, chunk_size=4)
    assert seen == [4, 4, 3]


def test_empty_and_errors():
    got = token_stats(torch.zeros(0, 5), torch.zeros(0, 5))
    assert all(v.shape == (0,) and v.dtype == torch.float32 for v in got.values())
    with pytest.raises(ValueError, match="shape"):
        token_stats(torch.zeros(3, 5), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="unknown statistic"):
        token_stats(torch.zeros(3, 5), torch.zeros(3, 5), names=["entropy", "kl"])
    with pytest.raises(ValueError, match="top_k"):
        token_stats(torch.zeros(3, 5), torch.zeros(3, 5), top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        token_stats(torch.zeros(3, 5), torch.zeros(3, 5), temperature=0.0)


class SpyHead(LMHead):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows = []

    def logits(self, hidden, temperature=1.0):
        self.rows.append(hidden.shape[0])
        return super().logits(hidden, temperature)


def _heads(seed):
    g = torch.Generator().manual_seed(seed)
    student = SpyHead(weight=torch.randn(40, 8, generator=g), bias=torch.randn(40, generator=g), scale=0.7,
                      softcap=4.0, vocab_size=37)
    teacher = SpyHead(weight=torch.randn(45, 12, generator=g) * 0.5, scale=1.3, vocab_size=37)
    hs, ht = torch.randn(11, 8, generator=g), torch.randn(11, 12, generator=g)
    return student, teacher, hs, ht


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_from_hidden_matches_logits(temperature):
    student, teacher, hs, ht = _heads(seed=8)
    got = token_stats_from_hidden(hs, student, ht, teacher, top_k=6, chunk_size=4, temperature=temperature)
    assert student.rows == [4, 4, 3] and teacher.rows == [4, 4, 3]
    zs, zt = student.logits(hs, temperature), teacher.logits(ht, temperature)
    assert zs.shape == (11, 37)
    expected = token_stats(zs, zt, top_k=6)
    for name in STAT_NAMES:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert_matches(got, reference(zs, zt, 6))


def test_from_hidden_reference_from_raw_weights():
    student, teacher, hs, ht = _heads(seed=9)
    z = hs.double() @ student.weight[:37].double().t() + student.bias[:37].double()
    z = 4.0 * torch.tanh(z * 0.7 / 4.0)
    zt = (ht.double() @ teacher.weight[:37].double().t()) * 1.3
    got = token_stats_from_hidden(hs, student, ht, teacher, top_k=3, chunk_size=5, names=["entropy", "forward_kl"])
    ref = reference(z, zt, 3)
    torch.testing.assert_close(got["entropy"].double(), ref["entropy"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["forward_kl"].double(), ref["forward_kl"], rtol=1e-5, atol=1e-6)


def test_from_hidden_errors():
    student, teacher, hs, ht = _heads(seed=10)
    teacher.vocab_size = None
    with pytest.raises(ValueError, match="vocabulary sizes"):
        token_stats_from_hidden(hs, student, ht, teacher)
    teacher.vocab_size = 37
    with pytest.raises(ValueError, match="same N"):
        token_stats_from_hidden(hs, student, ht[:5], teacher)
