"""The real-pair collapse, reproduced and flagged: OPD on SmolLM2-135M-Instruct (student) from the same model plus
its SFT adapter (teacher, lab.real_task), at a learning rate that collapses and one that does not, through
`python -m opsd.train` with validation on, so the collapse rule of opsd.collapse (docs/METHODS.md section 10) judges
each run.

    python -m lab.real_collapse                          # lr 1e-4 and 5e-5, 20 steps of 8 prompts x 48 tokens
    python -m lab.real_collapse --lrs 1e-4 --steps 12 --batch 4 --length 32 --teacher DIR

Prints, per run and validation, the training loss (reverse KL on the student's own rollouts), the teacher-text NLL,
the end-of-turn rate, distinct-2, the reward and whether the rule fired; writes `summary.json` and each run's
directory under `--output_dir`. Too slow for the test suite on 2 cores (about 14 s per step of 8 x 48 tokens on one
free core, REAL_ASSETS.md; 35-130 s on the shared machine); tests/test_collapse.py reproduces the same signature on
the lab's tiny pair. Measured here (docs/METHODS.md section 10): the cheapest setting that collapsed and was flagged
is `--lrs 1e-3 --steps 8 --batch 4 --length 32 --val_every 4 --val_limit 8` (flagged at step 4, 349 s at load ~10);
lr 1e-4 at 4 x 32 (12 steps) and 8 x 48 (10 steps) stayed healthy and silent with the r8-all adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHORT_INSTRUCTION = "{question}\nWrite the calculation, then the final answer in the form \\boxed{{ANSWER}}."


def _pair(teacher: str | None):
    from .real_assets import materialize_smollm2

    student = materialize_smollm2(quiet=True)
    if teacher:
        return str(student), teacher
    try:
        from .real_task import real_pair
    except ImportError as err:
        raise SystemExit("error: --teacher is required until lab.real_task (the real pair) is available "
                         f"({err}).") from None
    return tuple(str(p) for p in real_pair())


def _rows(split: str, n: int) -> list[dict]:
    """Prompts of the real task (lab.real_task when present, else reasoning-gym chain_sum in the same wording)."""
    try:
        from .real_task import task_rows

        rows = task_rows(split, n)
    except ImportError:
        from .real_assets import prompt_rows, reasoning_gym_rows

        seed = 11 if split == "train" else 23
        rows = prompt_rows(reasoning_gym_rows("chain_sum", n, seed, min_terms=2, max_terms=2, min_digits=1,
                                              max_digits=2), f"chain_sum-{split}", SHORT_INSTRUCTION)
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]


def run_one(student: str, teacher: str, train: str, val: str, out: Path, lr: float, args) -> dict:
    from opsd.train import main

    argv = ["--model_name_or_path", student, "--teacher_model_name_or_path", teacher, "--train_file", train,
            "--output_dir", str(out), "--overwrite", "true", "--per_device_train_batch_size", str(args.batch),
            "--max_steps", str(args.steps), "--max_completion_length", str(args.length), "--max_prompt_length", "256",
            "--learning_rate", str(lr), "--lr_scheduler_type", "constant", "--logging_steps", "1",
            "--report_to", "none", "--gradient_checkpointing", "true", "--use_cpu", "true", "--save_strategy", "no",
            "--seed", str(args.seed), "--val_files", f"heldout={val}", "--test_freq", str(args.val_every),
            "--val_before_train", "true", "--val_n", str(args.val_n), "--val_temperature", "1.0",
            "--val_top_p", "1.0", "--val_top_k", "0", "--val_max_new_tokens", str(args.length),
            "--val_batch_size", "16"]
    if args.stop_on_collapse:
        argv += ["--stop_on_collapse", "true"]
    start = time.time()
    summary = main(argv)
    seconds = time.time() - start
    losses = [(h["step"], h["loss"]) for h in summary["log_history"] if "loss" in h]
    table = []
    for record in summary.get("validation", []):
        m = record["metrics"]
        table.append({"step": record["step"],
                      **{k: m.get(f"val/heldout/{k}") for k in ("teacher_nll", "eot_rate", "distinct_2",
                                                                 f"mean@{args.val_n}")},
                      "collapse": sorted((record.get("collapse", {}).get("heldout") or {}).get("signals", {}))})
    return {"lr": lr, "seconds": round(seconds, 1), "steps": summary["global_step"], "losses": losses,
            "validation": table, "first_flag": next((r["step"] for r in table if r["collapse"]), None)}


def format_run(run: dict, val_n: int) -> str:
    lines = [f"lr {run['lr']:g}: {run['steps']} steps in {run['seconds']:.0f} s; loss "
             + " ".join(f"{v:.2f}" for _, v in run["losses"]),
             "| step | teacher NLL | end-of-turn | distinct-2 | reward | collapse rule |", "|---|---|---|---|---|---|"]
    for r in run["validation"]:
        fmt = lambda x, s=".3f": "—" if x is None else format(x, s)  # noqa: E731
        lines.append(f"| {r['step']} | {fmt(r['teacher_nll'])} | {fmt(r['eot_rate'], '.2f')} | "
                     f"{fmt(r['distinct_2'])} | {fmt(r[f'mean@{val_n}'], '.2f')} | "
                     f"{', '.join(r['collapse']) or '—'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.real_collapse", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="teacher model directory (default: lab.real_task's real pair)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-5])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="prompts per step (one completion each)")
    p.add_argument("--length", type=int, default=48, help="completion tokens (training and validation)")
    p.add_argument("--val_every", type=int, default=5)
    p.add_argument("--val_limit", type=int, default=16, help="held-out prompts")
    p.add_argument("--val_n", type=int, default=2)
    p.add_argument("--n_train", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop_on_collapse", action="store_true")
    p.add_argument("--output_dir", default="runs/real-collapse")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "length", "val_every", "val_limit", "val_n", "n_train"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.teacher and not os.path.isdir(args.teacher):
        print(f"error: --teacher {args.teacher} is not a directory", file=sys.stderr)
        return 2
    from .real_assets import write_jsonl

    out = Path(args.output_dir)
    student, teacher = _pair(args.teacher)
    train = write_jsonl(_rows("train", args.n_train), out / "data" / "train.jsonl")
    val = write_jsonl(_rows("eval", args.val_limit), out / "data" / "heldout.jsonl")
    runs = []
    for lr in args.lrs:
        run = run_one(student, teacher, str(train), str(val), out / f"lr{lr:g}", lr, args)
        runs.append(run)
        print(format_run(run, args.val_n), flush=True)
        with open(out / "summary.json", "w") as f:
            json.dump({"settings": vars(args), "student": student, "teacher": teacher, "threads":
                       os.environ.get("OMP_NUM_THREADS"), "load": os.getloadavg(), "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
