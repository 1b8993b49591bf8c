"""Token selection rules: which response tokens of a rollout batch keep their distillation loss (docs/METHODS.md sections 4-5).

`select(rule, stats, ratio, ...)` takes float [N] statistics (tip_ext.stats) over the N VALID tokens of the batch
(padding and tool-output tokens already removed), flattened row-major so that each sequence's tokens appear in
increasing position order, plus `sequence_ids` [N] saying which rollout each token belongs to. It returns a
`TokenChoice` (keep mask, optional weights, optional ranking score). m is the number of valid tokens of one sequence.

| rule                 | needs                                   | scope (default)  | k            | options (defaults)                                         |
|----------------------|-----------------------------------------|------------------|--------------|------------------------------------------------------------|
| all                  | -                                       | -                | N            | -                                                          |
| random               | -                                       | batch            | floor(rho*N) | min_keep=1                                                 |
| position_first       | -                                       | sequence         | floor(rho*m) | min_keep=1                                                 |
| position_last        | -                                       | sequence         | floor(rho*m) | min_keep=1                                                 |
| entropy_sample       | entropy_norm (+ reverse_kl if gamma!=0) | batch, sampled   | floor(rho*N) | alpha=1, gamma=0, importance_weights=False, uniform_mix=0.1, min_keep=1 |
| entropy_topk         | entropy_norm                            | batch            | floor(rho*N) | per_sequence=False, min_keep=1                             |
| divergence_topk      | reverse_kl                              | batch            | floor(rho*N) | per_sequence=False, min_keep=1                             |
| soft_or (TIP)        | entropy_norm, reverse_kl                | sequence         | floor(rho*m) | entropy_clip_quantile=0.98, bottom=False, per_sequence=True, min_keep=1 |
| q3                   | entropy_norm, forward_kl                | batch            | floor(rho*N) | entropy_clip_quantile=0.98, per_sequence=False, min_keep=1 |
| teachability (TA-OPD)| local_forward_kl, support_mass          | batch, >=1 / seq | ceil(rho*N)  | q_low=0.05, q_high=0.95, eps=1e-8, incompatible=False, ensure_each_sequence=True, normalization="quantile" |
| teachability_entropy | entropy, local_forward_kl, support_mass | batch, >=1 / seq | ceil(rho*N)  | q_low=0.05, q_high=0.95, eps=1e-8, ensure_each_sequence=True, normalization="quantile" |

Choices docs/METHODS.md leaves open, and what this module does:
- Ties: a stable sort on the score, so the lower flat index (the earlier position of a sequence) wins.
- k: floor / ceil of rho*n with a 1e-9 tolerance, so that 0.29 * 100 counts as 29 and not 28.999... -> 28.
  Floor rules keep at least `min_keep` (default 1) tokens per scope unit (the batch, or each sequence for
  per-sequence scope) when floor(rho*n) would be smaller; min_keep=0 gives the papers' bare floor.
- Batch normalizations (min-max, percentile clip, TA-OPD's q05/q95 Norm) run over all N tokens passed in, also for
  per-sequence selection. Min-max of a constant axis is 0. Quantiles interpolate linearly (numpy's default).
- entropy_sample: weight w_t = entropy_norm_t^alpha * d_t^gamma with d = min-max normalized reverse_kl (the baseline
  helper used JSD/ln 2; reverse KL is TIP's divergence axis). k tokens are drawn without replacement, draw by draw
  with probability proportional to w (Efraimidis-Spirakis keys). Tokens with w = 0 are never drawn unless k exceeds
  the number of w > 0 tokens; the rest of the budget is then filled uniformly from them. The score is
  p_t = w_t / sum(w). importance_weights=True (the papers' unbiased variant) switches to a design whose inclusion
  probabilities are known exactly: pi_t proportional to w_t, capped at 1 and summing to k (`inclusion_probabilities`;
  zero-weight tokens get the leftover budget uniformly when k exceeds the positive tokens, all-zero w gives k/N),
  drawn by systematic sampling over a random order (`systematic_sample`); kept tokens get the Horvitz-Thompson
  weight k / (N pi_t), so the kept-token mean (the default kept_tokens normalization, |T| = k) is an unbiased
  estimate of the all-token mean loss. Unbiased needs pi_t > 0 for every token: the design mixes a uniform share
  into p (`uniform_mix`, default 0.1, which also bounds every weight by 1 / uniform_mix); uniform_mix=0 samples
  exactly in proportion to w and is unbiased only for the tokens with w > 0. (Rescaling 1/p_t to mean 1 over the kept set, as before, is
  self-normalized and biased: with one kept token its weight is always 1.)
- soft_or bottom=True (the paper's sanity check) ranks by 1 - s, i.e. keeps the lowest-s tokens of each sequence.
- teachability: after the batch top ceil(rho*N), each sequence without a kept token gets its best-scoring token, so
  the total can exceed ceil(rho*N). teachability_entropy soft-ORs Norm(entropy in nats) with s.
- teachability normalization (each axis over the batch): "quantile" (default, TA-OPD's Norm: clip at the q_low /
  q_high quantiles, then scale), "minmax" ((z - min) / (max - min), 0 for a constant axis; q_low, q_high, eps unused)
  or "rank" ((average rank - 1) / (N - 1), ties share their mean rank; 0 for N = 1). The quantile form collapses
  when most tokens share one value: support mass C ~ 1 on most tokens puts q05 and q95 at ~1 and zeroes every
  token below q05, real mistakes included. `normalization_spread` reports each axis's q_low / q_high / min / max
  and flags that case; TipSelector logs it every step and warns once per axis.
- weighting="soft" (an extension no paper offers): keep every token and weight it by the rule's score (negative
  values clipped to 0) scaled to mean 1 (all-zero scores give weight 1). Only for rules that return a score;
  it overrides importance_weights.
- weighting="mixed" (an extension no paper offers; the lab's moonshot candidate): keep every token; the rule's kept
  set K (k tokens of the N in the scope) gets weight (1 - mix) + mix N / k, every other token 1 - mix (mean weight
  exactly 1; `mix` in (0, 1], default 0.5; mix = 1 with the kept_tokens normalization is the hard rule). All tokens
  anchor the update, the rule's tokens get the emphasis; works for any rule, with or without a score, and
  overrides the rule's own weights.
- Scores should be finite: an inf KL (teacher -inf logits where the student has mass) breaks min-max scaling.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

from opsd.core.selection import TokenChoice

from .stats import quantile

_K_TOL = 1e-9


@dataclass
class RuleContext:
    """What a rule function receives: the validated batch (N >= 1)."""

    stats: dict[str, torch.Tensor]
    ratio: float
    group: torch.Tensor  # long [N], sequence index in 0..n_groups-1
    counts: torch.Tensor  # long [n_groups], valid tokens per sequence
    generator: torch.Generator | None

    @property
    def n(self) -> int:
        return self.group.numel()

    @property
    def device(self) -> torch.device:
        return self.group.device


@dataclass(frozen=True)
class RuleSpec:
    fn: Callable[..., TokenChoice]  # fn(ctx: RuleContext, **options) -> TokenChoice
    needs: tuple[str, ...]
    description: str
    extra_needs: Callable[[dict], tuple[str, ...]] | None = None  # stats needed only under some options


RULES: dict[str, RuleSpec] = {}


def register(name: str, needs=(), description: str = "", extra_needs=None):
    """Decorator adding `fn(ctx: RuleContext, *, option=default, ...) -> TokenChoice` to RULES under `name`.

    Options must be keyword-only parameters: `select` rejects any option the function does not declare.
    """

    def deco(fn):
        RULES[name] = RuleSpec(fn, tuple(needs), description, extra_needs)
        return fn

    return deco


def _spec(rule: str) -> RuleSpec:
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; registered: {sorted(RULES)}")
    return RULES[rule]


def needed_stats(rule: str, **options) -> tuple[str, ...]:
    """The statistics `select(rule, ..., **options)` reads."""
    spec = _spec(rule)
    extra = spec.extra_needs(options) if spec.extra_needs is not None else ()
    return tuple(dict.fromkeys(spec.needs + tuple(extra)))


def rule_options(rule: str) -> dict[str, inspect.Parameter]:
    """The options `rule` declares (its keyword-only parameters), with their defaults."""
    return {
        name: p for name, p in inspect.signature(_spec(rule).fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def check_options(rule: str, options: dict) -> dict:
    """`options` if every name is one `rule` declares, else a ValueError naming the offending options; the one
    place rule options are validated (select, SelectorConfig and the diagnostic call it)."""
    allowed = rule_options(rule)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"rule {rule!r} has no option(s) {unknown}; its options: {sorted(allowed)}")
    return dict(options)


def select(
    rule: str,
    stats: dict[str, torch.Tensor],
    ratio: float,
    sequence_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weighting: str = "hard",
    mix: float = 0.5,
    **options,
) -> TokenChoice:
    """Apply selection `rule` at retention ratio `ratio` in (0, 1] (see the module docstring)."""
    spec = _spec(rule)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "mixed" and not 0.0 < mix <= 1.0:
        raise ValueError(f"mix must be in (0, 1], got {mix}")
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    check_options(rule, options)
    needs = needed_stats(rule, **options)
    missing = [name for name in needs if name not in stats]
    if missing:
        raise ValueError(f"rule {rule!r} needs statistic(s) {missing}, not in the given stats {sorted(stats)}")

    sized = [stats[name] for name in needs] or list(stats.values())
    if sequence_ids is not None:
        sized.append(sequence_ids)
    if not sized:
        raise ValueError(f"rule {rule!r} reads no statistic: pass sequence_ids or any [N] tensor in stats")
    n = sized[0].numel()
    if any(t.dim() != 1 or t.numel() != n for t in sized):
        raise ValueError(f"stats and sequence_ids must all be 1-D of one length, got {[tuple(t.shape) for t in sized]}")
    device = sized[0].device
    if n == 0:
        return TokenChoice(keep=torch.zeros(0, dtype=torch.bool, device=device))

    if sequence_ids is None:
        group = torch.zeros(n, dtype=torch.long, device=device)
    else:
        group = torch.unique(sequence_ids.to(device), return_inverse=True)[1]
    counts = torch.bincount(group)
    sel = spec.fn(RuleContext({k: v.to(device) for k, v in stats.items()}, ratio, group, counts, generator), **options)

    if weighting == "soft":
        if sel.score is None:
            raise ValueError(f"rule {rule!r} has no score, so weighting='soft' cannot apply")
        w = sel.score.double().clamp_min(0)
        mean = w.mean()
        w = w / mean if mean > 0 else torch.ones_like(w)
        sel = TokenChoice(keep=torch.ones(n, dtype=torch.bool, device=device), weights=w.float(), score=sel.score)
    elif weighting == "mixed":
        k = int(sel.keep.sum())
        w = torch.full((n,), 1.0 - mix, dtype=torch.float64, device=device)
        if k:
            w[sel.keep] += mix * n / k
        else:  # nothing kept: plain all-token weights
            w.fill_(1.0)
        sel = TokenChoice(keep=torch.ones(n, dtype=torch.bool, device=device), weights=w.float(), score=sel.score)
    return sel


WEIGHTINGS = ("hard", "soft", "mixed")


# ---------------------------------------------------------------- helpers


def _num_keep(counts: torch.Tensor, ratio: float, rounding: str, min_keep: int = 0) -> torch.Tensor:
    x = counts.double() * ratio
    k = torch.floor(x + _K_TOL) if rounding == "floor" else torch.ceil(x - _K_TOL)
    return torch.minimum(k.long().clamp_min(min_keep), counts)


def _rank(key: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """0-based rank of each token inside its group by descending key; equal keys rank by lower flat index."""
    order = torch.sort(-key, stable=True).indices  # ascending on -key keeps NaN last
    order = order[torch.sort(group[order], stable=True).indices]  # regroup, keeping the key order inside groups
    counts = torch.bincount(group, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[group[order]]
    return rank


def _top(ctx: RuleContext, key: torch.Tensor, per_sequence: bool, rounding: str, min_keep: int) -> torch.Tensor:
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    if per_sequence:
        group, counts = ctx.group, ctx.counts
    else:
        group = torch.zeros_like(ctx.group)
        counts = torch.tensor([ctx.n], device=ctx.device)
    k = _num_keep(counts, ctx.ratio, rounding, min_keep)
    return _rank(key, group, counts.numel()) < k[group]


def _minmax(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def _clipped_minmax(h: torch.Tensor, q: float) -> torch.Tensor:
    """TIP's entropy axis: clip at the batch q-quantile, then min-max to [0, 1]."""
    return _minmax(h.double().clamp(max=quantile(h, q)))


