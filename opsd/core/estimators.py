"""Estimators of the per-token OPD objective other than the full-vocabulary divergence (`--loss_support`).

Given a kept row's student and teacher next-token distributions P_S, P_T = softmax(logits / T):

- `full`: the divergence over the whole vocabulary (opsd.core.losses; the default, not handled here).
- `student_topk`, `teacher_topk`, `intersection`, `union`: the divergence of `loss_type` between p~_S and p~_T, both
  renormalized on a token set K: the student's top-k (S_k), the teacher's top-k (T_k), S_k intersect T_k or
  S_k union T_k (k = `loss_support_k`). For reverse KL: sum_{v in K} p~_S(v) (log p~_S(v) - log p~_T(v)). The set is
  chosen without gradient (it is piecewise constant in the logits). A row whose intersection is empty contributes 0
  (value and gradient) and is counted in `empty_support_fraction`.
- `sampled`: sampled-token OPD, REINFORCE on the rollout's own token y_t with advantage
  A_t = log P_T(y_t) - log P_S(y_t) (+ sg(b_t) with a control variate, vOPD): the gradient is
  -A_t * grad log P_S(y_t). The value returned is log P_S(y_t) - log P_T(y_t), the one-sample estimate of KL_t, so
  the logged loss stays comparable to the full KL; the control variate changes the gradient only.
  b_t (`loss_support_control_variate`): `full` = KL_t over the vocabulary, `topk` = KL_t renormalized on S_k.
- `teacher_free`: the OPSA control (arXiv 2608.31046): the same REINFORCE form as `sampled` on the rollout's own
  token y_t, but with a fixed advantage A_t = -1 instead of the teacher's log-ratio: no teacher signal enters the
  update. The per-row loss is log P_S(y_t) (value and gradient: grad log P_S(y_t)), so descending it lowers the
  probability of every kept sampled token. The teacher still decides WHICH rows are kept when a selector reads
  teacher statistics: this is the "same kept tokens, no teacher signal" control. The logged loss is the mean
  log-probability (negative), not a divergence.

Bias (see docs/third_paper.md): the top-k objectives are biased estimators of the full reverse KL, in value and in
gradient: they ignore the mass outside K (the bias vanishes only when K holds all of both distributions' mass) and
the renormalization changes the gradient even on K. `sampled` is an unbiased estimate of the per-token
reverse-KL gradient (E_{y~P_S}[(log P_S(y) - log P_T(y)) grad log P_S(y)] = grad KL_t) when y_t was drawn from the
same P_S (same temperature, no top-p/top-k truncation, on-policy weights); its value is an unbiased but noisy
estimate of KL_t, and can be negative per token. The control variate keeps the gradient unbiased
(E[grad log P_S(y)] = 0) and lowers its variance.

Memory: rows are processed `chunk_size` at a time under activation checkpointing, so backward recomputes one chunk's
[chunk, V] logits at a time and no [N, V] tensor is kept between forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .heads import LMHead

LOSS_SUPPORTS = ("full", "student_topk", "teacher_topk", "intersection", "union", "sampled", "teacher_free")
TOPK_SUPPORTS = ("student_topk", "teacher_topk", "intersection", "union")
CONTROL_VARIATES = ("none", "full", "topk")


def _top_mask(log_p: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, log_p.shape[-1])
    return torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, log_p.topk(k, dim=-1).indices, True)


def support_mask(log_ps: torch.Tensor, log_pt: torch.Tensor, support: str, k: int) -> torch.Tensor:
    """bool [n, V] membership of each vocabulary entry in the row's token set K."""
    if support == "student_topk":
        return _top_mask(log_ps, k)
    if support == "teacher_topk":
        return _top_mask(log_pt, k)
    if support == "intersection":
        return _top_mask(log_ps, k) & _top_mask(log_pt, k)
    if support == "union":
        return _top_mask(log_ps, k) | _top_mask(log_pt, k)
    raise ValueError(f"unknown top-k support {support!r}; choose one of {TOPK_SUPPORTS}")


