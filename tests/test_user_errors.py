"""Every user mistake of issue 19 item 2 is one `error: ...` line naming the variable, exit status 2, no traceback,
before any model is loaded: through `python -m opsd.train` / `python -m tip_ext.train` (run in-process with runpy,
exactly what `python -m` executes; a real subprocess for a sample) and through the run scripts (DRY_RUN=1)."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import warnings

import pytest

from support import make_model, make_tokenizer, save_pair, write_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    student, teacher = save_pair(str(root))
    data = write_prompts(str(root / "p.jsonl"), n=8)
    return dict(root=root, student=student, teacher=teacher, data=data)


def argv(f, out, **extra):
    args = ["--model_name_or_path", f["student"], "--teacher_model_name_or_path", f["teacher"], "--train_file",
            f["data"], "--output_dir", str(out), "--per_device_train_batch_size", "2", "--gradient_accumulation_steps",
            "2", "--max_completion_length", "4", "--report_to", "none", "--use_cpu", "true", "--dry_run", "true"]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return args


def run_module(module: str, args: list[str], capsys) -> tuple[int, str]:
    """`python -m module args` in this process: (exit status, stderr)."""
    old = sys.argv
    sys.argv = [module, *args]
    code = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def assert_one_error_line(code, err, variable):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and variable in lines[0], err[-2000:]
    assert "Traceback" not in err


def _no_weights(f):
    path = f["root"] / "no_weights"
    if not path.exists():
        shutil.copytree(f["teacher"], path)
        for name in os.listdir(path):
            if name.endswith(".safetensors"):
                os.remove(path / name)
    return str(path)


def _no_config(f):
    path = f["root"] / "no_config"
    path.mkdir(exist_ok=True)
    return str(path)


def _other_tokenizer(f):
    path = f["root"] / "other_tokenizer"
    if not path.exists():
        make_model(len(make_tokenizer()), hidden=64).save_pretrained(path)
        make_tokenizer(extra_tokens=3).save_pretrained(path)  # another vocabulary
    return str(path)


def _small_vocab_no_tokenizer(f):
    path = f["root"] / "small_vocab"
    if not path.exists():
        make_model(len(make_tokenizer()) - 20, hidden=64).save_pretrained(path)  # no tokenizer files
    return str(path)


def _file(f, name, rows):
    path = f["root"] / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# (what, argv changes built from the fixture, the variable the message must name)
CASES = [
    ("student without config.json", lambda f: dict(model_name_or_path=_no_config(f)), "MODEL_PATH"),
    ("teacher directory missing", lambda f: dict(teacher_model_name_or_path=str(f["root"] / "nope")),
     "TEACHER_MODEL_PATH"),
    ("teacher without weights", lambda f: dict(teacher_model_name_or_path=_no_weights(f)), "TEACHER_MODEL_PATH"),
    ("teacher tokenizer differs", lambda f: dict(teacher_model_name_or_path=_other_tokenizer(f)),
     "TEACHER_MODEL_PATH"),
    ("teacher without tokenizer, smaller vocabulary",
     lambda f: dict(teacher_model_name_or_path=_small_vocab_no_tokenizer(f)), "TEACHER_MODEL_PATH"),
    ("train file missing", lambda f: dict(train_file=str(f["root"] / "missing.jsonl")), "TRAIN_FILE"),
    ("train file without a prompt column", lambda f: dict(train_file=_file(f, "q.jsonl", [{"question": "1+1"}])),
     "TRAIN_FILE"),
    ("train file without rows", lambda f: dict(train_file=_file(f, "empty.jsonl", [])), "TRAIN_FILE"),
    ("reward weighting without answers",
     lambda f: dict(train_file=_file(f, "noans.jsonl", [{"prompt": f"{i}+1="} for i in range(8)]), reward_beta=0.5),
     "OPD_REWARD_BETA"),
    ("validation file without answers",
     lambda f: dict(val_files=_file(f, "val.jsonl", [{"prompt": "1+1="}]), test_freq=1), "VAL_FILES"),
    ("batch larger than the data", lambda f: dict(gradient_accumulation_steps=8), "TRAIN_BATCH_SIZE"),
    ("MAX_RESPONSE_LENGTH 0", lambda f: dict(max_completion_length=0), "MAX_RESPONSE_LENGTH"),
    ("MAX_PROMPT_LENGTH 0", lambda f: dict(max_prompt_length=0), "MAX_PROMPT_LENGTH"),
    ("LEARNING_RATE 0", lambda f: dict(learning_rate=0), "LEARNING_RATE"),
    ("TOP_P 0", lambda f: dict(top_p=0), "TOP_P"),
    ("TOP_P above 1", lambda f: dict(top_p=1.5), "TOP_P"),
    ("TOTAL_EPOCHS -1 trains nothing", lambda f: dict(num_train_epochs=-1, max_steps=-1), "TOTAL_EPOCHS"),
    ("unknown REWARD_FUNCTION", lambda f: dict(reward_function="exact_match"), "REWARD_FUNCTION"),
    ("LoRA target that does not exist", lambda f: dict(use_peft="true", lora_target_modules="c_attn"),
     "LORA_TARGETS"),
    ("LoRA targets without --use_peft", lambda f: dict(lora_target_modules="q_proj"), "LORA_TARGETS"),
    ("unknown loss type", lambda f: dict(loss_type="kl"), "OPD_LOSS_TYPE"),
    ("RESUME with OVERWRITE", lambda f: dict(resume_from_checkpoint="latest", overwrite="true"), "RESUME"),
]


@pytest.mark.parametrize("what, change, variable", CASES, ids=[c[0] for c in CASES])
def test_opsd_train_mistake_is_one_error_line(files, tmp_path, capsys, what, change, variable):
    code, err = run_module("opsd.train", argv(files, tmp_path / "run", **change(files)), capsys)
    assert_one_error_line(code, err, variable)


@pytest.mark.parametrize("options", ["{temperature: 0.5", "[1, 2]"])
def test_malformed_selector_options_name_the_variable(files, tmp_path, capsys, options):
    code, err = run_module("tip_ext.train", argv(files, tmp_path / "run", selector="soft_or", ratio=0.5,
                                                selector_options=options), capsys)
    assert_one_error_line(code, err, "SELECTOR_OPTIONS")


def test_valid_dry_run_passes_the_checks(files, tmp_path, capsys):
    code, err = run_module("opsd.train", argv(files, tmp_path / "run"), capsys)
    assert code == 0 and "error:" not in err
    code, err = run_module("tip_ext.train", argv(files, tmp_path / "run", selector="soft_or", ratio=0.5,
                                                 selector_options='{"min_keep": 2}'), capsys)
    assert code in (0, None) and "error:" not in err


def test_opsd_evaluate_mistakes_are_one_line(files, capsys):
    for flags, variable in ((["--max_prompt_length", "0"], "MAX_PROMPT_LENGTH"),
                            (["--max_new_tokens", "0"], "MAX_RESPONSE_LENGTH"), (["--top_p", "0"], "VAL_TOP_P")):
        code, err = run_module("opsd.evaluate", ["--model", files["student"], "--data", files["data"], *flags], capsys)
        assert_one_error_line(code, err, variable)


def _script(script, env, timeout=120):
    full = dict(os.environ, PYTHON_BIN=sys.executable, OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", f"run_scripts/{script}"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def _script_env(f, tmp_path, **change):
    env = dict(MODEL_PATH=f["student"], TEACHER_MODEL_PATH=f["teacher"], TRAIN_FILE=f["data"],
               OUTPUT_DIR=str(tmp_path / "run"), TRAIN_BATCH_SIZE="4", PPO_MICRO_BATCH_SIZE_PER_GPU="2", DRY_RUN="1")
    env.update(change)
    return env


SCRIPT_CASES = [
    (dict(OPD_MAX_LENGTH="16k"), "OPD_MAX_LENGTH"),
    (dict(OPD_MAX_LENGTH="1000", MAX_PROMPT_LENGTH="1024", MAX_RESPONSE_LENGTH="1024"), "OPD_MAX_LENGTH"),
    (dict(DRY_RUN="maybe"), "DRY_RUN"),
    (dict(COLD_START="sure"), "COLD_START"),
    (dict(PUSH_TO_HUB="perhaps"), "PUSH_TO_HUB"),  # a yes/no checked inside [ ... ] still stops the script
    (dict(RESUME="latest", OVERWRITE="true"), "OVERWRITE"),
    (dict(ENABLE_TOOLS="True", MAX_ASSISTANT_TURNS="50"), "MAX_ASSISTANT_TURNS"),
    (dict(TOOL_CONFIG_PATH="tools.yaml"), "TOOL_CONFIG_PATH"),
    (dict(MAX_PROMPT_LENGTH="0"), "MAX_PROMPT_LENGTH"),
    (dict(MAX_RESPONSE_LENGTH="many"), "MAX_RESPONSE_LENGTH"),
    (dict(EXTRA_ARGS="--gradient_accumulation_steps x"), "gradient_accumulation_steps"),
]


@pytest.mark.parametrize("change, variable", SCRIPT_CASES, ids=[next(iter(c[0])) for c in SCRIPT_CASES])
def test_script_refuses_before_python_starts(files, tmp_path, change, variable):
    result = _script("train_opd.sh", _script_env(files, tmp_path, **change), timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and variable in lines[0] and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("script, change, variable", [
    ("train_opd.sh", dict(LEARNING_RATE="0"), "LEARNING_RATE"),
    ("train_opd.sh", dict(TOTAL_EPOCHS="-1"), "TOTAL_EPOCHS"),
    ("train_tip.sh", dict(SELECTOR_OPTIONS="{oops"), "SELECTOR_OPTIONS"),
])
def test_python_side_mistakes_through_the_script(files, tmp_path, script, change, variable):
    """A real `python -m` subprocess behind the script: one line, status 2, no traceback."""
    result = _script(script, _script_env(files, tmp_path, **change))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and variable in lines[0] and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_eval_script_mistakes(files, tmp_path):
    for change, variable in ((dict(MAX_PROMPT_LENGTH="-5"), "MAX_PROMPT_LENGTH"), (dict(VAL_N="0"), "VAL_N"),
                             (dict(PRESET="qwen3"), "PRESET"), (dict(DATA_DIR=str(tmp_path)), "DATA_DIR"),
                             (dict(ENABLE_THINKING="maybe"), "ENABLE_THINKING")):
        result = _script("eval_math.sh", dict(MODEL_PATH=files["student"], DATA_FILES=files["data"], **change)
                         if variable != "DATA_DIR" else dict(MODEL_PATH=files["student"], **change), timeout=60)
        assert result.returncode == 2 and variable in result.stderr, (change, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
