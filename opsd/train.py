"""Command-line entry point: `python -m opsd.train [--config run.yaml] [--flag value ...]`.

Full-token on-policy distillation of a local student from a local teacher on a local prompt file. Every field of
`DataArguments`, TRL's `ModelConfig` (student loading, LoRA/QLoRA), `OPDConfig` (training, loss, generation, vLLM)
and `ValidationArguments` (in-training validation, opsd.validation) is a flag and a YAML key; `--dry_run` prints the
resolved configuration and exits. `tip_ext.train` reuses `main` with its selector arguments (this module never
imports tip_ext).

User errors (a bad flag value, a missing or incompatible model directory, unusable data, a batch larger than the
data, ...) are one `error: ...` line naming the flag and its run-script variable, exit status 2, before any model is
loaded; `--dry_run` runs the same checks (opsd.preflight).

Run safety: an output_dir that holds checkpoints is refused unless `--resume_from_checkpoint latest` (resume) or
`--overwrite true` (delete them and start afresh); `latest` resumes from the newest *complete* checkpoint (one whose
trainer_state.json, the file transformers writes last, is readable), so a kill during a save falls back to the one
before; on a run whose final model is saved and whose step count is reached, `latest` reports it finished and
returns without training. The final directory gets a model card naming the method, the selector and the papers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from .core.config import OPDConfig
from .preflight import UserError, name_variables, preflight
from .validation import ValidationArguments

CHECKPOINT_PREFIX = "checkpoint-"
SUMMARY_FILE = "run_summary.json"


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "Local prompt file (.jsonl/.json/.parquet) with a `prompt` column, or a "
                                "directory holding train.*. Plain strings or chat messages."})
    eval_file: str | None = field(default=None, metadata={"help": "Optional local prompt file for evaluation."})
    prompt_column: str = field(default="prompt", metadata={"help": "Name of the prompt column."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    overwrite: bool = field(default=False, metadata={"help": "Start afresh in an output_dir that holds checkpoints "
                                                     "of an earlier run: delete them first (OVERWRITE=1)."})
    dry_run: bool = field(default=False, metadata={"help": "Check everything checkable without loading a model "
                                                   "(opsd.preflight), print the resolved configuration and exit."})


def build_parser(extra: tuple = ()) -> TrlParser:
    return TrlParser((DataArguments, ModelConfig, OPDConfig, ValidationArguments, *extra))


def resolved_config(*configs) -> dict:
    out = {}
    for cfg in configs:
        values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
        out[type(cfg).__name__] = {k: v for k, v in values.items() if not k.startswith("_")}
    return json.loads(json.dumps(out, default=str))


def load_models(model_args: ModelConfig, train_args: OPDConfig):
    """Student (optionally quantized + LoRA config), its tokenizer, the teacher path and the teacher's tokenizer."""
    from transformers import AutoTokenizer

    from .core.models import check_local_path, load_causal_lm, load_tokenizer

    student_path = check_local_path(model_args.model_name_or_path, "Student model (--model_name_or_path)")
    check_local_path(train_args.teacher_model_name_or_path, "Teacher model (--teacher_model_name_or_path)")
    tokenizer = load_tokenizer(student_path)
    quantization = get_quantization_config(model_args)
    kwargs = {}
    if quantization is not None:
        import torch
        from accelerate import PartialState

        # k-bit weights are placed at load time: on this process's GPU (one copy per data-parallel rank)
        kwargs = {"quantization_config": quantization,
                  "device_map": {"": PartialState().local_process_index} if torch.cuda.is_available() else None}
    student = load_causal_lm(student_path, dtype=model_args.dtype or "float32",
                             attn_implementation=model_args.attn_implementation, what="Student model", **kwargs)
    teacher_path = train_args.teacher_model_name_or_path
    has_tokenizer = any(os.path.exists(os.path.join(teacher_path, f)) for f in ("tokenizer.json",
                                                                                  "tokenizer_config.json"))
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path) if has_tokenizer else None
    return student, tokenizer, teacher_path, teacher_tokenizer, get_peft_config(model_args)


def checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N directories of output_dir, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(name[len(CHECKPOINT_PREFIX):]), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit()
             and os.path.isdir(os.path.join(output_dir, name))]
    return [path for _, path in sorted(found)]


def is_complete_checkpoint(path: str) -> bool:
    """transformers writes a checkpoint's weights, optimizer, scheduler and RNG state first and trainer_state.json
    last: a checkpoint is complete when that file parses and weights are present."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    names = os.listdir(path)
    return any(n.startswith(("model", "pytorch_model", "adapter_model", "global_step")) for n in names)


def latest_complete_checkpoint(output_dir: str) -> str | None:
    for path in reversed(checkpoints(output_dir)):
        if is_complete_checkpoint(path):
            return path
        print(f"[opsd.train] note: {path} is incomplete (interrupted save?); resuming from an earlier checkpoint",
              file=sys.stderr)
    return None


def finished_run(output_dir: str, max_steps: int) -> dict | None:
    """The summary of a run whose final model is saved and whose step count reaches max_steps (when > 0)."""
    try:
        with open(os.path.join(output_dir, SUMMARY_FILE)) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    if not summary.get("finished"):
        return None
    target = max_steps if max_steps > 0 else summary.get("max_steps", 0)
    return summary if summary.get("global_step", -1) >= target else None


def resolve_resume(train_args: OPDConfig, overwrite: bool):
    """The resume_from_checkpoint value for trainer.train, or "finished"; refuses to mix a new run with old
    checkpoints."""
    output_dir, resume = train_args.output_dir, train_args.resume_from_checkpoint
    old = checkpoints(output_dir)
    if isinstance(resume, str) and resume.lower() in ("", "false", "none", "no", "0"):
        resume = None
    if resume is None:
        if old and not overwrite:
            raise UserError(
                f"{output_dir} holds checkpoints of an earlier run ({os.path.basename(old[-1])} is the newest). "
                "Resume it with RESUME=latest (--resume_from_checkpoint latest), or start afresh with OVERWRITE=1 "
                "(--overwrite true, deletes those checkpoints), or pick another OUTPUT_DIR / RUN_ID.")
        if overwrite:
            import shutil

            # every process of a multi-process run gets here: whichever deletes a file first, the others carry on
            for path in old:
                shutil.rmtree(path, ignore_errors=True)
            for name in (SUMMARY_FILE, "validation.jsonl"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(output_dir, name))
        return None
    if overwrite:
        raise UserError(f"--resume_from_checkpoint {resume} (RESUME) and --overwrite true (OVERWRITE) contradict each "
                        "other (continue the run, or delete its checkpoints and start afresh): set only one.")
    if isinstance(resume, str) and resume.lower() in ("true", "latest", "1", "yes"):
        summary = finished_run(output_dir, train_args.max_steps)
        if summary is not None:
            return "finished"
        path = latest_complete_checkpoint(output_dir)
        if path is None:
            raise UserError(f"RESUME=latest but {output_dir} holds no complete checkpoint to resume from; "
                             "unset RESUME to start a new run there.")
        return path
    if not os.path.isdir(str(resume)):
        raise UserError(f"--resume_from_checkpoint {resume} (RESUME): no such checkpoint directory.")
    return resume


# selector name -> (method, paper); the card names the method a run used
_METHODS = {
    "teachability": ("TA-OPD (token teachability)", "Not All Disagreement Is Learnable, arXiv:2605.26844"),
    "teachability_entropy": ("TA-OPD+Entropy", "Not All Disagreement Is Learnable, arXiv:2605.26844"),
}
_TIP = ("TIP (token importance in on-policy distillation)", "TIP, arXiv:2604.14084")


def model_card_section(config: dict) -> str:
    """Markdown appended to TRL's model card: the objective, the token selector and its settings, the papers."""
    opd = config.get("OPDConfig", {})
    lines = ["", "## Training method (opsd-tip)", "",
             f"On-policy distillation (OPD) from a teacher: the student samples {opd.get('rollout_n', 1)} "
             f"completion(s) per prompt and minimizes the per-token {opd.get('loss_type')} divergence to the teacher "
             f"(normalization {opd.get('loss_normalization')}, reward weighting {opd.get('reward_weighting')}"
             f"{', beta ' + str(opd.get('reward_beta')) if opd.get('reward_beta') else ''}).", ""]
    selector = config.get("SelectorConfig")
    if selector and selector.get("selector") not in (None, "none", "all"):
        name = selector["selector"]
        method, paper = _METHODS.get(name, _TIP)
        settings = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()) if v not in (None, "", {}))
        lines += [f"Token selection: **{method}**, selector `{name}` ({settings}).", "",
                  f"Papers: {paper}; on-policy distillation: Agarwal et al., ICLR 2024 (arXiv:2306.13649).", ""]
    else:
        lines += ["Token selection: none (full-token OPD). On-policy distillation: Agarwal et al., ICLR 2024 "
                  "(arXiv:2306.13649).", ""]
    return "\n".join(lines)


