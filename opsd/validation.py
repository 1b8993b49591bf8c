"""In-training validation (upstream's TEST_FREQ / VAL_BEFORE_TRAIN): every `test_freq` optimizer steps, at the last
step, and before training with `val_before_train`, the current student samples `val_n` completions per problem of
each validation file; `opsd.evaluate` scores them with the verifiable reward and the metrics

    val/<name>/mean@<n>, val/<name>/pass@<j> (j = 1, 2, 4, ..., n), val/<name>/mean_length,
    val/<name>/truncated_fraction,
    val/<name>/teacher_nll, val/<name>/eot_rate, val/<name>/clipped_ratio, val/<name>/distinct_<1,2,3>,
    val/<name>/collapse (1.0 when the collapse rule fired at this validation, else 0.0)

join the training metrics of that step (the trainer's log line, every `report_to` backend, `log_history`) and are
appended as one JSON line per validation to `<output_dir>/validation.jsonl` (step, metrics, settings).

Collapse signals (opsd.collapse; docs/METHODS.md "Collapse signals"): `teacher_nll` is the student's mean NLL of
the teacher's greedy completions of the validation prompts, generated once per validation set at the first
validation and cached in `<output_dir>/teacher_text_<name>.json` (reused on resume; `--val_teacher_nll false` skips
it). From the second validation on, `opsd.collapse.CollapseRule` compares each set's signals with its first
validation: when the training loss fell while a signal moved the wrong way beyond its threshold (`--collapse_*`
flags), a one-line warning names the signals, the record in validation.jsonl carries a `collapse` entry, and with
`--stop_on_collapse` training stops after that step (the final model is still saved).

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
import sys
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
    val_teacher_nll: bool = field(default=True, metadata={"help": "Score the teacher's greedy completions of the "
                                  "validation prompts (made once, cached) with the student: val/<name>/teacher_nll."})
    stop_on_collapse: bool = field(default=False, metadata={"help": "Stop training when the collapse rule fires "
                                   "(opsd.collapse; otherwise a warning only)."})
    collapse_nll_rise: float = field(default=0.10, metadata={"help": "Collapse signal: relative rise of the "
                                     "teacher-text NLL over the first validation."})
    collapse_eot_drop: float = field(default=0.25, metadata={"help": "Collapse signal: relative drop of the "
                                     "end-of-turn rate below the first validation's."})
    collapse_distinct_drop: float = field(default=0.5, metadata={"help": "Supporting collapse signal (never alone): "
                                          "relative drop of distinct-2 below the first validation's (0 = off)."})
    collapse_loss_drop: float = field(default=0.05, metadata={"help": "The training loss counts as falling when "
                                      "it dropped by this fraction of its first logged values."})

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
        self.collapse_rule()  # checks the thresholds
        if self.enabled and not self.val_files:
            raise ValueError("Validation is on (--test_freq / --val_before_train, TEST_FREQ / VAL_BEFORE_TRAIN) but "
                             "no --val_files (VAL_FILES) are given.")

    @property
    def enabled(self) -> bool:
        return self.test_freq > 0 or self.val_before_train or self.val_at_end

    def collapse_rule(self):
        from .collapse import CollapseRule

        try:
            return CollapseRule(nll_rise=self.collapse_nll_rise, eot_drop=self.collapse_eot_drop,
                                distinct_drop=self.collapse_distinct_drop, loss_drop=self.collapse_loss_drop)
        except ValueError as err:
            raise ValueError(str(err).replace("collapse rule: ", "--collapse_")) from None


class ValidationCallback(TrainerCallback):
    """Runs `opsd.evaluate.evaluate` on the validation sets at the configured steps and applies the collapse rule
    (see the module docstring)."""

    def __init__(self, trainer, args: ValidationArguments, reward_fn=None):
        from .evaluate import load_benchmark, parse_data_specs

        self.trainer = trainer
        self.args = args
        self.reward_fn = reward_fn
        self.sets = [(name, load_benchmark(path, limit=args.val_limit))
                     for name, path in parse_data_specs(args.val_files)]
        self.path = os.path.join(trainer.args.output_dir, "validation.jsonl")
        self.history: list[dict] = []
        self.rule = args.collapse_rule()
        self.baseline: dict[str, dict] = {}  # set name -> its first validation's signals
        self.teacher_ids: dict[str, list[list[int]] | None] = {}
        self.collapses: list[dict] = []

    def _max_new_tokens(self) -> int:
        return self.args.val_max_new_tokens or self.trainer.args.max_completion_length

    def _teacher_text(self, name: str, dataset) -> list[list[int]] | None:
        """The teacher's greedy completions of a set's prompts (token ids), made once and cached on disk."""
        from trl.models import unwrap_model_for_generation

        from .collapse import load_or_make_teacher_text
        from .evaluate import tokenize_prompts

        if not self.args.val_teacher_nll:
            return None
        if name in self.teacher_ids:
            return self.teacher_ids[name]
        trainer, train_args = self.trainer, self.trainer.args
        tokenizer = trainer.processing_class
        prompt_ids = tokenize_prompts(tokenizer, list(dataset["prompt"]), train_args.chat_template_kwargs,
                                      train_args.max_prompt_length)
        path = os.path.join(train_args.output_dir, f"teacher_text_{name}.json")
        offload = getattr(train_args, "teacher_offload", False)
        if offload:  # the offloaded teacher's backbone is on the CPU: on the accelerator for this one generation
            trainer._place_teacher(trainer.accelerator.device)
        try:
            with unwrap_model_for_generation(trainer.teacher_model, trainer.accelerator) as teacher:
                ids = load_or_make_teacher_text(path, teacher, tokenizer, prompt_ids, self._max_new_tokens(),
                                                self.args.val_batch_size,
                                                write=trainer.accelerator.is_main_process)
        finally:
            if offload:
                import torch

                trainer._place_teacher(torch.device("cpu"))
        self.teacher_ids[name] = ids
        return ids

    def _training_losses(self) -> list[float]:
        return [float(h["loss"]) for h in self.trainer.state.log_history if "loss" in h]

    def validate(self, step: int) -> tuple[dict[str, float], dict]:
        """(metrics for the log, collapse reports per set name: empty when the rule did not fire)."""
        from trl.models import unwrap_model_for_generation

        from .collapse import describe
        from .evaluate import evaluate

        trainer, a = self.trainer, self.args
        train_args = trainer.args
        model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
        was_training = trainer.model.training
        trainer.model.eval()
        metrics: dict[str, float] = {}
        signals: dict[str, dict] = {}
        try:
            teacher_ids = {name: self._teacher_text(name, dataset) for name, dataset in self.sets}
            with unwrap_model_for_generation(
                    model, trainer.accelerator,
                    gradient_checkpointing_kwargs=train_args.gradient_checkpointing_kwargs) as unwrapped:
                for name, dataset in self.sets:
                    result = evaluate(unwrapped, trainer.processing_class, dataset, k=a.val_n,
                                      temperature=a.val_temperature, top_p=a.val_top_p, top_k=a.val_top_k,
                                      max_new_tokens=self._max_new_tokens(),
                                      batch_size=a.val_batch_size, seed=a.val_seed + step, reward_fn=self.reward_fn,
                                      chat_template_kwargs=train_args.chat_template_kwargs,
                                      max_prompt_length=train_args.max_prompt_length, max_completion_chars=0,
                                      progress=False, desc=f"val {name}", teacher_ids=teacher_ids[name])
                    signals[name] = {}
                    for key, value in result["metrics"].items():
                        if key.startswith(("mean@", "pass@", "distinct_")) or key in (
                                "mean_length", "truncated_fraction", "eot_rate", "clipped_ratio", "teacher_nll"):
                            metrics[f"val/{name}/{key}"] = float(value)
                            signals[name][key] = float(value)
        finally:
            trainer.model.train(was_training)
        collapse: dict[str, dict] = {}
        losses = self._training_losses()
        for name, values in signals.items():
            if name not in self.baseline:
                self.baseline[name] = values
                continue
            report = self.rule.check(self.baseline[name], values, losses,
                                     confirmed=any(name in c for c in self.collapses))
            metrics[f"val/{name}/collapse"] = 0.0 if report is None else 1.0
            if report is not None:
                collapse[name] = report
                if trainer.accelerator.is_main_process:
                    print(f"[opsd.validation] WARNING: {describe(name, step, report)}", file=sys.stderr, flush=True)
        record = {"step": step, "metrics": metrics,
                  "settings": {"n": a.val_n, "temperature": a.val_temperature, "top_p": a.val_top_p,
                               "top_k": a.val_top_k, "max_new_tokens": self._max_new_tokens(), "limit": a.val_limit,
                               "collapse_rule": self.rule.to_dict()}}
        if collapse:
            record["collapse"] = collapse
            self.collapses.append({"step": step, **collapse})
        self.history.append(record)
        if trainer.accelerator.is_main_process:
            os.makedirs(train_args.output_dir, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return metrics, collapse

    def _restore_baseline(self, step: int) -> None:
        """On resume: the first validation of the earlier run (validation.jsonl) stays the baseline."""
        if step <= 0 or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("step", step + 1) > step:
                    continue
                for name, _ in self.sets:
                    prefix = f"val/{name}/"
                    values = {k[len(prefix):]: v for k, v in record.get("metrics", {}).items() if k.startswith(prefix)}
                    if values and name not in self.baseline:
                        self.baseline[name] = values

    def on_train_begin(self, args, state, control, **kwargs):
        self._restore_baseline(state.global_step)
        if self.args.val_before_train:
            self.trainer.log(self.validate(state.global_step)[0])  # its own log line, at the starting step

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        last = state.max_steps > 0 and step >= state.max_steps
        periodic = self.args.test_freq > 0 and step % self.args.test_freq == 0
        if periodic or (last and (self.args.test_freq > 0 or self.args.val_at_end)):
            metrics, collapse = self.validate(step)
            # into the step's training metrics: OPDTrainer.log averages _metrics["train"] into the next log line
            for key, value in metrics.items():
                self.trainer._metrics["train"][key].append(value)
            control.should_log = True
            if collapse and self.args.stop_on_collapse:
                if self.trainer.accelerator.is_main_process:
                    print(f"[opsd.validation] stopping at step {step} (--stop_on_collapse)", file=sys.stderr,
                          flush=True)
                control.should_training_stop = True
        return control
