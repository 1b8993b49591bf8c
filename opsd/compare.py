"""Put training runs side by side: configuration differences, accuracy, token budget, speed and memory.

    python -m opsd.compare runs/opd runs/tip-soft_or-50 runs/tip-q3-10 --out reports/cmp [--baseline runs/opd]

Each RUN_DIR must hold ``run_summary.json`` (written by ``python -m opsd.train`` / ``python -m tip_ext.train``);
``eval_summary.json`` (``python -m opsd.evaluate``) is read from ``RUN_DIR/`` or ``RUN_DIR/eval/`` when present.

Columns (one row per run):

- ``config``: the configuration fields whose values differ between the runs (``Section.field=value``; paths that
  only name a run's own outputs, such as output_dir, logging_dir, run_name and token_dump_dir, are ignored).
- ``selector`` / ``ratio``: the token selector and retention ratio (``all`` = full-token OPD, no selector).
- per benchmark ``mean@k`` and ``pass@k`` (percent).
- ``kept tokens``: total completion tokens that entered the loss; ``kept frac``: step-weighted mean kept fraction.
- ``generated tokens``: completion tokens sampled by the student over training. Estimated from the log history
  (each log entry averages the steps since the previous one, so values are weighted by the steps they cover):
  ``kept_tokens / kept_fraction`` per step (exact for every process, all-reduced in the trainer) when both are
  logged; else ``completions/mean_length x per_device_train_batch_size x gradient_accumulation_steps`` (one
  process assumed); else the trainer's cumulative ``num_tokens`` (prompt + completion tokens). The source used is
  recorded in comparison.json.
- ``teacher-scored tokens``: equal to the generated completion tokens. In this trainer the teacher runs one
  forward pass over every rollout and its distribution is computed at every completion position (selectors
  need it to rank tokens; the full-token loss needs it everywhere): token selection saves student-side loss rows
  and memory, not teacher queries.
- collapse signals (opsd.collapse, docs/METHODS.md "Collapse signals"), per benchmark from eval_summary.json:
  ``end-of-turn`` (percent of completions that ended their turn), ``distinct-2`` and ``teacher NLL`` (the run's
  mean NLL of the teacher's text; present when opsd.evaluate ran with ``--teacher``); and ``collapse``: the first
  validation step at which the collapse rule fired during training, with its signals (from run_summary.json's
  validation records), ``no`` when validation ran with the rule and never fired, ``—`` without validation.
- ``step time`` (mean seconds per optimizer step), ``peak mem`` (max of the logged peak_memory_gb),
  ``final loss`` (last logged training loss).

Noise marks against the baseline (the first run or ``--baseline``): an accuracy difference is marked ``~`` (within
noise) when ``|diff| < 2 * SE`` with ``SE = sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2)`` over problems (binomial
standard error of each run's accuracy; for mean@k it bounds the spread of per-problem means from above, so the
mark is conservative); step time is marked ``~`` within 10 %. Differences beyond noise are shown signed without
a mark.

Outputs to ``--out`` (when given): ``comparison.md`` (the printed table), ``comparison.json`` and the plots
``loss.png`` and ``kept_fraction.png`` (per step, all runs) and ``accuracy.png`` (mean@k per benchmark with
+-1 SE error bars; only when some run has evaluations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

__all__ = [
    "IGNORED_CONFIG_FIELDS",
    "RunData",
    "accuracy_noise",
    "build_comparison",
    "collapse_summary",
    "compare",
    "config_differences",
    "flatten_config",
    "format_markdown",
    "load_run",
    "main",
    "make_plots",
    "summarize_log_history",
]

#: config fields that only name a run's own outputs/identity: never shown as differences
IGNORED_CONFIG_FIELDS = frozenset({
    "output_dir", "logging_dir", "run_name", "token_dump_dir", "hub_model_id", "hub_token", "project",
    "trackio_space_id", "resume_from_checkpoint", "overwrite_output_dir",
})
ACCURACY_SIGMAS = 2.0
STEP_TIME_TOLERANCE = 0.10


class RunData(dict):
    """One run: ``name``, ``path``, ``config`` (section -> fields), ``log_history``, ``train_metrics``,
    ``eval`` (eval_summary.json or None), ``eval_path``."""


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); was the run interrupted while writing it?") from err


def load_run(run_dir: str, name: str | None = None) -> RunData:
    """A run directory's summary (+ evaluation); FileNotFoundError with the fix when something is missing."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"Run directory not found: {run_dir!r}.")
    summary_path = os.path.join(run_dir, "run_summary.json")
    if not os.path.isfile(summary_path):
        raise FileNotFoundError(
            f"{run_dir!r} has no run_summary.json: it is written by `python -m opsd.train` / `python -m "
            "tip_ext.train` at the end of training (was the run interrupted, or is this a checkpoint folder?)."
        )
    summary = _read_json(summary_path)
    eval_summary, eval_path = None, None
    for candidate in (os.path.join(run_dir, "eval_summary.json"), os.path.join(run_dir, "eval", "eval_summary.json")):
        if os.path.isfile(candidate):
            eval_summary, eval_path = _read_json(candidate), candidate
            break
    return RunData(
        name=name or os.path.basename(os.path.normpath(run_dir)), path=run_dir,
        config=summary.get("config") or {}, log_history=summary.get("log_history") or [],
        train_metrics=summary.get("train_metrics") or {}, eval=eval_summary, eval_path=eval_path,
        validation=summary.get("validation") or [],
    )


