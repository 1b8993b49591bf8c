"""A synthetic task for the CPU distillation lab: column addition with a scratchpad and a correction token.

Format (character level, one token per character)
-------------------------------------------------
prompt      ``"473+859="``   two operands of ``min_digits..max_digits`` significant digits, by default
            zero-padded to ``max_digits`` (``"047+009="``; `TaskConfig.pad_operands`)
completion  ``"21,31,31:1332"`` then EOS       (``"047+009="`` -> ``"61,50,00:0056"``)

The scratchpad walks the ``n`` columns from the least significant one. Column ``k`` is written as two
characters, the sum digit ``s_k = (a_k + b_k + c_{k-1}) % 10`` followed by the carry ``c_k`` (``0`` or
``1``); columns are separated by ``","``. A shorter operand contributes ``0`` to its missing columns. After the
last column comes ``":"`` and the final answer `answer`: ``a + b`` with exactly ``n + 1`` digits, i.e. the
final carry then the column digits from the most significant (``"1332"``, ``"0056"``), then EOS. With the
default 2-3 digit operands every sequence is 8 prompt + 13 completion tokens + EOS.

Every column depends on the previous column's carry, so one wrong token early in the scratchpad makes the rest
of it (and the answer) wrong unless it is repaired.

The correction token ``"<"`` deletes the previous token (`apply_corrections`). The teacher's training data
(`teacher_training_example`) contains injected wrong tokens, each followed immediately by ``"<"`` and the right
token; the injected wrong tokens carry no loss, the ``"<"`` after them does. A teacher trained on it therefore
puts high mass on ``"<"`` right after a mistake: the position where a student that never learned ``"<"`` is
confident about continuing while the teacher strongly disagrees (low student entropy, high divergence: the
docs/METHODS.md "Q3" quadrant). `error_positions` marks exactly those positions in a completion.

Train/eval split: a prompt belongs to the eval split when a stable hash of its text falls in the first
``eval_fraction`` of the hash range (`prompt_split`); the teacher and student warm starts and the distillation
prompts draw from the train split only, so evaluation prompts are never trained on.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

DIGITS = "0123456789"
PLUS = "+"
EQUALS = "="
COLUMN_SEP = ","
ANSWER_SEP = ":"
CORRECTION = "<"

PAD_TOKEN = "[PAD]"
EOS_TOKEN = "[EOS]"
UNK_TOKEN = "[UNK]"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARACTERS = DIGITS + PLUS + EQUALS + COLUMN_SEP + ANSWER_SEP + CORRECTION

# Fixed vocabulary: specials first, then characters. Ids never depend on the configuration, so a tokenizer
# saved by one run and the id<->char tables below always agree.
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
PAD_ID = VOCAB[PAD_TOKEN]
EOS_ID = VOCAB[EOS_TOKEN]
UNK_ID = VOCAB[UNK_TOKEN]
CORRECTION_ID = VOCAB[CORRECTION]
ID_TO_TOKEN: dict[int, str] = {i: t for t, i in VOCAB.items()}

# In text form, EOS inside a completion is written as this single sentinel character (never a vocabulary
# character) by the helpers that need to reason about "stop here" as a token (`_completion_tokens`).
_EOS_CHAR = "\x00"


@dataclass
class TaskConfig:
    """Settings of the addition task.

    min_digits, max_digits: each operand's digit count is drawn uniformly from this range (independently per
        operand), then its value uniformly among numbers with that many digits (1-digit operands include 0).
    pad_operands: write both operands zero-padded to ``max_digits`` (``"047+859="``). Every prompt and every
        canonical completion then has the same layout, so each column sits at a fixed distance from the token
        that needs it: a 2-layer model learns the task several times faster. False gives natural operands
        (``"47+859="``), a harder variant.
    corrections: whether the teacher's training data contains injected errors followed by ``"<"``.
    error_rate: per-position probability of injecting a wrong token into the teacher's training completion
        (checked independently at every completion position, EOS included); 0 disables injection.
    student_error_rate: the same for the student's warm start. Default 0: the student is warmed up on clean
        solutions only and never sees ``"<"``, so learning to repair its own mistakes is left to distillation.
    eval_fraction: share of the prompt space reserved for evaluation (`prompt_split`).
    seed: default seed for anything random that is not given its own seed.
    """

    min_digits: int = 2
    max_digits: int = 3
    pad_operands: bool = True
    corrections: bool = True
    error_rate: float = 0.06
    student_error_rate: float = 0.0
    eval_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if self.max_digits > 6:
            raise ValueError("max_digits > 6 makes sequences longer than the lab's tiny models are sized for")
        for name in ("error_rate", "student_error_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(save_dir: str | os.PathLike | None = None):
    """Character-level tokenizer: one token per character, no special tokens added by the default call.

    ``tokenizer(prompt)["input_ids"]`` is exactly the ids of the prompt's characters (no BOS, no EOS); decoding
    concatenates characters without spaces, so ``decode(encode(s)) == s`` for strings over `CHARACTERS`.
    Special tokens: ``[PAD]`` (pad), ``[EOS]`` (eos, end of every completion), ``[UNK]`` (any character outside
    the vocabulary). Padding side is left (prompts of different lengths line up at the generation point).
    Saved with ``save_pretrained`` when ``save_dir`` is given; ``AutoTokenizer.from_pretrained(save_dir)`` loads it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def encode_chars(text: str) -> list[int]:
    """Ids of ``text``'s characters (same as the tokenizer's default call, without building one)."""
    return [VOCAB.get(ch, UNK_ID) for ch in text]


