"""OPSA's teacher-free control (`--loss_support teacher_free`, opsd/core/estimators.py) against a float64 reference
written from its definition: per kept row the loss -A * log P_S(y) with the fixed advantage A = -1, i.e.
log P_S(y) = z_y - logsumexp(z), z = h W^T / T; no teacher quantity enters the value or the gradient."""

from __future__ import annotations

import pytest
import torch

from opsd.core.config import OPDConfig
from opsd.core.estimators import support_divergence, teacher_free_surrogate
from opsd.core.heads import LMHead


def _problem(n=64, h=64, v=128, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, generator=g, dtype=torch.float64) * scale,
            torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5,
            torch.randn(n, h + 64, generator=g, dtype=torch.float64),
            torch.randn(v, h + 64, generator=g, dtype=torch.float64), torch.randint(0, v, (n,), generator=g))


def _reference(hs, ws, ids, temperature, weights):
    """float64: sum_i w_i * log softmax(h_i W^T / T)[y_i], written out with logsumexp."""
    hs, ws = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    z = hs @ ws.t() / temperature
    rows = torch.stack([z[i, int(ids[i])] - torch.logsumexp(z[i], 0) for i in range(z.shape[0])])
    (rows * weights).sum().backward()
    return rows.detach(), hs.grad, ws.grad


@pytest.mark.parametrize("temperature,chunk_size,scale", [(1.0, 512, 1.0), (0.7, 7, 1.0), (1.0, 16, 40.0)])
def test_values_and_gradients_match_the_float64_reference(temperature, chunk_size, scale):
    hs, ws, ht, wt, ids = _problem(scale=scale)
    weights = torch.linspace(0.5, 1.5, hs.shape[0], dtype=torch.float64)
    hs32, ws32 = hs.float().requires_grad_(), ws.float().requires_grad_()
    loss, entropy, empty = support_divergence(hs32, LMHead(ws32), ht.float(), LMHead(wt.float()), ids, "teacher_free",
                                              temperature=temperature, chunk_size=chunk_size)
    (loss * weights.float()).sum().backward()
    ref, g_h, g_w = _reference(hs, ws, ids, temperature, weights)
    assert empty == 0.0
    assert (loss <= 0).all()  # a log-probability
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)
    z = hs @ ws.t() / temperature
    ref_entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-4, atol=1e-4)
    for got, want in ((hs32.grad, g_h), (ws32.grad, g_w)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-5 * max(1.0, want.abs().max().item()))


def test_no_teacher_signal_and_descent_lowers_the_sampled_token():
    hs, ws, ht, wt, ids = _problem(n=64)
    outs = []
    for teacher_w in (wt, -3.0 * wt):  # a different teacher changes nothing
        h = hs.float().requires_grad_()
        loss, _, _ = support_divergence(h, LMHead(ws.float()), ht.float(), LMHead(teacher_w.float()), ids,
                                        "teacher_free")
        loss.sum().backward()
        outs.append((loss.detach(), h.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)
    # one small gradient step on the loss lowers every sampled token's probability (the advantage is negative)
    step = hs.float() - 1e-2 * outs[0][1]
    before = torch.log_softmax(hs.float() @ ws.float().t(), -1).gather(1, ids[:, None])
    after = torch.log_softmax(step @ ws.float().t(), -1).gather(1, ids[:, None])
    assert (after < before).all()


def test_surrogate_advantage_and_edge_cases():
    z = torch.tensor([[0.0, 1.0, 2.0], [5.0, -5.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([2, 1])
    lp = torch.log_softmax(z, -1).gather(1, ids[:, None]).squeeze(1)
    torch.testing.assert_close(teacher_free_surrogate(z, ids), lp)
    torch.testing.assert_close(teacher_free_surrogate(z, ids, advantage=2.0), -2.0 * lp)
    # no kept rows: a zero-length loss with a gradient path
    h = torch.zeros(0, 64, requires_grad=True)
    loss, entropy, empty = support_divergence(h, LMHead(torch.randn(128, 64)), torch.zeros(0, 64),
                                              LMHead(torch.randn(128, 64)), torch.zeros(0, dtype=torch.long),
                                              "teacher_free")
    assert loss.shape == (0,) and empty == 0.0


def test_config_accepts_it_with_reverse_kl_only():
    OPDConfig(output_dir="x", loss_support="teacher_free", report_to=[])
    with pytest.raises(ValueError, match="teacher_free"):
        OPDConfig(output_dir="x", loss_support="teacher_free", loss_type="forward_kl", report_to=[])
    with pytest.raises(ValueError, match="reverse_kl"):
        support_divergence(torch.zeros(2, 64), LMHead(torch.randn(128, 64)), torch.zeros(2, 64),
                           LMHead(torch.randn(128, 64)), torch.zeros(2, dtype=torch.long), "teacher_free", beta=0.0)


def test_trainer_step_matches_the_reference_on_kept_tokens(pair, tmp_path):
    from support import EveryOther, fixed_batch, full_logits, make_trainer, split, trainer_loss_and_grads

    trainer = make_trainer(pair, tmp_path, ga=2, selector=EveryOther(), loss_support="teacher_free")
    batch = fixed_batch()
    got = trainer_loss_and_grads(trainer, split(batch, 2))
    z_s, _ = full_logits(trainer, batch)
    z_s = z_s.double() / trainer.temperature
    valid = batch["completion_mask"].bool() & batch["tool_mask"].bool()
    positions = valid.long().cumsum(1) - 1
    keep = valid & (positions % 2 == 0)
    weight = keep.double() * (1.0 + positions.double())
    log_p = torch.log_softmax(z_s, -1).gather(2, batch["completion_ids"][..., None]).squeeze(-1)
    loss = (torch.where(keep, log_p, 0.0) * weight).sum() / keep.sum()  # kept_tokens normalization
    loss.backward()
    ref = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert got[0] == pytest.approx(loss.item(), rel=1e-4)
    assert set(got[1]) == set(ref)
    for name, grad in ref.items():
        torch.testing.assert_close(got[1][name], grad.float(), rtol=1e-3, atol=1e-6, msg=name)