def _robust_norm(z: torch.Tensor, q_low: float, q_high: float, eps: float) -> torch.Tensor:
    """TA-OPD's Norm(z) = clip((z - q_low) / (q_high - q_low + eps), 0, 1) over the batch."""
    z = z.double()
    lo, hi = quantile(z, q_low), quantile(z, q_high)
    return ((z - lo) / (hi - lo + eps)).clamp(0.0, 1.0)


NORMALIZATIONS = ("quantile", "minmax", "rank")
# An axis is degenerate for the quantile normalization when its q_low..q_high range is below this share of its full
# min..max range: clipping then flattens almost every token to 0 or 1 (e.g. support mass 0.998..1.000 of 0.3..1.0).
DEGENERATE_SHARE = 0.05


def _rank_norm(z: torch.Tensor) -> torch.Tensor:
    """(average rank - 1) / (N - 1) in [0, 1]; ties share their mean rank; 0 for N = 1."""
    z = z.double()
    n = z.numel()
    if n == 1:
        return torch.zeros_like(z)
    values, inverse, counts = torch.unique(z, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct value's first occurrence
    mean_rank = first.double() + (counts.double() - 1) / 2
    return mean_rank[inverse] / (n - 1)


def _axis_norm(z: torch.Tensor, normalization: str, q_low: float, q_high: float, eps: float) -> torch.Tensor:
    """One teachability axis mapped to [0, 1] over the batch by `normalization` (module table)."""
    if normalization == "quantile":
        return _robust_norm(z, q_low, q_high, eps)
    if normalization == "minmax":
        return _minmax(z)
    if normalization == "rank":
        return _rank_norm(z)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def normalization_spread(rule: str, stats: dict[str, torch.Tensor], q_low: float = 0.05, q_high: float = 0.95,
                         **_options) -> dict[str, dict[str, float]]:
    """What the teachability rules' normalization works with: for each axis the rule normalizes, its batch q_low /
    q_high quantiles, min, max and `degenerate` (1.0 when q_high - q_low < DEGENERATE_SHARE * (max - min), i.e.
    the quantile clip would flatten the axis; also when min == max). Empty for other rules."""
    axes = {"teachability": ("local_forward_kl", "support_mass"),
            "teachability_entropy": ("entropy", "local_forward_kl", "support_mass")}.get(rule, ())
    out = {}
    for name in axes:
        z = stats[name].detach().double()
        if z.numel() == 0:
            continue
        lo, hi = float(quantile(z, q_low)), float(quantile(z, q_high))
        mn, mx = float(z.min()), float(z.max())
        out[name] = {"q_low": lo, "q_high": hi, "min": mn, "max": mx,
                     "degenerate": float(hi - lo < DEGENERATE_SHARE * (mx - mn) or mx == mn)}
    return out


def _soft_or(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # 1 - (1-a)(1-b), not a + b - ab: with a == 1 (every clipped entropy) the latter differs by an ulp between
    # tokens whose scores are equal, and the tie no longer goes to the earlier position
    return 1.0 - (1.0 - a) * (1.0 - b)


def _score_selection(keep: torch.Tensor, score: torch.Tensor) -> TokenChoice:
    return TokenChoice(keep=keep, weights=None, score=score.float())


# ---------------------------------------------------------------- controls


@register("all", description="keep every token (plain OPD)")
def _rule_all(ctx: RuleContext) -> TokenChoice:
    return TokenChoice(keep=torch.ones(ctx.n, dtype=torch.bool, device=ctx.device))


@register("random", description="floor(rho*N) tokens uniformly without replacement over the batch")
def _rule_random(ctx: RuleContext, *, min_keep: int = 1) -> TokenChoice:
    k = int(_num_keep(torch.tensor([ctx.n]), ctx.ratio, "floor", min_keep))
    gen_device = ctx.generator.device if ctx.generator is not None else torch.device("cpu")
    idx = torch.randperm(ctx.n, generator=ctx.generator, device=gen_device)[:k].to(ctx.device)
    keep = torch.zeros(ctx.n, dtype=torch.bool, device=ctx.device)
    keep[idx] = True
    return TokenChoice(keep=keep)


@register("position_first", description="first floor(rho*m) tokens of each sequence")
def _rule_position_first(ctx: RuleContext, *, min_keep: int = 1) -> TokenChoice:
    key = -torch.arange(ctx.n, device=ctx.device)
    return TokenChoice(keep=_top(ctx, key, True, "floor", min_keep))


@register("position_last", description="last floor(rho*m) tokens of each sequence")
def _rule_position_last(ctx: RuleContext, *, min_keep: int = 1) -> TokenChoice:
    key = torch.arange(ctx.n, device=ctx.device)
    return TokenChoice(keep=_top(ctx, key, True, "floor", min_keep))


# ---------------------------------------------------------------- TIP


def _sample_without_replacement(w: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Bool mask of k indices drawn one by one with probability proportional to w among those not yet drawn."""
    n = w.numel()
    gen_device = generator.device if generator is not None else torch.device("cpu")
    log_u = torch.log1p(-torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device)).to(w.device)
    positive = w > 0
    n_pos = int(positive.sum())
    # Efraimidis-Spirakis: the k largest u^(1/w) (log u / w) form such a draw-by-draw sample
    key = torch.where(positive, log_u / w.clamp_min(torch.finfo(torch.float64).tiny), -math.inf)
    keep = torch.zeros(n, dtype=torch.bool, device=w.device)
    keep[torch.topk(key, min(k, n_pos)).indices] = True
    if k > n_pos:  # fill the budget uniformly from the zero-weight tokens
        filler = torch.where(positive, -math.inf, log_u)
        keep[torch.topk(filler, k - n_pos).indices] = True
    return keep


def inclusion_probabilities(w: torch.Tensor, k: int) -> torch.Tensor:
    """pi_t proportional to w_t, capped at 1, summing to k (float64): the design of the importance-weighted sample.

    Tokens whose share k * w_t / sum(w) exceeds 1 are taken surely and the rest of the budget is spread over the
    others in proportion to w. With k above the number of positive weights, every positive token is sure and the
    remainder is spread uniformly over the zero-weight ones; all weights zero: uniform k / N.
    """
    w = w.double().clamp_min(0)
    n = w.numel()
    pi = torch.zeros(n, dtype=torch.float64, device=w.device)
    if k <= 0:
        return pi
    positive = w > 0
    n_pos = int(positive.sum())
    if n_pos == 0:
        return pi.fill_(k / n)
    if k >= n_pos:
        pi[positive] = 1.0
        if k > n_pos:
            pi[~positive] = (k - n_pos) / (n - n_pos)
        return pi
    sure = torch.zeros(n, dtype=torch.bool, device=w.device)
    while True:
        budget = k - int(sure.sum())
        rest = positive & ~sure
        share = budget * w / w[rest].sum()
        newly = rest & (share >= 1.0)
        if not newly.any():
            break
        sure |= newly
    pi[sure] = 1.0
    pi[rest] = share[rest]
    return pi


def systematic_sample(pi: torch.Tensor, order: torch.Tensor, u: float) -> torch.Tensor:
    """Bool mask of a systematic sample: lay the tokens out in `order` on [0, k) with lengths pi_t and take the
    token under each of the points u, u + 1, ..., u + k - 1 (u in [0, 1)). Token t is drawn with probability exactly
    pi_t (pi_t <= 1) when u is uniform, and exactly k = sum(pi) tokens are drawn."""
    k = round(float(pi.sum()))
    keep = torch.zeros(pi.numel(), dtype=torch.bool, device=pi.device)
    if k == 0:
        return keep
    ends = torch.cumsum(pi[order], 0)
    ends = ends * (k / ends[-1])  # exactly k at the end whatever the float rounding
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    keep[order] = torch.ceil(ends - u) > torch.ceil(starts - u)
    return keep


@register(
    "entropy_sample",
    needs=("entropy_norm",),
    description="floor(rho*N) tokens sampled without replacement with p ~ entropy_norm^alpha * minmax(reverse_kl)^gamma",
    extra_needs=lambda options: ("reverse_kl",) if options.get("gamma", 0.0) != 0 else (),
)
def _rule_entropy_sample(
    ctx: RuleContext,
    *,
    alpha: float = 1.0,
    gamma: float = 0.0,
    importance_weights: bool = False,
    uniform_mix: float = 0.1,
    min_keep: int = 1,
) -> TokenChoice:
    if alpha < 0 or gamma < 0:
        raise ValueError(f"alpha and gamma must be >= 0, got {alpha}, {gamma}")
    if not 0.0 <= uniform_mix <= 1.0:
        raise ValueError(f"uniform_mix must be in [0, 1], got {uniform_mix}")
    w = ctx.stats["entropy_norm"].double().clamp_min(0) ** alpha
    if gamma != 0:
        w = w * _minmax(ctx.stats["reverse_kl"]) ** gamma
    total = w.sum()
    p = w / total if total > 0 else torch.zeros_like(w)
    k = int(_num_keep(torch.tensor([ctx.n]), ctx.ratio, "floor", min_keep))
    if not importance_weights:
        return TokenChoice(keep=_sample_without_replacement(w, k, ctx.generator), score=p.float())
    # Horvitz-Thompson: a fixed-size design whose inclusion probabilities pi_t are known exactly, and weights
    # k / (N pi_t), so that the kept-token mean sum_T w_t l_t / k is an unbiased estimate of the all-token mean
    # every token needs pi_t > 0 for an unbiased estimate: mix a uniform share into the design (defensive
    # importance sampling), which also bounds each weight by 1 / uniform_mix
    design = (1.0 - uniform_mix) * p + uniform_mix / ctx.n if total > 0 else torch.ones_like(w)
    pi = inclusion_probabilities(design, k)
    gen_device = ctx.generator.device if ctx.generator is not None else torch.device("cpu")
    order = torch.randperm(ctx.n, generator=ctx.generator, device=gen_device).to(ctx.device)
    u = float(torch.rand(1, generator=ctx.generator, dtype=torch.float64, device=gen_device))
    keep = systematic_sample(pi, order, u)
    weights = torch.where(keep, k / (ctx.n * pi.clamp_min(torch.finfo(torch.float64).tiny)), 0.0)
    return TokenChoice(keep=keep, weights=weights.float(), score=p.float())


@register("entropy_topk", needs=("entropy_norm",), description="top floor(rho*N) by student entropy")
def _rule_entropy_topk(ctx: RuleContext, *, per_sequence: bool = False, min_keep: int = 1) -> TokenChoice:
    score = ctx.stats["entropy_norm"]
    return _score_selection(_top(ctx, score, per_sequence, "floor", min_keep), score)


@register("divergence_topk", needs=("reverse_kl",), description="top floor(rho*N) by reverse KL")
def _rule_divergence_topk(ctx: RuleContext, *, per_sequence: bool = False, min_keep: int = 1) -> TokenChoice:
    score = ctx.stats["reverse_kl"]
    return _score_selection(_top(ctx, score, per_sequence, "floor", min_keep), score)


@register(
    "soft_or",
    needs=("entropy_norm", "reverse_kl"),
    description="TIP: top floor(rho*m) per sequence by h^ + d^ - h^*d^",
)
def _rule_soft_or(
    ctx: RuleContext,
    *,
    entropy_clip_quantile: float = 0.98,
    bottom: bool = False,
    per_sequence: bool = True,
    min_keep: int = 1,
) -> TokenChoice:
    s = _soft_or(_clipped_minmax(ctx.stats["entropy_norm"], entropy_clip_quantile), _minmax(ctx.stats["reverse_kl"]))
    score = 1.0 - s if bottom else s
    return _score_selection(_top(ctx, score, per_sequence, "floor", min_keep), score)


@register(
    "q3",
    needs=("entropy_norm", "forward_kl"),
    description="TIP Q3-only: top floor(rho*N) by forward_kl * (1 - h^)",
)
def _rule_q3(
    ctx: RuleContext,
    *,
    entropy_clip_quantile: float = 0.98,
    per_sequence: bool = False,
    min_keep: int = 1,
) -> TokenChoice:
    h = _clipped_minmax(ctx.stats["entropy_norm"], entropy_clip_quantile)
    score = ctx.stats["forward_kl"].double() * (1.0 - h)
    return _score_selection(_top(ctx, score, per_sequence, "floor", min_keep), score)


# ---------------------------------------------------------------- TA-OPD


def _ta_keep(ctx: RuleContext, score: torch.Tensor, ensure_each_sequence: bool) -> torch.Tensor:
    keep = _top(ctx, score, False, "ceil", 0)
    if ensure_each_sequence:
        has_kept = torch.bincount(ctx.group, weights=keep.double(), minlength=ctx.counts.numel()) > 0
        best = _rank(score, ctx.group, ctx.counts.numel()) == 0
        keep = keep | (best & ~has_kept[ctx.group])
    return keep


def _teachability(ctx: RuleContext, q_low: float, q_high: float, eps: float, incompatible: bool,
                  normalization: str = "quantile") -> torch.Tensor:
    d = _axis_norm(ctx.stats["local_forward_kl"], normalization, q_low, q_high, eps)
    c = _axis_norm(ctx.stats["support_mass"], normalization, q_low, q_high, eps)
    return d * (1.0 - c) if incompatible else d * c


@register(
    "teachability",
    needs=("local_forward_kl", "support_mass"),
    description="TA-OPD: top ceil(rho*N) over the batch by Norm(D) * Norm(C), >= 1 per sequence",
)
def _rule_teachability(
    ctx: RuleContext,
    *,
    q_low: float = 0.05,
    q_high: float = 0.95,
    eps: float = 1e-8,
    incompatible: bool = False,
    ensure_each_sequence: bool = True,
    normalization: str = "quantile",
) -> TokenChoice:
    score = _teachability(ctx, q_low, q_high, eps, incompatible, normalization)
    return _score_selection(_ta_keep(ctx, score, ensure_each_sequence), score)


@register(
    "teachability_entropy",
    needs=("entropy", "local_forward_kl", "support_mass"),
    description="TA-OPD+Entropy: soft-OR of Norm(H) and teachability, selected like teachability",
)
def _rule_teachability_entropy(
    ctx: RuleContext,
    *,
    q_low: float = 0.05,
    q_high: float = 0.95,
    eps: float = 1e-8,
    ensure_each_sequence: bool = True,
    normalization: str = "quantile",
) -> TokenChoice:
    h = _axis_norm(ctx.stats["entropy"], normalization, q_low, q_high, eps)
    score = _soft_or(h, _teachability(ctx, q_low, q_high, eps, False, normalization))
    return _score_selection(_ta_keep(ctx, score, ensure_each_sequence), score)
