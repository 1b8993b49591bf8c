"""Which rule for my pair? `python -m lab.recommend --student DIR --teacher DIR --prompts FILE` (or `--lab_task NAME`).

The student samples completions of the prompts; every completion token gets the TIP / TA-OPD statistics from both
models' logits (tip_ext.token_stats, K = `--support_top_k`). From them this tool reports the regime the lab found
decisive and recommends a selection rule and a normalization, each with the lab evidence behind it (LAB.md):

1. Census (median cut-offs of normalized student entropy and reverse KL): the Q1..Q4 shares of all tokens.
2. Where the disagreement sits: the quadrant shares of the top 10% reverse-KL tokens (the tokens a divergence rule
   would keep; on the lab tasks, where the student's mistakes fall). Low-entropy disagreement (Q3) is a teacher
   asking for tokens the student gives ~0 mass: addition's correction token, 70% of its mistakes in Q3. High-entropy
   disagreement (Q1) is a student that hesitates where it errs: reverse_sum, 97% of its mistakes in Q1.
3. Degenerate axes: TA-OPD's support-mass axis whose q05 and q95 coincide (reverse_sum: q05 = q95 = 1 on almost
   every copy token), where the default quantile normalization zeroes real mistakes.

Recommendation (the decision rules, each tied to a lab result):
- Never a top-k of raw KL or Q3 when the top-KL tokens are mostly low-entropy (Q3 share >= 0.4): on addition both
  chase the correction-token positions and collapse (Q3-only 10%: exact match 0.000; raw KL 10%: -0.26 vs all).
- Q1 share of the top-KL tokens >= 0.7 and little Q3 (< 0.1): `soft_or@0.2` (TIP's soft-OR of entropy and KL, 20%
  per sequence): entropy finds the hesitations, KL the errors (reverse_sum: -0.001 [-0.017, +0.017] vs all tokens at
  equal steps, with 14% of the tokens).
- Otherwise (mixed or Q3-heavy disagreement): `entropy_kl_sample@0.2` (sample 20% with probability proportional to
  normalized entropy x min-max reverse KL): sampling keeps coverage of the sequence where top-k rules lose it
  (addition: +0.021 [-0.017, +0.058] vs all tokens at equal steps with 5 seeds; reverse_sum: -0.003 [-0.018, +0.013]).
- Normalization for TA-OPD's teachability rules: `minmax` when an axis is degenerate (reverse_sum: +0.077 [+0.037,
  +0.113] over q05/q95), else TA-OPD's default `quantile` (addition: min-max ties it, +0.009 [-0.017, +0.043]);
  never `rank` (fails on both lab tasks).
- Compute: the lab measures selective steps as slow as all-token steps at its sizes (lab.study, equal measured time),
  so a rule saves loss-token work, not time, unless the trainer's selective passes are cheaper at your shapes.

`lab.study` checks this recommendation against the study's best rule on every task it runs (the `Recommendation`
line of each task's report and the cross-task table): picked the best, a statistically tied rule (paired 95%
interval of the difference reaches 0), or neither.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

QUADRANTS = ("Q1", "Q2", "Q3", "Q4")
TOP_KL_SHARE = 0.1


def _quadrants(h: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Shares of Q1 (high H, high KL), Q2 (high H, low KL), Q3 (low H, high KL), Q4 (low H, low KL) among the tokens
    of `mask` (all when None), with the median cut-offs of all tokens (docs/METHODS.md section 2)."""
    hi_h, hi_kl = h >= h.median(), kl >= kl.median()
    sel = torch.ones_like(h, dtype=torch.bool) if mask is None else mask
    n = max(int(sel.sum()), 1)
    groups = {"Q1": hi_h & hi_kl, "Q2": hi_h & ~hi_kl, "Q3": ~hi_h & hi_kl, "Q4": ~hi_h & ~hi_kl}
    return {q: float((groups[q] & sel).sum()) / n for q in QUADRANTS}


def regime_from_stats(stats: dict[str, torch.Tensor]) -> dict:
    """The regime of a pair from per-token statistics over the student's sampled completions (`entropy_norm`,
    `reverse_kl`, optionally `support_mass`, `local_forward_kl`): census of all tokens, census of the top 10%
    reverse-KL tokens, and TA-OPD's axes' spread (`degenerate` axes)."""
    from tip_ext.selectors import normalization_spread

    h, kl = stats["entropy_norm"].double(), stats["reverse_kl"].double()
    n = h.numel()
    if n == 0:
        raise ValueError("no tokens to measure: the student produced empty completions")
    k = max(1, int(round(TOP_KL_SHARE * n)))
    top = torch.zeros(n, dtype=torch.bool)
    top[torch.argsort(kl, descending=True, stable=True)[:k]] = True
    spread = {}
    if "support_mass" in stats and "local_forward_kl" in stats:
        spread = normalization_spread("teachability", stats)
    return {"tokens": n, "census_all": _quadrants(h, kl), "census_top_kl": _quadrants(h, kl, top),
            "mean_reverse_kl": float(kl.mean()), "degenerate_axes": sorted(a for a, v in spread.items() if v["degenerate"]),
            "spread": spread}


