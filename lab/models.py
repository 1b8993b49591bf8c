"""Teacher and student models of the CPU distillation lab: tiny Qwen2 models trained on a registered task.

`prepare_lab_models` trains a teacher (bigger; on addition it sees injected errors and ``"<"`` repairs) and
warm-starts a student (smaller, deliberately under-trained) once, checks both against their calibration targets
(a miss is a `CalibrationError` with the numbers, and nothing is cached), saves each with ``save_pretrained``
(model, tokenizer, generation config) under its own cache key (retuning the student never retrains the teacher),
and returns their paths and measured accuracies. Later calls with the same configuration load nothing and train
nothing: they return the cached paths and metrics. Every task's sizes and steps come from its registration
(`lab.tasks.register_task(..., lab_settings=...)`, read by `default_lab_config`); no function defaults to a task.

Everything is plain PyTorch + transformers; the training loop is the usual teacher-forced next-token loss on
completion tokens only (prompt, pad and injected-wrong tokens carry no loss).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import addition as T
from .tasks import REGISTRY, AdditionTask, Task, task_entry

# Bump when the task format, vocabulary or training recipe changes in a way that invalidates cached models.
LAB_FORMAT_VERSION = 2


@dataclass
class ModelSize:
    """A tiny Qwen2 shape. ``intermediate_size`` 0 means 4 x hidden."""

    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 0


@dataclass
class LabConfig:
    """Everything that decides the cached teacher and student (its hash is the cache key).

    Defaults are sized for 2 CPU cores: on free cores teacher training takes about 80 s and the student warm
    start about 20-30 s (measured 98 s for the whole of `prepare_lab_models`); on cores shared with other busy
    processes expect 2-4x that. The teacher has 8 heads because detecting a wrong copied answer digit needs
    extra lookups: with 4 heads its recovery rate (below) stalled at 0.78-0.95 depending on the seed, with 8 it
    reaches 0.93-0.99 in 800 steps at the same parameter count.
    teacher_steps: optimizer steps of batch ``batch_size`` for the teacher.
    student_steps: the most steps of the student's warm start; it stops earlier, as soon as its greedy exact
        match on ``n_dev`` dev prompts (train split) reaches ``student_target_em`` (checked every
        ``student_check_every`` steps from ``student_min_steps`` on), so the student starts clearly below the
        teacher (distillation needs something to teach). ``student_target_em=None``: always ``student_steps``.
    n_eval: held-out prompts (eval split) for the reported exact match and recovery rate.
    n_train_prompts: prompts (train split) written to ``train_prompts.jsonl`` for the distillation runs.
    num_threads: the most intra-op threads training uses; with 2, `_ThreadTuner` switches between 1 and 2 by
        measured step time. Not part of the cache key; note that the thread count changes float reductions,
        so two trainings of one configuration on differently loaded machines can differ slightly.
    """

    task: object = None  # the task's config dataclass (its registered config_class; None: its defaults)
    task_name: str = ""  # a registered task (lab.tasks.register_task); required
    teacher: ModelSize = field(default_factory=lambda: ModelSize(2, 128, 8, 256))
    student: ModelSize = field(default_factory=lambda: ModelSize(2, 64, 4, 256))
    teacher_steps: int = 800
    student_steps: int = 800
    student_target_em: float | None = 0.3
    student_check_every: int = 10
    student_min_steps: int = 200
    n_dev: int = 128
    batch_size: int = 128
    teacher_lr: float = 3e-3
    student_lr: float = 3e-3
    seed: int = 0
    n_eval: int = 500
    n_train_prompts: int = 4096
    num_threads: int = 2
    # Calibration checks (not part of the cache key: they decide whether a trained model is accepted, not what is
    # trained). None disables a check.
    teacher_min_em: float | None = 0.9
    student_em_tolerance: float | None = 0.1

    def __post_init__(self):
        if not self.task_name:
            raise ValueError("LabConfig needs task_name (a registered task, e.g. default_lab_config('addition'))")
        cls = task_entry(self.task_name).cls
        if self.task is None:
            self.task = cls.config_class()
        elif isinstance(self.task, dict):
            self.task = cls.config_class(**self.task)
        elif not isinstance(self.task, cls.config_class):
            raise ValueError(f"LabConfig.task is a {type(self.task).__name__}, task {self.task_name!r} needs a "
                             f"{cls.config_class.__name__}")

    @classmethod
    def from_dict(cls, d: dict) -> "LabConfig":
        """Inverse of `to_dict`; also accepts a cached lab's ``config.json`` (its ``version`` key is ignored)."""
        d = dict(d)
        d.pop("version", None)
        if not d.get("task_name"):
            raise ValueError("lab config has no task_name (a registered task)")
        task_cls = task_entry(d["task_name"]).cls
        if not isinstance(d.get("task"), task_cls.config_class):
            d["task"] = task_cls.config_class(**(d.get("task") or {}))
        d["teacher"] = ModelSize(**d.get("teacher", {}))
        d["student"] = ModelSize(**d.get("student", {}))
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def make_task(self) -> Task:
        return task_entry(self.task_name).cls(self.task)

    def _keyed(self) -> dict:
        d = self.to_dict()
        for name in NOT_KEYED:
            d.pop(name)
        return d

    def cache_key(self) -> str:
        """Hash of everything that shapes the models and prompt files (not ``num_threads``, which only changes
        speed, nor the calibration checks): the key of the lab directory."""
        payload = json.dumps({"version": LAB_FORMAT_VERSION, **self._keyed()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def role_key(self, role: str) -> str:
        """Hash of what shapes one model (``role`` "teacher" or "student"): the task settings, that model's size,
        steps, learning rate and (student) warm-start target, the batch size, seed and evaluation prompt count.
        Retuning the student leaves the teacher's key unchanged, and vice versa."""
        d = self._keyed()
        other = "student" if role == "teacher" else "teacher"
        for name in [other, f"{other}_steps", f"{other}_lr", "n_train_prompts"]:
            d.pop(name)
        if role == "teacher":
            for name in ("student_target_em", "student_check_every", "student_min_steps", "n_dev"):
                d.pop(name)
        payload = json.dumps({"version": LAB_FORMAT_VERSION, "role": role, **d}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


NOT_KEYED = ("num_threads", "teacher_min_em", "student_em_tolerance")


class CalibrationError(ValueError):
    """A trained teacher or warm-started student missed its calibration target (nothing was cached)."""


# ------------------------------------------------------------------------------------------------- models
def build_model(size: ModelSize, vocab_size: int | None = None, seed: int = 0, task: Task | None = None):
    """A freshly initialised tiny Qwen2ForCausalLM (untied lm_head: the trainer reads ``lm_head`` directly) for
    ``task``'s vocabulary, special ids and sequence length (required)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    task = _need_task(task, "build_model")

    if size.hidden_size % size.num_heads:
        raise ValueError(f"hidden_size {size.hidden_size} is not divisible by num_heads {size.num_heads}")
    config = Qwen2Config(
        vocab_size=vocab_size or len(task.vocab),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size or 4 * size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=task.max_positions,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=task.eos_id,
        pad_token_id=task.pad_id,
        use_cache=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=task.eos_id, pad_token_id=task.pad_id, do_sample=False
    )
    return model


def _need_task(task, where: str) -> Task:
    """The task argument, required: no function of the lab defaults to a task."""
    if task is None:
        raise ValueError(f"{where} needs task= (a lab.tasks.Task, e.g. lab.tasks.get_task('addition'))")
    from .tasks import get_task

    return get_task(task)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _batch(examples: Sequence[tuple[list[int], list[int], list[bool]]], pad_id: int = T.PAD_ID):
    """Left-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the trained completion tokens)."""
    seqs = [p + c for p, c, _ in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, c, train) in enumerate(examples):
        n = len(p) + len(c)
        start = width - n
        ids[i, start:] = torch.tensor(p + c)
        mask[i, start:] = 1
        lab = torch.tensor([x if keep else -100 for x, keep in zip(c, train)], dtype=torch.long)
        labels[i, start + len(p) :] = lab
    return ids, mask, labels



def _lr_at(step: int, steps: int, lr: float, schedule: str = "cosine") -> float:
    warm = max(1, min(steps // 20, 50))
    if step < warm:
        return lr * (step + 1) / warm
    if schedule == "constant":
        return lr
    frac = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class _ThreadTuner:
    """Picks the faster of 1 and ``max_threads`` intra-op threads, re-measured as the load changes.

    On shared cores a 2-thread step can be 3x slower than a 1-thread step (busy-waiting threads fighting other
    processes), while on free cores 2 threads are almost 2x faster. Every ``period`` steps, ``probe`` steps run
    at 1 thread, then ``probe`` at ``max_threads``, and the setting with the smaller median step time is used
    until the next probe; a multi-thread probe step slower than 1.5x the 1-thread median ends the probe at once.
    Every step trains normally: probing costs only the extra time of the slower setting.
    """

    def __init__(self, max_threads: int, period: int = 100, probe: int = 3):
        self.options = [1, max_threads] if max_threads > 1 else [max(1, max_threads)]
        self.period, self.probe = period, probe
        self.best = self.options[-1]
        self.times: dict[int, list[float]] = {}
        self.used: dict[int, int] = {}
        self.probing = False

    @staticmethod
    def _median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    def _decide(self) -> None:
        if self.times:
            self.best = min(self.times, key=lambda k: self._median(self.times[k]))
        self.times, self.probing = {}, False

    def threads_for(self, step: int) -> int:
        phase = step % self.period
        window = self.probe * len(self.options)
        if len(self.options) > 1 and phase == 1:  # phase 0 may carry one-off costs (first step, a dev check)
            self.times, self.probing = {}, True
        if self.probing and 1 <= phase <= window:
            n = self.options[(phase - 1) // self.probe]
        else:
            if self.probing:
                self._decide()
            n = self.best
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        self.used[n] = self.used.get(n, 0) + 1
        return n

    def record(self, n: int, seconds: float) -> None:
        if not self.probing:
            return
        self.times.setdefault(n, []).append(seconds)
        base = self.times.get(self.options[0])
        if n != self.options[0] and base and seconds > 1.5 * self._median(base):
            self._decide()


def train_lm(
    model,
    make_example: Callable[[random.Random], tuple[list[int], list[int], list[bool]]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    desc: str = "train",
    stop_check: Callable[[], float] | None = None,
    stop_at: float | None = None,
    check_every: int = 20,
    min_steps: int = 0,
    schedule: str = "cosine",
    max_threads: int | None = None,
    pad_id: int = T.PAD_ID,
) -> dict:
    """Teacher-forced next-token training on freshly sampled examples; returns loss and time metrics.

    The learning rate warms up linearly over the first 5% of ``steps`` (at most 50 steps), then follows a
    cosine to 10% of ``lr`` at ``steps`` (``schedule="cosine"``) or stays at ``lr`` (``"constant"``). Early stop: when ``stop_check`` and ``stop_at`` are given, ``stop_check()`` (a score such as
    a dev-set exact match; the model is put in eval mode for it) runs every ``check_every`` steps from
    ``min_steps`` on, and training stops as soon as it returns at least ``stop_at``; the model then keeps the
    weights of that check or of the check before, whichever scored closer to ``stop_at`` (the score can jump
    past the target between two checks). The returned ``steps`` is the step count of the kept weights;
    ``stopped_early``, ``last_check`` (the kept weights' score) and ``check_history`` tell how it ended.
    ``max_threads`` > 1 lets `_ThreadTuner` choose between 1 and ``max_threads`` threads as it goes
    (``threads_used`` counts steps per thread count); None keeps the current setting.
    """
    from tqdm.auto import tqdm

    rng = random.Random(f"train/{desc}/{seed}")
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    t0, c0 = time.perf_counter(), time.process_time()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0)
    taken, stopped, last_check, history, prev = 0, False, None, [], None
    prev_threads = torch.get_num_threads()
    tuner = _ThreadTuner(max_threads) if max_threads else None
    for step in bar:
        n_threads = tuner.threads_for(step) if tuner else 0
        t_step = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, schedule)
        ids, mask, labels = _batch([make_example(rng) for _ in range(batch_size)], pad_id)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask)).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if tuner:
            tuner.record(n_threads, time.perf_counter() - t_step)
        taken = step + 1
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.3f}")
        if stop_check is not None and stop_at is not None and taken >= min_steps and taken % check_every == 0:
            model.eval()
            score = float(stop_check())
            history.append([taken, score])
            model.train()
            bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.3f}", check=f"{score:.2f}")
            if score >= stop_at:
                stopped = True
                # the score can jump past the target between two checks: keep whichever of the two
                # checkpoints is closer to it
                if prev is not None and abs(prev[1] - stop_at) < abs(score - stop_at):
                    model.load_state_dict(prev[2])
                    taken, score = prev[0], prev[1]
                last_check = score
                break
            last_check = score
            prev = (taken, score, {k: v.detach().clone() for k, v in model.state_dict().items()})
    bar.close()
    torch.set_num_threads(prev_threads)
    model.eval()
    tail = losses[-max(1, taken // 10) :] if losses else [float("nan")]
    return {
        "steps": taken, "max_steps": steps, "final_loss": sum(tail) / len(tail),
        "train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - c0,
        "stopped_early": stopped, "last_check": last_check, "check_history": history,
        "threads_used": {str(k): v for k, v in (tuner.used if tuner else {prev_threads: taken}).items()},
    }


def _example_maker(task: Task, role: str):
    """Examples for ``role`` ("teacher" or "student") on freshly drawn train-split prompts."""
    example = task.teacher_example if role == "teacher" else task.student_example

    def make(rng: random.Random):
        prompt = task.sample_prompt(rng, "train")
        tokens, train = example(prompt, rng)
        return task.encode(prompt), task.token_ids(tokens), train

    return make


# ------------------------------------------------------------------------------------------------ evaluation
def _encode_prompts(tokenizer, prompts: Sequence[str]):
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt")
    if tokenizer.padding_side != "left":
        raise ValueError("the lab tokenizer must pad on the left for batched generation")
    return enc["input_ids"], enc["attention_mask"]


def _completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    is_eos = completion_ids == eos_id
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after).long()


@torch.no_grad()
def generate_completions(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, greedy: bool = True,
    batch_size: int = 256, temperature: float = 1.0, seed: int = 0,
) -> list[torch.Tensor]:
    """Completion token ids per prompt (cut after the first EOS; EOS kept when generated)."""
    model.eval()
    if not greedy:
        torch.manual_seed(seed)
    out: list[torch.Tensor] = []
    eos = tokenizer.eos_token_id
    for i in range(0, len(prompts), batch_size):
        ids, mask = _encode_prompts(tokenizer, prompts[i : i + batch_size])
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
            temperature=temperature if not greedy else None, top_k=None, top_p=None,
            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        )
        comp = gen[:, ids.size(1) :]
        keep = _completion_mask(comp, eos)
        for row, k in zip(comp, keep):
            out.append(row[: int(k.sum())].clone())
    return out


def evaluate_exact_match(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24, greedy: bool = True,
    batch_size: int = 256, strict: bool = False, seed: int = 0, task: Task | None = None,
) -> float:
    """Share of prompts whose generated completion ``task.is_correct`` accepts (``task`` required)."""
    if not prompts:
        raise ValueError("evaluate_exact_match needs at least one prompt")
    comps = generate_completions(model, tokenizer, prompts, max_new_tokens, greedy, batch_size, seed=seed)
    return sum(correct_flags(task, tokenizer, prompts, comps, strict)) / len(prompts)


def correct_flags(task: Task | None, tokenizer, prompts: Sequence[str], completions, strict: bool = False) -> list[bool]:
    """``task.is_correct`` of each (prompt, completion ids) pair."""
    task = _need_task(task, "correct_flags")
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    return [bool(task.is_correct(p, t, strict=strict)) for p, t in zip(prompts, texts)]


def _share(flags) -> float:
    flags = list(flags)
    return sum(map(bool, flags)) / max(len(flags), 1)


def _forward_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask)).logits.float()


@torch.no_grad()
def completion_token_stats(
    student, teacher, tokenizer, prompts: Sequence[str], completions: Sequence[torch.Tensor], batch_size: int = 256,
    correction_id: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Per completion token of each (prompt, completion): reverse KL(student || teacher) ``kl`` and student entropy
    ``entropy`` (nats, full vocabulary), both plain softmax at temperature 1. With ``correction_id`` (a task's
    correction token) also the teacher's and the student's probability of it (``p_correction_teacher``,
    ``p_correction_student``) and whether it is the teacher's top token (``teacher_top_correction``)."""
    out: list[dict[str, torch.Tensor]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [
            (tokenizer(p)["input_ids"], c.tolist(), [True] * len(c))
            for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size])
        ]
        ids, mask, labels = _batch(chunk, tokenizer.pad_token_id)
        # logits at position j predict token j+1: the rows predicting completion tokens have a label at j+1
        rows = labels[:, 1:] != -100
        ls = F.log_softmax(_forward_logits(student, ids, mask)[:, :-1], -1)
        lt = F.log_softmax(_forward_logits(teacher, ids, mask)[:, :-1], -1)
        ps = ls.exp()
        kl = (ps * (ls - lt)).sum(-1)
        ent = -(ps * ls).sum(-1)
        for r in range(ids.size(0)):
            sel = rows[r]
            row = {"kl": kl[r][sel], "entropy": ent[r][sel]}
            if correction_id is not None:
                row.update({
                    "p_correction_teacher": lt[r][sel][:, correction_id].exp(),
                    "p_correction_student": ps[r][sel][:, correction_id],
                    "teacher_top_correction": (lt[r][sel].argmax(-1) == correction_id).float(),
                })
            out.append(row)
    return out


@torch.no_grad()
def heldout_kl(
    student, teacher, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24, greedy: bool = True,
    batch_size: int = 256, temperature: float = 1.0, seed: int = 0,
) -> float:
    """Mean per-token reverse KL(student || teacher) over the student's own completions of ``prompts``.

    Completions are greedy (or sampled at ``temperature`` when not ``greedy``); every completion token up to and
    including EOS counts once; both distributions are plain softmax (temperature 1) over the full vocabulary.
    """
    comps = generate_completions(student, tokenizer, prompts, max_new_tokens, greedy, batch_size, temperature, seed)
    return _mean_kl(student, teacher, tokenizer, prompts, comps, batch_size)


def _mean_kl(student, teacher, tokenizer, prompts, comps, batch_size: int = 256) -> float:
    stats = completion_token_stats(student, teacher, tokenizer, prompts, comps, batch_size)
    kl = torch.cat([s["kl"] for s in stats]) if stats else torch.zeros(0)
    return kl.mean().item() if kl.numel() else 0.0


@torch.no_grad()
def evaluate_student(student, teacher, tokenizer, prompts: Sequence[str], max_new_tokens: int, task: Task | None = None,
                     batch_size: int = 256) -> dict:
    """`evaluate_exact_match` and `heldout_kl` (greedy) from one generation: ``exact_match``, ``heldout_kl`` and
    ``correct`` (one flag per prompt, for paired comparisons)."""
    comps = generate_completions(student, tokenizer, prompts, max_new_tokens, True, batch_size)
    flags = correct_flags(task, tokenizer, prompts, comps)
    return {"exact_match": sum(flags) / max(len(flags), 1),
            "heldout_kl": _mean_kl(student, teacher, tokenizer, prompts, comps, batch_size), "correct": flags}


@torch.no_grad()
def error_position_stats(
    student, teacher, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24, greedy: bool = True,
    batch_size: int = 256, temperature: float = 1.0, seed: int = 0, task: Task | None = None,
) -> dict:
    """How the known positions (``task.positions_of_interest``; addition: the Q3 positions of
    `lab.addition.error_positions`) of the student's own completions look.

    Returns the mean reverse KL over all completion tokens (``kl_all``, = `heldout_kl` on the same completions),
    the share of completion tokens that are error positions (``error_share``), the share of
    completions with at least one (``completions_with_error``), and at error positions vs all other completion
    tokens: mean student entropy normalised by ln|V| (``entropy_norm_*``), mean reverse KL (``kl_*``), mean
    teacher probability of ``"<"`` (``p_correction_teacher_*``), the share where ``"<"`` is the teacher's top
    token (``teacher_top_correction_*``); and ``q3_share_of_errors``: the share of error positions that
    fall in Q3 under per-batch median cut-offs (entropy below the median, KL above the median, docs/METHODS.md
    section 2). Values are NaN when there are no error positions. The correction-token entries exist only for a
    task with a correction token.
    """
    task = _need_task(task, "error_position_stats")
    comps = generate_completions(student, tokenizer, prompts, max_new_tokens, greedy, batch_size, temperature, seed)
    stats = completion_token_stats(student, teacher, tokenizer, prompts, comps, batch_size, task.correction_id)
    marks = [task.positions_of_interest(p, c.tolist(), tokenizer) or [False] * c.numel() for p, c in zip(prompts, comps)]
    flags = torch.cat([torch.tensor(m, dtype=torch.bool) for m in marks]) if marks else torch.zeros(0, dtype=torch.bool)
    cat = {k: torch.cat([s[k] for s in stats]) for k in stats[0]} if stats else {}
    if not stats or flags.numel() == 0:
        return {"error_share": 0.0, "completions_with_error": 0.0}
    h = cat["entropy"] / math.log(len(tokenizer))
    kl = cat["kl"]
    q3 = (h < h.median()) & (kl > kl.median())

    def mean(x, m):
        return x[m].mean().item() if m.any() else float("nan")

    other = ~flags
    out = {
        "kl_all": kl.mean().item(),
        "error_share": flags.float().mean().item(),
        "completions_with_error": _share(any(m) for m in marks),
        "entropy_norm_error": mean(h, flags), "entropy_norm_other": mean(h, other),
        "kl_error": mean(kl, flags), "kl_other": mean(kl, other),
        "q3_share_of_errors": mean(q3.float(), flags),
        "q3_share_of_all": q3.float().mean().item(),
    }
    if task.correction_id is not None:
        out.update({
            "p_correction_teacher_error": mean(cat["p_correction_teacher"], flags),
            "p_correction_teacher_other": mean(cat["p_correction_teacher"], other),
            "teacher_top_correction_error": mean(cat["teacher_top_correction"], flags),
            "teacher_top_correction_other": mean(cat["teacher_top_correction"], other),
        })
    return out


@torch.no_grad()
def recovery_rate(model, prompts: Sequence[str], seed: int = 0, batch_size: int = 256, task: Task | None = None) -> dict:
    """How the model reacts right after a forced wrong token (tasks with a correction token only; {} otherwise).

    For each prompt, a random digit position of the canonical completion (scratchpad digit, carry or answer
    digit) is replaced by a different digit and the model reads the prefix up to and including it.
    Returns ``recover_top1`` (share where ``"<"`` is the top next token), ``mean_p_correction`` (mean
    probability of ``"<"`` there), and ``repair_top1`` (share where, after ``wrong + "<"``, the top next token
    is the right one).
    """
    task = _need_task(task, "recovery_rate")
    if task.correction_id is None:
        return {}
    rng = random.Random(f"recovery/{seed}")
    wrong_prefixes, repair_prefixes, repair_targets = [], [], []
    probe = random.Random(f"recovery-spots/{seed}")
    for p in prompts:
        sol = task.solution(p)
        spots = [i for i, ch in enumerate(sol) if task.wrong_token(probe, ch) is not None]
        i = rng.choice(spots)
        wrong = task.wrong_token(rng, sol[i])
        wrong_prefixes.append(p + sol[:i] + wrong)
        repair_prefixes.append(p + sol[:i] + wrong + task.correction)
        repair_targets.append(task.vocab[sol[i]])

    def last_logprobs(texts):
        out = []
        for j in range(0, len(texts), batch_size):
            chunk = [(task.encode(t), [], []) for t in texts[j : j + batch_size]]
            ids, mask, _ = _batch(chunk, task.pad_id)
            out.append(F.log_softmax(_forward_logits(model, ids, mask)[:, -1], -1))
        return torch.cat(out)

    lw = last_logprobs(wrong_prefixes)
    lr = last_logprobs(repair_prefixes)
    targets = torch.tensor(repair_targets)
    return {
        "recover_top1": (lw.argmax(-1) == task.correction_id).float().mean().item(),
        "mean_p_correction": lw[:, task.correction_id].exp().mean().item(),
        "repair_top1": (lr.argmax(-1) == targets).float().mean().item(),
    }


# ----------------------------------------------------------------------------------------- train and save
@contextlib.contextmanager
def _threads(n: int | None):
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(max(1, min(prev, n)))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _save(model, tokenizer, out_dir: str, max_new_tokens: int) -> None:
    model.generation_config.max_new_tokens = max_new_tokens
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _train_and_save(
    role: str, out_dir, cfg: LabConfig, size: ModelSize, steps: int, lr: float,
    seed: int, progress: bool, eval_prompts: Sequence[str] | None, target_em: float | None = None,
):
    task = cfg.make_task()
    tokenizer = task.build_tokenizer()
    model = build_model(size, len(tokenizer), seed=seed, task=task)
    max_new = task.max_new_tokens
    stop_check = None
    if target_em is not None:
        # a dev set from the train split: the eval prompts stay untouched by any decision
        dev = task.make_prompts(cfg.n_dev, seed=cfg.seed + 7919, split="train")

        def stop_check():
            return evaluate_exact_match(model, tokenizer, dev, max_new, task=task)

    with _threads(cfg.num_threads):
        metrics = train_lm(
            model, _example_maker(task, role), steps, cfg.batch_size, lr, seed, progress,
            desc=f"{task.name} {role}", pad_id=task.pad_id,
            stop_check=stop_check, stop_at=target_em, check_every=cfg.student_check_every,
            min_steps=cfg.student_min_steps, schedule="constant" if target_em is not None else "cosine",
            max_threads=torch.get_num_threads(),  # cfg.num_threads, capped by the caller's setting
        )
        if eval_prompts:
            t0 = time.perf_counter()
            comps = generate_completions(model, tokenizer, eval_prompts, max_new)
            metrics["exact_match"] = _share(correct_flags(task, tokenizer, eval_prompts, comps))
            metrics["exact_match_strict"] = _share(correct_flags(task, tokenizer, eval_prompts, comps, strict=True))
            if task.correction_id is not None:
                metrics["uses_correction"] = _share(task.correction_id in c.tolist() for c in comps)
            if role == "teacher":
                metrics.update(recovery_rate(model, eval_prompts, seed=seed, task=task))
            metrics["eval_seconds"] = time.perf_counter() - t0
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    _save(model, tokenizer, str(out_dir), max_new)
    return model, metrics


def train_teacher(
    out_dir, cfg: LabConfig | str | None = None, steps: int | None = None, batch_size: int | None = None,
    lr: float | None = None, seed: int | None = None, progress: bool = True, eval_prompts: Sequence[str] | None = None,
) -> dict:
    """Train the teacher on completions with injected errors and ``"<"`` repairs; save it to ``out_dir``.

    Returns metrics: steps, final_loss, train_seconds, and on ``eval_prompts`` (default: ``cfg.n_eval`` eval-split
    prompts) exact_match, recover_top1, mean_p_correction, repair_top1 (see `recovery_rate`).
    """
    cfg = _lab_config(cfg, steps=steps, batch_size=batch_size, lr=lr, seed=seed, role="teacher")
    if eval_prompts is None:
        eval_prompts = cfg.make_task().make_prompts(cfg.n_eval, cfg.seed, split="eval")
    _, metrics = _train_and_save(
        "teacher", out_dir, cfg, cfg.teacher, cfg.teacher_steps, cfg.teacher_lr, cfg.seed, progress, eval_prompts
    )
    return metrics


def warm_start_student(
    out_dir, cfg: LabConfig | str | None = None, steps: int | None = None, batch_size: int | None = None,
    lr: float | None = None, seed: int | None = None, progress: bool = True, eval_prompts: Sequence[str] | None = None,
) -> dict:
    """Supervised warm start of the student; save it to ``out_dir``.

    The student sees clean solutions only (``cfg.task.student_error_rate`` = 0 by default: it never learns
    ``"<"``) and is deliberately stopped early, so that it starts clearly below the teacher and makes
    confident mistakes for distillation to repair: its greedy exact match on a dev set (train split) is checked
    every ``cfg.student_check_every`` steps from ``cfg.student_min_steps`` on, and training stops once it
    reaches ``cfg.student_target_em``, keeping the checkpoint (that check or the one before) closest to the
    target (at most ``cfg.student_steps`` steps; None disables the check and uses a cosine schedule over
    ``student_steps``). With the check, the learning rate is constant after warm-up. The stop is by score, not
    by a step count, because this task is learned in a sharp transition whose timing varies with the seed:
    a fixed step count lands anywhere between 1% and 90% exact match. Returns the same metrics as
    `train_teacher` without the recovery ones, plus ``stopped_early``, ``last_check`` (dev exact match of the
    kept weights) and ``check_history``.
    """
    cfg = _lab_config(cfg, steps=steps, batch_size=batch_size, lr=lr, seed=seed, role="student")
    if eval_prompts is None:
        eval_prompts = cfg.make_task().make_prompts(cfg.n_eval, cfg.seed, split="eval")
    _, metrics = _train_and_save(
        "student", out_dir, cfg, cfg.student, cfg.student_steps, cfg.student_lr,
        cfg.seed + 1, progress, eval_prompts, target_em=cfg.student_target_em,
    )
    return metrics


def _lab_config(cfg, steps=None, batch_size=None, lr=None, seed=None, role="teacher") -> LabConfig:
    if cfg is None:
        raise ValueError("a lab configuration is required: a LabConfig, a task name or a Task "
                         "(e.g. default_lab_config('addition'))")
    if isinstance(cfg, str):
        cfg = default_lab_config(cfg)
    elif isinstance(cfg, Task):
        cfg = LabConfig.from_dict({**default_lab_config(cfg.name).to_dict(), "task": cfg.config})
    elif not isinstance(cfg, LabConfig):  # a task's config dataclass
        names = [n for n, e in REGISTRY.items() if isinstance(cfg, e.cls.config_class)]
        if len(names) != 1:
            raise ValueError(f"cannot tell the task of a {type(cfg).__name__} (registered tasks using it: {names}); "
                             "pass a LabConfig or a Task instead")
        cfg = LabConfig.from_dict({**default_lab_config(names[0]).to_dict(), "task": cfg})
    cfg = LabConfig.from_dict(cfg.to_dict())  # a copy we may override
    if steps is not None:
        setattr(cfg, f"{role}_steps", steps)
    if lr is not None:
        setattr(cfg, f"{role}_lr", lr)
    if batch_size is not None:
        cfg.batch_size = batch_size
    if seed is not None:
        cfg.seed = seed
    return cfg


def check_calibration(role: str, metrics: dict, cfg: LabConfig) -> None:
    """Raise CalibrationError (with the numbers) when a trained model misses its target: the teacher's held-out
    exact match below ``teacher_min_em``; the student's warm start never reaching ``student_target_em`` within
    ``student_steps``, or keeping weights whose dev exact match is further than ``student_em_tolerance`` from it."""
    task = cfg.task_name
    if role == "teacher" and cfg.teacher_min_em is not None:
        em = metrics.get("exact_match")
        if em is None or em < cfg.teacher_min_em:
            raise CalibrationError(
                f"teacher of task {task!r} missed its calibration target: held-out exact match {em} < teacher_min_em "
                f"{cfg.teacher_min_em} after {metrics.get('steps')} steps (final loss {metrics.get('final_loss', 0):.4f});"
                " raise teacher_steps / the teacher size in the task's lab_settings, or lower teacher_min_em")
    if role == "student" and cfg.student_target_em is not None and cfg.student_em_tolerance is not None:
        last, target = metrics.get("last_check"), cfg.student_target_em
        history = metrics.get("check_history") or []
        if not metrics.get("stopped_early"):
            raise CalibrationError(
                f"student warm start of task {task!r} missed its calibration target: dev exact match never reached "
                f"student_target_em {target} in {metrics.get('max_steps')} steps (last check {last}; checks "
                f"{history[-5:]}); raise student_steps or lower student_target_em in the task's lab_settings")
        if abs(last - target) > cfg.student_em_tolerance:
            raise CalibrationError(
                f"student warm start of task {task!r} missed its calibration target: kept weights at step "
                f"{metrics.get('steps')} have dev exact match {last:.3f}, more than student_em_tolerance "
                f"{cfg.student_em_tolerance} from student_target_em {target} (the score jumped between checks: "
                f"{history[-5:]}); check more often (student_check_every) or from earlier (student_min_steps)")


# The default configurations' models ship with the repository (about 2 MB per task), trained by this function on a
# 2-core CPU: a fresh clone's demo starts from the same teachers and students on every machine and spends its
# minutes on the study. A configuration without a shipped copy (or force=True) trains from scratch.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


def _install_dir(src: str, final: str, ignore=None, extra: dict | None = None) -> None:
    """Copy ``src`` to ``final`` (plus ``extra`` json files), appearing atomically like a trained directory."""
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".shipped-", dir=parent)
    try:
        shutil.copytree(src, os.path.join(work, "d"), ignore=ignore)
        for name, value in (extra or {}).items():
            with open(os.path.join(work, "d", name), "w") as f:
                json.dump(value, f, indent=1)
        try:
            os.rename(os.path.join(work, "d"), final)
        except OSError:  # another process installed it first
            if not os.path.isfile(os.path.join(final, "metrics.json")):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def role_dir(cache_dir, cfg: LabConfig, role: str) -> str:
    """Cache directory of one model: ``cache_dir/<role>-<task>-<role_key>``."""
    return os.path.join(str(cache_dir), f"{role}-{cfg.task_name}-{cfg.role_key(role)}")


def _prepare_role(cache_dir, cfg: LabConfig, role: str, force: bool, progress: bool, eval_prompts) -> tuple[dict, bool]:
    """Train (or find cached) the teacher or the student under its own key; returns (metrics, cached)."""
    final = role_dir(cache_dir, cfg, role)
    metrics_file = os.path.join(final, "metrics.json")
    if force and os.path.isdir(final):
        shutil.rmtree(final)
    if os.path.isfile(metrics_file):
        with open(metrics_file) as f:
            return json.load(f), True
    os.makedirs(str(cache_dir), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{role}-{cfg.task_name}-", dir=str(cache_dir))
    try:
        train = train_teacher if role == "teacher" else warm_start_student
        metrics = train(work, cfg, progress=progress, eval_prompts=eval_prompts)
        check_calibration(role, metrics, cfg)  # a miss raises: nothing is cached
        with open(os.path.join(work, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        metrics = _publish(work, final, metrics_file, metrics)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
    return metrics, False


def _publish(work: str, final: str, metrics_file: str, metrics: dict) -> dict:
    """Rename a finished work directory into place; when another process finished the same one first, keep its copy
    and return its metrics."""
    try:
        os.rename(work, final)
    except OSError:
        if not os.path.isfile(metrics_file):
            raise
        with open(metrics_file) as f:
            return json.load(f)
    return metrics


def prepare_lab_models(cache_dir, cfg: LabConfig | str | None = None, force: bool = False, progress: bool = True
                       ) -> dict:
    """Teacher, student, tokenizer and prompt files for the lab, trained once and cached (or copied from the
    copies shipped in lab/pretrained/ for the default configurations; force=True retrains).

    Layout: the teacher and the student are cached under separate keys (`LabConfig.role_key`), so retuning one
    never retrains the other: ``cache_dir/teacher-<task>-<key>/`` and ``cache_dir/student-<task>-<key>/`` (each
    loadable with ``from_pretrained``, with its ``metrics.json``). ``cache_dir/lab-<task>-<key>/`` holds the pair's
    ``tokenizer/``, ``train_prompts.jsonl`` and ``eval_prompts.jsonl`` (columns ``prompt``, ``solution``),
    ``config.json``, ``task.json`` and ``metrics.json``. Each directory appears atomically when complete, so an
    interrupted run leaves no half cache. A model that misses its calibration target (`check_calibration`) raises
    CalibrationError and is not cached. A task registered with its own ``prepare`` (lab.tasks.register_task) is
    prepared by it instead.

    Returns ``{"paths": {dir, teacher, student, tokenizer, train_prompts, eval_prompts}, "metrics": {...},
    "config": <LabConfig as dict>, "cached": bool, "key": <hash>}``. ``metrics`` holds ``teacher`` and
    ``student`` training metrics (exact_match on the eval prompts, teacher recovery rates, seconds) and the
    student's ``heldout_kl`` to the teacher at the start (greedy completions of the eval prompts) with
    `error_position_stats` of those completions (``student_error_positions``).
    """
    from .tasks import task_entry as _entry

    cfg = _lab_config(cfg)
    custom = _entry(cfg.task_name).prepare
    if custom is not None:
        return custom(cache_dir, cfg, force, progress)
    key = cfg.cache_key()
    final = os.path.join(str(cache_dir), f"lab-{cfg.task_name}-{key}")
    paths = {
        "dir": final,
        "teacher": role_dir(cache_dir, cfg, "teacher"),
        "student": role_dir(cache_dir, cfg, "student"),
        "tokenizer": os.path.join(final, "tokenizer"),
        "train_prompts": os.path.join(final, "train_prompts.jsonl"),
        "eval_prompts": os.path.join(final, "eval_prompts.jsonl"),
    }
    metrics_file = os.path.join(final, "metrics.json")
    if force:
        for d in (final, paths["teacher"], paths["student"]):
            if os.path.isdir(d):
                shutil.rmtree(d)
    shipped = os.path.join(SHIPPED_DIR, os.path.basename(final))
    if not force and os.path.isfile(os.path.join(shipped, "metrics.json")):
        with open(os.path.join(shipped, "metrics.json")) as f:
            shipped_metrics = json.load(f)
        for role in ("teacher", "student"):
            if not os.path.isfile(os.path.join(paths[role], "metrics.json")):
                _install_dir(os.path.join(shipped, role), paths[role], extra={"metrics.json": shipped_metrics[role]})
        if not os.path.isfile(metrics_file):
            _install_dir(shipped, final, ignore=shutil.ignore_patterns("teacher", "student"))
    if os.path.isfile(metrics_file) and all(os.path.isfile(os.path.join(paths[r], "metrics.json"))
                                            for r in ("teacher", "student")):
        with open(metrics_file) as f:
            return {"paths": paths, "metrics": json.load(f), "config": cfg.to_dict(), "cached": True, "key": key}

    os.makedirs(str(cache_dir), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".lab-{key}-", dir=str(cache_dir))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        task = cfg.make_task()
        task.build_tokenizer(os.path.join(work, "tokenizer"))
        eval_prompts = task.make_prompts(cfg.n_eval, cfg.seed, split="eval")
        write_prompt_file(os.path.join(work, "eval_prompts.jsonl"), eval_prompts, task)
        write_prompt_file(os.path.join(work, "train_prompts.jsonl"), task.make_prompts(cfg.n_train_prompts, cfg.seed),
                          task)
        teacher_m, teacher_cached = _prepare_role(cache_dir, cfg, "teacher", False, progress, eval_prompts)
        student_m, student_cached = _prepare_role(cache_dir, cfg, "student", False, progress, eval_prompts)
        if cfg.teacher_min_em is not None and teacher_m.get("exact_match") is not None \
                and student_m.get("exact_match") is not None and student_m["exact_match"] >= teacher_m["exact_match"]:
            raise CalibrationError(
                f"task {cfg.task_name!r}: the warm-started student's held-out exact match {student_m['exact_match']:.3f}"
                f" is not below the teacher's {teacher_m['exact_match']:.3f}: distillation has nothing to teach; "
                "lower student_target_em or strengthen the teacher")
        from transformers import AutoModelForCausalLM

        with _threads(cfg.num_threads):
            tok = task.build_tokenizer()
            teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
            student = AutoModelForCausalLM.from_pretrained(paths["student"])
            q3 = error_position_stats(student, teacher, tok, eval_prompts, task.max_new_tokens, task=task)
        metrics = {
            "teacher": teacher_m,
            "student": student_m,
            "teacher_cached": teacher_cached,
            "student_cached": student_cached,
            "student_heldout_kl": q3["kl_all"],
            "student_error_positions": q3,
            "total_seconds": time.perf_counter() - t0,
            "total_cpu_seconds": time.process_time() - c0,
            "max_threads": min(torch.get_num_threads(), cfg.num_threads),
        }
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump({"version": LAB_FORMAT_VERSION, **cfg.to_dict()}, f, indent=1)
        with open(os.path.join(work, "task.json"), "w") as f:
            json.dump(task.to_dict(), f, indent=1)
        with open(os.path.join(work, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        if os.path.isdir(final):  # a lab directory without its models (they were removed): replace it
            shutil.rmtree(final, ignore_errors=True)
        metrics = _publish(work, final, metrics_file, metrics)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
    return {"paths": paths, "metrics": metrics, "config": cfg.to_dict(), "cached": False, "key": key}


def write_prompt_file(path, prompts: Sequence[str], task: Task) -> str:
    """``{"prompt": ..., "solution": ...}`` lines (jsonl) of a task's prompts (addition adds ``answer`` and ``sum``)."""
    if isinstance(task, AdditionTask):
        return T.write_prompt_file(path, prompts)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, "solution": task.solution(p)}) + "\n")
    return path


def default_lab_config(task_name: str) -> LabConfig:
    """The calibrated teacher / student settings of a registered task (its `register_task(..., lab_settings=...)`
    over LabConfig's defaults)."""
    from .tasks import task_entry as _entry

    entry = _entry(task_name)
    return LabConfig(task=entry.cls.config_class(), task_name=task_name, **entry.lab_settings)


def load_lab_models(paths: dict):
    """``(teacher, student, tokenizer)`` from the ``paths`` of `prepare_lab_models` (eval mode, float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = paths.get("paths", paths)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(paths["student"]).eval()
    return teacher, student, AutoTokenizer.from_pretrained(paths["tokenizer"])
