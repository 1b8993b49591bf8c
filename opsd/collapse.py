"""Collapse signals: is the student still the teacher's kind of model, or is reverse KL falling for the wrong reason?

On-policy distillation minimizes the divergence to the teacher *on the student's own samples*. A student can lower
that number by drifting into a narrow mode that the teacher also tolerates (digit-and-newline lists, a never-ending
turn) while moving away from what the teacher itself writes: the training loss falls, the model gets worse, and no
loss curve shows it. Four cheap signals do (docs/METHODS.md, "Collapse signals"):

- ``teacher_nll``: the student's mean negative log-likelihood (nats per token) of text the *teacher* wrote for the
  held-out prompts (generated once, greedily, and cached; scored by the student at every validation). It falls when
  OPD works (the student learns the teacher's text) and rises when the student drifts off it.
- ``eot_rate``: the fraction of the student's sampled completions that end with a stop token (the tokenizer's EOS /
  the chat template's end-of-turn token, e.g. ``<|im_end|>``) rather than at the length limit.
- ``clipped_ratio``: the fraction of completions that reached the length limit without a stop token (the
  complement of ``eot_rate`` for transformers generation; reported for readers used to RL dashboards).
- ``distinct_<n>`` (n = 1, 2, 3): distinct n-grams / all n-grams over the completion tokens of a set (n-grams do not
  cross completions; the stop token is excluded). A student collapsing into repeated lists loses variety.

``CollapseRule`` compares each validation with the first one and fires when the training loss fell while a signal
moved the wrong way by more than its relative threshold (see ``CollapseRule.check``). This module imports torch
lazily and never imports tip_ext or lab.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

#: chat templates' end-of-turn tokens (ChatML, Llama 3, Phi-3, Gemma): counted as stop tokens when in the vocabulary
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
DISTINCT_N = (1, 2, 3)


# ----------------------------------------------------------------------------------------------------------------
# Metrics on sampled completions
# ----------------------------------------------------------------------------------------------------------------


def stop_token_ids(tokenizer, eos_ids: Sequence[int] = ()) -> set[int]:
    """The ids that end a turn: the given generation EOS ids, the tokenizer's EOS and the end-of-turn tokens of
    common chat templates that the vocabulary holds."""
    ids = {int(i) for i in eos_ids}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(int(vocab[token]))
    return ids


def end_of_turn_rate(completions: Sequence[Sequence[int]], stop_ids: set[int]) -> float:
    """Fraction of completions whose last token is a stop token."""
    if not completions:
        raise ValueError("No completions.")
    return sum(1 for c in completions if len(c) > 0 and int(c[-1]) in stop_ids) / len(completions)


def clipped_ratio(completions: Sequence[Sequence[int]], stop_ids: set[int], max_new_tokens: int) -> float:
    """Fraction of completions that hit ``max_new_tokens`` without ending on a stop token."""
    if not completions:
        raise ValueError("No completions.")
    return sum(1 for c in completions
               if len(c) >= max_new_tokens and not (len(c) > 0 and int(c[-1]) in stop_ids)) / len(completions)


def distinct_n(completions: Sequence[Sequence[int]], n: int, stop_ids: set[int] = frozenset()) -> float | None:
    """Distinct n-grams / all n-grams over the completions (n-grams stay inside one completion; stop tokens are
    dropped from the end first). None when no completion has n tokens."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    seen, total = set(), 0
    for c in completions:
        tokens = [int(t) for t in c]
        while tokens and tokens[-1] in stop_ids:
            tokens.pop()
        for i in range(len(tokens) - n + 1):
            seen.add(tuple(tokens[i:i + n]))
            total += 1
    return len(seen) / total if total else None


def completion_metrics(completions: Sequence[Sequence[int]], stop_ids: set[int], max_new_tokens: int,
                       ns: Sequence[int] = DISTINCT_N) -> dict[str, float]:
    """``eot_rate``, ``clipped_ratio`` and ``distinct_<n>`` of a set of sampled completions (token ids)."""
    out = {"eot_rate": end_of_turn_rate(completions, stop_ids),
           "clipped_ratio": clipped_ratio(completions, stop_ids, max_new_tokens)}
    for n in ns:
        value = distinct_n(completions, n, stop_ids)
        if value is not None:
            out[f"distinct_{n}"] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# Teacher text and its NLL under the student
