"""Prompt data: loading standardized prompt files for training, and converting raw math datasets into them.

Loading (used by the trainer)
-----------------------------
``load_prompt_dataset(path, prompt_column="prompt", limit=None)`` reads a local ``.jsonl``/``.json``/``.parquet``
file (or a directory holding exactly one such file, or a ``train.*`` file) into a ``datasets.Dataset`` with a
``prompt`` column (plain string, or a conversational list of ``{"role", "content"}`` messages) and, when the file
has one, an ``answer`` column (string). No hub access.

Preparation (``python -m opsd.data --help``)
-------------------------------------------
Converts local copies of DAPO-Math-17k (parquet), MATH-500 (jsonl), AIME 2024 (parquet), AIME 2025 (jsonl) or any
question/answer table into ``DIR/{split}.jsonl`` (+ ``DIR/validation.jsonl``) with the columns

- ``prompt``: ``[{"role": "user", "content": text}]`` (default, so the trainer applies each model's chat
  template) or the plain text with ``--no-conversational``;
- ``answer``: the ground-truth final answer as a string;
- ``source``: dataset name (DAPO's ``data_source`` value, ``math500``, ``aime24``, ``aime25`` or the input
  file's stem);
- ``id``: the source's id when it has one, else ``{source}-{row index in the input}``.

``text`` is the question wrapped in the chosen instruction (``--instruction``):

- ``boxed`` (default): ``{question}`` + "Please reason step by step, and put your final answer within
  \\boxed{}." (what ``opsd.reward.extract_answer`` reads first);
- ``dapo``: DAPO-Math's own wording, asking for a final ``Answer: ...`` line;
- ``none``: the bare question;
- ``upstream``: ``{question}`` + "Let's think step by step and output the final answer within \\boxed{}." (the
  wording of upstream's data preparation, HJSang/OPSD_OnPolicyDistillation);
- any other text containing ``{question}``: that text with the question substituted (plain substitution, so
  LaTeX braces in the text are safe).

DAPO's prompts already contain its instruction. With ``--instruction dapo`` they are kept byte-for-byte; with any
other instruction the DAPO wording is stripped first. Detection: the user message must start with DAPO's lead-in
("Solve the following math problem step by step. The last line of your response should be of the form
Answer: $Answer ... where $Answer is the answer to the problem.") and/or end with its reminder ("Remember to put
your answer on its own line after "Answer:"."), matched by regular expressions that ignore case and whitespace
differences. Rows where neither part is found keep their text unchanged and are counted as
``dapo_instruction_not_found`` in the summary.

Cleaning: rows with an empty question or an empty answer are dropped, then duplicates by normalized question
text (case-folded, whitespace collapsed, instruction removed) keep their first occurrence. ``--limit`` keeps the
first N clean rows in file order (reading stops there). ``--val_fraction`` moves a seeded random subset to ``validation.jsonl``; both
files keep the input order. ``--train_ratio R`` is upstream's split instead: the rows in the order of
``numpy.random.default_rng(seed).permutation`` (the permutation ``datasets.Dataset.shuffle(seed=...)`` draws), the
first ``int(n * R)`` for training, the rest for validation. A worked-solution answer column (``solution``, as in
upstream's AIME 2024 file) is reduced to its last ``\\boxed{}`` content. Input that leaves no rows is an error
(exit status 2).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

__all__ = [
    "BOXED_INSTRUCTION",
    "DAPO_PREFIX",
    "DAPO_SUFFIX",
    "LAYOUTS",
    "SUPPORTED_EXTENSIONS",
    "apply_instruction",
    "detect_layout",
    "load_prompt_dataset",
    "main",
    "normalize_question",
    "prepare",
    "file_columns",
    "iter_records",
    "read_records",
    "strip_dapo_instruction",
]

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet")
LAYOUTS = ("auto", "dapo", "math500", "aime24", "aime25", "generic")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")

BOXED_INSTRUCTION = "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
DAPO_INSTRUCTION = DAPO_PREFIX + "{question}" + DAPO_SUFFIX
# upstream's (HJSang/OPSD_OnPolicyDistillation) boxed wording, used by its training and validation files
UPSTREAM_INSTRUCTION = "{question}\n\nLet's think step by step and output the final answer within \\boxed{}."

_DAPO_PREFIX_RE = re.compile(
    r"^\s*solve\s+the\s+following\s+math\s+problem\s+step\s+by\s+step\.?\s*"
    r"(?:the\s+last\s+line\s+of\s+your\s+response\s+should\s+be\s+of\s+the\s+form\s+answer\s*:.*?"
    r"where\s+\$answer\s+is\s+the\s+answer\s+to\s+the\s+problem\.?)?\s*",
    re.IGNORECASE | re.DOTALL,
)
_DAPO_SUFFIX_RE = re.compile(
    r"\s*remember\s+to\s+put\s+your\s+answer\s+on\s+its\s+own\s+line\s+after\s+[\"'“”]?answer:?[\"'“”]?\s*\.?\s*$",
    re.IGNORECASE,
)


# ----------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------


def _to_python(value: Any) -> Any:
    """numpy/pyarrow scalars and arrays -> plain Python; NaN -> None."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None:
        if isinstance(value, np.ndarray):
            return [_to_python(v) for v in value.tolist()]
        if isinstance(value, np.generic):
            value = value.item()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return value


