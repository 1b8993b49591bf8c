"""Per-token divergence between student and teacher from hidden states, never materializing [N, V] logits.

Two interchangeable backends for the gradient pass (`divergence_backend`):
- `trl`: TRL's `ChunkedDivergenceFunction` (Triton kernels on CUDA, a torch tile fallback elsewhere). Its fallback
  allocates fixed [min(N, 4096) x 32768] float32 tiles and was measured slower than the token-chunked version on CPU.
- `chunked`: `TokenChunkedDivergence` below: `chunk_size` rows at a time, full vocabulary per chunk, nothing but
  the inputs and three [N] vectors saved for backward, logits recomputed in backward with analytic gradients.
Both return the per-token divergence [N] (differentiable w.r.t. the student's hidden states, weight and bias) and
the per-token student entropy [N] (no gradient). `divergence_reference` is the direct full-logit definition the
tests compare against.

beta follows TRL: 0 = forward KL(P_T || P_S), 1 = reverse KL(P_S || P_T), in between the generalized JSD with
mixture M = (1 - beta) P_S + beta P_T: JSD = beta KL(P_T || M) + (1 - beta) KL(P_S || M).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .heads import LMHead


def _divergence_from_logprobs(log_ps, log_pt, beta):
    """(per-token divergence, auxiliary term used by the gradient) from row-wise log-probabilities."""
    ps = log_ps.exp()
    if beta == 1.0:
        div = torch.xlogy(ps, ps).sum(-1) - (ps * log_pt.clamp_min(torch.finfo(log_pt.dtype).min)).sum(-1)
        return div, div
    pt = log_pt.exp()
    if beta == 0.0:
        div = torch.xlogy(pt, pt).sum(-1) - (pt * log_ps.clamp_min(torch.finfo(log_ps.dtype).min)).sum(-1)
        return div, div
    log_m = torch.logaddexp(log_ps + math.log(1 - beta), log_pt + math.log(beta))
    kl_s_m = (ps * (log_ps - log_m)).nan_to_num(0.0).sum(-1)
    kl_t_m = (pt * (log_pt - log_m)).nan_to_num(0.0).sum(-1)
    return beta * kl_t_m + (1 - beta) * kl_s_m, kl_s_m


def _grad_wrt_logits(log_ps, log_pt, aux, beta):
    """d divergence / d (temperature-scaled student logits), row-wise."""
    ps = log_ps.exp()
    if beta == 1.0:
        return ps * (log_ps - log_pt - aux.unsqueeze(-1)).nan_to_num(0.0)
    if beta == 0.0:
        return ps - log_pt.exp()
    log_m = torch.logaddexp(log_ps + math.log(1 - beta), log_pt + math.log(beta))
    return (1 - beta) * ps * (log_ps - log_m - aux.unsqueeze(-1)).nan_to_num(0.0)


def _raw_logits(hidden, weight, bias):
    z = (hidden.to(weight.dtype) @ weight.t()).float()
    return z if bias is None else z + bias.float()


def _transform(raw, scale, softcap, temperature):
    """raw projection -> logits fed to the softmax, plus d logits / d raw (None when it is the constant scale/T)."""
    y = raw * scale if scale != 1.0 else raw
    if softcap is None:
        return y / temperature, None
    th = torch.tanh(y / softcap)
    return softcap * th / temperature, (1 - th * th) * (scale / temperature)


class TokenChunkedDivergence(torch.autograd.Function):
    """Chunked per-token divergence with recomputation in backward (see module docstring)."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, beta, temperature,
                s_scale, s_softcap, t_scale, t_softcap, chunk_size):
        n = s_hidden.shape[0]
        div = torch.zeros(n, device=s_hidden.device, dtype=torch.float32)
        entropy = torch.zeros_like(div)
        aux = torch.zeros_like(div)
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                rows = slice(start, min(start + chunk_size, n))
                zs, _ = _transform(_raw_logits(s_hidden[rows], s_weight, s_bias), s_scale, s_softcap, temperature)
                zt, _ = _transform(_raw_logits(t_hidden[rows], t_weight, t_bias), t_scale, t_softcap, temperature)
                log_ps, log_pt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
                div[rows], aux[rows] = _divergence_from_logprobs(log_ps, log_pt, beta)
                entropy[rows] = -torch.xlogy(log_ps.exp(), log_ps.exp()).sum(-1)
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, aux)
        ctx.config = (beta, temperature, s_scale, s_softcap, t_scale, t_softcap, chunk_size)
        ctx.mark_non_differentiable(entropy)
        return div, entropy

    @staticmethod
    def backward(ctx, grad_div, _grad_entropy):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, aux = ctx.saved_tensors
        beta, temperature, s_scale, s_softcap, t_scale, t_softcap, chunk_size = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(s_hidden.shape, device=s_hidden.device, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros(s_weight.shape, device=s_weight.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(s_bias.shape, device=s_bias.device, dtype=torch.float32) if need_b else None
        if grad_div is not None:
            grad_div = grad_div.float()
            for start in range(0, s_hidden.shape[0], chunk_size):
                rows = slice(start, min(start + chunk_size, s_hidden.shape[0]))
                h_s = s_hidden[rows]
                zs, dz = _transform(_raw_logits(h_s, s_weight, s_bias), s_scale, s_softcap, temperature)
                zt, _ = _transform(_raw_logits(t_hidden[rows], t_weight, t_bias), t_scale, t_softcap, temperature)
                g = _grad_wrt_logits(F.log_softmax(zs, -1), F.log_softmax(zt, -1), aux[rows], beta)
                g = g * grad_div[rows].unsqueeze(-1)
                g = g * dz if dz is not None else g * (s_scale / temperature)
                g = g.to(s_weight.dtype)
                if need_h:
                    grad_h[rows] += (g @ s_weight).float()
                if need_w:
                    grad_w += (g.t() @ h_s.to(s_weight.dtype)).float()
                if need_b:
                    grad_b += g.float().sum(0)
        return (
            None if grad_h is None else grad_h.to(s_hidden.dtype),
            None if grad_w is None else grad_w.to(s_weight.dtype),
            None if grad_b is None else grad_b.to(s_bias.dtype),
            *(None,) * 10,
        )


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "trl" if device.type == "cuda" else "chunked"
    return backend


def per_token_divergence(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead,
    beta: float,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence [N] (grad to the student) and student entropy [N] over rows [N, H]."""
    if student_head.vocab != teacher_head.vocab:
        raise ValueError(
            f"Student and teacher heads cover different vocabularies ({student_head.vocab} vs {teacher_head.vocab})."
        )
    args = (
        student_hidden, student_head.sliced_weight, student_head.sliced_bias,
        teacher_hidden, teacher_head.sliced_weight, teacher_head.sliced_bias,
        beta, temperature,
    )
    if student_hidden.shape[0] == 0:
        zero = student_hidden.sum(-1).float()  # keeps the graph connected for an empty micro-batch
        return zero, zero.detach()
    if resolve_backend(backend, student_hidden.device) == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        return ChunkedDivergenceFunction.apply(
            args[0], args[1], args[2], args[3], args[4], args[5], beta, temperature,
            student_head.scale, student_head.softcap, teacher_head.scale, teacher_head.softcap,
        )
    return TokenChunkedDivergence.apply(
        *args, student_head.scale, student_head.softcap, teacher_head.scale, teacher_head.softcap, chunk_size
    )


def divergence_reference(student_logits, teacher_logits, beta, temperature=1.0):
    """Direct full-logit per-token divergence and student entropy (differentiable; for tests and benchmarks)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float64 inputs stay float64
    log_ps = F.log_softmax(student_logits.to(dtype) / temperature, -1)
    log_pt = F.log_softmax(teacher_logits.to(dtype) / temperature, -1)
    ps, pt = log_ps.exp(), log_pt.exp()
    entropy = -(ps * log_ps).sum(-1)
    if beta == 1.0:
        return (ps * (log_ps - log_pt)).sum(-1), entropy
    if beta == 0.0:
        return (pt * (log_pt - log_ps)).sum(-1), entropy
    m = (1 - beta) * ps + beta * pt
    log_m = m.log()
    return beta * (pt * (log_pt - log_m)).sum(-1) + (1 - beta) * (ps * (log_ps - log_m)).sum(-1), entropy
