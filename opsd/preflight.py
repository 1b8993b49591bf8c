"""Checks of a training run that need no model weights, run by `python -m opsd.train` / `tip_ext.train` before any
model is loaded (and by `--dry_run`, which therefore checks everything checkable).

Every failure is a `UserError`: the entry point prints it as one `error: ...` line naming the flag and the
run-script variable, and exits with status 2 (no traceback). Checked here: the numbers that would train nothing or
break at step 1 (lengths, learning rate, top-p, steps/epochs), the reward function, the LoRA flags and target
modules (against the student's module names, built on the meta device from its config: no weights are read), the
model directories (config and weights present), tokenizer compatibility from the files (student vs teacher
tokenizer, or the teacher's vocabulary size when it ships no tokenizer), the data (readable, prompt column, at least
one row, answers where reward weighting or validation need them) and the prompts per step against the dataset size.
"""

from __future__ import annotations

import glob
import json
import os
import re

# flag -> the run-script variable that sets it (run_scripts/train_opd.sh), named in every message
VARIABLES = {
    "model_name_or_path": "MODEL_PATH", "teacher_model_name_or_path": "TEACHER_MODEL_PATH",
    "train_file": "TRAIN_FILE / DATA_DIR", "max_completion_length": "MAX_RESPONSE_LENGTH",
    "max_prompt_length": "MAX_PROMPT_LENGTH", "learning_rate": "LEARNING_RATE", "top_p": "TOP_P",
    "top_k": "TOP_K", "temperature": "TEMPERATURE", "max_steps": "MAX_STEPS", "num_train_epochs": "TOTAL_EPOCHS",
    "reward_function": "REWARD_FUNCTION", "reward_beta": "OPD_REWARD_BETA", "reward_weighting": "OPD_REWARD_WEIGHTING",
    "loss_type": "OPD_LOSS_TYPE", "jsd_beta": "OPD_JSD_BETA", "loss_normalization": "OPD_LOSS_NORMALIZATION",
    "chunk_size": "OPD_CHUNK_SIZE", "rollout_n": "ROLLOUT_N", "per_device_train_batch_size":
    "PPO_MICRO_BATCH_SIZE_PER_GPU", "gradient_accumulation_steps": "TRAIN_BATCH_SIZE", "val_files": "VAL_FILES",
    "test_freq": "TEST_FREQ", "val_n": "VAL_N", "val_batch_size": "VAL_BATCH_SIZE", "val_limit": "VAL_LIMIT",
    "lora_target_modules": "LORA_TARGETS", "use_peft": "EXTRA_ARGS --use_peft", "selector_options":
    "SELECTOR_OPTIONS", "ratio": "RATIO", "scope": "SCOPE", "selector": "SELECTOR", "support_top_k": "SUPPORT_TOP_K",
    "resume_from_checkpoint": "RESUME", "overwrite": "OVERWRITE",
}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class UserError(SystemExit):
    """A user mistake: exits with status 2; str() is the message (printed as `error: <message>`)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def flag(name: str) -> str:
    """`--name (VARIABLE)`: the flag and the run-script variable that sets it."""
    var = VARIABLES.get(name)
    return f"--{name} ({var})" if var else f"--{name}"


def name_variables(message: str) -> str:
    """A config error message with the run-script variable of the first flag it names appended."""
    for name in sorted(VARIABLES, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", message) and VARIABLES[name] not in message:
            return f"{message} [{flag(name)}]"
    return message


def check_numbers(train_args, model_args) -> None:
    if train_args.max_completion_length is None or train_args.max_completion_length < 1:
        raise UserError(f"{flag('max_completion_length')} must be >= 1 token, got "
                        f"{train_args.max_completion_length}.")
    if train_args.max_prompt_length is not None and train_args.max_prompt_length < 1:
        raise UserError(f"{flag('max_prompt_length')} must be >= 1 token (it keeps the last N prompt tokens), got "
                        f"{train_args.max_prompt_length}.")
    if not train_args.learning_rate > 0:
        raise UserError(f"{flag('learning_rate')} must be > 0, got {train_args.learning_rate}.")
    if not 0.0 < train_args.top_p <= 1.0:
        raise UserError(f"{flag('top_p')} must be in (0, 1], got {train_args.top_p}.")
    if train_args.max_steps <= 0 and train_args.num_train_epochs <= 0:
        raise UserError(f"{flag('max_steps')} is {train_args.max_steps} and {flag('num_train_epochs')} is "
                        f"{train_args.num_train_epochs}: the run would train nothing; set a positive one.")
    name = train_args.reward_function
    if name is not None and str(name).lower() != "none":
        from .reward import get_reward_fn

        try:
            get_reward_fn(name)
        except ValueError as err:
            raise UserError(f"{flag('reward_function')}: {err}") from None
    targets = model_args.lora_target_modules
    if targets and not model_args.use_peft:
        raise UserError(f"{flag('lora_target_modules')} is set ({targets}) but --use_peft is false: LoRA targets "
                        "need --use_peft true (train_lora.sh sets it).")


def check_model_dir(path, what: str, flag_name: str) -> None:
    if not path or not os.path.isdir(path):
        raise UserError(f"{flag(flag_name)}: {what} not found at {path!r}: a local save_pretrained directory is "
                        "needed (nothing is downloaded).")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{flag(flag_name)}: {what} at {path!r} has no config.json (not a save_pretrained "
                        "directory).")
    if not any(glob.glob(os.path.join(path, pattern)) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"{flag(flag_name)}: {what} at {path!r} has no weights (*.safetensors or "
                        "pytorch_model*.bin).")


def _config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}/config.json is unreadable: {err}") from None


def _vocab_size(config: dict) -> int | None:
    if "vocab_size" in config:
        return config["vocab_size"]
    text = config.get("text_config") or {}
    return text.get("vocab_size")


def check_tokenizers(student_path: str, teacher_path: str):
    """The student tokenizer, after checking the teacher can score its tokens (from the files, no weights)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(student_path)
    except Exception as err:  # noqa: BLE001 - any failure to read the files is the user's directory
        raise UserError(f"{flag('model_name_or_path')}: no usable tokenizer in {student_path!r} ({err}).") from None
    s_rows, t_rows = _vocab_size(_config(student_path)), _vocab_size(_config(teacher_path))
    n_tok = len(tokenizer)
    if any(os.path.exists(os.path.join(teacher_path, f)) for f in TOKENIZER_FILES):
        try:
            teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{flag('teacher_model_name_or_path')}: the tokenizer files in {teacher_path!r} do not "
                            f"load ({err}).") from None
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"{flag('teacher_model_name_or_path')}: the teacher's tokenizer differs from the "
                            f"student's ({len(teacher_tokenizer)} vs {n_tok} tokens, or different ids): on-policy "
                            "distillation compares the two next-token distributions token by token; pick a teacher "
                            "of the student's family.")
    if s_rows is not None and t_rows is not None and s_rows != t_rows and n_tok > min(s_rows, t_rows):
        raise UserError(f"{flag('teacher_model_name_or_path')}: vocabulary mismatch: the student has {s_rows} "
                        f"vocabulary rows, the teacher {t_rows}, and the student's tokenizer {n_tok} tokens, more "
                        "than the smaller one: these models do not share a vocabulary.")
    return tokenizer


