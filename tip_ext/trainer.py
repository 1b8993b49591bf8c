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

from opsd.core.selection import SCOPES, TokenChoice, TokenSelector, TokenView

from .census import quadrant_census, summarize_kept
from .selectors import RULES, needed_stats, normalization_spread, select
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
        default=None, metadata={"help": "Rule options as JSON, e.g. '{\"alpha\": 1, \"importance_weights\": true}' "
                                "(see tip_ext/selectors.py for each rule's options)."})
    selector_weighting: str = field(
        default="hard", metadata={"help": "hard = keep mask; soft = keep all tokens weighted by the rule's score "
                                  "(an extension none of the papers offers)."})
    census: bool = field(default=True, metadata={"help": "Log the quadrant census and kept/dropped statistics."})
    census_quantile: float = field(default=0.5, metadata={"help": "Quantile used as the high/low cut-off of both "
                                                                 "census axes (per rollout batch)."})
    token_dump_dir: str | None = field(
        default=None, metadata={"help": "Write every step's per-token statistics, score and keep flag as parquet "
                                "here (for `python -m tip_ext.plot`)."})

    def __post_init__(self):
        if isinstance(self.selector_options, str):
            self.selector_options = json.loads(self.selector_options) if self.selector_options.strip() else None
        if self.selector in (None, "none", "None", ""):
            self.selector = None
            return
        if self.selector not in RULES:
            raise ValueError(f"Unknown selector {self.selector!r}; choose one of {sorted(RULES)} or none.")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}.")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}.")
        if self.selector_weighting not in ("hard", "soft"):
            raise ValueError(f"selector_weighting must be 'hard' or 'soft', got {self.selector_weighting!r}.")
        import inspect

        allowed = {name for name, p in inspect.signature(RULES[self.selector].fn).parameters.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY}
        unknown = sorted(set(self.selector_options or {}) - allowed)
        if unknown:
            raise ValueError(f"Selector {self.selector!r} has no option(s) {unknown}; its options: {sorted(allowed)}.")


class TipSelector(TokenSelector):
    def __init__(self, config: SelectorConfig, chunk_size: int = 512):
        if config.selector is None:
            raise ValueError("TipSelector needs a rule; with selector=None run plain OPD (no selector).")
        self.config = config
        self.scope = config.scope
        self.across_processes = config.selector_across_processes
        self.chunk_size = chunk_size
        self.options = dict(config.selector_options or {})
        needed = set(needed_stats(config.selector, **self.options))
        if config.census:
            needed |= set(CENSUS_STATS)
        self.stat_names = tuple(sorted(needed))
        self.needs_model_pass = bool(self.stat_names)
        self._dumped = 0
        self._warned: set[str] = set()

    def statistics(self, view: TokenView) -> dict[str, torch.Tensor]:
        if not self.stat_names:
            return {}
        return token_stats_from_hidden(view.student_hidden, view.student_head, view.teacher_hidden, view.teacher_head,
                                       top_k=self.config.support_top_k, chunk_size=self.chunk_size,
                                       temperature=view.temperature, names=self.stat_names)

    def choose(self, stats, sequence_ids, positions, generator) -> TokenChoice:
        cfg = self.config
        sel = select(cfg.selector, stats, cfg.ratio, sequence_ids=sequence_ids, generator=generator,
                     weighting=cfg.selector_weighting, **self.options)
        metrics = {}
        if cfg.census and sel.keep.numel():
            census = quadrant_census(stats["entropy_norm"], stats["reverse_kl"], sel.keep, cfg.census_quantile)
            metrics.update({f"census/{k}": v for k, v in census.items() if not k.startswith("threshold")})
            summary = summarize_kept({k: stats[k] for k in CENSUS_STATS}, sel.keep)
            metrics.update({f"tokens/{k}": v for k, v in summary.items() if k != "kept_fraction"})
        metrics.update(self._spread_metrics(stats))
        return TokenChoice(sel.keep, sel.weights, metrics, sel.score)

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
                    "normalization sets every token outside that range to 0 or 1. Consider selector_options "
                    "'{\"normalization\": \"minmax\"}' or '\"rank\"'. (Warned once per axis.)", stacklevel=2)
        return out

    def record(self, step: int, view: TokenView, stats, choice: TokenChoice) -> None:
        if not self.config.token_dump_dir or view.sequence_ids.numel() == 0:
            return
        import pandas as pd

        os.makedirs(self.config.token_dump_dir, exist_ok=True)
        table = {"step": step, "sequence": view.sequence_ids.cpu().numpy(), "position": view.positions.cpu().numpy(),
                 "token_id": view.token_ids.cpu().numpy(), "kept": choice.keep.cpu().numpy()}
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
    return TipSelector(config, chunk_size=getattr(train_args, "chunk_size", 512))
