"""Run presets (opsd.presets, run_scripts/presets/*.env), accelerate configs and the GPU check script."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from opsd import plan as P
from opsd import presets as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET_DIR = os.path.join(ROOT, "run_scripts", "presets")
ACCEL_DIR = os.path.join(ROOT, "run_scripts", "accelerate")
TABLE, MISSING = S.presets()


def env_files() -> list[str]:
    return sorted(f for f in os.listdir(PRESET_DIR) if f.endswith(".env") and f != "upstream.env")


def sourced_env(path: str, preset_env: dict | None = None) -> dict[str, str]:
    """What `set -a; source FILE; set +a` exports in an otherwise empty bash."""
    out = subprocess.run(["env", "-i", "bash", "-c", f"set -euo pipefail; set -a; source {shlex.quote(path)}; set +a; "
                          "env -0"], capture_output=True, text=True, check=True)
    env = dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)
    for key in ("PWD", "SHLVL", "_", "OLDPWD"):
        env.pop(key, None)
    return env


def script_variables() -> set[str]:
    names = set()
    for script in ("train_opd.sh", "train_tip.sh"):
        text = open(os.path.join(ROOT, "run_scripts", script)).read()
        names |= set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text))
    return names


def test_every_pair_has_a_paper_preset_and_each_gpu_size_a_preset_or_a_reason():
    for pair in S.PAIRS:
        assert f"{pair}-paper" in TABLE
        for gpu in S.SINGLE_GPU_SIZES:
            name = f"{pair}-lora-{gpu}gb"
            assert name in TABLE or any(m.startswith(f"{name}: nothing fits") for m in MISSING), name
    # the 70B teacher cannot share a 24 GiB GPU whatever is quantized or offloaded
    assert "llama-70b-to-8b-lora-24gb" not in TABLE


def test_env_files_match_the_table():
    assert env_files() == sorted(f"{name}.env" for name in TABLE)
    for name, preset in TABLE.items():
        with open(os.path.join(PRESET_DIR, f"{name}.env")) as f:
            assert f.read() == preset.render(), f"{name}.env is stale: run `python -m opsd.presets write`"
    with open(os.path.join(PRESET_DIR, "README.md")) as f:
        assert f.read() == S.readme(), "README.md is stale: run `python -m opsd.presets write`"


@pytest.mark.parametrize("name", sorted(TABLE))
def test_env_file_parses_names_only_script_variables_and_fits(name):
    preset = TABLE[name]
    env = sourced_env(os.path.join(PRESET_DIR, f"{name}.env"))
    assert set(env) == set(preset.env)
    unknown = set(env) - script_variables()
    assert not unknown, f"{name} sets variables train_opd.sh/train_tip.sh never read: {sorted(unknown)}"
    assert env["MODEL_PATH"].startswith("/models/") and env["TEACHER_MODEL_PATH"].startswith("/models/")
    # the papers' hyperparameters
    assert env["LEARNING_RATE"] == "1e-6" and env["ROLLOUT_N"] == "16" and env["OPD_CHUNK_SIZE"] == "512"
    assert env["OPD_LOSS_TYPE"] == "reverse_kl" and "--lr_scheduler_type cosine" in env["EXTRA_ARGS"]
    # train_opd.sh's batch arithmetic holds: TRAIN_BATCH_SIZE prompts x ROLLOUT_N completions per step
    micro, nproc, prompts = (int(env[k]) for k in ("PPO_MICRO_BATCH_SIZE_PER_GPU", "NPROC", "TRAIN_BATCH_SIZE"))
    assert (prompts * int(env["ROLLOUT_N"])) % (micro * nproc) == 0 and prompts % nproc == 0
    assert prompts * int(env["ROLLOUT_N"]) == preset.plan.rollout_batch
    # the planner says it fits, with and without a selector, from the file's own settings
    teacher, student = S.PAIRS[preset.pair][:2]
    for ratio in (None, 0.1, 1.0):
        plan = S.plan_from_env(env, student, teacher, preset.gpu_memory_gb, selector_ratio=ratio)
        est = P.estimate(plan)
        assert est.fits, f"{name} needs {est.total / P.GiB:.1f} GiB with selector {ratio}"
    if int(env["MAX_RESPONSE_LENGTH"]) < 8192:
        assert any("reduced" in n for n in preset.notes)
    if name.endswith("-paper"):
        assert env["MAX_RESPONSE_LENGTH"] == "8192" and "--use_peft" not in env["EXTRA_ARGS"]
        assert env["ACCELERATE_CONFIG"] == "run_scripts/accelerate/zero3.yaml" and int(env["NPROC"]) > 1
    else:
        assert env["NPROC"] == "1" and "--use_peft true" in env["EXTRA_ARGS"]


def test_placeholders_keep_values_already_set(tmp_path):
    path = os.path.join(PRESET_DIR, "qwen3-8b-to-4b-lora-80gb.env")
    out = subprocess.run(["env", "-i", "MODEL_PATH=/mine", "bash", "-c",
                          f"set -a; source {shlex.quote(path)}; set +a; echo $MODEL_PATH $TEACHER_MODEL_PATH"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["/mine", "/models/Qwen3-8B"]


def test_extra_args_parse_with_the_training_cli():
    """Every preset's flags are real flags of `python -m opsd.train` and land where the planner assumed."""
    from opsd.train import build_parser

    distinct = {(p.env["EXTRA_ARGS"], p.env["PPO_MICRO_BATCH_SIZE_PER_GPU"]): p for p in TABLE.values()}
    assert len(distinct) > 3
    for preset in distinct.values():
        env = preset.env
        argv = ["--model_name_or_path", "s", "--teacher_model_name_or_path", "t", "--output_dir", "/tmp/x",
                "--per_device_train_batch_size", env["PPO_MICRO_BATCH_SIZE_PER_GPU"], "--rollout_n", env["ROLLOUT_N"],
                "--max_completion_length", env["MAX_RESPONSE_LENGTH"], "--bf16", "false",
                *shlex.split(env["EXTRA_ARGS"])]
        _, model_args, train_args, _ = build_parser().parse_args_and_config(args=argv)
        assert train_args.lr_scheduler_type == "cosine" and train_args.gradient_checkpointing
        assert model_args.use_peft == preset.plan.lora
        assert model_args.load_in_4bit == (preset.plan.student_quant == "4bit")
        assert model_args.load_in_8bit == (preset.plan.student_quant == "8bit")
        placement = preset.plan.teacher_placement
        assert train_args.teacher_offload == placement.startswith("offload")
        assert (train_args.teacher_quantization or "none") == (placement.split("-")[-1]
                                                                if placement not in ("gpu", "offload") else "none")