def check_lora_targets(student_path: str, model_args) -> None:
    """Every named LoRA target must be the name (or a name suffix) of a module of the student, as PEFT matches."""
    targets = model_args.lora_target_modules
    if not model_args.use_peft or not targets:
        return
    targets = [targets] if isinstance(targets, str) else list(targets)
    targets = [t for item in targets for t in str(item).replace(",", " ").split() if t]
    if targets in (["all-linear"], ["all_linear"]):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(student_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - an architecture this check cannot build is left to the real load
        return
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"{flag('lora_target_modules')}: {missing} match no module of the student; its linear "
                        f"modules are {linear} (or use all-linear).")


def check_data(data_args, train_args, val_args, world_size: int):
    from .data import load_prompt_dataset

    if data_args.train_file is None:
        raise UserError(f"{flag('train_file')} is required: a local .jsonl/.json/.parquet prompt file or a directory "
                        "holding train.* (README, Data).")
    try:
        dataset = load_prompt_dataset(data_args.train_file, prompt_column=data_args.prompt_column,
                                      limit=data_args.max_train_samples)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag('train_file')}: {err}") from None
    if len(dataset) == 0:
        raise UserError(f"{flag('train_file')}: {data_args.train_file} holds no prompts.")
    if (train_args.reward_beta or 0) > 0 and "answer" not in dataset.column_names:
        raise UserError(f"{flag('reward_beta')} = {train_args.reward_beta} weights samples by their reward, but "
                        f"{data_args.train_file} has no answer column to compute it from.")
    per_step = (train_args.per_device_train_batch_size * train_args.gradient_accumulation_steps * world_size)
    prompts = per_step // max(train_args.rollout_n, 1)
    if len(dataset) < prompts:
        raise UserError(f"{flag('gradient_accumulation_steps')}: one step needs {prompts} prompts ({per_step} "
                        f"completions / ROLLOUT_N {train_args.rollout_n}) but {data_args.train_file} holds "
                        f"{len(dataset)}; lower TRAIN_BATCH_SIZE or add prompts.")
    if val_args.enabled:
        from .evaluate import load_benchmark, parse_data_specs

        try:
            for name, path in parse_data_specs(val_args.val_files):
                benchmark = load_benchmark(path, limit=val_args.val_limit)
                if "answer" not in benchmark.column_names:
                    raise UserError(f"{flag('val_files')}: {path} ({name}) has no answer column; validation scores "
                                    "answers.")
        except (OSError, ValueError) as err:
            raise UserError(f"{flag('val_files')}: {err}") from None
    return dataset


def world_size() -> int:
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def preflight(data_args, model_args, train_args, val_args) -> None:
    """Everything checkable before a model loads; raises UserError."""
    check_numbers(train_args, model_args)
    check_model_dir(model_args.model_name_or_path, "the student model", "model_name_or_path")
    check_model_dir(train_args.teacher_model_name_or_path, "the teacher model", "teacher_model_name_or_path")
    check_tokenizers(model_args.model_name_or_path, train_args.teacher_model_name_or_path)
    check_lora_targets(model_args.model_name_or_path, model_args)
    check_data(data_args, train_args, val_args, world_size())