def _iter_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc.msg}).") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}: line {lineno} is a {type(obj).__name__}, expected a JSON object per line.")
            yield obj


def _read_json(path: Path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Extra data"):  # JSON Lines saved with a .json extension
            return list(_iter_jsonl(path))
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
    if isinstance(obj, dict):
        # {"data": [...]} / {"train": [...]} wrappers, or a dict of equal-length columns
        list_values = [v for v in obj.values() if isinstance(v, list)]
        if len(obj) == 1 and list_values and all(isinstance(r, dict) for r in list_values[0]):
            obj = list_values[0]
        elif obj and len(list_values) == len(obj) and len({len(v) for v in list_values}) == 1:
            keys = list(obj)
            obj = [dict(zip(keys, vals)) for vals in zip(*(obj[k] for k in keys))]
        else:
            raise ValueError(f"{path}: expected a list of records (or a dict of equal-length columns).")
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise ValueError(f"{path}: expected a JSON list of objects (one per row).")
    return obj


def _check_file(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"Input file not found: {path}. Pass a local .jsonl, .json or .parquet file.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass a file.")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"Unsupported file extension {ext or '(none)'!r} for {path}; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}. Convert the file first, e.g. "
            "pandas.read_csv(src).to_json('out.jsonl', orient='records', lines=True)."
        )
    return ext


def iter_records(path: str | os.PathLike, columns: Sequence[str] | None = None) -> Iterator[dict]:
    """Stream the rows of a local .jsonl / .json / .parquet file as plain-Python dicts (no type coercion).

    ``columns`` restricts a parquet read to those columns (large files such as DAPO-Math-17k stay cheap);
    it is ignored for JSON input.
    """
    path = Path(path)
    ext = _check_file(path)
    if ext == ".jsonl":
        yield from _iter_jsonl(path)
    elif ext == ".json":
        yield from _read_json(path)
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=8192, columns=list(columns) if columns else None):
            yield from batch.to_pylist()


def read_records(path: str | os.PathLike) -> list[dict]:
    """All rows of a local .jsonl / .json / .parquet file as a list of plain-Python dicts (no type coercion)."""
    return list(iter_records(path))


def file_columns(path: str | os.PathLike) -> list[str]:
    """Column names of a data file (parquet: its schema; JSON: keys of the first 1000 rows, in order)."""
    path = Path(path)
    ext = _check_file(path)
    if ext == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return _columns(list(itertools.islice(iter_records(path), 1000)))


