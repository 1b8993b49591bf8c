"""The real-model lab: `python -m lab.real_lab [--full] [--output_dir DIR]` (what `demo.sh --real` runs).

On the real pair of lab.real_task (student SmolLM2-135M-Instruct; teacher the same model plus the shipped SFT
adapter, merged), with reasoning-gym `chain_sum` prompts through the chat template:
1. Before: the teacher's and the student's held-out reward, `\\boxed{}` rate and end-of-turn rate; the student's
   reverse KL(student || teacher) on its own greedy completions and NLL of the teacher's greedy text.
2. Teacher probe (opsd.probe_teacher): shared-set mass, reverse KL and the verdict at the student's own sampled
   states (the rewards fed to the verdict are the greedy held-out rewards of step 1).
3. Census (tip_ext.census): the quadrant shares (entropy x reverse KL, per-batch medians) of the student's sampled
   tokens, and where its mistakes fall: the first token of each sample that leaves the teacher's answer (the
   teacher's fixed format for that prompt, `<|im_end|>` included).
4. Distillation: every configuration x seed (lab.study's configurations: rule, ratio, options, weighting, loss
   support; TA-OPD's K = 16) trains a fresh student through the real trainer (OPDTrainer + TipSelector) in worker
   processes with one torch thread each, then the same held-out measurements and opsd.collapse's rule (after vs
   before). Each finished run is appended to <output_dir>/runs.jsonl; `--resume` continues or extends a lab.
5. Report: <output_dir>/report.md and report.json (default runs/real-<preset>-<time>/): lab.study's summary of the
   runs (reward as exact match; paired bootstrap over seeds and prompts against the student before OPD and against
   all tokens at equal steps, at equal measured time and at equal lm_head compute), the probe's verdict checked
   against the outcome, lab.recommend's advice checked against the best rule, lab.study's claim table and moonshot
   verdict for this task.
`--full` runs the lab's rule set with 3 seeds and the fixed-context diagnostic (lab.diagnose) on the real pair: does
teachability predict the same-context KL reduction better than raw KL? `--controls` runs the 2026 controls and the
moonshot candidates.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace

from .study import CONFIGS as STUDY_CONFIGS
from .study import CONTROL_CONFIG_NAMES, _quiet

#: configurations: lab.study's (rule, ratio, options, weighting, loss support), with TA-OPD's K of the settings
CONFIGS = STUDY_CONFIGS
TASK_NAME = "real_chain_sum"  # the task's column in lab.study's claim table and moonshot verdict
DEMO_CONFIGS = ("all_tokens", "soft_or@0.2", "entropy_sample@0.2")
FULL_CONFIGS = ("all_tokens", "soft_or@0.2", "entropy_sample@0.2", "teachability_minmax@0.1", "random@0.2")
#: the 2026 controls and the moonshot candidates of lab.study (`--controls`)
CONTROL_CONFIGS = tuple(dict.fromkeys(CONTROL_CONFIG_NAMES + ("soft_or_mixed@0.2", "entropy_kl_sample_mixed@0.2")))


@dataclass
class RealSettings:
    steps: int = 10
    batch_size: int = 8
    learning_rate: float = 5e-5
    max_new_tokens: int = 32
    seeds: tuple = (0,)
    n_train: int = 256
    n_eval: int = 48
    n_probe: int = 16
    workers: int = 3
    support_top_k: int = 16
    bootstrap: int = 2000
    diagnostic: bool = False
    diagnostic_contexts: int = 24
    diagnostic_steps: int = 4
    diagnostic_lr: float = 5e-5
    eval_at: tuple = ()  # also evaluate after these steps (a learning curve from one run)
    progress: bool = True  # a line per 5 steps of every run
    equal_time_evals: int = 2  # reward-only evaluations of the all-token run (every steps/(n+1)): equal measured time


PRESETS = {
    "demo": RealSettings(),
    "full": RealSettings(seeds=(0, 1, 2), diagnostic=True),  # the demo's runs, 3 seeds: comparable, --resume adds
    "smoke": RealSettings(steps=2, batch_size=2, max_new_tokens=8, n_train=8, n_eval=4, n_probe=2, workers=1,
                          bootstrap=100),
}


def _worker_init():
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _quiet()


# ------------------------------------------------------------------------------------------------------------------
# one distillation run (a worker process)
# ------------------------------------------------------------------------------------------------------------------

def run_opd(config: str, seed: int, student_dir: str, teacher_dir: str, train_file: str, settings: dict,
            eval_rows: list, reference: list, before_rewards: list, work_dir: str) -> dict:
    """One OPD run through the real trainer (lab.study's configuration, set-up, clock and log summary), then the
    held-out measurements of lab.real_task.evaluate_model. The record has lab.study's keys (`correct` = the per-prompt
    reward, `exact_match` = the reward, `heldout_kl`, `train_cpu_seconds`, `cpu_at_step`, `checkpoints` with "0" =
    the student before OPD), so lab.study's summary, claims and moonshot verdict read it unchanged."""
    from opsd.core.models import load_causal_lm, load_tokenizer
    from opsd.core.trainer import OPDTrainer
    from opsd.data import load_prompt_dataset

    from .real_task import evaluate_model
    from .study import log_summary, opd_setup, train_timed

    s = RealSettings(**settings)
    spec = CONFIGS[config]
    tokenizer = load_tokenizer(student_dir)
    args, selector = opd_setup(spec, seed, os.path.join(work_dir, f"{config}-seed{seed}"), s.steps, s.batch_size,
                               s.learning_rate, s.max_new_tokens, support_top_k=s.support_top_k)
    teacher_ref = [None]

    def make_trainer(callback):
        trainer = OPDTrainer(load_causal_lm(student_dir), teacher_dir, args=args,
                             train_dataset=load_prompt_dataset(train_file), processing_class=tokenizer,
                             token_selector=selector, callbacks=[callback])
        teacher_ref[0] = trainer.accelerator.unwrap_model(trainer.teacher_model)
        return trainer

    time_grid = set(time_grid_steps(s)) if spec.selector is None else set()

    def evaluate(model, step):
        if step in s.eval_at:  # a learning-curve point: everything
            return evaluate_model(model, teacher_ref[0], tokenizer, eval_rows, s.max_new_tokens, reference)
        return evaluate_model(model, None, tokenizer, eval_rows, s.max_new_tokens)  # equal-time point: reward only

    start = time.perf_counter()

    def progress(step, cpu):
        if step % 5 == 0 and step < s.steps:
            print(f"[real_lab] {config} seed {seed}: step {step}/{s.steps} ({time.perf_counter() - start:.0f} s wall, "
                  f"{cpu:.0f} CPU-s)", file=sys.stderr, flush=True)

    timed = train_timed(make_trainer, s.steps, set(s.eval_at) | time_grid, evaluate,
                        progress=progress if s.progress else None)
    trainer, checkpoints = timed["trainer"], timed["checkpoints"]
    t = time.perf_counter()
    after = evaluate_model(trainer.model.eval(), teacher_ref[0], tokenizer, eval_rows, s.max_new_tokens, reference)
    timed["eval_seconds"] += time.perf_counter() - t
    checkpoints[s.steps] = after
    return {"config": config, "seed": seed, "selector": spec.selector, "ratio": spec.ratio, "options": spec.options,
            "weighting": spec.weighting, "loss_support": spec.loss_support,
            "after": after, "exact_match": after["reward"], "heldout_kl": after["kl"],
            "correct": after["per_prompt"]["reward"], **log_summary(trainer, spec),
            "checkpoints": {"0": {"correct": before_rewards},
                            **{str(k): {**{m: c[m] for m in ("reward", "boxed", "eot", "kl", "teacher_nll") if m in c},
                                        "correct": c["per_prompt"]["reward"]} for k, c in sorted(checkpoints.items())}},
            **{k: timed[k] for k in ("setup_seconds", "train_seconds", "eval_seconds", "train_cpu_seconds",
                                     "cpu_at_step", "peak_extra_gb")}}


