"""The Rethinking-OPD scenarios: `python -m lab.scenarios [--scenario incompatible|no_new_capability|estimators|all]
[--seeds 0 1 2] [--steps N] [--output_dir DIR]`.

(a) incompatible: the teacher of `addition_swapped` (lab.tasks: every scratchpad column written carry first) and the
    addition lab's usual warm-started student (digit first). Runs: OPD from the warm start, and the paper's off-policy
    cold start (opsd.cold_start: teacher rollouts on train prompts, SFT of the student on them) at the two strengths
    of `COLD_STARTS`, each followed by the same OPD (the report also gives each cold start alone).
(b) no_new_capability: the teacher is the student's own warm-start checkpoint; OPD vs the warm start.
(c) estimators: on the standard addition lab, full-vocabulary OPD vs the top-K estimators `loss_support=union` and
    `student_topk` at equal steps.
Every run goes through the real trainer (lab.study.run_distillation: OPDTrainer) with `overlap_diagnostics` on and a
small `overlap_k` (the lab's vocabulary has 18 tokens: the paper's K = 16 would make the top-K sets nearly the whole
vocabulary and the shared mass ~1 by construction). Writes <output_dir>/scenarios.{md,json}: per-configuration means
with t intervals over seeds, paired bootstrap intervals (seeds x prompts) against the reference run of the scenario,
and the per-step overlap curves of one successful and one failing run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

from .models import default_lab_config, prepare_lab_models, train_teacher
from .study import RunSpec, StudySettings, _eval_prompts, _quiet, paired_interval, run_distillation

SCENARIOS = ("incompatible", "no_new_capability", "estimators")
OVERLAP_K = 4
# Two cold-start strengths (seed 0, measured on the addition lab): 512 rollouts x 100 SFT steps of 32 switch the
# student to the teacher's order without teaching it the task (exact match 0.11 after SFT; 60 steps at 3e-3 gave
# 0.015), 2048 rollouts x 300 steps of 64 (9 epochs) are sequence-level distillation that nearly solves it (0.95).
COLD_STARTS = {
    "cold_start_short": dict(n_prompts=512, sft_steps=100, sft_lr=2e-3, batch_size=32),
    "cold_start_long": dict(n_prompts=2048, sft_steps=300, sft_lr=2e-3, batch_size=64),
}


def prepare_swapped_teacher(cache_dir: str, cfg=None, progress: bool = True) -> dict:
    """The `addition_swapped` teacher, trained once and cached under cache_dir/scen-<task>-<key>/teacher (the
    student is the addition lab's: only the teacher's training data differs)."""
    cfg = cfg or default_lab_config("addition_swapped")
    final = os.path.join(cache_dir, f"scen-{cfg.task_name}-{cfg.cache_key()}")
    metrics_file = os.path.join(final, "metrics.json")
    if os.path.isfile(metrics_file):
        with open(metrics_file) as f:
            return {"teacher": os.path.join(final, "teacher"), "metrics": json.load(f), "cached": True}
    os.makedirs(cache_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".scen-", dir=cache_dir)
    try:
        metrics = train_teacher(os.path.join(work, "teacher"), cfg, progress=progress)
        with open(os.path.join(work, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        os.rename(work, final)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
    return {"teacher": os.path.join(final, "teacher"), "metrics": metrics, "cached": False}


# t quantiles (97.5%) for the seed intervals; more than 10 seeds use the normal 1.96
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_interval(values) -> dict:
    """Mean with a 95% Student-t interval over seeds (a single seed has no interval: lo = hi = mean)."""
    v = [float(x) for x in values]
    m = statistics.fmean(v)
    if len(v) < 2:
        return {"mean": m, "lo": m, "hi": m, "n": len(v)}
    half = _T975.get(len(v) - 1, 1.96) * statistics.stdev(v) / len(v) ** 0.5
    return {"mean": m, "lo": m - half, "hi": m + half, "n": len(v)}


CURVE_KEYS = ("overlap/teacher_mass", "overlap/student_mass", "overlap/ratio", "overlap/entropy_gap")


def run_opd(name: str, student_dir: str, teacher_dir: str, tokenizer_dir: str, train_prompts: str, seed: int,
            settings: StudySettings, task, eval_prompts: list[str], work_dir: str, **config) -> dict:
    """One all-token OPD run through OPDTrainer with the overlap diagnostics on; `config`: extra OPDConfig fields
    (loss_support, loss_support_k, ...). Returns exact match, held-out KL, per-prompt correctness and the per-step
    overlap curve."""
    from transformers.trainer_callback import PrinterCallback

    from opsd.core.config import OPDConfig
    from opsd.core.models import load_causal_lm, load_tokenizer
    from opsd.core.trainer import OPDTrainer
    from opsd.data import load_prompt_dataset

    from .models import evaluate_student

    tokenizer = load_tokenizer(tokenizer_dir)
    args = OPDConfig(
        output_dir=os.path.join(work_dir, f"{name}-seed{seed}"), per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1, max_steps=settings.steps, learning_rate=settings.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, max_completion_length=task.max_new_tokens, temperature=1.0,
        bf16=False, gradient_checkpointing=False, use_cpu=True, save_strategy="no", report_to=[], logging_steps=1,
        seed=seed, disable_tqdm=True, chunk_size=512, overlap_diagnostics=True, overlap_k=OVERLAP_K, **config)
    start = time.perf_counter()
    trainer = OPDTrainer(load_causal_lm(student_dir), teacher_dir, args=args,
                         train_dataset=load_prompt_dataset(train_prompts), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    train_seconds = time.perf_counter() - start
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    final = evaluate_student(trainer.model.eval(), teacher, tokenizer, eval_prompts, task.max_new_tokens, task)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    curve = [{"step": h["step"], **{k: v for k, v in h.items() if k.startswith("overlap/")}} for h in logs]
    return {"config": name, "seed": seed, "exact_match": final["exact_match"], "heldout_kl": final["heldout_kl"],
            "correct": [bool(c) for c in final["correct"]], "curve": curve, "train_seconds": train_seconds,
            "final_loss": logs[-1]["loss"] if logs else None, "options": config}


def cold_start(teacher_dir: str, student_dir: str, train_prompts: str, out_dir: str, seed: int, max_new_tokens: int,
               n_prompts: int = 512, sft_steps: int = 60, sft_lr: float = 1e-3, batch_size: int = 32) -> dict:
    """opsd.cold_start end to end (teacher rollouts on `n_prompts` train prompts, SFT of the student with TRL's
    SFTTrainer); returns its summary. The SFT learning rate is the tiny models' (the tool's 1e-5 is an LLM's)."""
    from opsd.cold_start import main as cold_start_main

    cold_start_main(["--teacher", teacher_dir, "--student", student_dir, "--prompts", train_prompts,
                     "--output_dir", out_dir, "--limit", str(n_prompts), "--max_new_tokens", str(max_new_tokens),
                     "--temperature", "1.0", "--gen_batch_size", "128", "--learning_rate", str(sft_lr),
                     "--max_steps", str(sft_steps), "--per_device_train_batch_size", str(batch_size),
                     "--max_length", "64", "--seed", str(seed)])
    with open(os.path.join(out_dir, "cold_start_summary.json")) as f:
        return json.load(f)