def _columns(rows: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows[:1000]:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


# ----------------------------------------------------------------------------------------------------------------
# Loading for training
# ----------------------------------------------------------------------------------------------------------------


def _resolve_data_file(path: Path, split: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"Prompt data not found: {path}. Create it with `python -m opsd.data --input RAW_FILE --output_dir DIR` "
            "(or run_scripts/prepare_data.sh) and pass DIR or DIR/train.jsonl."
        )
    if path.is_file():
        return path
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
    named = [p for p in candidates if p.stem == split]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ValueError(f"{path} holds several {split}.* files ({[p.name for p in named]}); pass one file.")
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(
            f"No .jsonl/.json/.parquet file in directory {path}. Prepare one with `python -m opsd.data`."
        )
    raise ValueError(
        f"Directory {path} holds several data files ({[p.name for p in candidates]}) and no {split}.* file; "
        "pass the file path explicitly."
    )


def _validate_messages(value: Any, row: int, path: Path) -> list[dict]:
    if len(value) == 0:
        raise ValueError(f"{path}: row {row}: the prompt is an empty message list.")
    out = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(
                f"{path}: row {row}: message {j} is malformed ({str(msg)[:80]!r}); conversational prompts must be "
                'lists of {"role": ..., "content": ...} dicts.'
            )
        role, content = msg["role"], msg["content"]
        if not isinstance(role, str) or role not in MESSAGE_ROLES:
            raise ValueError(f"{path}: row {row}: message {j} has role {role!r}; expected one of {MESSAGE_ROLES}.")
        if not isinstance(content, str):
            raise ValueError(
                f"{path}: row {row}: message {j} content is a {type(content).__name__}; expected a string."
            )
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise ValueError(f"{path}: row {row}: the message list has no 'user' message.")
    return out


def _answer_to_str(value: Any) -> str | None:
    value = _to_python(value)
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value).strip()


def load_prompt_dataset(path, prompt_column: str = "prompt", limit: int | None = None, split: str = "train"):
    """Training prompts from a local file as a ``datasets.Dataset`` with columns ``prompt`` (+ ``answer``).

    ``path``: a ``.jsonl``/``.json``/``.parquet`` file, or a directory holding ``{split}.*`` (default
    ``train.*``) or exactly one such file. ``prompt_column`` is renamed to ``prompt``; every value must be a
    non-empty string or a non-empty list of ``{"role", "content"}`` messages (all rows the same kind). An
    ``answer`` column is kept as strings (ints from AIME become "42"); a raw DAPO file's
    ``reward_model.ground_truth`` is used as the answer when there is no ``answer`` column. Other columns are
    dropped. ``limit`` keeps the first N rows.
    """
    from datasets import Dataset

    if limit is not None and int(limit) <= 0:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit}.")
    file = _resolve_data_file(Path(path), split)
    rows = read_records(file)
    if not rows:
        raise ValueError(f"{file} holds no rows; check the file or re-run `python -m opsd.data`.")
    columns = _columns(rows)
    if prompt_column not in columns:
        hint = ""
        if any(c in columns for c in ("problem", "question", "Problem")):
            hint = (" This looks like a raw dataset: convert it with `python -m opsd.data --input FILE "
                    "--output_dir DIR` first.")
        raise ValueError(
            f"{file} has no prompt column {prompt_column!r}; columns found: {columns}. Pass prompt_column=... "
            f"with one of them.{hint}"
        )
    if limit is not None:
        rows = rows[: int(limit)]

    has_answer = "answer" in columns
    from_reward_model = not has_answer and "reward_model" in columns
    prompts, answers = [], []
    kinds = set()
    for i, r in enumerate(rows):
        value = _to_python(r.get(prompt_column))
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(f"{file}: row {i}: empty prompt. Remove it (python -m opsd.data drops such rows).")
            kinds.add("text")
        elif isinstance(value, list):
            value = _validate_messages(value, i, file)
            kinds.add("messages")
        else:
            raise ValueError(
                f"{file}: row {i}: prompt is {type(value).__name__}; expected a string or a list of "
                '{"role", "content"} messages.'
            )
        if len(kinds) > 1:
            raise ValueError(
                f"{file}: row {i}: mixes plain-string and conversational prompts; use one kind for the whole file."
            )
        prompts.append(value)
        if has_answer:
            answers.append(_answer_to_str(r.get("answer")))
        elif from_reward_model:
            rm = _to_python(r.get("reward_model"))
            answers.append(_answer_to_str(rm.get("ground_truth")) if isinstance(rm, dict) else None)

    data: dict[str, list] = {"prompt": prompts}
    if has_answer or (from_reward_model and any(a is not None for a in answers)):
        data["answer"] = answers
    return Dataset.from_dict(data)


