"""Will OPD work with this teacher? Measure it on a pair and a prompt file before spending GPU hours.

    python -m opsd.probe_teacher --student STUDENT_DIR --teacher TEACHER_DIR --prompts data/train.jsonl \
        [--limit 64 --rollouts 2 --max_new_tokens 256 --eval_k 4 --output probe.json]

What it measures (the Rethinking-OPD paper's conditions, docs/METHODS.md section 6):
1. Student-visited states: the student samples `--rollouts` responses per prompt; at every response token both models'
   next-token distributions are compared (opsd.core.diagnostics): overlap ratio |S_K n T_K| / K, the shared set's
   mass under the student and the teacher, the entropy gap H(P_S) - H(P_T) and the reverse KL, overall and by
   response third (first / middle / last: the paper reports that the dense token reward degrades with depth).
2. Rewards, when the prompt file has answers: the teacher's and the student's mean verifiable reward over `--eval_k`
   samples per prompt (opsd.evaluate, opsd.reward).

Verdict (thresholds are this tool's heuristics, flags below; the paper gives no numeric cut-offs):
- compatible thinking patterns: min(student, teacher) mean shared-set mass >= --compatible_mass (0.7). The paper
  finds that in successful runs a small shared token set holds 97-99% of the mass at student-visited states, reached
  progressively during OPD, so the starting value may be lower; far below it means the teacher does not continue the
  student's own trajectories the way the student would. The default sits between the two real pairs measured here
  (LAB.md, "Real-model lab"): a 15-of-30-layer pruned SmolLM2 student stalled and then collapsed at 0.12 (0.43 after a
  cold start), while the same model with an SFT adapter as teacher started at 0.80 and all-token OPD raised its
  held-out reward 0 -> 0.27 in 10 steps. Until 2026-12 it was 0.9, which called that working pair incompatible;
- new capability: teacher reward - student reward >= --min_gain (0.05) and the teacher is distinguishable from the
  student (mean reverse KL >= --min_kl, 0.01 nats): the paper finds that a teacher with higher scores but no capability
  the student has not seen (e.g. a same-family teacher that is distributionally indistinguishable from the student's
  view) brings nothing. Without answers this part is reported as unknown.
Recovery suggestions follow the paper: off-policy cold start (python -m opsd.cold_start) for incompatible patterns,
teacher-aligned prompts (python -m opsd.select_prompts). A student directory written by opsd.cold_start carries
`cold_start_summary.json`; the probe then does not advise another cold start but says what to do next: a longer one
only if it used few responses, otherwise a teacher that shares the student's base model (the base plus a small adapter
that holds the new capability), or OPD with validation on so that the collapse rule (docs/METHODS.md) watches it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

import torch

from .core.diagnostics import BUCKETS, overlap_from_hidden, position_buckets
from .core.heads import head_of
from .core.models import resolve_distill_vocab

STAT_KEYS = ("overlap_ratio", "shared_mass_student", "shared_mass_teacher", "entropy_gap", "reverse_kl")


def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Final (post-norm) hidden states [L, H] of one sequence, without the [L, V] logits."""
    try:
        out = model(input_ids=ids[None], output_hidden_states=True, logits_to_keep=1)
    except TypeError:  # models without logits_to_keep
        out = model(input_ids=ids[None], output_hidden_states=True)
    return out.hidden_states[-1][0]


