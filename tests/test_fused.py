"""The fused loss (gradient computed in forward) vs a float64 full-logit reference written from the formulas."""

import pytest
import torch

from opsd.core.heads import LMHead
from opsd.core.losses import weighted_divergence_loss

V, ROWS = 40, 43  # distilled vocabulary and lm_head rows (the rows beyond V are padding)


def _logits(h, w, b, scale, softcap, temperature):
    """z = T^-1 * cap(scale * (h W^T + b)) over the first V rows, cap(y) = c tanh(y / c)."""
    z = h @ w[:V].t()
    if b is not None:
        z = z + b[:V]
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _reference_loss(zs, zt, factors, beta):
    """sum_t f_t D_t; D = KL(P_S||P_T) at beta 1, KL(P_T||P_S) at 0, else beta KL(P_T||M) + (1-beta) KL(P_S||M)
    with M = (1-beta) P_S + beta P_T. Also returns D and H(P_S)."""
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if beta == 1.0:
        div = kl(ps, pt)
    elif beta == 0.0:
        div = kl(pt, ps)
    else:
        m = (1 - beta) * ps + beta * pt
        div = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    return (factors * div).sum(), div, -(ps * ps.log()).sum(-1)


def _case(n=29, h=12, h_t=20, bias=True, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    h_s, w_s = rand(n, h).requires_grad_(requires_grad), rand(ROWS, h).requires_grad_(requires_grad)
    b_s = rand(ROWS).requires_grad_(requires_grad) if bias else None
    return h_s, w_s, b_s, rand(n, h_t), rand(ROWS + 5, h_t), torch.rand(n, generator=g, dtype=torch.float64)


def _grads(*tensors):
    out = [None if t is None or t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.3])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("chunk_size", [1, 8, 512])
def test_fused_matches_reference_values_and_gradients(beta, softcap, temperature, chunk_size):
    h_s, w_s, b_s, h_t, w_t, f = _case(seed=int(beta * 10) + chunk_size)
    s_head = LMHead(w_s, b_s, scale=1.2, softcap=softcap, vocab_size=V)
    t_head = LMHead(w_t, None, scale=0.8, softcap=3.0, vocab_size=V)
    loss, div, ent = weighted_divergence_loss(h_s, s_head, h_t, t_head, f, beta, temperature, "fused", chunk_size)
    (loss * 3.5).backward()  # non-unit upstream gradient: backward must scale the stored gradients
    got = _grads(h_s, w_s, b_s)
    zs = _logits(h_s, w_s, b_s, 1.2, softcap, temperature)
    zt = _logits(h_t, w_t, None, 0.8, 3.0, temperature)
    ref_loss, ref_div, ref_ent = _reference_loss(zs, zt, f, beta)
    (ref_loss * 3.5).backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(div, ref_div.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=1e-10, atol=1e-10)
    for g, x in zip(got, (h_s, w_s, b_s)):
        torch.testing.assert_close(g, x.grad, rtol=1e-9, atol=1e-10)
    assert got[1][V:].abs().max() == 0 and got[2][V:].abs().max() == 0  # padding rows get no gradient
    assert not div.requires_grad and not ent.requires_grad


@pytest.mark.parametrize("backend", ["trl", "chunked", "fused"])
def test_every_backend_gives_the_same_weighted_loss(backend):
    h_s, w_s, b_s, h_t, w_t, f = _case(n=17, seed=5)
    s_head, t_head = LMHead(w_s, b_s, vocab_size=V), LMHead(w_t, vocab_size=V)
    loss, div, _ = weighted_divergence_loss(h_s, s_head, h_t, t_head, f, 1.0, 1.0, backend, 4)
    loss.backward()
    got = _grads(h_s, w_s, b_s)
    ref_loss, ref_div, _ = _reference_loss(_logits(h_s, w_s, b_s, 1.0, None, 1.0), _logits(h_t, w_t, None, 1.0, None,
                                                                                           1.0), f, 1.0)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(div.double(), ref_div.detach(), rtol=1e-5, atol=1e-6)
    for g, x in zip(got, (h_s, w_s, b_s)):
        torch.testing.assert_close(g.double(), x.grad, rtol=1e-4, atol=1e-6)


