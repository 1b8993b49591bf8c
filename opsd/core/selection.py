"""The one seam through which token selection enters the OPD loss.

opsd knows nothing about particular selection rules. A `TokenSelector` (tip_ext provides them) is handed the valid
completion tokens of the step in two calls:

1. `statistics(view)`: per micro-batch, no grad: per-token statistics [N] from the student's and the teacher's hidden
   states at the valid completion positions (padding and tool-output tokens are never part of a view).
2. `choose(stats, sequence_ids, positions, generator)`: per selection group (one sequence, one micro-batch, or the
   whole rollout batch, as `scope` says; gathered from all processes when `across_processes`), returns the keep
   mask and optional per-token weights.

The trainer (`OPDTrainer._select_tokens`) does the grouping, the cross-process gather and the loss normalization; with
no selector every valid token is kept and no statistics pass runs (plain full-token OPD, the baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .heads import LMHead

SCOPES = ("sequence", "micro_batch", "rollout_batch")


@dataclass
class TokenView:
    """The valid completion tokens of one micro-batch, flattened row-major ([N] or [N, H])."""

    token_ids: torch.Tensor
    sequence_ids: torch.Tensor  # which rollout each token belongs to (unique within the step and process)
    positions: torch.Tensor  # index of the token among its rollout's valid tokens
    student_hidden: torch.Tensor | None = None  # detached; None when the selector needs no model pass
    teacher_hidden: torch.Tensor | None = None
    student_head: LMHead | None = None
    teacher_head: LMHead | None = None
    temperature: float = 1.0


@dataclass
class TokenChoice:
    """One keep decision, carried unchanged from the rule (tip_ext.select) through the seam to the loss."""

    keep: torch.Tensor  # bool [N]
    weights: torch.Tensor | None = None  # float [N] multiplying each kept token's loss; None = 1
    metrics: dict[str, float] = field(default_factory=dict)
    score: torch.Tensor | None = None  # float [N] ranking score, when the rule has one (token dumps, plots)


class TokenSelector:
    """Base class of token selectors; see the module docstring for the protocol."""

    scope: str = "rollout_batch"
    across_processes: bool = True
    needs_model_pass: bool = True
    logs_overlap: bool = False  # True: the selector logs the overlap diagnostics itself (the trainer then does not)

    def statistics(self, view: TokenView) -> dict[str, torch.Tensor]:
        return {}

    def choose(self, stats: dict[str, torch.Tensor], sequence_ids: torch.Tensor, positions: torch.Tensor,
               generator: torch.Generator) -> TokenChoice:
        raise NotImplementedError

    def record(self, step: int, view: TokenView, stats: dict[str, torch.Tensor], choice: TokenChoice) -> None:
        """Called with each micro-batch's local tokens after selection (token dumps); default: nothing."""


def valid_token_index(loss_mask: torch.Tensor):
    """Flat indices, row (sequence) ids and within-row positions of the non-zero entries of a [B, C] mask."""
    flat = loss_mask.reshape(-1).nonzero(as_tuple=True)[0]
    rows = flat // loss_mask.shape[1]
    positions = (loss_mask.long().cumsum(1) - 1).reshape(-1)[flat]
    return flat, rows, positions


def loss_weights(keep_masks, token_weights, loss_masks, normalization: str, num_processes: int, all_reduce_sum):
    """Per-token factors f [B, C] per micro-batch so that sum_t f_t * l_t over the step's micro-batches and processes
    is the normalized loss; multiplied by num_processes because data-parallel training averages gradients.

    kept_tokens: sum of (weighted) kept-token losses / number of kept tokens in the step (all micro-batches, ranks).
    all_tokens:  the same sum / number of valid completion tokens (dropped tokens count as zero).
    sequence:    each sequence's kept-token mean, averaged over the sequences with at least one kept token.
    `all_reduce_sum(tensor)` sums a tensor over processes.
    """
    factors = [keep.float() * (1.0 if w is None else w) for keep, w in zip(keep_masks, token_weights)]
    if normalization == "sequence":
        counts = [keep.float().sum(1, keepdim=True) for keep in keep_masks]
        factors = [f / c.clamp_min(1.0) for f, c in zip(factors, counts)]
        denominator = all_reduce_sum(sum((c > 0).float().sum() for c in counts))
    elif normalization == "all_tokens":
        denominator = all_reduce_sum(sum(m.float().sum() for m in loss_masks))
    else:
        denominator = all_reduce_sum(sum(keep.float().sum() for keep in keep_masks))
    scale = num_processes / denominator.clamp_min(1.0)
    return [f * scale for f in factors]
