"""Sampling-based evaluation of a local model on math benchmarks: mean@k and pass@k.

    python -m opsd.evaluate --model runs/tip-50 --data data/math500.jsonl AIME24=data/aime24.jsonl \
        --k 16 --temperature 1.0 --max_new_tokens 4096 --output_dir runs/tip-50/eval

For every problem of every benchmark file the model draws ``k`` completions; each completion gets a reward from
the reward function (``opsd.reward.math_reward`` by default: 1.0 when the last ``\\boxed{}`` / ``Answer:`` matches
the reference answer). Per benchmark:

- ``mean@k``: the mean reward over the k samples of a problem, averaged over problems (the papers' "mean@16" /
  "avg@16" at temperature 1.0).
- ``pass@j`` for j in {1, 2, 4, ..., k} and j = k: the unbiased estimator ``1 - C(n-c, j) / C(n, j)`` per problem
  (n samples drawn, c of them correct: reward > 0.5), averaged over problems. ``pass@1`` equals ``mean@k`` for 0/1
  rewards.
- ``mean_length``: mean completion length in tokens (up to and including the first EOS);
  ``truncated_fraction``: share of completions that never produced an EOS within ``max_new_tokens``.
- collapse signals (opsd.collapse, docs/METHODS.md "Collapse signals"): ``eot_rate`` (completions ending on a stop
  / end-of-turn token such as ``<|im_end|>``), ``clipped_ratio`` (completions that hit ``max_new_tokens``),
  ``distinct_1..3`` (distinct n-grams / n-grams over all completion tokens) and, with ``--teacher``,
  ``teacher_nll`` (the model's mean NLL, nats/token, of the teacher's greedy completions of the same prompts).
- ``std_err``: binomial standard error of ``mean@k`` over problems, ``sqrt(p (1 - p) / n_problems)`` (an upper
  bound for the spread of per-problem means in [0, 1]; opsd.compare uses it to call differences noise).

Outputs (``--output_dir``, default ``MODEL/eval``): ``eval_{benchmark}.json`` (settings, metrics and one record
per problem: index, id, prompt, answer, completions, rewards, correct count, lengths, truncated flags) and
``eval_summary.json`` (settings + metrics per benchmark + the markdown table that is also printed).

Prompts: a benchmark file is read with ``opsd.data.load_prompt_dataset`` (``prompt`` + ``answer`` columns, as
written by ``python -m opsd.data``). Conversational prompts go through the tokenizer's chat template with
``add_generation_prompt=True`` (and ``enable_thinking`` when given); plain strings are tokenized as they are. Both
exactly as the OPD trainer tokenizes training prompts.

Sampling (HF backend): the k samples of a problem are k consecutive rows; rows are generated ``--batch_size`` at a
time (``batch_size`` = sequences per ``generate`` call, not problems), left-padded. Before batch b the torch seed is
set to ``seed * 1_000_003 + b``: a run is reproducible given the same settings (batch size included, since
batched sampling shares one random stream). ``top_k`` defaults to 0 (off) and is passed explicitly, so a model's
own generation_config (e.g. Qwen3's top_k=20, top_p=0.95, temperature=0.6) never silently changes the sampling;
``temperature 0`` means greedy decoding.

Backends: ``hf`` (transformers ``generate``; works everywhere) and ``vllm`` (``vllm.LLM`` with
``SamplingParams(n=k)``; only when vLLM is installed). LoRA adapter directories (holding ``adapter_config.json``)
are loaded on their base model (``--base_model`` or the adapter's ``base_model_name_or_path``) and merged for HF;
vLLM serves them through a ``LoRARequest``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "BackendUnavailable",
    "collapse_signals",
    "evaluate",
    "format_table",
    "load_benchmark",
    "load_model_and_tokenizer",
    "main",
    "parse_data_specs",
    "pass_at_k",
    "pass_at_k_values",
    "summarize_records",
]

#: a completion counts as correct for pass@k when its reward exceeds this
CORRECT_THRESHOLD = 0.5


#: file stems that name a split, not a benchmark: the parent directory names the benchmark instead
SPLIT_NAMES = frozenset({"test", "train", "validation", "val", "eval"})


class BackendUnavailable(RuntimeError):
    """The requested generation backend cannot run here (e.g. vLLM not installed)."""


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n-c, k) / C(n, k)`` (probability that a random
    k-subset of the n samples holds at least one correct one)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_values(k: int) -> list[int]:
    """The j of the reported pass@j: powers of two up to k, and k itself."""
    values, j = [], 1
    while j <= k:
        values.append(j)
        j *= 2
    if values[-1] != k:
        values.append(k)
    return values


def summarize_records(records: Sequence[dict], k: int) -> dict:
    """Benchmark metrics from per-problem records (``rewards``, ``lengths``, ``truncated`` lists of equal size)."""
    n_problems = len(records)
    if n_problems == 0:
        raise ValueError("No problems to summarize.")
    per_problem = [sum(r["rewards"]) / len(r["rewards"]) for r in records]
    mean_at_k = sum(per_problem) / n_problems
    metrics = {"n_problems": n_problems, "k": k, f"mean@{k}": mean_at_k}
    for j in pass_at_k_values(k):
        metrics[f"pass@{j}"] = sum(pass_at_k(len(r["rewards"]), r["correct"], j) for r in records) / n_problems
    lengths = [x for r in records for x in r["lengths"]]
    truncated = [x for r in records for x in r["truncated"]]
    metrics["mean_length"] = sum(lengths) / len(lengths)
    metrics["truncated_fraction"] = sum(bool(x) for x in truncated) / len(truncated)
    metrics["std_err"] = math.sqrt(max(mean_at_k * (1.0 - mean_at_k), 0.0) / n_problems)
    return metrics


def format_table(benchmarks: dict[str, dict]) -> str:
    """Markdown table (percentages) of ``{benchmark: metrics}``, with the collapse signals (opsd.collapse)."""
    header = ("| benchmark | problems | k | mean@k | pass@1 | pass@k | mean length | truncated | end-of-turn | "
              "distinct-2 | teacher NLL |")
    lines = [header, "|" + "---|" * 11]

    def opt(m, key, pct):
        value = m.get(key)
        if value is None:
            return "—"
        return f"{100 * value:.1f}%" if pct else f"{value:.3f}"

    for name, m in benchmarks.items():
        k = m["k"]
        lines.append(
            f"| {name} | {m['n_problems']} | {k} | {100 * m[f'mean@{k}']:.1f} ± {100 * m['std_err']:.1f} | "
            f"{100 * m['pass@1']:.1f} | {100 * m[f'pass@{k}']:.1f} | {m['mean_length']:.0f} | "
            f"{100 * m['truncated_fraction']:.1f}% | {opt(m, 'eot_rate', True)} | {opt(m, 'distinct_2', False)} | "
            f"{opt(m, 'teacher_nll', False)} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Data and models
# ----------------------------------------------------------------------------------------------------------------


def parse_data_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``FILE`` or ``NAME=FILE`` -> [(benchmark name, path)]. The name defaults to the file stem, or to the parent
    directory's name when the stem is a split name (``data/math500/test.jsonl`` -> ``math500``); a directory
    holding ``test.*`` (python -m opsd.data --split_name test) is accepted too."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        if "=" in spec and not os.path.exists(spec):
            name, path = spec.split("=", 1)
            if not name:
                raise ValueError(f"Empty benchmark name in {spec!r}; use NAME=FILE.")
        else:
            path = spec
            norm = os.path.normpath(path)
            name = os.path.splitext(os.path.basename(norm))[0]
            parent = os.path.basename(os.path.dirname(os.path.abspath(norm)))
            if name in SPLIT_NAMES and parent:
                name = parent  # data/math500/test.jsonl -> math500
        if not os.path.exists(path):
            raise FileNotFoundError(f"Benchmark file not found: {path!r}. Prepare it with `python -m opsd.data "
                                    "--input RAW --output_dir DIR --split_name test` (run_scripts/prepare_data.sh).")
        if name in dict(out):
            raise ValueError(f"Benchmark name {name!r} given twice; rename one with NAME=FILE.")
        out.append((name, path))
    if not out:
        raise ValueError("No benchmark files given (--data FILE [FILE ...]).")
    return out


def load_benchmark(path: str, limit: int | None = None):
    """A benchmark as a ``datasets.Dataset`` with ``prompt``, ``answer`` and ``id`` (from the file's ``id`` column
    when present, else the row index)."""
    from .data import load_prompt_dataset, read_records

    dataset = load_prompt_dataset(path, limit=limit, split="test")
    if "answer" not in dataset.column_names or any(a is None for a in dataset["answer"]):
        raise ValueError(f"{path}: every problem needs an `answer` to be scored; convert the raw file with "
                         "`python -m opsd.data` (it keeps the reference answers).")
    from .data import _resolve_data_file

    ids = list(range(len(dataset)))
    file = _resolve_data_file(Path(path), "test")
    if file.is_file():
        rows = read_records(file)[: len(dataset)]
        if rows and all("id" in r and r["id"] is not None for r in rows):
            ids = [str(r["id"]) for r in rows]
    return dataset.add_column("id", [str(i) for i in ids])


def _is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _adapter_base(path: str, base_model: str | None) -> str:
    if base_model:
        return base_model
    with open(os.path.join(path, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(
            f"{path} is a LoRA adapter whose base model {base!r} is not a local directory: pass --base_model PATH "
            "(the local directory of the model the adapter was trained on)."
        )
    return base


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def load_model_and_tokenizer(model_path: str, base_model: str | None = None, dtype="float32",
                             device: str | None = None, attn_implementation: str | None = None):
    """(model in eval mode on ``device``, tokenizer) from a full model directory or a LoRA adapter directory.

    An adapter is applied to its base model with peft and merged (plain weights generate faster). The tokenizer
    comes from the adapter directory when it holds one (the trainer saves it there), else from the base model.
    """
    import torch

    from .core.models import check_local_path, load_causal_lm, load_tokenizer

    if model_path is None or not os.path.isdir(model_path):
        raise FileNotFoundError(f"Model not found at {model_path!r}: pass a local model or LoRA adapter directory.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _is_adapter(model_path):
        from peft import PeftModel

        base_path = check_local_path(_adapter_base(model_path, base_model), "Base model of the adapter")
        base = load_causal_lm(base_path, dtype=dtype, attn_implementation=attn_implementation, what="Base model")
        model = PeftModel.from_pretrained(base, model_path).merge_and_unload()
        tokenizer = load_tokenizer(model_path if _has_tokenizer(model_path) else base_path)
    else:
        model = load_causal_lm(model_path, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = load_tokenizer(model_path)
    model.to(device).eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def _is_conversational(prompt) -> bool:
    return isinstance(prompt, list)


def tokenize_prompts(tokenizer, prompts: Sequence, chat_template_kwargs: dict | None = None,
                     max_prompt_length: int | None = None) -> list[list[int]]:
    """Prompt token ids as the OPD trainer builds them (chat template for messages, plain tokenization else);
    ``max_prompt_length`` keeps the end of longer prompts."""
    out = []
    for prompt in prompts:
        if _is_conversational(prompt):
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("Conversational prompts need a tokenizer with a chat template; this tokenizer has "
                                 "none. Use plain-string prompts (python -m opsd.data --no-conversational).")
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                **(chat_template_kwargs or {}))["input_ids"]
        else:
            ids = tokenizer(text=prompt)["input_ids"]
        ids = list(ids)
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]
        out.append(ids)
    return out


def eos_token_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _generate_hf(model, tokenizer, prompt_ids: list[list[int]], k: int, temperature: float, top_p: float,
                 top_k: int, max_new_tokens: int, batch_size: int, seed: int, progress: bool,
                 desc: str) -> list[list[tuple[list[int], bool]]]:
    """k (completion ids, truncated) per prompt with transformers ``generate``."""
    import torch
    from transformers import GenerationConfig

    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    greedy = temperature is None or temperature <= 0
    gen_config = GenerationConfig(
        do_sample=not greedy, max_new_tokens=max_new_tokens, eos_token_id=eos or None, pad_token_id=pad,
        num_return_sequences=1, repetition_penalty=1.0,
        **({} if greedy else {"temperature": float(temperature), "top_p": float(top_p), "top_k": int(top_k)}),
    )
    rows = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(k)]
    results: list[list[tuple[list[int], bool]]] = [[] for _ in prompt_ids]
    device = next(model.parameters()).device
    batches = [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
    try:
        from tqdm.auto import tqdm
        iterator = tqdm(batches, desc=desc, unit="batch", disable=not progress)
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        iterator = batches
    eos_set = set(eos)
    for b, batch in enumerate(iterator):
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (_, ids) in enumerate(batch):
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[r, width - len(ids):] = 1
        torch.manual_seed(seed * 1_000_003 + b)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 generation_config=gen_config)
        completions = out[:, width:].tolist()
        for (i, _), ids in zip(batch, completions):
            end = next((t for t, tok in enumerate(ids) if tok in eos_set), None)
            if end is None:
                results[i].append((ids, True))
            else:
                results[i].append((ids[: end + 1], False))
    return results


def _generate_vllm(llm, prompt_ids: list[list[int]], k: int, temperature: float, top_p: float, top_k: int,
                   max_new_tokens: int, seed: int, lora_request=None) -> list[list[tuple[list[int], bool]]]:
    """k (completion ids, truncated) per prompt with vLLM (``SamplingParams(n=k)``); untested here (no vLLM)."""
    from vllm import SamplingParams

    params = SamplingParams(n=k, temperature=max(float(temperature or 0.0), 0.0), top_p=float(top_p),
                            top_k=int(top_k) if top_k and top_k > 0 else -1, max_tokens=max_new_tokens, seed=seed)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, lora_request=lora_request)
    return [[(list(o.token_ids), o.finish_reason == "length") for o in out.outputs] for out in outputs]


def _is_vllm(model) -> bool:
    return type(model).__module__.split(".")[0] == "vllm"


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def collapse_signals(model, tokenizer, prompt_ids: list[list[int]], samples, max_new_tokens: int,
                     teacher_ids: list[list[int]] | None = None, batch_size: int = 8) -> dict[str, float]:
    """opsd.collapse's signals of sampled completions: ``eot_rate``, ``clipped_ratio``, ``distinct_1..3`` and, with
    ``teacher_ids`` (HF models only), ``teacher_nll`` (the model's mean NLL of the teacher's text, nats/token)."""
    from .collapse import completion_metrics, stop_token_ids, teacher_text_nll

    vllm = _is_vllm(model)
    stop = stop_token_ids(tokenizer, [] if vllm else eos_token_ids(model, tokenizer))
    completions = [ids for outs in samples for ids, _ in outs]
    out = completion_metrics(completions, stop, max_new_tokens)
    if teacher_ids is not None and not vllm:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        nll = teacher_text_nll(model, prompt_ids, teacher_ids, batch_size, pad)
        if nll is not None:
            out["teacher_nll"] = nll
    return out


def evaluate(model, tokenizer, dataset, k: int = 16, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 1024, batch_size: int = 8, seed: int = 0,
             reward_fn: Callable[[str, str], float] | None = None, *, top_k: int = 0,
             chat_template_kwargs: dict | None = None, max_prompt_length: int | None = None,
             max_completion_chars: int | None = None, progress: bool = True, desc: str = "eval",
             lora_request=None, filter_overlong_prompts: bool = False,
             teacher_ids: list[list[int]] | None = None) -> dict:
    """Sample ``k`` completions per problem of ``dataset`` (``prompt``, ``answer``, optional ``id``), score them
    with ``reward_fn(completion_text, answer)`` (default: opsd.reward.math_reward) and return
    ``{"metrics": {...}, "records": [...]}`` (see the module docstring). ``model`` is a transformers causal LM, or a
    ``vllm.LLM`` (then ``batch_size`` is unused and ``lora_request`` may name an adapter).
    ``max_completion_chars`` cuts the stored completion texts (None: full text, 0: no texts stored).
    ``filter_overlong_prompts`` drops the problems whose prompt is longer than ``max_prompt_length`` (upstream's
    verl ``filter_overlong_prompts``) instead of keeping their last tokens; ``metrics["filtered_prompts"]`` counts
    them. ``teacher_ids``: one teacher completion per problem (token ids, opsd.collapse.load_or_make_teacher_text);
    when given (HF backend), ``teacher_nll`` is the model's mean NLL of that text."""
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 token (MAX_PROMPT_LENGTH), got {max_prompt_length}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 token (MAX_RESPONSE_LENGTH), got {max_new_tokens}.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if len(dataset) == 0:
        raise ValueError("The evaluation dataset is empty.")
    if reward_fn is None:
        from .reward import math_reward

        reward_fn = math_reward
    prompts = list(dataset["prompt"])
    answers = list(dataset["answer"]) if "answer" in dataset.column_names else [None] * len(prompts)
    ids = list(dataset["id"]) if "id" in dataset.column_names else [str(i) for i in range(len(prompts))]
    prompt_ids = tokenize_prompts(tokenizer, prompts, chat_template_kwargs,
                                  None if filter_overlong_prompts else max_prompt_length)
    filtered = 0
    if filter_overlong_prompts and max_prompt_length is not None:
        keep = [i for i, p in enumerate(prompt_ids) if len(p) <= max_prompt_length]
        filtered = len(prompts) - len(keep)
        if not keep:
            raise ValueError(f"every prompt of {desc} is longer than max_prompt_length ({max_prompt_length} tokens, "
                             "MAX_PROMPT_LENGTH) and was filtered out; raise it.")
        prompts, answers, ids, prompt_ids = ([seq[i] for i in keep] for seq in (prompts, answers, ids, prompt_ids))
        if teacher_ids is not None:  # one teacher text per problem: keep them aligned with the problems kept
            teacher_ids = [teacher_ids[i] for i in keep]

    start = time.time()
    if _is_vllm(model):
        samples = _generate_vllm(model, prompt_ids, k, temperature, top_p, top_k, max_new_tokens, seed, lora_request)
    else:
        samples = _generate_hf(model, tokenizer, prompt_ids, k, temperature, top_p, top_k, max_new_tokens,
                               batch_size, seed, progress, desc)
    generation_s = time.time() - start

    records = []
    for i, (prompt, answer, pid, outs) in enumerate(zip(prompts, answers, ids, samples)):
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c, _ in outs]
        rewards = [float(reward_fn(t, answer)) for t in texts]
        if max_completion_chars is not None:
            texts = [t[:max_completion_chars] for t in texts] if max_completion_chars > 0 else []
        records.append({
            "index": i, "id": pid, "prompt": prompt, "answer": answer, "completions": texts, "rewards": rewards,
            "correct": sum(r > CORRECT_THRESHOLD for r in rewards), "mean_reward": sum(rewards) / len(rewards),
            "lengths": [len(c) for c, _ in outs], "truncated": [bool(t) for _, t in outs],
        })
    metrics = summarize_records(records, k)
    metrics["filtered_prompts"] = filtered
    metrics.update(collapse_signals(model, tokenizer, prompt_ids, samples, max_new_tokens, teacher_ids, batch_size))
    metrics["generation_seconds"] = generation_s
    metrics["scoring_seconds"] = time.time() - start - generation_s
    return {"metrics": metrics, "records": records}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opsd.evaluate",
        description="Sample k completions per problem from a local model (or LoRA adapter) and report mean@k, "
        "pass@k, completion length and truncation per benchmark file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="Local model directory, or a LoRA adapter directory "
                   "(adapter_config.json): its base is --base_model or the adapter's base_model_name_or_path.")
    p.add_argument("--base_model", default=None, help="Local base model directory of a LoRA adapter.")
    p.add_argument("--data", nargs="+", required=True, metavar="[NAME=]FILE",
                   help="Benchmark prompt files with prompt + answer columns (python -m opsd.data output). The "
                   "benchmark name is the file stem unless given as NAME=FILE.")
    p.add_argument("--k", type=int, default=16, help="Samples per problem.")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (0 = greedy).")
    p.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling threshold (1.0 = off).")
    p.add_argument("--top_k", type=int, default=0, help="Top-k sampling (0 = off; overrides the model's "
                   "generation_config either way).")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="Completion token limit; completions without "
                   "an EOS by then count as truncated.")
    p.add_argument("--max_prompt_length", type=int, default=None, help="Keep only the last N prompt tokens.")
    p.add_argument("--batch_size", type=int, default=8, help="Sequences per generate call (HF backend).")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    p.add_argument("--reward", default="math", help="Reward function name (opsd.reward.REWARD_FUNCTIONS).")
    p.add_argument("--filter_overlong_prompts", action="store_true",
                   help="Drop problems whose prompt is longer than --max_prompt_length (upstream's eval) instead of "
                   "keeping their last tokens; the count is reported as filtered_prompts.")
    p.add_argument("--enable_thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="Pass enable_thinking=True/False to the chat template (Qwen3-style); unset: not passed.")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="Generation backend.")
    p.add_argument("--output_dir", default=None, help="Where eval_*.json go (default: MODEL/eval).")
    p.add_argument("--limit", type=int, default=None, help="Evaluate only the first N problems of each file.")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | auto (default: bfloat16 on "
                   "CUDA, float32 on CPU).")
    p.add_argument("--device", default=None, help="torch device for the HF backend (default: cuda if available).")
    p.add_argument("--attn_implementation", default=None, help="Attention implementation (HF backend; default: "
                   "flash_attention_2 when installed on CUDA, else sdpa).")
    p.add_argument("--max_completion_chars", type=int, default=None,
                   help="Store at most this many characters of each completion in eval_*.json (0: none; "
                   "default: full text).")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vLLM only.")
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="vLLM only.")
    p.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    p.add_argument("--teacher", default=None, help="Local teacher model directory (same tokenizer as the model): "
                   "its greedy completions of each benchmark's prompts (cached in OUTPUT_DIR/teacher_text_NAME.json) "
                   "are scored by the model as teacher_nll, the collapse signal of docs/METHODS.md (HF backend).")
    return p


