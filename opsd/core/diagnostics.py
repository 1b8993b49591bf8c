"""Overlap diagnostics of the Rethinking-OPD paper (docs/METHODS.md section 6), one chunk of rows at a time.

Per token t, with S_K and T_K the student's and the teacher's top-K token sets (K = `overlap_k`, default 16):

| name                | definition                                       |
|---------------------|--------------------------------------------------|
| overlap_ratio       | |S_K intersect T_K| / K                           |
| shared_mass_student | P_S(S_K intersect T_K)                           |
| shared_mass_teacher | P_T(S_K intersect T_K)                           |
| entropy_gap         | H(P_S) - H(P_T) in nats                          |
| reverse_kl          | KL(P_S || P_T) (probe_teacher's depth profile)   |

`overlap_chunk` is the one implementation of the maths (the selection extension's statistics pass and the
trainer's baseline pass both call it); `overlap_from_hidden` runs it over [N, H] hidden states `chunk_size` rows at a time, so the extra memory is
O(chunk_size * V) whatever N. Position buckets split each response into thirds of its valid tokens (b = floor(3 t /
L), t the token's index among the L valid tokens of its response) so that progressive alignment and the decay of the
dense reward with depth show up in the logs. K is clamped to V; ties inside torch.topk fall however torch breaks them.
"""

from __future__ import annotations

import torch

from .heads import LMHead

OVERLAP_NAMES = ("overlap_ratio", "shared_mass_student", "shared_mass_teacher", "entropy_gap")
BUCKETS = ("first", "middle", "last")
_METRIC = {"overlap_ratio": "ratio", "shared_mass_student": "student_mass", "shared_mass_teacher": "teacher_mass",
           "entropy_gap": "entropy_gap", "reverse_kl": "reverse_kl"}


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, 0.0).sum(-1)


def overlap_chunk(log_ps: torch.Tensor, log_pt: torch.Tensor, k: int = 16, with_kl: bool = True,
                  entropy_s: torch.Tensor | None = None, entropy_t: torch.Tensor | None = None
                  ) -> dict[str, torch.Tensor]:
    """The diagnostics (module table) of one chunk of row-wise log-probabilities [n, V] (float32 or float64).

    Callers that already hold the entropies pass them (`entropy_s`, `entropy_t`), and `with_kl=False` skips the
    reverse KL: each saves a full pass over the [n, V] chunk."""
    if k < 1:
        raise ValueError(f"overlap k must be >= 1, got {k}")
    k = min(k, log_ps.shape[-1])
    idx_s = log_ps.topk(k, dim=-1).indices
    idx_t = log_pt.topk(k, dim=-1).indices
    # [n, k, k] id comparison instead of [n, V] membership masks: only the 2k candidate ids matter
    shared = (idx_s.unsqueeze(-1) == idx_t.unsqueeze(-2)).any(-1)  # which of the student's top-K the teacher shares
    zero = torch.zeros((), dtype=log_ps.dtype, device=log_ps.device)
    out = {
        "overlap_ratio": shared.sum(-1).to(log_ps.dtype) / k,
        "shared_mass_student": torch.where(shared, log_ps.gather(1, idx_s).exp(), zero).sum(-1),
        "shared_mass_teacher": torch.where(shared, log_pt.gather(1, idx_s).exp(), zero).sum(-1),
    }
    h_s = _entropy(log_ps) if entropy_s is None else entropy_s
    h_t = _entropy(log_pt) if entropy_t is None else entropy_t
    out["entropy_gap"] = h_s - h_t
    if with_kl:
        ps = log_ps.exp()
        out["reverse_kl"] = torch.where(ps > 0, ps * (log_ps - log_pt), 0.0).sum(-1)
    return out


@torch.no_grad()
def overlap_from_hidden(student_hidden: torch.Tensor, student_head: LMHead, teacher_hidden: torch.Tensor,
                        teacher_head: LMHead, k: int = 16, chunk_size: int = 512,
                        temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """float32 [N] diagnostics of N token positions from the final hidden states, never holding [N, V] logits."""
    if student_head.vocab != teacher_head.vocab:
        raise ValueError(f"student and teacher heads cover different vocabularies ({student_head.vocab} vs "
                         f"{teacher_head.vocab}); give both LMHeads the shared vocab_size")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"{student_hidden.shape[0]} student rows but {teacher_hidden.shape[0]} teacher rows")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = student_hidden.shape[0]
    out = {name: torch.empty(n, dtype=torch.float32, device=student_hidden.device) for name in _METRIC}
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        log_ps = torch.log_softmax(student_head.logits(student_hidden[rows], temperature), -1)
        log_pt = torch.log_softmax(teacher_head.logits(teacher_hidden[rows], temperature), -1).to(log_ps.device)
        for name, value in overlap_chunk(log_ps, log_pt, k).items():
            out[name][rows] = value
    return out


def position_buckets(sequence_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Bucket 0/1/2 (first/middle/last third) of each token, from its response id and its index among the
    response's valid tokens; a response's length L is taken as its largest index + 1 among the given tokens, so pass
    all valid tokens of each response (the selection views do)."""
    seq = sequence_ids.reshape(-1).long()
    pos = positions.reshape(-1).long()
    if seq.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=seq.device)
    _, inverse = torch.unique(seq, return_inverse=True)
    length = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=seq.device)
    length = length.scatter_reduce(0, inverse, pos + 1, reduce="amax")
    return torch.div(3 * pos, length[inverse], rounding_mode="floor").clamp_(0, 2)


def summarize(stats: dict[str, torch.Tensor], buckets: torch.Tensor, mask: torch.Tensor | None = None,
              prefix: str = "overlap/") -> dict[str, float]:
    """Means of the diagnostics over the masked tokens (`overlap/ratio`, ...) and per position bucket
    (`overlap/ratio/first`, ...). Empty sets give no entry (never a fake 0)."""
    buckets = buckets.reshape(-1)
    keep = torch.ones_like(buckets, dtype=torch.bool) if mask is None else mask.reshape(-1).bool().to(buckets.device)
    out: dict[str, float] = {}
    for name, short in _METRIC.items():
        if name not in stats:
            continue
        value = stats[name].detach().reshape(-1).double().to(buckets.device)
        if keep.any():
            out[f"{prefix}{short}"] = float(value[keep].mean())
        for b, label in enumerate(BUCKETS):
            part = keep & (buckets == b)
            if part.any():
                out[f"{prefix}{short}/{label}"] = float(value[part].mean())
    return out
