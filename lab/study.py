"""The default study of the CPU distillation lab: `python -m lab.study [--full] [--output_dir DIR]`.

What it does, in order:
1. Teacher and warm-started student (lab.models.prepare_lab_models; trained once, then cached).
2. Selector probe: the warm-started student samples completions of held-out prompts; every token gets the TIP /
   TA-OPD statistics from both models' logits, the known "Q3 by construction" positions (the token right after the
   student's first mistake, where the teacher says "<") are marked, and each configuration's rule is applied at
   its ratio: precision and recall of the kept set for those positions, and the quadrant census.
3. Distillation runs: every configuration x seed trains a fresh copy of the student with the same trainer code path
   as real runs (opsd.OPDTrainer + tip_ext.TipSelector), at equal steps, batch and seeds; then held-out greedy
   exact match and held-out KL(student || teacher) on the student's own completions.
4. Report under the output folder: report.md, report.json, accuracy_vs_budget.png, census.png; a summary table is
   printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from . import task as T
from .models import LabConfig, evaluate_exact_match, generate_completions, heldout_kl, prepare_lab_models


@dataclass
class RunSpec:
    name: str
    selector: str | None  # None = all-token OPD, no statistics pass (the baseline)
    ratio: float = 1.0
    options: dict = field(default_factory=dict)


DEFAULT_CONFIGS = [
    RunSpec("all_tokens", None, 1.0),
    RunSpec("random@0.5", "random", 0.5),
    RunSpec("random@0.1", "random", 0.1),
    RunSpec("position_first@0.2", "position_first", 0.2),
    RunSpec("position_last@0.2", "position_last", 0.2),
    RunSpec("entropy_sample@0.5", "entropy_sample", 0.5),
    RunSpec("entropy_sample@0.2", "entropy_sample", 0.2),
    RunSpec("soft_or@0.5", "soft_or", 0.5),
    RunSpec("soft_or@0.2", "soft_or", 0.2),
    RunSpec("q3@0.2", "q3", 0.2),
    RunSpec("q3@0.1", "q3", 0.1),
    RunSpec("teachability@0.1", "teachability", 0.1),
    RunSpec("teachability@0.05", "teachability", 0.05),
    RunSpec("teachability_entropy@0.05", "teachability_entropy", 0.05),
]


@dataclass
class StudySettings:
    seeds: tuple = (0, 1, 2)
    steps: int = 40
    batch_size: int = 32
    learning_rate: float = 5e-4  # 2e-3 made all-token OPD diverge on the lab (EM 0.22 -> 0.13); 5e-4 and 1e-3 learn
    n_eval: int = 300
    n_probe: int = 200
    threads: int = 2
    # TA-OPD's K: the lab's vocabulary has 18 tokens, so the papers' K = 16 would make both top-K sets nearly the
    # whole vocabulary (support mass ~1, local KL = forward KL); K = 4 keeps the two axes informative.
    support_top_k: int = 4


PRESETS = {
    "default": StudySettings(),
    "full": StudySettings(seeds=(0, 1, 2, 3, 4), steps=120, n_eval=500, n_probe=500),
    "smoke": StudySettings(seeds=(0,), steps=2, batch_size=8, n_eval=16, n_probe=16),
}


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 10 ms from /proc (frees lower the RSS, so a run
    in a long-lived process is measured on its own)."""

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


