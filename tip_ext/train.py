"""`python -m tip_ext.train`: `python -m opsd.train` plus the token-selection flags of `SelectorConfig`
(--selector, --ratio, --scope, --support_top_k, --selector_options, --token_dump_dir, ...)."""

from __future__ import annotations

import sys

from opsd.train import main as opsd_main

from .trainer import SelectorConfig, make_selector


def main(argv: list[str] | None = None) -> dict:
    return opsd_main(argv, extra=(SelectorConfig,), make_selector=make_selector, prog="python -m tip_ext.train")


if __name__ == "__main__":
    main(sys.argv[1:])
