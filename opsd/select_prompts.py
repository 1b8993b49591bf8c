"""Teacher-aligned prompt selection (the Rethinking-OPD paper's second recovery strategy).

    python -m opsd.select_prompts --student STUDENT_DIR --teacher TEACHER_DIR --prompts candidates.jsonl \
        --output data/aligned.jsonl [--keep_fraction 0.5 | --keep_count 2000] [--rollouts 1 --max_new_tokens 128]

The criterion, exactly:
1. For each candidate prompt the student samples `--rollouts` short responses (`--max_new_tokens`); at every token of
   them (a student-visited state) the student's and teacher's next-token distributions give the shared-set masses
   P_S(S_K n T_K) and P_T(S_K n T_K) and the overlap ratio |S_K n T_K| / K (K = `--overlap_k`, default 16; see
   opsd.core.diagnostics).
2. The prompt's alignment score is the mean over those tokens of `--score`: `shared_mass` (default) =
   (P_S(S_K n T_K) + P_T(S_K n T_K)) / 2, `teacher_mass`, `student_mass` or `overlap_ratio`.
3. When the file has answers and `--eval_k` > 0, the teacher's and the student's mean verifiable rewards over
   `--eval_k` samples are measured; prompts with teacher reward < `--min_teacher_reward` or student reward >
   `--max_student_reward` are dropped first (defaults 0 and 1: nothing is dropped, the rewards are only reported).
   Use them to keep prompts the teacher can solve (it has something to teach) and the student cannot yet.
4. The remaining prompts are ranked by score (highest first; ties keep file order) and the top `--keep_fraction`
   (default 0.5) or `--keep_count` are written, with all their original columns, in file order, to `--output`.
   `--report` (default: OUTPUT with .report.json) holds every prompt's numbers and the score distribution.

What the paper says: OPD recovers when prompts are drawn from, or near, the teacher's own post-training
distribution ("teacher-aligned prompt selection"); operationally these are the prompts on which the teacher already
agrees with the student on the student's own trajectories, so the dense token reward is informative. The paper's
recipe uses the teacher's post-training prompt set; this tool ranks an arbitrary candidate pool by the measured
overlap instead, which is our operationalization, not the paper's procedure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .probe_teacher import (add_common_arguments, check_common_arguments, load_pair, prompt_scores,
                            rewards_of_pair, visited_state_diagnostics)

SCORES = ("shared_mass", "teacher_mass", "student_mass", "overlap_ratio")


def alignment_score(scores: dict, kind: str = "shared_mass") -> float | None:
    """A prompt's alignment score from its mean diagnostics (None when its rollouts were empty)."""
    if scores["shared_mass_student"] is None:
        return None
    return {"shared_mass": (scores["shared_mass_student"] + scores["shared_mass_teacher"]) / 2,
            "teacher_mass": scores["shared_mass_teacher"], "student_mass": scores["shared_mass_student"],
            "overlap_ratio": scores["overlap_ratio"]}[kind]


def choose(entries: list[dict], keep_fraction: float | None, keep_count: int | None, min_teacher_reward: float,
           max_student_reward: float) -> list[int]:
    """Indices of the kept prompts (criterion steps 3-4 of the module docstring)."""
    eligible = [e for e in entries if e["score"] is not None
                and (e["teacher_reward"] is None or e["teacher_reward"] >= min_teacher_reward)
                and (e["student_reward"] is None or e["student_reward"] <= max_student_reward)]
    ranked = sorted(eligible, key=lambda e: (-e["score"], e["index"]))
    if keep_count is None:
        keep_count = max(1, round(keep_fraction * len(entries))) if eligible else 0
    return sorted(e["index"] for e in ranked[:keep_count])


