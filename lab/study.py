"""The lab's study: `python -m lab.study [--task NAME ...] [--task_module MOD] [--full] [--controls] [--output_dir DIR]
[--resume]`.

For every task (the tasks registered for the study, lab.tasks.register_task; `--task_module my_tasks` imports a
user module that registers more):
1. Teacher and warm-started student (lab.models.prepare_lab_models; trained once, then cached, each model under its
   own key). Tasks are prepared in parallel worker processes.
2. Selector probe: the warm-started student samples completions of held-out prompts; every token gets the TIP /
   TA-OPD statistics from both models' logits, the task's known positions (`Task.positions_of_interest`) are
   marked, and each configuration's rule is applied at its ratio: kept fraction, precision and recall for those
   positions, the quadrant census, and the spread of the teachability normalization's axes.
3. Distillation runs: every configuration x seed trains a fresh copy of the student through the same trainer code
   path as real runs (opsd.core.trainer.OPDTrainer + tip_ext.trainer.TipSelector) at equal steps, batch and seeds,
   then greedy held-out exact match and held-out KL(student || teacher) on the student's own completions. Runs are
   independent: they go to `--workers` processes with one torch thread each (multi-threaded tiny kernels stall when
   another process takes a core). Each run's training time is measured (process CPU seconds of its steps, per step
   cumulated; per phase from the trainer's time/<phase> logs where present). The all-token run is also evaluated
   on a grid of steps and at the step counts that cost the same lm_head compute as each selective run.
4. Comparisons: paired differences against all tokens over the same seeds and held-out prompts, with bootstrap 95%
   intervals (seeds and prompts resampled), at equal steps, at equal measured time (the headline equal-compute
   comparison) and at equal lm_head compute (on paper); a results table per task, a cross-task table of which
   conclusions hold (`CLAIMS`) and the moonshot table (`moonshot_verdict`).
5. Files: <output_dir>/runs.jsonl (each run appended as it ends; `--resume` reuses them), <output_dir>/<task>/
   report.{md,json}, plots, and <output_dir>/report.md (all tasks + cross-task + moonshot tables).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from .models import LabConfig, default_lab_config, evaluate_student, generate_completions, prepare_lab_models
from .recommend import check_recommendation, recommend
from .tasks import KNOWN_TASKS, get_task, import_task_modules, study_task_names


@dataclass
class RunSpec:
    """One configuration of the study. Everything that belongs to the configuration lives here, not in the study:
    the rule (None = all-token OPD, no statistics pass), its ratio and options, TA-OPD's K."""

    name: str
    selector: str | None
    ratio: float = 1.0
    options: dict = field(default_factory=dict)
    # TA-OPD's K: the lab's vocabularies have 15-18 tokens, so the papers' K = 16 would make both top-K sets nearly
    # the whole vocabulary (support mass ~1, local KL = forward KL); K = 4 keeps the two axes informative.
    support_top_k: int = 4
    weighting: str = "hard"  # "soft": every token kept, weighted by the rule's score (--selector_weighting soft);
    # "mixed": every token kept, the rule's tokens weighted (1 - mix) + mix N/k, the others 1 - mix
    loss_support: str = "full"  # "teacher_free": OPSA's control (opsd.core.estimators), no teacher signal
    mix: float = 0.5  # --selector_mix (weighting "mixed" only)


def _spec(name, selector, ratio, support_top_k=4, weighting="hard", loss_support="full", mix=0.5, **options):
    return RunSpec(name, selector, ratio, options, support_top_k, weighting, loss_support, mix)


ALL_CONFIGS = [
    _spec("all_tokens", None, 1.0),
    _spec("random@0.5", "random", 0.5),
    _spec("random@0.2", "random", 0.2),
    _spec("random@0.1", "random", 0.1),
    _spec("position_first@0.2", "position_first", 0.2),
    _spec("position_last@0.2", "position_last", 0.2),
    _spec("raw_kl@0.2", "divergence_topk", 0.2),
    _spec("raw_kl@0.1", "divergence_topk", 0.1),
    _spec("entropy_sample@0.5", "entropy_sample", 0.5),
    _spec("entropy_sample@0.2", "entropy_sample", 0.2),
    _spec("entropy_kl_sample@0.2", "entropy_sample", 0.2, gamma=1.0),
    _spec("soft_or@0.5", "soft_or", 0.5),
    _spec("soft_or@0.2", "soft_or", 0.2),
    _spec("q3@0.2", "q3", 0.2),
    _spec("q3@0.1", "q3", 0.1),
    _spec("teachability@0.1", "teachability", 0.1),
    _spec("teachability@0.05", "teachability", 0.05),
    _spec("teachability_minmax@0.1", "teachability", 0.1, normalization="minmax"),
    _spec("teachability_minmax@0.05", "teachability", 0.05, normalization="minmax"),
    _spec("teachability_rank@0.1", "teachability", 0.1, normalization="rank"),
    _spec("teachability_rank@0.05", "teachability", 0.05, normalization="rank"),
    _spec("teachability_entropy@0.05", "teachability_entropy", 0.05),
    # the 2026 controls (docs/METHODS.md section "2026 controls")
    _spec("position_first@0.3", "position_first", 0.3),  # IW-OPD: the first 30% of positions
    _spec("opsa_soft_or@0.2", "soft_or", 0.2, loss_support="teacher_free"),  # OPSA: soft-OR's kept tokens, no teacher
    _spec("opsa_entropy_sample@0.2", "entropy_sample", 0.2, loss_support="teacher_free"),
    _spec("soft_or_soft", "soft_or", 0.2, weighting="soft"),  # FiRe-OPD: soft weighting by soft-OR's score
    _spec("entropy_sample_soft", "entropy_sample", 0.2, weighting="soft"),  # weights proportional to entropy
    _spec("entropy_kl_sample_soft", "entropy_sample", 0.2, weighting="soft", gamma=1.0),  # entropy x KL weights
    # the moonshot candidates: every token anchors the update, the rule's 20% get 3x the weight of the rest
    _spec("soft_or_mixed@0.2", "soft_or", 0.2, weighting="mixed"),
    _spec("entropy_kl_sample_mixed@0.2", "entropy_sample", 0.2, weighting="mixed", gamma=1.0),
]
CONFIGS = {c.name: c for c in ALL_CONFIGS}
# The demo's set: every claim of the cross-task table at the budgets that decide it, sized for 10 minutes on 2 cores.
DEFAULT_CONFIG_NAMES = ("all_tokens", "random@0.2", "raw_kl@0.1", "entropy_sample@0.2", "entropy_kl_sample@0.2",
                        "soft_or@0.2", "q3@0.1", "teachability@0.1", "teachability_minmax@0.1",
                        "teachability_rank@0.1")
# The 2026 controls and the moonshot candidates (`--configs` or `--controls`).
CONTROL_CONFIG_NAMES = ("all_tokens", "soft_or@0.2", "entropy_sample@0.2", "entropy_kl_sample@0.2",
                        "position_first@0.3", "opsa_soft_or@0.2", "opsa_entropy_sample@0.2", "soft_or_soft",
                        "entropy_sample_soft", "entropy_kl_sample_soft")


