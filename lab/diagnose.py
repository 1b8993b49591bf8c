"""Fixed-context diagnostic of token selection (docs/METHODS.md section 5, after TA-OPD): `python -m lab.diagnose`.

Which tokens does a short OPD update actually teach, and do the selection scores know it in advance?

1. Bank. The student samples (temperature 1, full vocabulary, seeded) one response of at most `max_tokens` tokens
   for each of `contexts` prompts; prompt + response is frozen as the bank. Every response token (the first EOS
   included, padding excluded) is one scored position: the student's and the teacher's next-token distributions
   at the context that precedes it. The bank never changes afterwards (no re-generation while training).
2. Scores of every bank token, on the initial student: the `tip_ext.stats.token_stats` statistics (entropy,
   reverse KL, forward KL KL(P_T||P_S), support mass C, local disagreement D, teacher entropy) and the rule scores
   of `tip_ext.selectors` computed over the whole bank as one batch: teachability Norm(D)*Norm(C), its
   incompatible part Norm(D)*(1-Norm(C)), TIP soft-OR, Q3, teachability+entropy.
3. Gain. For every selector x budget a copy of the initial student takes `steps` AdamW updates on the fixed bank
   with loss = mean reverse KL(P_S||P_T) over the tokens the selector keeps (the mask is computed once, on the
   initial scores). Then the forward KL of every bank token is measured again: token gain
   G_t = KL_before_t - KL_after_t (forward KL, as the paper) and the relative gain G_t / KL_before_t (the
   authors' stored variant), winsorized at the 1% / 99% quantiles of the bank.
4. Report. (a) Predictiveness: Pearson and Spearman correlation of every score with the gain under one common
   update, the reference update (`reference`, default "all": plain all-token OPD on the bank; a common update
   is needed because under a selector's own update only the tokens it keeps are trained, so its gains measure
   the selector and the update at once), and standardized regression coefficients of that gain on
   [learnable Norm(D)*Norm(C), incompatible Norm(D)*(1-Norm(C))] jointly (TA-OPD: learnable ~2x incompatible),
   and on [learnable, incompatible, entropy, reverse KL] jointly. (b) Selector x budget: mean gain of the kept
   tokens under the selector's own update, mean gain over all tokens (spillover) and over the dropped tokens,
   the kept tokens' mean gain under the reference update, with bootstrap 95% percentile intervals over contexts
   (whole contexts are resampled with replacement; the same resamples for every run, so runs are paired).

Selectors (`DIAGNOSTIC_SELECTORS`; any other `tip_ext.selectors` rule name also works):

| name                       | tip_ext rule         | note                                                             |
|----------------------------|----------------------|------------------------------------------------------------------|
| random                     | random               | uniform over the bank                                            |
| entropy_topk               | entropy_topk         | top student entropy                                              |
| divergence_topk            | divergence_topk      | top raw reverse KL (the OPD loss)                                |
| forward_kl_topk            | divergence_topk      | top raw forward KL (divergence_topk fed forward_kl)              |
| soft_or                    | soft_or              | TIP                                                              |
| q3                         | q3                   | TIP Q3-only                                                      |
| teachability               | teachability         | TA-OPD                                                           |
| teachability_incompatible  | teachability         | incompatible=True: Norm(D)*(1-Norm(C)) (TA-OPD's control)        |
| teachability_entropy       | teachability_entropy | TA-OPD+Entropy                                                   |

Choices docs/METHODS.md leaves open, and what this module does:
- Equal budgets (default). Every selector keeps exactly k = ceil(rho*N) tokens of the N bank tokens (TA-OPD's
  rounding), ranked over the whole bank: rules run with batch scope (soft_or per_sequence=False, teachability
  rules ensure_each_sequence=False) at the ratio k/N, which makes both floor and ceil rules keep k. With
  `native_scope=True` the rules keep their own scope and rounding at the nominal ratio (kept counts then differ
  and are reported). Position rules are per sequence by nature and are not equalized.
- Update: one optimizer step per `steps` on the full kept set (gradients accumulated over micro-batches of
  `batch_size` contexts, loss = sum of kept KL / number kept, so it is the exact mean); contexts without a kept
  token are not run. AdamW with weight_decay 0 by default (so that a token set with no gradient leaves the model
  unchanged), no gradient clipping unless `max_grad_norm` is set, no schedule. The models are used in eval mode
  (no dropout) also for the updates, so the update is deterministic.
- Relative gain: G_t / max(KL_before_t, 1e-8), then clipped to its 1% / 99% quantiles over the bank.
- Means over token sets are token-weighted (sum of gains / number of tokens); the bootstrap resamples contexts and
  recomputes that ratio.
- Each context is run only up to its last kept token during the updates (causal attention: the cut changes no
  kept token's logits), so small budgets cost less.
- Statistics and the update go through the project's own code: `tip_ext.stats.token_stats_from_hidden` (the
  trainer's statistics pass) and `opsd.core.losses.per_token_divergence` (the trainer's loss step) on final hidden
  states and `opsd.core.heads.head_of` heads, so no [N, V] logits are materialized. Teacher hidden states of the
  bank are computed once and kept in memory when N x H float32 fits `teacher_cache_gb`, otherwise recomputed for
  every micro-batch. The student is deep-copied for every selector x budget.
- Defaults are the paper's where docs/METHODS.md gives them (300 contexts, 192 tokens, budgets 3/5/10%, K = 16) and
  sized for the CPU lab otherwise: 20 steps at lr 3e-4 (the lab's all-token loss falls steadily; 1e-3 overshoots),
  1 torch thread. Measured on the lab (2 shared CPU cores, load ~6): about 105 s for the defaults.
- Logits are compared over the shared vocabulary (`opsd.core.models.resolve_distill_vocab`); temperature 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from opsd.evaluate import eos_token_ids, tokenize_prompts  # prompts are tokenized exactly as in training
from opsd.core.heads import head_of
from opsd.core.losses import per_token_divergence

from tip_ext.selectors import RULES, rule_options, select
from tip_ext.stats import STAT_NAMES, token_stats_from_hidden

DEFAULT_SELECTORS = (
    "random",
    "entropy_topk",
    "divergence_topk",
    "forward_kl_topk",
    "soft_or",
    "q3",
    "teachability",
    "teachability_incompatible",
    "teachability_entropy",
)
DEFAULT_BUDGETS = (0.03, 0.05, 0.10)

# name -> (tip_ext rule, options, stat remap {name the rule reads: bank statistic it gets})
DIAGNOSTIC_SELECTORS: dict[str, tuple[str, dict, dict]] = {
    "random": ("random", {}, {}),
    "entropy_topk": ("entropy_topk", {}, {}),
    "divergence_topk": ("divergence_topk", {}, {}),
    "forward_kl_topk": ("divergence_topk", {}, {"reverse_kl": "forward_kl"}),
    "soft_or": ("soft_or", {}, {}),
    "q3": ("q3", {}, {}),
    "teachability": ("teachability", {}, {}),
    "teachability_incompatible": ("teachability", {"incompatible": True}, {}),
    "teachability_entropy": ("teachability_entropy", {}, {}),
}

# Scores whose predictiveness is reported: bank column -> label
SCORES = {
    "entropy": "entropy H(P_S)",
    "reverse_kl": "raw reverse KL",
    "forward_kl": "raw forward KL",
    "teacher_entropy": "teacher entropy",
    "support_mass": "support mass C",
    "local_forward_kl": "local disagreement D",
    "teachability": "teachability Norm(D)Norm(C)",
    "incompatible": "incompatible Norm(D)(1-Norm(C))",
    "soft_or": "TIP soft-OR",
    "q3": "Q3 score",
    "teachability_entropy": "teachability+entropy",
}
# derived score -> (rule, options) whose TokenChoice.score it is
DERIVED_SCORES = {
    "teachability": ("teachability", {}),
    "incompatible": ("teachability", {"incompatible": True}),
    "soft_or": ("soft_or", {}),
    "q3": ("q3", {}),
    "teachability_entropy": ("teachability_entropy", {}),
}
REGRESSIONS = {
    "learnable+incompatible": ("teachability", "incompatible"),
    "learnable+incompatible+entropy+reverse_kl": ("teachability", "incompatible", "entropy", "reverse_kl"),
}
REL_EPS = 1e-8
WINSOR = (0.01, 0.99)


def _tqdm(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, mininterval=1.0, file=sys.stderr, **kwargs)


# ================================================================================================== bank


@dataclass
class Bank:
    """Frozen student prefixes: prompt ids + sampled response ids per context.

    Bank tokens are the response tokens, flattened context by context in position order (the order
    `tip_ext.selectors.select` expects); token i of context b predicts response_ids[b][j] from
    prompt_ids[b] + response_ids[b][:j].
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    pad_id: int = 0
    prompts: list = field(default_factory=list)

    def __post_init__(self):
        if len(self.prompt_ids) != len(self.response_ids):
            raise ValueError("prompt_ids and response_ids must have one entry per context")
        if any(len(p) == 0 for p in self.prompt_ids):
            raise ValueError("every context needs at least one prompt token")
        self.response_lens = torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.response_lens.cumsum(0)])
        self.sequence_ids = torch.repeat_interleave(torch.arange(len(self.response_ids)), self.response_lens)
        self.positions = torch.arange(self.n_tokens) - self.offsets[self.sequence_ids]

    @property
    def n_contexts(self) -> int:
        return len(self.response_ids)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def _lengths(self, rows: Sequence[int], lengths: Sequence[int] | None) -> list[int]:
        full = [len(self.response_ids[r]) for r in rows]
        if lengths is None:
            return full
        if len(lengths) != len(rows) or any(not 0 < n <= m for n, m in zip(lengths, full)):
            raise ValueError("lengths must give 1..len(response) scored tokens per row")
        return [int(n) for n in lengths]

    def token_index(self, rows: Sequence[int], lengths: Sequence[int] | None = None) -> torch.Tensor:
        """Flat bank-token indices of `rows` (their first `lengths` response tokens; default all), in row order."""
        lengths = self._lengths(rows, lengths)
        parts = [torch.arange(int(self.offsets[r]), int(self.offsets[r]) + n) for r, n in zip(rows, lengths)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def collate(self, rows: Sequence[int], lengths: Sequence[int] | None = None):
        """Right-padded input_ids, attention_mask and the mask of the logit positions that predict response tokens.

        `lengths` (default: whole responses) scores only the first lengths[i] response tokens of row i; the
        context is cut right there (causal attention: later tokens cannot change those logits). The last scored
        token is never fed in: nothing is scored after it.
        """
        lengths = self._lengths(rows, lengths)
        seqs = [self.prompt_ids[r] + self.response_ids[r][: n - 1] for r, n in zip(rows, lengths)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        pred = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (r, s, n) in enumerate(zip(rows, seqs, lengths)):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attn[i, : len(s)] = 1
            p = len(self.prompt_ids[r])
            pred[i, p - 1 : p - 1 + n] = True
        return ids, attn, pred

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "response_ids": self.response_ids, "pad_id": self.pad_id,
                "prompts": self.prompts}

    @classmethod
    def from_dict(cls, d: dict) -> "Bank":
        return cls(d["prompt_ids"], d["response_ids"], d.get("pad_id", 0), d.get("prompts", []))

    def save(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)
        return path

    @classmethod
    def load(cls, path: str) -> "Bank":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def build_bank(student, tokenizer, prompts: Sequence, max_tokens: int = 192, seed: int = 0, batch_size: int = 64,
               chat_template_kwargs: dict | None = None, progress: bool = False) -> Bank:
    """Sample one response per prompt from `student` (temperature 1, no top-k / top-p) and freeze the bank.

    Responses stop after the first EOS (kept as a bank token) or at `max_tokens`. Deterministic given the seed and
    batch_size.
    """
    from transformers import GenerationConfig

    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not prompts:
        raise ValueError("no prompts to build the bank from")
    prompt_ids = tokenize_prompts(tokenizer, prompts, chat_template_kwargs)
    eos = eos_token_ids(student, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_tokens,
                              eos_token_id=eos or None, pad_token_id=pad)
    device = _device_of(student)
    was_training = student.training
    student.eval()
    torch.manual_seed(seed)
    responses: list[list[int]] = []
    starts = range(0, len(prompt_ids), batch_size)
    for start in _tqdm(starts, desc="bank: sampling", disable=not progress) if progress else starts:
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding for generation
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        out = student.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=config)
        for row in out[:, width:].tolist():
            resp = []
            for t in row:
                resp.append(int(t))
                if t in eos:
                    break
            responses.append(resp)
    student.train(was_training)
    return Bank(prompt_ids, responses, pad_id=int(pad), prompts=list(prompts))


