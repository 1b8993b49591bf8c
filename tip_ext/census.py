"""TIP's entropy x divergence quadrant census of a batch, and what a selection kept (docs/METHODS.md section 4).

Quadrants, with "high" meaning strictly above the axis threshold (per-batch quantile, the median by default):
Q1 high-H high-D, Q2 high-H low-D, Q3 low-H high-D, Q4 low-H low-D. Empty inputs give zeros, never NaN.
"""

from __future__ import annotations

import torch

from .stats import quantile as _quantile  # the name `quantile` is quadrant_census's argument

QUADRANTS = ("Q1", "Q2", "Q3", "Q4")


def _share(part: torch.Tensor, whole: torch.Tensor) -> float:
    total = int(whole.sum())
    return int((part & whole).sum()) / total if total else 0.0


def quadrant_census(
    entropy_norm: torch.Tensor,
    reverse_kl: torch.Tensor,
    keep: torch.Tensor | None = None,
    quantile: float = 0.5,
    entropy_threshold: float | None = None,
    divergence_threshold: float | None = None,
) -> dict[str, float]:
    """Quadrant shares of all tokens (`all/Q1..Q4`) and, given a bool `keep` mask, among kept tokens (`kept/Qi`)
    and the kept fraction of each quadrant (`kept_frac/Qi`). Also reports the thresholds used
    (`threshold/entropy`, `threshold/divergence`)."""
    h = entropy_norm.detach().reshape(-1).double()
    d = reverse_kl.detach().reshape(-1).double()
    if h.numel() != d.numel():
        raise ValueError(f"entropy_norm and reverse_kl differ in length: {h.numel()} vs {d.numel()}")
    n = h.numel()
    if n:
        th = float(_quantile(h, quantile)) if entropy_threshold is None else float(entropy_threshold)
        td = float(_quantile(d, quantile)) if divergence_threshold is None else float(divergence_threshold)
    else:
        th = td = 0.0
    hi_h, hi_d = h > th, d > td
    masks = dict(zip(QUADRANTS, (hi_h & hi_d, hi_h & ~hi_d, ~hi_h & hi_d, ~hi_h & ~hi_d)))
    everything = torch.ones(n, dtype=torch.bool, device=h.device)
    out = {"threshold/entropy": th, "threshold/divergence": td}
    out.update({f"all/{q}": _share(m, everything) for q, m in masks.items()})
    if keep is not None:
        keep = keep.detach().reshape(-1).to(device=h.device, dtype=torch.bool)
        if keep.numel() != n:
            raise ValueError(f"keep has {keep.numel()} entries for {n} tokens")
        out.update({f"kept/{q}": _share(m, keep) for q, m in masks.items()})
        out.update({f"kept_frac/{q}": _share(keep, m) for q, m in masks.items()})
    return out


def summarize_kept(stats: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, float]:
    """Mean of each statistic over kept and dropped tokens (`kept/<name>`, `dropped/<name>`; 0 for an empty set),
    plus `kept_fraction`."""
    keep = keep.detach().reshape(-1).bool()
    n = keep.numel()
    out = {"kept_fraction": int(keep.sum()) / n if n else 0.0}
    for name, value in stats.items():
        value = value.detach().reshape(-1).double().to(keep.device)
        if value.numel() != n:
            raise ValueError(f"stat {name!r} has {value.numel()} entries for {n} tokens")
        for prefix, mask in (("kept", keep), ("dropped", ~keep)):
            out[f"{prefix}/{name}"] = float(value[mask].mean()) if mask.any() else 0.0
    return out


def quadrant_means(entropy_norm: torch.Tensor, reverse_kl: torch.Tensor, values: dict[str, torch.Tensor],
                   quantile: float = 0.5) -> dict[str, float]:
    """Mean of each of `values` inside each quadrant (`<name>/Q1`..; empty quadrants give no entry), e.g. where in
    the census the student's and the teacher's top-K sets overlap."""
    h = entropy_norm.detach().reshape(-1).double()
    d = reverse_kl.detach().reshape(-1).double()
    if h.numel() == 0:
        return {}
    hi_h, hi_d = h > float(_quantile(h, quantile)), d > float(_quantile(d, quantile))
    masks = dict(zip(QUADRANTS, (hi_h & hi_d, hi_h & ~hi_d, ~hi_h & hi_d, ~hi_h & ~hi_d)))
    out = {}
    for name, value in values.items():
        value = value.detach().reshape(-1).double().to(h.device)
        out.update({f"{name}/{q}": float(value[m].mean()) for q, m in masks.items() if m.any()})
    return out