def _kl_on(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    # log values outside p's support are replaced before the product: 0 * (-inf) would poison the gradient with NaN
    live = p > 0
    return (p * (log_p.masked_fill(~live, 0.0) - log_q.masked_fill(~live, 0.0))).sum(-1)


def set_divergence(zs: torch.Tensor, zt: torch.Tensor, member: torch.Tensor, beta: float) -> torch.Tensor:
    """Divergence (TRL's beta: 1 reverse KL, 0 forward KL, between JSD) of the two distributions renormalized on
    `member` [n, V]; differentiable in zs. Rows with an empty set give 0 with a zero gradient."""
    empty = ~member.any(-1)
    member = member | empty.unsqueeze(-1)  # any finite set: the row is zeroed below
    log_ps = F.log_softmax(zs.masked_fill(~member, -math.inf), -1)
    log_pt = F.log_softmax(zt.masked_fill(~member, -math.inf), -1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if beta == 1.0:
        div = _kl_on(ps, log_ps, log_pt)
    elif beta == 0.0:
        div = _kl_on(pt, log_pt, log_ps)
    else:
        # off the set both logs are -inf and logaddexp's gradient there is NaN: give it finite stand-ins
        log_m = torch.logaddexp(log_ps.masked_fill(~member, 0.0) + math.log(1 - beta),
                                log_pt.masked_fill(~member, 0.0) + math.log(beta))
        div = beta * _kl_on(pt, log_pt, log_m) + (1 - beta) * _kl_on(ps, log_ps, log_m)
    return torch.where(empty, 0.0, div)


def _reverse_kl(log_ps: torch.Tensor, log_pt: torch.Tensor) -> torch.Tensor:
    return _kl_on(log_ps.exp(), log_ps, log_pt)


def sampled_surrogate(zs: torch.Tensor, zt: torch.Tensor, token_ids: torch.Tensor, baseline: torch.Tensor | None
                      ) -> torch.Tensor:
    """Value log P_S(y) - log P_T(y), gradient (log P_S(y) - log P_T(y) - b) grad log P_S(y) (see module doc)."""
    log_ps = F.log_softmax(zs, -1)
    lp_s = log_ps.gather(1, token_ids[:, None]).squeeze(1)
    lp_t = F.log_softmax(zt, -1).gather(1, token_ids[:, None]).squeeze(1)
    estimate = (lp_s - lp_t).detach()
    coefficient = estimate if baseline is None else estimate - baseline.detach()
    score = coefficient * lp_s
    return score - score.detach() + estimate  # value: the estimate; gradient: the score-function term


def teacher_free_surrogate(zs: torch.Tensor, token_ids: torch.Tensor, advantage: float = -1.0) -> torch.Tensor:
    """OPSA's teacher-free control: per-row loss -A * log P_S(y) with the fixed advantage A (default -1), i.e. the
    REINFORCE loss of a constant negative reward on the sampled token (see module doc)."""
    lp_s = F.log_softmax(zs, -1).gather(1, token_ids[:, None]).squeeze(1)
    return -advantage * lp_s


def _chunk_loss(zs, zt, token_ids, support, k, beta, control_variate):
    """(per-row loss, empty-set flag) of one chunk of temperature-scaled logits [n, V]."""
    if support == "teacher_free":
        return teacher_free_surrogate(zs, token_ids), torch.zeros_like(token_ids, dtype=torch.bool)
    if support == "sampled":
        baseline = None
        if control_variate != "none":
            with torch.no_grad():
                log_ps, log_pt = F.log_softmax(zs.float(), -1), F.log_softmax(zt.float(), -1)
                baseline = (_reverse_kl(log_ps, log_pt) if control_variate == "full"
                            else set_divergence(zs.float(), zt.float(), _top_mask(log_ps, k), 1.0))
        return sampled_surrogate(zs, zt, token_ids, baseline), torch.zeros_like(token_ids, dtype=torch.bool)
    with torch.no_grad():
        member = support_mask(F.log_softmax(zs, -1), F.log_softmax(zt, -1), support, k)
    return set_divergence(zs, zt, member, beta), ~member.any(-1)


def support_divergence(student_hidden: torch.Tensor, student_head: LMHead, teacher_hidden: torch.Tensor,
                       teacher_head: LMHead, token_ids: torch.Tensor, support: str, k: int = 16, beta: float = 1.0,
                       temperature: float = 1.0, control_variate: str = "none", chunk_size: int = 512):
    """(per-row loss [N] with grad to the student, full-vocabulary student entropy [N], empty-set fraction) over
    kept rows [N, H]; `token_ids` [N] are the rollout's tokens at those rows (used by `sampled`)."""
    if support not in LOSS_SUPPORTS[1:]:
        raise ValueError(f"loss_support must be one of {LOSS_SUPPORTS[1:]} here ('full' is opsd.core.losses), "
                         f"got {support!r}")
    if support in ("sampled", "teacher_free") and beta != 1.0:
        raise ValueError(f"loss_support={support!r} is a reverse-KL-style sampled-token update only: use "
                         "loss_type=reverse_kl.")
    if student_head.vocab != teacher_head.vocab:
        raise ValueError(f"Student and teacher heads cover different vocabularies ({student_head.vocab} vs "
                         f"{teacher_head.vocab}).")
    n = student_hidden.shape[0]
    token_ids = token_ids.reshape(-1).to(student_hidden.device).long()
    if n == 0:
        zero = student_hidden.sum(-1).float()
        return zero, zero.detach(), 0.0

    def chunk(h_s, h_t, ids):
        zs = student_head.logits(h_s, temperature)
        with torch.no_grad():
            zt = teacher_head.logits(h_t, temperature).to(zs.device)
            log_ps = F.log_softmax(zs.detach(), -1)
            entropy = -torch.where(log_ps > -math.inf, log_ps.exp() * log_ps, 0.0).sum(-1)
        loss, empty = _chunk_loss(zs, zt, ids, support, k, beta, control_variate)
        return loss, entropy, empty

    losses, entropies, empties = [], [], []
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        args = (student_hidden[rows], teacher_hidden[rows], token_ids[rows])
        if torch.is_grad_enabled():
            loss, entropy, empty = checkpoint(chunk, *args, use_reentrant=False)
        else:
            loss, entropy, empty = chunk(*args)
        losses.append(loss)
        entropies.append(entropy)
        empties.append(empty)
    empty_fraction = float(torch.cat(empties).float().mean())
    return torch.cat(losses), torch.cat(entropies).detach(), empty_fraction