def time_grid_steps(s: "RealSettings") -> list[int]:
    """Steps at which the all-token run is evaluated (reward only) for the equal-measured-time comparison."""
    n = max(0, s.equal_time_evals)
    return sorted({round(s.steps * (i + 1) / (n + 1)) for i in range(n)} - {0, s.steps})


def _run_job(job):
    return run_opd(*job)


# ------------------------------------------------------------------------------------------------------------------
# probe and census (main process)
# ------------------------------------------------------------------------------------------------------------------

def probe(student, teacher, tokenizer, rows, max_new_tokens: int, teacher_reward: float, student_reward: float,
          seed: int = 0) -> dict:
    """opsd.probe_teacher's diagnostics at the student's sampled states and its verdict."""
    from opsd.probe_teacher import aggregate, verdict, visited_state_diagnostics

    per_prompt = visited_state_diagnostics(student, teacher, tokenizer, [r["prompt"] for r in rows], rollouts=1,
                                           max_new_tokens=max_new_tokens, seed=seed, progress=False)
    diag = aggregate(per_prompt)
    mass = inspect.signature(verdict).parameters["compatible_mass"].default  # the probe's own default threshold
    return {"diagnostics": diag, "verdict": verdict(diag, teacher_reward, student_reward, compatible_mass=mass),
            "compatible_mass": mass}


def first_departures(tokenizer, rows, completions) -> list[int | None]:
    """Per completion, the index of its first token that differs from the teacher's fixed answer for that row
    (`<|im_end|>` included; ending the turn early is a departure there), or None when it matches or was cut by the
    token budget before leaving it."""
    from .real_task import END_OF_TURN, teacher_answer

    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    out = []
    for row, ids in zip(rows, completions):
        target = list(tokenizer(teacher_answer(row["expression"], row["answer"]), add_special_tokens=False)["input_ids"])
        target.append(eot)
        out.append(next((t for t, tok in enumerate(ids) if t >= len(target) or tok != target[t]), None))
    return out


