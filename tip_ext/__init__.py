"""Token-importance selection for on-policy distillation: per-token statistics, selection rules, census."""

from .census import quadrant_census, summarize_kept
from .selectors import RULES, TokenChoice, needed_stats, register, select
from .stats import STAT_NAMES, token_stats, token_stats_from_hidden

__all__ = [
    "STAT_NAMES",
    "RULES",
    "TokenChoice",
    "needed_stats",
    "quadrant_census",
    "register",
    "select",
    "summarize_kept",
    "token_stats",
    "token_stats_from_hidden",
]
