"""The user's path on the real model, through the scripts a user runs: reasoning-gym data written with
lab.real_assets -> run_scripts/prepare_data.sh -> run_scripts/train_tip.sh (SmolLM2-135M-Instruct as student and
teacher, in-training validation with the collapse signals) -> run_scripts/eval_math.sh (with the teacher-text NLL)
-> python -m opsd.compare. A few steps at tiny lengths; it asserts that the chat template was applied, that
generations can stop at `<|im_end|>`, that the reward is computed on real completions and that every logged
statistic is finite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IM_START, IM_END = 1, 2


def _run(script, env, *args, timeout=600):
    run = subprocess.run(["bash", f"run_scripts/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "PYTHON_BIN": sys.executable, "OMP_NUM_THREADS": "1",
                                               **env})
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return run


def _finite_numbers(entry):
    return {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_user_path_on_the_real_model(real_model_dir, tmp_path):
    from lab.real_assets import INSTRUCTION, reasoning_gym_rows, write_jsonl
    from opsd.core.models import load_tokenizer
    from opsd.evaluate import tokenize_prompts
    from opsd.reward import math_reward

    model = str(real_model_dir)
    # 1. data: reasoning-gym problems, prepared by the script (chat messages; lab.real_assets' short-answer wording,
    # "Give only the final answer, in the form \boxed{ANSWER}.", so the model can end its turn within a few tokens)
    raw = write_jsonl(reasoning_gym_rows("basic_arithmetic", 16, seed=11, min_terms=2, max_terms=2, min_digits=1,
                                         max_digits=1), tmp_path / "raw.jsonl")
    data = tmp_path / "data"
    _run("prepare_data.sh", {"INPUT": str(raw), "OUTPUT_DIR": str(data), "LAYOUT": "generic",
                             "INSTRUCTION": INSTRUCTION.format(question="{question}"),  # a str.format template there, plain text here
                             "VAL_FRACTION": "0.25"})
    val = [json.loads(line) for line in open(data / "validation.jsonl")]
    assert len(val) == 4 and all(isinstance(r["prompt"], list) for r in val)
    assert all("\\boxed{ANSWER}" in r["prompt"][-1]["content"] for r in val)

    # 2. training through train_tip.sh: 2 steps of 2 prompts x 16 tokens, validation before and at the end
    out = tmp_path / "run"
    _run("train_tip.sh", {
        "MODEL_PATH": model, "TEACHER_MODEL_PATH": model, "TRAIN_FILE": str(data / "train.jsonl"),
        "VAL_FILES": f"arith={data / 'validation.jsonl'}", "OUTPUT_DIR": str(out), "SELECTOR": "soft_or",
        "RATIO": "0.5", "TRAIN_BATCH_SIZE": "2", "PPO_MICRO_BATCH_SIZE_PER_GPU": "2", "MAX_STEPS": "2",
        "MAX_RESPONSE_LENGTH": "16", "MAX_PROMPT_LENGTH": "256", "LEARNING_RATE": "1e-5", "TEST_FREQ": "2",
        "VAL_BEFORE_TRAIN": "True", "VAL_N": "2", "VAL_LIMIT": "2", "VAL_MAX_NEW_TOKENS": "16",
        "EXTRA_ARGS": "--gradient_checkpointing false --use_cpu true --save_strategy no"})
    summary = json.load(open(out / "run_summary.json"))
    logs = [h for h in summary["log_history"] if "loss" in h]
    assert len(logs) == 2
    for entry in summary["log_history"]:
        for key, value in _finite_numbers(entry).items():
            assert math.isfinite(value), f"step {entry.get('step')}: {key} = {value}"
    assert all(0 < h["kept_fraction"] <= 1 for h in logs)
    records = [json.loads(line) for line in open(out / "validation.jsonl")]
    assert [r["step"] for r in records] == [0, 2]
    for r in records:
        for key in ("teacher_nll", "eot_rate", "clipped_ratio", "distinct_2", "mean@2"):
            assert math.isfinite(r["metrics"][f"val/arith/{key}"]), key
    # student == teacher at step 0: the NLL of the teacher's greedy text is small (greedy tokens are likely ones)
    assert records[0]["metrics"]["val/arith/teacher_nll"] < 1.0
    teacher_text = json.load(open(out / "teacher_text_arith.json"))
    tok = load_tokenizer(model)
    # the chat template was applied to what the models saw: ChatML markers, the assistant header last
    for ids in teacher_text["prompt_ids"]:
        assert ids[0] == IM_START and IM_END in ids
        assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert teacher_text["prompt_ids"] == tokenize_prompts(tok, [r["prompt"] for r in val[:2]], max_prompt_length=256)

    # 3. evaluation through eval_math.sh: greedy, with the teacher-text NLL (an opsd.evaluate flag)
    eval_dir = tmp_path / "eval"
    _run("eval_math.sh", {"MODEL_PATH": str(out), "DATA_FILES": f"arith={data / 'validation.jsonl'}", "K": "1",
                          "TEMPERATURE": "0", "MAX_NEW_TOKENS": "24", "BATCH_SIZE": "4", "OUTPUT_DIR": str(eval_dir)},
         "--teacher", model, timeout=300)
    detail = json.load(open(eval_dir / "eval_arith.json"))
    m = detail["metrics"]
    texts = [c for r in detail["records"] for c in r["completions"]]
    assert len(texts) == 4 and all(t.strip() for t in texts)  # real text, not empty strings
    for r in detail["records"]:
        assert r["rewards"] == [math_reward(c, r["answer"]) for c in r["completions"]]
        for length, truncated in zip(r["lengths"], r["truncated"]):
            assert 1 <= length <= 24 and (not truncated or length == 24)
    # generations can stop at <|im_end|>: at least one ended its turn before the limit
    assert m["eot_rate"] > 0 and any(not t for r in detail["records"] for t in r["truncated"])
    assert any(length < 24 for r in detail["records"] for length in r["lengths"])
    # the student was trained 2 steps at lr 1e-5 from the teacher itself: its NLL of the teacher's text stays small
    assert 0 <= m["teacher_nll"] < 1.0
    for key in ("mean@1", "pass@1", "mean_length", "eot_rate", "clipped_ratio", "distinct_1", "teacher_nll"):
        assert math.isfinite(m[key]), key

    # 4. the comparison reads the run, its evaluation and its validation records
    os.makedirs(out / "eval", exist_ok=True)
    for name in os.listdir(eval_dir):
        os.replace(eval_dir / name, out / "eval" / name)
    cmp = subprocess.run([sys.executable, "-m", "opsd.compare", str(out), "--out", str(tmp_path / "cmp")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    table = cmp.stdout
    assert "arith mean@1" in table and "arith end-of-turn" in table and "| soft_or | 0.5 |" in table
    row = json.load(open(tmp_path / "cmp" / "comparison.json"))["runs"][0]
    assert row["collapse"] == {} and row["eval"]["arith"]["eot_rate"] == pytest.approx(m["eot_rate"])