def census(student, teacher, tokenizer, rows, max_new_tokens: int, seed: int = 0, support_top_k: int = 16) -> dict:
    """Quadrant census of the student's sampled tokens and the quadrants of its first departures; `regime` and
    `recommendation`: lab.recommend's reading of the same tokens (the rule it advises for this pair)."""
    import torch

    from opsd.core.heads import head_of
    from opsd.core.models import resolve_distill_vocab
    from opsd.probe_teacher import _final_hidden
    from tip_ext.census import QUADRANTS, quadrant_census
    from tip_ext.stats import token_stats_from_hidden

    from .real_task import generate, prompt_ids
    from .recommend import recommend, regime_from_stats

    gens = generate(student, tokenizer, rows, max_new_tokens, temperature=1.0, seed=seed)
    prompts = prompt_ids(tokenizer, rows)
    vocab = resolve_distill_vocab(student, teacher, tokenizer)
    s_head, t_head = head_of(student, vocab), head_of(teacher, vocab)
    pooled, marks = {}, []
    departures = first_departures(tokenizer, rows, [ids for ids, _ in gens])
    with torch.no_grad():
        for p, (ids, _), d in zip(prompts, gens, departures):
            if not ids:
                continue
            full = torch.tensor(p + ids, dtype=torch.long)
            span = slice(len(p) - 1, len(full) - 1)
            stats = token_stats_from_hidden(_final_hidden(student, full)[span], s_head, _final_hidden(teacher, full)[span],
                                            t_head, top_k=support_top_k,
                                            names=("entropy_norm", "reverse_kl", "support_mass", "local_forward_kl"))
            for name, value in stats.items():
                pooled.setdefault(name, []).append(value)
            m = torch.zeros(len(ids), dtype=torch.bool)
            if d is not None:
                m[d] = True
            marks.append(m)
    stats = {name: torch.cat(v) for name, v in pooled.items()}
    h, d, m = stats["entropy_norm"], stats["reverse_kl"], torch.cat(marks)
    regime = regime_from_stats(stats)
    shares = quadrant_census(h, d)
    th, td = shares["threshold/entropy"], shares["threshold/divergence"]
    quad = {"Q1": (h > th) & (d > td), "Q2": (h > th) & (d <= td), "Q3": (h <= th) & (d > td),
            "Q4": (h <= th) & (d <= td)}
    n_m = int(m.sum())
    return {"tokens": int(h.numel()), "samples": len(gens), "departures": n_m,
            "all": {q: shares[f"all/{q}"] for q in QUADRANTS},
            "departure_shares": {q: (int((quad[q] & m).sum()) / n_m if n_m else float("nan")) for q in QUADRANTS},
            "threshold_entropy": th, "threshold_kl": td,
            "mean_kl_departures": float(d[m].double().mean()) if n_m else float("nan"),
            "mean_kl_other": float(d[~m].double().mean()) if (~m).any() else float("nan"),
            "regime": {k: v for k, v in regime.items() if k != "spread"}, "recommendation": recommend(regime)}


# ------------------------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------------------------

def collapse_check(before: dict, run: dict) -> dict | None:
    """opsd.collapse's rule on a run: the held-out teacher-text NLL, end-of-turn rate and distinct-2 after OPD against
    the student's before it, with the run's training losses (a report when it fires, else None)."""
    from opsd.collapse import CollapseRule

    def signals(m):
        return {"teacher_nll": m.get("teacher_nll"), "eot_rate": m.get("eot"), "distinct_2": m.get("distinct_2")}

    return CollapseRule().check(signals(before), signals(run["after"]), run["losses"])


def study_settings(settings: RealSettings) -> dict:
    """The lab.study settings its summary and claim table read (steps for equal compute, the bootstrap size)."""
    return {"seeds": list(settings.seeds), "steps": settings.steps, "bootstrap": settings.bootstrap}


def summarize(runs: list[dict], before: dict, settings: RealSettings, configs) -> list[dict]:
    """lab.study's summary rows (the reward as `exact_match`; `vs_start` = against the student before OPD;
    `vs_all_equal_steps`, `vs_all_equal_time`, `vs_all_equal_compute`: against all tokens, paired over seeds and
    prompts) plus the real measurements' means and the paired change of the teacher-text NLL."""
    import numpy as np

    from .study import StudySettings, paired_interval
    from .study import summarize as study_summarize

    s = StudySettings(**{**study_settings(settings), "seeds": tuple(settings.seeds)})
    rows = study_summarize(runs, [CONFIGS[c] for c in configs], s, {"correct": before["per_prompt"]["reward"]})
    for row in rows:
        mine = sorted((r for r in runs if r["config"] == row["config"]), key=lambda r: r["seed"])
        for key in ("reward", "boxed", "eot", "kl", "teacher_nll", "mean_length"):
            row[key] = _avg(r["after"][key] for r in mine)
        row["collapsed_seeds"] = sum(bool(r.get("collapse")) for r in mine)
        nll = np.stack([r["after"]["per_prompt"]["teacher_nll"] for r in mine])
        row["teacher_nll_vs_start"] = paired_interval(
            nll, np.tile(before["per_prompt"]["teacher_nll"], (len(mine), 1)), settings.bootstrap)
    return rows