def name_of(reward_function) -> str:
    return str(reward_function or "math").strip().lower()


def _check_vllm(train_args: OPDConfig) -> None:
    import importlib.util

    if train_args.use_vllm and importlib.util.find_spec("vllm") is None:
        raise UserError("--use_vllm true (USE_VLLM=1) but vLLM is not installed for this interpreter; "
                         "pip install -r requirements-gpu.txt, or USE_VLLM=0 for transformers generation.")
    if train_args.use_vllm and train_args.vllm_mode not in ("colocate", "server"):
        raise UserError(f"--vllm_mode (VLLM_MODE) must be colocate or server, got {train_args.vllm_mode!r}.")


def _check_zero3(train_args: OPDConfig) -> None:
    """Under `accelerate launch` with a ZeRO-3 config (run_scripts/accelerate/zero3.yaml): the settings OPDTrainer
    refuses there (they recompute logits in backward, when ZeRO-3 has partitioned the lm_heads), named before any
    model loads."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true" or \
            os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") != "3":
        return
    if train_args.divergence_backend in ("trl", "chunked"):
        raise UserError(f"--divergence_backend {train_args.divergence_backend} does not run under DeepSpeed "
                         "ZeRO-3 (it recomputes logits in backward, when the lm_heads are partitioned): use fused or "
                         "auto.")
    if train_args.loss_support != "full":
        raise UserError(f"--loss_support {train_args.loss_support} does not run under DeepSpeed ZeRO-3 (its "
                         "estimators recompute logits in backward, when the lm_heads are partitioned): use full, or "
                         "FSDP2/DDP (ACCELERATE_CONFIG=run_scripts/accelerate/fsdp2.yaml).")


def main(argv: list[str] | None = None, extra: tuple = (), make_selector: Callable | None = None,
         prog: str = "python -m opsd.train") -> dict:
    """Parse, check, build the trainer, train, save. `make_selector(extra_args, train_args)` returns a
    TokenSelector. A user error prints one `error: ...` line and raises UserError (SystemExit, status 2)."""
    try:
        return _main(argv, extra, make_selector, prog)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise


def parse(argv, extra: tuple = (), prog: str = "python -m opsd.train"):
    """The parsed dataclasses; a value a config rejects becomes a UserError naming the flag and its variable."""
    parser = build_parser(extra)
    parser.prog = prog
    try:
        return parser.parse_args_and_config(args=argv)
    except ValueError as err:
        raise UserError(name_variables(str(err))) from None


def _main(argv, extra, make_selector, prog) -> dict:
    data_args, model_args, train_args, val_args, *extra_args = parse(argv, extra, prog)
    config = resolved_config(data_args, model_args, train_args, val_args, *extra_args)
    _check_vllm(train_args)
    if data_args.overwrite and train_args.resume_from_checkpoint not in (None, "", False) and str(
            train_args.resume_from_checkpoint).lower() not in ("false", "none", "no", "0"):
        raise UserError(f"--resume_from_checkpoint {train_args.resume_from_checkpoint} (RESUME) and --overwrite true "
                        "(OVERWRITE) contradict each other (continue the run, or delete its checkpoints and start "
                        "afresh): set only one.")
    if name_of(train_args.reward_function) == "none" and (val_args.enabled or (train_args.reward_beta or 0) > 0):
        raise UserError("--reward_function none (REWARD_FUNCTION), but validation and reward weighting need a reward.")
    _check_zero3(train_args)
    preflight(data_args, model_args, train_args, val_args)
    if data_args.dry_run:
        print(json.dumps(config, indent=2, sort_keys=True))
        return {"config": config}
    resume = resolve_resume(train_args, data_args.overwrite)
    if resume == "finished":
        summary = finished_run(train_args.output_dir, train_args.max_steps)
        print(f"[opsd.train] {train_args.output_dir} is finished (step {summary['global_step']}, final model saved); "
              "nothing to train. Raise --max_steps (MAX_STEPS) to continue, or OVERWRITE=1 to start afresh.")
        return {"config": config, "finished": True, "global_step": summary["global_step"]}

    from .data import load_prompt_dataset
    from .core.trainer import OPDTrainer

    train_dataset = load_prompt_dataset(data_args.train_file, prompt_column=data_args.prompt_column,
                                        limit=data_args.max_train_samples)
    eval_dataset = (load_prompt_dataset(data_args.eval_file, prompt_column=data_args.prompt_column)
                    if data_args.eval_file else None)
    student, tokenizer, teacher_path, teacher_tokenizer, peft_config = load_models(model_args, train_args)
    selector = make_selector(*extra_args, train_args) if make_selector is not None else None
    from .reward import get_reward_fn

    # rollout accuracy is logged whenever the prompts have answers (every rollout is scored, as upstream's
    # opd/accuracy; --reward_function none turns that off); weighting and validation use the same reward
    name = train_args.reward_function or "math"
    reward_fn = (get_reward_fn(name) if name.lower() != "none"
                 and ("answer" in train_dataset.column_names or val_args.enabled) else None)
    init = dict(train_args.teacher_model_init_kwargs or {})
    init.setdefault("dtype", model_args.dtype or "float32")
    train_args.teacher_model_init_kwargs = init
    trainer = OPDTrainer(model=student, teacher_model=teacher_path, args=train_args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config,
                         token_selector=selector, teacher_tokenizer=teacher_tokenizer,
                         reward_fn=reward_fn if "answer" in train_dataset.column_names else None)
    trainer.model_card_extra = model_card_section(config)
    validation = None
    if val_args.enabled:
        from .validation import ValidationCallback

        validation = ValidationCallback(trainer, val_args, reward_fn)
        trainer.add_callback(validation)
    result = trainer.train(resume_from_checkpoint=resume)
    # the card first: with push_to_hub, save_model uploads the directory (card included) right away
    trainer.create_model_card(model_name=os.path.basename(os.path.normpath(train_args.output_dir)))
    trainer.save_model(train_args.output_dir)
    tokenizer.save_pretrained(train_args.output_dir)
    summary = {"config": config, "train_metrics": result.metrics, "log_history": trainer.state.log_history,
               "finished": True, "global_step": trainer.state.global_step, "max_steps": trainer.state.max_steps}
    if validation is not None:
        summary["validation"] = validation.history
    if trainer.accelerator.is_main_process:
        with open(os.path.join(train_args.output_dir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
