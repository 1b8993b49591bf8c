"""opsd: memory-efficient on-policy distillation (OPD) on top of TRL's DistillationTrainer.

The baseline layer: full-token OPD with one token-selection seam (opsd.selection) that tip_ext plugs into.
"""

from .config import OPDConfig
from .heads import LMHead, head_of
from .losses import divergence_reference, per_token_divergence
from .selection import TokenChoice, TokenSelector, TokenView

__all__ = ["OPDConfig", "LMHead", "head_of", "per_token_divergence", "divergence_reference", "TokenSelector",
           "TokenView", "TokenChoice", "OPDTrainer"]


def __getattr__(name):  # the trainer pulls in the whole TRL stack: import it on first use
    if name == "OPDTrainer":
        from .trainer import OPDTrainer

        return OPDTrainer
    raise AttributeError(name)