# ----------------------------------------------------------------------------------------------------------------


def generate_teacher_text(teacher, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                          batch_size: int = 8) -> list[list[int]]:
    """One greedy completion per prompt from the teacher (token ids, cut after the first stop token)."""
    from .evaluate import _generate_hf

    samples = _generate_hf(teacher, tokenizer, prompt_ids, 1, 0.0, 1.0, 0, max_new_tokens, batch_size, 0,
                           False, "teacher text")
    return [outs[0][0] for outs in samples]


def sequence_nll(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], batch_size: int = 8,
                 pad_id: int = 0) -> tuple[float, int]:
    """(sum of -log p(completion token | prompt, earlier completion tokens) under ``model``, number of tokens),
    over all pairs; right-padded batches, float32 log-softmax of the completion positions only."""
    import torch

    if len(prompt_ids) != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids differ in length.")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    pairs = [(p, c) for p, c in zip(prompt_ids, completion_ids) if len(c) > 0]
    for s in range(0, len(pairs), batch_size):
        batch = pairs[s:s + batch_size]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        target = torch.zeros((len(batch), width), dtype=torch.bool)
        for r, (p, c) in enumerate(batch):
            ids[r, :len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
            mask[r, :len(p) + len(c)] = 1
            target[r, len(p):len(p) + len(c)] = True
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        # logits at t predict token t + 1
        shifted = logits[:, :-1].float()
        labels = ids[:, 1:].to(device)
        take = target[:, 1:].to(device)
        logp = torch.log_softmax(shifted[take], dim=-1)
        nll = -logp.gather(-1, labels[take].unsqueeze(-1)).squeeze(-1)
        total += float(nll.double().sum())
        count += int(take.sum())
    return total, count


def teacher_text_nll(model, prompt_ids: list[list[int]], teacher_ids: list[list[int]], batch_size: int = 8,
                     pad_id: int = 0) -> float | None:
    """Mean NLL (nats per token) of the teacher's completions under ``model``; None without tokens."""
    total, count = sequence_nll(model, prompt_ids, teacher_ids, batch_size, pad_id)
    return total / count if count else None


def load_or_make_teacher_text(path: str | None, teacher, tokenizer, prompt_ids: list[list[int]],
                              max_new_tokens: int, batch_size: int = 8, write: bool = True) -> list[list[int]]:
    """The cached teacher completions at ``path`` when they were made for the same prompts and length; else
    generated (greedy) and written there (``write``)."""
    if path and os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("prompt_ids") == prompt_ids and cached.get("max_new_tokens") == max_new_tokens:
            return cached["teacher_ids"]
    if teacher is None:
        raise ValueError(f"No cached teacher text at {path!r} for these prompts and no teacher model to generate it.")
    teacher_ids = generate_teacher_text(teacher, tokenizer, prompt_ids, max_new_tokens, batch_size)
    if path and write:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"max_new_tokens": max_new_tokens, "prompt_ids": prompt_ids, "teacher_ids": teacher_ids}, f)
        os.replace(tmp, path)
    return teacher_ids


