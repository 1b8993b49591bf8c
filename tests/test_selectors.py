import math
from fractions import Fraction
from itertools import permutations

import numpy as np
import pytest
import torch

from tip_ext import RULES, TokenChoice, needed_stats, register, select

# ------------------------------------------------------------------ independent references (docs/METHODS.md sections 4-5)


def floor_k(ratio, n, min_keep=1):
    return min(n, max(math.floor(Fraction(str(ratio)) * n), min_keep))


def ceil_k(ratio, n):
    return min(n, math.ceil(Fraction(str(ratio)) * n))


def groups_of(seq):
    out = {}
    for i, s in enumerate(seq):
        out.setdefault(s, []).append(i)
    return list(out.values())


def best(score, idxs, k):
    return sorted(idxs, key=lambda i: (-score[i], i))[:k]


def mask(n, idxs):
    m = np.zeros(n, dtype=bool)
    m[list(idxs)] = True
    return m


def minmax(x):
    x = np.asarray(x, dtype=np.float64)
    return (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else np.zeros_like(x)


def clip_minmax(h, q=0.98):
    return minmax(np.minimum(h, np.quantile(h, q)))


def robust(z, q_low=0.05, q_high=0.95, eps=1e-8):
    lo, hi = np.quantile(z, q_low), np.quantile(z, q_high)
    return np.clip((z - lo) / (hi - lo + eps), 0, 1)


def ref_batch_top(score, ratio, min_keep=1):
    n = len(score)
    return mask(n, best(score, range(n), floor_k(ratio, n, min_keep)))


def ref_seq_top(score, seq, ratio, min_keep=1):
    keep = []
    for idxs in groups_of(seq):
        keep += best(score, idxs, floor_k(ratio, len(idxs), min_keep))
    return mask(len(score), keep)


def ref_ta(score, seq, ratio):
    n = len(score)
    keep = set(best(score, range(n), ceil_k(ratio, n)))
    for idxs in groups_of(seq):
        if not keep & set(idxs):
            keep.add(best(score, idxs, 1)[0])
    return mask(n, keep)


def ref_soft_or(st, q=0.98):
    """TIP's soft-OR in exact rational arithmetic (the probability that at least one of two independent events
    with probabilities h, d happens), so that equal scores are exactly equal and ranking ties are real ties."""
    h, d = clip_minmax(st["entropy_norm"], q), minmax(st["reverse_kl"])
    return np.array([1 - (1 - Fraction(a)) * (1 - Fraction(b)) for a, b in zip(h.tolist(), d.tolist())],
                    dtype=object)


def ref_teach(st, incompatible=False):
    d, c = robust(st["local_forward_kl"]), robust(st["support_mass"])
    return d * (1 - c) if incompatible else d * c


LENGTHS = (7, 1, 12, 3, 17, 1, 9)
SEQ_LABELS = (4, 0, 9, 2, 7, 3, 1)  # arbitrary ids, not sorted


def make_batch(seed, lengths=LENGTHS, quantized=False):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    if quantized:  # few distinct values: many ties
        st = {k: rng.integers(0, 3, n).astype(np.float64) / 2 for k in ("entropy_norm", "reverse_kl", "forward_kl",
                                                                        "local_forward_kl", "support_mass")}
    else:
        st = {
            "entropy_norm": rng.uniform(0, 1, n),
            "reverse_kl": rng.exponential(0.5, n),
            "forward_kl": rng.exponential(0.5, n),
            "local_forward_kl": rng.exponential(0.3, n),
            "support_mass": rng.uniform(0, 1, n),
        }
    st["entropy"] = st["entropy_norm"] * math.log(1000)
    seq = [SEQ_LABELS[i % len(SEQ_LABELS)] for i, m in enumerate(lengths) for _ in range(m)]
    return st, seq


def run(rule, st, seq, ratio, **options):
    stats = {k: torch.tensor(v, dtype=torch.float32) for k, v in st.items()}
    sel = select(rule, stats, ratio, sequence_ids=torch.tensor(seq), **options)
    assert sel.keep.dtype == torch.bool and sel.keep.shape == (len(seq),)
    return sel


def f32(st):
    """The reference sees the same float32 values the selector gets."""
    return {k: np.asarray(v, dtype=np.float32).astype(np.float64) for k, v in st.items()}


# ------------------------------------------------------------------ deterministic rules: exact masks

RATIOS = (0.5, 0.2, 0.1, 0.03, 1.0)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("ratio", RATIOS)
def test_deterministic_rules_exact(ratio, quantized):
    st, seq = make_batch(seed=int(ratio * 100) + quantized, quantized=quantized)
    r = f32(st)
    n = len(seq)
    pos = -np.arange(n, dtype=np.float64)
    expected = {
        "all": (np.ones(n, bool), {}),
        "position_first": (ref_seq_top(pos, seq, ratio), {}),
        "position_last": (ref_seq_top(-pos, seq, ratio), {}),
        "entropy_topk": (ref_batch_top(r["entropy_norm"], ratio), {}),
        "divergence_topk": (ref_batch_top(r["reverse_kl"], ratio), {}),
        "soft_or": (ref_seq_top(ref_soft_or(r), seq, ratio), {}),
        "soft_or/bottom": (ref_seq_top(-ref_soft_or(r), seq, ratio), {"bottom": True}),
        "q3": (ref_batch_top(r["forward_kl"] * (1 - clip_minmax(r["entropy_norm"])), ratio), {}),
        "teachability": (ref_ta(ref_teach(r), seq, ratio), {}),
        "teachability/incompatible": (ref_ta(ref_teach(r, True), seq, ratio), {"incompatible": True}),
        "teachability_entropy": (ref_ta(1 - (1 - robust(r["entropy"])) * (1 - ref_teach(r)), seq, ratio), {}),
    }
    for name, (want, options) in expected.items():
        got = run(name.split("/")[0], st, seq, ratio, **options).keep.numpy()
        assert np.array_equal(got, want), f"{name} ratio={ratio}: {np.flatnonzero(got)} vs {np.flatnonzero(want)}"


def test_scope_options():
    st, seq = make_batch(seed=11)
    r = f32(st)
    got = run("soft_or", st, seq, 0.3, per_sequence=False).keep.numpy()
    assert np.array_equal(got, ref_batch_top(ref_soft_or(r), 0.3))
    got = run("q3", st, seq, 0.3, per_sequence=True).keep.numpy()
    assert np.array_equal(got, ref_seq_top(r["forward_kl"] * (1 - clip_minmax(r["entropy_norm"])), seq, 0.3))
    got = run("entropy_topk", st, seq, 0.3, per_sequence=True).keep.numpy()
    assert np.array_equal(got, ref_seq_top(r["entropy_norm"], seq, 0.3))
    got = run("soft_or", st, seq, 0.3, entropy_clip_quantile=0.5).keep.numpy()
    assert np.array_equal(got, ref_seq_top(ref_soft_or(r, 0.5), seq, 0.3))
    got = run("teachability", st, seq, 0.05, q_low=0.2, q_high=0.8).keep.numpy()
    s = robust(r["local_forward_kl"], 0.2, 0.8) * robust(r["support_mass"], 0.2, 0.8)
    assert np.array_equal(got, ref_ta(s, seq, 0.05))


def test_position_rules_by_hand():
    seq = [5, 5, 5, 5, 1, 8, 8, 8, 8, 8, 8]
    stats = {"x": torch.zeros(11)}
    ids = torch.tensor(seq)
    first = select("position_first", stats, 0.5, sequence_ids=ids).keep.tolist()
    last = select("position_last", stats, 0.5, sequence_ids=ids).keep.tolist()
    assert first == [1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert last == [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    first0 = select("position_first", stats, 0.5, sequence_ids=ids, min_keep=0).keep.tolist()
    assert first0 == [1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_scores_are_reported():
    st, seq = make_batch(seed=12)
    r = f32(st)
    s = ref_soft_or(r).astype(np.float64)
    np.testing.assert_allclose(run("soft_or", st, seq, 0.5).score.numpy(), s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(run("soft_or", st, seq, 0.5, bottom=True).score.numpy(), 1 - s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(run("teachability", st, seq, 0.5).score.numpy(), ref_teach(r), rtol=1e-6, atol=1e-7)
    assert run("position_first", st, seq, 0.5).score is None


# ------------------------------------------------------------------ ties and edge cases


def test_all_equal_scores_keep_earliest():
    seq = [0] * 4 + [1] * 6
    st = {k: np.full(10, 0.25) for k in ("entropy_norm", "reverse_kl", "forward_kl", "local_forward_kl",
                                         "support_mass", "entropy")}
    assert run("entropy_topk", st, seq, 0.3).keep.tolist() == [1, 1, 1] + [0] * 7
    assert run("soft_or", st, seq, 0.5).keep.tolist() == [1, 1, 0, 0, 1, 1, 1, 0, 0, 0]
    assert run("soft_or", st, seq, 0.5, bottom=True).keep.tolist() == [1, 1, 0, 0, 1, 1, 1, 0, 0, 0]
    # ceil(0.25 * 10) = 3 earliest tokens, then sequence 1's first token
    assert run("teachability", st, seq, 0.25).keep.tolist() == [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]


def test_tiny_ratio_and_min_keep():
    st, seq = make_batch(seed=13)
    n = len(seq)
    r = f32(st)
    ratio = 0.5 / n  # 0 < rho * N < 1
    keep = run("entropy_topk", st, seq, ratio).keep.numpy()
    assert keep.sum() == 1 and keep[np.argmax(r["entropy_norm"])]
    assert run("entropy_topk", st, seq, ratio, min_keep=0).keep.sum() == 0
    assert run("random", st, seq, ratio).keep.sum() == 1
    assert run("random", st, seq, ratio, min_keep=0).keep.sum() == 0
    assert run("entropy_sample", st, seq, ratio).keep.sum() == 1
    assert run("soft_or", st, seq, ratio).keep.sum() == len(LENGTHS)  # one per sequence
    assert run("soft_or", st, seq, ratio, min_keep=0).keep.sum() == 0
    keep = run("teachability", st, seq, ratio).keep.numpy()  # ceil -> 1, plus one per other sequence
    assert keep.sum() == len(LENGTHS)
    assert np.array_equal(keep, ref_ta(ref_teach(r), seq, ratio))
    assert run("teachability", st, seq, ratio, ensure_each_sequence=False).keep.sum() == 1


def test_floor_tolerance():
    st = {"entropy_norm": torch.rand(100)}
    assert select("entropy_topk", st, 0.29).keep.sum() == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert select("teachability", {"local_forward_kl": torch.rand(100), "support_mass": torch.rand(100)},
                  0.07).keep.sum() == 7  # 0.07 * 100 = 7.000000000000001


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_edge_cases(rule):
    st, seq = make_batch(seed=14)
    assert run(rule, st, seq, 1.0).keep.all()
    single = {k: v[:1] for k, v in st.items()}
    for ratio in (1.0, 0.1):
        assert run(rule, single, [3], ratio).keep.tolist() == [True]
    ones = run(rule, st, list(range(len(seq))), 0.1).keep  # every sequence has one token
    if rule in ("position_first", "position_last", "soft_or", "teachability", "teachability_entropy", "all"):
        assert ones.all()
    empty = select(rule, {k: torch.zeros(0) for k in st}, 0.5, sequence_ids=torch.zeros(0, dtype=torch.long))
    assert empty.keep.shape == (0,) and empty.keep.dtype == torch.bool
    no_ids = select(rule, {k: torch.tensor(v, dtype=torch.float32) for k, v in st.items()}, 0.5).keep
    assert no_ids.shape == (len(seq),)


def test_validation_errors():
    stats = {"entropy_norm": torch.rand(5)}
    with pytest.raises(ValueError, match="registered: .*soft_or"):
        select("nope", stats, 0.5)
    for ratio in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            select("entropy_topk", stats, ratio)
    with pytest.raises(ValueError, match="reverse_kl"):
        select("soft_or", stats, 0.5)
    with pytest.raises(ValueError, match="reverse_kl"):
        select("entropy_sample", stats, 0.5, gamma=1.0)
    with pytest.raises(ValueError, match="no option"):
        select("entropy_topk", stats, 0.5, bottom=True)
    with pytest.raises(ValueError, match="weighting"):
        select("entropy_topk", stats, 0.5, weighting="medium")
    with pytest.raises(ValueError, match="no score"):
        select("random", stats, 0.5, weighting="soft")
    with pytest.raises(ValueError, match="1-D"):
        select("entropy_topk", stats, 0.5, sequence_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown selection rule"):
        needed_stats("nope")


def test_needed_stats_and_register():
    assert needed_stats("soft_or") == ("entropy_norm", "reverse_kl")
    assert needed_stats("entropy_sample") == ("entropy_norm",)
    assert needed_stats("entropy_sample", gamma=2.0) == ("entropy_norm", "reverse_kl")
    assert set(needed_stats("teachability")) == {"local_forward_kl", "support_mass"}

    @register("test_every_other", needs=("entropy",), description="keeps even flat indices")
    def _every_other(ctx, *, offset: int = 0):
        keep = (torch.arange(ctx.n) + offset) % 2 == 0
        return TokenChoice(keep=keep, score=ctx.stats["entropy"])

    try:
        sel = select("test_every_other", {"entropy": torch.ones(5)}, 0.5, offset=1)
        assert sel.keep.tolist() == [False, True, False, True, False]
        assert RULES["test_every_other"].description == "keeps even flat indices"
    finally:
        RULES.pop("test_every_other")


def test_soft_weighting():
    st, seq = make_batch(seed=15)
    r = f32(st)
    sel = run("soft_or", st, seq, 0.2, weighting="soft")
    assert sel.keep.all()
    s = ref_soft_or(r).astype(np.float64)
    np.testing.assert_allclose(sel.weights.numpy(), s / s.mean(), rtol=1e-5)
    sel = run("teachability", st, seq, 0.2, weighting="soft")
    t = ref_teach(r)
    np.testing.assert_allclose(sel.weights.numpy(), t / t.mean(), rtol=1e-5)
    zero = select("entropy_topk", {"entropy_norm": torch.zeros(4)}, 0.5, weighting="soft")
    assert zero.weights.tolist() == [1.0] * 4
    assert run("soft_or", st, seq, 0.2).weights is None


# ------------------------------------------------------------------ entropy sampling


def inclusion_probabilities(w, k):
    """Exact P(i drawn) for k draws without replacement, each draw proportional to w among the remaining."""
    n = len(w)
    probs = np.zeros(n)
    for order in permutations(range(n), k):
        p, left = 1.0, float(sum(w))
        for i in order:
            p *= w[i] / left
            left -= w[i]
        for i in order:
            probs[i] += p
    return probs


def sample_freq(stats, ratio, draws, seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    counts = None
    for _ in range(draws):
        sel = select("entropy_sample", stats, ratio, generator=g, **options)
        counts = sel.keep.double() if counts is None else counts + sel.keep.double()
    return (counts / draws).numpy()


def test_entropy_sample_frequencies_track_weights():
    h = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.6, 0.0], dtype=torch.float64)
    # k = floor(6 / 3) = 2; 2000 draws: standard error <= 0.0112, tolerance 0.04 (> 3.5 sigma)
    freq = sample_freq({"entropy_norm": h}, 1 / 3, 2000)
    want = inclusion_probabilities(h.tolist(), 2)
    np.testing.assert_allclose(freq, want, atol=0.04)
    assert freq[5] == 0  # zero-probability token never sampled
    assert want[4] > 0.75 and want[0] < 0.15  # the test distinguishes proportional from uniform


def test_entropy_sample_alpha_gamma():
    h = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    d = torch.tensor([1.0, 3.0, 0.0, 2.0, 2.0], dtype=torch.float64)  # min-max -> [1/3, 1, 0, 2/3, 2/3]
    w = (h**2 * ((d - 0) / 3) ** 1).numpy()
    freq = sample_freq({"entropy_norm": h, "reverse_kl": d}, 0.2, 2000, seed=1, alpha=2.0, gamma=1.0)  # k = 1
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.04)  # standard error <= 0.0112
    assert freq[2] == 0


def test_entropy_sample_counts_and_zero_weights():
    st, seq = make_batch(seed=16)
    h = torch.tensor(st["entropy_norm"], dtype=torch.float32)
    h[::3] = 0
    n, n_pos = h.numel(), int((h > 0).sum())
    g = torch.Generator().manual_seed(2)
    for ratio in (0.1, 0.3, 0.5):
        k = floor_k(ratio, n)
        assert k <= n_pos
        for _ in range(50):
            keep = select("entropy_sample", {"entropy_norm": h}, ratio, generator=g).keep
            assert int(keep.sum()) == k
            assert not keep[h == 0].any()
    # k > positives: every positive kept, the rest uniformly from the zero-weight tokens
    ratio = 0.8
    k = floor_k(ratio, n)
    zero_freq = torch.zeros(n)
    for _ in range(300):
        keep = select("entropy_sample", {"entropy_norm": h}, ratio, generator=g).keep
        assert int(keep.sum()) == k and keep[h > 0].all()
        zero_freq += keep.double().float()
    zero_freq = (zero_freq / 300)[h == 0]
    expected = (k - n_pos) / (n - n_pos)
    assert torch.all((zero_freq - expected).abs() < 0.15)  # 300 draws: standard error <= 0.029


def test_entropy_sample_deterministic_and_all_zero():
    h = torch.rand(50, generator=torch.Generator().manual_seed(3))
    a = select("entropy_sample", {"entropy_norm": h}, 0.2, generator=torch.Generator().manual_seed(5)).keep
    b = select("entropy_sample", {"entropy_norm": h}, 0.2, generator=torch.Generator().manual_seed(5)).keep
    assert torch.equal(a, b)
    sel = select("entropy_sample", {"entropy_norm": torch.zeros(10)}, 0.3, importance_weights=True)
    assert int(sel.keep.sum()) == 3 and sel.weights.tolist() == sel.keep.float().tolist()


def ref_inclusion(w, k):
    """pi_t proportional to w_t, capped at 1, summing to k, in exact arithmetic (docs/METHODS.md: the unbiased variant
    needs known inclusion probabilities); the leftover budget goes uniformly to zero weights."""
    w = [Fraction(x) for x in w]
    n, positive = len(w), [i for i, x in enumerate(w) if x > 0]
    if not positive:
        return [Fraction(k, n)] * n
    if k >= len(positive):
        rest = Fraction(k - len(positive), n - len(positive)) if n > len(positive) else Fraction(0)
        return [Fraction(1) if x > 0 else rest for x in w]
    sure = set()
    while True:
        free = [i for i in positive if i not in sure]
        share = {i: (k - len(sure)) * w[i] / sum(w[j] for j in free) for i in free}
        capped = {i for i, v in share.items() if v >= 1}
        if not capped:
            return [Fraction(1) if i in sure else share.get(i, Fraction(0)) for i in range(n)]
        sure |= capped


def exact_expectation(pi, k, losses):
    """E over every order and every u of (kept-token mean of w_t * l_t, inclusion indicators) for the design
    of `entropy_sample(importance_weights=True)`: systematic sampling over a uniformly random order."""
    from tip_ext.selectors import systematic_sample

    n = len(pi)
    pi_t = torch.tensor([float(p) for p in pi], dtype=torch.float64)
    mean_loss, inclusion, orders = 0.0, np.zeros(n), list(permutations(range(n)))
    for order in orders:
        ends = np.cumsum([float(pi[i]) for i in order])
        cuts = sorted({0.0, 1.0, *[e % 1.0 for e in ends]})
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if hi - lo < 1e-12:
                continue
            keep = systematic_sample(pi_t, torch.tensor(order), (lo + hi) / 2).numpy()
            assert keep.sum() == k
            mass = (hi - lo) / len(orders)
            mean_loss += mass * sum(k / (n * float(pi[i])) * losses[i] for i in range(n) if keep[i]) / k
            inclusion += mass * keep
    return mean_loss, inclusion


def design(h, mix):
    """The sampling weights of the weighted variant: (1 - mix) * h / sum(h) + mix / N."""
    h = [Fraction(x) for x in h]
    return [(1 - Fraction(mix)) * x / sum(h) + Fraction(mix) / len(h) for x in h]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_entropy_sample_importance_weights_are_unbiased_by_exact_enumeration(k):
    h = [0.1, 0.2, 0.4, 0.0, 0.8, 0.5]
    losses = [0.3, 2.5, 1.0, 4.0, 0.7, 3.1]  # all-token mean 1.9333, with a zero-entropy token of high loss
    pi = ref_inclusion(design(h, 0.1), k)
    assert sum(pi) == k and min(pi) > 0
    mean_loss, inclusion = exact_expectation(pi, k, losses)
    assert mean_loss == pytest.approx(sum(losses) / len(losses), abs=1e-9)
    np.testing.assert_allclose(inclusion, [float(p) for p in pi], atol=1e-9)
    # without the uniform share, the zero-entropy token is never drawn: unbiased only over the others
    pi0 = ref_inclusion(h, k)
    mean0, _ = exact_expectation(pi0, k, losses)
    assert pi0[3] == 0 and mean0 == pytest.approx((sum(losses) - losses[3]) / len(losses), abs=1e-9)


def test_entropy_sample_importance_weights_follow_the_design():
    h = torch.tensor([0.1, 0.2, 0.4, 0.0, 0.8, 0.5], dtype=torch.float64)
    k, draws = 3, 3000
    pi = np.array([float(p) for p in ref_inclusion(design(h.tolist(), 0.1), k)])
    g = torch.Generator().manual_seed(4)
    freq = np.zeros(6)
    for _ in range(draws):
        sel = select("entropy_sample", {"entropy_norm": h}, 0.5, generator=g, importance_weights=True)
        kept = sel.keep.numpy()
        assert kept.sum() == k
        np.testing.assert_allclose(sel.weights.double().numpy()[kept], k / (6 * pi[kept]), rtol=1e-6)
        assert (sel.weights.numpy()[~kept] == 0).all()
        freq += kept
    np.testing.assert_allclose(freq / draws, pi, atol=0.04)  # standard error <= 0.0092
    assert pi[4] == 1.0 and 0 < pi[3] < 0.1  # 0.8 capped (always kept); the zero-entropy token is drawn rarely
    pi0 = [float(p) for p in ref_inclusion(h.tolist(), k)]
    sel = select("entropy_sample", {"entropy_norm": h}, 0.5, importance_weights=True, uniform_mix=0.0,
                 generator=torch.Generator().manual_seed(5))
    assert not sel.keep[3] and sel.weights[sel.keep].double().numpy() == pytest.approx(
        [k / (6 * pi0[i]) for i in np.flatnonzero(sel.keep.numpy())], rel=1e-6)


def test_entropy_sample_importance_weights_edge_cases():
    one = select("entropy_sample", {"entropy_norm": torch.tensor([0.7])}, 1.0, importance_weights=True)
    assert one.keep.tolist() == [True] and one.weights.tolist() == [1.0]
    # k = N: every token surely kept with weight 1; k above the positive tokens: the positive ones are sure
    h = torch.tensor([0.1, 0.2, 0.4, 0.0, 0.8, 0.5], dtype=torch.float64)
    sel = select("entropy_sample", {"entropy_norm": h}, 1.0, importance_weights=True, uniform_mix=0.0)
    assert sel.keep.all()
    torch.testing.assert_close(sel.weights.double(), torch.ones(6, dtype=torch.float64))
    zeros = select("entropy_sample", {"entropy_norm": torch.zeros(10)}, 0.3, importance_weights=True,
                   generator=torch.Generator().manual_seed(1))
    assert int(zeros.keep.sum()) == 3
    torch.testing.assert_close(zeros.weights[zeros.keep].double(), torch.ones(3, dtype=torch.float64))
    # a ratio whose budget rounds to zero keeps nothing with min_keep=0
    none = select("entropy_sample", {"entropy_norm": h}, 0.1, importance_weights=True, min_keep=0)
    assert not none.keep.any()


def test_soft_or_saturated_entropy_ties_go_to_the_earlier_position():
    """Every token with clipped entropy 1 scores exactly 1 whatever its divergence: among those, the earliest win."""
    n = 50
    h = np.linspace(0.0, 0.5, n)
    h[[7, 11, 23, 31, 40]] = 0.99  # above the 98th percentile: clipped, then normalized to exactly 1
    d = np.random.default_rng(3).uniform(0.1, 0.9, n)
    d[[7, 11, 23, 31, 40]] = [0.3, 0.6, 0.1, 0.45, 0.95]  # different divergences under a saturated entropy axis
    st = {"entropy_norm": h, "reverse_kl": d}
    st32 = f32(st)
    score = run("soft_or", st, [0] * n, 0.5).score.numpy()
    ties = score[[7, 11, 23, 31, 40]]
    assert (ties == ties[0]).all() and ties[0] == 1.0
    keep = run("soft_or", st, [0] * n, 3 / n, min_keep=0).keep.numpy()
    assert np.flatnonzero(keep).tolist() == np.flatnonzero(ref_seq_top(ref_soft_or(st32), [0] * n, 3 / n, 0)).tolist()
    assert np.flatnonzero(keep).tolist() == [7, 11, 23]


# ------------------------------------------------------------------ random control


def test_random_rule():
    stats = {"x": torch.zeros(40)}
    seen = torch.zeros(40)
    g = torch.Generator().manual_seed(6)
    for _ in range(400):
        keep = select("random", stats, 0.25, generator=g).keep
        assert int(keep.sum()) == 10
        seen += keep.float()
    assert torch.all((seen / 400 - 0.25).abs() < 0.1)  # standard error 0.022
    a = select("random", stats, 0.25, generator=torch.Generator().manual_seed(1)).keep
    b = select("random", stats, 0.25, generator=torch.Generator().manual_seed(1)).keep
    c = select("random", stats, 0.25, generator=torch.Generator().manual_seed(2)).keep
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ teachability normalizations (quantile / minmax / rank)


def ref_rank01(z):
    """(average rank - 1) / (N - 1), ties share their mean rank; written from the definition, O(N^2)."""
    z = np.asarray(z, dtype=np.float64)
    n = len(z)
    if n == 1:
        return np.zeros(1)
    below = (z[None, :] < z[:, None]).sum(1)
    equal = (z[None, :] == z[:, None]).sum(1)
    return (below + (equal - 1) / 2) / (n - 1)


REF_NORMS = {"quantile": robust, "minmax": minmax, "rank": ref_rank01}


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("normalization", ["quantile", "minmax", "rank"])
@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5])
def test_teachability_normalizations_match_their_formulas(normalization, ratio, quantized):
    st, seq = make_batch(seed=31 + int(ratio * 100), quantized=quantized)
    r = f32(st)
    norm = REF_NORMS[normalization]
    d, c = norm(r["local_forward_kl"]), norm(r["support_mass"])
    for rule, options, score in (
        ("teachability", {}, d * c),
        ("teachability", {"incompatible": True}, d * (1 - c)),
        ("teachability_entropy", {}, 1 - (1 - norm(r["entropy"])) * (1 - d * c)),
    ):
        sel = run(rule, st, seq, ratio, normalization=normalization, **options)
        np.testing.assert_allclose(sel.score.double().numpy(), score, rtol=1e-5, atol=1e-6, err_msg=f"{rule} {options}")
        if not quantized:  # with ties, which equal score wins is the tie rule's business (tested above)
            assert np.array_equal(sel.keep.numpy(), ref_ta(score, seq, ratio)), (rule, options)


def test_default_normalization_is_the_papers_quantile_clip():
    st, seq = make_batch(seed=5)
    a = run("teachability", st, seq, 0.2)
    b = run("teachability", st, seq, 0.2, normalization="quantile")
    assert torch.equal(a.keep, b.keep)
    np.testing.assert_allclose(a.score.numpy(), b.score.numpy(), rtol=0, atol=0)  # one code path, same call
    with pytest.raises(ValueError, match="normalization must be one of"):
        run("teachability", st, seq, 0.2, normalization="zscore")


def test_saturated_support_mass_defeats_the_quantile_clip_but_not_minmax():
    """The failure a second lab task showed: C ~ 1 on almost every token puts q05 and q95 at ~1, so the clipped
    Norm(C) is 0 on every token below q05, including the real mistakes (large D, C well below 1). Min-max keeps
    them; rank does not (the mistakes are the low-C tokens, so their C rank is near 0 whatever the scale)."""
    n = 200
    rng = np.random.default_rng(3)
    d = rng.uniform(0.0, 0.05, n)  # easy tokens: tiny disagreement
    c = rng.uniform(0.999, 1.0, n)  # ... and the teacher's choice in the student's top-K
    mistakes = np.arange(196, 200)
    d[mistakes], c[mistakes] = 2.0, 0.6  # learnable mistakes
    d[194:196], c[194:196] = 0.02, 0.3  # low-C tokens with nothing to teach
    st = {"local_forward_kl": d, "support_mass": c}
    seq = [i // 20 for i in range(n)]
    spread = normalization_spread_of(st)
    c32 = np.float32(c).astype(float)
    assert spread["support_mass"]["degenerate"] == 1.0
    assert spread["support_mass"]["q_low"] == pytest.approx(np.quantile(c32, 0.05), abs=1e-6)
    assert spread["support_mass"]["min"] == pytest.approx(0.3, abs=1e-6)
    quantile_kept = run("teachability", st, seq, 0.02, ensure_each_sequence=False).keep.numpy()
    assert not quantile_kept[mistakes].any()  # Norm(C) = 0 there: the mistakes score 0
    kept = run("teachability", st, seq, 0.02, ensure_each_sequence=False, normalization="minmax").keep.numpy()
    assert kept[mistakes].all() and kept.sum() == 4
    rank_kept = run("teachability", st, seq, 0.02, ensure_each_sequence=False, normalization="rank").keep.numpy()
    assert not rank_kept[mistakes].all()


def normalization_spread_of(st, **options):
    from tip_ext.selectors import normalization_spread

    return normalization_spread("teachability", {k: torch.tensor(v, dtype=torch.float32) for k, v in st.items()},
                                **options)


def test_normalization_spread_reports_quantiles_min_max():
    st, _ = make_batch(seed=8)
    r = f32(st)
    spread = normalization_spread_of(st, q_low=0.1, q_high=0.9)
    for axis in ("local_forward_kl", "support_mass"):
        v = spread[axis]
        assert v["q_low"] == pytest.approx(np.quantile(r[axis], 0.1), rel=1e-6)
        assert v["q_high"] == pytest.approx(np.quantile(r[axis], 0.9), rel=1e-6)
        assert (v["min"], v["max"]) == pytest.approx((r[axis].min(), r[axis].max()), rel=1e-6)
        assert v["degenerate"] == 0.0
    from tip_ext.selectors import normalization_spread

    assert normalization_spread("soft_or", {"entropy_norm": torch.rand(5), "reverse_kl": torch.rand(5)}) == {}
    const = normalization_spread("teachability", {"local_forward_kl": torch.ones(4), "support_mass": torch.rand(4)})
    assert const["local_forward_kl"]["degenerate"] == 1.0
    assert set(normalization_spread("teachability_entropy", {k: torch.tensor(v, dtype=torch.float32)
                                                            for k, v in st.items()})) == {
        "entropy", "local_forward_kl", "support_mass"}