@torch.no_grad()
def visited_state_diagnostics(student, teacher, tokenizer, prompts: Sequence, rollouts: int = 1,
                              max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                              overlap_k: int = 16, chunk_size: int = 512, batch_size: int = 8, seed: int = 0,
                              chat_template_kwargs: dict | None = None, max_prompt_length: int | None = None,
                              teacher_tokenizer=None, progress: bool = True) -> list[dict]:
    """Per prompt: the diagnostics of every token of `rollouts` student samples, as float32 tensors under the
    names of STAT_KEYS plus `bucket` (0/1/2 response third); empty tensors when every sample ended at once."""
    from .evaluate import _generate_hf, tokenize_prompts

    vocab = resolve_distill_vocab(student, teacher, tokenizer, teacher_tokenizer)
    s_head, t_head = head_of(student, vocab), head_of(teacher, vocab)
    prompt_ids = tokenize_prompts(tokenizer, prompts, chat_template_kwargs, max_prompt_length)
    samples = _generate_hf(student, tokenizer, prompt_ids, rollouts, temperature, top_p, 0, max_new_tokens,
                           batch_size, seed, progress, "student rollouts")
    s_device, t_device = next(student.parameters()).device, next(teacher.parameters()).device
    results = []
    for i, (ids, outs) in enumerate(zip(prompt_ids, samples)):
        parts, seq_ids, positions = [], [], []
        for r, (completion, _) in enumerate(outs):
            if not completion:
                continue
            full = torch.tensor(ids + completion, dtype=torch.long)
            rows = slice(len(ids) - 1, len(full) - 1)  # the state before each response token
            h_s = _final_hidden(student, full.to(s_device))[rows]
            h_t = _final_hidden(teacher, full.to(t_device))[rows].to(t_head.weight.device)
            parts.append(overlap_from_hidden(h_s.to(s_head.weight.device), s_head, h_t, t_head, overlap_k,
                                             chunk_size, temperature if temperature and temperature > 0 else 1.0))
            seq_ids.append(torch.full((len(completion),), r))
            positions.append(torch.arange(len(completion)))
        if parts:
            stats = {k: torch.cat([p[k] for p in parts]).cpu() for k in STAT_KEYS}
            stats["bucket"] = position_buckets(torch.cat(seq_ids), torch.cat(positions))
        else:
            stats = {k: torch.zeros(0) for k in STAT_KEYS} | {"bucket": torch.zeros(0, dtype=torch.long)}
        results.append(stats)
        if progress and (i + 1) % 50 == 0:
            print(f"[diagnostics] {i + 1}/{len(prompt_ids)} prompts", file=sys.stderr)
    return results


def _mean(x: torch.Tensor) -> float | None:
    return float(x.double().mean()) if x.numel() else None


def aggregate(per_prompt: list[dict]) -> dict:
    """Token-weighted means over all prompts, overall and by response third."""
    if not per_prompt:
        return {}
    merged = {k: torch.cat([p[k] for p in per_prompt]) for k in (*STAT_KEYS, "bucket")}
    out = {"tokens": int(merged["bucket"].numel())}
    for key in STAT_KEYS:
        out[key] = _mean(merged[key])
        out[f"{key}_by_third"] = {label: _mean(merged[key][merged["bucket"] == b]) for b, label in enumerate(BUCKETS)}
    return out


def prompt_scores(stats: dict) -> dict:
    """One prompt's means (None for a prompt whose rollouts were empty)."""
    return {key: _mean(stats[key]) for key in STAT_KEYS} | {"tokens": int(stats["bucket"].numel())}


#: a cold start on fewer kept teacher responses than this may simply have been too short
SMALL_COLD_START = 500


def cold_start_advice(cold_start: dict, teacher: str | None = None) -> str:
    """What to do when a student that already had an off-policy cold start (its cold_start_summary.json) still
    does not share the teacher's patterns."""
    kept, steps = cold_start.get("kept"), cold_start.get("sft_steps")
    done = (f"This student already had an off-policy cold start (opsd.cold_start: {kept} teacher responses, "
            f"{steps} SFT steps, from {cold_start.get('teacher')}); another one on the same data will not change "
            "this much.")
    same_teacher = teacher is None or not cold_start.get("teacher") or \
        os.path.realpath(str(cold_start["teacher"])) == os.path.realpath(str(teacher))
    steps_next = []
    if not same_teacher:
        steps_next.append("the cold start used another teacher: probe against that one, or cold-start from this one")
    if isinstance(kept, int) and kept < SMALL_COLD_START:
        steps_next.append(f"a longer cold start only if it was short (it kept {kept} responses: more prompts "
                          "--limit, --rollouts, --num_train_epochs) and the shared mass rose since the raw student")
    steps_next.append("a teacher that shares the student's base model and way of writing (e.g. the student's base "
                      "plus a small adapter trained on the new capability)")
    steps_next.append("if you run OPD anyway, run it with validation (VAL_FILES, TEST_FREQ) so the collapse rule "
                      "watches teacher-text NLL and the end-of-turn rate (--stop_on_collapse true "
                      "stops it): on an incompatible pair reverse KL can fall while the student drifts away from "
                      "the teacher's text")
    return done + " Next: " + "; ".join(steps_next) + "."


