"""Per-token divergence between student and teacher from hidden states, never materializing [N, V] logits.

Three interchangeable backends for the gradient pass (`divergence_backend`):
- `trl`: TRL's `ChunkedDivergenceFunction` (Triton kernels on CUDA, a torch tile fallback elsewhere). Its fallback
  allocates fixed [min(N, 4096) x 32768] float32 tiles and was measured slower than the token-chunked version on CPU.
- `chunked`: `TokenChunkedDivergence` below: `chunk_size` rows at a time, full vocabulary per chunk, nothing but
  the inputs and three [N] vectors saved for backward, logits recomputed in backward with analytic gradients
  (6 lm_head matmuls per row: student and teacher projections twice, then the two gradient products).
- `fused`: `FusedWeightedDivergence` below. The per-token loss factors f_t are known before the loss runs, so the
  forward pass computes L = sum_t f_t * l_t and, chunk by chunk, its gradient w.r.t. the student's hidden rows,
  lm_head weight and bias (only those that require grad); backward only scales these by the incoming gradient
  (4 matmuls per row, buffers [N, H] and [V, H], never [N, V]). The approach of Liger-Kernel's fused linear losses.
`per_token_divergence` (trl, chunked) returns the per-token divergence [N] (differentiable w.r.t. the student's
hidden states, weight and bias) and the per-token student entropy [N] (no gradient); `weighted_divergence_loss`
(every backend; what the trainer calls) returns (sum_t f_t * l_t, divergence, entropy) with the last two detached
for the fused backend. Projections go through `LMHead.raw_logits` / `LMHead.transform`, the same code as the
statistics pass. `divergence_reference` is the direct full-logit definition the tests compare against.

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


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and float32 inputs; float64 stays float64 (the reference tests)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _chunk_logprobs(s_head: LMHead, h_s, t_head: LMHead, h_t, temperature):
    """Student and teacher log-probabilities of one chunk of rows, plus d student logits / d raw projection."""
    dtype = _compute_dtype(s_head.weight)
    zs, dz = s_head.transform(s_head.raw_logits(h_s, dtype), temperature)
    zt, _ = t_head.transform(t_head.raw_logits(h_t, dtype), temperature)
    return F.log_softmax(zs, -1), F.log_softmax(zt.to(zs.device), -1), dz


class TokenChunkedDivergence(torch.autograd.Function):
    """Chunked per-token divergence with recomputation in backward (see module docstring)."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, beta, temperature,
                s_scale, s_softcap, t_scale, t_softcap, chunk_size):
        n = s_hidden.shape[0]
        s_head, t_head = LMHead(s_weight, s_bias, s_scale, s_softcap), LMHead(t_weight, t_bias, t_scale, t_softcap)
        div = torch.zeros(n, device=s_hidden.device, dtype=_compute_dtype(s_weight))
        entropy = torch.zeros_like(div)
        aux = torch.zeros_like(div)
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                rows = slice(start, min(start + chunk_size, n))
                log_ps, log_pt, _ = _chunk_logprobs(s_head, s_hidden[rows], t_head, t_hidden[rows], temperature)
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
        s_head, t_head = LMHead(s_weight, s_bias, s_scale, s_softcap), LMHead(t_weight, t_bias, t_scale, t_softcap)
        grads = _Grads(s_hidden, s_weight, s_bias, ctx.needs_input_grad[:3])
        if grad_div is not None:
            grad_div = grad_div.to(aux.dtype)
            for start in range(0, s_hidden.shape[0], chunk_size):
                rows = slice(start, min(start + chunk_size, s_hidden.shape[0]))
                log_ps, log_pt, dz = _chunk_logprobs(s_head, s_hidden[rows], t_head, t_hidden[rows], temperature)
                g = _grad_wrt_logits(log_ps, log_pt, aux[rows], beta) * grad_div[rows].unsqueeze(-1) * dz
                grads.add(rows, g, s_hidden[rows], s_weight)
        return (*grads.cast(), *(None,) * 10)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nv,nv->n", a, b)  # one pass, no [n, V] temporary (unlike (a * b).sum(-1))