# ----------------------------------------------------------------------------------------------------------------
# Preparation
# ----------------------------------------------------------------------------------------------------------------


def normalize_question(text: str) -> str:
    """Deduplication key: case-folded, whitespace collapsed, stripped."""
    return re.sub(r"\s+", " ", str(text)).strip().casefold()


def strip_dapo_instruction(text: str) -> tuple[str, bool]:
    """Remove DAPO-Math's lead-in and trailing reminder from a user message; (question, found)."""
    question = text
    m = _DAPO_PREFIX_RE.match(question)
    found = False
    if m:
        question = question[m.end():]
        found = True
    m = _DAPO_SUFFIX_RE.search(question)
    if m:
        question = question[: m.start()]
        found = True
    return question.strip(), found


def apply_instruction(question: str, instruction: str) -> str:
    """Wrap ``question`` with ``instruction`` ('boxed', 'dapo', 'none' or custom text containing '{question}')."""
    if instruction == "none":
        return question
    template = {"boxed": BOXED_INSTRUCTION, "dapo": DAPO_INSTRUCTION, "upstream": UPSTREAM_INSTRUCTION}.get(
        instruction, instruction)
    return template.replace("{question}", question)


def _check_instruction(instruction: str) -> None:
    if instruction in ("boxed", "dapo", "none", "upstream"):
        return
    if "{question}" not in instruction:
        raise ValueError(
            f"--instruction {instruction!r} is neither boxed, dapo, none nor a custom text containing '{{question}}'. "
            "Example: --instruction 'Solve: {question}\\nPut the final answer in \\boxed{}.'"
        )


_BOXED_RE = re.compile(r"\\boxed\s*\{")


def _boxed_content(text: str) -> str | None:
    from .reward import extract_answer

    return extract_answer(text)


_QUESTION_CANDIDATES = ("question", "problem", "Problem", "Question", "query", "input")
_ANSWER_CANDIDATES = ("answer", "Answer", "final_answer", "ground_truth", "solution_answer", "target", "solution")


def detect_layout(columns: Iterable[str]) -> str:
    """Layout name from a table's columns; ValueError when nothing fits."""
    cols = set(columns)
    if {"prompt", "reward_model"} <= cols:
        return "dapo"
    if {"problem", "answer", "unique_id"} <= cols:
        return "math500"
    if {"Problem", "Answer"} <= cols:
        return "aime24"
    if {"question", "answer"} <= cols:
        return "aime25"
    if any(c in cols for c in _QUESTION_CANDIDATES) and any(c in cols for c in _ANSWER_CANDIDATES):
        return "generic"
    raise ValueError(
        f"Cannot detect the layout from columns {sorted(cols)}. Pass --layout generic --question_column COL "
        "--answer_column COL (or one of --layout dapo|math500|aime24|aime25)."
    )


_LAYOUT_COLUMNS = {
    "math500": ("problem", "answer", "unique_id"),
    "aime24": ("Problem", "Answer", "ID"),
    "aime25": ("question", "answer", "id"),
}