def distribution(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    s = sorted(values)

    def q(p):
        pos = p * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"n": len(s), "mean": sum(s) / len(s), "min": s[0], "p10": q(0.1), "p25": q(0.25), "median": q(0.5),
            "p75": q(0.75), "p90": q(0.9), "max": s[-1]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m opsd.select_prompts", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.set_defaults(max_new_tokens=128, eval_k=0)
    parser.add_argument("--output", required=True, help="Selected prompt file (.jsonl), original columns kept.")
    parser.add_argument("--report", default=None, help="JSON report (default: OUTPUT with .report.json).")
    parser.add_argument("--score", default="shared_mass", choices=SCORES, help="Alignment score (see above).")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--keep_fraction", type=float, default=None, help="Fraction of the candidates to keep (0.5).")
    group.add_argument("--keep_count", type=int, default=None, help="Number of prompts to keep.")
    parser.add_argument("--min_teacher_reward", type=float, default=0.0,
                        help="Drop prompts whose teacher reward is below this (needs answers and --eval_k > 0).")
    parser.add_argument("--max_student_reward", type=float, default=1.0,
                        help="Drop prompts whose student reward is above this (needs answers and --eval_k > 0).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .data import _resolve_data_file, load_prompt_dataset, read_records

    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if args.keep_count is not None and args.keep_count < 1:
        parser.error(f"--keep_count must be >= 1, got {args.keep_count}")
    if args.keep_fraction is not None and not 0.0 < args.keep_fraction <= 1.0:
        parser.error(f"--keep_fraction must be in (0, 1], got {args.keep_fraction}")
    keep_fraction = 0.5 if args.keep_fraction is None and args.keep_count is None else args.keep_fraction
    from pathlib import Path

    dataset = load_prompt_dataset(args.prompts, limit=args.limit)
    rows = read_records(_resolve_data_file(Path(args.prompts), "train"))[: len(dataset)]
    filters_on = args.min_teacher_reward > 0.0 or args.max_student_reward < 1.0
    if filters_on and (args.eval_k == 0 or "answer" not in dataset.column_names):
        parser.error("--min_teacher_reward / --max_student_reward need an answer column and --eval_k > 0.")
    student, tokenizer, teacher, teacher_tokenizer, kwargs = load_pair(args)
    print(f"[select_prompts] scoring {len(dataset)} prompts ({args.rollouts} rollouts of <= {args.max_new_tokens} "
          f"tokens each)", file=sys.stderr)
    per_prompt = visited_state_diagnostics(student, teacher, tokenizer, list(dataset["prompt"]), args.rollouts,
                                           args.max_new_tokens, args.temperature, 1.0, args.overlap_k,
                                           args.chunk_size, args.batch_size, args.seed, kwargs,
                                           teacher_tokenizer=teacher_tokenizer)
    _, _, t_per, s_per = rewards_of_pair(args, dataset, student, tokenizer, teacher, teacher_tokenizer, kwargs)
    entries = []
    for i, stats in enumerate(per_prompt):
        scores = prompt_scores(stats)
        entries.append({"index": i, "score": alignment_score(scores, args.score), **scores,
                        "teacher_reward": None if t_per is None else t_per[i],
                        "student_reward": None if s_per is None else s_per[i]})
    kept = choose(entries, keep_fraction, args.keep_count, args.min_teacher_reward, args.max_student_reward)
    kept_set = set(kept)
    for e in entries:
        e["kept"] = e["index"] in kept_set
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        for i in kept:
            f.write(json.dumps(rows[i], default=str) + "\n")
    scores = [e["score"] for e in entries if e["score"] is not None]
    report = {"criterion": {"score": args.score, "overlap_k": args.overlap_k, "rollouts": args.rollouts,
                            "max_new_tokens": args.max_new_tokens, "keep_fraction": keep_fraction,
                            "keep_count": args.keep_count, "min_teacher_reward": args.min_teacher_reward,
                            "max_student_reward": args.max_student_reward, "eval_k": args.eval_k},
              "n_candidates": len(entries), "n_kept": len(kept),
              "score_all": distribution(scores),
              "score_kept": distribution([e["score"] for e in entries if e["kept"]]),
              "threshold": min((e["score"] for e in entries if e["kept"]), default=None),
              "prompts": entries}
    report_path = args.report or os.path.splitext(args.output)[0] + ".report.json"
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    a, k = report["score_all"], report["score_kept"]
    print(f"[select_prompts] kept {len(kept)}/{len(entries)} prompts -> {args.output}; {args.score}: all "
          f"median {a.get('median', float('nan')):.4f} (p10 {a.get('p10', float('nan')):.4f}, p90 "
          f"{a.get('p90', float('nan')):.4f}), kept median {k.get('median', float('nan')):.4f}; report {report_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
