"""How tip_ext plugs into opsd: a selector configuration and the `TokenSelector` that applies a registered rule.

`TipSelector` implements opsd's selection seam (opsd.core.selection): `statistics` computes the per-token statistics the
rule (and the quadrant census) needs from hidden states in chunks, `choose` applies `tip_ext.select` and reports the
census and kept-vs-dropped summaries as metrics, `record` writes the optional token dump.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import torch

from opsd.core.diagnostics import OVERLAP_NAMES, position_buckets, summarize
from opsd.core.selection import SCOPES, TokenChoice, TokenSelector, TokenView

from .census import quadrant_census, quadrant_means, summarize_kept
from .selectors import RULES, check_options, needed_stats, normalization_spread, select
from .stats import token_stats_from_hidden

CENSUS_STATS = ("entropy_norm", "reverse_kl")


@dataclass
class SelectorConfig:
    """Token selection settings (CLI flags / YAML keys of `python -m tip_ext.train`)."""

    selector: str | None = field(
        default=None, metadata={"help": f"Selection rule: one of {sorted(RULES)}; None/'none' = full-token OPD "
                                "with no statistics pass (the baseline)."})
    ratio: float = field(default=0.5, metadata={"help": "Retention ratio rho in (0, 1]."})
    scope: str = field(
        default="rollout_batch",
        metadata={"help": "Group over which the rule normalizes and ranks: rollout_batch (the optimizer step's "
                  "generation batch, all micro-batches), micro_batch, or sequence."})
    selector_across_processes: bool = field(
        default=True, metadata={"help": "Gather statistics from all data-parallel processes before selecting, so "
                                "a top-rho rule means the same whatever the process split."})
    support_top_k: int = field(default=16, metadata={"help": "K of the top-K support statistics (TA-OPD); not the "
                                                           "sampling top_k."})
    selector_options: dict | str | None = field(
        default=None, metadata={"help": "Rule options as JSON, e.g. '{\"alpha\": 1}': the same options as the "
                                "typed flags below (--alpha, --q_low, ...), for rules registered outside tip_ext."})
    selector_weighting: str = field(
        default="hard", metadata={"help": "hard = keep mask; soft = keep all tokens weighted by the rule's score; "
                                  "mixed = keep all tokens, the rule's kept tokens weighted (1 - mix) + mix N/k, the "
                                  "others 1 - mix (extensions none of the papers offers)."})
    selector_mix: float = field(default=0.5, metadata={"help": "mix of --selector_weighting mixed, in (0, 1]."})
    census: bool = field(default=True, metadata={"help": "Log the quadrant census, kept/dropped statistics and the "
                                                 "overlap diagnostics (overlap/*, over the kept tokens, K = the "
                                                 "trainer's overlap_k)."})
    census_quantile: float = field(default=0.5, metadata={"help": "Quantile used as the high/low cut-off of both "
                                                                 "census axes (per rollout batch)."})
    token_dump_dir: str | None = field(
        default=None, metadata={"help": "Write every step's per-token statistics, score and keep flag as parquet "
                                "here (for `python -m tip_ext.plot`)."})
    # Rule options (docs/METHODS.md, tip_ext/selectors.py's table). None = the rule's own default; setting an option
    # the chosen rule does not take is an error.
    alpha: float | None = field(default=None, metadata={"help": "entropy_sample: exponent of the entropy weight "
                                                       "(default 1)."})
    gamma: float | None = field(default=None, metadata={"help": "entropy_sample: exponent of the min-max reverse-KL "
                                                       "weight (default 0 = entropy only)."})
    importance_weights: bool | None = field(
        default=None, metadata={"help": "entropy_sample: Horvitz-Thompson weights k/(N pi) on a design with exact "
                                "inclusion probabilities, so the kept-token mean is unbiased (default false)."})
    uniform_mix: float | None = field(
        default=None, metadata={"help": "entropy_sample with importance_weights: uniform share of the sampling design "
                                "(every token drawable, weights <= 1/uniform_mix; default 0.1)."})
    min_keep: int | None = field(
        default=None, metadata={"help": "floor-budget rules (random, position_*, entropy_*, divergence_topk, soft_or, "
                                "q3): tokens kept per scope unit when floor(rho*n) rounds below it (default 1)."})
    per_sequence: bool | None = field(
        default=None, metadata={"help": "entropy_topk, divergence_topk, q3 (default false), soft_or (default true): "
                                "rank within each sequence instead of over the batch."})
    entropy_clip_quantile: float | None = field(
        default=None, metadata={"help": "soft_or, q3: entropy clipped at this batch quantile before min-max "
                                "(default 0.98)."})
    bottom: bool | None = field(default=None, metadata={"help": "soft_or: keep the LOWEST scores instead (the TIP "
                                                         "paper's sanity check; default false)."})
    q_low: float | None = field(default=None, metadata={"help": "teachability rules: lower quantile of TA-OPD's "
                                                         "Norm (default 0.05)."})
    q_high: float | None = field(default=None, metadata={"help": "teachability rules: upper quantile of TA-OPD's "
                                                          "Norm (default 0.95)."})
    eps: float | None = field(default=None, metadata={"help": "teachability rules: eps of TA-OPD's Norm "
                                                       "(default 1e-8)."})
    incompatible: bool | None = field(
        default=None, metadata={"help": "teachability: rank by the incompatible part Norm(D)*(1-Norm(C)) instead "
                                "(a diagnostic baseline; default false)."})
    ensure_each_sequence: bool | None = field(
        default=None, metadata={"help": "teachability rules: every sequence keeps at least its best token "
                                "(default true)."})
    normalization: str | None = field(
        default=None, metadata={"help": "teachability rules: how each axis is mapped to [0, 1] over the batch: "
                                "quantile (TA-OPD's q_low/q_high clip, default), minmax, or rank."})

    def __post_init__(self):
        if isinstance(self.selector_options, str):
            self.selector_options = json.loads(self.selector_options) if self.selector_options.strip() else None
        # every setting is checked, with or without a rule: a typo in a baseline's launch line fails at start too
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"--ratio must be in (0, 1], got {self.ratio}.")
        if self.scope not in SCOPES:
            raise ValueError(f"--scope must be one of {SCOPES}, got {self.scope!r}.")
        if self.selector_weighting not in ("hard", "soft", "mixed"):
            raise ValueError(f"--selector_weighting must be 'hard', 'soft' or 'mixed', got {self.selector_weighting!r}.")
        if not 0.0 < self.selector_mix <= 1.0:
            raise ValueError(f"--selector_mix must be in (0, 1], got {self.selector_mix}.")
        if self.support_top_k < 1:
            raise ValueError(f"--support_top_k must be >= 1 (the K of the top-K support sets), got {self.support_top_k}.")
        if not 0.0 < self.census_quantile < 1.0:
            raise ValueError(f"--census_quantile must be in (0, 1), got {self.census_quantile}.")
        flags = {name: getattr(self, name) for name in RULE_OPTION_FIELDS if getattr(self, name) is not None}
        clash = sorted(k for k in flags if k in (self.selector_options or {}) and self.selector_options[k] != flags[k])
        if clash:
            raise ValueError(f"Rule option(s) {clash} set both as flags and in --selector_options, differently.")
        options = {**(self.selector_options or {}), **flags}
        if self.selector in (None, "none", "None", ""):
            if options:
                raise ValueError(f"Rule option(s) {sorted(options)} were given but --selector is none: name the rule "
                                 "they belong to.")
            self.selector = None
            return
        if self.selector not in RULES:
            raise ValueError(f"Unknown --selector {self.selector!r}; choose one of {sorted(RULES)} or none.")
        try:
            self.selector_options = check_options(self.selector, options) or None
        except ValueError as err:
            raise ValueError(f"--selector {self.selector}: {err}") from None


RULE_OPTION_FIELDS = ("alpha", "gamma", "importance_weights", "uniform_mix", "min_keep", "per_sequence",
                      "entropy_clip_quantile", "bottom", "q_low", "q_high", "eps", "incompatible",
                      "ensure_each_sequence", "normalization")


class TipSelector(TokenSelector):
    def __init__(self, config: SelectorConfig, chunk_size: int = 512, overlap_k: int = 16):
        if config.selector is None:
            raise ValueError("TipSelector needs a rule; with selector=None run plain OPD (no selector).")
        self.config = config
        self.scope = config.scope
        self.across_processes = config.selector_across_processes
        self.chunk_size = chunk_size
        self.overlap_k = overlap_k
        self.logs_overlap = config.census  # the trainer then skips its own overlap pass
        self.options = dict(config.selector_options or {})
        needed = set(needed_stats(config.selector, **self.options))
        if config.census:
            needed |= set(CENSUS_STATS) | set(OVERLAP_NAMES)
        self.stat_names = tuple(sorted(needed))
        self.needs_model_pass = bool(self.stat_names)
        self._dumped = 0
        self._warned: set[str] = set()

    def statistics(self, view: TokenView) -> dict[str, torch.Tensor]:
        if not self.stat_names:
            return {}
        return token_stats_from_hidden(view.student_hidden, view.student_head, view.teacher_hidden, view.teacher_head,
                                       top_k=self.config.support_top_k, chunk_size=self.chunk_size,
                                       temperature=view.temperature, names=self.stat_names,
                                       overlap_k=self.overlap_k)

    def choose(self, stats, sequence_ids, positions, generator) -> TokenChoice:
        cfg = self.config
        sel = select(cfg.selector, stats, cfg.ratio, sequence_ids=sequence_ids, generator=generator,
                     weighting=cfg.selector_weighting, mix=cfg.selector_mix, **self.options)
        metrics = {}
        if cfg.census and sel.keep.numel():
            census = quadrant_census(stats["entropy_norm"], stats["reverse_kl"], sel.keep, cfg.census_quantile)
            metrics.update({f"census/{k}": v for k, v in census.items() if not k.startswith("threshold")})
            summary = summarize_kept({k: stats[k] for k in CENSUS_STATS}, sel.keep)
            metrics.update({f"tokens/{k}": v for k, v in summary.items() if k != "kept_fraction"})
        if cfg.census and sel.keep.numel() and "overlap_ratio" in stats:
            overlap = {name: stats[name] for name in (*OVERLAP_NAMES, "reverse_kl")}  # reverse_kl: depth profile
            metrics.update(summarize(overlap, position_buckets(sequence_ids, positions), sel.keep))
            metrics.update({f"census/{k}": v for k, v in quadrant_means(
                stats["entropy_norm"], stats["reverse_kl"], {"overlap_ratio": stats["overlap_ratio"]},
                cfg.census_quantile).items()})
        metrics.update(self._spread_metrics(stats))
        sel.metrics.update(metrics)
        return sel

    def _spread_metrics(self, stats) -> dict[str, float]:
        """norm/<axis>/{q_low,q_high,min,max,degenerate} of the teachability rules' axes; warns once per axis whose
        quantile range collapses (the default normalization then flattens it)."""
        if not stats or not next(iter(stats.values())).numel():
            return {}
        spread = normalization_spread(self.config.selector, stats, **self.options)
        out = {}
        for axis, values in spread.items():
            out.update({f"norm/{axis}/{k}": v for k, v in values.items()})
            if values["degenerate"] and axis not in self._warned and self.options.get("normalization",
                                                                                      "quantile") == "quantile":
                self._warned.add(axis)
                warnings.warn(
                    f"{self.config.selector}: the {axis} axis is degenerate in this batch (q_low {values['q_low']:.4g}, "
                    f"q_high {values['q_high']:.4g}, min {values['min']:.4g}, max {values['max']:.4g}): the quantile "
                    "normalization sets every token outside that range to 0 or 1. Consider --normalization minmax "
                    "or --normalization rank. (Warned once per axis.)", stacklevel=2)
        return out

    def record(self, step: int, view: TokenView, stats, choice: TokenChoice) -> None:
        if not self.config.token_dump_dir or view.sequence_ids.numel() == 0:
            return
        import pandas as pd

        os.makedirs(self.config.token_dump_dir, exist_ok=True)
        table = {"step": step, "sequence": view.sequence_ids.cpu().numpy(), "position": view.positions.cpu().numpy(),
                 "token_id": view.token_ids.cpu().numpy(), "kept": choice.keep.cpu().numpy(),
                 "position_bucket": position_buckets(view.sequence_ids, view.positions).cpu().numpy()}
        table.update({name: value.float().cpu().numpy() for name, value in stats.items()})
        if choice.score is not None:
            table["score"] = choice.score.float().cpu().numpy()
        if choice.weights is not None:
            table["weight"] = choice.weights.float().cpu().numpy()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        path = os.path.join(self.config.token_dump_dir, f"tokens_step{step:06d}_rank{rank}_{self._dumped:04d}.parquet")
        pd.DataFrame(table).to_parquet(path)
        self._dumped += 1


def make_selector(config: SelectorConfig, train_args=None) -> TipSelector | None:
    """The selector for a config (None = the full-token baseline)."""
    if config.selector is None:
        return None
    return TipSelector(config, chunk_size=getattr(train_args, "chunk_size", 512),
                       overlap_k=getattr(train_args, "overlap_k", 16))
