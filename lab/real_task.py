"""The real-model lab task: SmolLM2-135M-Instruct as the student, the same model plus a small SFT adapter as teacher.

Pair. The student is the instruct model as is (lab.real_assets.materialize_smollm2). The teacher is the same model
with a LoRA adapter trained once by plain SFT on reasoning-gym `chain_sum` problems (two terms of one or two digits,
+ and -), answered in one short fixed format that ends in `\\boxed{N}` and `<|im_end|>`: the teacher knows the
format and the sums, the student shares its base weights and way of writing but knows neither. The adapter ships in
`lab/pretrained/real-<name>/` (a few MB, float16); `real_pair()` merges it into a full local checkpoint under the
cache at first use. `python -m lab.real_lab --retrain` (or `demo.sh --real --retrain`) trains it again (cached under
.cache/real/adapters).

Prompts go through the model's chat template (ChatML with its default system prompt); the scorer is the project's
reward (`opsd.reward.math_reward`, which reads `\\boxed{}`). Training prompts and held-out prompts come from
different reasoning-gym seeds; held-out questions that occur among the first 4000 training questions are dropped.

Measurements (held-out, greedy unless said): `reward` (math_reward), `boxed` (share with a `\\boxed{}`), `eot`
(share that ended their turn with `<|im_end|>` within the budget; opsd.collapse's end-of-turn rate, with its clipped
ratio and distinct-2), `kl` (mean per-token reverse KL(student || teacher)
on the student's own greedy completions, end-of-turn token included), `teacher_nll` (mean per-token NLL under the
student of the teacher's greedy completions: how far the student has drifted from the teacher's text).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRETRAINED = Path(__file__).resolve().parent / "pretrained"
DATASET = "chain_sum"
DATASET_CONFIG = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
TRAIN_SEED, EVAL_SEED = 11, 23
INSTRUCTION = "{question}\nWrite the calculation, then the final answer in the form \\boxed{{ANSWER}}."
END_OF_TURN = "<|im_end|>"


def teacher_answer(expression: str, answer: str) -> str:
    """The fixed answer format the adapter is trained on (the text before `<|im_end|>`)."""
    return f"{expression} = {answer}, so the answer is \\boxed{{{answer}}}."


@dataclass(frozen=True)
class AdapterSpec:
    """How the teacher's adapter is trained (everything that shapes it; its hash names the cache entry)."""

    name: str
    rank: int = 8
    alpha: int = 16
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    steps: int = 120
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    n_train: int = 1000
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "dataset": DATASET, "config": DATASET_CONFIG, "train_seed": TRAIN_SEED,
                           "instruction": INSTRUCTION, "format": teacher_answer("E", "A")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