def _require(columns: Sequence[str], needed: Iterable[str], layout: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"Layout {layout!r} needs column(s) {missing}, but the input has {list(columns)}. Choose another "
            "--layout, or --layout generic with --question_column/--answer_column."
        )


def _user_text(messages: Any) -> str | None:
    messages = _to_python(messages)
    if isinstance(messages, str):
        return messages
    if isinstance(messages, list):
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1].get("content"), str):
            return users[-1]["content"]
    return None


def _text(value: Any) -> str:
    value = _to_python(value)
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else str(value).strip()


def prepare(
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    layout: str = "auto",
    question_column: str | None = None,
    answer_column: str | None = None,
    instruction: str = "boxed",
    conversational: bool = True,
    val_fraction: float = 0.0,
    seed: int = 0,
    limit: int | None = None,
    split_name: str = "train",
    verbose: bool = True,
    train_ratio: float | None = None,
) -> dict:
    """Convert one raw file into ``output_dir/{split_name}.jsonl`` (+ ``validation.jsonl``); returns the summary.

    Summary keys: ``layout``, ``input``, ``rows_read``, ``written`` ({split: rows}), ``dropped``
    ({"duplicate", "empty_question", "empty_answer"}), ``duplicate_conflicting_answer`` (duplicates whose answer
    differs from the kept row's), ``dapo_instruction_not_found``, ``files`` ({split: path}).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    _check_instruction(instruction)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if limit is not None and int(limit) <= 0:
        raise ValueError(f"limit must be positive, got {limit}.")
    if not split_name or "/" in split_name or split_name.endswith(".jsonl"):
        raise ValueError(f"split_name must be a bare name such as 'train', got {split_name!r}.")
    if train_ratio is not None and not 0.0 < float(train_ratio) <= 1.0:
        raise ValueError(f"train_ratio must be in (0, 1], got {train_ratio}.")
    if train_ratio is not None and val_fraction > 0:
        raise ValueError("Give either val_fraction (random subset, input order kept) or train_ratio (upstream's "
                         "shuffled split), not both.")
    if (val_fraction > 0 or train_ratio is not None) and split_name == "validation":
        raise ValueError("split_name 'validation' clashes with the validation split; pick another name.")

    input_path = Path(input)
    columns = file_columns(input_path)
    if not columns:
        raise ValueError(f"{input_path} holds no rows (or no columns).")

    if layout == "auto":
        layout = "generic" if (question_column or answer_column) else detect_layout(columns)

    # Which columns to read
    if layout == "dapo":
        _require(columns, ("prompt", "reward_model"), layout)
    elif layout == "generic":
        q_col = question_column or next((c for c in _QUESTION_CANDIDATES if c in columns), None)
        a_col = answer_column or next((c for c in _ANSWER_CANDIDATES if c in columns), None)
        if q_col is None or a_col is None:
            raise ValueError(
                f"Layout 'generic' needs --question_column and --answer_column; columns found: {columns}."
            )
        _require(columns, (q_col, a_col), layout)
        id_col = "id" if "id" in columns else None
    else:
        q_col, a_col, id_col = _LAYOUT_COLUMNS[layout]
        q_col, a_col = question_column or q_col, answer_column or a_col
        _require(columns, (q_col, a_col), layout)
        if id_col not in columns:
            id_col = None
    if layout == "dapo":
        read_cols = [c for c in ("prompt", "reward_model", "data_source", "extra_info") if c in columns]
    else:
        read_cols = [c for c in (q_col, a_col, id_col) if c]
    default_source = {"math500": "math500", "aime24": "aime24", "aime25": "aime25", "dapo": "dapo"}.get(
        layout, input_path.stem
    )

    dropped = {"duplicate": 0, "empty_question": 0, "empty_answer": 0}
    conflicting = 0
    not_found = 0
    kept: list[dict] = []
    first_answer: dict[str, str] = {}
    rows_read = 0
    for i, r in enumerate(iter_records(input_path, columns=read_cols)):
        rows_read += 1
        if layout == "dapo":
            raw = _user_text(r.get("prompt"))
            raw = raw if raw is not None else ""
            question, found = strip_dapo_instruction(raw)
            if raw.strip() and not found:
                not_found += 1
            rm = _to_python(r.get("reward_model"))
            answer = _text(rm.get("ground_truth")) if isinstance(rm, dict) else _text(rm)
            source = _text(r.get("data_source")) or default_source
            extra = _to_python(r.get("extra_info"))
            rid = _text(extra.get("index")) if isinstance(extra, dict) and extra.get("index") is not None else ""
            if instruction == "dapo":  # keep DAPO's own prompt text unchanged
                text = raw if found else apply_instruction(question, "dapo")
            else:
                text = apply_instruction(question, instruction)
        else:
            question = _text(r.get(q_col))
            answer = _answer_to_str(r.get(a_col)) or ""
            if a_col == "solution" and _BOXED_RE.search(answer):  # a worked solution: keep its boxed result
                answer = _boxed_content(answer) or answer
            source = default_source
            rid = _text(r.get(id_col)) if id_col else ""
            text = apply_instruction(question, instruction)
        if not question:
            dropped["empty_question"] += 1
            continue
        if not answer:
            dropped["empty_answer"] += 1
            continue
        key = normalize_question(question)
        if key in first_answer:
            dropped["duplicate"] += 1
            if first_answer[key] != answer:
                conflicting += 1
            continue
        first_answer[key] = answer
        kept.append({
            "prompt": [{"role": "user", "content": text}] if conversational else text,
            "answer": answer,
            "source": source,
            "id": rid or f"{source}-{i}",
        })
        if limit is not None and len(kept) >= int(limit):
            break  # stop reading: rows_read / dropped then cover only the rows looked at

    if rows_read == 0:
        raise ValueError(f"{input_path} holds no rows.")
    if not kept:
        raise ValueError(f"{input_path}: no rows left after cleaning ({rows_read} read; dropped {dropped}); check "
                         f"--layout and the question/answer columns.")
    if limit is not None:
        kept = kept[: int(limit)]

    splits: dict[str, list[dict]] = {}
    if train_ratio is not None:
        # upstream: the rows in the order of numpy's default_rng(seed).permutation (what datasets' shuffle(seed)
        # draws), the first int(n * ratio) for training and the rest for validation
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(kept)).tolist()
        cut = int(len(kept) * float(train_ratio))
        splits[split_name] = [kept[j] for j in order[:cut]]
        splits["validation"] = [kept[j] for j in order[cut:]]
    elif val_fraction > 0 and len(kept) >= 2:
        n_val = min(max(1, round(len(kept) * float(val_fraction))), len(kept) - 1)
        val_idx = set(random.Random(seed).sample(range(len(kept)), n_val))
        splits[split_name] = [r for j, r in enumerate(kept) if j not in val_idx]
        splits["validation"] = [r for j, r in enumerate(kept) if j in val_idx]
    else:
        splits[split_name] = kept
        if val_fraction > 0:
            splits["validation"] = []

    if not splits[split_name]:
        raise ValueError(f"{split_name}.jsonl would be empty ({len(kept)} clean rows); lower val_fraction or raise "
                         f"train_ratio.")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, split_rows in splits.items():
        path = out_dir / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for row in split_rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        files[name] = str(path)

    summary = {
        "input": str(input_path),
        "layout": layout,
        "instruction": instruction,
        "rows_read": rows_read,
        "written": {name: len(v) for name, v in splits.items()},
        "dropped": dropped,
        "duplicate_conflicting_answer": conflicting,
        "dapo_instruction_not_found": not_found,
        "files": files,
    }
    if verbose:
        print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"[opsd.data] {summary['input']} (layout={summary['layout']}, instruction={summary['instruction']!r})",
        f"  rows read: {summary['rows_read']}",
    ]
    for name, n in summary["written"].items():
        lines.append(f"  written {name}: {n} -> {summary['files'][name]}")
    d = summary["dropped"]
    lines.append(
        f"  dropped: duplicate={d['duplicate']} empty_question={d['empty_question']} empty_answer={d['empty_answer']}"
    )
    if summary["duplicate_conflicting_answer"]:
        lines.append(
            f"  warning: {summary['duplicate_conflicting_answer']} duplicate question(s) had a different answer "
            "than the kept first occurrence"
        )
    if summary["dapo_instruction_not_found"]:
        lines.append(
            f"  note: DAPO instruction text not found in {summary['dapo_instruction_not_found']} row(s); "
            "their text was kept unchanged"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m opsd.data",
        description="Convert a local math dataset file into standardized prompt files DIR/{split}.jsonl with "
        "columns prompt, answer, source, id (the input of the OPD trainer and of evaluation).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", required=True, help="Local .jsonl, .json or .parquet file to convert.")
    p.add_argument("--output_dir", required=True, help="Directory for {split_name}.jsonl (+ validation.jsonl); "
                   "created if missing, existing files of the same name are overwritten.")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="Input layout. auto detects it from the columns: dapo = DAPO-Math-17k parquet (prompt "
                   "messages + reward_model.ground_truth), math500 = problem/answer/unique_id, aime24 = "
                   "Problem/Answer/ID, aime25 = question/answer, generic = columns named by --question_column and "
                   "--answer_column (or guessed).")
    p.add_argument("--question_column", default=None,
                   help="Column holding the question text (generic layout; overrides the layout's default). Giving "
                   "it with --layout auto selects generic.")
    p.add_argument("--answer_column", default=None,
                   help="Column holding the final answer (generic layout; overrides the layout's default).")
    p.add_argument("--instruction", default="boxed",
                   help="How the question is presented: boxed = question + 'Please reason step by step, and put "
                   "your final answer within \\boxed{}.'; dapo = DAPO-Math's wording (final 'Answer: ...' line; "
                   "DAPO prompts are kept as-is); none = bare question; upstream = question + upstream's "
                   "\"Let's think step by step and output the final answer within \\boxed{}.\"; any other text "
                   "must contain {question}. "
                   "DAPO's built-in wording is stripped for every choice except dapo.")
    p.add_argument("--conversational", action=argparse.BooleanOptionalAction, default=True,
                   help="Write prompt as [{'role': 'user', 'content': text}] so the trainer applies each model's "
                   "chat template; --no-conversational writes the plain text.")
    p.add_argument("--val_fraction", type=float, default=0.0,
                   help="Fraction of the cleaned rows moved to validation.jsonl (seeded random choice); 0 = none.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the train/validation split.")
    p.add_argument("--train_ratio", type=float, default=None,
                   help="Upstream's split instead of --val_fraction: rows shuffled with numpy's "
                   "default_rng(seed).permutation, the first int(n * ratio) go to {split_name}.jsonl and the rest to "
                   "validation.jsonl, both in shuffled order (upstream: ratio 0.8, seed 42).")
    p.add_argument("--limit", type=int, default=None,
                   help="Keep only the first N cleaned rows (in file order) before splitting; default: all.")
    p.add_argument("--split_name", default="train",
                   help="Name of the main output file ({split_name}.jsonl), e.g. train or test.")
    p.add_argument("--quiet", action="store_true", help="Do not print the summary.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        prepare(
            input=args.input,
            output_dir=args.output_dir,
            layout=args.layout,
            question_column=args.question_column,
            answer_column=args.answer_column,
            instruction=args.instruction,
            conversational=args.conversational,
            val_fraction=args.val_fraction,
            seed=args.seed,
            limit=args.limit,
            split_name=args.split_name,
            verbose=not args.quiet,
            train_ratio=args.train_ratio,
        )
    except (FileNotFoundError, IsADirectoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