def decode_ids(ids: Iterable[int], stop_at_eos: bool = True) -> str:
    """Characters of ``ids``; pad ids are skipped, EOS ends the text when ``stop_at_eos``."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS_ID and stop_at_eos:
            break
        if i in (PAD_ID, EOS_ID):
            continue
        out.append(ID_TO_TOKEN.get(i, UNK_TOKEN))
    return "".join(out)


# ------------------------------------------------------------------------------------------------- prompts
def _operand_strings(prompt: str) -> tuple[str, str]:
    body = prompt.strip()
    if not body.endswith(EQUALS) or body.count(PLUS) != 1:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    a, b = body[:-1].split(PLUS)
    if not (a and b and set(a + b) <= set(DIGITS)):
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return a, b


def parse_prompt(prompt: str) -> tuple[int, int]:
    """``"473+859="`` -> ``(473, 859)`` (``"047+..."`` -> 47); raises ValueError on anything else."""
    a, b = _operand_strings(prompt)
    return int(a), int(b)


def format_prompt(a: int, b: int, width: int = 0) -> str:
    """``(47, 859)`` -> ``"47+859="``; with ``width`` 3 -> ``"047+859="``."""
    return f"{a:0{width}d}{PLUS}{b:0{width}d}{EQUALS}" if width else f"{a}{PLUS}{b}{EQUALS}"


def prompt_split(prompt: str, eval_fraction: float = 0.1) -> str:
    """``"eval"`` for a stable ``eval_fraction`` share of all prompts (by CRC32 of the text), else ``"train"``."""
    return "eval" if zlib.crc32(prompt.encode()) < eval_fraction * 2**32 else "train"


def _random_operand(rng: random.Random, cfg: TaskConfig) -> int:
    n = rng.randint(cfg.min_digits, cfg.max_digits)
    lo = 0 if n == 1 else 10 ** (n - 1)
    return rng.randint(lo, 10**n - 1)


def sample_prompt(rng: random.Random, cfg: TaskConfig, split: str | None = "train") -> str:
    """One random prompt from ``split`` (``"train"``, ``"eval"`` or None for either)."""
    for _ in range(100_000):
        width = cfg.max_digits if cfg.pad_operands else 0
        p = format_prompt(_random_operand(rng, cfg), _random_operand(rng, cfg), width)
        if split is None or prompt_split(p, cfg.eval_fraction) == split:
            return p
    raise RuntimeError(f"could not draw a {split!r} prompt; check eval_fraction={cfg.eval_fraction}")


def make_prompts(n: int, cfg: TaskConfig, seed: int | None = None, split: str | None = "train") -> list[str]:
    """``n`` random prompts from ``split``, distinct while the prompt space allows (then repeats are allowed).

    Deterministic given (cfg, seed, split); ``seed`` defaults to ``cfg.seed``.
    """
    if split not in ("train", "eval", None):
        raise ValueError(f"split must be 'train', 'eval' or None, got {split!r}")
    rng = random.Random(f"prompts/{cfg.seed if seed is None else seed}/{split}")
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        p = sample_prompt(rng, cfg, split)
        attempts += 1
        if p in seen and attempts < 50 * n + 100:
            continue
        seen.add(p)
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------------ solution
def _columns(a: str, b: str) -> list[tuple[str, str]]:
    """(sum digit, carry) of every column of the operand strings, least significant first."""
    da, db = a[::-1], b[::-1]
    carry, cols = 0, []
    for k in range(max(len(da), len(db))):
        x = int(da[k]) if k < len(da) else 0
        y = int(db[k]) if k < len(db) else 0
        s = x + y + carry
        carry = s // 10
        cols.append((str(s % 10), str(carry)))
    return cols


def answer(prompt: str) -> str:
    """Canonical final answer: ``a + b`` written with exactly ``n + 1`` digits, ``n`` the number of columns
    (the longer operand's length as written, leading zeros included): the final carry, then the column digits
    from the most significant. ``"473+859="`` -> ``"1332"``, ``"047+009="`` -> ``"0056"``, ``"5+4="`` -> ``"09"``.
    """
    a, b = _operand_strings(prompt)
    return str(int(a) + int(b)).zfill(max(len(a), len(b)) + 1)


def solution(prompt: str) -> str:
    """Canonical completion of ``prompt`` (without EOS): ``"473+859="`` -> ``"21,31,31:1332"``."""
    cols = _columns(*_operand_strings(prompt))
    return f"{COLUMN_SEP.join(d + c for d, c in cols)}{ANSWER_SEP}{answer(prompt)}"


def max_completion_chars(cfg: TaskConfig, slack: int = 6) -> int:
    """Length of the longest canonical completion (EOS included) plus ``slack`` tokens for corrections."""
    n = cfg.max_digits
    return 3 * n - 1 + 1 + (n + 1) + 1 + slack


def apply_corrections(text: str) -> str:
    """Apply every ``"<"`` as "delete the previous token": ``"21,41<31"`` -> ``"21,31"``.

    A ``"<"`` with nothing before it in the completion is ignored (it never deletes into the prompt); a
    ``"<"`` after another ``"<"`` deletes one more token (the first ``"<"`` is not itself a token left to delete).
    """
    out: list[str] = []
    for ch in text:
        if ch == CORRECTION:
            if out:
                out.pop()
        else:
            out.append(ch)
    return "".join(out)


def _strip_eos(text: str) -> str:
    for marker in (EOS_TOKEN, _EOS_CHAR):
        i = text.find(marker)
        if i >= 0:
            text = text[:i]
    return text


def extract_answer(completion_text: str) -> str | None:
    """The final answer of a completion after corrections: the text after the first ``":"`` (EOS and pad
    markers removed, surrounding whitespace stripped), or None when there is no ``":"``."""
    text = apply_corrections(_strip_eos(completion_text).replace(PAD_TOKEN, ""))
    if ANSWER_SEP not in text:
        return None
    return text.split(ANSWER_SEP, 1)[1].strip()


def is_correct(prompt: str, completion_text: str, strict: bool = False) -> bool:
    """Whether ``completion_text`` answers ``prompt`` correctly.

    What counts: the completion is cut at the first EOS (``"[EOS]"``; pad markers are dropped), ``"<"``
    corrections are applied (`apply_corrections`), and the text after the first ``":"`` must equal
    `answer` (``a + b`` with exactly one digit per column plus the final carry, so ``"0056"`` for
    ``"047+009="`` and ``"1332"`` for ``"473+859="``) exactly: leading/trailing whitespace is ignored, nothing
    else is (no missing or extra digits, no dropped leading zero). The
    scratchpad is not checked unless ``strict``, in which case the whole corrected completion must equal
    `solution` (so a right answer reached through a wrong scratchpad does not count).
    """
    if strict:
        text = apply_corrections(_strip_eos(completion_text).replace(PAD_TOKEN, "")).strip()
        return text == solution(prompt)
    return extract_answer(completion_text) == answer(prompt)


# ------------------------------------------------------------------------------------- corrupted teacher data
def _wrong_token(rng: random.Random, right: str) -> str:
    """A plausible wrong token for a position whose right token is ``right``: a different digit."""
    choices = [d for d in DIGITS if d != right]
    return rng.choice(choices)


def corrupted_completion(prompt: str, rng: random.Random, error_rate: float) -> tuple[list[str], list[bool]]:
    """Completion tokens (EOS as ``"[EOS]"``) with injected errors, and which tokens carry loss.

    At every position of the canonical completion (EOS included), with probability ``error_rate`` a wrong
    token (a digit different from the right one) is inserted, followed by ``"<"``, then the right token; at
    most one injection per position, so a ``"<"`` always repairs the token just before it. Injected wrong
    tokens carry no loss (the model should never learn to produce them); everything else, ``"<"`` included,
    does.
    """
    tokens: list[str] = []
    train: list[bool] = []
    for right in list(solution(prompt)) + [EOS_TOKEN]:
        if error_rate > 0 and rng.random() < error_rate:
            tokens += [_wrong_token(rng, right), CORRECTION]
            train += [False, True]
        tokens.append(right)
        train.append(True)
    return tokens, train


def teacher_training_example(prompt: str, rng: random.Random, cfg: TaskConfig) -> tuple[list[str], list[bool]]:
    """Teacher completion tokens and loss mask (`corrupted_completion` at ``cfg.error_rate`` when
    ``cfg.corrections``, else the clean solution)."""
    return corrupted_completion(prompt, rng, cfg.error_rate if cfg.corrections else 0.0)


def teacher_training_text(prompt: str, rng: random.Random | int | None, cfg: TaskConfig) -> str:
    """Teacher training completion as text (without EOS), e.g. ``"21,31,39<31:1332"``.

    ``apply_corrections`` of it is always ``solution(prompt)``.
    """
    if not isinstance(rng, random.Random):
        rng = random.Random(cfg.seed if rng is None else rng)
    tokens, _ = teacher_training_example(prompt, rng, cfg)
    return "".join(t for t in tokens if t != EOS_TOKEN)


# ------------------------------------------------------------------------------------------ error positions
def _completion_tokens(completion, tokenizer=None) -> list[str]:
    """Completion as a list of single-character tokens; EOS becomes `_EOS_CHAR`, pad becomes None."""
    if isinstance(completion, str):
        text = completion.replace(EOS_TOKEN, _EOS_CHAR)
        out: list[str | None] = []
        i = 0
        while i < len(text):
            if text.startswith(PAD_TOKEN, i):
                out.append(None)
                i += len(PAD_TOKEN)
            else:
                out.append(text[i])
                i += 1
        return out
    ids = [int(i) for i in completion]
    if tokenizer is not None:
        pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        names = tokenizer.convert_ids_to_tokens(ids)
    else:
        pad_id, eos_id = PAD_ID, EOS_ID
        names = [ID_TO_TOKEN.get(i, UNK_TOKEN) for i in ids]
    out = []
    for i, name in zip(ids, names):
        if i == eos_id:
            out.append(_EOS_CHAR)
        elif i == pad_id:
            out.append(None)
        else:
            out.append(name)
    return out


def error_positions(prompt: str, completion, tokenizer=None) -> list[bool]:
    """Known Q3 positions of a completion: where the teacher should say ``"<"``.

    ``completion`` is text (EOS may appear as ``"[EOS]"``, pads as ``"[PAD]"``) or a sequence of token ids
    (``tokenizer`` maps ids to characters; the lab's fixed vocabulary is used when it is None). The result has
    one entry per completion token.

    Definition. Read the completion token by token, keeping the corrected prefix (``"<"`` applied as it comes,
    EOS counted as a final token). The corrected prefix is *consistent* when it is a prefix of
    ``solution(prompt) + EOS``. Position ``t`` is True when the corrected prefix after tokens ``0..t-1`` is
    inconsistent while the one after tokens ``0..t-2`` was consistent: token ``t-1`` was the mistake, and
    position ``t`` is the first place where ``"<"`` is the right move. Only these transition positions are
    marked, so a mistake left unrepaired marks one position, and each later fresh mistake after a repair marks
    one more. Position 0 is never True; positions after EOS and pad positions are False (a mistaken EOS ends the
    sequence, so nothing marks it).
    """
    toks = _completion_tokens(completion, tokenizer)
    target = list(solution(prompt)) + [_EOS_CHAR]
    marks = [False] * len(toks)
    prefix: list[str] = []

    def consistent() -> bool:
        return len(prefix) <= len(target) and prefix == target[: len(prefix)]

    was_consistent = True
    ended = False
    for t, tok in enumerate(toks):
        if ended or tok is None:
            continue
        now_consistent = consistent()
        if t > 0 and was_consistent and not now_consistent:
            marks[t] = True
        was_consistent = now_consistent
        if tok == _EOS_CHAR:
            ended = True
        if tok == CORRECTION:
            if prefix:
                prefix.pop()
        else:
            prefix.append(tok)
    return marks


# ------------------------------------------------------------------------------------------------- files
def write_prompt_file(path: str | os.PathLike, prompts: Sequence[str]) -> str:
    """Write ``{"prompt": <plain string>, "answer": `answer`, "sum": a + b}`` lines (jsonl); returns the path."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for p in prompts:
            a, b = parse_prompt(p)
            f.write(json.dumps({"prompt": p, "answer": answer(p), "sum": a + b}) + "\n")
    return path


def read_prompt_file(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