ADAPTERS = {
    "r8-all": AdapterSpec("r8-all"),
    "r4-attn": AdapterSpec("r4-attn", rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "r8-attn": AdapterSpec("r8-attn", rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
}
DEFAULT_ADAPTER = "r8-all"


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------

def _cache_root(cache_dir=None) -> Path:
    from .real_assets import DEFAULT_CACHE

    return Path(cache_dir or DEFAULT_CACHE)


def task_rows(split: str, n: int) -> list[dict]:
    """n problems of the split as rows in opsd.data's layout (`prompt` messages, `answer`, `source`, `id`) plus
    `expression`. Held-out rows never repeat a training question (the first 4000 training questions are excluded)."""
    from .real_assets import reasoning_gym_rows

    if split == "train":
        raw = reasoning_gym_rows(DATASET, n, TRAIN_SEED, **DATASET_CONFIG)
    elif split == "eval":
        seen = {r["question"] for r in reasoning_gym_rows(DATASET, 4000, TRAIN_SEED, **DATASET_CONFIG)}
        raw, size = [], 4 * n
        while len(raw) < n:
            raw = [r for r in reasoning_gym_rows(DATASET, size, EVAL_SEED, **DATASET_CONFIG) if r["question"] not in seen]
            size *= 2
        raw = raw[:n]
    else:
        raise ValueError(f"split must be train or eval, got {split!r}")
    return [{"prompt": [{"role": "user", "content": INSTRUCTION.format(question=r["question"])}],
             "answer": r["answer"], "source": f"{DATASET}-{split}", "id": f"{DATASET}-{split}-{i}",
             "expression": r["entry"]["metadata"]["expression"]} for i, r in enumerate(raw)]


def prompt_ids(tokenizer, rows) -> list[list[int]]:
    """Chat-template token ids of each row's prompt, generation prompt included."""
    out = []
    for r in rows:
        ids = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


def sft_example(tokenizer, row) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one SFT example: the prompt (labels -100) and the teacher's answer + `<|im_end|>`."""
    p = prompt_ids(tokenizer, [row])[0]
    answer = tokenizer(teacher_answer(row["expression"], row["answer"]), add_special_tokens=False)["input_ids"]
    completion = list(answer) + [tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    return p + completion, [-100] * len(p) + completion


# ------------------------------------------------------------------------------------------------------------------
# the adapter and the pair
# ------------------------------------------------------------------------------------------------------------------

def shipped_adapter_dir(name: str = DEFAULT_ADAPTER) -> Path:
    return PRETRAINED / f"real-{name}"


def train_adapter(spec: AdapterSpec, out_dir, base_dir=None, progress=None) -> dict:
    """Plain SFT of a LoRA adapter on the base model (one torch loop, AdamW, linear warmup then constant);
    writes the adapter (float16 safetensors + adapter_config.json) and `train.json` to out_dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real_assets import materialize_smollm2

    base_dir = base_dir or materialize_smollm2(quiet=True)
    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    rows = task_rows("train", spec.n_train)
    examples = [sft_example(tokenizer, r) for r in rows]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(examples), generator=gen).tolist()
    pad = tokenizer.pad_token_id
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = spec.learning_rate * min(1.0, (step + 1) / max(spec.warmup_steps, 1))
        idx = [order[(step * spec.batch_size + j) % len(order)] for j in range(spec.batch_size)]
        batch = [examples[i] for i in idx]
        width = max(len(x) for x, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, (x, y) in enumerate(batch):  # right padding: positions are plain 0..len-1
            ids[b, : len(x)] = torch.tensor(x)
            labels[b, : len(y)] = torch.tensor(y)
            mask[b, : len(x)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress and (step % 10 == 0 or step == spec.steps - 1):
            progress(f"[real_task] SFT {spec.name} step {step + 1}/{spec.steps} loss {loss.item():.3f} "
                     f"({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = model.to(torch.float16)  # half the bytes on disk; merged in float32 at load time
    model.save_pretrained(tmp)
    (tmp / "README.md").unlink(missing_ok=True)  # peft's model-card template
    info = {"spec": asdict(spec), "key": spec.key(), "dataset": DATASET, "dataset_config": DATASET_CONFIG,
            "train_seed": TRAIN_SEED, "instruction": INSTRUCTION, "sft_seconds": round(seconds, 1),
            "threads": torch.get_num_threads(), "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:])}
    (tmp / "train.json").write_text(json.dumps(info, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return info


def adapter_dir(name: str = DEFAULT_ADAPTER, cache_dir=None, retrain: bool = False, progress=None) -> Path:
    """The adapter to use: the shipped one (lab/pretrained/real-<name>) unless `retrain`, which trains it into
    `<cache>/adapters/<name>-<key>` (reused when already there)."""
    spec = ADAPTERS[name]
    shipped = shipped_adapter_dir(name)
    if not retrain and (shipped / "adapter_config.json").is_file():
        return shipped
    target = _cache_root(cache_dir) / "adapters" / f"{name}-{spec.key()}"
    if not (target / "adapter_config.json").is_file():
        if progress:
            progress(f"[real_task] training the teacher adapter {name} (SFT, {spec.steps} steps; several minutes)")
        train_adapter(spec, target, progress=progress)
    return target


def merge_teacher(adapter: Path, target: Path, base_dir) -> Path:
    """Base + adapter merged into an ordinary float32 checkpoint at `target` (written atomically)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged = merged.to(torch.float32).eval()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({"base": str(base_dir), "adapter": str(adapter)}, indent=1))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def real_pair(cache_dir=None, adapter: str = DEFAULT_ADAPTER, retrain: bool = False, progress=None) -> tuple[Path, Path]:
    """(student_dir, teacher_dir): the instruct model, and the same model with the teacher adapter merged in.

    Both are plain local checkpoints (`from_pretrained(dir)`); the merged teacher is cached under
    `<cache>/teacher-<adapter>-<hash of the adapter weights>` (cache: OPSD_REAL_CACHE or .cache/real)."""
    from .real_assets import materialize_smollm2

    student = materialize_smollm2(cache_dir, quiet=progress is None)
    src = adapter_dir(adapter, cache_dir, retrain, progress)
    target = _cache_root(cache_dir) / f"teacher-{adapter}-{_file_hash(src / 'adapter_model.safetensors')}"
    if not (target / "config.json").is_file():
        if progress:
            progress(f"[real_task] merging {src} into {target}")
        merge_teacher(src, target, student)
    return student, target


# ------------------------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------------------------

def end_of_turn_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(END_OF_TURN)


def generate(model, tokenizer, rows, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             batch_size: int = 32) -> list[tuple[list[int], bool]]:
    """One completion per row (greedy when temperature is 0): (token ids, cut at and including `<|im_end|>`;
    ended) where `ended` says the model ended its turn within the budget."""
    from opsd.evaluate import _generate_hf

    out = _generate_hf(model, tokenizer, prompt_ids(tokenizer, rows), 1, temperature, 1.0, 0, max_new_tokens,
                       batch_size, seed, False, "generate")
    return [(ids, not truncated) for ((ids, truncated),) in out]


def _score_batches(tokenizer, prompts: list[list[int]], completions: list[list[int]], batch_size: int):
    """Right-padded batches of prompt + completion: (ids, attention mask, [(row, first, last)] completion spans,
    where logits at positions first-1 .. last-1 predict the completion tokens)."""
    import torch

    pad = tokenizer.pad_token_id
    for s in range(0, len(prompts), batch_size):
        chunk = list(zip(prompts[s:s + batch_size], completions[s:s + batch_size]))
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        spans = []
        for r, (p, c) in enumerate(chunk):
            ids[r, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            mask[r, : len(p) + len(c)] = 1
            spans.append((len(p), len(p) + len(c)))
        yield s, ids, mask, spans


def token_logprobs(model, tokenizer, prompts, completions, batch_size: int = 8) -> list:
    """Per row, the [len(completion), V] float32 log-probabilities the model gives each completion position."""
    import torch

    out = []
    with torch.no_grad():
        for _, ids, mask, spans in _score_batches(tokenizer, prompts, completions, batch_size):
            logits = model(input_ids=ids, attention_mask=mask).logits
            for r, (a, b) in enumerate(spans):
                out.append(torch.log_softmax(logits[r, a - 1: b - 1].float(), dim=-1))
    return out


def reverse_kl_per_row(student, teacher, tokenizer, prompts, completions, batch_size: int = 8) -> list[list[float]]:
    """Per row, the per-token KL(P_S || P_T) at each completion position (full vocabulary, temperature 1)."""
    import torch

    out = []
    with torch.no_grad():
        for _, ids, mask, spans in _score_batches(tokenizer, prompts, completions, batch_size):
            ls = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            lt = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for r, (a, b) in enumerate(spans):
                s, t = ls[r, a - 1: b - 1], lt[r, a - 1: b - 1]
                out.append((s.exp() * (s - t)).sum(-1).tolist())
    return out


def nll_per_row(model, tokenizer, prompts, completions, batch_size: int = 8) -> list[list[float]]:
    """Per row, the model's per-token negative log-likelihood of the completion tokens."""
    import torch

    out = []
    with torch.no_grad():
        for _, ids, mask, spans in _score_batches(tokenizer, prompts, completions, batch_size):
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for r, (a, b) in enumerate(spans):
                target = ids[r, a:b]
                out.append((-logp[r, a - 1: b - 1].gather(-1, target[:, None])[:, 0]).tolist())
    return out


def teacher_texts(teacher, tokenizer, rows, max_new_tokens: int) -> list[list[int]]:
    """The teacher's greedy completions of the rows (the reference text whose NLL under the student is measured)."""
    return [ids for ids, _ in generate(teacher, tokenizer, rows, max_new_tokens)]


def _token_mean(per_row: list[list[float]]) -> float:
    n = sum(len(r) for r in per_row)
    return sum(sum(r) for r in per_row) / n if n else float("nan")


def evaluate_model(model, teacher, tokenizer, rows, max_new_tokens: int, reference: list[list[int]] | None = None,
                   temperature: float = 0.0, seed: int = 0, keep_ids: bool = False) -> dict:
    """Held-out measurements of `model` (see the module docstring): means plus per-prompt `per_prompt` lists
    (`reward`, `kl`, `teacher_nll`) for paired comparisons. `reference`: the teacher's completions for
    `teacher_nll` (None: not measured). KL needs `teacher` (None: not measured). `keep_ids`: also return the
    completions' token ids (`ids`)."""
    from opsd.collapse import completion_metrics, stop_token_ids
    from opsd.reward import math_reward

    was = model.training
    model.eval()
    gens = generate(model, tokenizer, rows, max_new_tokens, temperature, seed)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in gens]
    rewards = [math_reward(t, r["answer"]) for t, r in zip(texts, rows)]
    prompts = prompt_ids(tokenizer, rows)
    signals = completion_metrics([ids for ids, _ in gens], stop_token_ids(tokenizer), max_new_tokens)
    out = {"n": len(rows), "reward": sum(rewards) / len(rows),
           "boxed": sum("\\boxed{" in t for t in texts) / len(rows),
           "eot": signals["eot_rate"], "clipped_ratio": signals["clipped_ratio"],
           "distinct_2": signals.get("distinct_2"),
           "mean_length": sum(len(ids) for ids, _ in gens) / len(rows),
           "samples": texts[:4], "per_prompt": {"reward": rewards}}
    if teacher is not None:
        kl = reverse_kl_per_row(model, teacher, tokenizer, prompts, [ids for ids, _ in gens])
        out["kl"] = _token_mean(kl)
        out["per_prompt"]["kl"] = [sum(r) / len(r) if r else 0.0 for r in kl]
    if reference is not None:
        nll = nll_per_row(model, tokenizer, prompts, reference)
        out["teacher_nll"] = _token_mean(nll)
        out["per_prompt"]["teacher_nll"] = [sum(r) / len(r) if r else 0.0 for r in nll]
    if keep_ids:
        out["ids"] = [ids for ids, _ in gens]
    model.train(was)
    return out