def test_one_preset_through_train_tip_sh_dry_run(tmp_path):
    from support import save_pair

    path = os.path.join(PRESET_DIR, "qwen3-8b-to-4b-lora-24gb.env")
    student, teacher = save_pair(str(tmp_path))  # the dry run checks the model directories and tokenizers
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    paths = f"MODEL_PATH={student} TEACHER_MODEL_PATH={teacher} DATA_DIR={tmp_path / 'd'} "
    out = subprocess.run(["bash", "-c", f"{paths}; set -a; source {shlex.quote(path)}; set +a; DTYPE=float32 "
                          f"DRY_RUN=1 SELECTOR=q3 RATIO=0.1 PYTHON_BIN={shlex.quote(sys.executable)} "
                          "bash run_scripts/train_tip.sh"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--teacher_offload true" in out.stdout and "--max_completion_length 4096" in out.stdout
    assert '"teacher_quantization": "8bit"' in out.stdout and '"selector": "q3"' in out.stdout


def test_presets_cli(capsys):
    assert S.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in TABLE) and "nothing fits" in listed
    assert S.main(["show", "qwen3-4b-to-1.7b-lora-48gb"]) == 0
    assert capsys.readouterr().out == TABLE["qwen3-4b-to-1.7b-lora-48gb"].render()
    assert S.main(["show", "llama-70b-to-8b-lora-24gb"]) == 2
    assert "nothing fits" in capsys.readouterr().err


def test_write_regenerates_identical_files(tmp_path):
    paths = S.write(str(tmp_path))
    for path in paths:
        with open(path) as new, open(os.path.join(PRESET_DIR, os.path.basename(path))) as old:
            assert new.read() == old.read()


# ------------------------------------------------------------------------------------------------------------------
# accelerate configs and the GPU check script


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("zero3", "DEEPSPEED"), ("fsdp2", "FSDP")])
def test_accelerate_configs_load_and_use_known_keys(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = os.path.join(ACCEL_DIR, f"{name}.yaml")
    config = load_config_from_file(path)
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    assert config.num_machines == 1
    raw = yaml.safe_load(open(path))
    launch_flags = {action.dest for action in launch_command_parser()._actions}
    for section in ("deepspeed_config", "fsdp_config"):
        unknown = set(raw.get(section, {})) - launch_flags
        assert not unknown, f"{name}.yaml: accelerate launch does not know {sorted(unknown)}"
    if name == "zero3":
        assert raw["deepspeed_config"]["zero_stage"] == 3
        assert raw["deepspeed_config"]["offload_optimizer_device"] == "none"
    if name == "fsdp2":
        assert raw["fsdp_config"]["fsdp_version"] == 2
        assert raw["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_gpu_check_script_is_valid_bash_and_dry_runs(tmp_path):
    script = os.path.join(ROOT, "run_scripts", "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    out = subprocess.run(["bash", script, "--dry-run", "--no_4bit", "--teachers", "qwen3-4b"], cwd=ROOT,
                         env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "full-qwen3-4b-tbf16-all" in out.stdout and (tmp_path / "gpu_check.json").exists()