def recommend(regime: dict) -> dict:
    """A rule (a lab.study configuration name, with its launch flags) and a normalization, with the reasons."""
    top = regime["census_top_kl"]
    reasons = []
    if top["Q1"] >= 0.7 and top["Q3"] < 0.1:
        config, flags = "soft_or@0.2", "--selector soft_or --ratio 0.2"
        reasons.append(f"{top['Q1']:.0%} of the top-10% reverse-KL tokens are high-entropy (Q1) and {top['Q3']:.0%} "
                       "low-entropy (Q3): the student hesitates where it disagrees, as on reverse_sum, where soft-OR "
                       "20% matched all tokens at equal steps (-0.001 [-0.017, +0.017]) with 14% of the tokens")
    else:
        config, flags = "entropy_kl_sample@0.2", "--selector entropy_sample --ratio 0.2 --gamma 1"
        reasons.append(f"the top-10% reverse-KL tokens are {top['Q1']:.0%} Q1 / {top['Q3']:.0%} Q3 (mixed or "
                       "low-entropy disagreement): sampling by entropy x KL keeps coverage of every sequence, as on "
                       "addition (+0.021 [-0.017, +0.058] vs all tokens at equal steps, 5 seeds) and reverse_sum "
                       "(-0.003 [-0.018, +0.013])")
    if top["Q3"] >= 0.4:
        reasons.append(f"avoid top-k of raw KL and Q3-only: {top['Q3']:.0%} of the top-KL tokens are confident "
                       "disagreements (a token the student gives ~0 mass), where those rules collapsed on addition "
                       "(Q3-only 10%: exact match 0.000)")
    degenerate = regime.get("degenerate_axes") or []
    if degenerate:
        normalization = "minmax"
        reasons.append(f"TA-OPD axis {', '.join(degenerate)} is degenerate (q05 = q95): use --normalization minmax "
                       "with the teachability rules (reverse_sum: +0.077 [+0.037, +0.113] over q05/q95); never rank")
    else:
        normalization = "quantile"
        reasons.append("no degenerate TA-OPD axis: TA-OPD's default q05/q95 normalization is fine (addition: min-max "
                       "ties it, +0.009 [-0.017, +0.043]); never rank")
    reasons.append("compute: at the lab's sizes selective steps measured as slow as all-token steps, so the rule "
                   "saves loss-token work, not time (see the study's equal-measured-time column)")
    return {"config": config, "flags": flags, "normalization": normalization, "reasons": reasons}


def check_recommendation(summary: list[dict], runs: list[dict], config: str, bootstrap: int = 2000) -> dict:
    """How the recommended configuration fared in a study's task: `best` (the selective configuration with the
    highest exact match at equal steps), `verdict` ("best", "tied" when the paired 95% interval of recommended -
    best reaches 0, "worse", or "not run"), and that interval."""
    import numpy as np

    from .study import paired_interval

    selective = [r for r in summary if r["selector"] != "none (all tokens)" and r.get("exact_match") is not None]
    if not selective:
        return {"best": None, "verdict": "not run", "interval": None}
    best = max(selective, key=lambda r: r["exact_match"])["config"]
    if config not in {r["config"] for r in selective}:
        return {"best": best, "verdict": "not run", "interval": None}
    if config == best:
        return {"best": best, "verdict": "best", "interval": None}
    a = {r["seed"]: r for r in runs if r["config"] == config}
    b = {r["seed"]: r for r in runs if r["config"] == best}
    seeds = sorted(set(a) & set(b))
    iv = paired_interval(np.stack([np.asarray(a[s]["correct"], float) for s in seeds]),
                         np.stack([np.asarray(b[s]["correct"], float) for s in seeds]), bootstrap)
    return {"best": best, "verdict": "tied" if iv["hi"] >= 0 else "worse", "interval": iv}


