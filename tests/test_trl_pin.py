"""Fails loudly when the TRL code OPDTrainer overrides or relies on changes (see opsd/core/trl_compat.py)."""

import trl

from opsd.core import trl_compat


def test_trl_version_is_the_pinned_one():
    assert trl.__version__ == trl_compat.TRL_VERSION, (
        f"trl {trl.__version__} installed, opsd is written against {trl_compat.TRL_VERSION}: see opsd/core/trl_compat.py")


def test_overridden_trl_code_is_unchanged():
    changed = trl_compat.changed()
    assert not changed, f"TRL code opsd depends on changed: {changed}. Review patches/README.md and OPDTrainer."


def test_hash_detects_a_change():
    def f():
        return 1

    def g():
        return 2

    assert trl_compat.source_hash(f) != trl_compat.source_hash(g)