def _fused_chunk(log_ps, log_pt, beta):
    """(divergence [n], student entropy [n], d divergence / d student logits [n, V]) of one chunk.

    Consumes log_ps and log_pt (their buffers are reused in place: this pass is memory-bound). Log-probabilities are
    clamped to the dtype's lowest finite value so that masked (-inf) logits give 0 * finite = 0, never NaN.
    """
    low = torch.finfo(log_ps.dtype).min
    log_ps.clamp_min_(low)
    log_pt.clamp_min_(low)
    ps = log_ps.exp()
    entropy = -_rowdot(ps, log_ps)
    if beta == 1.0:  # KL(P_S || P_T); d/dz_s = P_S * (log P_S - log P_T - KL)
        d = torch.sub(log_ps, log_pt, out=log_pt)
        div = _rowdot(ps, d)
        return div, entropy, d.sub_(div.unsqueeze(-1)).mul_(ps)
    if beta == 0.0:  # KL(P_T || P_S); d/dz_s = P_S - P_T
        pt = log_pt.exp()
        div = _rowdot(pt, torch.sub(log_pt, log_ps, out=log_pt))
        return div, entropy, torch.sub(ps, pt, out=pt)
    div, aux = _divergence_from_logprobs(log_ps, log_pt, beta)
    return div, entropy, _grad_wrt_logits(log_ps, log_pt, aux, beta)


class _Grads:
    """Gradient buffers of the student's hidden rows [N, H], lm_head weight [V, H] and bias [V] (only those asked
    for), accumulated in the compute dtype chunk by chunk."""

    def __init__(self, hidden, weight, bias, needs):
        dtype = _compute_dtype(weight)
        self.like = (hidden, weight, bias)
        self.h, self.w, self.b = (torch.zeros(x.shape, device=x.device, dtype=dtype) if need else None
                                  for x, need in zip(self.like, needs))

    def add(self, rows: slice, g: torch.Tensor, h_rows: torch.Tensor, weight: torch.Tensor) -> None:
        """Add the contribution of one chunk, g = d loss / d raw logits [n, V] of the rows `rows`."""
        g_low = g.to(weight.dtype)  # the two gradient matmuls run in the weight's dtype, as autograd's would
        h_rows = h_rows.to(weight.dtype)
        same = weight.dtype == _compute_dtype(weight)  # then accumulate in place, without a [V, H] temporary
        if self.h is not None:
            if same:
                self.h[rows].addmm_(g_low, weight)
            else:
                self.h[rows] += g_low @ weight
        if self.w is not None:
            if same:
                self.w.addmm_(g_low.t(), h_rows)
            else:
                self.w += g_low.t() @ h_rows
        if self.b is not None:
            self.b += g.sum(0)

    def cast(self, scale: torch.Tensor | None = None) -> tuple:
        out = []
        for buf, like in zip((self.h, self.w, self.b), self.like):
            if buf is None:
                out.append(None)
            else:
                out.append((buf if scale is None else buf * scale.to(buf.dtype)).to(like.dtype))
        return tuple(out)