def _flags(run_or_start) -> np.ndarray:
    return np.asarray(run_or_start["correct"], float)


def _start_point(student_dir, teacher_dir, tokenizer_dir, eval_prompts, task) -> dict:
    from opsd.core.models import load_causal_lm, load_tokenizer

    from .models import evaluate_student

    return evaluate_student(load_causal_lm(student_dir).eval(), load_causal_lm(teacher_dir).eval(),
                            load_tokenizer(tokenizer_dir), eval_prompts, task.max_new_tokens, task)


def run_scenarios(output_dir: str, scenarios=SCENARIOS, settings: StudySettings | None = None,
                  cache_dir: str = ".cache/lab", lab_configs: dict | None = None, cold_starts: dict | None = None,
                  progress: bool = True) -> dict:
    """Runs the scenarios in this process (one after the other) and writes scenarios.{md,json}.
    `lab_configs`: LabConfig overrides for "addition" / "addition_swapped" (tests use tiny ones); `cold_starts`:
    name -> `cold_start` options (default COLD_STARTS)."""
    from .tasks import get_task

    settings = settings or StudySettings(n_eval=200)
    lab_configs = lab_configs or {}
    cold_starts = cold_starts or COLD_STARTS
    os.makedirs(output_dir, exist_ok=True)
    t0 = time.perf_counter()

    def say(msg):
        if progress:
            print(f"[scenarios {time.perf_counter() - t0:5.0f} s] {msg}", flush=True)

    base_cfg = lab_configs.get("addition") or default_lab_config("addition")
    lab = prepare_lab_models(cache_dir, base_cfg, progress=progress)
    paths, task = lab["paths"], get_task("addition", base_cfg.task.to_dict())
    prompts = _eval_prompts(paths, settings.n_eval)
    work = os.path.join(output_dir, "runs")
    result = {"settings": {**settings.__dict__, "seeds": list(settings.seeds)}, "overlap_k": OVERLAP_K,
              "lab_key": lab["key"], "scenarios": {}, "date": time.strftime("%Y-%m-%d %H:%M")}
    common = dict(tokenizer_dir=paths["tokenizer"], train_prompts=paths["train_prompts"], settings=settings,
                  eval_prompts=prompts, work_dir=work)
    teacher_em = lab["metrics"]["teacher"].get("exact_match")

    if "incompatible" in scenarios:
        swap_cfg = lab_configs.get("addition_swapped") or default_lab_config("addition_swapped")
        swapped = prepare_swapped_teacher(cache_dir, swap_cfg, progress=progress)
        swap_task = get_task("addition_swapped", swap_cfg.task.to_dict())
        say(f"incompatible: swapped teacher exact match {swapped['metrics'].get('exact_match')}")
        start = _start_point(paths["student"], swapped["teacher"], paths["tokenizer"], prompts, swap_task)
        runs, colds = [], {name: [] for name in cold_starts}
        for seed in settings.seeds:
            runs.append(run_opd("opd_warm_start", paths["student"], swapped["teacher"], seed=seed, task=swap_task,
                                **common))
            say(f"incompatible opd_warm_start seed {seed}: EM {runs[-1]['exact_match']:.3f}")
            for cs_name, options in cold_starts.items():
                cold_dir = os.path.join(work, f"{cs_name}-seed{seed}")
                summary = cold_start(swapped["teacher"], paths["student"], paths["train_prompts"], cold_dir, seed,
                                     swap_task.max_new_tokens, **options)
                cs = _start_point(cold_dir, swapped["teacher"], paths["tokenizer"], prompts, swap_task)
                colds[cs_name].append({
                    "seed": seed, "exact_match": cs["exact_match"], "heldout_kl": cs["heldout_kl"],
                    "correct": [bool(c) for c in cs["correct"]], "options": options,
                    **{k: summary.get(k) for k in ("kept", "generated", "sft_steps", "sft_first_loss",
                                                    "sft_last_loss")}})
                runs.append(run_opd(f"{cs_name}+opd", cold_dir, swapped["teacher"], seed=seed, task=swap_task,
                                    **common))
                say(f"incompatible {cs_name} seed {seed}: EM after SFT {cs['exact_match']:.3f}, after OPD "
                    f"{runs[-1]['exact_match']:.3f}")
        sc = _summarize(runs, start, settings, teacher_em=swapped["metrics"].get("exact_match"),
                        reference="opd_warm_start", extra=colds)
        for row in sc["summary"]:  # what OPD adds on top of each cold start (paired by seed and prompt)
            if row["config"].endswith("+opd"):
                alone = {c["seed"]: c for c in colds[row["config"][: -len("+opd")]]}
                mine = sorted((r for r in runs if r["config"] == row["config"]), key=lambda r: r["seed"])
                row["vs_cold_start_alone"] = paired_interval(np.stack([_flags(r) for r in mine]),
                                                             np.stack([_flags(alone[r["seed"]]) for r in mine]),
                                                             settings.bootstrap)
        result["scenarios"]["incompatible"] = sc

    if "no_new_capability" in scenarios:
        start = _start_point(paths["student"], paths["student"], paths["tokenizer"], prompts, task)
        runs = []
        for seed in settings.seeds:
            runs.append(run_opd("opd_self_teacher", paths["student"], paths["student"], seed=seed, task=task,
                                **common))
            say(f"no_new_capability seed {seed}: EM {runs[-1]['exact_match']:.3f}")
        result["scenarios"]["no_new_capability"] = _summarize(runs, start, settings, teacher_em=start["exact_match"])

    if "estimators" in scenarios:
        start = _start_point(paths["student"], paths["teacher"], paths["tokenizer"], prompts, task)
        runs = []
        for support in ("full", "union", "student_topk"):
            extra = {} if support == "full" else {"loss_support": support, "loss_support_k": OVERLAP_K}
            for seed in settings.seeds:
                runs.append(run_opd(support, paths["student"], paths["teacher"], seed=seed, task=task, **common,
                                    **extra))
                say(f"estimators {support} seed {seed}: EM {runs[-1]['exact_match']:.3f}")
        result["scenarios"]["estimators"] = _summarize(runs, start, settings, teacher_em=teacher_em,
                                                       reference="full")

    result["wall_seconds"] = time.perf_counter() - t0
    result["load_average"] = os.getloadavg()[0]
    result["curves"] = pick_curves(result["scenarios"])
    with open(os.path.join(output_dir, "scenarios.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = format_report(result)
    with open(os.path.join(output_dir, "scenarios.md"), "w") as f:
        f.write(text)
    result["report"] = text
    return result


def _final_overlap(run: dict, key: str, last: int = 5) -> float | None:
    """Mean of an overlap statistic over the run's last `last` logged steps."""
    vals = [p[key] for p in run["curve"] if key in p][-last:]
    return statistics.fmean(vals) if vals else None


def _summarize(runs, start, settings, teacher_em=None, reference=None, extra=None) -> dict:
    start_flags = _flags(start)
    rows = []
    for name in dict.fromkeys(r["config"] for r in runs):
        mine = sorted((r for r in runs if r["config"] == name), key=lambda r: r["seed"])
        flags = np.stack([_flags(r) for r in mine])
        row = {"config": name, "seeds": [r["seed"] for r in mine],
               "exact_match": t_interval([r["exact_match"] for r in mine]),
               "heldout_kl": t_interval([r["heldout_kl"] for r in mine]),
               "vs_start": paired_interval(flags, np.tile(start_flags, (len(mine), 1)), settings.bootstrap)}
        for key in CURVE_KEYS + tuple(f"overlap/teacher_mass/{b}" for b in ("first", "middle", "last")):
            vals = [_final_overlap(r, key) for r in mine]
            first = [r["curve"][0].get(key) for r in mine if r["curve"]]
            if all(v is not None for v in vals) and vals:
                row[f"{key}/last5"] = t_interval(vals)
            if first and all(v is not None for v in first):
                row[f"{key}/step1"] = t_interval(first)
        if reference and name != reference:
            ref = {r["seed"]: r for r in runs if r["config"] == reference}
            paired = [r for r in mine if r["seed"] in ref]
            if paired:
                row[f"vs_{reference}"] = paired_interval(np.stack([_flags(r) for r in paired]),
                                                         np.stack([_flags(ref[r["seed"]]) for r in paired]),
                                                         settings.bootstrap)
        rows.append(row)
    out = {"start": {"exact_match": start["exact_match"], "heldout_kl": start["heldout_kl"]},
           "teacher_exact_match": teacher_em, "reference": reference, "summary": rows,
           "runs": [{k: v for k, v in r.items() if k != "correct"} for r in runs]}
    if extra:
        out["cold_starts"] = {}
        for k, v in extra.items():
            out["cold_starts"][k] = {"exact_match": t_interval([c["exact_match"] for c in v]),
                      "vs_start": paired_interval(np.stack([_flags(c) for c in v]),
                                                  np.tile(start_flags, (len(v), 1)), settings.bootstrap),
                      "per_seed": [{kk: vv for kk, vv in c.items() if kk != "correct"} for c in v]}
    return out


def pick_curves(scenarios: dict) -> dict:
    """Seed-0 overlap curves of the runs that show success and failure: the standard lab's full OPD and the cold
    start (successful) against OPD across incompatible patterns and from a self-teacher."""
    picks = {"success: standard addition, full OPD": ("estimators", "full"),
             "incompatible, short cold start + OPD": ("incompatible", "cold_start_short+opd"),
             "incompatible, long cold start + OPD": ("incompatible", "cold_start_long+opd"),
             "incompatible, OPD from the warm start": ("incompatible", "opd_warm_start"),
             "no new capability: self-teacher OPD": ("no_new_capability", "opd_self_teacher")}
    out = {}
    for label, (scen, cfg) in picks.items():
        runs = [r for r in scenarios.get(scen, {}).get("runs", []) if r["config"] == cfg]
        if runs:
            out[label] = min(runs, key=lambda r: r["seed"])["curve"]
    return out


def _iv(iv, d=3, signed=False):
    if iv is None:
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{d}f}}"
    return f"{f.format(iv['mean'])} [{f.format(iv['lo'])}, {f.format(iv['hi'])}]"


