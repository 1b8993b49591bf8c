"""Per-sample weights of the OPD loss (upstream's reward weighting); the reward functions live in opsd.reward."""

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