def _unique_names(dirs: Sequence[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [os.path.normpath(d) for d in dirs]


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


def flatten_config(config: dict) -> dict[str, object]:
    """``{"Section": {"field": v}}`` -> ``{"Section.field": v}`` (nested dict/list values kept whole)."""
    flat = {}
    for section, fields in config.items():
        if isinstance(fields, dict):
            for key, value in fields.items():
                flat[f"{section}.{key}"] = value
        else:
            flat[section] = fields
    return flat


def _ignored(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in IGNORED_CONFIG_FIELDS


def config_differences(configs: Sequence[dict]) -> list[str]:
    """Flattened keys whose values differ between the configs (missing counts as a value), in first-seen order."""
    flats = [flatten_config(c) for c in configs]
    keys: dict[str, None] = {}
    for flat in flats:
        for key in flat:
            keys.setdefault(key, None)
    out = []
    for key in keys:
        if _ignored(key):
            continue
        values = [json.dumps(f[key], sort_keys=True, default=str) if key in f else "\0missing" for f in flats]
        if len(set(values)) > 1:
            out.append(key)
    return out


def _field(config: dict, name: str):
    """First value of ``name`` in any config section (None when absent)."""
    for fields in config.values():
        if isinstance(fields, dict) and name in fields:
            return fields[name]
    return None


def _selector(config: dict) -> tuple[str, float | None]:
    selector = _field(config, "selector")
    if not selector:
        return "all", None
    ratio = _field(config, "ratio")
    return str(selector), (float(ratio) if ratio is not None else None)


def _fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


# ----------------------------------------------------------------------------------------------------------------
# Training log
# ----------------------------------------------------------------------------------------------------------------


def _train_entries(log_history: Sequence[dict]) -> list[tuple[dict, int]]:
    """Training log entries (those with a ``loss``) and the number of optimizer steps each one averages."""
    out, prev = [], 0
    for entry in log_history:
        if "loss" not in entry:
            continue
        step = entry.get("step")
        span = max(int(step) - prev, 1) if isinstance(step, (int, float)) else 1
        prev = int(step) if isinstance(step, (int, float)) else prev + 1
        out.append((entry, span))
    return out


def _num(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _weighted_mean(entries, key) -> float | None:
    pairs = [(_num(e.get(key)), s) for e, s in entries]
    pairs = [(v, s) for v, s in pairs if v is not None]
    if not pairs:
        return None
    return sum(v * s for v, s in pairs) / sum(s for _, s in pairs)


def summarize_log_history(log_history: Sequence[dict], config: dict | None = None) -> dict:
    """Token counts, speed, memory and loss of one run from its log history (see the module docstring)."""
    config = config or {}
    entries = _train_entries(log_history)
    out: dict[str, object] = {"logged_steps": sum(s for _, s in entries),
                              "steps": max((int(e["step"]) for e, _ in entries if _num(e.get("step")) is not None),
                                           default=None)}
    kept = [(_num(e.get("kept_tokens")), _num(e.get("kept_fraction")), s) for e, s in entries]
    kept_known = [(k, f, s) for k, f, s in kept if k is not None]
    out["kept_tokens"] = sum(k * s for k, _, s in kept_known) if kept_known else None
    out["kept_fraction"] = _weighted_mean(entries, "kept_fraction")

    generated, source = None, None
    if kept_known and all(f is not None and f > 0 for _, f, _ in kept_known) and len(kept_known) == len(entries):
        generated, source = sum(k / f * s for k, f, s in kept_known), "kept_tokens/kept_fraction"
    else:
        per_device, accumulation = _field(config, "per_device_train_batch_size"), _field(config,
                                                                                         "gradient_accumulation_steps")
        lengths = [(_num(e.get("completions/mean_length")), s) for e, s in entries]
        if lengths and all(v is not None for v, _ in lengths) and per_device and accumulation:
            generated = sum(v * s for v, s in lengths) * int(per_device) * int(accumulation)
            source = "completions/mean_length x batch (1 process)"
        else:
            totals = [_num(e.get("num_tokens")) for e in log_history if _num(e.get("num_tokens")) is not None]
            if totals:
                generated, source = max(totals), "num_tokens (prompt + completion)"
    out["generated_tokens"] = generated
    out["generated_tokens_source"] = source
    out["teacher_scored_tokens"] = generated
    out["step_time"] = _weighted_mean(entries, "step_time")
    memories = [_num(e.get("peak_memory_gb")) for e in log_history]
    memories = [m for m in memories if m is not None]
    out["peak_memory_gb"] = max(memories) if memories else None
    losses = [_num(e.get("loss")) for e, _ in entries]
    losses = [v for v in losses if v is not None]
    out["final_loss"] = losses[-1] if losses else None
    out["completion_mean_length"] = _weighted_mean(entries, "completions/mean_length")
    return out


def _series(log_history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, entry in enumerate(log_history):
        if "loss" not in entry or _num(entry.get(key)) is None:
            continue
        xs.append(_num(entry.get("step")) if _num(entry.get("step")) is not None else float(i + 1))
        ys.append(float(entry[key]))
    return xs, ys


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def _eval_metrics(run: RunData) -> dict[str, dict]:
    """``{benchmark: {"mean": p, "pass": p, "k": k, "n": problems}}`` from a run's eval_summary.json."""
    if not run.get("eval"):
        return {}
    out = {}
    for name, m in (run["eval"].get("benchmarks") or {}).items():
        k = m.get("k")
        if k is None:
            keys = [key for key in m if key.startswith("mean@")]
            k = int(keys[0].split("@")[1]) if keys else None
        out[name] = {"k": k, "n": m.get("n_problems"), "mean": m.get(f"mean@{k}"), "pass": m.get(f"pass@{k}"),
                     "pass1": m.get("pass@1"), "eot_rate": m.get("eot_rate"), "distinct_2": m.get("distinct_2"),
                     "teacher_nll": m.get("teacher_nll"), "clipped_ratio": m.get("clipped_ratio")}
    return out


def collapse_summary(validation: Sequence[dict]) -> dict | None:
    """The first validation record where the collapse rule fired: {step, sets: {name: [signals]}}; ``{}`` when the
    validation records carry the rule but it never fired; None without validation records."""
    if not validation:
        return None
    for record in validation:
        if record.get("collapse"):
            return {"step": record.get("step"),
                    "sets": {name: sorted((r.get("signals") or {}).keys()) for name, r in record["collapse"].items()}}
    return {}


def accuracy_noise(p1: float, n1: int, p2: float, n2: int, sigmas: float = ACCURACY_SIGMAS) -> tuple[float, float,
                                                                                                        bool]:
    """(difference p2 - p1, combined binomial standard error, within noise: |diff| < sigmas * SE)."""
    se = math.sqrt(max(p1 * (1 - p1), 0.0) / max(n1, 1) + max(p2 * (1 - p2), 0.0) / max(n2, 1))
    diff = p2 - p1
    return diff, se, abs(diff) < sigmas * se if se > 0 else diff == 0


# ----------------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------------


def build_comparison(runs: Sequence[RunData], baseline: int = 0, sigmas: float = ACCURACY_SIGMAS,
                     step_time_tolerance: float = STEP_TIME_TOLERANCE) -> dict:
    """The comparison as a JSON-ready dict (rows in run order; ``baseline`` indexes ``runs``)."""
    diff_keys = config_differences([r["config"] for r in runs])
    benchmarks: dict[str, None] = {}
    for run in runs:
        for name in _eval_metrics(run):
            benchmarks.setdefault(name, None)
    base = runs[baseline]
    base_eval = _eval_metrics(base)
    base_train = summarize_log_history(base["log_history"], base["config"])
    rows = []
    for i, run in enumerate(runs):
        flat = flatten_config(run["config"])
        selector, ratio = _selector(run["config"])
        train = summarize_log_history(run["log_history"], run["config"])
        evals = _eval_metrics(run)
        row = {"name": run["name"], "path": run["path"], "baseline": i == baseline, "selector": selector,
               "ratio": ratio, "config": {k: flat.get(k) for k in diff_keys}, "train": train, "eval": evals,
               "collapse": collapse_summary(run.get("validation") or []), "noise": {}}
        if i != baseline:
            for bench, m in evals.items():
                b = base_eval.get(bench)
                if not b:
                    continue
                for metric in ("mean", "pass"):
                    if m.get(metric) is None or b.get(metric) is None:
                        continue
                    diff, se, within = accuracy_noise(b[metric], b.get("n") or 1, m[metric], m.get("n") or 1, sigmas)
                    row["noise"][f"{bench}/{metric}"] = {"diff": diff, "se": se, "within_noise": within}
            if train["step_time"] is not None and base_train["step_time"]:
                rel = train["step_time"] / base_train["step_time"] - 1.0
                row["noise"]["step_time"] = {"relative_diff": rel, "within_noise": abs(rel) < step_time_tolerance}
        rows.append(row)
    return {"baseline": base["name"], "config_differences": diff_keys, "benchmarks": list(benchmarks),
            "accuracy_sigmas": sigmas, "step_time_tolerance": step_time_tolerance, "runs": rows}


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if spec == "int":
        return f"{float(value):,.0f}"
    return format(value, spec)


def _fmt_acc(row: dict, bench: str, metric: str) -> str:
    m = row["eval"].get(bench)
    if not m or m.get(metric) is None:
        return "—"
    text = f"{100 * m[metric]:.1f}"
    noise = row["noise"].get(f"{bench}/{metric}")
    if noise:
        text += f" ({100 * noise['diff']:+.1f}{' ~' if noise['within_noise'] else ''})"
    return text


def _fmt_collapse(collapse: dict | None) -> str:
    if collapse is None:
        return "—"
    if not collapse:
        return "no"
    signals = sorted({sig for names in collapse["sets"].values() for sig in names})
    return f"step {collapse['step']}: {', '.join(signals)}"


def format_markdown(comparison: dict) -> str:
    """Markdown table of a ``build_comparison`` result, with a legend."""
    runs = comparison["runs"]
    header = ["run", "config", "selector", "ratio"]
    for bench in comparison["benchmarks"]:
        ks = {r["eval"][bench]["k"] for r in runs if bench in r["eval"]}
        k = ks.pop() if len(ks) == 1 else "k"
        header += [f"{bench} mean@{k}", f"{bench} pass@{k}", f"{bench} end-of-turn", f"{bench} distinct-2",
                   f"{bench} teacher NLL"]
    header += ["collapse", "kept tokens", "kept frac", "generated tokens", "teacher-scored tokens", "step time (s)",
               "peak mem (GB)", "final loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in runs:
        t = row["train"]
        config = ", ".join(f"{k.split('.', 1)[-1]}={_fmt_value(v)}" for k, v in row["config"].items()) or "—"
        name = row["name"] + (" (baseline)" if row["baseline"] else "")
        cells = [name, config.replace("|", "\\|"), row["selector"], _fmt(row["ratio"], "g")]
        for bench in comparison["benchmarks"]:
            m = row["eval"].get(bench) or {}
            eot = m.get("eot_rate")
            cells += [_fmt_acc(row, bench, "mean"), _fmt_acc(row, bench, "pass"),
                      "—" if eot is None else f"{100 * eot:.1f}", _fmt(m.get("distinct_2"), ".3f"),
                      _fmt(m.get("teacher_nll"), ".3f")]
        cells.append(_fmt_collapse(row.get("collapse")))
        step = _fmt(t["step_time"], ".3g")
        st_noise = row["noise"].get("step_time")
        if st_noise:
            step += f" ({100 * st_noise['relative_diff']:+.0f}%{' ~' if st_noise['within_noise'] else ''})"
        cells += [_fmt(t["kept_tokens"], "int"), _fmt(t["kept_fraction"], ".3f"), _fmt(t["generated_tokens"], "int"),
                  _fmt(t["teacher_scored_tokens"], "int"), step, _fmt(t["peak_memory_gb"], ".2f"),
                  _fmt(t["final_loss"], ".4g")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Baseline: {comparison['baseline']}. Accuracy in percent; (+x) = difference to the baseline, "
              f"'~' = within noise (|diff| < {comparison['accuracy_sigmas']:g} x binomial SE over problems); step "
              f"time '~' = within {100 * comparison['step_time_tolerance']:.0f}%. Teacher-scored tokens = generated "
              "completion tokens (the teacher scores every generated token). End-of-turn in percent of completions; "
              "collapse: first validation step where the collapse rule fired, and its signals (docs/METHODS.md)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------


def make_plots(runs: Sequence[RunData], comparison: dict, out_dir: str) -> list[str]:
    """loss.png, kept_fraction.png and (with evaluations) accuracy.png in ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, fname in (("loss", "training loss", "loss.png"),
                               ("kept_fraction", "kept fraction", "kept_fraction.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run in runs:
            xs, ys = _series(run["log_history"], key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=run["name"])
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    benches = comparison["benchmarks"]
    if benches:
        rows = comparison["runs"]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(benches) * max(1, len(rows)) / 2), 4))
        width = 0.8 / len(rows)
        for j, row in enumerate(rows):
            xs, ys, errs = [], [], []
            for b, bench in enumerate(benches):
                m = row["eval"].get(bench)
                if not m or m.get("mean") is None:
                    continue
                p, n = m["mean"], m.get("n") or 1
                xs.append(b + (j - (len(rows) - 1) / 2) * width)
                ys.append(100 * p)
                errs.append(100 * math.sqrt(max(p * (1 - p), 0.0) / n))
            ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=row["name"])
        ax.set_xticks(range(len(benches)))
        ax.set_xticklabels(benches)
        ax.set_ylabel("mean@k (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, "accuracy.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opsd.compare",
        description="Compare training runs (run_summary.json + optional eval_summary.json) side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run output directories.")
    p.add_argument("--out", default=None, help="Directory for comparison.md, comparison.json and the plots "
                   "(created); without it the table is only printed.")
    p.add_argument("--baseline", default=None, help="Run directory the others are compared against (default: the "
                   "first; added to the runs when not among them).")
    p.add_argument("--sigmas", type=float, default=ACCURACY_SIGMAS,
                   help="Accuracy differences below sigmas x SE are marked '~' (within noise).")
    p.add_argument("--step_time_tolerance", type=float, default=STEP_TIME_TOLERANCE,
                   help="Relative step-time differences below this are marked '~'.")
    return p


def compare(run_dirs: Sequence[str], out: str | None = None, baseline: str | None = None,
            sigmas: float = ACCURACY_SIGMAS, step_time_tolerance: float = STEP_TIME_TOLERANCE) -> dict:
    """Load, compare, write (when ``out``) and return ``{"comparison", "markdown", "plots"}``."""
    dirs = list(run_dirs)
    base_index = 0
    if baseline is not None:
        norm = [os.path.realpath(d) for d in dirs]
        if os.path.realpath(baseline) in norm:
            base_index = norm.index(os.path.realpath(baseline))
        else:
            dirs.insert(0, baseline)
    runs = [load_run(d, name) for d, name in zip(dirs, _unique_names(dirs))]
    comparison = build_comparison(runs, base_index, sigmas, step_time_tolerance)
    markdown = format_markdown(comparison)
    plots = []
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "comparison.md"), "w", encoding="utf-8") as f:
            f.write(markdown + "\n")
        with open(os.path.join(out, "comparison.json"), "w", encoding="utf-8") as f:
            json.dump(comparison, f, indent=2, default=str)
        plots = make_plots(runs, comparison, out)
    return {"comparison": comparison, "markdown": markdown, "plots": plots}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = compare(args.run_dirs, args.out, args.baseline, args.sigmas, args.step_time_tolerance)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    if args.out:
        print(f"[opsd.compare] wrote {args.out}/comparison.md, comparison.json and {len(result['plots'])} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
