"""An upstream launch line means what it meant upstream (issue 19 item 1), checked through the run scripts with
DRY_RUN=1 on the tiny CPU pair: caller-relative paths, the GPU count from nvidia-smi, PYTORCH_ALLOC_CONF, CPU threads,
validation at the last step, eval_math.sh's upstream sampling, OPD_MAX_LENGTH, true/false spellings, run names that
follow EXTRA_ARGS, upstream's agent variables and VAL_* with validation off named. The loss on raw logits is
tests/test_loss_temperature.py; user mistakes are tests/test_user_errors.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from support import add_chat_template, save_pair, write_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sem")
    student, teacher = save_pair(str(root))
    add_chat_template(student, teacher)
    data = write_prompts(str(root / "p.jsonl"), n=8)
    return dict(root=root, student=student, teacher=teacher, data=data)


def run(script, env, cwd=ROOT, timeout=180, keep_omp=False):
    full = {**os.environ, "PYTHON_BIN": sys.executable, **env}
    if not keep_omp:
        full.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(["bash", os.path.join(ROOT, "run_scripts", script)], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


def config(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("\n{") + 1:])


def base(f, tmp_path, **extra):
    env = dict(MODEL_PATH=f["student"], TEACHER_MODEL_PATH=f["teacher"], TRAIN_FILE=f["data"],
               OUTPUT_ROOT=str(tmp_path / "out"), TRAIN_BATCH_SIZE="4", PPO_MICRO_BATCH_SIZE_PER_GPU="2",
               DRY_RUN="1")
    env.update(extra)
    return env


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture()
def fake_gpus(tmp_path):
    """A PATH with an nvidia-smi listing two GPUs, and an interpreter that prints (instead of running) the
    accelerate launch / opsd.evaluate command with the environment the scripts set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "nvidia-smi", "#!/bin/bash\n"
                'case "$*" in *-L*|*--list-gpus*) echo "GPU 0: Fake (UUID: a)"; echo "GPU 1: Fake (UUID: b)" ;;\n'
                '*) echo "name, memory.total [MiB], driver_version"; echo "Fake, 81920 MiB, 1" ;; esac\n')
    python = _executable(bin_dir / "python-wrapper", "#!/bin/bash\n"
                         'for a in "$@"; do case "$a" in accelerate.commands.launch|opsd.evaluate)\n'
                         '  echo "LAUNCH PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-unset} OMP=${OMP_NUM_THREADS:-unset} '
                         '$*"; exit 0 ;; esac; done\n'
                         f'exec {sys.executable} "$@"\n')
    return dict(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON_BIN=python)


def test_paths_are_relative_to_the_callers_directory(pair_files, tmp_path):
    f = pair_files
    work = f["root"]  # the user runs the script from here with paths relative to it
    env = base(f, tmp_path, MODEL_PATH="student", TEACHER_MODEL_PATH="teacher", TRAIN_FILE="p.jsonl",
               OUTPUT_ROOT="runs", VAL_FILES="p.jsonl", TEST_FREQ="1")
    opd = config(run("train_opd.sh", env, cwd=str(work)))
    assert opd["ModelConfig"]["model_name_or_path"] == f["student"]
    assert opd["OPDConfig"]["teacher_model_name_or_path"] == f["teacher"]
    assert opd["DataArguments"]["train_file"] == f["data"]
    assert opd["OPDConfig"]["output_dir"].startswith(str(work / "runs") + "/")
    assert opd["ValidationArguments"]["val_files"] == [f["data"]]
    # named [NAME=]FILE entries too, and eval_math.sh's paths
    named = config(run("train_opd.sh", dict(env, VAL_FILES="mine=p.jsonl"), cwd=str(work)))
    assert named["ValidationArguments"]["val_files"] == [f"mine={f['data']}"]