def verdict(diagnostics: dict, teacher_reward: float | None, student_reward: float | None,
            compatible_mass: float = 0.7, min_gain: float = 0.05, min_kl: float = 0.01,
            cold_start: dict | None = None, teacher: str | None = None) -> dict:
    """The plain-language verdict and its inputs (see the module docstring for the criterion). ``cold_start``: the
    student's cold-start metadata (opsd.cold_start.read_summary), which changes the advice for incompatible
    patterns; ``teacher``: the probed teacher's directory (compared with the cold start's)."""
    mass = min(diagnostics.get("shared_mass_student") or 0.0, diagnostics.get("shared_mass_teacher") or 0.0)
    compatible = mass >= compatible_mass
    kl = diagnostics.get("reverse_kl") or 0.0
    distinguishable = kl >= min_kl
    if teacher_reward is None or student_reward is None:
        new_capability = None
    else:
        new_capability = distinguishable and teacher_reward - student_reward >= min_gain
    lines = [f"shared-set mass at student-visited states: {mass:.3f} (min of student/teacher; threshold "
             f"{compatible_mass}) -> {'compatible' if compatible else 'INCOMPATIBLE'} thinking patterns"]
    lines.append(f"mean reverse KL {kl:.4f} nats -> teacher is "
                 f"{'distinguishable from' if distinguishable else 'INDISTINGUISHABLE from'} the student")
    if new_capability is None:
        lines.append("new capability: unknown (no answers in the prompt file, or --eval_k 0)")
    else:
        lines.append(f"reward: teacher {teacher_reward:.3f} vs student {student_reward:.3f} (gain threshold "
                     f"{min_gain}) -> {'new capability' if new_capability else 'NO new capability'}")
    if compatible and new_capability:
        summary = "OPD is likely to work with this teacher."
    elif not compatible and cold_start is not None:
        summary = ("OPD is likely to stall: the teacher's distribution does not overlap the student's on the "
                   "student's own trajectories. " + cold_start_advice(cold_start, teacher))
    elif not compatible:
        summary = ("OPD is likely to stall: the teacher's distribution does not overlap the student's on the "
                   "student's own trajectories. Try an off-policy cold start (python -m opsd.cold_start) or "
                   "teacher-aligned prompts (python -m opsd.select_prompts).")
    elif new_capability is False:
        summary = ("OPD is unlikely to gain: the teacher offers no capability beyond the student's on these prompts "
                   "(pick a stronger or differently trained teacher, or harder prompts).")
    else:
        summary = "Patterns are compatible; whether the teacher adds capability is unknown without answers."
    if cold_start is not None:
        lines.append(f"student: cold-started by opsd.cold_start ({cold_start.get('kept')} teacher responses, "
                     f"{cold_start.get('sft_steps')} SFT steps)")
    return {"compatible": compatible, "new_capability": new_capability, "distinguishable": distinguishable,
            "shared_mass": mass, "summary": summary, "lines": lines, "cold_start": cold_start is not None}


