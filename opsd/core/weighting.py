"""Per-sample weights of the OPD loss (upstream's reward weighting) and upstream's per-micro-batch objective; the
reward functions live in opsd.reward."""

from __future__ import annotations

import torch


def reward_weights(rewards, beta: float | None) -> torch.Tensor:
    """Per-sample weights ``w_i = n * softmax(r_i / beta)`` over the ``n`` given rewards (upstream's reward_beta).

    The weights are positive and **mean exactly 1** (sum n), so weighting a per-sample loss keeps its scale:
    large ``beta`` -> all ~1, small ``beta`` -> the mass concentrates on the highest rewards. ``beta`` None or
    <= 0 disables the weighting (all ones). Apply it to whichever group you want normalized (the whole generation
    batch or one prompt's rollouts). Returns a float tensor (float32 unless ``rewards`` is float64) on the
    rewards' device; an empty input gives an empty output.
    """
    r = torch.as_tensor(rewards)
    if r.dim() != 1:
        r = r.reshape(-1)
    dtype = r.dtype if r.dtype in (torch.float64, torch.float32) else torch.float32
    r = r.to(dtype)
    n = r.numel()
    if beta is None or beta <= 0 or n == 0:
        return torch.ones_like(r)
    return n * torch.softmax(r / float(beta), dim=0)


def upstream_loss_factors(keep_masks, sample_weights=None) -> list[torch.Tensor]:
    """Per-token factors f [B, C] per micro-batch for upstream's objective (verl OPD worker), on one process.

    Without weights: each micro-batch's loss is the mean over its kept tokens, and the step's loss is the mean of
    those over the micro-batches that keep at least one token. With per-sample weights w (one [B] tensor per
    micro-batch): a micro-batch's loss is sum_i w_i * mean_t(l_it) / sum_i w_i (the sum of w over every sequence of
    the micro-batch, also those that keep no token), again averaged over the micro-batches that keep a token.
    Data-parallel training averages these per-process losses, as upstream's FSDP does, so no process count enters.
    """
    counts = [keep.float().sum() for keep in keep_masks]
    active = sum(int(c > 0) for c in counts)
    factors = []
    for i, keep in enumerate(keep_masks):
        keep = keep.float()
        if counts[i] == 0:
            factors.append(torch.zeros_like(keep))
            continue
        if sample_weights is None or sample_weights[i] is None:
            factors.append(keep / (counts[i] * active))
            continue
        w = sample_weights[i].to(keep.device, torch.float32).reshape(-1)
        per_sequence = keep.sum(1).clamp_min(1.0)
        factors.append(keep * (w / (per_sequence * w.sum().clamp_min(torch.finfo(torch.float32).tiny)))[:, None]
                       / active)
    return factors


def binarize(rewards) -> torch.Tensor:
    """Upstream's reward for weighting: 1 when the reward is positive, else 0."""
    r = torch.as_tensor(rewards)
    return (r > 0).to(r.dtype if r.is_floating_point() else torch.float32)