def test_frozen_head_gets_only_the_hidden_gradient():
    h_s, w_s, b_s, h_t, w_t, f = _case(n=9, seed=6)
    w_s.requires_grad_(False)
    b_s.requires_grad_(False)
    loss, _, _ = weighted_divergence_loss(h_s, LMHead(w_s, b_s, vocab_size=V), h_t, LMHead(w_t, vocab_size=V), f,
                                          0.0, 1.0, "fused", 4)
    loss.backward()
    got = h_s.grad.clone()
    h_s.grad = None
    ref, _, _ = _reference_loss(_logits(h_s, w_s, b_s, 1.0, None, 1.0), _logits(h_t, w_t, None, 1.0, None, 1.0), f, 0.0)
    ref.backward()
    torch.testing.assert_close(got, h_s.grad, rtol=1e-9, atol=1e-10)
    assert w_s.grad is None and b_s.grad is None


def test_frozen_hidden_trains_only_the_head():
    h_s, w_s, b_s, h_t, w_t, f = _case(n=9, seed=7)
    h_s.requires_grad_(False)
    loss, _, _ = weighted_divergence_loss(h_s, LMHead(w_s, b_s, vocab_size=V), h_t, LMHead(w_t, vocab_size=V), f,
                                          1.0, 1.0, "fused", 4)
    loss.backward()
    got = _grads(w_s, b_s)
    ref, _, _ = _reference_loss(_logits(h_s, w_s, b_s, 1.0, None, 1.0), _logits(h_t, w_t, None, 1.0, None, 1.0), f, 1.0)
    ref.backward()
    for g, x in zip(got, (w_s, b_s)):
        torch.testing.assert_close(g, x.grad, rtol=1e-9, atol=1e-10)
    assert h_s.grad is None


def test_tied_head_accumulates_both_paths_into_the_embedding():
    """A tied lm_head is the input embedding: autograd must add the loss's weight gradient to the lookup's."""
    g = torch.Generator().manual_seed(8)
    emb = torch.randn(V, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (11,), generator=g)
    w_t = torch.randn(V, 5, generator=g, dtype=torch.float64)
    h_t, f = torch.randn(11, 5, generator=g, dtype=torch.float64), torch.rand(11, generator=g, dtype=torch.float64)

    def hidden():
        return torch.tanh(emb[ids] * 1.5)

    loss, _, _ = weighted_divergence_loss(hidden(), LMHead(emb), h_t, LMHead(w_t), f, 1.0, 1.0, "fused", 3)
    loss.backward()
    got = _grads(emb)[0]
    h = hidden()
    ref, _, _ = _reference_loss(h @ emb.t(), h_t @ w_t.t(), f, 1.0)
    ref.backward()
    torch.testing.assert_close(got, emb.grad, rtol=1e-9, atol=1e-10)


def test_two_backward_calls_accumulate_into_grad():
    """Gradient accumulation: two micro-batches' losses add up in .grad, each scaled by its own upstream factor."""
    h_s, w_s, b_s, h_t, w_t, f = _case(n=10, seed=9)
    s_head, t_head = LMHead(w_s, b_s, vocab_size=V), LMHead(w_t, vocab_size=V)
    for part, scale in ((slice(0, 4), 0.5), (slice(4, 10), 2.0)):
        loss, _, _ = weighted_divergence_loss(h_s[part], s_head, h_t[part], t_head, f[part], 1.0, 1.0, "fused", 3)
        (loss * scale).backward()
    got = _grads(h_s, w_s, b_s)
    zs, zt = _logits(h_s, w_s, b_s, 1.0, None, 1.0), _logits(h_t, w_t, None, 1.0, None, 1.0)
    ref = (_reference_loss(zs[:4], zt[:4], f[:4], 1.0)[0] * 0.5 + _reference_loss(zs[4:], zt[4:], f[4:], 1.0)[0] * 2.0)
    ref.backward()
    for g, x in zip(got, (h_s, w_s, b_s)):
        torch.testing.assert_close(g, x.grad, rtol=1e-9, atol=1e-10)