def format_report(result: dict) -> str:
    s = result["settings"]
    lines = ["# Rethinking-OPD scenarios (lab.scenarios)", "",
             f"{s['steps']} OPD steps x batch {s['batch_size']}, lr {s['learning_rate']}, seeds {s['seeds']}, "
             f"{s['n_eval']} held-out prompts, overlap_k = loss_support_k = {result['overlap_k']} (18-token "
             f"vocabulary); one process, one thread; wall {result['wall_seconds']:.0f} s, load average at the end "
             f"{result['load_average']:.1f}. Intervals: exact match and overlap over seeds are mean [95% t interval]; "
             "differences are paired bootstrap 95% over seeds x prompts. Overlap numbers are the mean of the last 5 "
             "logged steps (step 1's values follow each table).", ""]
    for name, sc in result["scenarios"].items():
        lines += [f"## {name}", "",
                  f"Teacher exact match {sc['teacher_exact_match']}; start (warm-started student) exact match "
                  f"{sc['start']['exact_match']:.3f}, held-out KL {sc['start']['heldout_kl']:.3f}."
                  + (f" 'vs reference' is paired against `{sc['reference']}`." if sc.get("reference") else ""), ""]
        for cs_name, c in sc.get("cold_starts", {}).items():
            o = c["per_seed"][0]["options"]
            after = next((r for r in sc["summary"] if r["config"] == f"{cs_name}+opd"), {})
            lines += [f"{cs_name} alone ({o['n_prompts']} teacher rollouts, {o['sft_steps']} SFT steps x batch "
                      f"{o['batch_size']}, lr {o['sft_lr']}; before OPD): exact match {_iv(c['exact_match'])}, vs "
                      f"start {_iv(c['vs_start'], signed=True)}; OPD on top of it: "
                      f"{_iv(after.get('vs_cold_start_alone'), signed=True)}.", ""]
        lines += ["| config | exact match | vs start | vs reference | held-out KL | teacher mass | student mass | "
                  "overlap ratio | entropy gap |", "|---|---|---|---|---|---|---|---|---|"]
        for row in sc["summary"]:
            ref = next((v for k, v in row.items() if k.startswith("vs_") and k not in ("vs_start",
                                                                                   "vs_cold_start_alone")), None)
            lines.append(
                f"| {row['config']} | {_iv(row['exact_match'])} | {_iv(row['vs_start'], signed=True)} | "
                f"{_iv(ref, signed=True) if ref else '-'} | {_iv(row['heldout_kl'], 2)} | "
                + " | ".join(_iv(row.get(f"{k}/last5"), 3) for k in CURVE_KEYS) + " |")
        lines += ["", "Step 1: " + "; ".join(
            f"{row['config']}: " + ", ".join(f"{k.split('/')[1]} {row[f'{k}/step1']['mean']:.3f}"
                                              for k in CURVE_KEYS if f"{k}/step1" in row)
            for row in sc["summary"]) + ".", ""]
        lines += ["Teacher mass on the shared set by response third (first / middle / last), last 5 steps: " + "; ".join(
            f"{row['config']}: " + " / ".join(f"{row[f'overlap/teacher_mass/{b}/last5']['mean']:.3f}"
                                              for b in ("first", "middle", "last")
                                              if f"overlap/teacher_mass/{b}/last5" in row)
            for row in sc["summary"]) + ".", ""]
    if result["curves"]:
        lines += ["## Overlap curves (seed 0; teacher mass / student mass / overlap ratio on the shared top-K set)", ""]
        for label, curve in result["curves"].items():
            pts = [p for p in curve if "overlap/teacher_mass" in p]
            every = max(1, len(pts) // 8)
            lines.append(f"- {label}: " + ", ".join(
                f"step {p['step']}: {p['overlap/teacher_mass']:.3f}/{p.get('overlap/student_mass', float('nan')):.3f}/"
                f"{p.get('overlap/ratio', float('nan')):.2f}" for p in (pts[::every] + pts[-1:] if (len(pts) - 1) % every else pts[::every])))
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.scenarios", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], nargs="+", default=["all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--n_eval", type=int, default=None, help="held-out prompts (default 200)")
    parser.add_argument("--output_dir", default=None, help="default: runs/scenarios-<time>")
    parser.add_argument("--cache_dir", default=".cache/lab")
    args = parser.parse_args(argv)
    _quiet()
    import torch

    torch.set_num_threads(1)
    settings = StudySettings(n_eval=200)
    if args.seeds:
        settings.seeds = tuple(args.seeds)
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        settings.steps = args.steps
    if args.n_eval is not None:
        settings = replace(settings, n_eval=args.n_eval)
    scenarios = SCENARIOS if "all" in args.scenario else tuple(args.scenario)
    out = args.output_dir or os.path.join("runs", f"scenarios-{time.strftime('%Y%m%d-%H%M%S')}")
    result = run_scenarios(out, scenarios, settings, cache_dir=args.cache_dir)
    print(result["report"])
    print(f"Report: {out}/scenarios.md, scenarios.json", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
