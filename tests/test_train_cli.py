"""End-to-end `python -m opsd.train` on tiny local models: loss goes down, checkpoints resume, vocabularies are
checked, user errors are clear."""

import json
import os
import subprocess
import sys

import pytest
import torch

from opsd.core.models import load_tokenizer, resolve_distill_vocab
from opsd.train import main
from support import base_args, fixed_batch_kl, make_model, make_tokenizer, save_pair, write_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def setup(tmp_path):
    student, teacher = save_pair(str(tmp_path))
    data = write_prompts(str(tmp_path / "prompts.jsonl"), n=16)
    return student, teacher, data, str(tmp_path / "run")


def test_training_lowers_distillation_loss_and_saves_a_loadable_model(setup):
    student, teacher, data, out = setup
    before = fixed_batch_kl(student, teacher)
    summary = main(base_args(student, teacher, data, out, steps=24, learning_rate="3e-3"))
    after = fixed_batch_kl(out, teacher)
    assert after < 0.8 * before, (before, after)  # measured: 0.23 -> 0.14
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert len(losses) == 24 and all(h.get("kept_fraction") == 1.0 for h in summary["log_history"] if "loss" in h)
    assert os.path.exists(os.path.join(out, "run_summary.json"))
    assert load_tokenizer(out)("1+2=")["input_ids"] == load_tokenizer(student)("1+2=")["input_ids"]


def test_resume_from_checkpoint(setup):
    student, teacher, data, out = setup
    main(base_args(student, teacher, data, out, steps=2, save_strategy="steps", save_steps=2))
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))
    summary = main(base_args(student, teacher, data, out, steps=4, save_strategy="steps", save_steps=2,
                             resume_from_checkpoint="true"))
    steps = [h["step"] for h in summary["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4]  # the log of steps 1-2 comes back from the checkpoint's trainer state
    with open(os.path.join(out, "checkpoint-4", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 4


def test_padded_vocabularies_distil_over_the_real_vocabulary(tmp_path):
    n = len(make_tokenizer())
    student, teacher = save_pair(str(tmp_path), student_vocab=n + 3, teacher_vocab=n + 11)
    data = write_prompts(str(tmp_path / "p.jsonl"))
    summary = main(base_args(student, teacher, data, str(tmp_path / "run"), steps=1))
    assert torch.isfinite(torch.tensor([h["loss"] for h in summary["log_history"] if "loss" in h])).all()
    tok = make_tokenizer()
    assert resolve_distill_vocab(make_model(n + 3), make_model(n + 11), tok) == n
    assert resolve_distill_vocab(make_model(n + 3), make_model(n + 3), tok) == n + 3


def test_true_vocabulary_mismatch_fails_clearly(tmp_path):
    tok = make_tokenizer()
    n = len(tok)
    with pytest.raises(ValueError, match="tokenizers differ"):
        resolve_distill_vocab(make_model(n), make_model(n), tok, make_tokenizer(extra_tokens=2))
    big = make_tokenizer(extra_tokens=n + 6 - len(make_tokenizer(extra_tokens=0)))  # n + 6 tokens
    with pytest.raises(ValueError, match="Vocabulary mismatch"):
        resolve_distill_vocab(make_model(n + 2), make_model(n + 4), big)


def test_user_errors_are_clear(setup, tmp_path, capsys):
    from opsd.preflight import UserError

    student, teacher, data, out = setup
    with pytest.raises(UserError, match="TEACHER_MODEL_PATH") as exc:
        main(base_args(student, str(tmp_path / "nope"), data, out))
    assert exc.value.code == 2
    with pytest.raises(UserError, match="MODEL_PATH"):
        main(base_args(str(tmp_path / "nope"), teacher, data, out))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="(?i)no rows"):
        main(base_args(student, teacher, str(empty), out))
    with pytest.raises(UserError, match="OPD_LOSS_TYPE"):
        main(base_args(student, teacher, data, out, loss_type="kl"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 4


def test_run_script_dry_run_prints_config(setup):
    student, teacher, data, out = setup
    env = dict(os.environ, MODEL_PATH=student, TEACHER_MODEL_PATH=teacher, TRAIN_FILE=data, OUTPUT_DIR=out,
               DRY_RUN="1", OPD_LOSS_TYPE="forward_kl", OPD_CHUNK_SIZE="64", TRAIN_BATCH_SIZE="8",
               PPO_MICRO_BATCH_SIZE_PER_GPU="2", MAX_RESPONSE_LENGTH="32", ENABLE_THINKING="false",
               MODEL_NAME="Qwen3-tiny", PYTHON_BIN=sys.executable)
    result = subprocess.run(["bash", "run_scripts/train_opd.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout[result.stdout.index("{"):])
    opd = config["OPDConfig"]
    assert opd["loss_type"] == "forward_kl" and opd["beta"] == 0.0 and opd["chunk_size"] == 64
    assert opd["gradient_accumulation_steps"] == 4 and opd["max_completion_length"] == 32
    assert opd["chat_template_kwargs"] == {"enable_thinking": False}