# ----------------------------------------------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CollapseRule:
    """When is a falling loss a collapse? All thresholds are relative to the first validation (the baseline).

    With ``x0`` a signal's baseline value and ``x`` its value now, a signal *fires* when

    - ``teacher_nll``: ``(x - x0) / x0 >= nll_rise`` (the student got worse at the teacher's own text);
    - ``eot_rate``: ``x0 >= min_eot`` and ``(x0 - x) / x0 >= eot_drop`` (fewer completions end their turn);
    - ``distinct_2``: ``(x0 - x) / x0 >= distinct_drop`` (less variety; 0 turns this signal off). A *supporting*
      signal only: learning a teacher's fixed answer format lowers distinct-n as much as a collapse does (measured on
      the real pair: 0.75 -> 0.16 in a run whose reward rose 0.04 -> 0.46 and teacher-text NLL fell 0.82 -> 0.29),
      so it is reported with the others but never makes a collapse on its own.

    The training loss *fell* when ``(loss0 - loss) / |loss0| >= loss_drop``, with ``loss0`` the mean of the first
    ``loss_window`` logged training losses and ``loss`` the mean of the last ``loss_window`` logged before this
    validation (the window shrinks to half the logged losses early on). A collapse is reported when the loss fell
    and at least ``min_signals`` of the primary signals (``teacher_nll``, ``eot_rate``) fired; once reported, it is
    reported again at later validations while those signals still fire, whether or not the loss still falls. A signal whose
    baseline or current value is missing (no teacher, no completion with two tokens) cannot fire. ``clipped_ratio``
    is the complement of ``eot_rate`` under transformers generation and is not counted twice.
    """

    PRIMARY = ("teacher_nll", "eot_rate")

    nll_rise: float = 0.10
    eot_drop: float = 0.25
    min_eot: float = 0.05
    distinct_drop: float = 0.5
    loss_drop: float = 0.05
    loss_window: int = 3
    min_signals: int = 1

    def __post_init__(self):
        for name in ("nll_rise", "eot_drop", "min_eot", "distinct_drop", "loss_drop"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"collapse rule: {name} must be a finite number >= 0, got {value!r}.")
        if self.loss_window < 1:
            raise ValueError(f"collapse rule: loss_window must be >= 1, got {self.loss_window}.")
        if self.min_signals < 1:
            raise ValueError(f"collapse rule: min_signals must be >= 1, got {self.min_signals}.")

    def signals(self, baseline: dict, current: dict) -> dict[str, dict]:
        """The signals that fired: {name: {baseline, value, relative_change}}."""
        fired = {}

        def both(key):
            a, b = baseline.get(key), current.get(key)
            ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
            return (float(a), float(b)) if ok else (None, None)

        x0, x = both("teacher_nll")
        if x0 is not None and x0 > 0 and (x - x0) / x0 >= self.nll_rise:
            fired["teacher_nll"] = {"baseline": x0, "value": x, "relative_change": (x - x0) / x0}
        x0, x = both("eot_rate")
        if x0 is not None and x0 >= self.min_eot and x0 > 0 and (x0 - x) / x0 >= self.eot_drop:
            fired["eot_rate"] = {"baseline": x0, "value": x, "relative_change": (x - x0) / x0}
        x0, x = both("distinct_2")
        if self.distinct_drop > 0 and x0 is not None and x0 > 0 and (x0 - x) / x0 >= self.distinct_drop:
            fired["distinct_2"] = {"baseline": x0, "value": x, "relative_change": (x - x0) / x0}
        return fired

    def loss_fell(self, losses: Sequence[float]) -> tuple[bool, float | None, float | None]:
        """(fell, loss0, loss) from the training losses logged so far, in order."""
        values = [float(v) for v in losses if v is not None and math.isfinite(float(v))]
        if len(values) < 2:
            return False, None, None
        w = min(self.loss_window, len(values) // 2) or 1
        loss0 = sum(values[:w]) / w
        loss = sum(values[-w:]) / w
        if loss0 == 0:
            return False, loss0, loss
        return (loss0 - loss) / abs(loss0) >= self.loss_drop, loss0, loss

    def check(self, baseline: dict, current: dict, losses: Sequence[float], confirmed: bool = False) -> dict | None:
        """A collapse report ({signals, loss0, loss, persisting}) or None. ``confirmed``: a collapse was already
        reported for this set; it is reported again while its signals still fire, whatever the loss does now (a
        collapsed student's loss need not keep falling)."""
        fell, loss0, loss = self.loss_fell(losses)
        fired = self.signals(baseline, current)
        if sum(key in fired for key in self.PRIMARY) < self.min_signals or not (fell or confirmed):
            return None
        return {"signals": fired, "loss0": loss0, "loss": loss, "persisting": bool(confirmed)}

    def to_dict(self) -> dict:
        return asdict(self)


def describe(name: str, step: int, report: dict) -> str:
    """One warning line for a collapse report."""
    parts = [f"{key} {s['baseline']:.3g} -> {s['value']:.3g} ({100 * s['relative_change']:+.0f}%)"
             for key, s in report["signals"].items()]
    loss = "" if report["loss0"] is None else f"{report['loss0']:.3g} -> {report['loss']:.3g}"
    if report.get("persisting"):
        tail = f" (persisting since an earlier warning; training loss {loss})"
    else:
        tail = f" while the training loss fell {loss}"
    return f"possible collapse at step {step} on {name}: " + ", ".join(parts) + tail + \
        " (docs/METHODS.md, Collapse signals)"