def _avg(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def run_real_lab(output_dir: str, settings: RealSettings, configs=DEMO_CONFIGS, adapter: str | None = None,
                 retrain: bool = False, cache_dir=None, log=None, resume: bool = False) -> dict:
    """The whole lab into `output_dir`. Every finished run is appended to `<output_dir>/runs.jsonl`; `resume` keeps
    the runs already there (same settings apart from seeds and workers, checked) and runs only the missing
    configuration x seed pairs: a stopped lab continues, and more seeds or configurations can be added to a study."""
    from opsd.core.models import load_causal_lm, load_tokenizer

    from .real_assets import write_jsonl
    from .real_task import DEFAULT_ADAPTER, evaluate_model, real_pair, task_rows
    from .recommend import check_recommendation
    from .study import claim_table, moonshot_verdict

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    adapter = adapter or DEFAULT_ADAPTER
    previous = _previous_runs(output_dir, settings, adapter, resume)
    to_run = tuple(configs)  # new runs: these configurations x settings.seeds; the report covers the earlier ones too
    configs = tuple(dict.fromkeys([*configs, *(r["config"] for r in previous)]))
    student_dir, teacher_dir = real_pair(cache_dir, adapter, retrain, progress=log)
    timing = {"pair_seconds": time.perf_counter() - t0}
    train_rows, eval_rows = task_rows("train", settings.n_train), task_rows("eval", settings.n_eval)
    train_file = write_jsonl(train_rows, os.path.join(output_dir, "data", "train.jsonl"))
    write_jsonl(eval_rows, os.path.join(output_dir, "data", "eval.jsonl"))

    t = time.perf_counter()
    tokenizer = load_tokenizer(str(student_dir))
    student, teacher = load_causal_lm(str(student_dir)).eval(), load_causal_lm(str(teacher_dir)).eval()
    teacher_eval = evaluate_model(teacher, None, tokenizer, eval_rows, settings.max_new_tokens, keep_ids=True)
    reference = teacher_eval.pop("ids")
    before = evaluate_model(student, teacher, tokenizer, eval_rows, settings.max_new_tokens, reference)
    timing["before_seconds"] = time.perf_counter() - t
    log(f"[real_lab] before: teacher reward {teacher_eval['reward']:.2f}, student reward {before['reward']:.2f}, "
        f"KL {before['kl']:.3f}, teacher-text NLL {before['teacher_nll']:.3f} ({time.perf_counter() - t0:.0f} s)")

    jobs = [(c, seed, str(student_dir), str(teacher_dir), str(train_file), asdict(settings), eval_rows, reference,
             before["per_prompt"]["reward"], os.path.join(output_dir, "runs")) for seed in settings.seeds for c in to_run
            if (c, seed) not in {(r["config"], r["seed"]) for r in previous}]
    pool = ProcessPoolExecutor(max_workers=max(1, settings.workers), initializer=_worker_init)
    t = time.perf_counter()
    futures = [pool.submit(_run_job, job) for job in jobs]
    log(f"[real_lab] {len(jobs)} OPD runs ({settings.steps} steps x batch {settings.batch_size} x "
        f"{settings.max_new_tokens} tokens) on {settings.workers} worker(s); probe and census meanwhile")

    probe_rows = eval_rows[: settings.n_probe]
    tp = time.perf_counter()
    probe_result = probe(student, teacher, tokenizer, probe_rows, settings.max_new_tokens, teacher_eval["reward"],
                         before["reward"])
    census_result = census(student, teacher, tokenizer, probe_rows, settings.max_new_tokens,
                           support_top_k=settings.support_top_k)
    timing["probe_census_seconds"] = time.perf_counter() - tp
    log(f"[real_lab] probe: {probe_result['verdict']['summary']}")
    diagnostic = None
    if settings.diagnostic:
        td = time.perf_counter()
        diagnostic = fixed_context_diagnostic(student, teacher, tokenizer, train_rows, settings, output_dir)
        timing["diagnostic_seconds"] = time.perf_counter() - td
    del student, teacher

    runs = list(previous)
    for f in as_completed(futures):
        r = f.result()
        r["collapse"] = collapse_check(before, r)
        runs.append(r)
        with open(os.path.join(output_dir, "runs.jsonl"), "a") as out:
            out.write(json.dumps(r, default=str) + "\n")
        log(f"[real_lab] {r['config']} seed {r['seed']}: reward {r['after']['reward']:.2f}, KL {r['after']['kl']:.3f}, "
            f"teacher-text NLL {r['after']['teacher_nll']:.3f}, end-of-turn {r['after']['eot']:.2f} "
            f"({r['train_seconds']:.0f} s training)")
        if r["collapse"]:
            from opsd.collapse import describe

            log(f"[real_lab] warning: {r['config']} seed {r['seed']}: "
                + describe("held-out", settings.steps, r["collapse"]))
    pool.shutdown()
    timing["runs_seconds"] = time.perf_counter() - t
    timing["total_seconds"] = time.perf_counter() - t0
    table = summarize(runs, before, settings, configs)
    task_result = {"summary": table, "runs": runs, "settings": study_settings(settings)}
    recommendation = census_result["recommendation"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": asdict(settings),
        "configs": list(configs), "adapter": adapter, "student": str(student_dir), "teacher": str(teacher_dir),
        "teacher_eval": teacher_eval, "before": before, "probe": probe_result, "census": census_result,
        "runs": runs, "table": table, "diagnostic": diagnostic,
        "claims": claim_table({TASK_NAME: task_result}), "moonshot": moonshot_verdict({TASK_NAME: task_result}),
        "recommendation_check": check_recommendation(table, runs, recommendation["config"], settings.bootstrap),
        "timing": timing, "load_average": os.getloadavg(), "machine": machine(),
    }
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(format_report(result))
    return result


_RESUME_FREE = ("seeds", "workers", "progress", "diagnostic", "diagnostic_contexts", "diagnostic_steps", "eval_at",
                "n_probe", "bootstrap")


def _previous_runs(output_dir: str, settings: RealSettings, adapter: str, resume: bool) -> list[dict]:
    """The runs of `<output_dir>/runs.jsonl` when resuming (after checking that they were made with the same settings),
    else none (the file is started afresh)."""
    from opsd.preflight import UserError

    runs_file, settings_file = os.path.join(output_dir, "runs.jsonl"), os.path.join(output_dir, "settings.json")
    mine = {k: v for k, v in {**asdict(settings), "adapter": adapter}.items() if k not in _RESUME_FREE}
    mine = json.loads(json.dumps(mine))  # tuples as lists, as read back
    previous = []
    if resume and os.path.exists(runs_file):
        with open(settings_file) as f:
            theirs = json.load(f)
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            changes = ", ".join(f"{k} {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in diff)
            raise UserError(f"--resume: {output_dir} was run with other settings ({changes}); use another --output_dir")
        with open(runs_file) as f:
            previous = [json.loads(line) for line in f if line.strip()]
    elif os.path.exists(runs_file):
        os.remove(runs_file)
    with open(settings_file, "w") as f:
        json.dump(mine, f, indent=1)
    return previous


def machine() -> str:
    try:
        from .bench import _cpu_name

        name = _cpu_name()
    except Exception:  # pragma: no cover - informative only
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def fixed_context_diagnostic(student, teacher, tokenizer, rows, settings: RealSettings, output_dir: str) -> dict:
    """lab.diagnose on the real pair: a bank of the student's sampled answers, scores, short updates per selector."""
    import copy

    from .diagnose import run_diagnostic

    report = run_diagnostic(copy.deepcopy(student), teacher, tokenizer, [r["prompt"] for r in rows],
                            contexts=settings.diagnostic_contexts, max_tokens=settings.max_new_tokens,
                            budgets=(0.1, 0.2), selectors=("random", "divergence_topk", "soft_or", "teachability"),
                            steps=settings.diagnostic_steps, lr=settings.diagnostic_lr, batch_size=8, bootstrap=500,
                            predict_bootstrap=200, output_dir=os.path.join(output_dir, "diagnostic"),
                            save_tokens=False, progress=False)
    return {k: v for k, v in report.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------

def _f(x, spec=".3f") -> str:
    try:
        return format(float(x), spec)
    except (TypeError, ValueError):
        return "-"


def _iv(iv) -> str:
    if not iv:
        return ""
    return f"{iv['mean']:+.3f} [{iv['lo']:+.3f}, {iv['hi']:+.3f}]"


def format_report(r: dict) -> str:
    s = r["settings"]
    te, b, c = r["teacher_eval"], r["before"], r["census"]
    v = r["probe"]["verdict"]
    lines = [
        "# Real-model lab: SmolLM2-135M-Instruct student, same model + SFT adapter teacher", "",
        f"Date {r['date']}; machine {r['machine']}; load average at the end {r['load_average'][0]:.1f}; "
        f"total wall time {r['timing']['total_seconds']:.0f} s.", "",
        f"Task: reasoning-gym chain_sum (two terms of 1-2 digits, + and -) through the chat template; "
        f"{s['n_eval']} held-out prompts, greedy, at most {s['max_new_tokens']} new tokens; reward = "
        f"opsd.reward.math_reward (reads \\boxed{{}}). Adapter `{r['adapter']}`.", "",
        f"OPD: {s['steps']} steps x batch {s['batch_size']}, lr {s['learning_rate']}, completion length "
        f"{s['max_new_tokens']}, reverse KL, seeds {sorted({run['seed'] for run in r['runs']})}, {s['workers']} "
        "worker(s) x 1 thread.", "",
        "## Before distillation", "",
        "| model | reward | boxed | end-of-turn | KL(student‖teacher) | teacher-text NLL |", "|---|---|---|---|---|---|",
        f"| teacher | {_f(te['reward'])} | {_f(te['boxed'])} | {_f(te['eot'])} | | |",
        f"| student | {_f(b['reward'])} | {_f(b['boxed'])} | {_f(b['eot'])} | {_f(b['kl'])} | {_f(b['teacher_nll'])} |",
        "", "## Teacher probe (opsd.probe_teacher)", "", *[f"- {line}" for line in v["lines"]], f"- **{v['summary']}**",
        "", "## Census of the student's sampled tokens (tip_ext.census, median cut-offs)", "",
        f"{c['tokens']} tokens of {c['samples']} samples; {c['departures']} first departures from the teacher's answer.",
        "", "| | Q1 high-H high-KL | Q2 high-H low-KL | Q3 low-H high-KL | Q4 low-H low-KL |", "|---|---|---|---|---|",
        "| all tokens | " + " | ".join(_f(c["all"][q], ".2f") for q in ("Q1", "Q2", "Q3", "Q4")) + " |",
        "| first departures | " + " | ".join(_f(c["departure_shares"][q], ".2f") for q in ("Q1", "Q2", "Q3", "Q4")) + " |",
        "", f"Mean reverse KL at first departures {_f(c['mean_kl_departures'])} vs {_f(c['mean_kl_other'])} elsewhere.",
        "", f"Recommendation (lab.recommend on these tokens): **{c['recommendation']['config']}** "
        f"({c['recommendation']['flags']}); normalization {c['recommendation']['normalization']}; top-10% reverse-KL "
        "tokens " + ", ".join(f"{q} {v:.2f}" for q, v in c["regime"]["census_top_kl"].items())
        + "; degenerate TA-OPD axes: " + (", ".join(c["regime"]["degenerate_axes"]) or "none") + ".",
        "", "## After distillation (held-out)", "",
        "| config | kept | time | reward | Δ vs before [95%] | vs all, equal steps [95%] | vs all, equal measured time "
        "[95%] | vs all, equal lm_head [95%] | teacher-text NLL | end-of-turn | boxed | KL(student‖teacher) | collapse "
        "flagged | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| (before) | | | {_f(b['reward'])} | | | | | {_f(b['teacher_nll'])} | {_f(b['eot'])} | {_f(b['boxed'])} | "
        f"{_f(b['kl'])} | | |",
    ]
    for row in r["table"]:
        capped = "*" if row.get("equal_time_capped") else ""
        lines.append(f"| {row['config']} | {_f(row['kept_fraction'], '.2f')} | {_f(row.get('time_ratio'), '.2f')}{capped} | "
                     f"{_f(row['reward'])} | {_iv(row['vs_start'])} | {_iv(row.get('vs_all_equal_steps'))} | "
                     f"{_iv(row.get('vs_all_equal_time'))} | {_iv(row.get('vs_all_equal_compute'))} | "
                     f"{_f(row['teacher_nll'])} | {_f(row['eot'])} | {_f(row['boxed'])} | {_f(row['kl'])} | "
                     f"{row.get('collapsed_seeds', 0)}/{row['seeds']} | {_f(row['train_cpu_seconds'], '.0f')} |")
    seeds = sorted({run["seed"] for run in r["runs"]})
    lines += ["", f"Seeds {seeds} (per configuration: the denominator of its collapse column) x {s['n_eval']} held-out prompts. "
              "Intervals: lab.study's "
              "paired bootstrap (seeds and prompts resampled; percentile 95%). time: the run's process CPU seconds of "
              "training over the same seed's all-token run (one torch thread per run; evaluations excluded); `*`: "
              "slower than all tokens on some seed, then compared with the all-token run at its end (equal steps). "
              "Equal measured time: the all-token run evaluated (reward only) after "
              f"{time_grid_steps(RealSettings(**s)) or 'no'} steps, interpolated. Equal lm_head: lab.study's "
              "projection count (a paper measure, not time). Collapse flagged: seeds on which opsd.collapse's rule "
              "(teacher-text NLL up or end-of-turn rate down against the student before OPD, while the loss fell) "
              "fired.", ""]
    lines += probe_check(r)
    check = r.get("recommendation_check") or {}
    if check.get("best"):
        iv = check.get("interval")
        advised = r["census"]["recommendation"]["config"]
        if check["verdict"] == "not run":
            verdict = f"{advised} was not among this run's configurations (`--configs {advised}` adds it)"
        else:
            verdict = f"**{check['verdict']}**" + (f" (advised - best: {_iv(iv)})" if iv else "")
        lines += [f"Recommendation check: advised {advised}, best selective configuration {check['best']}: "
                  f"{verdict}.", ""]
    if r.get("claims"):
        lines += ["## Claims on this task (lab.study's claim table)", "", "| claim | verdict |", "|---|---|"]
        lines += [f"| {row['claim']} | {row[TASK_NAME]} |" for row in r["claims"] if row[TASK_NAME] != "not run"]
        lines += [""]
    if r.get("moonshot"):
        lines += ["## Moonshot (beats all tokens at equal steps, 95% interval above 0, no slower, >= 5 seeds)", "",
                  "| config | vs all, equal steps | time | seeds | met |", "|---|---|---|---|---|"]
        for m in r["moonshot"]:
            v = m["tasks"][TASK_NAME]
            lines.append(f"| {m['config']} | {v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}] | "
                         f"{_f(v['time_ratio'], '.2f')} | {v['seeds']} | {'yes' if m['met'] else 'no'} |")
        lines += [""]
    if r.get("diagnostic"):
        lines += ["## Fixed-context diagnostic (lab.diagnose on the real pair)", "",
                  "See diagnostic/diagnostic.md for the whole report.", ""]
        lines += diagnostic_summary(r["diagnostic"])
    t = r["timing"]
    lines += ["## Timing", "", ", ".join(f"{k.replace('_seconds', '')} {v:.0f} s" for k, v in t.items()), ""]
    return "\n".join(lines)


def probe_check(r: dict) -> list[str]:
    """The probe's prediction against what all-token OPD did on the held-out prompts (the probe's thresholds are the
    tool's heuristics; this pair measures one of them)."""
    v = r["probe"]["verdict"]
    row = next((row for row in r["table"] if row["config"] == "all_tokens"), None)
    if row is None or not row.get("vs_start"):
        return []
    iv = row["vs_start"]
    works = iv["lo"] > 0
    predicted = bool(v.get("compatible") and v.get("new_capability"))
    outcome = "raised" if works else ("lowered" if iv["hi"] < 0 else "did not resolvably change")
    agree = "agrees with" if predicted == works else "is contradicted by"
    return [f"Probe check: the probe predicted OPD {'works' if predicted else 'stalls'} (shared-set mass "
            f"{v.get('shared_mass', float('nan')):.2f}, threshold {r['probe'].get('compatible_mass', 0.9)}); all-token "
            f"OPD {outcome} the held-out reward ({_iv(iv)}): the verdict {agree} this run.", ""]


def diagnostic_summary(d: dict) -> list[str]:
    """The predictiveness rows (Spearman / Pearson of each score with the same-context forward-KL gain under the
    all-token update) and each selector's kept-token gain, from lab.diagnose's report."""
    from .diagnose import _fi

    corr = (d.get("predictiveness") or {}).get("correlations", {}).get("gain", {})
    lines = ["| score | Spearman with gain [95%] | Pearson with gain [95%] |", "|---|---|---|"]
    lines += [f"| {v.get('label', k)} | {_fi(v['spearman'])} | {_fi(v['pearson'])} |" for k, v in corr.items()]
    lines += ["", "| selector | budget | kept-token gain [95%] | all-token gain [95%] |", "|---|---|---|---|"]
    lines += [f"| {r['selector']} | {r['budget']:g} | {_fi(r['kept_gain'])} | {_fi(r['all_gain'])} |"
              for r in d.get("runs", [])]
    return lines + [""]


def cross_task(study_claims: dict, real: dict) -> dict:
    """lab.study's cross-task claim table and moonshot verdict with this lab's task added: `study_claims` is a study's
    `*_claims.json` (its `claims` and `moonshot`), `real` a report.json of this lab. The moonshot verdict is
    recomputed over every task (a rule must beat all tokens on each, the real task included)."""
    from .study import moonshot_verdict

    claims = [{**row, TASK_NAME: "not run"} for row in study_claims["claims"]]
    by_claim = {row["claim"]: row for row in claims}
    for row in real.get("claims", []):
        by_claim.setdefault(row["claim"], {"claim": row["claim"]})[TASK_NAME] = row[TASK_NAME]
        if row["claim"] not in {c["claim"] for c in claims}:
            claims.append(by_claim[row["claim"]])
    tasks: dict[str, dict] = {}
    for entry in study_claims.get("moonshot", []):
        for task, v in entry["tasks"].items():
            tasks.setdefault(task, {"summary": []})["summary"].append(
                {"config": entry["config"], "vs_all_equal_steps": {k: v[k] for k in ("mean", "lo", "hi")},
                 "time_ratio": v.get("time_ratio"), "seeds": v["seeds"]})
    tasks[TASK_NAME] = {"summary": [{"config": r["config"], "vs_all_equal_steps": r["vs_all_equal_steps"],
                                     "time_ratio": r.get("time_ratio"), "seeds": r["seeds"]}
                                    for r in real["table"] if r.get("vs_all_equal_steps")]}
    return {"tasks": sorted(tasks), "claims": claims, "moonshot": moonshot_verdict(tasks)}


def format_cross_task(x: dict) -> str:
    tasks = x["tasks"]
    lines = ["| claim | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {row['claim']} | " + " | ".join(row.get(t, "not run") for t in tasks) + " |" for row in x["claims"]
              if any(row.get(t, "not run") != "not run" for t in tasks)]
    lines += ["", "| config | " + " | ".join(f"{t}: vs all, equal steps (time, seeds)" for t in tasks) + " | met |",
              "|---|" + "---|" * (len(tasks) + 1)]
    for m in x["moonshot"]:
        cells = []
        for t in tasks:
            v = m["tasks"].get(t)
            cells.append(f"{v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}] ({_f(v['time_ratio'], '.2f')}, "
                         f"{v['seeds']})" if v else "not run")
        lines.append(f"| {m['config']} | " + " | ".join(cells) + f" | {'yes' if m['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the lab's rule set, 3 seeds, and the fixed-context diagnostic")
    p.add_argument("--controls", action="store_true",
                   help="the 2026 controls and moonshot candidates of lab.study (OPSA, first 30%%, soft and mixed "
                   "weighting) next to all tokens, soft_or@0.2, entropy_sample@0.2, entropy_kl_sample@0.2")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--output_dir", default=None, help="default runs/real-<preset>-<time>")
    p.add_argument("--configs", nargs="+", default=None, help=f"configurations, from {list(CONFIGS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--n_eval", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--eval_at", type=int, nargs="+", default=None, help="also evaluate after these steps")
    p.add_argument("--equal_time_evals", type=int, default=None,
                   help="reward-only evaluations of the all-token run for the equal-measured-time comparison (default 3)")
    p.add_argument("--n_train", type=int, default=None)
    p.add_argument("--adapter", default=None, help="teacher adapter name (lab.real_task.ADAPTERS)")
    p.add_argument("--retrain", action="store_true", help="train the teacher adapter again (cached in .cache/real)")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--diagnostic", action="store_true", help="also run the fixed-context diagnostic (--full does)")
    p.add_argument("--diagnostic_contexts", type=int, default=None, help="contexts of the diagnostic's bank")
    p.add_argument("--diagnostic_steps", type=int, default=None, help="update steps of each diagnostic run")
    p.add_argument("--cross_task", nargs=2, metavar=("STUDY_CLAIMS", "REAL_REPORT"), default=None,
                   help="print lab.study's cross-task claim table and moonshot verdict with this lab's task added "
                   "(a study's *_claims.json and a report.json of this lab; runs nothing)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --output_dir/runs.jsonl and run only the missing ones")
    return p


def main(argv=None) -> int:
    from .real_task import ADAPTERS

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cross_task:
        try:
            with open(args.cross_task[0]) as f:
                study_claims = json.load(f)
            with open(args.cross_task[1]) as f:
                real = json.load(f)
            x = cross_task(study_claims, real)
        except (OSError, json.JSONDecodeError, KeyError) as e:
            print(f"error: --cross_task: {e!r} (a lab.study *_claims.json and a lab.real_lab report.json)",
                  file=sys.stderr)
            return 2
        print(format_cross_task(x), end="")
        return 0
    preset = args.preset or ("full" if args.full else "demo")
    settings = PRESETS[preset]
    default = FULL_CONFIGS if preset == "full" else DEMO_CONFIGS
    if args.controls:
        default = tuple(dict.fromkeys((FULL_CONFIGS if preset == "full" else ()) + CONTROL_CONFIGS))
    configs = tuple(args.configs) if args.configs else default
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        print(f"error: --configs: unknown configuration(s) {bad}; known: {list(CONFIGS)}", file=sys.stderr)
        return 2
    if args.adapter is not None and args.adapter not in ADAPTERS:
        print(f"error: --adapter: unknown adapter {args.adapter!r}; known: {list(ADAPTERS)}", file=sys.stderr)
        return 2
    if args.equal_time_evals is not None and args.equal_time_evals < 0:
        print(f"error: --equal_time_evals must be >= 0, got {args.equal_time_evals}", file=sys.stderr)
        return 2
    for flag in ("steps", "workers", "n_eval", "max_new_tokens", "n_train", "diagnostic_contexts", "diagnostic_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"error: --{flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.learning_rate is not None and not args.learning_rate > 0:
        print(f"error: --learning_rate must be > 0, got {args.learning_rate}", file=sys.stderr)
        return 2
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.eval_at is not None:
        settings = replace(settings, eval_at=tuple(args.eval_at))
    if args.diagnostic:
        settings = replace(settings, diagnostic=True)
    for flag in ("steps", "workers", "n_eval", "max_new_tokens", "learning_rate", "n_train", "equal_time_evals",
                 "diagnostic_contexts", "diagnostic_steps"):
        if getattr(args, flag) is not None:
            settings = replace(settings, **{flag: getattr(args, flag)})
    if "all_tokens" not in configs:
        print("error: --configs must include all_tokens (the baseline the rules are compared with)", file=sys.stderr)
        return 2
    from opsd.preflight import UserError

    from .real_assets import MissingAsset

    if args.resume and not args.output_dir:
        print("error: --resume needs --output_dir (the lab to continue)", file=sys.stderr)
        return 2
    output_dir = args.output_dir or os.path.join("runs", f"real-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    _worker_init()
    try:
        result = run_real_lab(output_dir, settings, configs, args.adapter, args.retrain, args.cache_dir,
                              resume=args.resume)
    except (MissingAsset, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    print(f"[real_lab] wrote {output_dir}/report.md and report.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