def test_one_row_zero_factor_and_empty_rows():
    h_s, w_s, b_s, h_t, w_t, f = _case(n=1, seed=10)
    s_head, t_head = LMHead(w_s, b_s, vocab_size=V), LMHead(w_t, vocab_size=V)
    loss, div, _ = weighted_divergence_loss(h_s, s_head, h_t, t_head, f, 0.5, 1.0, "fused", 512)
    ref, ref_div, _ = _reference_loss(_logits(h_s, w_s, b_s, 1.0, None, 1.0), _logits(h_t, w_t, None, 1.0, None, 1.0),
                                      f, 0.5)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-10)
    assert div.shape == (1,) and div.item() > 0
    zero, _, _ = weighted_divergence_loss(h_s, s_head, h_t, t_head, torch.zeros(1, dtype=torch.float64), 0.5, 1.0,
                                          "fused", 512)
    zero.backward()
    assert zero.item() == 0 and h_s.grad.abs().max() == 0 and w_s.grad.abs().max() == 0
    empty, div, ent = weighted_divergence_loss(h_s[:0], s_head, h_t[:0], t_head, f[:0], 1.0, 1.0, "fused", 512)
    empty.backward()  # the graph stays connected: an empty micro-batch still runs backward
    assert empty.item() == 0 and div.shape == (0,) and ent.shape == (0,)


def test_bfloat16_head_accumulates_in_float32():
    h_s, w_s, b_s, h_t, w_t, f = _case(n=33, seed=11)
    low = [x.detach().to(torch.bfloat16).requires_grad_() for x in (h_s, w_s, b_s)]
    loss, _, _ = weighted_divergence_loss(low[0], LMHead(low[1], low[2], vocab_size=V), h_t.bfloat16(),
                                          LMHead(w_t.bfloat16(), vocab_size=V), f.float(), 1.0, 1.0, "fused", 8)
    loss.backward()
    assert loss.dtype == torch.float32 and all(x.grad.dtype == torch.bfloat16 for x in low)
    ref, _, _ = _reference_loss(_logits(h_s, w_s, b_s, 1.0, None, 1.0), _logits(h_t, w_t, None, 1.0, None, 1.0), f, 1.0)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=0.05, atol=0.05)
    cos = torch.nn.functional.cosine_similarity(low[0].grad.double().flatten(), h_s.grad.flatten(), dim=0)
    assert cos > 0.99


def test_bad_input_is_refused():
    h_s, w_s, b_s, h_t, w_t, f = _case(n=4, seed=12)
    s_head, t_head = LMHead(w_s, b_s, vocab_size=V), LMHead(w_t, vocab_size=V)
    with pytest.raises(ValueError, match="one entry per row"):
        weighted_divergence_loss(h_s, s_head, h_t, t_head, f[:3], 1.0, 1.0, "fused", 4)
    with pytest.raises(ValueError, match="divergence_backend"):
        weighted_divergence_loss(h_s, s_head, h_t, t_head, f, 1.0, 1.0, "nope", 4)
    with pytest.raises(ValueError, match="different vocabularies"):
        weighted_divergence_loss(h_s, s_head, h_t, LMHead(w_t), f, 1.0, 1.0, "fused", 4)


def test_auto_picks_fused_on_cpu_and_trl_on_cuda():
    from opsd.core.losses import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "fused"
    assert resolve_backend("auto", torch.device("cuda")) == "trl"
    assert resolve_backend("chunked", torch.device("cpu")) == "chunked"


def test_fused_memory_is_bounded_by_chunk_tiles_and_gradient_buffers():
    """No [N, V] tensor: the peak of live tensor bytes is a few chunk tiles plus the [N, H] and [V, H] buffers, the
    same at N = 256 and N = 1024."""
    from opsd.core.memory import LiveTensorBytes

    vocab, hidden, chunk = 2048, 32, 64
    peaks = []
    for n in (256, 1024):
        g = torch.Generator().manual_seed(n)
        h_s = torch.randn(n, hidden, generator=g, requires_grad=True)
        w_s = torch.randn(vocab, hidden, generator=g, requires_grad=True)
        h_t, w_t = torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
        tracker = LiveTensorBytes()
        with tracker:
            loss, _, _ = weighted_divergence_loss(h_s, LMHead(w_s), h_t, LMHead(w_t), torch.full((n,), 1.0 / n), 1.0,
                                                  1.0, "fused", chunk)
            loss.backward()
        grads = 2 * (n * hidden + vocab * hidden) * 4  # buffers, then .grad of the same shapes
        peaks.append(tracker.peak - grads)
    tile = chunk * vocab * 4
    assert all(2 * tile <= p <= 6 * tile for p in peaks), (peaks, tile)
    assert peaks[1] - peaks[0] < 0.25 * tile  # nothing that grows with N beyond the [N, H] buffers