def _default_dtype(dtype: str | None) -> str:
    if dtype:
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def _load_vllm(args, dtype: str):
    """(vllm.LLM, tokenizer, lora_request) for the vLLM backend; a clear error when vLLM is missing."""
    try:
        import vllm
    except ImportError as err:
        raise BackendUnavailable("--backend vllm needs the vllm package, which is not installed in this environment; "
                           "install it (pip install vllm) or use --backend hf.") from err
    from .core.models import check_local_path, load_tokenizer

    lora_request, path = None, args.model
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Model not found at {path!r}: pass a local model or LoRA adapter directory.")
    if _is_adapter(path):
        from vllm.lora.request import LoRARequest

        with open(os.path.join(path, "adapter_config.json")) as f:
            rank = int(json.load(f).get("r", 16))
        base = check_local_path(_adapter_base(path, args.base_model), "Base model of the adapter")
        llm = vllm.LLM(model=base, dtype=dtype, seed=args.seed, enable_lora=True, max_lora_rank=max(rank, 8),
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       tensor_parallel_size=args.tensor_parallel_size)
        lora_request = LoRARequest("adapter", 1, os.path.abspath(path))
        tokenizer = load_tokenizer(path if _has_tokenizer(path) else base)
    else:
        check_local_path(path, "Model")
        llm = vllm.LLM(model=path, dtype=dtype, seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
                       tensor_parallel_size=args.tensor_parallel_size)
        tokenizer = load_tokenizer(path)
    return llm, tokenizer, lora_request


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict:
    from .reward import get_reward_fn

    benchmarks = parse_data_specs(args.data)
    if args.teacher is not None and not os.path.isdir(args.teacher):
        raise FileNotFoundError(f"--teacher {args.teacher!r} is not a local model directory.")
    if args.teacher is not None and args.backend != "hf":
        raise ValueError("--teacher (teacher-text NLL) needs --backend hf.")
    reward_fn = get_reward_fn(args.reward)
    dtype = _default_dtype(args.dtype)
    output_dir = args.output_dir or os.path.join(args.model, "eval")
    lora_request = None
    if args.backend == "vllm":
        model, tokenizer, lora_request = _load_vllm(args, dtype)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, args.base_model, dtype=dtype, device=args.device,
                                                    attn_implementation=args.attn_implementation)
    chat_kwargs = {} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking}
    settings = {
        "model": args.model, "base_model": args.base_model, "adapter": _is_adapter(args.model), "k": args.k,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens, "max_prompt_length": args.max_prompt_length,
        "filter_overlong_prompts": args.filter_overlong_prompts,
        "batch_size": args.batch_size, "seed": args.seed, "reward": args.reward,
        "enable_thinking": args.enable_thinking, "backend": args.backend, "dtype": dtype, "limit": args.limit,
        "data": {name: path for name, path in benchmarks},
    }
    os.makedirs(output_dir, exist_ok=True)
    teacher = None
    if args.teacher is not None:
        teacher, teacher_tokenizer = load_model_and_tokenizer(args.teacher, dtype=dtype, device=args.device,
                                                              attn_implementation=args.attn_implementation)
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"--teacher {args.teacher}: its tokenizer differs from the model's; teacher-text NLL "
                             "needs a shared tokenizer.")
        settings["teacher"] = args.teacher
    results = {}
    for name, path in benchmarks:
        dataset = load_benchmark(path, args.limit)
        teacher_ids = None
        if teacher is not None:
            from .collapse import load_or_make_teacher_text

            prompt_ids = tokenize_prompts(tokenizer, list(dataset["prompt"]), chat_kwargs, args.max_prompt_length)
            teacher_ids = load_or_make_teacher_text(os.path.join(output_dir, f"teacher_text_{name}.json"), teacher,
                                                    tokenizer, prompt_ids, args.max_new_tokens, args.batch_size)
        out = evaluate(model, tokenizer, dataset, k=args.k, temperature=args.temperature, top_p=args.top_p,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                       reward_fn=reward_fn, top_k=args.top_k, chat_template_kwargs=chat_kwargs,
                       max_prompt_length=args.max_prompt_length, max_completion_chars=args.max_completion_chars,
                       progress=not args.no_progress, desc=name, lora_request=lora_request,
                       filter_overlong_prompts=args.filter_overlong_prompts, teacher_ids=teacher_ids)
        _write_json(os.path.join(output_dir, f"eval_{name}.json"),
                    {"benchmark": name, "data_file": path, "settings": settings, "metrics": out["metrics"],
                     "records": out["records"]})
        results[name] = out["metrics"]
    table = format_table(results)
    summary = {"settings": settings, "benchmarks": results, "table_markdown": table}
    _write_json(os.path.join(output_dir, "eval_summary.json"), summary)
    print(table)
    print(f"[opsd.evaluate] wrote {output_dir}/eval_summary.json and eval_{{benchmark}}.json")
    return summary


def check_args(args: argparse.Namespace) -> None:
    """The user errors checkable before a model loads (ValueError naming the flag and the run-script variable)."""
    if args.max_prompt_length is not None and args.max_prompt_length < 1:
        raise ValueError(f"--max_prompt_length (MAX_PROMPT_LENGTH) must be >= 1 token, got {args.max_prompt_length}.")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens (MAX_RESPONSE_LENGTH / MAX_NEW_TOKENS) must be >= 1 token, got "
                         f"{args.max_new_tokens}.")
    if args.k < 1:
        raise ValueError(f"--k (VAL_N / K) must be >= 1, got {args.k}.")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top_p (VAL_TOP_P) must be in (0, 1], got {args.top_p}.")
    if args.temperature < 0:
        raise ValueError(f"--temperature (VAL_TEMPERATURE) must be >= 0 (0 = greedy), got {args.temperature}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size (BATCH_SIZE) must be >= 1, got {args.batch_size}.")
    if args.filter_overlong_prompts and args.max_prompt_length is None:
        raise ValueError("--filter_overlong_prompts needs --max_prompt_length (MAX_PROMPT_LENGTH).")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        run(args)
    except (FileNotFoundError, ValueError, BackendUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