def mean_reward(model, tokenizer, dataset, k: int, max_new_tokens: int, temperature: float, batch_size: int,
                seed: int, reward_fn, chat_template_kwargs, desc: str) -> tuple[float, list[float]]:
    """(mean reward over all samples, per-prompt mean rewards) of `k` samples per prompt."""
    from .evaluate import evaluate

    result = evaluate(model, tokenizer, dataset, k=k, temperature=temperature, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, seed=seed, reward_fn=reward_fn, chat_template_kwargs=chat_template_kwargs,
                      max_completion_chars=0, progress=False, desc=desc)
    per_prompt = [r["mean_reward"] for r in result["records"]]
    return sum(per_prompt) / len(per_prompt), per_prompt


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with opsd.select_prompts."""
    parser.add_argument("--student", required=True, help="Local student model directory (or LoRA adapter).")
    parser.add_argument("--teacher", required=True, help="Local teacher model directory.")
    parser.add_argument("--prompts", required=True, help="Prompt file (.jsonl/.json/.parquet or a data directory).")
    parser.add_argument("--limit", type=int, default=None, help="Use the first N prompts.")
    parser.add_argument("--rollouts", type=int, default=1, help="Student samples per prompt (default 1).")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Length of each student rollout.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling (and comparison) temperature.")
    parser.add_argument("--overlap_k", type=int, default=16, help="K of the top-K sets (paper: 16).")
    parser.add_argument("--eval_k", type=int, default=4,
                        help="Samples per prompt for the teacher's and student's rewards (needs answers; 0 = skip).")
    parser.add_argument("--eval_max_new_tokens", type=int, default=None,
                        help="Length of the reward samples (default: --max_new_tokens).")
    parser.add_argument("--reward_function", default="math", help="Reward function name (opsd.reward).")
    parser.add_argument("--batch_size", type=int, default=8, help="Generation batch size.")
    parser.add_argument("--chunk_size", type=int, default=512, help="Rows per chunk of the diagnostics.")
    parser.add_argument("--dtype", default=None, help="Model dtype (default bfloat16 on GPU, float32 on CPU).")
    parser.add_argument("--enable_thinking", default=None, choices=["true", "false"],
                        help="Passed to the chat template (Qwen3-style).")
    parser.add_argument("--seed", type=int, default=0)


def check_common_arguments(parser, args) -> None:
    for name in ("rollouts", "max_new_tokens", "overlap_k", "batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.eval_k < 0:
        parser.error(f"--eval_k must be >= 0, got {args.eval_k}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")


def load_pair(args):
    """(student, student tokenizer, teacher, teacher tokenizer, chat_template_kwargs) from the common flags."""
    from .evaluate import load_model_and_tokenizer

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    student, tokenizer = load_model_and_tokenizer(args.student, dtype=dtype)
    teacher, teacher_tokenizer = load_model_and_tokenizer(args.teacher, dtype=dtype)
    kwargs = None if args.enable_thinking is None else {"enable_thinking": args.enable_thinking == "true"}
    return student, tokenizer, teacher, teacher_tokenizer, kwargs


def rewards_of_pair(args, dataset, student, tokenizer, teacher, teacher_tokenizer, kwargs):
    """(teacher mean, student mean, teacher per prompt, student per prompt) or Nones without answers / eval_k 0."""
    if args.eval_k == 0 or "answer" not in dataset.column_names:
        return None, None, None, None
    from .reward import get_reward_fn

    reward_fn = get_reward_fn(args.reward_function)
    length = args.eval_max_new_tokens or args.max_new_tokens
    t_mean, t_per = mean_reward(teacher, teacher_tokenizer, dataset, args.eval_k, length, args.temperature,
                                args.batch_size, args.seed, reward_fn, kwargs, "teacher reward")
    s_mean, s_per = mean_reward(student, tokenizer, dataset, args.eval_k, length, args.temperature, args.batch_size,
                                args.seed, reward_fn, kwargs, "student reward")
    return t_mean, s_mean, t_per, s_per


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m opsd.probe_teacher", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--compatible_mass", type=float, default=0.7,
                        help="Shared-set mass at or above which the patterns count as compatible.")
    parser.add_argument("--min_gain", type=float, default=0.05,
                        help="Teacher-minus-student reward at or above which the teacher adds capability.")
    parser.add_argument("--min_kl", type=float, default=0.01,
                        help="Mean reverse KL (nats) below which the teacher is indistinguishable from the student.")
    parser.add_argument("--output", default=None, help="Write the numbers and the verdict as JSON here.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .data import load_prompt_dataset

    parser = build_parser()
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    dataset = load_prompt_dataset(args.prompts, limit=args.limit)
    student, tokenizer, teacher, teacher_tokenizer, kwargs = load_pair(args)
    print(f"[probe] {len(dataset)} prompts x {args.rollouts} student rollouts of <= {args.max_new_tokens} tokens",
          file=sys.stderr)
    per_prompt = visited_state_diagnostics(student, teacher, tokenizer, list(dataset["prompt"]), args.rollouts,
                                           args.max_new_tokens, args.temperature, 1.0, args.overlap_k,
                                           args.chunk_size, args.batch_size, args.seed, kwargs,
                                           teacher_tokenizer=teacher_tokenizer)
    diagnostics = aggregate(per_prompt)
    t_reward, s_reward, _, _ = rewards_of_pair(args, dataset, student, tokenizer, teacher, teacher_tokenizer, kwargs)
    from .cold_start import read_summary

    result = verdict(diagnostics, t_reward, s_reward, args.compatible_mass, args.min_gain, args.min_kl,
                     cold_start=read_summary(args.student), teacher=args.teacher)
    report = {"student": args.student, "teacher": args.teacher, "prompts": args.prompts, "n_prompts": len(dataset),
              "overlap_k": args.overlap_k, "diagnostics": diagnostics, "teacher_reward": t_reward,
              "student_reward": s_reward, "verdict": result}
    print(format_report(report))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def format_report(report: dict) -> str:
    d = report["diagnostics"]
    rows = [f"probe_teacher: {report['n_prompts']} prompts, {d.get('tokens', 0)} student-visited tokens, "
            f"K = {report['overlap_k']}", "", "| statistic | all | first third | middle third | last third |",
            "|---|---|---|---|---|"]
    for key in STAT_KEYS:
        third = d.get(f"{key}_by_third", {})
        rows.append(f"| {key} | {_fmt(d.get(key))} | " + " | ".join(_fmt(third.get(b)) for b in BUCKETS) + " |")
    rows.append("")
    rows.append(f"teacher reward {_fmt(report['teacher_reward'])}, student reward {_fmt(report['student_reward'])}")
    rows += [f"- {line}" for line in report["verdict"]["lines"]]
    rows.append(f"verdict: {report['verdict']['summary']}")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
