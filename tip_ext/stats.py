"""Per-token statistics that the selection rules rank by (docs/METHODS.md section 3).

Every statistic is computed from the student's and teacher's next-token distributions P_S, P_T = softmax(logits / T)
over the shared vocabulary V, a chunk of rows at a time and without gradients, so the extra memory is
O(chunk_size * V) whatever the number of tokens N:

| name             | definition                                                                   |
|------------------|------------------------------------------------------------------------------|
| entropy          | H(P_S) in nats                                                               |
| entropy_norm     | H(P_S) / ln V (0 when V == 1); TIP's h_t                                     |
| reverse_kl       | KL(P_S || P_T); TIP's delta_t and the OPD loss                               |
| forward_kl       | KL(P_T || P_S); ranks TIP's Q3 rule                                          |
| teacher_entropy  | H(P_T)                                                                       |
| support_mass     | C_t = sum_{v in topK(P_S)} P_T(v); TA-OPD's compatibility mass               |
| local_forward_kl | D_t = KL(P_T^U || P_S^U), U = topK(P_S) u topK(P_T), both renormalized on U  |

Also, only when asked for by name (OVERLAP_NAMES): the Rethinking-OPD diagnostics overlap_ratio, shared_mass_student,
shared_mass_teacher and entropy_gap with their own K (`overlap_k`), from opsd.core.diagnostics.overlap_chunk.

Conventions: 0 * log 0 = 0, so -inf logits are allowed (each row needs at least one finite logit); a KL is +inf when
the first distribution puts mass where the second has none. top_k is clamped to V; ties inside torch.topk are
broken however torch breaks them. Arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from opsd.core.diagnostics import OVERLAP_NAMES, overlap_chunk
from opsd.core.heads import LMHead

STAT_NAMES = (
    "entropy",
    "entropy_norm",
    "reverse_kl",
    "forward_kl",
    "teacher_entropy",
    "support_mass",
    "local_forward_kl",
)
# computed only when asked for by name (the selector asks for them with the census)
KNOWN_NAMES = STAT_NAMES + OVERLAP_NAMES
_TOP_K_STATS = frozenset({"support_mass", "local_forward_kl"})
_TEACHER_STATS = frozenset({"reverse_kl", "forward_kl", "teacher_entropy", "support_mass", "local_forward_kl",
                            *OVERLAP_NAMES})


def _resolve_names(names: Iterable[str] | None) -> tuple[str, ...]:
    if names is None:
        return STAT_NAMES
    if isinstance(names, str):
        names = (names,)
    wanted = set(names)
    unknown = sorted(wanted - set(KNOWN_NAMES))
    if unknown:
        raise ValueError(f"unknown statistic(s) {unknown}; known: {list(KNOWN_NAMES)}")
    return tuple(n for n in KNOWN_NAMES if n in wanted)


def _kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    # masking on p > 0 makes 0 * log 0 (and 0 * (-inf - -inf)) vanish instead of turning into NaN
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _entropy(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return -torch.where(p > 0, p * log_p, 0.0).sum(-1)


def _chunk_stats(zs: torch.Tensor, zt: torch.Tensor, names: tuple[str, ...], top_k: int,
                 overlap_k: int = 16) -> dict[str, torch.Tensor]:
    """Statistics of one chunk; zs, zt are float32 [n, V] logits with the temperature already applied."""
    out: dict[str, torch.Tensor] = {}
    vocab = zs.shape[-1]
    ls = torch.log_softmax(zs, dim=-1)
    ps = ls.exp()
    if "entropy" in names or "entropy_norm" in names:
        ent = _entropy(ps, ls)
        out["entropy"] = ent
        out["entropy_norm"] = ent / math.log(vocab) if vocab > 1 else torch.zeros_like(ent)
    if _TEACHER_STATS.isdisjoint(names):
        return out
    lt = torch.log_softmax(zt, dim=-1)
    pt = lt.exp()
    if "reverse_kl" in names:
        out["reverse_kl"] = _kl(ps, ls, lt)
    if "forward_kl" in names:
        out["forward_kl"] = _kl(pt, lt, ls)
    if "teacher_entropy" in names:
        out["teacher_entropy"] = _entropy(pt, lt)
    if not set(OVERLAP_NAMES).isdisjoint(names):
        chunk = overlap_chunk(ls, lt, overlap_k, with_kl=False, entropy_s=out.get("entropy"),
                              entropy_t=out.get("teacher_entropy"))
        out.update({name: value for name, value in chunk.items() if name in names})
    if _TOP_K_STATS.isdisjoint(names):
        return out
    k = min(top_k, vocab)
    idx_s = ls.topk(k, dim=-1).indices
    if "support_mass" in names:
        out["support_mass"] = pt.gather(1, idx_s).sum(-1)
    if "local_forward_kl" in names:
        idx_t = lt.topk(k, dim=-1).indices
        # a teacher id already in the student's top-K would be counted twice in U: mask the second copy out
        in_s = torch.zeros_like(ls, dtype=torch.bool).scatter_(1, idx_s, True)
        dup = torch.cat([torch.zeros_like(idx_s, dtype=torch.bool), in_s.gather(1, idx_t)], dim=1)
        idx_u = torch.cat([idx_s, idx_t], dim=1)
        lus = torch.log_softmax(ls.gather(1, idx_u).masked_fill(dup, -math.inf), dim=-1)
        lut = torch.log_softmax(lt.gather(1, idx_u).masked_fill(dup, -math.inf), dim=-1)
        out["local_forward_kl"] = _kl(lut.exp(), lut, lus)
    return out


def _chunked(
    n_rows: int,
    device: torch.device,
    project: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    names: tuple[str, ...],
    top_k: int,
    chunk_size: int,
    overlap_k: int = 16,
) -> dict[str, torch.Tensor]:
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = {name: torch.empty(n_rows, dtype=torch.float32, device=device) for name in names}
    # overlap_k only when used: wrappers of _chunk_stats written for its original signature keep working
    extra = {} if set(OVERLAP_NAMES).isdisjoint(names) else {"overlap_k": overlap_k}
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        zs, zt = project(start, end)
        chunk = _chunk_stats(zs, zt.to(zs.device), names, top_k, **extra)
        for name in names:
            out[name][start:end] = chunk[name]
    return out


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


@torch.no_grad()
def token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    top_k: int = 16,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    names: Iterable[str] | None = None,
    overlap_k: int = 16,
) -> dict[str, torch.Tensor]:
    """float32 [N] statistics (see the module table) of [N, V] student and teacher logits of any float dtype.

    `names` restricts which statistics are computed and returned (default: STAT_NAMES; the overlap diagnostics
    OVERLAP_NAMES only when named, with top-K sets of size `overlap_k`).
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"expected two [N, V] logit tensors of one shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    _check_temperature(temperature)
    wanted = _resolve_names(names)

    def project(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        zs = student_logits[start:end].float()
        zt = teacher_logits[start:end].float()
        if temperature != 1.0:
            zs, zt = zs / temperature, zt / temperature
        return zs, zt

    return _chunked(student_logits.shape[0], student_logits.device, project, wanted, top_k, chunk_size, overlap_k)


@torch.no_grad()
def token_stats_from_hidden(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead,
    top_k: int = 16,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    names: Iterable[str] | None = None,
    overlap_k: int = 16,
) -> dict[str, torch.Tensor]:
    """token_stats of the logits `head.logits(hidden, temperature)` without ever materializing [N, V] logits.

    student_hidden [N, Hs] and teacher_hidden [N, Ht] are the final hidden states of the same N token positions;
    only chunk_size rows are projected through each head at a time. Results live on student_hidden's device.
    """
    if student_head.vocab != teacher_head.vocab:
        raise ValueError(
            f"student and teacher heads have different vocabulary sizes ({student_head.vocab} vs "
            f"{teacher_head.vocab}); set LMHead.vocab_size to the shared tokenizer vocabulary on both"
        )
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"expected [N, Hs] and [N, Ht] hidden states with the same N, got {tuple(student_hidden.shape)} "
            f"and {tuple(teacher_hidden.shape)}"
        )
    _check_temperature(temperature)
    wanted = _resolve_names(names)

    def project(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            student_head.logits(student_hidden[start:end], temperature),
            teacher_head.logits(teacher_hidden[start:end], temperature),
        )

    return _chunked(student_hidden.shape[0], student_hidden.device, project, wanted, top_k, chunk_size, overlap_k)


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a 1-D tensor with linear interpolation (numpy's default), as a float64 scalar.

    Written out instead of torch.quantile, which refuses inputs above 16M elements.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    s = x.detach().reshape(-1).double().sort().values
    if s.numel() == 0:
        raise ValueError("quantile of an empty tensor")
    pos = q * (s.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, s.numel() - 1)
    frac = pos - lo
    # interpolate only when needed so that inf values at the ends do not produce inf * 0 = NaN
    return s[lo] if frac == 0 or s[hi] == s[lo] else s[lo] + (s[hi] - s[lo]) * frac
