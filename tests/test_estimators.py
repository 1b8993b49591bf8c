"""Loss estimators (`--loss_support`) against float64 references written from the formulas (docs/METHODS.md section 6)."""

from __future__ import annotations


import pytest
import torch

from opsd.core.config import OPDConfig
from opsd.core.estimators import TOPK_SUPPORTS, support_divergence
from opsd.core.heads import LMHead
from support import EveryOther, fixed_batch, full_logits, make_trainer, split, trainer_loss_and_grads


def _token_set(zs_row, zt_row, support, k):
    k = min(k, zs_row.numel())
    s = set(torch.argsort(zs_row, descending=True)[:k].tolist())
    t = set(torch.argsort(zt_row, descending=True)[:k].tolist())
    return sorted({"student_topk": s, "teacher_topk": t, "intersection": s & t, "union": s | t}[support])


def reference_row(zs_row, zt_row, y, support, k, beta=1.0, control_variate="none"):
    """One row's loss in float64 from the definitions; differentiable in zs_row (for the sampled estimator the
    autograd gradient of the returned surrogate is the REINFORCE gradient, its `.value` the KL estimate)."""
    if support == "sampled":
        log_ps = zs_row - torch.logsumexp(zs_row, 0)
        log_pt = zt_row - torch.logsumexp(zt_row, 0)
        estimate = float((log_ps[y] - log_pt[y]).detach())
        b = 0.0
        if control_variate == "full":
            b = float((log_ps.exp() * (log_ps - log_pt)).sum().detach())
        elif control_variate == "topk":
            b = float(reference_row(zs_row.detach(), zt_row, y, "student_topk", k))
        return (estimate - b) * log_ps[y], estimate
    idx = _token_set(zs_row.detach(), zt_row, support, k)
    if not idx:
        return zs_row.sum() * 0.0
    qs = torch.exp(zs_row[idx]) / torch.exp(zs_row[idx]).sum()
    qt = torch.exp(zt_row[idx]) / torch.exp(zt_row[idx]).sum()
    if beta == 1.0:
        return (qs * (qs.log() - qt.log())).sum()
    if beta == 0.0:
        return (qt * (qt.log() - qs.log())).sum()
    m = (1 - beta) * qs + beta * qt
    return beta * (qt * (qt.log() - m.log())).sum() + (1 - beta) * (qs * (qs.log() - m.log())).sum()


def _problem(n=9, h=6, v=13, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)
            * scale, torch.randn(n, h + 2, generator=g, dtype=torch.float64),
            torch.randn(v, h + 2, generator=g, dtype=torch.float64) * scale, torch.randint(0, v, (n,), generator=g))


def _check(support, k, beta=1.0, control_variate="none", temperature=1.0, chunk_size=4, problem=None, atol=1e-5):
    """Values, entropy and gradients (hidden states and head weight) against the float64 reference; `atol` is
    relative to the largest reference gradient (saturated logits are large, so float32 rounding is too)."""
    hs, ws, ht, wt, ids = problem or _problem()
    weights = torch.linspace(0.5, 1.5, hs.shape[0], dtype=torch.float64)
    # estimator, float32
    hs32, ws32 = hs.float().requires_grad_(), ws.float().requires_grad_()
    loss, entropy, _ = support_divergence(hs32, LMHead(ws32), ht.float(), LMHead(wt.float()), ids, support, k, beta,
                                          temperature, control_variate, chunk_size)
    (loss * weights.float()).sum().backward()
    # reference, float64
    hs64, ws64 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    zs, zt = hs64 @ ws64.t() / temperature, ht @ wt.t() / temperature
    total, values = 0.0, []
    for i in range(hs.shape[0]):
        row = reference_row(zs[i], zt[i], int(ids[i]), support, k, beta, control_variate)
        if support == "sampled":
            row, value = row
        else:
            value = float(row.detach())
        total = total + weights[i] * row
        values.append(value)
    total.backward()
    ref_entropy = -(torch.softmax(zs, -1) * torch.log_softmax(zs, -1)).sum(-1)
    torch.testing.assert_close(loss.detach().double(), torch.tensor(values, dtype=torch.float64), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=1e-4, atol=1e-5)
    for got, ref in ((hs32.grad, hs64.grad), (ws32.grad, ws64.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=atol * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("support", TOPK_SUPPORTS)
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.3])
def test_topk_supports_match_reference(support, beta):
    _check(support, k=4, beta=beta)


