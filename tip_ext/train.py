"""`python -m tip_ext.train`: `python -m opsd.train` plus the token-selection flags of `SelectorConfig`
(--selector, --ratio, --scope, --support_top_k, --selector_options, --token_dump_dir, ...). User errors are one
`error: ...` line naming the flag and its run-script variable (SELECTOR_OPTIONS, RATIO, ...), exit status 2."""

from __future__ import annotations

import json
import sys

from opsd.preflight import UserError
from opsd.train import main as opsd_main

from .trainer import SelectorConfig, make_selector


def check_selector_options(argv: list[str] | None) -> None:
    """--selector_options must be a JSON object (SELECTOR_OPTIONS); checked before parsing so the message names it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--selector_options"]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--selector_options=")]
    for value in values:
        if not value.strip():
            continue
        try:
            parsed = json.loads(value)
        except ValueError as err:
            raise UserError(f"--selector_options (SELECTOR_OPTIONS) is not valid JSON ({err}): {value!r}; write an "
                            "object such as '{\"temperature\": 0.5}'.") from None
        if not isinstance(parsed, dict):
            raise UserError(f"--selector_options (SELECTOR_OPTIONS) must be a JSON object of rule options, got "
                            f"{value!r}.")


def main(argv: list[str] | None = None) -> dict:
    try:
        check_selector_options(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise
    return opsd_main(argv, extra=(SelectorConfig,), make_selector=make_selector, prog="python -m tip_ext.train")


if __name__ == "__main__":
    main(sys.argv[1:])
