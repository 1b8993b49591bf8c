"""Tests of opsd.data: preparation of each raw layout, cleaning, splits, errors, and training-prompt loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from opsd import data as D

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Fixture files
# ----------------------------------------------------------------------------------------------------------------


def dapo_text(question: str) -> str:
    return D.DAPO_PREFIX + question + D.DAPO_SUFFIX


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture
def dapo_file(tmp_path):
    questions = ["What is $1+1$?", "Find $x$ if $2x = 6$.", "What is $1+1$?", "  what is   $1+1$? ",
                 "Compute $3^2$.", "Empty answer here.", "No instruction at all: 7*6?"]
    answers = ["2", "3", "2", "5", "9", "", "42"]
    rows = []
    for i, (q, a) in enumerate(zip(questions, answers)):
        content = q if q.startswith("No instruction") else dapo_text(q)
        rows.append({
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": content}],
            "ability": "MATH",
            "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"idx-{i}"},
        })
    path = tmp_path / "dapo.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def math500_file(tmp_path):
    rows = [
        {"problem": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "solution": "...", "answer": "1", "subject": "Algebra",
         "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "What is $\\sqrt{4}$?", "solution": "...", "answer": "2", "subject": "Algebra", "level": 1,
         "unique_id": "test/algebra/2.json"},
        {"problem": "COMPUTE  $\\frac{1}{2}+\\frac{1}{2}$.", "solution": "...", "answer": "1", "subject": "Algebra",
         "level": 1, "unique_id": "test/algebra/3.json"},
        {"problem": "", "solution": "...", "answer": "3", "subject": "Algebra", "level": 2,
         "unique_id": "test/algebra/4.json"},
        {"problem": "Simplify $\\sqrt{12}$.", "solution": "...", "answer": "2\\sqrt{3}", "subject": "Algebra",
         "level": 2, "unique_id": "test/algebra/5.json"},
    ]
    return write_jsonl(tmp_path / "math500.jsonl", rows)


@pytest.fixture
def aime24_file(tmp_path):
    df = pd.DataFrame({
        "ID": ["2024-I-1", "2024-I-2", "2024-II-1"],
        "Problem": ["Problem one?", "Problem two?", "Problem three?"],
        "Solution": ["s1", "s2", "s3"],
        "Answer": [204, 25, 7],
    })
    path = tmp_path / "aime24.parquet"
    df.to_parquet(path)
    return path


@pytest.fixture
def aime25_file(tmp_path):
    rows = [{"question": f"AIME 2025 question {i}?", "answer": str(100 + i)} for i in range(4)]
    rows.append({"question": "AIME 2025 question 0?", "answer": "999"})  # conflicting duplicate
    return write_jsonl(tmp_path / "aime25.jsonl", rows)


def generic_rows(n: int):
    return [{"q": f"Generic question number {i}?", "a": i * 3, "meta": "x"} for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Preparation
# ----------------------------------------------------------------------------------------------------------------


def test_detect_layout():
    assert D.detect_layout(["data_source", "prompt", "reward_model", "extra_info"]) == "dapo"
    assert D.detect_layout(["problem", "solution", "answer", "subject", "level", "unique_id"]) == "math500"
    assert D.detect_layout(["ID", "Problem", "Solution", "Answer"]) == "aime24"
    assert D.detect_layout(["question", "answer"]) == "aime25"
    assert D.detect_layout(["problem", "answer"]) == "generic"
    with pytest.raises(ValueError, match="--question_column"):
        D.detect_layout(["foo", "bar"])


def test_dapo_boxed_strips_instruction_and_dedups(dapo_file, tmp_path):
    out = tmp_path / "out"
    s = D.prepare(dapo_file, out, verbose=False)
    assert s["layout"] == "dapo"
    assert s["rows_read"] == 7
    assert s["dropped"] == {"duplicate": 2, "empty_question": 0, "empty_answer": 1}
    assert s["duplicate_conflicting_answer"] == 1  # the "what is 1+1" copy with answer 5
    assert s["dapo_instruction_not_found"] == 1
    assert s["written"] == {"train": 4}
    rows = read_jsonl(out / "train.jsonl")
    assert [r["answer"] for r in rows] == ["2", "3", "9", "42"]
    assert [r["id"] for r in rows] == ["idx-0", "idx-1", "idx-4", "idx-6"]
    assert all(r["source"] == "math_dapo" for r in rows)
    first = rows[0]["prompt"]
    assert first == [{"role": "user", "content": D.BOXED_INSTRUCTION.replace("{question}", "What is $1+1$?")}]
    for r in rows:
        content = r["prompt"][0]["content"]
        assert "Solve the following math problem" not in content
        assert "Remember to put your answer" not in content
        assert content.endswith("within \\boxed{}.")
    assert set(rows[0]) == {"prompt", "answer", "source", "id"}


def test_dapo_keep_instruction(dapo_file, tmp_path):
    raw = pd.read_parquet(dapo_file)
    D.prepare(dapo_file, tmp_path / "o", instruction="dapo", verbose=False)
    rows = read_jsonl(tmp_path / "o" / "train.jsonl")
    # rows with DAPO's text are unchanged byte for byte
    assert rows[0]["prompt"][0]["content"] == raw["prompt"][0][0]["content"]
    assert rows[1]["prompt"][0]["content"] == raw["prompt"][1][0]["content"]
    # the row without DAPO's text gets it added
    assert rows[-1]["prompt"][0]["content"] == dapo_text("No instruction at all: 7*6?")


def test_dapo_custom_and_none_instruction(dapo_file, tmp_path):
    D.prepare(dapo_file, tmp_path / "c", instruction="Q: {question}\nA: put it in \\boxed{}", verbose=False)
    rows = read_jsonl(tmp_path / "c" / "train.jsonl")
    assert rows[1]["prompt"][0]["content"] == "Q: Find $x$ if $2x = 6$.\nA: put it in \\boxed{}"
    D.prepare(dapo_file, tmp_path / "n", instruction="none", conversational=False, verbose=False)
    rows = read_jsonl(tmp_path / "n" / "train.jsonl")
    assert rows[1]["prompt"] == "Find $x$ if $2x = 6$."


def test_strip_dapo_instruction_tolerates_whitespace():
    text = ("solve the following math problem step by step.  The last line of your response should be of the form "
            "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n\nWhat is 2+2?\n"
            "Remember to put your answer on its own line after 'Answer:'")
    assert D.strip_dapo_instruction(text) == ("What is 2+2?", True)
    assert D.strip_dapo_instruction("Plain question?") == ("Plain question?", False)


def test_math500(math500_file, tmp_path):
    s = D.prepare(math500_file, tmp_path / "m", split_name="test", verbose=False)
    assert s["layout"] == "math500"
    assert s["dropped"] == {"duplicate": 1, "empty_question": 1, "empty_answer": 0}
    assert s["written"] == {"test": 3}
    rows = read_jsonl(tmp_path / "m" / "test.jsonl")
    assert [r["id"] for r in rows] == ["test/algebra/1.json", "test/algebra/2.json", "test/algebra/5.json"]
    assert [r["answer"] for r in rows] == ["1", "2", "2\\sqrt{3}"]
    assert all(r["source"] == "math500" for r in rows)
    assert rows[0]["prompt"][0]["role"] == "user"


def test_aime24_int_answers(aime24_file, tmp_path):
    s = D.prepare(aime24_file, tmp_path / "a", conversational=False, instruction="none", verbose=False)
    assert s["layout"] == "aime24"
    rows = read_jsonl(tmp_path / "a" / "train.jsonl")
    assert [r["answer"] for r in rows] == ["204", "25", "7"]
    assert [r["id"] for r in rows] == ["2024-I-1", "2024-I-2", "2024-II-1"]
    assert rows[0]["prompt"] == "Problem one?"
    assert all(r["source"] == "aime24" for r in rows)


def test_aime25(aime25_file, tmp_path):
    s = D.prepare(aime25_file, tmp_path / "a", verbose=False)
    assert s["layout"] == "aime25"
    assert s["dropped"]["duplicate"] == 1 and s["duplicate_conflicting_answer"] == 1
    rows = read_jsonl(tmp_path / "a" / "train.jsonl")
    assert [r["id"] for r in rows] == ["aime25-0", "aime25-1", "aime25-2", "aime25-3"]
    assert rows[0]["answer"] == "100"  # first occurrence wins


def test_generic_columns(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", generic_rows(3) + [{"q": "No answer?", "a": None, "meta": "x"}])
    s = D.prepare(path, tmp_path / "g", question_column="q", answer_column="a", verbose=False)
    assert s["layout"] == "generic"
    assert s["dropped"]["empty_answer"] == 1
    rows = read_jsonl(tmp_path / "g" / "train.jsonl")
    assert [r["answer"] for r in rows] == ["0", "3", "6"]
    assert [r["source"] for r in rows] == ["mine"] * 3
    assert rows[2]["id"] == "mine-2"
    with pytest.raises(ValueError, match="question_column"):
        D.prepare(path, tmp_path / "g2", layout="generic", verbose=False)


def test_val_split_sizes_and_determinism(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", generic_rows(20))
    kw = dict(question_column="q", answer_column="a", val_fraction=0.25, verbose=False)
    s1 = D.prepare(path, tmp_path / "s1", seed=1, **kw)
    D.prepare(path, tmp_path / "s1b", seed=1, **kw)
    D.prepare(path, tmp_path / "s2", seed=2, **kw)
    assert s1["written"] == {"train": 15, "validation": 5}
    tr, va = read_jsonl(tmp_path / "s1" / "train.jsonl"), read_jsonl(tmp_path / "s1" / "validation.jsonl")
    ids_tr, ids_va = [r["id"] for r in tr], [r["id"] for r in va]
    assert not set(ids_tr) & set(ids_va)
    assert len(set(ids_tr) | set(ids_va)) == 20
    key = lambda i: int(i.rsplit("-", 1)[1])  # noqa: E731
    assert ids_tr == sorted(ids_tr, key=key) and ids_va == sorted(ids_va, key=key)  # input order kept
    assert (tmp_path / "s1" / "validation.jsonl").read_bytes() == (tmp_path / "s1b" / "validation.jsonl").read_bytes()
    assert (tmp_path / "s1" / "validation.jsonl").read_bytes() != (tmp_path / "s2" / "validation.jsonl").read_bytes()


def test_limit_stops_early(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", generic_rows(10))
    s = D.prepare(path, tmp_path / "l", question_column="q", answer_column="a", limit=4, verbose=False)
    assert s["written"] == {"train": 4}
    assert s["rows_read"] == 4
    assert [r["id"] for r in read_jsonl(tmp_path / "l" / "train.jsonl")] == [f"g-{i}" for i in range(4)]


def test_prepare_errors(tmp_path, math500_file):
    with pytest.raises(FileNotFoundError, match="not found"):
        D.prepare(tmp_path / "nope.jsonl", tmp_path / "o", verbose=False)
    with pytest.raises(ValueError, match="Unknown layout"):
        D.prepare(math500_file, tmp_path / "o", layout="gsm8k", verbose=False)
    with pytest.raises(ValueError, match=r"needs column\(s\) \['Problem', 'Answer'\].*'unique_id'"):
        D.prepare(math500_file, tmp_path / "o", layout="aime24", verbose=False)
    with pytest.raises(ValueError, match=r"'q'.*columns|columns.*'q'|\['q'\]"):
        D.prepare(math500_file, tmp_path / "o", question_column="q", answer_column="answer", verbose=False)
    with pytest.raises(ValueError, match="question"):
        D.prepare(math500_file, tmp_path / "o", instruction="Solve it!", verbose=False)
    with pytest.raises(ValueError, match="val_fraction"):
        D.prepare(math500_file, tmp_path / "o", val_fraction=1.0, verbose=False)
    csv = tmp_path / "x.csv"
    csv.write_text("problem,answer\n1+1,2\n")
    with pytest.raises(ValueError, match="Unsupported file extension"):
        D.prepare(csv, tmp_path / "o", verbose=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        D.prepare(empty, tmp_path / "o", verbose=False)


def test_cli_main(math500_file, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = D.main(["--input", str(math500_file), "--output_dir", str(out), "--val_fraction", "0.4", "--seed", "3",
                 "--no-conversational"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rows read: 5" in printed and "duplicate=1" in printed and "empty_question=1" in printed
    assert len(read_jsonl(out / "train.jsonl")) + len(read_jsonl(out / "validation.jsonl")) == 3
    assert isinstance(read_jsonl(out / "train.jsonl")[0]["prompt"], str)
    rc = D.main(["--input", str(tmp_path / "missing.parquet"), "--output_dir", str(out)])
    assert rc == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        D.main(["--help"])
    assert exc.value.code == 0
    assert "--val_fraction" in capsys.readouterr().out


def test_prepare_data_sh(math500_file, tmp_path):
    out = tmp_path / "sh"
    env = dict(os.environ, INPUT=str(math500_file), OUTPUT_DIR=str(out), INSTRUCTION="none", VAL_FRACTION="0",
               PYTHON_BIN=sys.executable)
    res = subprocess.run(["bash", str(REPO / "run_scripts" / "prepare_data.sh"), "--no-conversational"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "-m opsd.data" in res.stdout and "--no-conversational" in res.stdout
    rows = read_jsonl(out / "train.jsonl")
    assert rows[0]["prompt"] == "Compute $\\frac{1}{2}+\\frac{1}{2}$."
    res = subprocess.run(["bash", str(REPO / "run_scripts" / "prepare_data.sh")],
                         env={k: v for k, v in env.items() if k != "INPUT"}, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0 and "INPUT" in res.stderr


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def test_load_prepared_directory(math500_file, tmp_path):
    out = tmp_path / "prep"
    D.prepare(math500_file, out, val_fraction=0.4, seed=0, verbose=False)
    ds = D.load_prompt_dataset(out)
    assert ds.column_names == ["prompt", "answer"]
    assert len(ds) == 2
    assert ds[0]["prompt"][0]["role"] == "user" and isinstance(ds[0]["prompt"][0]["content"], str)
    val = D.load_prompt_dataset(out, split="validation")
    assert len(val) == 1
    assert len(D.load_prompt_dataset(out / "train.jsonl", limit=1)) == 1


def test_load_string_prompts_and_int_answers(tmp_path):
    p = tmp_path / "p.parquet"
    pd.DataFrame({"text": ["a?", "b?", "c?"], "answer": [1, 2, 3], "other": [0, 0, 0]}).to_parquet(p)
    ds = D.load_prompt_dataset(p, prompt_column="text", limit=2)
    assert ds.column_names == ["prompt", "answer"]
    assert ds["prompt"] == ["a?", "b?"]
    assert ds["answer"] == ["1", "2"]
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"prompt": "x?"}, {"prompt": "y?"}]))
    ds = D.load_prompt_dataset(j)
    assert ds.column_names == ["prompt"] and ds["prompt"] == ["x?", "y?"]
    d = tmp_path / "single"
    d.mkdir()
    write_jsonl(d / "whatever.jsonl", [{"prompt": "z?", "answer": "1"}])
    assert D.load_prompt_dataset(d)["prompt"] == ["z?"]


def test_load_raw_dapo_uses_ground_truth(dapo_file):
    ds = D.load_prompt_dataset(dapo_file)
    assert ds["answer"][:2] == ["2", "3"]
    assert ds[0]["prompt"][0]["content"].startswith("Solve the following math problem")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="opsd.data"):
        D.load_prompt_dataset(tmp_path / "missing.jsonl")
    bad = tmp_path / "x.txt"
    bad.write_text("hi")
    with pytest.raises(ValueError, match="Unsupported file extension"):
        D.load_prompt_dataset(bad)
    p = write_jsonl(tmp_path / "cols.jsonl", [{"problem": "1+1?", "answer": "2"}])
    with pytest.raises(ValueError, match=r"columns found: \['problem', 'answer'\].*opsd.data"):
        D.load_prompt_dataset(p)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        D.load_prompt_dataset(empty)
    cases = {
        "norole": [{"prompt": [{"content": "hi"}]}],
        "badrole": [{"prompt": [{"role": "robot", "content": "hi"}]}],
        "badcontent": [{"prompt": [{"role": "user", "content": 3}]}],
        "nouser": [{"prompt": [{"role": "system", "content": "hi"}]}],
        "emptylist": [{"prompt": []}],
        "mixed": [{"prompt": "hi"}, {"prompt": [{"role": "user", "content": "hi"}]}],
        "number": [{"prompt": 5}],
        "emptystr": [{"prompt": "  "}],
    }
    for name, rows in cases.items():
        with pytest.raises(ValueError, match="row"):
            D.load_prompt_dataset(write_jsonl(tmp_path / f"{name}.jsonl", rows))
    many = tmp_path / "many"
    many.mkdir()
    write_jsonl(many / "a.jsonl", [{"prompt": "a"}])
    write_jsonl(many / "b.jsonl", [{"prompt": "b"}])
    with pytest.raises(ValueError, match="several data files"):
        D.load_prompt_dataset(many)
    write_jsonl(many / "train.jsonl", [{"prompt": "t"}])
    assert D.load_prompt_dataset(many)["prompt"] == ["t"]
    with pytest.raises(ValueError, match="limit"):
        D.load_prompt_dataset(many, limit=0)