@pytest.mark.parametrize("control_variate", ["none", "full", "topk"])
def test_sampled_matches_reference(control_variate):
    _check("sampled", k=4, control_variate=control_variate, temperature=0.7)


@pytest.mark.parametrize("support", TOPK_SUPPORTS + ("sampled",))
def test_edge_cases(support):
    _check(support, k=3, problem=_problem(n=1))  # one token
    _check(support, k=50, problem=_problem())  # K clamped to V: top-k supports become the full vocabulary
    # saturated: logits of ~+-200, most probabilities round to 0 in float32
    _check(support, k=2, chunk_size=1, problem=_problem(scale=30.0), atol=1e-4)


def test_k_equal_vocab_is_full_reverse_kl():
    hs, ws, ht, wt, ids = _problem()
    loss, _, _ = support_divergence(hs.float(), LMHead(ws.float()), ht.float(), LMHead(wt.float()), ids,
                                    "student_topk", k=ws.shape[0])
    log_ps, log_pt = torch.log_softmax(hs @ ws.t(), -1), torch.log_softmax(ht @ wt.t(), -1)
    torch.testing.assert_close(loss.double(), (log_ps.exp() * (log_ps - log_pt)).sum(-1), rtol=1e-4, atol=1e-5)


def test_ties_and_empty_intersection():
    v = 8
    eye = LMHead(torch.eye(v))
    # row 0: student ties on tokens 0 and 1 with equal teacher logits there: every tie-break gives the same value,
    # and the same gradient up to which of the two tied logits receives it; row 1: disjoint top-2 sets
    zs = torch.tensor([[2.0, 2.0, 1.0, 0, 0, 0, 0, 0], [3.0, 1.0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    zt = torch.tensor([[1.0, 1.0, 3.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1.0, 3.0]], dtype=torch.float64)
    ids = torch.tensor([0, 0])
    for support, k in (("union", 1), ("student_topk", 1), ("teacher_topk", 2)):
        h = zs.float().requires_grad_()
        loss, _, _ = support_divergence(h, eye, zt.float(), eye, ids, support, k)
        loss.sum().backward()
        z = zs.clone().requires_grad_()
        ref = sum(reference_row(z[i], zt[i], 0, support, k) for i in range(2))
        ref.backward()
        torch.testing.assert_close(loss.sum().double(), ref.detach(), rtol=1e-5, atol=1e-6)
        got, want = h.grad.double(), z.grad
        torch.testing.assert_close(got[:, 2:], want[:, 2:], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[:, :2].sum(1), want[:, :2].sum(1), rtol=1e-4, atol=1e-6)
    h = zs.float().requires_grad_()
    loss, _, empty = support_divergence(h, eye, zt.float(), eye, ids, "intersection", k=2)
    loss.sum().backward()
    assert empty == pytest.approx(0.5)
    assert loss[1].item() == 0.0 and torch.all(h.grad[1] == 0)
    assert torch.isfinite(h.grad).all()


def test_chunk_size_does_not_change_the_result():
    hs, ws, ht, wt, ids = _problem(n=11)
    out = [support_divergence(hs.float(), LMHead(ws.float()), ht.float(), LMHead(wt.float()), ids, "union", 3,
                              chunk_size=c)[0] for c in (1, 4, 100)]
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[0], out[2])


def _exact_sampled_gradient(zs, zt, control_variate):
    """E_{y~P_S}[gradient of the sampled estimator w.r.t. the logits], summed exactly over the vocabulary."""
    n, v = zs.shape
    eye = LMHead(torch.eye(v))
    mean = torch.zeros(n, v, dtype=torch.float64)
    second = torch.zeros(n, dtype=torch.float64)
    p = torch.softmax(zs, -1)
    for y in range(v):
        h = zs.float().clone().requires_grad_()
        loss, _, _ = support_divergence(h, eye, zt.float(), eye, torch.full((n,), y), "sampled", k=3,
                                        control_variate=control_variate)
        loss.sum().backward()
        mean += p[:, y:y + 1] * h.grad.double()
        second += p[:, y] * (h.grad.double() ** 2).sum(-1)
    return mean, (second - (mean ** 2).sum(-1)).sum()


def test_sampled_gradient_is_unbiased_and_control_variate_lowers_variance():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(5, 10, generator=g, dtype=torch.float64) * 2, torch.randn(5, 10, generator=g,
                                                                                   dtype=torch.float64) * 2
    z = zs.clone().requires_grad_()
    log_ps, log_pt = torch.log_softmax(z, -1), torch.log_softmax(zt, -1)
    (log_ps.exp() * (log_ps - log_pt)).sum().backward()
    variances = {}
    for cv in ("none", "full", "topk"):
        mean, variances[cv] = _exact_sampled_gradient(zs, zt, cv)
        torch.testing.assert_close(mean, z.grad, rtol=1e-4, atol=1e-5)
    assert variances["full"] < variances["none"]


def test_topk_is_biased_when_mass_leaves_the_set():
    """Documented bias: with K < V the top-k objective's gradient is not the full reverse KL's."""
    hs, ws, ht, wt, ids = _problem()
    grads = []
    for support, k in (("student_topk", 3), ("student_topk", ws.shape[0])):
        h = hs.float().clone().requires_grad_()
        support_divergence(h, LMHead(ws.float()), ht.float(), LMHead(wt.float()), ids, support, k)[0].sum().backward()
        grads.append(h.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-2


def test_config_validation():
    with pytest.raises(ValueError, match="loss_support"):
        OPDConfig(output_dir="x", loss_support="top5", report_to=[])
    with pytest.raises(ValueError, match="reverse_kl"):
        OPDConfig(output_dir="x", loss_support="sampled", loss_type="forward_kl", report_to=[])
    with pytest.raises(ValueError, match="loss_support_control_variate"):
        OPDConfig(output_dir="x", loss_support="union", loss_support_control_variate="full", report_to=[])
    with pytest.raises(ValueError, match="loss_support_k"):
        OPDConfig(output_dir="x", loss_support="union", loss_support_k=0, report_to=[])


@pytest.mark.parametrize("support,normalization,selector", [
    ("student_topk", "kept_tokens", False), ("union", "sequence", True), ("sampled", "all_tokens", True),
    ("intersection", "kept_tokens", True)])
def test_trainer_matches_reference(pair, tmp_path, support, normalization, selector):
    trainer = make_trainer(pair, tmp_path, ga=2, selector=EveryOther() if selector else None,
                           loss_support=support, loss_support_k=5, loss_normalization=normalization,
                           loss_support_control_variate="full" if support == "sampled" else "none")
    batch = fixed_batch()
    got = trainer_loss_and_grads(trainer, split(batch, 2))
    # reference: full logits, the formula per kept token, the normalization's definition
    z_s, z_t = full_logits(trainer, batch)
    z_s, z_t = z_s.double() / trainer.temperature, z_t.double() / trainer.temperature
    valid = batch["completion_mask"].bool() & batch["tool_mask"].bool()
    positions = valid.long().cumsum(1) - 1
    keep = valid & (positions % 2 == 0) if selector else valid
    weight = keep.double() * ((1.0 + positions.double()) if selector else 1.0)
    per_token = torch.zeros(valid.shape, dtype=torch.float64)
    for b, t in keep.nonzero().tolist():
        row = reference_row(z_s[b, t], z_t[b, t], int(batch["completion_ids"][b, t]), support, 5,
                            control_variate="full" if support == "sampled" else "none")
        per_token[b, t] = row[0] if support == "sampled" else row
    if normalization == "kept_tokens":
        loss = (per_token * weight).sum() / keep.sum()
    elif normalization == "all_tokens":
        loss = (per_token * weight).sum() / valid.sum()
    else:
        loss = ((per_token * weight).sum(1) / keep.sum(1).clamp_min(1))[keep.sum(1) > 0].mean()
    loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    if support != "sampled":  # the sampled surrogate's value is the KL estimate, not the surrogate
        assert got[0] == pytest.approx(loss.item(), rel=1e-4)
    assert set(got[1]) == set(ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got[1][name], grad.float(), rtol=1e-3, atol=1e-6, msg=name)
    assert trainer._metrics["train"]["loss_support/empty_fraction"] or support != "intersection"