@dataclass
class StudySettings:
    seeds: tuple = (0, 1, 2)
    steps: int = 40
    batch_size: int = 32
    learning_rate: float = 5e-4  # 2e-3 made all-token OPD diverge on the addition lab (EM 0.22 -> 0.13)
    n_eval: int = 300
    n_probe: int = 200
    workers: int = 0  # 0: one per available core
    bootstrap: int = 2000


PRESETS = {
    "default": StudySettings(),
    "full": StudySettings(seeds=(0, 1, 2, 3, 4), steps=120, n_eval=500, n_probe=500),
    "smoke": StudySettings(seeds=(0,), steps=2, batch_size=8, n_eval=16, n_probe=16, bootstrap=200),
}


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 10 ms from /proc."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: fall back to the process peak
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.extra_gb = (self.peak - self.start) / 2**30


# ------------------------------------------------------------------------------------------- compute accounting
def needs_statistics(spec: RunSpec) -> bool:
    """Whether the rule needs the statistics pass (rules reading no statistic skip it when the census is off)."""
    from tip_ext.selectors import needed_stats

    return spec.selector is not None and bool(needed_stats(spec.selector, **spec.options))


def compute_ratio(spec: RunSpec, kept_fraction: float) -> float:
    """lm_head compute of one selective step relative to one all-token step (MEASUREMENTS.md's floor): an
    all-token step costs 6 row-projections per token (student and teacher forward, recompute, two gradient
    matmuls), a selective step 2 per token for the statistics pass (student and teacher) plus 6 per kept token."""
    if spec.selector is None:
        return 1.0
    return (2.0 * needs_statistics(spec) + 6.0 * kept_fraction) / 6.0


def equal_time_step(cpu_at_step: list[float], seconds: float) -> tuple[float, bool]:
    """The (fractional) step at which a run whose cumulative measured time after step s is ``cpu_at_step[s-1]``
    has used ``seconds``, linear between steps (0 s at step 0); (last step, True) when it never does (the other
    run took longer than the whole of this one)."""
    prev_t, prev_s = 0.0, 0
    for s, t in enumerate(cpu_at_step, 1):
        if t >= seconds:
            if t == prev_t:
                return float(s), False
            return prev_s + (seconds - prev_t) / (t - prev_t) * (s - prev_s), False
        prev_t, prev_s = t, s
    return float(len(cpu_at_step)), True


# ------------------------------------------------------------------------------------------- selector probe
@torch.no_grad()
def probe_selectors(student, teacher, tokenizer, prompts, configs, max_new_tokens, seed=0, task=None) -> dict:
    """Kept fraction, precision / recall for the task's known positions, quadrant census and normalization spread of
    each configuration's rule on the warm-started student's sampled completions."""
    from tip_ext import quadrant_census, select, token_stats
    from tip_ext.selectors import normalization_spread

    if task is None:
        raise ValueError("probe_selectors needs task= (a registered task name or a Task)")
    task = get_task(task)
    comps = generate_completions(student, tokenizer, prompts, max_new_tokens, greedy=False, seed=seed)
    s_rows, t_rows, labels, seq = [], [], [], []
    known = True
    for i, (prompt, comp) in enumerate(zip(prompts, comps)):
        if comp.numel() == 0:
            continue
        prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"])
        ids = torch.cat([prompt_ids, comp])[None]
        rows = slice(len(prompt_ids) - 1, ids.shape[1] - 1)  # positions predicting the completion tokens
        s_rows.append(student(input_ids=ids).logits[0, rows])
        t_rows.append(teacher(input_ids=ids).logits[0, rows])
        marks = task.positions_of_interest(prompt, comp.tolist(), tokenizer)
        known = known and marks is not None
        labels += marks if marks is not None else [False] * comp.numel()
        seq += [i] * comp.numel()
    is_known = torch.tensor(labels, dtype=torch.bool)
    seq = torch.tensor(seq)
    out = {"tokens": int(is_known.numel()), "known_positions": int(is_known.sum()) if known else None,
           "selectors": {}, "spread": {}}
    by_k: dict[int, dict] = {}
    for spec in configs:
        if spec.support_top_k not in by_k:
            by_k[spec.support_top_k] = token_stats(torch.cat(s_rows), torch.cat(t_rows), top_k=spec.support_top_k)
    stats = next(iter(by_k.values()))
    from .recommend import regime_from_stats

    out["regime"] = regime_from_stats(stats)  # what lab.recommend reads from a pair
    census = quadrant_census(stats["entropy_norm"], stats["reverse_kl"], is_known)
    out["census_all"] = {q: census[f"all/{q}"] for q in ("Q1", "Q2", "Q3", "Q4")}
    out["census_known"] = {q: census[f"kept/{q}"] for q in ("Q1", "Q2", "Q3", "Q4")}
    for spec in configs:
        st = by_k[spec.support_top_k]
        keep = (torch.ones_like(is_known) if spec.selector is None else
                select(spec.selector, st, spec.ratio, sequence_ids=seq, generator=torch.Generator().manual_seed(seed),
                       weighting=spec.weighting, mix=spec.mix, **spec.options).keep)
        hits = int((keep & is_known).sum())
        kept_census = quadrant_census(st["entropy_norm"], st["reverse_kl"], keep)
        out["selectors"][spec.name] = {
            "kept_fraction": keep.float().mean().item(),
            "precision": hits / max(int(keep.sum()), 1) if known else None,
            "recall": hits / max(int(is_known.sum()), 1) if known else None,
            "kept_census": {q: kept_census[f"kept/{q}"] for q in ("Q1", "Q2", "Q3", "Q4")},
        }
        if spec.selector is not None:
            spread = normalization_spread(spec.selector, st, **spec.options)
            if spread:
                out["spread"][f"K={spec.support_top_k}"] = spread
    return out