# ------------------------------------------------------------------------------------------- selector probe
@torch.no_grad()
def probe_selectors(student, teacher, tokenizer, prompts, configs, max_new_tokens, seed=0, top_k=16) -> dict:
    """Precision / recall of each configuration's kept set for the known Q3 positions, and the quadrant census."""
    from tip_ext import quadrant_census, select, token_stats

    comps = generate_completions(student, tokenizer, prompts, max_new_tokens, greedy=False, seed=seed)
    s_rows, t_rows, labels, seq = [], [], [], []
    for i, (prompt, comp) in enumerate(zip(prompts, comps)):
        if comp.numel() == 0:
            continue
        prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"])
        ids = torch.cat([prompt_ids, comp])[None]
        rows = slice(len(prompt_ids) - 1, ids.shape[1] - 1)  # positions predicting the completion tokens
        s_rows.append(student(input_ids=ids).logits[0, rows])
        t_rows.append(teacher(input_ids=ids).logits[0, rows])
        labels += T.error_positions(prompt, comp.tolist(), tokenizer)
        seq += [i] * comp.numel()
    stats = token_stats(torch.cat(s_rows), torch.cat(t_rows), top_k=top_k)
    is_q3 = torch.tensor(labels, dtype=torch.bool)
    seq = torch.tensor(seq)
    census = quadrant_census(stats["entropy_norm"], stats["reverse_kl"], is_q3)
    out = {"tokens": int(is_q3.numel()), "q3_positions": int(is_q3.sum()),
           "census_all": {q: census[f"all/{q}"] for q in ("Q1", "Q2", "Q3", "Q4")},
           "census_q3_positions": {q: census[f"kept/{q}"] for q in ("Q1", "Q2", "Q3", "Q4")}, "selectors": {}}
    for spec in configs:
        keep = (torch.ones_like(is_q3) if spec.selector is None else
                select(spec.selector, stats, spec.ratio, sequence_ids=seq, generator=torch.Generator().manual_seed(seed),
                       **spec.options).keep)
        hits = int((keep & is_q3).sum())
        kept_census = quadrant_census(stats["entropy_norm"], stats["reverse_kl"], keep)
        out["selectors"][spec.name] = {
            "kept_fraction": keep.float().mean().item(),
            "precision": hits / max(int(keep.sum()), 1),
            "recall": hits / max(int(is_q3.sum()), 1),
            "kept_census": {q: kept_census[f"kept/{q}"] for q in ("Q1", "Q2", "Q3", "Q4")},
        }
    return out