# ================================================================================================== logits


def _bank_hidden(model, bank: Bank, rows: Sequence[int], lengths: Sequence[int] | None = None) -> torch.Tensor:
    """Final hidden states [n_tokens, H] (after the last norm, before the head) at the positions that predict the
    response tokens of `rows` (the first `lengths` of each; default all), in bank order
    (`bank.token_index(rows, lengths)`). The head is applied by the project's chunked code, as in training."""
    ids, attn, pred = bank.collate(rows, lengths)
    device = _device_of(model)
    hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
    return hidden[pred.to(device)]


def _row_batches(rows: Sequence[int], batch_size: int) -> list[list[int]]:
    rows = list(rows)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


class TeacherStates:
    """The teacher's bank hidden states and head, cached in memory when N x H float32 fits `cache_gb`, recomputed per
    batch otherwise."""

    def __init__(self, teacher, bank: Bank, vocab: int, batch_size: int = 64, cache_gb: float = 2.0,
                 progress: bool = False):
        self.teacher, self.bank, self.vocab, self.batch_size = teacher, bank, vocab, batch_size
        self.head = head_of(teacher, vocab)
        self.cache = None
        teacher.eval()
        if bank.n_tokens * teacher.config.get_text_config().hidden_size * 4 <= cache_gb * 2**30:
            batches = _row_batches(range(bank.n_contexts), batch_size)
            parts = []
            with torch.no_grad():
                for rows in _tqdm(batches, desc="bank: teacher", disable=not progress) if progress else batches:
                    parts.append(_bank_hidden(teacher, bank, rows))
            self.cache = torch.cat(parts)

    @torch.no_grad()
    def get(self, rows: Sequence[int]) -> torch.Tensor:
        """Teacher hidden states of all response tokens of `rows`, in bank order."""
        if self.cache is not None:
            return self.cache[self.bank.token_index(rows).to(self.cache.device)]
        return _bank_hidden(self.teacher, self.bank, rows)

    @torch.no_grad()
    def get_tokens(self, rows: Sequence[int], index: torch.Tensor, lengths: Sequence[int] | None = None):
        """Teacher hidden states of the bank tokens `index` (flat indices, inside `rows`' first `lengths` tokens)."""
        if self.cache is not None:
            return self.cache[index.to(self.cache.device)]
        full = self.bank.token_index(rows, lengths)
        where = torch.full((self.bank.n_tokens,), -1, dtype=torch.long)
        where[full] = torch.arange(full.numel())
        hidden = _bank_hidden(self.teacher, self.bank, rows, lengths)
        return hidden[where[index].to(hidden.device)]


