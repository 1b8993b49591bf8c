"""Both divergence backends vs the direct full-logit definition: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from opsd.core.heads import LMHead
from opsd.core.losses import divergence_reference, per_token_divergence


def _reference(h_s, w_s, b_s, h_t, w_t, beta, temperature, s_scale=1.0, softcap=None, t_scale=1.0, vocab=None):
    vocab = vocab or w_s.shape[0]
    z_s = (h_s @ w_s[:vocab].t() + (0 if b_s is None else b_s[:vocab])) * s_scale
    if softcap is not None:
        z_s = softcap * torch.tanh(z_s / softcap)
    z_t = (h_t @ w_t[:vocab].t()) * t_scale
    return divergence_reference(z_s, z_t, beta, temperature)


def _first_principles(z_s, z_t, beta):
    """Textbook definitions, written independently of opsd.core.losses."""
    p, q = F.softmax(z_s.double(), -1), F.softmax(z_t.double(), -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if beta == 1.0:
        return kl(p, q)
    if beta == 0.0:
        return kl(q, p)
    m = (1 - beta) * p + beta * q
    return beta * kl(q, m) + (1 - beta) * kl(p, m)


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.3])
def test_reference_matches_first_principles(beta):
    torch.manual_seed(0)
    z_s, z_t = torch.randn(7, 11), torch.randn(7, 11)
    div, ent = divergence_reference(z_s, z_t, beta)
    torch.testing.assert_close(div.double(), _first_principles(z_s, z_t, beta), rtol=1e-5, atol=1e-6)
    p = F.softmax(z_s.double(), -1)
    torch.testing.assert_close(ent.double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["chunked", "trl"])
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_backend_values_and_gradients(backend, beta, softcap):
    torch.manual_seed(1)
    n, h, h_t, v, rows = 29, 12, 20, 40, 43  # head has padding rows beyond the distilled vocabulary
    h_s = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(rows, h, dtype=torch.float64, requires_grad=True)
    b_s = torch.randn(rows, dtype=torch.float64, requires_grad=True)
    h_te, w_t = torch.randn(n, h_t, dtype=torch.float64), torch.randn(rows + 5, h_t, dtype=torch.float64)
    upstream = torch.rand(n, dtype=torch.float64)
    s_head = LMHead(w_s, b_s, scale=1.2, softcap=softcap, vocab_size=v)
    t_head = LMHead(w_t, None, scale=0.8, vocab_size=v)
    div, ent = per_token_divergence(h_s, s_head, h_te, t_head, beta, 1.3, backend=backend, chunk_size=8)
    (div * upstream).sum().backward()
    got = [x.grad.clone() for x in (h_s, w_s, b_s)]
    for x in (h_s, w_s, b_s):
        x.grad = None
    ref_div, ref_ent = _reference(h_s, w_s, b_s, h_te, w_t, beta, 1.3, 1.2, softcap, 0.8, vocab=v)
    (ref_div * upstream).sum().backward()
    torch.testing.assert_close(div.double(), ref_div.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=2e-5)
    for g, x in zip(got, (h_s, w_s, b_s)):
        torch.testing.assert_close(g.double(), x.grad, rtol=1e-4, atol=2e-5)
    assert w_s.grad[v:].abs().max() == 0  # padding rows get no gradient


def test_chunk_size_does_not_change_result():
    torch.manual_seed(2)
    h_s, w_s = torch.randn(50, 8), torch.randn(30, 8)
    h_t, w_t = torch.randn(50, 8), torch.randn(30, 8)
    outs = [per_token_divergence(h_s, LMHead(w_s), h_t, LMHead(w_t), 1.0, backend="chunked", chunk_size=c)[0]
            for c in (1, 7, 50, 512)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_identical_models_have_zero_divergence_and_empty_input():
    torch.manual_seed(3)
    h, w = torch.randn(5, 8), torch.randn(30, 8)
    div, _ = per_token_divergence(h, LMHead(w), h, LMHead(w), 1.0, backend="chunked")
    assert div.abs().max() < 1e-6
    empty, ent = per_token_divergence(h[:0].requires_grad_(), LMHead(w), h[:0], LMHead(w), 1.0)
    assert empty.shape == (0,) and ent.shape == (0,)


def test_vocab_mismatch_between_heads_is_refused():
    with pytest.raises(ValueError, match="different vocabularies"):
        per_token_divergence(torch.randn(2, 4), LMHead(torch.randn(10, 4)), torch.randn(2, 4),
                             LMHead(torch.randn(12, 4)), 1.0)
