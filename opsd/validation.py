"""In-training validation (upstream's TEST_FREQ / VAL_BEFORE_TRAIN): every `test_freq` optimizer steps, at the last
step, and before training with `val_before_train`, the current student samples `val_n` completions per problem of
each validation file; `opsd.evaluate` scores them with the verifiable reward and the metrics

    val/<name>/mean@<n>, val/<name>/pass@<j> (j = 1, 2, 4, ..., n), val/<name>/mean_length,
    val/<name>/truncated_fraction

join the training metrics of that step (the trainer's log line, every `report_to` backend, `log_history`) and are
appended as one JSON line per validation to `<output_dir>/validation.jsonl` (step, metrics, settings).

`ValidationCallback` is a `TrainerCallback` attached by opsd.train when validation is on; the trainer core does not
know about it. It works with any `OPDTrainer` (a token selector, a LoRA student: PEFT models generate with their
adapters). Under DeepSpeed ZeRO-3 / FSDP the parameters are gathered for generation with TRL's
`unwrap_model_for_generation`; every process generates the same samples (same seed), the main process writes.
Generation uses transformers' `generate` (not vLLM) with the validation sampling settings; its cost is
validation files x problems x val_n samples of up to `val_max_new_tokens` tokens, so keep `val_limit` small on
long runs. When off (`test_freq` 0 and `val_before_train` false) nothing is built and nothing runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from transformers import TrainerCallback


@dataclass
class ValidationArguments:
    val_files: list[str] | None = field(
        default=None, metadata={"help": "Validation prompt files ([NAME=]FILE, with `prompt` and `answer` columns, "
                                "as written by python -m opsd.data); upstream: MATH-500, AIME 2024, AIME 2025."})
    test_freq: int = field(default=0, metadata={"help": "Validate every N optimizer steps and at the last step "
                                                "(upstream's TEST_FREQ); 0 = off."})
    val_before_train: bool = field(default=False, metadata={"help": "Validate once before the first step "
                                                            "(upstream's VAL_BEFORE_TRAIN)."})
    val_at_end: bool = field(default=False, metadata={"help": "Validate at the last step also when test_freq is 0 "
                                                      "(upstream validates at the last step whatever TEST_FREQ says; "
                                                      "the run scripts pass it when validation files exist)."})
    val_n: int = field(default=16, metadata={"help": "Samples per validation problem (mean@n, pass@j for j <= n)."})
    val_temperature: float = field(default=0.7, metadata={"help": "Validation sampling temperature (0 = greedy)."})
    val_top_p: float = field(default=0.8, metadata={"help": "Validation nucleus threshold (1.0 = off)."})
    val_top_k: int = field(default=20, metadata={"help": "Validation top-k (0 or -1 = off)."})
    val_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Validation completion budget; None: the training max_completion_length."})
    val_batch_size: int = field(default=64, metadata={"help": "Sequences per generate call during validation."})
    val_limit: int | None = field(default=None, metadata={"help": "Validate on the first N problems of each file."})
    val_seed: int = field(default=0, metadata={"help": "Sampling seed of validation (the step is added)."})

    def __post_init__(self):
        if isinstance(self.val_files, str):
            self.val_files = self.val_files.split()
        if self.test_freq < 0:
            raise ValueError(f"test_freq must be >= 0 (0 = off), got {self.test_freq}.")
        if self.val_n < 1:
            raise ValueError(f"val_n must be >= 1, got {self.val_n}.")
        if self.val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {self.val_batch_size}.")
        if self.val_limit is not None and self.val_limit < 1:
            raise ValueError(f"val_limit must be a positive number of problems, got {self.val_limit}.")
        if self.val_top_k < 0:
            self.val_top_k = 0  # upstream's -1 means off, as does 0 here
        if self.enabled and not self.val_files:
            raise ValueError("Validation is on (--test_freq / --val_before_train, TEST_FREQ / VAL_BEFORE_TRAIN) but "
                             "no --val_files (VAL_FILES) are given.")

    @property
    def enabled(self) -> bool:
        return self.test_freq > 0 or self.val_before_train or self.val_at_end


class ValidationCallback(TrainerCallback):
    """Runs `opsd.evaluate.evaluate` on the validation sets at the configured steps (see the module docstring)."""

    def __init__(self, trainer, args: ValidationArguments, reward_fn=None):
        from .evaluate import load_benchmark, parse_data_specs

        self.trainer = trainer
        self.args = args
        self.reward_fn = reward_fn
        self.sets = [(name, load_benchmark(path, limit=args.val_limit))
                     for name, path in parse_data_specs(args.val_files)]
        self.path = os.path.join(trainer.args.output_dir, "validation.jsonl")
        self.history: list[dict] = []

    def validate(self, step: int) -> dict[str, float]:
        from trl.models import unwrap_model_for_generation

        from .evaluate import evaluate

        trainer, a = self.trainer, self.args
        train_args = trainer.args
        model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
        was_training = trainer.model.training
        trainer.model.eval()
        metrics: dict[str, float] = {}
        try:
            with unwrap_model_for_generation(
                    model, trainer.accelerator,
                    gradient_checkpointing_kwargs=train_args.gradient_checkpointing_kwargs) as unwrapped:
                for name, dataset in self.sets:
                    result = evaluate(unwrapped, trainer.processing_class, dataset, k=a.val_n,
                                      temperature=a.val_temperature, top_p=a.val_top_p, top_k=a.val_top_k,
                                      max_new_tokens=a.val_max_new_tokens or train_args.max_completion_length,
                                      batch_size=a.val_batch_size, seed=a.val_seed + step, reward_fn=self.reward_fn,
                                      chat_template_kwargs=train_args.chat_template_kwargs,
                                      max_prompt_length=train_args.max_prompt_length, max_completion_chars=0,
                                      progress=False, desc=f"val {name}")
                    for key, value in result["metrics"].items():
                        if key.startswith(("mean@", "pass@")) or key in ("mean_length", "truncated_fraction"):
                            metrics[f"val/{name}/{key}"] = float(value)
        finally:
            trainer.model.train(was_training)
        record = {"step": step, "metrics": metrics,
                  "settings": {"n": a.val_n, "temperature": a.val_temperature, "top_p": a.val_top_p,
                               "top_k": a.val_top_k, "max_new_tokens": a.val_max_new_tokens
                               or train_args.max_completion_length, "limit": a.val_limit}}
        self.history.append(record)
        if trainer.accelerator.is_main_process:
            os.makedirs(train_args.output_dir, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return metrics

    def on_train_begin(self, args, state, control, **kwargs):
        if self.args.val_before_train:
            self.trainer.log(self.validate(state.global_step))  # its own log line, at the starting step

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        last = state.max_steps > 0 and step >= state.max_steps
        periodic = self.args.test_freq > 0 and step % self.args.test_freq == 0
        if periodic or (last and (self.args.test_freq > 0 or self.args.val_at_end)):
            # into the step's training metrics: OPDTrainer.log averages _metrics["train"] into the next log line
            for key, value in self.validate(step).items():
                self.trainer._metrics["train"][key].append(value)
            control.should_log = True
        return control