def _as_teacher(teacher, bank: Bank, vocab: int, batch_size: int) -> TeacherStates:
    return teacher if isinstance(teacher, TeacherStates) else TeacherStates(teacher, bank, vocab, batch_size)


def _vocab(student, teacher, tokenizer=None, vocab: int | None = None) -> int:
    if vocab is not None:
        return int(vocab)
    if isinstance(teacher, TeacherStates):
        return teacher.vocab
    s_rows = student.get_output_embeddings().weight.shape[0]
    t_rows = teacher.get_output_embeddings().weight.shape[0]
    if tokenizer is None:
        if s_rows != t_rows:
            raise ValueError(f"student ({s_rows}) and teacher ({t_rows}) heads differ: pass the tokenizer or vocab")
        return s_rows
    from opsd.core.models import resolve_distill_vocab

    return resolve_distill_vocab(student, teacher, tokenizer)


# ================================================================================================== scores


@torch.no_grad()
def bank_stats(student, teacher, bank: Bank, top_k: int = 16, batch_size: int = 64, vocab: int | None = None,
               names: Iterable[str] | None = None, tokenizer=None, progress: bool = False,
               desc: str = "bank: scoring") -> dict[str, torch.Tensor]:
    """`tip_ext.stats.token_stats_from_hidden` of every bank token (float32 [N], bank order, on the CPU): the
    statistics pass of training, through the same chunked head projection."""
    vocab = _vocab(student, teacher, tokenizer, vocab)
    teacher = _as_teacher(teacher, bank, vocab, batch_size)
    s_head = head_of(student, vocab)
    was_training = student.training
    student.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    batches = _row_batches(range(bank.n_contexts), batch_size)
    for rows in _tqdm(batches, desc=desc, disable=not progress, leave=False) if progress else batches:
        hs = _bank_hidden(student, bank, rows)
        ht = teacher.get(rows).to(hs.device)
        for k, v in token_stats_from_hidden(hs, s_head, ht, teacher.head, top_k=top_k, names=names).items():
            parts.setdefault(k, []).append(v.cpu())
    student.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


