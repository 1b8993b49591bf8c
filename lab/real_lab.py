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
4. Distillation: every configuration x seed trains a fresh student through the real trainer (OPDTrainer +
   TipSelector) in worker processes with one torch thread each, then the same held-out measurements.
5. Report: <output_dir>/report.md and report.json (default runs/real-<preset>-<time>/): before/after per configuration, the paired change of the
   held-out reward against the student before OPD and against all-token OPD (bootstrap 95% over seeds x prompts).
`--full` runs the lab's rule set with more seeds and steps, and the fixed-context diagnostic (lab.diagnose) on the
real pair: does teachability predict the same-context KL reduction better than raw KL?
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace

#: name -> (tip_ext rule or None for all tokens, ratio, rule options)
CONFIGS = {
    "all_tokens": (None, 1.0, {}),
    "soft_or@0.2": ("soft_or", 0.2, {}),
    "entropy_sample@0.2": ("entropy_sample", 0.2, {}),
    "teachability_minmax@0.1": ("teachability", 0.1, {"normalization": "minmax"}),
    "random@0.2": ("random", 0.2, {}),
}
DEMO_CONFIGS = ("all_tokens", "soft_or@0.2", "entropy_sample@0.2")
FULL_CONFIGS = tuple(CONFIGS)


@dataclass
class RealSettings:
    steps: int = 20
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
    diagnostic_contexts: int = 48
    diagnostic_steps: int = 10
    diagnostic_lr: float = 5e-5
    eval_at: tuple = ()  # also evaluate after these steps (a learning curve from one run)


PRESETS = {
    "demo": RealSettings(),
    "full": RealSettings(steps=40, seeds=(0, 1, 2), n_eval=100, n_probe=32, diagnostic=True),
    "smoke": RealSettings(steps=2, batch_size=2, max_new_tokens=8, n_train=8, n_eval=4, n_probe=2, workers=1,
                          bootstrap=100),
}


def _quiet():
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _worker_init():
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _quiet()


# ------------------------------------------------------------------------------------------------------------------
# one distillation run (a worker process)
# ------------------------------------------------------------------------------------------------------------------

def run_opd(config: str, seed: int, student_dir: str, teacher_dir: str, train_file: str, settings: dict,
            eval_rows: list, reference: list, work_dir: str) -> dict:
    """One OPD run through the real trainer, then the held-out measurements of lab.real_task.evaluate_model."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from opsd.core.config import OPDConfig
    from opsd.core.models import load_causal_lm, load_tokenizer
    from opsd.core.trainer import OPDTrainer
    from opsd.data import load_prompt_dataset
    from tip_ext.trainer import SelectorConfig, make_selector

    from .real_task import evaluate_model

    s = RealSettings(**settings)
    selector_name, ratio, options = CONFIGS[config]
    tokenizer = load_tokenizer(student_dir)
    args = OPDConfig(
        output_dir=os.path.join(work_dir, f"{config}-seed{seed}"), per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1, max_steps=s.steps, learning_rate=s.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, max_completion_length=s.max_new_tokens, temperature=1.0,
        bf16=False, gradient_checkpointing=False, use_cpu=True, save_strategy="no", report_to=[],
        logging_steps=1, seed=seed, disable_tqdm=True, chunk_size=512,
    )
    selector = make_selector(SelectorConfig(selector=selector_name, ratio=ratio, selector_options=options or None,
                                            support_top_k=s.support_top_k), args)
    checkpoints, eval_seconds = {}, [0.0]

    class _EvalAt(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in s.eval_at and state.global_step < s.steps:
                t = time.perf_counter()
                m = evaluate_model(model, trainer.accelerator.unwrap_model(trainer.teacher_model), tokenizer,
                                   eval_rows, s.max_new_tokens, reference)
                checkpoints[state.global_step] = {k: m[k] for k in ("reward", "boxed", "eot", "kl", "teacher_nll")}
                eval_seconds[0] += time.perf_counter() - t

    start = time.perf_counter()
    trainer = OPDTrainer(load_causal_lm(student_dir), teacher_dir, args=args,
                         train_dataset=load_prompt_dataset(train_file), processing_class=tokenizer,
                         token_selector=selector, callbacks=[_EvalAt()] if s.eval_at else None)
    trainer.remove_callback(PrinterCallback)
    setup = time.perf_counter() - start
    trainer.train()
    train_seconds = time.perf_counter() - start - setup - eval_seconds[0]
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    t = time.perf_counter()
    after = evaluate_model(trainer.model.eval(), teacher, tokenizer, eval_rows, s.max_new_tokens, reference)
    checkpoints[s.steps] = {k: after[k] for k in ("reward", "boxed", "eot", "kl", "teacher_nll")}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    kept = [h["kept_fraction"] for h in logs if "kept_fraction" in h]
    return {"config": config, "seed": seed, "selector": selector_name, "ratio": ratio, "options": options,
            "after": after, "losses": [h["loss"] for h in logs],
            "kept_fraction": sum(kept) / len(kept) if kept else 1.0, "checkpoints": checkpoints,
            "setup_seconds": setup, "train_seconds": train_seconds,
            "eval_seconds": eval_seconds[0] + time.perf_counter() - t}


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
    return {"diagnostics": diag, "verdict": verdict(diag, teacher_reward, student_reward)}


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


def census(student, teacher, tokenizer, rows, max_new_tokens: int, seed: int = 0) -> dict:
    """Quadrant census of the student's sampled tokens and the quadrants of its first departures."""
    import torch

    from opsd.core.heads import head_of
    from opsd.core.models import resolve_distill_vocab
    from opsd.probe_teacher import _final_hidden
    from tip_ext.census import QUADRANTS, quadrant_census
    from tip_ext.stats import token_stats_from_hidden

    from .real_task import generate, prompt_ids

    gens = generate(student, tokenizer, rows, max_new_tokens, temperature=1.0, seed=seed)
    prompts = prompt_ids(tokenizer, rows)
    vocab = resolve_distill_vocab(student, teacher, tokenizer)
    s_head, t_head = head_of(student, vocab), head_of(teacher, vocab)
    ent, kl, marks = [], [], []
    departures = first_departures(tokenizer, rows, [ids for ids, _ in gens])
    with torch.no_grad():
        for p, (ids, _), d in zip(prompts, gens, departures):
            if not ids:
                continue
            full = torch.tensor(p + ids, dtype=torch.long)
            span = slice(len(p) - 1, len(full) - 1)
            stats = token_stats_from_hidden(_final_hidden(student, full)[span], s_head, _final_hidden(teacher, full)[span],
                                            t_head, names=("entropy_norm", "reverse_kl"))
            ent.append(stats["entropy_norm"])
            kl.append(stats["reverse_kl"])
            m = torch.zeros(len(ids), dtype=torch.bool)
            if d is not None:
                m[d] = True
            marks.append(m)
    h, d, m = torch.cat(ent), torch.cat(kl), torch.cat(marks)
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
            "mean_kl_other": float(d[~m].double().mean()) if (~m).any() else float("nan")}


