"""Off-policy cold start end to end on a tiny local pair: run_scripts/cold_start.sh (teacher rollouts -> SFT ->
plain checkpoint) and the python entry point with LoRA and the reward filter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from opsd.cold_start import main
from opsd.core.models import load_causal_lm, load_tokenizer
from support import write_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nll_on(model_dir, rows, tok):
    """Mean next-token NLL of the completions given their prompts (what the SFT phase minimizes)."""
    model = load_causal_lm(model_dir).eval()
    total, count = 0.0, 0
    for row in rows:
        p, c = tok(text=row["prompt"])["input_ids"], tok(text=row["completion"])["input_ids"]
        ids = torch.tensor(p + c)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1], -1)
        total -= float(logp.gather(1, torch.tensor(c)[:, None]).sum())
        count += len(c)
    return total / count


def test_cold_start_script_end_to_end(pair, tmp_path):
    prompts = write_prompts(str(tmp_path / "p.jsonl"), n=6)
    out = tmp_path / "cold"
    env = {**os.environ, "PYTHON_BIN": sys.executable, "MODEL_PATH": pair[0], "TEACHER_MODEL_PATH": pair[1],
           "COLD_START_FILE": prompts, "COLD_START_DIR": str(out), "COLD_START_MAX_NEW_TOKENS": "6",
           "COLD_START_ROLLOUTS": "2", "COLD_START_LR": "1e-2", "COLD_START_MAX_STEPS": "6",
           "COLD_START_BATCH_SIZE": "4", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    run = subprocess.run(["bash", os.path.join(ROOT, "run_scripts", "cold_start.sh"), "--keep_truncated"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "cold_start_summary.json").read_text())
    rows = [json.loads(line) for line in (out / "cold_start_data.jsonl").read_text().splitlines()]
    assert summary["generated"] == 12 and summary["kept"] == len(rows) > 0 and summary["sft_steps"] == 6
    assert summary["kind"] == "opsd.cold_start" and summary["settings"]["rollouts"] == 2  # read by probe_teacher
    assert {"prompt", "completion", "reward"} <= set(rows[0])
    tok = load_tokenizer(str(out))  # a plain checkpoint with its tokenizer: what train_opd.sh's MODEL_PATH needs
    assert not (out / "adapter_config.json").exists()
    # the SFT phase trained the student on the teacher's responses
    assert _nll_on(str(out), rows, tok) < _nll_on(pair[0], rows, tok)


def test_lora_cold_start_writes_a_merged_checkpoint(pair, tmp_path):
    prompts = write_prompts(str(tmp_path / "p.jsonl"), n=4)
    out = tmp_path / "cold"
    assert main(["--teacher", pair[1], "--student", pair[0], "--prompts", prompts, "--output_dir", str(out),
                 "--max_new_tokens", "5", "--keep_truncated", "--lora", "--lora_r", "4", "--learning_rate", "1e-2",
                 "--max_steps", "2", "--per_device_train_batch_size", "2"]) == 0
    assert not (out / "adapter_config.json").exists()
    merged, original = load_causal_lm(str(out)), load_causal_lm(pair[0])
    assert set(merged.state_dict()) == set(original.state_dict())  # no LoRA leftovers
    assert any(not torch.equal(merged.state_dict()[k], v) for k, v in original.state_dict().items())


def test_reward_filter_and_its_errors(pair, tmp_path):
    prompts = write_prompts(str(tmp_path / "p.jsonl"), n=2)
    # random tiny teachers never answer correctly: the filter drops everything and says what to change
    with pytest.raises(SystemExit, match="filter"):
        main(["--teacher", pair[1], "--student", pair[0], "--prompts", prompts, "--output_dir",
              str(tmp_path / "c"), "--max_new_tokens", "4", "--keep_truncated", "--filter_reward"])
    no_answers = tmp_path / "q.jsonl"
    no_answers.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    with pytest.raises(SystemExit):
        main(["--teacher", pair[1], "--student", pair[0], "--prompts", str(no_answers), "--output_dir",
              str(tmp_path / "d"), "--filter_reward"])


def test_train_opd_cold_start_1_runs_both_phases(pair, tmp_path):
    prompts = write_prompts(str(tmp_path / "p.jsonl"), n=8)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHON_BIN": sys.executable, "MODEL_PATH": pair[0], "TEACHER_MODEL_PATH": pair[1],
           "TRAIN_FILE": prompts, "OUTPUT_DIR": str(out), "COLD_START": "1", "COLD_START_MAX_STEPS": "2",
           "COLD_START_ARGS": "--keep_truncated",
           "COLD_START_MAX_NEW_TOKENS": "6", "MAX_RESPONSE_LENGTH": "6", "TRAIN_BATCH_SIZE": "4",
           "PPO_MICRO_BATCH_SIZE_PER_GPU": "4", "MAX_STEPS": "2", "OMP_NUM_THREADS": "1",
           "EXTRA_ARGS": "--use_cpu true --gradient_checkpointing false --save_strategy no"}
    run = subprocess.run(["bash", os.path.join(ROOT, "run_scripts", "train_opd.sh")], env=env, capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "cold_start" / "cold_start_summary.json").exists()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["config"]["ModelConfig"]["model_name_or_path"] == str(out / "cold_start")
    assert len([h for h in summary["log_history"] if "loss" in h]) == 2