def derived_scores(stats: dict[str, torch.Tensor], sequence_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rule scores of `DERIVED_SCORES` over the whole bank as one batch (tip_ext.selectors' definitions)."""
    base = {k: v for k, v in stats.items() if k in STAT_NAMES}
    return {name: select(rule, base, 1.0, sequence_ids=sequence_ids, **opts).score.float()
            for name, (rule, opts) in DERIVED_SCORES.items()}


def score_bank(student, teacher, bank: Bank, top_k: int = 16, batch_size: int = 64, vocab: int | None = None,
               tokenizer=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """All `token_stats` statistics plus the derived rule scores (`DERIVED_SCORES`) of every bank token."""
    stats = bank_stats(student, teacher, bank, top_k, batch_size, vocab, tokenizer=tokenizer, progress=progress)
    stats.update(derived_scores(stats, bank.sequence_ids))
    return stats


# ================================================================================================== selection


def budget_k(ratio: float, n: int) -> int:
    """TA-OPD's budget: ceil(ratio * n) tokens, at least 1, at most n."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {ratio}")
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


def resolve_selector(name: str, equal_budget: bool = True) -> tuple[str, dict, dict]:
    """(tip_ext rule, options, stat remap) of a diagnostic selector name or a plain tip_ext rule name."""
    if name in DIAGNOSTIC_SELECTORS:
        rule, opts, remap = DIAGNOSTIC_SELECTORS[name]
    elif name in RULES:
        rule, opts, remap = name, {}, {}
    else:
        raise ValueError(f"unknown selector {name!r}; diagnostic selectors: {sorted(DIAGNOSTIC_SELECTORS)}, "
                         f"tip_ext rules: {sorted(RULES)}")
    opts = dict(opts)
    if equal_budget:
        accepted = rule_options(rule)
        if "per_sequence" in accepted:
            opts["per_sequence"] = False
        if "ensure_each_sequence" in accepted:
            opts["ensure_each_sequence"] = False
    return rule, opts, dict(remap)


def _seed_of(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def select_on_bank(name: str, stats: dict[str, torch.Tensor], bank: Bank, budget: float, seed: int = 0,
                   equal_budget: bool = True):
    """(TokenChoice, target k) of selector `name` at `budget` over the bank tokens."""
    rule, opts, remap = resolve_selector(name, equal_budget)
    base = {k: v for k, v in stats.items() if k in STAT_NAMES}
    for target, source in remap.items():
        base[target] = stats[source]
    n = bank.n_tokens
    k = budget_k(budget, n)
    ratio = k / n if equal_budget else budget
    generator = torch.Generator().manual_seed(_seed_of(seed, name, budget))
    sel = select(rule, base, ratio, sequence_ids=bank.sequence_ids, generator=generator, **opts)
    return sel, k


# ================================================================================================== update


def train_on_bank(student, teacher, bank: Bank, keep: torch.Tensor, steps: int = 20, lr: float = 3e-4,
                  weight_decay: float = 0.0, max_grad_norm: float | None = None, batch_size: int = 64,
                  vocab: int | None = None, weights: torch.Tensor | None = None, tokenizer=None,
                  progress: bool = False, desc: str = "update"):
    """A trained copy of `student`: `steps` AdamW steps of mean reverse KL over the kept bank tokens.

    Each step uses the whole kept set (gradients accumulated over micro-batches of `batch_size` contexts). `weights`
    (float [N]) turns the mean into a weighted mean over the kept tokens. Returns (model, losses per step).
    """
    vocab = _vocab(student, teacher, tokenizer, vocab)
    teacher = _as_teacher(teacher, bank, vocab, batch_size)
    keep = keep.bool().cpu()
    if keep.numel() != bank.n_tokens:
        raise ValueError(f"keep has {keep.numel()} entries, the bank {bank.n_tokens} tokens")
    model = copy.deepcopy(student)
    model.eval()  # no dropout: a deterministic update
    w = keep.double() if weights is None else torch.where(keep, weights.double().cpu(), 0.0)
    total = float(w.sum())
    rows = torch.unique(bank.sequence_ids[keep]).tolist()
    # each context is run only up to its last kept token (causal: later tokens do not change earlier logits)
    last = torch.zeros(bank.n_contexts, dtype=torch.long).scatter_reduce(
        0, bank.sequence_ids[keep], bank.positions[keep] + 1, reduce="amax")
    losses: list[float] = []
    if total <= 0 or steps <= 0 or not rows:
        return model, losses
    params = [p for p in model.parameters() if p.requires_grad]
    s_head = head_of(model, vocab)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    batches = [(chunk, last[chunk].tolist()) for chunk in _row_batches(rows, batch_size)]
    rng = range(steps)
    for _ in _tqdm(rng, desc=desc, disable=not progress, leave=False) if progress else rng:
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for chunk, lengths in batches:
            idx = bank.token_index(chunk, lengths)
            wk = w[idx]
            sel = wk > 0
            hs = _bank_hidden(model, bank, chunk, lengths)
            sel_d = sel.to(hs.device)
            ht = teacher.get_tokens(chunk, idx[sel], lengths).to(hs.device)
            # the trainer's loss step: reverse KL (beta = 1) through the chunked head projection
            kl, _ = per_token_divergence(hs[sel_d], s_head, ht, teacher.head, beta=1.0)
            loss = (kl * wk[sel].to(kl.device, kl.dtype)).sum() / total
            loss.backward()
            step_loss += float(loss.detach())
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        losses.append(step_loss)
    opt.zero_grad(set_to_none=True)
    return model, losses


# ================================================================================================== statistics


def winsorize(x: np.ndarray, low: float = WINSOR[0], high: float = WINSOR[1]) -> np.ndarray:
    lo, hi = np.quantile(x, low), np.quantile(x, high)
    return np.clip(x, lo, hi)


def relative_gain(gain: np.ndarray, kl_before: np.ndarray) -> np.ndarray:
    return winsorize(gain / np.maximum(kl_before, REL_EPS))


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    inv = np.empty_like(order)
    inv[order] = np.arange(x.size)
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    dense = np.cumsum(new)[inv]
    bounds = np.r_[np.nonzero(new)[0], x.size]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum() / den) if den > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rankdata(x), rankdata(y))


def standardized_ols(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients of z(y) on the z-scored columns of X (with intercept), and R^2. Constant columns give NaN."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    sx, sy = X.std(0), y.std()
    ok = sx > 0
    beta = np.full(X.shape[1], np.nan)
    if sy == 0 or not ok.any():
        return beta, float("nan")
    Z = (X[:, ok] - X[:, ok].mean(0)) / sx[ok]
    zy = (y - y.mean()) / sy
    A = np.c_[Z, np.ones(len(zy))]
    coef, *_ = np.linalg.lstsq(A, zy, rcond=None)
    beta[ok] = coef[:-1]
    resid = zy - A @ coef
    return beta, float(1.0 - (resid @ resid) / (zy @ zy))


def _ci(samples: np.ndarray) -> tuple[float, float]:
    samples = np.asarray(samples, np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def _interval(point: float, samples: np.ndarray) -> dict:
    lo, hi = _ci(samples)
    return {"mean": float(point), "lo": lo, "hi": hi}


def bootstrap_ratio(values: np.ndarray, mask: np.ndarray, seq: np.ndarray, n_ctx: int,
                    resamples: np.ndarray) -> dict:
    """Token-weighted mean of `values` over `mask` with a context-bootstrap 95% interval (resamples [R, n_ctx])."""
    num = np.bincount(seq, weights=np.where(mask, values, 0.0), minlength=n_ctx)
    den = np.bincount(seq, weights=mask.astype(np.float64), minlength=n_ctx)
    point = num.sum() / den.sum() if den.sum() > 0 else float("nan")
    if resamples.size == 0:
        return {"mean": float(point), "lo": float("nan"), "hi": float("nan")}
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = num[resamples].sum(1) / den[resamples].sum(1)
    return _interval(point, boot)


def context_resamples(n_ctx: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_ctx, size=(n_boot, n_ctx))


def _resample_tokens(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    lens = offsets[rows + 1] - offsets[rows]
    starts = np.repeat(offsets[rows], lens)
    within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    return starts + within


def predictiveness(scores: dict[str, np.ndarray], targets: dict[str, np.ndarray], offsets: np.ndarray,
                   resamples: np.ndarray) -> dict:
    """Pearson / Spearman of every score with every target gain, and the standardized regressions, with
    context-bootstrap intervals."""
    names = [s for s in SCORES if s in scores]
    out: dict = {"correlations": {}, "regressions": {}}
    point = {}
    for t, y in targets.items():
        for s in names:
            point[(t, s)] = (pearson(scores[s], y), spearman(scores[s], y))
    reg_point = {}
    for t, y in targets.items():
        for rname, cols in REGRESSIONS.items():
            reg_point[(t, rname)] = standardized_ols(np.c_[tuple(scores[c] for c in cols)], y)
    boot_corr = {key: ([], []) for key in point}
    boot_reg = {key: ([], []) for key in reg_point}
    for rows in resamples:
        idx = _resample_tokens(offsets, rows)
        ranks = {s: rankdata(scores[s][idx]) for s in names}
        for t, y in targets.items():
            yb = y[idx]
            yr = rankdata(yb)
            for s in names:
                boot_corr[(t, s)][0].append(pearson(scores[s][idx], yb))
                boot_corr[(t, s)][1].append(pearson(ranks[s], yr))
            for rname, cols in REGRESSIONS.items():
                beta, _ = standardized_ols(np.c_[tuple(scores[c][idx] for c in cols)], yb)
                boot_reg[(t, rname)][0].append(beta)
                boot_reg[(t, rname)][1].append(beta[0] / beta[1] if beta[1] != 0 else np.nan)
    for (t, s), (p, r) in point.items():
        out["correlations"].setdefault(t, {})[s] = {
            "label": SCORES[s],
            "pearson": _interval(p, np.array(boot_corr[(t, s)][0])),
            "spearman": _interval(r, np.array(boot_corr[(t, s)][1])),
        }
    for (t, rname), (beta, r2) in reg_point.items():
        cols = REGRESSIONS[rname]
        betas = np.array(boot_reg[(t, rname)][0]).reshape(-1, len(cols))
        ratio = beta[0] / beta[1] if beta[1] != 0 else float("nan")
        out["regressions"].setdefault(t, {})[rname] = {
            "coefficients": {c: _interval(beta[i], betas[:, i]) for i, c in enumerate(cols)},
            "learnable_over_incompatible": _interval(ratio, np.array(boot_reg[(t, rname)][1])),
            "r2": r2,
        }
    return out


# ================================================================================================== run


def _run_key(name: str, budget: float) -> str:
    return f"{name}@{budget:g}"


def run_diagnostic(student, teacher, tokenizer, prompts: Sequence | None = None, *, bank: Bank | None = None,
                   contexts: int | None = 300, max_tokens: int = 192, budgets: Sequence[float] = DEFAULT_BUDGETS,
                   selectors: Sequence[str] = DEFAULT_SELECTORS, reference: str = "all", steps: int = 20,
                   lr: float = 3e-4, weight_decay: float = 0.0, max_grad_norm: float | None = None,
                   seed: int = 0, top_k: int = 16, batch_size: int = 64, bootstrap: int = 1000,
                   predict_bootstrap: int = 200, equal_budget: bool = True, teacher_cache_gb: float = 2.0,
                   chat_template_kwargs: dict | None = None, output_dir: str | None = None,
                   save_tokens: bool = True, keep_models: bool = False, progress: bool = True,
                   meta: dict | None = None) -> dict:
    """The whole diagnostic (module docstring). Returns the JSON report as a dict, plus non-JSON entries
    `_bank` (Bank), `_scores` ({name: tensor [N]}), `_runs` ({run key: {keep, kl_after, reverse_kl_after, gain,
    rel_gain}}) and, with keep_models, `_models` ({run key: updated student}). Writes the report files when
    `output_dir` is given (`write_report`)."""
    t_start = time.perf_counter()
    if reference not in ("all",) and reference not in DIAGNOSTIC_SELECTORS and reference not in RULES:
        raise ValueError(f"unknown reference rule {reference!r}")
    budgets = [float(b) for b in budgets]
    for b in budgets:
        budget_k(b, 1)  # validates the range
    for name in selectors:
        resolve_selector(name)
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    if bank is None:
        if not prompts:
            raise ValueError("pass prompts or a bank")
        prompts = list(prompts)[: contexts] if contexts else list(prompts)
        bank = build_bank(student, tokenizer, prompts, max_tokens, seed, batch_size, chat_template_kwargs, progress)
    timing["bank_seconds"] = time.perf_counter() - t0
    n, n_ctx = bank.n_tokens, bank.n_contexts
    if n == 0:
        raise ValueError("the bank holds no response tokens")

    t0 = time.perf_counter()
    vocab = _vocab(student, teacher, tokenizer)
    teacher_src = TeacherStates(teacher, bank, vocab, batch_size, teacher_cache_gb, progress)
    scores = score_bank(student, teacher_src, bank, top_k, batch_size, vocab, progress=progress)
    timing["score_seconds"] = time.perf_counter() - t0
    kl_before = scores["forward_kl"].double().numpy()
    seq = bank.sequence_ids.numpy()
    offsets = bank.offsets.numpy()

    plan: list[tuple[str, float]] = [(reference, 1.0)] + [(s, b) for s in selectors for b in budgets]
    resamples = context_resamples(n_ctx, bootstrap, seed)
    runs_arrays: dict[str, dict] = {}
    models: dict = {}
    runs: list[dict] = []
    t0 = time.perf_counter()
    bar = _tqdm(plan, desc="updates", disable=not progress) if progress else plan
    for name, budget in bar:
        key = "reference" if (name, budget) == (reference, 1.0) and not runs else _run_key(name, budget)
        if progress:
            bar.set_postfix_str(key)
        t_run = time.perf_counter()
        if name == "all":
            keep, weights, k = torch.ones(n, dtype=torch.bool), None, n
        else:
            sel, k = select_on_bank(name, scores, bank, budget, seed, equal_budget)
            keep, weights = sel.keep.cpu(), (sel.weights.cpu() if sel.weights is not None else None)
        model, losses = train_on_bank(student, teacher_src, bank, keep, steps, lr, weight_decay, max_grad_norm,
                                      batch_size, vocab, weights)
        after = bank_stats(model, teacher_src, bank, top_k, batch_size, vocab, names=("forward_kl", "reverse_kl"))
        gain = kl_before - after["forward_kl"].double().numpy()
        rel = relative_gain(gain, kl_before)
        keep_np = keep.numpy()
        arrays = {"keep": keep, "kl_after": after["forward_kl"], "reverse_kl_after": after["reverse_kl"],
                  "gain": gain, "rel_gain": rel}
        runs_arrays[key] = arrays
        if keep_models:
            models[key] = model
        else:
            del model
        rev_drop = scores["reverse_kl"].double().numpy() - after["reverse_kl"].double().numpy()
        runs.append({
            "key": key, "selector": name, "budget": budget, "target_k": int(k), "kept": int(keep_np.sum()),
            "kept_fraction": float(keep_np.mean()),
            "kept_gain": bootstrap_ratio(gain, keep_np, seq, n_ctx, resamples),
            "all_gain": bootstrap_ratio(gain, np.ones(n, bool), seq, n_ctx, resamples),
            "dropped_gain": bootstrap_ratio(gain, ~keep_np, seq, n_ctx, resamples),
            "kept_rel_gain": bootstrap_ratio(rel, keep_np, seq, n_ctx, resamples),
            "all_rel_gain": bootstrap_ratio(rel, np.ones(n, bool), seq, n_ctx, resamples),
            "kept_kl_before": float(kl_before[keep_np].mean()) if keep_np.any() else float("nan"),
            "all_reverse_kl_drop": float(rev_drop.mean()),
            "kept_reverse_kl_drop": float(rev_drop[keep_np].mean()) if keep_np.any() else float("nan"),
            "losses": losses,
            "seconds": time.perf_counter() - t_run,
        })
    timing["update_seconds"] = time.perf_counter() - t0

    # kept tokens' gain under the common reference update
    ref_gain, ref_rel = runs_arrays["reference"]["gain"], runs_arrays["reference"]["rel_gain"]
    for r in runs:
        keep_np = runs_arrays[r["key"]]["keep"].numpy()
        r["kept_gain_under_reference"] = bootstrap_ratio(ref_gain, keep_np, seq, n_ctx, resamples)

    t0 = time.perf_counter()
    score_np = {s: scores[s].double().numpy() for s in SCORES if s in scores}
    pred = predictiveness(score_np, {"gain": ref_gain, "rel_gain": ref_rel}, offsets,
                          resamples[:predict_bootstrap] if predict_bootstrap else resamples[:0])
    timing["predictiveness_seconds"] = time.perf_counter() - t0
    timing["total_seconds"] = time.perf_counter() - t_start

    rl = bank.response_lens.double()
    report = {
        "config": {
            "contexts": n_ctx, "max_tokens": max_tokens, "budgets": budgets, "selectors": list(selectors),
            "reference": reference, "steps": steps, "lr": lr, "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm, "seed": seed, "top_k": top_k, "batch_size": batch_size,
            "bootstrap": bootstrap, "predict_bootstrap": min(predict_bootstrap, bootstrap),
            "equal_budget": equal_budget, "vocab": vocab, **(meta or {}),
        },
        "bank": {
            "contexts": n_ctx, "tokens": n, "mean_response_tokens": float(rl.mean()),
            "max_response_tokens": int(rl.max()),
            "mean_forward_kl": float(kl_before.mean()), "mean_reverse_kl": float(scores["reverse_kl"].mean()),
            "mean_entropy": float(scores["entropy"].mean()), "mean_support_mass": float(scores["support_mass"].mean()),
            "mean_local_forward_kl": float(scores["local_forward_kl"].mean()),
        },
        "predictiveness": pred,
        "runs": runs,
        "timing": timing,
    }
    if output_dir:
        write_report(report, output_dir, bank=bank, scores=scores, runs_arrays=runs_arrays, save_tokens=save_tokens)
    out = dict(report)
    out["_bank"], out["_scores"], out["_runs"] = bank, scores, runs_arrays
    if keep_models:
        out["_models"] = models
    return out


# ================================================================================================== report


def _num(x) -> float:
    return float("nan") if x is None else float(x)  # a report read back from JSON holds null for NaN


def _f(x, digits: int = 4) -> str:
    x = _num(x)
    return f"{x:.{digits}g}" if math.isfinite(x) else "nan"


def _fi(d: dict, digits: int = 3) -> str:
    if not math.isfinite(_num(d.get("lo"))):
        return _f(d["mean"], digits)
    return f"{_f(d['mean'], digits)} [{_f(d['lo'], digits)}, {_f(d['hi'], digits)}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    """The report as markdown tables (also works on a report read back from diagnostic.json)."""
    cfg, bank = report["config"], report["bank"]
    parts = ["# Fixed-context diagnostic", ""]
    parts.append(
        f"Bank: {bank['contexts']} contexts, {bank['tokens']} response tokens "
        f"(mean {bank['mean_response_tokens']:.1f}, "
        f"max {bank['max_response_tokens']}); mean forward KL {_f(bank['mean_forward_kl'])}, reverse KL "
        f"{_f(bank['mean_reverse_kl'])}, entropy {_f(bank['mean_entropy'])}, support mass C "
        f"{_f(bank['mean_support_mass'])}, local disagreement D {_f(bank['mean_local_forward_kl'])}. "
        f"Updates: {cfg['steps']} AdamW steps, lr {cfg['lr']:g}, on the fixed bank; top_k {cfg['top_k']}; "
        + ("equal budgets (exactly ceil(rho*N) tokens, bank-wide ranking). " if cfg["equal_budget"]
           else "native rule scopes. ")
        + f"Intervals: 95% bootstrap over contexts ({cfg['bootstrap']} resamples; {cfg['predict_bootstrap']} for "
        "predictiveness). Gain G = forward KL before - after; relative gain G/KL_before winsorized at 1%/99%."
    )
    ref = cfg["reference"]
    parts += ["", f"## Predictiveness: scores vs gain under the reference update ({ref!r}, all tokens)", ""]
    corr = report["predictiveness"]["correlations"]
    rows = []
    for s, d in corr["gain"].items():
        r = corr["rel_gain"][s]
        rows.append([d["label"], _fi(d["pearson"]), _fi(d["spearman"]), _fi(r["pearson"]), _fi(r["spearman"])])
    parts.append(_table(["score", "Pearson G", "Spearman G", "Pearson rel. G", "Spearman rel. G"], rows))
    parts += ["", "Standardized regression coefficients (z-scored gain on z-scored scores, jointly):", ""]
    rows = []
    for target, regs in report["predictiveness"]["regressions"].items():
        for rname, d in regs.items():
            coefs = "; ".join(f"{c} {_fi(v)}" for c, v in d["coefficients"].items())
            rows.append([target, rname, coefs, _fi(d["learnable_over_incompatible"]), _f(d["r2"], 3)])
    parts.append(_table(["target", "predictors", "coefficients", "learnable / incompatible", "R^2"], rows))
    parts += ["", "## Selector x budget: gains under each selector's own update", ""]
    rows = []
    for r in report["runs"]:
        rows.append([r["selector"], f"{r['budget']:g}", str(r["kept"]), _fi(r["kept_gain"]), _fi(r["all_gain"]),
                     _fi(r["dropped_gain"]), _fi(r["kept_rel_gain"]), _fi(r["kept_gain_under_reference"]),
                     _f(r["kept_kl_before"], 3)])
    parts.append(_table(["selector", "budget", "kept", "kept-token G", "all-token G (spillover)", "dropped-token G",
                         "kept rel. G", "kept G under reference", "kept KL before"], rows))
    t = report["timing"]
    parts += ["", f"Time: {t['total_seconds']:.1f} s (bank {t['bank_seconds']:.1f}, scoring {t['score_seconds']:.1f}, "
              f"updates {t['update_seconds']:.1f}, predictiveness {t['predictiveness_seconds']:.1f}).", ""]
    return "\n".join(parts)


def plot_gains(report: dict, path: str) -> str:
    """PNG of mean gain vs budget per selector (kept tokens, all tokens, kept relative gain); also works on a
    report read back from diagnostic.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), dpi=110)
    by_sel: dict[str, list[dict]] = {}
    ref = None
    for r in report["runs"]:
        if r["key"] == "reference":
            ref = r
            continue
        by_sel.setdefault(r["selector"], []).append(r)
    panels = ((axes[0], "kept_gain", "kept tokens, own update", "mean gain G = KL_before - KL_after (forward KL)"),
              (axes[1], "all_gain", "all tokens (spillover), own update", "mean gain G (forward KL)"),
              (axes[2], "kept_rel_gain", "kept tokens, relative gain", "mean G / KL_before (winsorized 1%/99%)"))
    for ax, field_, title, ylabel in panels:
        for name, rs in by_sel.items():
            rs = sorted(rs, key=lambda r: r["budget"])
            x = [100 * r["budget"] for r in rs]
            y, lo, hi = (np.array([_num(r[field_][part]) for r in rs]) for part in ("mean", "lo", "hi"))
            yerr = np.vstack([y - lo, hi - y]) if np.isfinite(lo).all() else None
            ax.errorbar(x, y, yerr=yerr, marker="o", ms=4, capsize=2, label=name)
        if ref is not None:
            ax.axhline(_num(ref[field_]["mean"]), color="0.4", ls="--", lw=1, label=f"{ref['selector']} (all tokens)")
        ax.set_xlabel("budget (% of bank tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_report(report: dict, output_dir: str, bank: Bank | None = None, scores: dict | None = None,
                 runs_arrays: dict | None = None, save_tokens: bool = True) -> dict[str, str]:
    """diagnostic.json, diagnostic.md, gain_vs_budget.png and (save_tokens) tokens.csv under `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, "diagnostic.json"), "markdown": os.path.join(output_dir, "diagnostic.md"),
             "plot": os.path.join(output_dir, "gain_vs_budget.png")}
    report = {k: v for k, v in report.items() if not k.startswith("_")}
    with open(paths["json"], "w") as f:
        json.dump(_jsonable(report), f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(markdown_report(report))
    plot_gains(report, paths["plot"])
    if save_tokens and bank is not None and scores is not None:
        import pandas as pd

        cols = {"context": bank.sequence_ids.numpy(), "position": bank.positions.numpy(),
                "token_id": np.array([t for r in bank.response_ids for t in r], dtype=np.int64)}
        cols.update({k: v.double().numpy() for k, v in scores.items()})
        for key, arr in (runs_arrays or {}).items():
            cols[f"kept:{key}"] = arr["keep"].numpy().astype(np.int8)
            cols[f"gain:{key}"] = arr["gain"]
        paths["tokens"] = os.path.join(output_dir, "tokens.csv")
        pd.DataFrame(cols).to_csv(paths["tokens"], index=False, float_format="%.6g")
    return paths


# ================================================================================================== CLI


def _load_prompts(path: str, column: str, limit: int | None) -> list:
    from opsd.data import load_prompt_dataset

    return list(load_prompt_dataset(path, prompt_column=column, limit=limit)["prompt"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lab.diagnose",
        description="Fixed-context diagnostic (TA-OPD): which tokens does a short OPD update on a frozen bank of "
                    "student prefixes teach, and which selection scores predict it. Without --teacher/--student it "
                    "runs on the CPU lab models (trained once and cached). Paper values: 300 contexts x 192 "
                    "response tokens, budgets 3/5/10%; the lab defaults are sized to finish in about 2 minutes "
                    "on 2 CPU cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", help="teacher model directory (save_pretrained); with --student")
    p.add_argument("--student", help="student model directory (save_pretrained); with --teacher")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the student's)")
    p.add_argument("--prompts", help="prompt file (.jsonl/.json/.parquet) with a prompt column; default: the lab's "
                                     "eval prompts (required with --teacher/--student)")
    p.add_argument("--prompt_column", default="prompt")
    p.add_argument("--output_dir", default="outputs/diagnose")
    p.add_argument("--contexts", type=int, default=300, help="prompts in the bank (paper: 300)")
    p.add_argument("--max_tokens", type=int, default=192, help="response tokens per context at most (paper: 192)")
    p.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
                   help="retention ratios (paper: 0.03 0.05 0.10)")
    p.add_argument("--selectors", nargs="+", default=list(DEFAULT_SELECTORS),
                   help=f"diagnostic selectors {sorted(DIAGNOSTIC_SELECTORS)} or any tip_ext rule {sorted(RULES)}")
    p.add_argument("--reference", default="all", help="rule of the common update for predictiveness (1.0 budget)")
    p.add_argument("--steps", type=int, default=20,
                   help="OPD updates per selector x budget (the paper: a short run; its length is not in docs/METHODS.md)")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="AdamW learning rate; the default suits the lab's tiny models (loss falls steadily over 20 "
                        "steps; 1e-3 already overshoots). Billion-parameter models: ~1e-6 (the papers' OPD lr)")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=0.0, help="0: no clipping")
    p.add_argument("--batch_size", type=int, default=64, help="contexts per forward pass (generation and updates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top_k", type=int, default=16, help="K of the support mass / local disagreement (paper: 16)")
    p.add_argument("--bootstrap", type=int, default=1000, help="context resamples for the gain intervals")
    p.add_argument("--predict_bootstrap", type=int, default=200,
                   help="context resamples for the correlation / regression intervals (0: none)")
    p.add_argument("--native_scope", action="store_true",
                   help="use each rule's own scope and rounding instead of exactly ceil(rho*N) bank-wide")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: leave as is). The lab's tiny tensors gain little from a second thread "
                        "(1.4x on idle cores) and lose 3-4x when the cores are shared")
    p.add_argument("--teacher_cache_gb", type=float, default=2.0)
    p.add_argument("--lab_cache", default=".cache/lab", help="cache directory of the lab models")
    p.add_argument("--lab_task", default="addition", help="lab task whose models to use without --teacher/--student "
                   "(a registered task: addition, reverse_sum, or one of a --task_module)")
    p.add_argument("--task_module", action="append", default=[],
                   help="module that registers lab tasks (lab.tasks.register_task) at import (repeatable)")
    p.add_argument("--save_bank", action="store_true", help="also write the bank as bank.json")
    p.add_argument("--no_tokens_csv", action="store_true", help="do not write the per-token tokens.csv")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.teacher) != bool(args.student):
        raise SystemExit("pass both --teacher and --student, or neither (the lab)")
    from opsd.core.models import load_causal_lm, load_tokenizer

    progress = not args.no_progress
    meta: dict = {}
    if args.teacher:
        teacher_dir, student_dir = args.teacher, args.student
        tokenizer_dir = args.tokenizer or args.student
        if not args.prompts:
            raise SystemExit("--prompts FILE is required with --teacher/--student")
        prompt_file = args.prompts
        meta["models"] = {"teacher": teacher_dir, "student": student_dir}
    else:
        from lab.models import prepare_lab_models
        from lab.tasks import import_task_modules, task_entry

        try:
            import_task_modules(args.task_module)
            task_entry(args.lab_task)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        lab = prepare_lab_models(args.lab_cache, args.lab_task, progress=progress)
        paths = lab["paths"]
        teacher_dir, student_dir = paths["teacher"], paths["student"]
        tokenizer_dir = args.tokenizer or paths["tokenizer"]
        prompt_file = args.prompts or paths["eval_prompts"]
        meta["models"] = {"lab": paths["dir"], "lab_key": lab.get("key")}
    meta["prompts"] = prompt_file
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(tokenizer_dir)
    student = load_causal_lm(student_dir, dtype=args.dtype, what="Student").to(device)
    teacher = load_causal_lm(teacher_dir, dtype=args.dtype, what="Teacher").to(device)
    for p_ in teacher.parameters():
        p_.requires_grad_(False)
    prompts = _load_prompts(prompt_file, args.prompt_column, args.contexts)
    result = run_diagnostic(
        student, teacher, tokenizer, prompts, contexts=args.contexts, max_tokens=args.max_tokens,
        budgets=args.budgets, selectors=args.selectors, reference=args.reference, steps=args.steps, lr=args.lr,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, seed=args.seed, top_k=args.top_k,
        batch_size=args.batch_size, bootstrap=args.bootstrap, predict_bootstrap=args.predict_bootstrap,
        equal_budget=not args.native_scope, teacher_cache_gb=args.teacher_cache_gb, output_dir=args.output_dir,
        save_tokens=not args.no_tokens_csv, progress=progress, meta=meta,
    )
    if args.save_bank:
        result["_bank"].save(os.path.join(args.output_dir, "bank.json"))
    print(markdown_report(result))
    print(f"Wrote {args.output_dir}/diagnostic.json, diagnostic.md, gain_vs_budget.png"
          + ("" if args.no_tokens_csv else ", tokens.csv"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
