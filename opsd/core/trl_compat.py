"""The TRL code opsd overrides or relies on, pinned by source hash (trl 1.16.0).

OPDTrainer replaces `_prepare_inputs`, `_compute_loss`, `compute_loss`, `_get_train_sampler`, extends `_tokenize_prompts`,
`log` and `create_optimizer`, attaches the teacher after `__init__`, and relies on `_forward_redirection`,
`_get_last_hidden_state`, `_generate_and_score_completions`, `training_step` and `ChunkedDivergenceFunction`.
If any of them changes, tests/test_trl_pin.py fails: re-read the new code against patches/README.md, adapt
OPDTrainer, then update the hashes here.
"""

from __future__ import annotations

import hashlib
import inspect

TRL_VERSION = "1.16.0"

PINNED = {
    "DistillationTrainer.__init__": "b5a0ad1b1031e096",
    "DistillationTrainer._prepare_inputs": "a0b5e05b3647e889",
    "DistillationTrainer._compute_loss": "9fc0021cbcc0b5e9",
    "DistillationTrainer.compute_loss": "e5082879a7183040",
    "DistillationTrainer._get_last_hidden_state": "12dc17e4ad4b1999",
    "DistillationTrainer._generate_and_score_completions": "2416bfc479ade342",
    "DistillationTrainer._tokenize_prompts": "30568810007eb3f7",
    "DistillationTrainer._get_train_sampler": "f3a856a8af028a13",
    "DistillationTrainer.training_step": "9e18632f7dd8e8d8",
    "DistillationTrainer.log": "cf1ee75dd2cb9959",
    "ChunkedDivergenceFunction": "3920655a8f12b3a4",
}


def source_hash(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def current_hashes() -> dict[str, str]:
    from trl import DistillationTrainer
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    out = {}
    for name in PINNED:
        owner, _, attr = name.partition(".")
        obj = {"DistillationTrainer": DistillationTrainer, "ChunkedDivergenceFunction": ChunkedDivergenceFunction}[owner]
        out[name] = source_hash(getattr(obj, attr) if attr else obj)
    return out


def changed() -> list[str]:
    now = current_hashes()
    return [name for name, digest in PINNED.items() if now[name] != digest]