def test_gpu_count_alloc_conf_and_nproc_override(pair_files, tmp_path, fake_gpus):
    f = pair_files
    result = run("train_opd.sh", base(f, tmp_path, **fake_gpus))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NPROC=2: one process per GPU nvidia-smi lists" in result.stderr
    launch = [line for line in result.stdout.splitlines() if line.startswith("LAUNCH")]
    assert len(launch) == 1 and "--num_processes 2" in launch[0]
    assert "PYTORCH_ALLOC_CONF=expandable_segments:True" in launch[0]
    assert "--dtype bfloat16" in launch[0] and "--temperature_in_loss false" in launch[0]
    mine = run("train_opd.sh", base(f, tmp_path, NPROC="1", DTYPE="float32", PYTORCH_ALLOC_CONF="gc:0.6",
                                    **fake_gpus))
    assert "NPROC=" not in mine.stderr  # the user's choice, nothing to note
    opd = config(mine)["OPDConfig"]
    assert opd["gradient_accumulation_steps"] == 2  # 4 prompts / (2 per pass x 1 process)


def test_cpu_threads_per_process_are_set_and_said(pair_files, tmp_path):
    env = base(pair_files, tmp_path)
    env.pop("OMP_NUM_THREADS", None)
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    result = subprocess.run(["bash", "run_scripts/train_opd.sh"], cwd=ROOT, capture_output=True, text=True,
                            timeout=180, env={**clean, "PYTHON_BIN": sys.executable, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    import re

    said = re.search(r"OMP_NUM_THREADS=(\d+) torch threads per process \((\d+) cores, load (\d+), 1 process\(es\)\)",
                     result.stderr)
    assert said, result.stderr[-2000:]
    threads, cores, load = map(int, said.groups())
    assert cores == len(os.sched_getaffinity(0)) or cores == os.cpu_count()
    assert threads == max(1, cores - load)  # the idle cores, at least one
    kept = run("train_opd.sh", dict(env, OMP_NUM_THREADS="1"), keep_omp=True)
    assert "OMP_NUM_THREADS=" not in kept.stderr


def test_validation_at_the_last_step_when_test_freq_is_0(pair_files, tmp_path):
    f = pair_files
    val = config(run("train_opd.sh", base(f, tmp_path, VAL_FILES=f["data"])))["ValidationArguments"]
    assert val["test_freq"] == 0 and val["val_at_end"] is True and val["val_files"] == [f["data"]]
    assert val["stop_on_collapse"] is False
    stop = config(run("train_opd.sh", base(f, tmp_path, VAL_FILES=f["data"], STOP_ON_COLLAPSE="1")))
    assert stop["ValidationArguments"]["stop_on_collapse"] is True
    off = config(run("train_opd.sh", base(f, tmp_path, VAL_FILES=f["data"], VAL_AT_END="no")))
    assert off["ValidationArguments"]["val_at_end"] is False and off["ValidationArguments"]["val_files"] is None
    none = run("train_opd.sh", base(f, tmp_path, VAL_TEMPERATURE="0.5", VAL_BATCH_SIZE="8", STOP_ON_COLLAPSE="1"))
    assert "no validation files" in none.stderr
    for name in ("VAL_TEMPERATURE", "VAL_BATCH_SIZE", "STOP_ON_COLLAPSE"):
        assert f"{name} is set but validation is off" in none.stderr


def test_test_freq_0_validates_once_at_the_last_step(pair_files, tmp_path):
    """A 2-step run with TEST_FREQ=0 and validation files: validated at step 2 only, as upstream's is_last."""
    f = pair_files
    env = base(f, tmp_path, DRY_RUN="0", VAL_FILES=f["data"], MAX_STEPS="2", VAL_N="1", VAL_LIMIT="1",
               MAX_RESPONSE_LENGTH="2", MAX_PROMPT_LENGTH="16", VAL_BATCH_SIZE="4", SAVE_FREQ="0",
               OUTPUT_DIR=str(tmp_path / "run"), EXTRA_ARGS="--use_cpu true --gradient_checkpointing false")
    result = run("train_opd.sh", env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert [h["step"] for h in summary["log_history"] if "val/p/mean@1" in h] == [2]


def test_eval_line_samples_as_upstream_and_paper_preset(pair_files, tmp_path, fake_gpus):
    f = pair_files
    env = dict(MODEL_PATH=f["student"], DATA_FILES=f["data"], TEMPERATURE="1.0", TOP_P="1.0", **fake_gpus)
    result = run("eval_math.sh", env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("LAUNCH"))
    for flag in ("--k 16", "--temperature 0.7", "--top_p 0.8", "--top_k 20", "--max_new_tokens 16384",
                 "--max_prompt_length 2048", "--filter_overlong_prompts", "--no-enable_thinking", "--reward math"):
        assert flag in line, flag
    # the training rollouts' TEMPERATURE/TOP_P do not change the evaluation (upstream's eval ignores them)
    assert "TEMPERATURE is the training rollouts' sampling upstream" in result.stderr
    paper = run("eval_math.sh", dict(env, PRESET="paper", VAL_N="4"))
    line = next(line for line in paper.stdout.splitlines() if line.startswith("LAUNCH"))
    for flag in ("--k 4", "--temperature 1.0", "--top_p 1.0", "--top_k 0", "--max_new_tokens 8192"):
        assert flag in line, flag
    mine = run("eval_math.sh", dict(env, VAL_TEMPERATURE="0.6", MAX_RESPONSE_LENGTH="64", ENABLE_THINKING="true",
                                    FILTER_OVERLONG_PROMPTS="off"))
    line = next(line for line in mine.stdout.splitlines() if line.startswith("LAUNCH"))
    assert "--temperature 0.6" in line and "--max_new_tokens 64" in line and "--enable_thinking" in line
    assert "--filter_overlong_prompts" not in line and "--no-enable_thinking" not in line


def test_eval_filters_overlong_prompts_as_upstream(pair_files, tmp_path):
    from opsd.core.models import load_causal_lm, load_tokenizer
    from opsd.evaluate import evaluate, load_benchmark

    f = pair_files
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in ("1+0=", "12345678+1=")))
    tokenizer, model = load_tokenizer(f["student"]), load_causal_lm(f["student"])
    data = load_benchmark(str(path))
    out = evaluate(model, tokenizer, data, k=1, max_new_tokens=1, max_prompt_length=5, filter_overlong_prompts=True,
                   progress=False)
    assert out["metrics"]["filtered_prompts"] == 1 and [r["prompt"] for r in out["records"]] == ["1+0="]
    kept = evaluate(model, tokenizer, data, k=1, max_new_tokens=1, max_prompt_length=5, progress=False)
    assert kept["metrics"]["filtered_prompts"] == 0 and len(kept["records"]) == 2


def test_opd_max_length_accepts_upstream_valid_lines(pair_files, tmp_path):
    f = pair_files
    fits = config(run("train_opd.sh", base(f, tmp_path, OPD_MAX_LENGTH="16384", MAX_PROMPT_LENGTH="2048",
                                           MAX_RESPONSE_LENGTH="8192")))["OPDConfig"]
    assert fits["max_prompt_length"] == 2048 and fits["max_completion_length"] == 8192  # generation untouched
    long = config(run("train_opd.sh", base(f, tmp_path, MAX_PROMPT_LENGTH="16384", MAX_RESPONSE_LENGTH="16384")))
    assert long["OPDConfig"]["max_prompt_length"] == 16384


def test_true_false_spellings(pair_files, tmp_path):
    f = pair_files
    result = run("train_opd.sh", base(f, tmp_path, DRY_RUN="true", COLD_START="Yes"))
    config(result)  # a dry run, not a training run
    assert "COLD_START=1: the cold start would write" in result.stderr
    off = run("train_opd.sh", base(f, tmp_path, DRY_RUN="on", COLD_START="false", OVERWRITE="no"))
    assert config(off)["DataArguments"]["overwrite"] is False and "cold start" not in off.stderr


def test_run_name_describes_the_run_extra_args_train(pair_files, tmp_path):
    f = pair_files
    opd = config(run("train_opd.sh", base(f, tmp_path, EXTRA_ARGS="--learning_rate 1e-5 --loss_type forward_kl "
                                                                  "--gradient_accumulation_steps 4")))["OPDConfig"]
    name = os.path.basename(opd["output_dir"])
    assert "-OPD-forward_kl-" in name and "-lr1e-5-" in name and name.endswith("-bs8-n1"), name
    assert opd["loss_type"] == "forward_kl" and opd["learning_rate"] == 1e-5
    assert opd["gradient_accumulation_steps"] == 4


def test_agent_script_disabled_tools_are_accepted(pair_files, tmp_path):
    config(run("train_opd.sh", base(pair_files, tmp_path, ENABLE_TOOLS="False")))