# ------------------------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------------------------

def summarize(runs: list[dict], before: dict, settings: RealSettings, configs) -> list[dict]:
    from .real_task import paired_interval

    table = []
    base = {r["seed"]: r for r in runs if r["config"] == "all_tokens"}
    for name in configs:
        rs = sorted((r for r in runs if r["config"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        row = {"config": name, "seeds": [r["seed"] for r in rs], "kept_fraction": _avg(r["kept_fraction"] for r in rs),
               "train_seconds": _avg(r["train_seconds"] for r in rs)}
        for key in ("reward", "boxed", "eot", "kl", "teacher_nll", "mean_length"):
            row[key] = _avg(r["after"][key] for r in rs)
        after = [x for r in rs for x in r["after"]["per_prompt"]["reward"]]
        row["reward_vs_before"] = paired_interval(after, before["per_prompt"]["reward"] * len(rs), settings.bootstrap)
        nll = [x for r in rs for x in r["after"]["per_prompt"]["teacher_nll"]]
        row["teacher_nll_vs_before"] = paired_interval(nll, before["per_prompt"]["teacher_nll"] * len(rs),
                                                       settings.bootstrap)
        if name != "all_tokens" and all(r["seed"] in base for r in rs):
            ref = [x for r in rs for x in base[r["seed"]]["after"]["per_prompt"]["reward"]]
            row["reward_vs_all"] = paired_interval(after, ref, settings.bootstrap)
        table.append(row)
    return table


def _avg(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def run_real_lab(output_dir: str, settings: RealSettings, configs=DEMO_CONFIGS, adapter: str | None = None,
                 retrain: bool = False, cache_dir=None, log=None) -> dict:
    import torch

    from opsd.core.models import load_causal_lm, load_tokenizer

    from .real_assets import write_jsonl
    from .real_task import DEFAULT_ADAPTER, evaluate_model, real_pair, task_rows

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    adapter = adapter or DEFAULT_ADAPTER
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
             os.path.join(output_dir, "runs")) for seed in settings.seeds for c in configs]
    pool = ProcessPoolExecutor(max_workers=max(1, settings.workers), initializer=_worker_init)
    t = time.perf_counter()
    futures = [pool.submit(_run_job, job) for job in jobs]
    log(f"[real_lab] {len(jobs)} OPD runs ({settings.steps} steps x batch {settings.batch_size} x "
        f"{settings.max_new_tokens} tokens) on {settings.workers} worker(s); probe and census meanwhile")

    probe_rows = eval_rows[: settings.n_probe]
    tp = time.perf_counter()
    probe_result = probe(student, teacher, tokenizer, probe_rows, settings.max_new_tokens, teacher_eval["reward"],
                         before["reward"])
    census_result = census(student, teacher, tokenizer, probe_rows, settings.max_new_tokens)
    timing["probe_census_seconds"] = time.perf_counter() - tp
    log(f"[real_lab] probe: {probe_result['verdict']['summary']}")
    diagnostic = None
    if settings.diagnostic:
        td = time.perf_counter()
        diagnostic = fixed_context_diagnostic(student, teacher, tokenizer, train_rows, settings, output_dir)
        timing["diagnostic_seconds"] = time.perf_counter() - td
    del student, teacher

    runs = []
    for f in futures:
        r = f.result()
        runs.append(r)
        log(f"[real_lab] {r['config']} seed {r['seed']}: reward {r['after']['reward']:.2f}, KL {r['after']['kl']:.3f}, "
            f"teacher-text NLL {r['after']['teacher_nll']:.3f}, end-of-turn {r['after']['eot']:.2f} "
            f"({r['train_seconds']:.0f} s training)")
    pool.shutdown()
    timing["runs_seconds"] = time.perf_counter() - t
    timing["total_seconds"] = time.perf_counter() - t0
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": asdict(settings),
        "configs": list(configs), "adapter": adapter, "student": str(student_dir), "teacher": str(teacher_dir),
        "teacher_eval": teacher_eval, "before": before, "probe": probe_result, "census": census_result,
        "runs": runs, "table": summarize(runs, before, settings, configs), "diagnostic": diagnostic,
        "timing": timing, "load_average": os.getloadavg(), "machine": machine(),
    }
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(format_report(result))
    return result


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
    return f"{iv['mean']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"


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
        f"{s['max_new_tokens']}, reverse KL, seeds {list(s['seeds'])}, {s['workers']} worker(s) x 1 thread.", "",
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
        "", "## After distillation (held-out)", "",
        "| config | kept | reward | Δ reward vs before [95%] | Δ reward vs all tokens [95%] | teacher-text NLL | "
        "end-of-turn | boxed | KL(student‖teacher) | train s |", "|---|---|---|---|---|---|---|---|---|---|",
        f"| (before) | | {_f(b['reward'])} | | | {_f(b['teacher_nll'])} | {_f(b['eot'])} | {_f(b['boxed'])} | "
        f"{_f(b['kl'])} | |",
    ]
    for row in r["table"]:
        lines.append(f"| {row['config']} | {_f(row['kept_fraction'], '.2f')} | {_f(row['reward'])} | "
                     f"{_iv(row['reward_vs_before'])} | {_iv(row.get('reward_vs_all'))} | {_f(row['teacher_nll'])} | "
                     f"{_f(row['eot'])} | {_f(row['boxed'])} | {_f(row['kl'])} | {_f(row['train_seconds'], '.0f')} |")
    lines += ["", "Intervals: paired bootstrap over seeds x held-out prompts (percentile, 95%).", ""]
    if r.get("diagnostic"):
        lines += ["## Fixed-context diagnostic (lab.diagnose on the real pair)", "",
                  "See diagnostic/report.md for the whole report.", ""]
        lines += diagnostic_summary(r["diagnostic"])
    t = r["timing"]
    lines += ["## Timing", "", ", ".join(f"{k.replace('_seconds', '')} {v:.0f} s" for k, v in t.items()), ""]
    return "\n".join(lines)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the lab's rule set, 3 seeds, 40 steps, and the diagnostic")
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
    p.add_argument("--n_train", type=int, default=None)
    p.add_argument("--adapter", default=None, help="teacher adapter name (lab.real_task.ADAPTERS)")
    p.add_argument("--retrain", action="store_true", help="train the teacher adapter again (cached in .cache/real)")
    p.add_argument("--cache_dir", default=None)
    return p


