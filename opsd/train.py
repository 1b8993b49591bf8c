"""Command-line entry point: `python -m opsd.train [--config run.yaml] [--flag value ...]`.

Full-token on-policy distillation of a local student from a local teacher on a local prompt file. Every field of
`DataArguments`, TRL's `ModelConfig` (student loading, LoRA/QLoRA) and `OPDConfig` (training, loss) is a flag and a
YAML key; `--dry_run` prints the resolved configuration and exits. `tip_ext.train` reuses `main` with its selector
arguments (this module never imports tip_ext).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from .core.config import OPDConfig


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "Local prompt file (.jsonl/.json/.parquet) with a `prompt` column, or a "
                                "directory holding train.*. Plain strings or chat messages."})
    eval_file: str | None = field(default=None, metadata={"help": "Optional local prompt file for evaluation."})
    prompt_column: str = field(default="prompt", metadata={"help": "Name of the prompt column."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    dry_run: bool = field(default=False, metadata={"help": "Print the resolved configuration and exit."})


def build_parser(extra: tuple = ()) -> TrlParser:
    return TrlParser((DataArguments, ModelConfig, OPDConfig, *extra))


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


def main(argv: list[str] | None = None, extra: tuple = (), make_selector: Callable | None = None,
         prog: str = "python -m opsd.train") -> dict:
    """Parse, build the trainer, train, save. `make_selector(extra_args, train_args)` returns a TokenSelector."""
    parser = build_parser(extra)
    parser.prog = prog
    data_args, model_args, train_args, *extra_args = parser.parse_args_and_config(args=argv)
    config = resolved_config(data_args, model_args, train_args, *extra_args)
    if data_args.dry_run:
        print(json.dumps(config, indent=2, sort_keys=True))
        return {"config": config}

    from .data import load_prompt_dataset
    from .core.trainer import OPDTrainer

    if data_args.train_file is None:
        raise SystemExit("--train_file is required: a local .jsonl/.parquet prompt file (see README, Data).")
    train_dataset = load_prompt_dataset(data_args.train_file, prompt_column=data_args.prompt_column,
                                        limit=data_args.max_train_samples)
    eval_dataset = (load_prompt_dataset(data_args.eval_file, prompt_column=data_args.prompt_column)
                    if data_args.eval_file else None)
    student, tokenizer, teacher_path, teacher_tokenizer, peft_config = load_models(model_args, train_args)
    selector = make_selector(*extra_args, train_args) if make_selector is not None else None
    init = dict(train_args.teacher_model_init_kwargs or {})
    init.setdefault("dtype", model_args.dtype or "float32")
    train_args.teacher_model_init_kwargs = init
    trainer = OPDTrainer(model=student, teacher_model=teacher_path, args=train_args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config,
                         token_selector=selector, teacher_tokenizer=teacher_tokenizer)
    resume = train_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "latest"):
        resume = True
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(train_args.output_dir)
    tokenizer.save_pretrained(train_args.output_dir)
    summary = {"config": config, "train_metrics": result.metrics, "log_history": trainer.state.log_history}
    if trainer.accelerator.is_main_process:
        with open(os.path.join(train_args.output_dir, "run_summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