@torch.no_grad()
def measure_pair(student, teacher, tokenizer, prompts: list[str], max_new_tokens: int, support_top_k: int = 16,
                 seed: int = 0, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Token statistics over the student's sampled completions (temperature 1) of plain-text prompts."""
    from tip_ext import token_stats

    from .models import generate_completions

    comps = generate_completions(student, tokenizer, prompts, max_new_tokens, greedy=False, seed=seed,
                                 batch_size=batch_size)
    s_rows, t_rows = [], []
    for prompt, comp in zip(prompts, comps):
        if comp.numel() == 0:
            continue
        prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"])
        ids = torch.cat([prompt_ids, comp])[None]
        rows = slice(len(prompt_ids) - 1, ids.shape[1] - 1)
        s_rows.append(student(input_ids=ids).logits[0, rows].float())
        t_rows.append(teacher(input_ids=ids).logits[0, rows].float())
    if not s_rows:
        raise ValueError("the student produced no completion tokens for these prompts")
    return token_stats(torch.cat(s_rows), torch.cat(t_rows), top_k=support_top_k)


def format_recommendation(regime: dict, rec: dict) -> str:
    lines = [f"Regime ({regime['tokens']} sampled student tokens):",
             "  census of all tokens: " + ", ".join(f"{q} {v:.2f}" for q, v in regime["census_all"].items()),
             "  census of the top-10% reverse-KL tokens: "
             + ", ".join(f"{q} {v:.2f}" for q, v in regime["census_top_kl"].items()),
             "  degenerate TA-OPD axes: " + (", ".join(regime["degenerate_axes"]) or "none"),
             f"Recommendation: {rec['config']} ({rec['flags']}); normalization for teachability rules: "
             f"{rec['normalization']}", "Because:"]
    lines += [f"  - {r}" for r in rec["reasons"]]
    return "\n".join(lines)


def _error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.recommend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=None, help="student model directory (with --teacher and --prompts)")
    p.add_argument("--teacher", default=None)
    p.add_argument("--tokenizer", default=None, help="default: the student's")
    p.add_argument("--prompts", default=None, help="jsonl with a `prompt` column: plain text as is, or a list of "
                   "chat messages (opsd.data's layout, e.g. prepare_data.sh output) through the chat template")
    p.add_argument("--lab_task", default=None, help="use a lab task's models and eval prompts instead")
    p.add_argument("--task_module", action="append", default=[], help="module registering lab tasks")
    p.add_argument("--lab_cache", default=".cache/lab")
    p.add_argument("--limit", type=int, default=200, help="prompts to sample (default 200)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: the lab task's, else 256")
    p.add_argument("--support_top_k", type=int, default=None,
                   help="K of TA-OPD's support sets (default: 4 for a lab task, whose vocabularies have ~16 tokens; "
                   "else 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the regime and the recommendation as JSON here")
    args = p.parse_args(argv)
    if bool(args.lab_task) == bool(args.student or args.teacher or args.prompts):
        _error("give either --lab_task NAME or all of --student, --teacher and --prompts")
    if not args.lab_task and not (args.student and args.teacher and args.prompts):
        _error("--student, --teacher and --prompts go together")
    if args.limit < 1:
        _error(f"--limit must be >= 1, got {args.limit}")
    torch.set_num_threads(1)
    from opsd.core.models import load_causal_lm, load_tokenizer

    from .tasks import import_task_modules

    try:
        import_task_modules(args.task_module)
    except ValueError as err:
        _error(str(err))
    if args.lab_task:
        from .models import prepare_lab_models
        from .tasks import get_task

        try:
            task = get_task(args.lab_task)
        except ValueError as err:
            _error(f"--lab_task: {err}")
        lab = prepare_lab_models(args.lab_cache, args.lab_task, progress=False)
        paths = lab["paths"]
        student_dir, teacher_dir, tok_dir, prompt_file = (paths["student"], paths["teacher"], paths["tokenizer"],
                                                          paths["eval_prompts"])
        max_new, top_k = args.max_new_tokens or task.max_new_tokens, args.support_top_k or 4
    else:
        student_dir, teacher_dir, prompt_file = args.student, args.teacher, args.prompts
        tok_dir = args.tokenizer or args.student
        max_new, top_k = args.max_new_tokens or 256, args.support_top_k or 16
    try:
        with open(prompt_file) as f:
            prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: args.limit]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        _error(f"--prompts {prompt_file}: {err!r} (a jsonl file with a `prompt` column)")
    tokenizer = load_tokenizer(tok_dir)
    if any(not isinstance(p, str) for p in prompts):  # conversational rows (opsd.data's layout): the chat template
        if not getattr(tokenizer, "chat_template", None):
            _error(f"--prompts {prompt_file}: conversational prompts (message lists) but the tokenizer has no chat "
                   "template")
        prompts = [p if isinstance(p, str) else
                   tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    student = load_causal_lm(student_dir, what="Student").eval()
    teacher = load_causal_lm(teacher_dir, what="Teacher").eval()
    stats = measure_pair(student, teacher, tokenizer, prompts, max_new, top_k, args.seed)
    regime = regime_from_stats(stats)
    rec = recommend(regime)
    print(format_recommendation(regime, rec))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"regime": regime, "recommendation": rec}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