def main(argv=None) -> int:
    from .real_task import ADAPTERS

    parser = build_parser()
    args = parser.parse_args(argv)
    preset = args.preset or ("full" if args.full else "demo")
    settings = PRESETS[preset]
    configs = tuple(args.configs) if args.configs else (FULL_CONFIGS if preset == "full" else DEMO_CONFIGS)
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        print(f"error: --configs: unknown configuration(s) {bad}; known: {list(CONFIGS)}", file=sys.stderr)
        return 2
    if args.adapter is not None and args.adapter not in ADAPTERS:
        print(f"error: --adapter: unknown adapter {args.adapter!r}; known: {list(ADAPTERS)}", file=sys.stderr)
        return 2
    for flag in ("steps", "workers", "n_eval", "max_new_tokens", "n_train"):
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
    for flag in ("steps", "workers", "n_eval", "max_new_tokens", "learning_rate", "n_train"):
        if getattr(args, flag) is not None:
            settings = replace(settings, **{flag: getattr(args, flag)})
    if "all_tokens" not in configs:
        print("error: --configs must include all_tokens (the baseline the rules are compared with)", file=sys.stderr)
        return 2
    from .real_assets import MissingAsset

    output_dir = args.output_dir or os.path.join("runs", f"real-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    _worker_init()
    try:
        result = run_real_lab(output_dir, settings, configs, args.adapter, args.retrain, args.cache_dir)
    except MissingAsset as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    print(f"[real_lab] wrote {output_dir}/report.md and report.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
