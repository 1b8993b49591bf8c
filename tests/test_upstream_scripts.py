"""Upstream launch lines (HJSang/OPSD_OnPolicyDistillation's variables) through run_scripts/*.sh on tiny local
models: prompts x completions per step, raw DATA_DIR preparation, the run name, thinking, in-training validation,
vLLM wiring, refusals, --help, multi-process launch with the resolved interpreter, and the LoRA recipe."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from support import add_chat_template, save_pair, write_prompts, write_upstream_raw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_opd.sh", "train_tip.sh", "train_lora.sh", "eval_math.sh", "prepare_data.sh", "setup.sh", "test.sh")
CPU = "--use_cpu true --gradient_checkpointing false"


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    student, teacher = save_pair(str(root))
    add_chat_template(student, teacher)
    return student, teacher


def run(script, env, timeout=300, args=()):
    full = dict(os.environ, PYTHON_BIN=sys.executable, OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", f"run_scripts/{script}", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def dry_config(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("\n{") + 1:])


def test_upstream_launch_line_trains_8_prompts_x_4_and_validates_every_2_steps(chat_pair, tmp_path):
    student, teacher = chat_pair
    raw = write_upstream_raw(str(tmp_path / "raw"))
    result = run("train_opd.sh", dict(
        MODEL_PATH=student, TEACHER_MODEL_PATH=teacher, DATA_DIR=raw, OUTPUT_ROOT=str(tmp_path / "outputs"),
        RUN_ID="t1", TRAIN_BATCH_SIZE="8", ROLLOUT_N="4", TEST_FREQ="2", VAL_BEFORE_TRAIN="True", MAX_STEPS="4",
        PPO_MICRO_BATCH_SIZE_PER_GPU="8", MAX_PROMPT_LENGTH="24", MAX_RESPONSE_LENGTH="4", VAL_N="2", VAL_LIMIT="2",
        SAVE_FREQ="2", GPU_MEMORY_UTIL="0.7", PPO_MINI_BATCH_SIZE="64", EXTRA_ARGS=CPU))
    assert result.returncode == 0, result.stderr[-3000:]
    # upstream variables without an effect here are named, not silently dropped
    assert "PPO_MINI_BATCH_SIZE=64 has no effect" in result.stderr and "GPU_MEMORY_UTIL=0.7" in result.stderr
    # upstream's experiment name under OUTPUT_ROOT (teacher named by its parent directory, as upstream)
    name = f"student-t1-OPD-reverse_kl-teacher-{os.path.basename(os.path.dirname(teacher))}-thinking-lr1e-6-bs8-n4"
    out = tmp_path / "outputs" / name
    summary = json.loads((out / "run_summary.json").read_text())
    steps = [h for h in summary["log_history"] if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4]
    assert all(h["rollout_prompts"] == 8 and h["rollout_completions"] == 32 for h in steps)
    assert all(0.0 <= h["rollout_accuracy"] <= 1.0 for h in steps)
    val_steps = [h["step"] for h in summary["log_history"] if "val/math500/mean@2" in h]
    assert val_steps == [0, 2, 4]  # before training, then every TEST_FREQ steps
    for h in summary["log_history"]:
        if "val/math500/mean@2" in h:
            assert {f"val/{b}/{m}" for b in ("math500", "aime24", "aime25") for m in ("mean@2", "pass@2")} <= set(h)
    records = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4] and records[0]["settings"]["temperature"] == 0.6
    config = summary["config"]
    assert config["OPDConfig"]["gradient_accumulation_steps"] == 4  # 8 x 4 completions / 8 per pass
    assert config["OPDConfig"]["lr_scheduler_type"] == "constant" and config["OPDConfig"]["weight_decay"] == 0.1
    # DATA_DIR was upstream's raw root: prepared with upstream's wording and its shuffled 80/20 split (seed 42)
    prepared = tmp_path / "raw" / "opsd_processed"
    train = [json.loads(line) for line in (prepared / "train.jsonl").read_text().splitlines()]
    order = np.random.default_rng(42).permutation(20)
    assert [r["answer"] for r in train] == [str(2 * i) for i in order[:16]]
    assert train[0]["prompt"][0]["content"].endswith("Let's think step by step and output the final answer within "
                                                     "\\boxed{}.")
    assert "Solve the following" not in train[0]["prompt"][0]["content"]
    aime24 = [json.loads(line) for line in (prepared / "val_aime24.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in aime24] == ["2", "3", "4"]  # the boxed result of the worked solution
    assert len((prepared / "val_dapo.jsonl").read_text().splitlines()) == 4
    card = (out / "README.md").read_text()
    assert "full-token OPD" in card and "2306.13649" in card


def test_rerun_is_refused_resume_of_a_finished_run_exits_0(pair, tmp_path):
    student, teacher = pair
    data = write_prompts(str(tmp_path / "p.jsonl"))
    env = dict(MODEL_PATH=student, TEACHER_MODEL_PATH=teacher, TRAIN_FILE=data, OUTPUT_DIR=str(tmp_path / "run"),
               TRAIN_BATCH_SIZE="4", PPO_MICRO_BATCH_SIZE_PER_GPU="4", MAX_STEPS="2", SAVE_FREQ="1",
               MAX_RESPONSE_LENGTH="4", EXTRA_ARGS=CPU)
    assert run("train_opd.sh", env).returncode == 0
    again = run("train_opd.sh", env)
    assert again.returncode != 0 and "RESUME=latest" in again.stderr and "OVERWRITE=1" in again.stderr
    finished = run("train_opd.sh", dict(env, RESUME="latest"))
    assert finished.returncode == 0 and "is finished" in finished.stdout
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["global_step"] == 2 and not (tmp_path / "run" / "checkpoint-3").exists()
    fresh = run("train_opd.sh", dict(env, OVERWRITE="1", MAX_STEPS="1"))
    assert fresh.returncode == 0
    assert sorted(os.listdir(tmp_path / "run")).count("checkpoint-2") == 0  # the old run's checkpoints are gone


def test_resume_latest_skips_an_interrupted_checkpoint(pair, tmp_path):
    from opsd.train import is_complete_checkpoint, latest_complete_checkpoint, main
    from support import base_args

    student, teacher = pair
    data = write_prompts(str(tmp_path / "p.jsonl"))
    out = str(tmp_path / "run")
    main(base_args(student, teacher, data, out, steps=2, save_strategy="steps", save_steps=1))
    # a kill during the save of checkpoint-3: weights written, trainer_state.json (written last) missing
    broken = os.path.join(out, "checkpoint-3")
    os.makedirs(broken)
    with open(os.path.join(broken, "model.safetensors"), "wb") as f:
        f.write(b"partial")
    assert not is_complete_checkpoint(broken) and is_complete_checkpoint(os.path.join(out, "checkpoint-2"))
    assert latest_complete_checkpoint(out) == os.path.join(out, "checkpoint-2")
    summary = main(base_args(student, teacher, data, out, steps=3, save_strategy="steps", save_steps=1,
                             resume_from_checkpoint="latest"))
    assert [h["step"] for h in summary["log_history"] if "loss" in h] == [1, 2, 3]
    assert is_complete_checkpoint(broken)  # rewritten by the resumed run


def test_help_lists_every_variable_the_script_reads():
    for script in SCRIPTS:
        result = run(script, {}, timeout=60, args=("--help",))
        assert result.returncode == 0, (script, result.stderr)
        assert "Variables" in result.stdout, script
    text = open(os.path.join(ROOT, "run_scripts", "train_opd.sh")).read()
    body = text[text.index("set -euo pipefail"):]
    internal = {"OPSD_ROOT", "PYTHON", "DRY", "THINKING", "FORCE_THINKING", "RAW_DAPO", "PREPARED", "VAL_DIR",
                "MICRO", "COMPLETIONS", "PER_PASS", "GRAD_ACC", "THINK_TAG", "TEACHER_NAME", "VAL_BEFORE", "GPUS",
                "VLLM", "SAVE", "ENTRY", "EXP_TAG", "SAVE_STEPS", "BASH_SOURCE"}
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", body)) - internal
    header = text[:text.index("set -euo pipefail")]
    listed = set(re.findall(r"^#\s+([A-Z][A-Z0-9_]+)\s", header, flags=re.M))
    assert read <= listed, sorted(read - listed)


@pytest.mark.parametrize("change, message", [
    (dict(MODEL_PATH="/nonexistent/student"), "MODEL_PATH"),
    (dict(TEACHER_MODEL_PATH="/nonexistent/teacher"), "TEACHER_MODEL_PATH"),
    (dict(TRAIN_FILE="/nonexistent/p.jsonl"), "TRAIN_FILE"),
    (dict(TRAIN_FILE="", DATA_DIR="/nonexistent/data"), "DATA_DIR"),
    (dict(ROLLOUT_N="3", TRAIN_BATCH_SIZE="1"), "ROLLOUT_N"),
    (dict(ROLLOUT_N="0"), "ROLLOUT_N"),
    (dict(TRAIN_BATCH_SIZE="3", NPROC="2"), "NPROC"),
    (dict(TP_SIZE="2"), "USE_VLLM=1"),
    (dict(TEST_FREQ="2"), "VAL_FILES"),
    (dict(VAL_FILES="/nonexistent/v.jsonl", TEST_FREQ="2"), "VAL_FILES"),
    (dict(ENABLE_THINKING="maybe"), "ENABLE_THINKING"),
    (dict(VLLM_MODE="remote", USE_VLLM="0", TP_SIZE="3"), "TP_SIZE"),
])
def test_dry_run_fails_at_start_naming_the_variable(pair, tmp_path, change, message):
    student, teacher = pair
    env = dict(MODEL_PATH=student, TEACHER_MODEL_PATH=teacher, TRAIN_FILE=write_prompts(str(tmp_path / "p.jsonl")),
               OUTPUT_DIR=str(tmp_path / "run"), TRAIN_BATCH_SIZE="4", PPO_MICRO_BATCH_SIZE_PER_GPU="2", DRY_RUN="1")
    env.update(change)
    result = run("train_opd.sh", env, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_dry_run_resolves_upstream_semantics(pair, tmp_path):
    student, teacher = pair
    base = dict(MODEL_PATH=student, TEACHER_MODEL_PATH=teacher, TRAIN_FILE=write_prompts(str(tmp_path / "p.jsonl")),
                OUTPUT_ROOT=str(tmp_path / "o"), DRY_RUN="1", TRAIN_BATCH_SIZE="8", ROLLOUT_N="4",
                PPO_MICRO_BATCH_SIZE_PER_GPU="2", TOP_K="-1", TEMPERATURE="0.9", TOP_P="0.95", SAVE_FREQ="7")
    opd = dry_config(run("train_opd.sh", base))["OPDConfig"]
    assert opd["gradient_accumulation_steps"] == 16 and opd["rollout_n"] == 4  # 8 prompts x 4 / 2 per pass
    assert (opd["top_k"], opd["temperature"], opd["top_p"], opd["save_steps"]) == (0, 0.9, 0.95, 7)
    assert opd["chat_template_kwargs"] in (None, {})  # not a Qwen name: nothing passed, as upstream
    assert opd["output_dir"].startswith(str(tmp_path / "o") + "/student-local-OPD-reverse_kl-")
    qwen = dry_config(run("train_opd.sh", dict(base, MODEL_NAME="Qwen3-1.7B", ENABLE_THINKING="True")))
    assert qwen["OPDConfig"]["chat_template_kwargs"] == {"enable_thinking": False}
    forced = dry_config(run("train_opd.sh", dict(base, MODEL_NAME="Qwen3-1.7B", FORCE_ENABLE_THINKING="1")))
    assert forced["OPDConfig"]["chat_template_kwargs"] == {"enable_thinking": True}
    val = dict(base, VAL_FILES=base["TRAIN_FILE"], TEST_FREQ="3")
    assert dry_config(run("train_opd.sh", val))["ValidationArguments"]["val_temperature"] == 0.6
    config = dry_config(run("train_opd.sh", dict(val, ENABLE_THINKING="False", OPD_REWARD_BETA="0.5",
                                                 OPD_REWARD_WEIGHTING="upstream", REWARD_FUNCTION="math_dapo")))
    nothink, weighted = config["ValidationArguments"], config["OPDConfig"]
    assert nothink["val_temperature"] == 0.7 and nothink["test_freq"] == 3 and nothink["val_top_k"] == 20
    assert (weighted["reward_beta"], weighted["reward_weighting"], weighted["reward_function"]) == (
        0.5, "upstream", "math_dapo")
    assert "-rwbeta0.5-" in weighted["output_dir"] and "-nothink-" in weighted["output_dir"]


def test_vllm_variables_map_to_trl_and_missing_vllm_is_a_clear_error(pair, tmp_path):
    import importlib.util

    student, teacher = pair
    base = dict(MODEL_PATH=student, TEACHER_MODEL_PATH=teacher, TRAIN_FILE=write_prompts(str(tmp_path / "p.jsonl")),
                OUTPUT_DIR=str(tmp_path / "run"), DRY_RUN="1", TRAIN_BATCH_SIZE="4", PPO_MICRO_BATCH_SIZE_PER_GPU="2")
    if importlib.util.find_spec("vllm") is None:
        missing = run("train_opd.sh", dict(base, USE_VLLM="1"), timeout=60)
        assert missing.returncode == 2 and "USE_VLLM" in missing.stderr and "vllm" in missing.stderr
        from opsd.train import main
        from support import base_args

        with pytest.raises(SystemExit, match="vLLM is not installed"):
            main(base_args(student, teacher, base["TRAIN_FILE"], base["OUTPUT_DIR"], use_vllm="true",
                           dry_run="true"))
        auto = dry_config(run("train_opd.sh", dict(base, USE_VLLM="auto")))
        assert auto["OPDConfig"]["use_vllm"] is False
    # with a vllm package importable (a stand-in, nothing of it runs in a dry run) the variables reach TRL's config
    fake = tmp_path / "fake"
    (fake / "vllm").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text("")
    env = dict(base, USE_VLLM="1", VLLM_MODE="server", TP_SIZE="2", GPU_MEMORY_UTIL="0.55",
               VLLM_SERVER_URL="http://localhost:8000", PYTHONPATH=f"{fake}:{ROOT}")
    opd = dry_config(run("train_opd.sh", env))["OPDConfig"]
    assert (opd["use_vllm"], opd["vllm_mode"], opd["vllm_tensor_parallel_size"]) == (True, "server", 2)
    assert opd["vllm_gpu_memory_utilization"] == 0.55 and opd["vllm_server_base_url"] == "http://localhost:8000"
    bad = run("train_opd.sh", dict(env, VLLM_MODE="remote"), timeout=60)
    assert bad.returncode == 2 and "VLLM_MODE" in bad.stderr


def test_paper_presets_use_vllm_when_installed():
    text = open(os.path.join(ROOT, "run_scripts", "presets", "qwen3-8b-to-4b-paper.env")).read()
    assert "USE_VLLM=auto" in text
    upstream = open(os.path.join(ROOT, "run_scripts", "presets", "upstream.env")).read()
    for setting in ("TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-256}", "TOTAL_EPOCHS=${TOTAL_EPOCHS:-15}",
                    "MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-2048}", "MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-8192}",
                    "OPD_CHUNK_SIZE=${OPD_CHUNK_SIZE:-256}", "WEIGHT_DECAY=${WEIGHT_DECAY:-0.1}",
                    "LR_SCHEDULER_TYPE=${LR_SCHEDULER_TYPE:-constant}", "DAPO_TRAIN_RATIO=${DAPO_TRAIN_RATIO:-0.8}",
                    "DATA_SEED=${DATA_SEED:-42}", "TEST_FREQ=${TEST_FREQ:-5}"):
        assert setting in upstream, setting


def test_nproc_2_launches_the_resolved_interpreter(pair, tmp_path):
    """NPROC>1 on CPU runs `$PYTHON -m torch.distributed.run` (no torchrun next to a venv needed): a dry run in two
    processes with an interpreter outside any .venv."""
    student, teacher = pair
    result = run("train_opd.sh", dict(MODEL_PATH=student, TEACHER_MODEL_PATH=teacher, VENV=str(tmp_path / "none"),
                                      TRAIN_FILE=write_prompts(str(tmp_path / "p.jsonl")), NPROC="2",
                                      OUTPUT_DIR=str(tmp_path / "run"), DRY_RUN="1", TRAIN_BATCH_SIZE="4",
                                      PPO_MICRO_BATCH_SIZE_PER_GPU="2", MASTER_PORT="29731"), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{sys.executable} -m torch.distributed.run --nproc_per_node 2 --master_port 29731" in result.stdout
    assert result.stdout.count('"OPDConfig"') == 2


def test_eval_script_reads_upstream_variables(chat_pair, tmp_path):
    student, _ = chat_pair
    raw = write_upstream_raw(str(tmp_path / "raw"), n_dapo=2, n_val=2)
    result = run("eval_math.sh", dict(MODEL_PATH=student, DATA_DIR=raw, PRESET="upstream", VAL_N="2", LIMIT="1",
                                      MAX_RESPONSE_LENGTH="3", REWARD_FUNCTION="math_dapo", RUN_ID="r1",
                                      OUTPUT_ROOT=str(tmp_path / "ev"), TRAIN_BATCH_SIZE="64"), args=("--no_progress",))
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.splitlines()[0]
    for flag in ("--k 2", "--temperature 0.7", "--top_p 0.8", "--top_k 20", "--max_new_tokens 3",
                 "--reward math_dapo", "--no-enable_thinking"):
        assert flag in line, flag
    assert "TRAIN_BATCH_SIZE has no effect" in result.stderr
    out = tmp_path / "ev" / "student-eval-boxed-math_dapo-r1"
    summary = json.loads((out / "eval_summary.json").read_text())
    assert set(summary["benchmarks"]) == {"math500", "aime24", "aime25"}
    bad = run("eval_math.sh", dict(MODEL_PATH=student, DATA_DIR=raw, REWARD_FUNCTION="exact"), timeout=60)
    assert bad.returncode == 2 and "REWARD_FUNCTION" in bad.stderr


def test_lora_recipe_plans_trains_resumes_merges_and_evaluates(pair, tmp_path):
    from peft import PeftModel

    from opsd.core.models import load_causal_lm

    student, teacher = pair
    data = write_prompts(str(tmp_path / "p.jsonl"))
    env = dict(MODEL_PATH=student, TEACHER_MODEL_PATH=teacher, TRAIN_FILE=data, OUTPUT_DIR=str(tmp_path / "lora"),
               TRAIN_BATCH_SIZE="2", ROLLOUT_N="2", PPO_MICRO_BATCH_SIZE_PER_GPU="2", MAX_STEPS="1", LORA_R="8",
               MAX_RESPONSE_LENGTH="4", MAX_PROMPT_LENGTH="8", DATA_FILES=data, K="1", MAX_NEW_TOKENS="2",
               LIMIT="1", LEARNING_RATE="1e-2", EXTRA_ARGS="--use_cpu true",
               # the training data directory: eval_math.sh must not take it for upstream's raw benchmark root
               DATA_DIR=str(tmp_path), LORA_TARGETS="q_proj,v_proj")
    result = run("train_lora.sh", env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plan:" in result.stderr and "--use_peft true --lora_r 8" in result.stdout
    # the user's LoRA targets survive the planner
    assert "--lora_target_modules q_proj v_proj" in result.stdout
    assert set(json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["target_modules"]) == {
        "q_proj", "v_proj"}
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").exists() and (out / "merged" / "config.json").exists()
    assert (out / "eval" / "eval_summary.json").exists() and (out / "merged" / "eval" / "eval_summary.json").exists()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        adapter = PeftModel.from_pretrained(load_causal_lm(student), str(out))(input_ids=ids).logits
        merged = load_causal_lm(str(out / "merged"))(input_ids=ids).logits
    torch.testing.assert_close(merged, adapter, rtol=1e-4, atol=1e-5)
    again = run("train_lora.sh", dict(env, RESUME="latest", EVAL="0", MERGE="0"), timeout=300)
    assert again.returncode == 0 and "is finished" in again.stdout