# ------------------------------------------------------------------------------------------- distillation runs
def _quiet():
    """Library chatter off in the lab's processes: transformers' and peft's warnings and progress bars, and the
    line bitsandbytes logs on AVX512-BF16 CPUs when it cannot fetch an optional kernel from the hub (it never
    needs to: the lab's runs use no 4-bit layers)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="(transformers|peft)")
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _worker_init(task_modules=()):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _quiet()
    import_task_modules(task_modules)  # user tasks register themselves in every worker too


PHASES = ("generation", "teacher", "statistics", "forward_backward", "optimizer")  # the trainer's time/<phase> logs


def run_distillation(spec: RunSpec, seed: int, paths: dict, settings: StudySettings, max_new_tokens: int,
                     eval_prompts: list[str], work_dir: str, task, eval_at_steps: tuple = ()) -> dict:
    """One OPD run through the real trainer; returns its metrics. `eval_at_steps`: also evaluate the student after
    those steps (the all-token run's equal-compute points; the schedule is constant, so the state after s steps is
    the state of an s-step run).

    Measured compute: ``train_cpu_seconds`` is the process CPU time of the training steps (this worker runs one
    torch thread, so CPU time is the time the run occupied a core; generation, teacher, statistics, student
    forward/backward and optimizer included; model loading and every evaluation excluded), ``cpu_at_step`` its
    cumulative value after each step, ``phase_seconds`` the sum of the trainer's per-step ``time/<phase>`` logs
    where the trainer writes them (empty otherwise)."""
    from opsd.core.models import load_causal_lm, load_tokenizer
    from opsd.core.trainer import OPDTrainer
    from opsd.data import load_prompt_dataset

    if task is None:
        raise ValueError("run_distillation needs task= (a registered task name or a Task)")
    task = get_task(task)
    tokenizer = load_tokenizer(paths["tokenizer"])
    args, selector = opd_setup(spec, seed, os.path.join(work_dir, f"{spec.name}-seed{seed}"), settings.steps,
                               settings.batch_size, settings.learning_rate, max_new_tokens)
    teacher_ref = [None]

    def make_trainer(callback):
        trainer = OPDTrainer(load_causal_lm(paths["student"]), paths["teacher"], args=args,
                             train_dataset=load_prompt_dataset(paths["train_prompts"]), processing_class=tokenizer,
                             token_selector=selector, callbacks=[callback])
        teacher_ref[0] = trainer.accelerator.unwrap_model(trainer.teacher_model)
        return trainer

    timed = train_timed(make_trainer, settings.steps, eval_at_steps,
                        lambda model, step: evaluate_student(model, teacher_ref[0], tokenizer, eval_prompts,
                                                             max_new_tokens, task))
    trainer, checkpoints = timed["trainer"], timed["checkpoints"]
    t = time.perf_counter()
    final = evaluate_student(trainer.model.eval(), teacher_ref[0], tokenizer, eval_prompts, max_new_tokens, task)
    timed["eval_seconds"] += time.perf_counter() - t
    checkpoints[settings.steps] = final
    return {
        "task": task.name, "config": spec.name, "seed": seed, "selector": spec.selector, "ratio": spec.ratio,
        "weighting": spec.weighting, "loss_support": spec.loss_support,
        "exact_match": final["exact_match"], "heldout_kl": final["heldout_kl"], "correct": final["correct"],
        **log_summary(trainer, spec),
        "checkpoints": {str(s): {"exact_match": c["exact_match"], "heldout_kl": c["heldout_kl"], "correct": c["correct"]}
                        for s, c in sorted(checkpoints.items())},
        **{k: timed[k] for k in ("setup_seconds", "train_seconds", "eval_seconds", "train_cpu_seconds", "cpu_at_step",
                                 "peak_extra_gb")},
    }


def opd_setup(spec: RunSpec, seed: int, output_dir: str, steps: int, batch_size: int, learning_rate: float,
              max_new_tokens: int, support_top_k: int | None = None):
    """(OPDConfig, selector) of one study run: constant learning rate, temperature-1 rollouts, CPU, no saving, one
    log per step; `support_top_k` overrides the configuration's TA-OPD K (the lab's tiny vocabularies use 4)."""
    from opsd.core.config import OPDConfig
    from tip_ext.trainer import SelectorConfig, make_selector

    args = OPDConfig(
        output_dir=output_dir, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        max_completion_length=max_new_tokens, temperature=1.0, bf16=False, gradient_checkpointing=False,
        use_cpu=True, save_strategy="no", report_to=[], logging_steps=1, seed=seed, disable_tqdm=True,
        chunk_size=512, loss_support=spec.loss_support,
    )
    # census off: its statistics and overlap diagnostics are extra passes no rule needs, and the measured time must be
    # the rule's own cost (the probe reports the census instead)
    selector = make_selector(SelectorConfig(
        selector=spec.selector, ratio=spec.ratio, selector_options=spec.options or None,
        support_top_k=support_top_k or spec.support_top_k, selector_weighting=spec.weighting, selector_mix=spec.mix,
        census=False))
    return args, selector


def train_timed(make_trainer, steps: int, eval_at_steps, evaluate, progress=None) -> dict:
    """Build a trainer with `make_trainer(callback)` and train it, measuring what the study compares: the process CPU
    time of the training steps (`train_cpu_seconds`, cumulative per step in `cpu_at_step`; every evaluation
    excluded), wall seconds of set-up, training and evaluation, and the peak extra resident memory. After each step in
    `eval_at_steps` (below `steps`) the student is evaluated with `evaluate(model, step)` into `checkpoints[step]`.
    `progress(step, cpu_seconds)`, when given, is called after every step. Returns those plus the trained `trainer`."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    checkpoints: dict[int, dict] = {}
    clock = {"start": None, "eval_cpu": 0.0, "eval_wall": 0.0, "at_step": []}

    class _ClockAndEval(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.process_time()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            clock["at_step"].append(time.process_time() - clock["start"] - clock["eval_cpu"])
            if progress is not None:
                progress(state.global_step, clock["at_step"][-1])
            if state.global_step in eval_at_steps and state.global_step < steps:
                t, c = time.perf_counter(), time.process_time()
                was = model.training
                model.eval()
                checkpoints[state.global_step] = evaluate(model, state.global_step)
                model.train(was)
                clock["eval_wall"] += time.perf_counter() - t
                clock["eval_cpu"] += time.process_time() - c

    with PeakRSS() as memory:
        start = time.perf_counter()
        trainer = make_trainer(_ClockAndEval())
        trainer.remove_callback(PrinterCallback)  # per-step logs stay in the report, not on the terminal
        setup_seconds = time.perf_counter() - start
        trainer.train()
        train_seconds = time.perf_counter() - start - setup_seconds - clock["eval_wall"]
    return {"trainer": trainer, "checkpoints": checkpoints, "setup_seconds": setup_seconds,
            "train_seconds": train_seconds, "eval_seconds": clock["eval_wall"],
            "train_cpu_seconds": clock["at_step"][-1] if clock["at_step"] else 0.0, "cpu_at_step": clock["at_step"],
            "peak_extra_gb": memory.extra_gb}


def log_summary(trainer, spec: RunSpec) -> dict:
    """From the trainer's per-step logs: kept and generated tokens, the kept fraction and lm_head compute ratio, the
    share of steps on which each normalization axis was degenerate, the per-phase seconds, the final loss."""
    logs = [h for h in trainer.state.log_history if "loss" in h]
    kept = sum(h.get("kept_tokens", 0) for h in logs)
    generated = sum(h["kept_tokens"] / h["kept_fraction"] for h in logs if h.get("kept_fraction"))
    degenerate = {k: sum(h.get(k, 0.0) for h in logs) / max(len(logs), 1)
                  for k in sorted({k for h in logs for k in h if k.startswith("norm/") and k.endswith("/degenerate")})}
    phases = {p: sum(h[f"time/{p}"] for h in logs if f"time/{p}" in h) for p in PHASES
              if any(f"time/{p}" in h for h in logs)}
    kept_fraction = kept / max(generated, 1)
    return {"kept_tokens": kept, "generated_tokens": generated, "kept_fraction": kept_fraction,
            "compute_ratio": compute_ratio(spec, kept_fraction), "degenerate_steps": degenerate,
            "phase_seconds": phases, "final_loss": logs[-1]["loss"] if logs else None, "losses": [h["loss"] for h in logs]}


def _run_job(job):
    return run_distillation(*job[:-2], task=job[-2], eval_at_steps=job[-1])


def equal_time_grid(steps: int) -> list[int]:
    """Steps at which the all-token run is evaluated for the equal-measured-time comparison (every 1/8 of the run;
    the flags between two evaluated steps are interpolated)."""
    every = max(1, steps // 8)
    return list(range(every, steps, every))


def _prepare_job(job):
    cache_dir, cfg_dict, progress, retrain = job
    return prepare_lab_models(cache_dir, LabConfig.from_dict(cfg_dict), force=retrain, progress=progress)


def _imap(fn, jobs: list, workers: int, task_modules=()):
    """fn(job) for every job, yielded as they finish: in `workers` spawned processes (1 torch thread each, the
    user's task modules imported), or in this process when workers == 1."""
    if workers <= 1:
        for job in jobs:
            yield fn(job)
        return
    import multiprocessing as mp

    # spawn, not fork: a forked child inherits the parent's OpenMP state and can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(tuple(task_modules),)) as pool:
        for fut in as_completed([pool.submit(fn, job) for job in jobs]):
            yield fut.result()


# ------------------------------------------------------------------------------------------- statistics
def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def equal_compute_flags(all_runs: dict[int, dict], seed: int, steps_total: int, ratio: float):
    """Per-prompt correctness of the all-token run of `seed` after `ratio * steps_total` steps, linearly interpolated
    between the two nearest evaluated step counts (step 0 = the warm start, stored under "0")."""
    return flags_at_step(all_runs[seed], ratio * steps_total)


def equal_time_flags(all_runs: dict[int, dict], seed: int, cpu_seconds: float):
    """(flags, step, capped): the all-token run of `seed` where its cumulative measured time equals `cpu_seconds`
    (`equal_time_step`), flags interpolated like `equal_compute_flags`; capped when the all-token run finished
    sooner (then its final state)."""
    step, capped = equal_time_step(all_runs[seed]["cpu_at_step"], cpu_seconds)
    return flags_at_step(all_runs[seed], step), step, capped


def flags_at_step(run: dict, target: float):
    """Per-prompt correctness of `run` after `target` (fractional) steps, linear between evaluated steps."""
    points = sorted((int(s), np.asarray(c["correct"], float)) for s, c in run["checkpoints"].items())
    lo = max((p for p in points if p[0] <= target), key=lambda p: p[0], default=points[0])
    hi = min((p for p in points if p[0] >= target), key=lambda p: p[0], default=points[-1])
    if hi[0] == lo[0]:
        return lo[1]
    w = (target - lo[0]) / (hi[0] - lo[0])
    return (1 - w) * lo[1] + w * hi[1]


def paired_interval(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    """Mean of a - b ([seeds, prompts] arrays, paired by seed and prompt) with a 95% percentile bootstrap interval;
    seeds and prompts are resampled with replacement (the same prompt resample for every seed)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    rng = np.random.default_rng(seed)
    n_s, n_p = d.shape
    boots = np.empty(n_boot)
    for i in range(n_boot):
        rs = rng.integers(0, n_s, n_s)
        rp = rng.integers(0, n_p, n_p)
        boots[i] = d[np.ix_(rs, rp)].mean()
    lo, hi = np.percentile(boots, [2.5, 97.5]) if n_boot else (float("nan"), float("nan"))
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def summarize(runs: list[dict], configs: list[RunSpec], settings: StudySettings, start: dict) -> list[dict]:
    base = {r["seed"]: r for r in runs if r["config"] == "all_tokens"}
    start_flags = np.asarray(start["correct"], float)
    rows = []
    for spec in configs:
        mine = sorted((r for r in runs if r["config"] == spec.name), key=lambda r: r["seed"])
        if not mine:
            continue
        row = {"config": spec.name, "selector": spec.selector or "none (all tokens)", "ratio": spec.ratio,
               "options": spec.options, "seeds": len(mine)}
        for key in ("exact_match", "heldout_kl", "kept_fraction", "compute_ratio", "setup_seconds", "train_seconds",
                    "eval_seconds", "peak_extra_gb", "train_cpu_seconds"):
            row[key], row[f"{key}_sd"] = _mean_sd([r.get(key) for r in mine])
        phases = sorted({p for r in mine for p in r.get("phase_seconds") or {}})
        row["phase_share"] = {p: statistics.fmean((r.get("phase_seconds") or {}).get(p, 0.0)
                                                  / max(r.get("train_cpu_seconds") or 0.0, 1e-9) for r in mine)
                              for p in phases}
        axes = sorted({k for r in mine for k in r["degenerate_steps"]})
        row["degenerate_steps"] = {k: statistics.fmean(r["degenerate_steps"].get(k, 0.0) for r in mine) for k in axes}
        flags = np.stack([np.asarray(r["correct"], float) for r in mine])
        row["vs_start"] = paired_interval(flags, np.tile(start_flags, (len(mine), 1)), settings.bootstrap)
        paired = [r for r in mine if r["seed"] in base]
        if paired and spec.selector is not None:
            a = np.stack([np.asarray(r["correct"], float) for r in paired])
            row["vs_all_equal_steps"] = paired_interval(
                a, np.stack([np.asarray(base[r["seed"]]["correct"], float) for r in paired]), settings.bootstrap)
            row["vs_all_equal_compute"] = paired_interval(
                a, np.stack([equal_compute_flags(base, r["seed"], settings.steps, r["compute_ratio"]) for r in paired]),
                settings.bootstrap)
            timed = [r for r in paired if r.get("train_cpu_seconds") and base[r["seed"]].get("cpu_at_step")]
            if timed:
                at = [equal_time_flags(base, r["seed"], r["train_cpu_seconds"]) for r in timed]
                row["time_ratio"] = statistics.fmean(r["train_cpu_seconds"] / base[r["seed"]]["train_cpu_seconds"]
                                                     for r in timed)
                row["equal_time_step"] = statistics.fmean(x[1] for x in at)
                row["equal_time_capped"] = sum(x[2] for x in at) / len(at)
                row["vs_all_equal_time"] = paired_interval(
                    np.stack([np.asarray(r["correct"], float) for r in timed]), np.stack([x[0] for x in at]),
                    settings.bootstrap)
        elif spec.selector is None:
            row["time_ratio"] = 1.0
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- claims
def _verdict(iv: dict | None, want: str) -> str:
    """`want`: "above" (lo > 0 holds), "below" (hi < 0 holds), "match" (interval contains 0, or is above: holds)."""
    if iv is None:
        return "not run"
    lo, hi = iv["lo"], iv["hi"]
    text = f"{iv['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    if want == "above":
        ok = "holds" if lo > 0 else ("fails" if hi < 0 else "unresolved")
    elif want == "below":
        ok = "holds" if hi < 0 else ("fails" if lo > 0 else "unresolved")
    else:  # "matches" = not resolved as worse: the interval reaches 0 or lies above it
        ok = "fails" if hi < 0 else "holds"
    return f"{ok}: {text}"


def _diff(rows: dict, a: str, b: str, runs: list[dict], settings: StudySettings) -> dict | None:
    ra = sorted((r for r in runs if r["config"] == a), key=lambda r: r["seed"])
    rb = {r["seed"]: r for r in runs if r["config"] == b}
    ra = [r for r in ra if r["seed"] in rb]
    if not ra:
        return None
    return paired_interval(np.stack([np.asarray(r["correct"], float) for r in ra]),
                           np.stack([np.asarray(rb[r["seed"]]["correct"], float) for r in ra]), settings.bootstrap)


# (claim, how it is tested): each test returns an interval and the direction that supports the claim
CLAIMS = [
    ("OPD (all tokens) beats the warm start", lambda rows, runs, s: (rows.get("all_tokens", {}).get("vs_start"), "above")),
    ("entropy sampling 20% matches all tokens at equal steps (TIP)",
     lambda rows, runs, s: (rows.get("entropy_sample@0.2", {}).get("vs_all_equal_steps"), "match")),
    ("soft-OR 20% matches all tokens at equal steps (TIP)",
     lambda rows, runs, s: (rows.get("soft_or@0.2", {}).get("vs_all_equal_steps"), "match")),
    ("Q3-only 10% matches all tokens at equal steps (TIP)",
     lambda rows, runs, s: (rows.get("q3@0.1", {}).get("vs_all_equal_steps"), "match")),
    ("random 20% is worse than all tokens (control)",
     lambda rows, runs, s: (rows.get("random@0.2", {}).get("vs_all_equal_steps"), "below")),
    ("teachability 10% beats raw reverse-KL top 10% (TA-OPD)",
     lambda rows, runs, s: (_diff(rows, "teachability@0.1", "raw_kl@0.1", runs, s), "above")),
    ("teachability 10% matches all tokens at equal steps (TA-OPD)",
     lambda rows, runs, s: (rows.get("teachability@0.1", {}).get("vs_all_equal_steps"), "match")),
    ("min-max normalization beats TA-OPD's q05/q95 at 10%",
     lambda rows, runs, s: (_diff(rows, "teachability_minmax@0.1", "teachability@0.1", runs, s), "above")),
    ("rank normalization beats TA-OPD's q05/q95 at 10%",
     lambda rows, runs, s: (_diff(rows, "teachability_rank@0.1", "teachability@0.1", runs, s), "above")),
    ("entropy x KL sampling 20% beats all tokens at equal measured time",
     lambda rows, runs, s: (rows.get("entropy_kl_sample@0.2", {}).get("vs_all_equal_time"), "above")),
    ("entropy sampling 20% beats all tokens at equal measured time",
     lambda rows, runs, s: (rows.get("entropy_sample@0.2", {}).get("vs_all_equal_time"), "above")),
    ("soft-OR 20% beats all tokens at equal measured time",
     lambda rows, runs, s: (rows.get("soft_or@0.2", {}).get("vs_all_equal_time"), "above")),
    # the 2026 controls
    ("first 30% of positions matches all tokens at equal steps (IW-OPD)",
     lambda rows, runs, s: (rows.get("position_first@0.3", {}).get("vs_all_equal_steps"), "match")),
    ("teacher-free update on soft-OR's kept tokens matches the teacher signal on them (OPSA)",
     lambda rows, runs, s: (_diff(rows, "opsa_soft_or@0.2", "soft_or@0.2", runs, s), "match")),
    ("teacher-free update on entropy-sampled tokens matches the teacher signal on them (OPSA)",
     lambda rows, runs, s: (_diff(rows, "opsa_entropy_sample@0.2", "entropy_sample@0.2", runs, s), "match")),
    ("soft weighting by soft-OR's score beats its hard top 20% (FiRe-OPD)",
     lambda rows, runs, s: (_diff(rows, "soft_or_soft", "soft_or@0.2", runs, s), "above")),
    ("soft weighting by entropy beats entropy sampling 20% (FiRe-OPD)",
     lambda rows, runs, s: (_diff(rows, "entropy_sample_soft", "entropy_sample@0.2", runs, s), "above")),
    # the moonshot: beats all tokens at equal steps AND is no slower in measured time (see `moonshot_verdict`)
    ("soft weighting by entropy x KL beats all tokens at equal steps (moonshot candidate)",
     lambda rows, runs, s: (rows.get("entropy_kl_sample_soft", {}).get("vs_all_equal_steps"), "above")),
    ("soft weighting by soft-OR's score beats all tokens at equal steps (moonshot candidate)",
     lambda rows, runs, s: (rows.get("soft_or_soft", {}).get("vs_all_equal_steps"), "above")),
    ("all tokens + 3x weight on soft-OR's 20% beats all tokens at equal steps (moonshot candidate)",
     lambda rows, runs, s: (rows.get("soft_or_mixed@0.2", {}).get("vs_all_equal_steps"), "above")),
    ("all tokens + 3x weight on entropy x KL sampled 20% beats all tokens at equal steps (moonshot candidate)",
     lambda rows, runs, s: (rows.get("entropy_kl_sample_mixed@0.2", {}).get("vs_all_equal_steps"), "above")),
]


def moonshot_verdict(task_results: dict) -> list[dict]:
    """Per configuration: does it beat all tokens at equal steps (95% interval above 0) on every task, with a
    measured time ratio <= 1 (the issue's bar)? Rows sorted by the worst task's lower bound (the nearest miss first)."""
    out = {}
    for task, res in task_results.items():
        for row in res["summary"]:
            iv = row.get("vs_all_equal_steps")
            if iv is None:
                continue
            entry = out.setdefault(row["config"], {"config": row["config"], "tasks": {}})
            entry["tasks"][task] = {"mean": iv["mean"], "lo": iv["lo"], "hi": iv["hi"],
                                    "time_ratio": row.get("time_ratio"), "seeds": row["seeds"]}
    rows = []
    for entry in out.values():
        t = entry["tasks"]
        entry["complete"] = set(t) == set(task_results)
        entry["worst_lo"] = min(v["lo"] for v in t.values())
        entry["beats_everywhere"] = entry["complete"] and all(v["lo"] > 0 for v in t.values())
        entry["no_slower"] = entry["complete"] and all(v["time_ratio"] is not None and v["time_ratio"] <= 1.0
                                                       for v in t.values())
        entry["met"] = entry["beats_everywhere"] and entry["no_slower"] and all(v["seeds"] >= 5 for v in t.values())
        rows.append(entry)
    return sorted(rows, key=lambda e: -e["worst_lo"])


def claim_table(task_results: dict) -> list[dict]:
    out = []
    for claim, test in CLAIMS:
        row = {"claim": claim}
        for task, res in task_results.items():
            rows = {r["config"]: r for r in res["summary"]}
            iv, want = test(rows, res["runs"], StudySettings(**{**res["settings"], "seeds": tuple(res["settings"]["seeds"])}))
            row[task] = _verdict(iv, want)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------- report
def _fmt(mean, sd, digits=3):
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if not sd else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _fi(iv: dict | None) -> str:
    return "" if iv is None else f"{iv['mean']:+.3f} [{iv['lo']:+.3f}, {iv['hi']:+.3f}]"


def format_report(result: dict) -> str:
    lab, probe, settings, start = result["lab"], result["probe"], result["settings"], result["start"]
    task = result["task"]
    lines = [
        f"## Task `{task}`", "",
        f"Regime: {get_task(task).regime}.", "",
        f"{settings['steps']} OPD steps x batch {settings['batch_size']}, lr {settings['learning_rate']}, seeds "
        f"{list(settings['seeds'])}; {settings['n_eval']} held-out prompts; {result['workers']} worker processes x 1 "
        f"thread; wall time of this task {result['wall_seconds']:.0f} s (models {'cached' if lab['cached'] else 'trained'}"
        f" {lab['prepare_seconds']:.0f} s).", "",
        f"Teacher exact match {lab['teacher_exact_match']:.3f}; warm-started student {start['exact_match']:.3f}, "
        f"held-out KL {start['heldout_kl']:.3f} (before distillation).", "",
        "Differences are paired against all tokens over the same seeds and held-out prompts (bootstrap 95% over "
        "seeds x prompts). Equal time (the headline equal-compute comparison): the all-token run of the same seed "
        "at the step where its cumulative measured training time (process CPU seconds, one thread: generation, "
        "teacher, statistics, forward/backward and optimizer; evaluations excluded) equals this run's total, "
        "interpolated between evaluated steps; `time` is this run's measured time over the all-token run's "
        "(a `*` marks rows where all tokens finished sooner, so it is compared at its last step, which favours the "
        "rule). lm_head compute (second column, on paper only): all tokens after compute_ratio x steps, counting "
        "lm_head row-projections.", "",
        "| config | kept | time | lm_head | exact match | held-out KL | vs all, equal steps | "
        "vs all, equal measured time | vs all, equal lm_head compute | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        capped = "*" if row.get("equal_time_capped") else ""
        lines.append(
            f"| {row['config']} | {_fmt(row['kept_fraction'], 0)} | {_fmt(row.get('time_ratio'), 0, 2)}{capped} | "
            f"{_fmt(row['compute_ratio'], 0, 2)} | "
            f"{_fmt(row['exact_match'], row['exact_match_sd'])} | {_fmt(row['heldout_kl'], row['heldout_kl_sd'], 2)} | "
            f"{_fi(row.get('vs_all_equal_steps'))} | {_fi(row.get('vs_all_equal_time'))} | "
            f"{_fi(row.get('vs_all_equal_compute'))} | {_fmt(row.get('train_cpu_seconds'), 0, 1)} |")
    shares = [f"{row['config']}: " + ", ".join(f"{p} {v:.0%}" for p, v in row["phase_share"].items())
              for row in result["summary"] if row.get("phase_share")]
    if shares:
        lines += ["", "Share of measured training time per phase (the trainer's time/<phase> logs): "
                  + "; ".join(shares) + "."]
    degenerate = [f"{row['config']}: " + ", ".join(f"{k.split('/')[1]} {v:.0%}" for k, v in row["degenerate_steps"].items())
                  for row in result["summary"] if row.get("degenerate_steps")]
    if degenerate:
        lines += ["", "Share of training steps with a degenerate normalization axis (logged as norm/<axis>/degenerate): "
                  + "; ".join(degenerate) + "."]
    rec = result.get("recommendation")
    if rec:
        lines += ["", f"Recommendation (lab.recommend, from the probe's regime): {rec['config']}, normalization "
                  f"{rec['normalization']}; the study's best selective rule at equal steps: {rec['best']}; verdict: "
                  f"{rec['verdict']}" + (f" ({_fi(rec['interval'])})" if rec.get("interval") else "") + "."]
    known = probe["known_positions"]
    lines += [
        "", f"Selector probe: {probe['tokens']} sampled tokens of the warm-started student"
        + (f", {known} known positions ({known / max(probe['tokens'], 1):.1%})" if known is not None else "")
        + ". Census (median thresholds) of all tokens: "
        + ", ".join(f"{q} {v:.2f}" for q, v in probe["census_all"].items())
        + ("; of the known positions: " + ", ".join(f"{q} {v:.2f}" for q, v in probe["census_known"].items())
           if known else "") + ".", "",
        "| config | kept fraction | precision | recall | kept Q1 | kept Q2 | kept Q3 | kept Q4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in probe["selectors"].items():
        c = s["kept_census"]
        p = "n/a" if s["precision"] is None else f"{s['precision']:.3f}"
        r = "n/a" if s["recall"] is None else f"{s['recall']:.3f}"
        lines.append(f"| {name} | {s['kept_fraction']:.3f} | {p} | {r} | "
                     f"{c['Q1']:.2f} | {c['Q2']:.2f} | {c['Q3']:.2f} | {c['Q4']:.2f} |")
    for k, spread in probe["spread"].items():
        lines += ["", f"Normalization spread on the probe ({k}): " + "; ".join(
            f"{axis} q05 {v['q_low']:.3f} q95 {v['q_high']:.3f} min {v['min']:.3f} max {v['max']:.3f}"
            + (" (degenerate)" if v["degenerate"] else "") for axis, v in spread.items()) + "."]
    return "\n".join(lines) + "\n"


def format_cross_task(claims: list[dict], tasks: list[str]) -> str:
    lines = ["## Which conclusions hold on which task", "",
             "| claim | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for row in claims:
        lines.append(f"| {row['claim']} | " + " | ".join(row[t] for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def format_recommendations(recs: dict) -> str:
    """lab.recommend's pick per task against the study's best selective rule at equal steps."""
    lines = ["## Which rule for my pair? lab.recommend vs the study", "",
             "| task | recommended | normalization | study's best rule | verdict | recommended - best |",
             "|---|---|---|---|---|---|"]
    for t, r in recs.items():
        lines.append(f"| {t} | {r['config']} | {r['normalization']} | {r['best']} | {r['verdict']} | "
                     f"{_fi(r.get('interval'))} |")
    picked = sum(r["verdict"] in ("best", "tied") for r in recs.values())
    lines += ["", f"Picked the best or a statistically tied rule on {picked} of {len(recs)} tasks."]
    return "\n".join(lines) + "\n"


def format_moonshot(rows: list[dict], tasks: list[str]) -> str:
    """The moonshot table: each configuration vs all tokens at equal steps on every task, with its time ratio."""
    lines = ["## Moonshot: beats all tokens at equal steps on every task, no slower in measured time", "",
             "| config | " + " | ".join(tasks) + " | met |", "|---|" + "---|" * (len(tasks) + 1)]
    for e in rows:
        cells = []
        for t in tasks:
            v = e["tasks"].get(t)
            cells.append("not run" if v is None else
                         f"{v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}] time {_fmt(v['time_ratio'], 0, 2)}")
        verdict = ("yes" if e["met"] else "no: " + ", ".join(
            w for w, bad in (("not on every task", not e["complete"]), ("interval not above 0", not e["beats_everywhere"]),
                             ("slower", not e["no_slower"])) if bad) or "no: fewer than 5 seeds")
        lines.append(f"| {e['config']} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def plot_report(result: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    families = {}
    for row in result["summary"]:
        families.setdefault(row["selector"] + str(row["options"] or ""), []).append(row)
    for family, rows in families.items():
        rows = sorted(rows, key=lambda r: r["kept_fraction"])
        ax.errorbar([r["kept_fraction"] for r in rows], [r["exact_match"] for r in rows],
                    yerr=[r["exact_match_sd"] or 0 for r in rows], marker="o", capsize=3, label=family)
    ax.axhline(result["start"]["exact_match"], color="0.5", ls=":", label="warm start")
    ax.set_xscale("log")
    ax.set_xlabel("kept fraction of generated tokens")
    ax.set_ylabel("held-out exact match after OPD")
    ax.set_title(result["task"])
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = os.path.join(out_dir, "accuracy_vs_budget.png")
    fig.savefig(path)
    plt.close(fig)
    return [path]


# ------------------------------------------------------------------------------------------- study
def _eval_prompts(paths, n):
    with open(paths["eval_prompts"]) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()][:n]


def _job_key(task: str, lab_key: str, spec: RunSpec, seed: int, settings: StudySettings, eval_steps) -> str:
    """What decides a run's result: `--resume` reuses a recorded run only when this matches."""
    st = {k: v for k, v in asdict(settings).items() if k not in ("workers", "bootstrap")}
    st["seeds"] = None  # a run is one seed: the seed list does not change it
    spec_d = asdict(spec)
    if spec_d["weighting"] != "mixed":
        spec_d.pop("mix")  # only meaningful for mixed weighting (and absent from runs recorded before it existed)
    payload = {"task": task, "lab_key": lab_key, "spec": spec_d, "seed": seed, "settings": st,
               "eval_steps": list(eval_steps)}
    return json.dumps(payload, sort_keys=True, default=str)


def read_runs(path: str) -> dict[str, dict]:
    """job key -> run record of a runs.jsonl (a torn last line, from a killed study, is skipped)."""
    out = {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "job_key" in rec:
                out[rec["job_key"]] = rec
    return out


def run_study(output_dir: str, settings: StudySettings, configs=None, cache_dir=".cache/lab", tasks=None,
              lab_configs: dict | None = None, progress: bool = True, retrain: bool = False, resume: bool = False,
              task_modules=()) -> dict:
    """The study over `tasks` (names; default every task registered for the study); `lab_configs` maps a task name
    to its LabConfig; `retrain` trains the models from scratch even where a cached or shipped copy exists.
    Every finished run is appended to <output_dir>/runs.jsonl as it ends; `resume` reuses the recorded runs whose
    task, models, configuration, seed and settings match and runs only the rest. `task_modules`: user modules that
    register tasks, imported here and in every worker."""
    from tqdm.auto import tqdm

    from opsd.core.models import load_causal_lm, load_tokenizer

    import_task_modules(task_modules)
    configs = list(configs or [CONFIGS[n] for n in DEFAULT_CONFIG_NAMES])
    tasks = list(tasks or study_task_names())
    for t in lab_configs or {}:  # a task given only through its LabConfig runs too
        if t not in tasks:
            tasks.append(t)
    lab_configs = {t: (lab_configs or {}).get(t) or default_lab_config(t) for t in tasks}
    workers = settings.workers or available_cores()
    os.makedirs(output_dir, exist_ok=True)
    runs_file = os.path.join(output_dir, "runs.jsonl")
    recorded = read_runs(runs_file) if resume else {}
    if not resume and os.path.exists(runs_file):
        os.remove(runs_file)  # a fresh study: old records would be mixed with new ones
    t0 = time.perf_counter()
    torch.set_num_threads(1)

    def say(msg):
        if progress:
            print(msg, file=sys.stdout, flush=True)

    # 1. models, one task per worker
    say(f"[lab] preparing models for {tasks} ({workers} workers x 1 thread)")
    labs, prep_seconds = {}, {}
    prep_jobs = [(cache_dir, lab_configs[t].to_dict(), False, retrain) for t in tasks]
    for lab in _imap(_prepare_job, prep_jobs, min(workers, len(tasks)), task_modules):
        t = lab["config"]["task_name"]
        labs[t], prep_seconds[t] = lab, time.perf_counter() - t0
        say(f"[lab] {t}: models {'cached' if lab['cached'] else 'trained'} after {prep_seconds[t]:.0f} s")

    # 2. start point and probe (in this process), job list
    per_task, jobs, runs, reused_keys = {}, [], {t: [] for t in tasks}, set()
    for t in tasks:
        task = lab_configs[t].make_task()
        paths = labs[t]["paths"]
        max_new = task.max_new_tokens
        prompts = _eval_prompts(paths, settings.n_eval)
        tokenizer = load_tokenizer(paths["tokenizer"])
        student, teacher = load_causal_lm(paths["student"]).eval(), load_causal_lm(paths["teacher"]).eval()
        start = evaluate_student(student, teacher, tokenizer, prompts, max_new, task)
        probe = probe_selectors(student, teacher, tokenizer, prompts[: settings.n_probe], configs, max_new, task=task)
        # the all-token run is evaluated where each selective configuration's lm_head compute would stop it, and on
        # a grid for the equal-measured-time comparison
        eval_steps = sorted(({max(1, round(compute_ratio(c, probe["selectors"][c.name]["kept_fraction"]) * settings.steps))
                              for c in configs if c.selector is not None} | set(equal_time_grid(settings.steps)))
                            - {settings.steps})
        per_task[t] = {"task_obj": task, "paths": paths, "prompts": prompts, "start": start, "probe": probe,
                       "eval_steps": eval_steps}
        for spec in configs:
            for seed in settings.seeds:
                steps_here = tuple(eval_steps) if spec.selector is None else ()
                key = _job_key(t, labs[t]["key"], spec, seed, settings, steps_here)
                if key in recorded:
                    runs[t].append(recorded[key]["run"])
                    reused_keys.add(key)
                    continue
                jobs.append((spec, seed, paths, settings, max_new, prompts, os.path.join(output_dir, t, "runs"), task,
                             steps_here))
    # seed by seed, all tokens first within a seed: the runs compared on measured time run close together in time
    # (on a shared machine process CPU seconds grow with contention: up to ~30% between quiet and loaded periods)
    jobs.sort(key=lambda j: (j[1], j[0].selector is not None))
    reused = sum(len(v) for v in runs.values())
    if resume:
        say(f"[lab] resume: {reused} recorded runs reused from {runs_file}, {len(jobs)} to run")
    if resume and recorded:  # keep only the reused records; the new ones are appended below
        with open(runs_file, "w") as f:
            for k, rec in recorded.items():
                if k in reused_keys:
                    f.write(json.dumps(rec) + "\n")

    # 3. runs
    run_t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="OPD runs", disable=not progress, file=sys.stdout, mininterval=2)
    specs = {c.name: c for c in configs}
    for r in _imap(_run_job, jobs, workers, task_modules):
        runs[r["task"]].append(r)
        key = _job_key(r["task"], labs[r["task"]]["key"], specs[r["config"]], r["seed"], settings,
                       tuple(per_task[r["task"]]["eval_steps"]) if r["selector"] is None else ())
        with open(runs_file, "a") as f:  # as each run ends: a stopped study resumes from here
            f.write(json.dumps({"job_key": key, "run": r}) + "\n")
        bar.set_postfix_str(f"{r['task']} {r['config']} seed {r['seed']}")
        bar.update()
    bar.close()
    runs_seconds = time.perf_counter() - run_t0

    # 4. per-task results
    results = {}
    for t in tasks:
        pt = per_task[t]
        start = dict(pt["start"])
        for r in runs[t]:  # step 0 of the all-token curve is the warm start
            if r["config"] == "all_tokens":
                r["checkpoints"]["0"] = {k: start[k] for k in ("exact_match", "heldout_kl", "correct")}
        lab = labs[t]
        res = {
            "task": t, "date": time.strftime("%Y-%m-%d %H:%M"), "settings": asdict(settings), "lab_key": lab["key"],
            "lab": {"teacher_exact_match": lab["metrics"]["teacher"].get("exact_match"), "metrics": lab["metrics"],
                    "cached": lab["cached"], "prepare_seconds": prep_seconds[t], "config": lab["config"]},
            "start": start, "probe": pt["probe"], "runs": sorted(runs[t], key=lambda r: (r["config"], r["seed"])),
            "summary": summarize(runs[t], configs, settings, start), "equal_compute_steps": pt["eval_steps"],
            "workers": workers, "wall_seconds": time.perf_counter() - t0, "runs_seconds": runs_seconds,
            "reused_runs": len(runs[t]) - sum(1 for j in jobs if j[7].name == t),
        }
        rec = recommend(pt["probe"]["regime"])
        res["recommendation"] = {**rec, **check_recommendation(res["summary"], res["runs"], rec["config"],
                                                               settings.bootstrap)}
        out = os.path.join(output_dir, t)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(format_report(res))
        res["plots"] = plot_report(res, out)
        results[t] = res
    claims = claim_table(results)
    moon = moonshot_verdict(results)
    wall = time.perf_counter() - t0
    text = [f"# CPU distillation lab: {', '.join(tasks)}", "",
            f"Date {time.strftime('%Y-%m-%d %H:%M')}; {len(jobs)} OPD runs on {workers} workers x 1 thread"
            + (f" ({reused} more reused from runs.jsonl)" if reused else "")
            + f"; total wall time {wall:.0f} s (model preparation {max(prep_seconds.values()):.0f} s, runs "
            f"{runs_seconds:.0f} s); load average at the end {os.getloadavg()[0]:.1f}.", ""]
    text += [format_report(results[t]) for t in tasks]
    text += [format_cross_task(claims, tasks), format_moonshot(moon, tasks),
             format_recommendations({t: results[t]["recommendation"] for t in tasks})]
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write("\n".join(text))
    with open(os.path.join(output_dir, "claims.json"), "w") as f:
        json.dump({"claims": claims, "moonshot": moon,
                   "recommendations": {t: results[t]["recommendation"] for t in tasks}}, f, indent=1)
    return {"tasks": results, "claims": claims, "moonshot": moon, "wall_seconds": wall, "report": "\n".join(text)}


def _error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None):
    # the user's task modules first: their tasks are valid --task values
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task_module", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    try:
        import_task_modules(known.task_module)
    except ValueError as err:
        _error(str(err))
    parser = argparse.ArgumentParser(prog="python -m lab.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", action="append", default=None, choices=sorted(KNOWN_TASKS),
                        help="task to run (repeatable); default: every task registered for the study")
    parser.add_argument("--task_module", action="append", default=[],
                        help="module that registers tasks (lab.tasks.register_task) at import, e.g. my_tasks "
                        "(repeatable; it must be importable: current directory or PYTHONPATH)")
    parser.add_argument("--output_dir", default=None, help="default: runs/lab-<preset>-<time>")
    parser.add_argument("--full", action="store_true",
                        help="the complete study: every configuration, 5 seeds, 120 steps, 500 held-out prompts")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--configs", nargs="+", default=None, help=f"configuration names; known: {sorted(CONFIGS)}")
    parser.add_argument("--controls", action="store_true",
                        help=f"run the 2026 controls and the moonshot candidates: {list(CONTROL_CONFIG_NAMES)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--learning_rate", type=float, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--n_eval", type=int, default=None, help="held-out prompts per evaluation")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: available cores)")
    parser.add_argument("--cache_dir", default=".cache/lab")
    parser.add_argument("--retrain", action="store_true",
                        help="train the teachers and students from scratch (about 3.5 minutes on 2 idle cores) instead "
                        "of using the cache or the copies shipped in lab/pretrained/")
    parser.add_argument("--lab_config", default=None,
                        help="JSON file with a LabConfig (e.g. a cached lab's config.json) for its task")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped study in --output_dir: reuse the runs recorded in its runs.jsonl")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    _quiet()
    preset = args.preset or ("full" if args.full else "default")
    settings = replace(PRESETS[preset])
    if args.seeds:
        settings.seeds = tuple(args.seeds)
    for name in ("steps", "learning_rate", "batch_size", "workers", "n_eval"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if settings.workers < 0:
        _error("--workers must be >= 0 (0 = one per available core)")
    if settings.steps < 1:
        _error(f"--steps must be >= 1, got {settings.steps}")
    if args.resume and not args.output_dir:
        _error("--resume needs --output_dir (the stopped study's directory)")
    if args.controls and args.configs:
        _error("--controls and --configs both name the configurations: give one")
    names = (list(CONTROL_CONFIG_NAMES) if args.controls else
             list(CONFIGS) if args.full and not args.configs else (args.configs or DEFAULT_CONFIG_NAMES))
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        _error(f"--configs: unknown {unknown}; known: {sorted(CONFIGS)}")
    if "all_tokens" not in names:
        names = ["all_tokens", *names]  # every comparison is against it
    configs = [CONFIGS[n] for n in CONFIGS if n in names]
    lab_configs = None
    if args.lab_config:
        try:
            with open(args.lab_config) as f:
                cfg = LabConfig.from_dict({k: v for k, v in json.load(f).items() if k != "version"})
        except (OSError, ValueError, TypeError) as err:
            _error(f"--lab_config {args.lab_config}: {err}")
        lab_configs = {cfg.task_name: cfg}
        if args.task and cfg.task_name not in args.task:
            _error(f"--lab_config is for task {cfg.task_name!r}, which is not among --task {args.task}")
    output_dir = args.output_dir or os.path.join("runs", f"lab-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = run_study(output_dir, settings, configs, cache_dir=args.cache_dir, tasks=args.task,
                       lab_configs=lab_configs, progress=not args.no_progress, retrain=args.retrain,
                       resume=args.resume, task_modules=tuple(args.task_module))
    print()
    print(result["report"])
    print(f"Report: {output_dir}/report.md (per task: {output_dir}/<task>/report.md, report.json, plots; every run: "
          f"{output_dir}/runs.jsonl)")
    return result


if __name__ == "__main__":
    main()
