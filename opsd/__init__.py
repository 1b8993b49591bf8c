"""opsd: memory-efficient on-policy distillation (OPD) on top of TRL's DistillationTrainer.

The baseline layer: full-token OPD with one token-selection seam (opsd.selection) that tip_ext plugs into.
Names are imported lazily: `python -m opsd.data` and friends should not pay for importing TRL.
"""

_EXPORTS = {
    "OPDConfig": "core.config", "OPDTrainer": "core.trainer", "LMHead": "core.heads", "head_of": "core.heads",
    "per_token_divergence": "core.losses", "divergence_reference": "core.losses", "TokenSelector": "core.selection",
    "TokenView": "core.selection", "TokenChoice": "core.selection",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'opsd' has no attribute {name!r}")