# ------------------------------------------------------------------------------------------- distillation runs
def run_distillation(spec: RunSpec, seed: int, paths: dict, settings: StudySettings, max_new_tokens: int,
                     eval_prompts: list[str], work_dir: str) -> dict:
    """One OPD run through the real trainer; returns its metrics."""
    from opsd.core.config import OPDConfig
    from opsd.data import load_prompt_dataset
    from opsd.core.models import load_causal_lm, load_tokenizer
    from transformers.trainer_callback import PrinterCallback

    from opsd.core.trainer import OPDTrainer
    from tip_ext.trainer import SelectorConfig, make_selector

    tokenizer = load_tokenizer(paths["tokenizer"])
    args = OPDConfig(
        output_dir=os.path.join(work_dir, f"{spec.name}-seed{seed}"), per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1, max_steps=settings.steps, learning_rate=settings.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, max_completion_length=max_new_tokens, temperature=1.0,
        bf16=False, gradient_checkpointing=False, use_cpu=True, save_strategy="no", report_to=[],
        logging_steps=1, seed=seed, disable_tqdm=True, chunk_size=512,
    )
    selector = make_selector(SelectorConfig(selector=spec.selector, ratio=spec.ratio, selector_options=spec.options,
                                            support_top_k=settings.support_top_k))
    with PeakRSS() as memory:
        start = time.perf_counter()
        trainer = OPDTrainer(load_causal_lm(paths["student"]), paths["teacher"], args=args,
                             train_dataset=load_prompt_dataset(paths["train_prompts"]), processing_class=tokenizer,
                             token_selector=selector)
        trainer.remove_callback(PrinterCallback)  # per-step logs stay in the report, not on the terminal
        trainer.train()
        train_seconds = time.perf_counter() - start
    student = trainer.model.eval()
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    kept = sum(h.get("kept_tokens", 0) for h in logs)
    generated = sum(h["kept_tokens"] / h["kept_fraction"] for h in logs if h.get("kept_fraction"))
    return {
        "config": spec.name, "seed": seed, "selector": spec.selector, "ratio": spec.ratio,
        "exact_match": evaluate_exact_match(student, tokenizer, eval_prompts, max_new_tokens),
        "heldout_kl": heldout_kl(student, teacher, tokenizer, eval_prompts, max_new_tokens),
        "kept_tokens": kept, "generated_tokens": generated, "kept_fraction": kept / max(generated, 1),
        "train_seconds": train_seconds, "peak_extra_gb": memory.extra_gb,
        "final_loss": logs[-1]["loss"] if logs else None,
    }


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], configs: list[RunSpec]) -> list[dict]:
    rows = []
    for spec in configs:
        mine = [r for r in runs if r["config"] == spec.name]
        if not mine:
            continue
        row = {"config": spec.name, "selector": spec.selector or "none (all tokens)", "ratio": spec.ratio,
               "seeds": len(mine)}
        for key in ("exact_match", "heldout_kl", "kept_fraction", "kept_tokens", "train_seconds", "peak_extra_gb"):
            row[key], row[f"{key}_sd"] = _mean_sd([r[key] for r in mine])
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- report
def _fmt(mean, sd, digits=3):
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if not sd else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def format_report(result: dict) -> str:
    lab, probe, settings = result["lab"], result["probe"], result["settings"]
    start = result["start"]
    lines = [
        "# CPU distillation lab: default study", "",
        f"Date {result['date']}; {settings['steps']} OPD steps x batch {settings['batch_size']}, lr "
        f"{settings['learning_rate']}, seeds {list(settings['seeds'])}; held-out prompts: {settings['n_eval']}; "
        f"{settings['threads']} CPU threads; total wall time {result['wall_seconds']:.0f} s.", "",
        f"Teacher exact match {lab['teacher_exact_match']:.3f}; warm-started student {start['exact_match']:.3f}, "
        f"held-out KL {start['heldout_kl']:.3f} (before distillation).", "",
        "## Distillation at equal steps and seeds (mean ± sd over seeds)", "",
        "| config | kept fraction | exact match after | held-out KL after | train time (s) | peak extra RSS (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        lines.append(f"| {row['config']} | {_fmt(row['kept_fraction'], 0, 3)} | "
                     f"{_fmt(row['exact_match'], row['exact_match_sd'])} | {_fmt(row['heldout_kl'], row['heldout_kl_sd'])} | "
                     f"{_fmt(row['train_seconds'], row['train_seconds_sd'], 1)} | "
                     f"{_fmt(row['peak_extra_gb'], 0, 3)} |")
    lines += [
        "", "## Selector probe: known Q3 positions (token right after the student's first mistake)", "",
        f"{probe['tokens']} sampled tokens of the warm-started student, {probe['q3_positions']} known Q3 positions. "
        "Census (median thresholds) of all tokens: "
        + ", ".join(f"{q} {v:.2f}" for q, v in probe["census_all"].items())
        + "; of the known Q3 positions: " + ", ".join(f"{q} {v:.2f}" for q, v in probe["census_q3_positions"].items())
        + ".", "",
        "| config | kept fraction | precision | recall | kept Q1 | kept Q2 | kept Q3 | kept Q4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in probe["selectors"].items():
        c = s["kept_census"]
        lines.append(f"| {name} | {s['kept_fraction']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | "
                     f"{c['Q1']:.2f} | {c['Q2']:.2f} | {c['Q3']:.2f} | {c['Q4']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_report(result: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    families = {}
    for row in result["summary"]:
        families.setdefault(row["selector"], []).append(row)
    for family, rows in families.items():
        rows = sorted(rows, key=lambda r: r["kept_fraction"])
        ax.errorbar([r["kept_fraction"] for r in rows], [r["exact_match"] for r in rows],
                    yerr=[r["exact_match_sd"] or 0 for r in rows], marker="o", capsize=3, label=family)
    ax.axhline(result["start"]["exact_match"], color="0.5", ls=":", label="warm start")
    ax.set_xscale("log")
    ax.set_xlabel("kept fraction of generated tokens")
    ax.set_ylabel("held-out exact match after OPD")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy_vs_budget.png"))
    fig.savefig(paths[-1])
    plt.close(fig)

    probe = result["probe"]
    names = ["all tokens", "known Q3 positions", *probe["selectors"]]
    shares = [probe["census_all"], probe["census_q3_positions"], *[s["kept_census"] for s in probe["selectors"].values()]]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    bottom = [0.0] * len(names)
    for q, color in zip(("Q1", "Q2", "Q3", "Q4"), ("tab:red", "tab:orange", "tab:purple", "tab:gray")):
        values = [s[q] for s in shares]
        ax.bar(range(len(names)), values, bottom=bottom, color=color, label=q)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("share of tokens")
    ax.set_title("Quadrant census (median thresholds): all, known Q3 positions, kept by each rule")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "census.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def run_study(output_dir: str, settings: StudySettings, configs=None, cache_dir=".cache/lab",
              lab_config: LabConfig | None = None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from opsd.core.models import load_causal_lm, load_tokenizer

    configs = configs or DEFAULT_CONFIGS
    torch.set_num_threads(settings.threads)
    os.makedirs(output_dir, exist_ok=True)
    t0 = time.perf_counter()
    lab = prepare_lab_models(cache_dir, lab_config, progress=progress)
    paths, task_cfg = lab["paths"], T.TaskConfig(**lab["config"]["task"])
    max_new_tokens = T.max_completion_chars(task_cfg)
    eval_prompts = [r["prompt"] for r in T.read_prompt_file(paths["eval_prompts"])][: settings.n_eval]
    tokenizer = load_tokenizer(paths["tokenizer"])
    student, teacher = load_causal_lm(paths["student"]).eval(), load_causal_lm(paths["teacher"]).eval()
    start = {"exact_match": evaluate_exact_match(student, tokenizer, eval_prompts, max_new_tokens),
             "heldout_kl": heldout_kl(student, teacher, tokenizer, eval_prompts, max_new_tokens)}
    probe = probe_selectors(student, teacher, tokenizer, eval_prompts[: settings.n_probe], configs, max_new_tokens,
                            top_k=settings.support_top_k)
    runs = []
    jobs = [(spec, seed) for spec in configs for seed in settings.seeds]
    bar = tqdm(jobs, desc="OPD runs", disable=not progress, file=sys.stdout)
    for spec, seed in bar:
        bar.set_postfix_str(f"{spec.name} seed {seed}")
        runs.append(run_distillation(spec, seed, paths, settings, max_new_tokens, eval_prompts,
                                     os.path.join(output_dir, "runs")))
    teacher_metrics = lab["metrics"]["teacher"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "settings": asdict(settings), "lab_key": lab["key"],
        "lab": {"teacher_exact_match": teacher_metrics.get("exact_match"), "metrics": lab["metrics"],
                "cached": lab["cached"]},
        "start": start, "probe": probe, "runs": runs, "summary": summarize(runs, configs),
        "wall_seconds": time.perf_counter() - t0,
    }
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(result, f, indent=1)
    report = format_report(result)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(report)
    result["plots"] = plot_report(result, output_dir)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None, help="default: runs/lab-<preset>-<time>")
    parser.add_argument("--full", action="store_true", help="the complete study: 5 seeds, 120 steps, 500 held-out prompts")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--configs", nargs="+", default=None, help="subset of configuration names to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--learning_rate", type=float, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--cache_dir", default=".cache/lab")
    parser.add_argument("--lab_config", default=None,
                        help="JSON file with a LabConfig (e.g. a cached lab's config.json); default: LabConfig()")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    import warnings

    from transformers.utils import logging as hf_logging

    # keep the terminal for the study's own progress: library deprecation notices and weight-loading bars are noise
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    preset = args.preset or ("full" if args.full else "default")
    settings = PRESETS[preset]
    if args.seeds:
        settings.seeds = tuple(args.seeds)
    for name in ("steps", "learning_rate", "batch_size"):
        if getattr(args, name):
            setattr(settings, name, getattr(args, name))
    configs = DEFAULT_CONFIGS
    if args.configs:
        unknown = set(args.configs) - {c.name for c in DEFAULT_CONFIGS}
        if unknown:
            parser.error(f"unknown configs {sorted(unknown)}; known: {[c.name for c in DEFAULT_CONFIGS]}")
        configs = [c for c in DEFAULT_CONFIGS if c.name in args.configs]
    output_dir = args.output_dir or os.path.join("runs", f"lab-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    lab_config = None
    if args.lab_config:
        with open(args.lab_config) as f:
            lab_config = LabConfig.from_dict({k: v for k, v in json.load(f).items() if k != "version"})
    result = run_study(output_dir, settings, configs, cache_dir=args.cache_dir, lab_config=lab_config,
                       progress=not args.no_progress)
    print()
    print(format_report(result))
    print(f"Report: {output_dir}/report.md (JSON: report.json; plots: {', '.join(result['plots'])})")
    return result


if __name__ == "__main__":
    main()