class FusedWeightedDivergence(torch.autograd.Function):
    """sum_t f_t * divergence_t with its gradient computed in forward (see the module docstring).

    Outputs: the scalar loss (differentiable), per-token divergence and student entropy [N] (not differentiable).
    Backward multiplies the gradients stored in forward by the incoming scalar gradient, so gradient accumulation,
    loss scaling and GradScaler act on them as on any other loss. Calling backward twice (retain_graph) is fine;
    the buffers are freed with the graph.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, factors, beta, temperature,
                s_scale, s_softcap, t_scale, t_softcap, chunk_size):
        n = s_hidden.shape[0]
        s_head, t_head = LMHead(s_weight, s_bias, s_scale, s_softcap), LMHead(t_weight, t_bias, t_scale, t_softcap)
        dtype = _compute_dtype(s_weight)
        div = torch.zeros(n, device=s_hidden.device, dtype=dtype)
        entropy = torch.zeros_like(div)
        factors = factors.to(s_hidden.device, dtype)
        grads = _Grads(s_hidden, s_weight, s_bias, ctx.needs_input_grad[:3])
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                rows = slice(start, min(start + chunk_size, n))
                h_rows = s_hidden[rows]
                log_ps, log_pt, dz = _chunk_logprobs(s_head, h_rows, t_head, t_hidden[rows], temperature)
                div[rows], entropy[rows], g = _fused_chunk(log_ps, log_pt, beta)
                g.mul_(factors[rows].unsqueeze(-1) * dz if isinstance(dz, float) else factors[rows].unsqueeze(-1))
                if not isinstance(dz, float):
                    g.mul_(dz)
                grads.add(rows, g, h_rows, s_weight)
        ctx.grads = grads
        ctx.mark_non_differentiable(div, entropy)
        loss = (div * factors).sum()
        return loss, div, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_div, _grad_entropy):
        grad_h, grad_w, grad_b = ctx.grads.cast(grad_loss)
        return (grad_h, grad_w, grad_b, *(None,) * 11)


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto`: TRL's Triton kernel on CUDA (not yet measured against `fused` on a GPU), `fused` elsewhere (fastest
    and leanest on CPU, see BENCHMARKS.md)."""
    if backend == "auto":
        return "trl" if device.type == "cuda" else "fused"
    if backend not in ("trl", "chunked", "fused"):
        raise ValueError(f"divergence_backend must be auto, trl, chunked or fused, got {backend!r}.")
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
    """Per-token divergence [N] (grad to the student) and student entropy [N] over rows [N, H].

    `fused` computes a weighted sum, not a per-token differentiable divergence: here it means `chunked`.
    """
    _check_heads(student_head, teacher_head)
    args = (
        student_hidden, student_head.sliced_weight, student_head.sliced_bias,
        teacher_hidden, teacher_head.sliced_weight, teacher_head.sliced_bias,
        beta, temperature,
    )
    if student_hidden.shape[0] == 0:
        zero = student_hidden.sum(-1).float()  # keeps the graph connected for an empty micro-batch
        return zero, zero.detach()
    backend = resolve_backend(backend, student_hidden.device)
    if backend == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        return ChunkedDivergenceFunction.apply(
            args[0], args[1], args[2], args[3], args[4], args[5], beta, temperature,
            student_head.scale, student_head.softcap, teacher_head.scale, teacher_head.softcap,
        )
    return TokenChunkedDivergence.apply(
        *args, student_head.scale, student_head.softcap, teacher_head.scale, teacher_head.softcap, chunk_size
    )


def _check_heads(student_head: LMHead, teacher_head: LMHead) -> None:
    if student_head.vocab != teacher_head.vocab:
        raise ValueError(
            f"Student and teacher heads cover different vocabularies ({student_head.vocab} vs {teacher_head.vocab})."
        )


def weighted_divergence_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead,
    factors: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss = sum_t f_t * divergence_t, divergence [N], student entropy [N]) over rows [N, H] with factors [N].

    The loss step of the trainer, the benchmark and the GPU check. The loss is differentiable w.r.t. the student's
    hidden rows and lm_head (whatever of them requires grad); divergence and entropy are for logging (detached
    under `fused`).
    """
    _check_heads(student_head, teacher_head)
    if factors.shape != student_hidden.shape[:1]:
        raise ValueError(f"factors must have one entry per row: got {tuple(factors.shape)} for "
                         f"{student_hidden.shape[0]} rows.")
    if student_hidden.shape[0] == 0:
        zero = student_hidden.sum(-1).float()  # keeps the graph connected for an empty micro-batch
        return zero.sum(), zero.detach(), zero.detach()
    if resolve_backend(backend, student_hidden.device) != "fused":
        div, entropy = per_token_divergence(student_hidden, student_head, teacher_hidden, teacher_head, beta,
                                            temperature, backend, chunk_size)
        return (div * factors.to(div.device, div.dtype)).sum(), div, entropy
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    return FusedWeightedDivergence.apply(
        student_hidden, student_head.sliced_weight, student_head.sliced_bias,
        teacher_hidden, teacher_head.sliced_weight, teacher_head.sliced_bias, factors.detach(), beta, temperature,
        student_head.scale, student_head.softcap, teacher_head.scale, teacher_head.softcap, chunk_size,
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
