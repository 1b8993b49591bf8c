"""opsd.evaluate on tiny in-process models: pass@k estimator, end-to-end CLI, determinism, LoRA adapters, chat
prompts and clear errors."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import pytest

from opsd import evaluate as E
from support import make_model, make_tokenizer, write_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--k", "4", "--max_new_tokens", "6", "--batch_size", "5", "--no_progress"]


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def contains_one(completion, answer):
    return 1.0 if "1" in completion else 0.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_model")
    tok = make_tokenizer()
    path = str(root / "model")
    make_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(str(tmp_path_factory.mktemp("eval_data") / "arith.jsonl"), n=3)


def read(path):
    with open(path) as f:
        return json.load(f)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert E.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert E.pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    with pytest.raises(ValueError):
        E.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        E.pass_at_k(4, 1, 5)
    assert E.pass_at_k_values(16) == [1, 2, 4, 8, 16]
    assert E.pass_at_k_values(6) == [1, 2, 4, 6]


def test_summarize_records():
    records = [{"rewards": [1.0, 0.0, 0.0, 0.0], "correct": 1, "lengths": [3, 6, 6, 2], "truncated": [0, 1, 1, 0]},
               {"rewards": [1.0, 1.0, 1.0, 1.0], "correct": 4, "lengths": [1, 1, 1, 1], "truncated": [0, 0, 0, 0]}]
    m = E.summarize_records(records, 4)
    assert m["mean@4"] == pytest.approx((0.25 + 1.0) / 2)
    assert m["pass@1"] == pytest.approx(m["mean@4"])
    assert m["pass@4"] == pytest.approx(1.0)
    assert m["pass@2"] == pytest.approx((brute_force_pass_at_k(4, 1, 2) + 1.0) / 2)
    assert m["mean_length"] == pytest.approx(21 / 8)
    assert m["truncated_fraction"] == pytest.approx(2 / 8)
    assert m["std_err"] == pytest.approx((0.625 * 0.375 / 2) ** 0.5)


def test_cli_end_to_end_is_deterministic(model_dir, prompts, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        assert E.main(["--model", model_dir, "--data", prompts, "--output_dir", out, *SMALL]) == 0
        outs.append(out)
    summary = read(os.path.join(outs[0], "eval_summary.json"))
    detail = read(os.path.join(outs[0], "eval_arith.json"))
    def numbers(s):
        return {k: v for k, v in s["benchmarks"]["arith"].items() if not k.endswith("_seconds")}

    assert numbers(summary) == numbers(read(os.path.join(outs[1], "eval_summary.json")))
    assert detail["records"] == read(os.path.join(outs[1], "eval_arith.json"))["records"]
    m = summary["benchmarks"]["arith"]
    assert m["n_problems"] == 3 and m["k"] == 4 and 0.0 <= m["mean@4"] <= 1.0 and 0.0 <= m["pass@4"] <= 1.0
    assert summary["settings"]["k"] == 4 and summary["settings"]["seed"] == 0 and "| arith | 3 | 4 |" in summary[
        "table_markdown"]
    assert [r["answer"] for r in detail["records"]] == ["1", "3", "5"]
    for r in detail["records"]:
        assert len(r["completions"]) == len(r["rewards"]) == len(r["lengths"]) == 4
        for length, truncated in zip(r["lengths"], r["truncated"]):
            assert 1 <= length <= 6 and (not truncated or length == 6)
    # a different seed samples different completions
    out = str(tmp_path / "c")
    assert E.main(["--model", model_dir, "--data", prompts, "--output_dir", out, *SMALL[:-3], "--seed", "1",
                   "--batch_size", "5", "--no_progress"]) == 0
    assert read(os.path.join(out, "eval_arith.json"))["records"] != detail["records"]


def test_api_with_stub_reward_gives_accuracy(model_dir, prompts):
    model, tok = E.load_model_and_tokenizer(model_dir)
    data = E.load_benchmark(prompts)
    out = E.evaluate(model, tok, data, k=6, temperature=1.0, top_p=1.0, max_new_tokens=6, batch_size=7, seed=3,
                     reward_fn=contains_one, progress=False)
    m, records = out["metrics"], out["records"]
    assert 0.0 < m["mean@6"] <= 1.0
    expected = sum(sum(r["rewards"]) / 6 for r in records) / len(records)
    assert m["mean@6"] == pytest.approx(expected)
    assert m["pass@6"] >= m["pass@4"] >= m["pass@1"] - 1e-12
    for r in records:
        assert r["rewards"] == [contains_one(c, None) for c in r["completions"]]
        assert r["correct"] == sum(r["rewards"])
    # the stored texts can be cut without changing the scores
    cut = E.evaluate(model, tok, data, k=6, max_new_tokens=6, batch_size=7, seed=3, reward_fn=contains_one,
                     progress=False, max_completion_chars=0)
    assert cut["metrics"]["mean@6"] == m["mean@6"] and cut["records"][0]["completions"] == []


def test_greedy_samples_are_identical(model_dir, prompts):
    model, tok = E.load_model_and_tokenizer(model_dir)
    out = E.evaluate(model, tok, E.load_benchmark(prompts, limit=2), k=3, temperature=0.0, max_new_tokens=5,
                     batch_size=4, progress=False)
    assert len(out["records"]) == 2
    for r in out["records"]:
        assert len(set(r["completions"])) == 1


def test_lora_adapter_dir_evaluates(model_dir, prompts, tmp_path):
    from peft import LoraConfig, get_peft_model

    from opsd.core.models import load_causal_lm

    base = load_causal_lm(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    assert os.path.isfile(os.path.join(adapter, "adapter_config.json"))
    out = str(tmp_path / "eval")
    assert E.main(["--model", adapter, "--base_model", model_dir, "--data", prompts, "--output_dir", out,
                   *SMALL]) == 0
    summary = read(os.path.join(out, "eval_summary.json"))
    assert summary["settings"]["adapter"] is True and summary["benchmarks"]["arith"]["n_problems"] == 3
    # the base recorded in adapter_config.json is used when --base_model is absent
    cfg_path = os.path.join(adapter, "adapter_config.json")
    cfg = read(cfg_path)
    cfg["base_model_name_or_path"] = model_dir
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    assert E.main(["--model", adapter, "--data", prompts, "--output_dir", str(tmp_path / "eval2"), *SMALL]) == 0
    assert read(os.path.join(tmp_path / "eval2", "eval_arith.json"))["records"] == read(
        os.path.join(out, "eval_arith.json"))["records"]
    # an unknown base is a clear error
    cfg["base_model_name_or_path"] = str(tmp_path / "nowhere")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(FileNotFoundError, match="--base_model"):
        E.load_model_and_tokenizer(adapter)


def test_chat_prompts_use_template_and_enable_thinking(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking is defined and enable_thinking %}a{% endif %}")
    path = str(tmp_path / "model")
    make_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    data = write_prompts(str(tmp_path / "chat.jsonl"), n=2, conversational=True)
    _, tok = E.load_model_and_tokenizer(path)
    prompt = [{"role": "user", "content": "1+2="}]
    plain = E.tokenize_prompts(tok, [prompt])[0]
    thinking = E.tokenize_prompts(tok, [prompt], {"enable_thinking": True})[0]
    assert plain == tok("1+2=")["input_ids"] and thinking == plain + tok("a")["input_ids"]
    out = str(tmp_path / "eval")
    assert E.main(["--model", path, "--data", f"chat2={data}", "--output_dir", out, "--enable_thinking",
                   *SMALL]) == 0
    summary = read(os.path.join(out, "eval_summary.json"))
    assert summary["settings"]["enable_thinking"] is True and "chat2" in summary["benchmarks"]
    assert read(os.path.join(out, "eval_chat2.json"))["records"][0]["prompt"] == [{"role": "user",
                                                                                   "content": "0+1="}]


def test_data_specs_and_errors(model_dir, prompts, tmp_path, capsys):
    split_dir = tmp_path / "math500"
    split_dir.mkdir()
    test_file = write_prompts(str(split_dir / "test.jsonl"), n=2)
    specs = E.parse_data_specs([prompts, f"other={prompts}", test_file])
    assert [n for n, _ in specs] == ["arith", "other", "math500"]
    assert E.parse_data_specs([str(split_dir)]) == [("math500", str(split_dir))]
    assert list(E.load_benchmark(str(split_dir))["answer"]) == ["1", "3"]
    with pytest.raises(ValueError, match="twice"):
        E.parse_data_specs([prompts, prompts])
    assert E.main(["--model", model_dir, "--data", str(tmp_path / "missing.jsonl"), *SMALL]) == 2
    assert "not found" in capsys.readouterr().err
    assert E.main(["--model", str(tmp_path / "no_model"), "--data", prompts, *SMALL]) == 2
    no_answer = tmp_path / "noanswer.jsonl"
    no_answer.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    assert E.main(["--model", model_dir, "--data", str(no_answer), "--output_dir", str(tmp_path / "o"),
                   *SMALL]) == 2
    assert "answer" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_backend_without_vllm_is_a_clear_error(model_dir, prompts, tmp_path, capsys):
    assert E.main(["--model", model_dir, "--data", prompts, "--backend", "vllm", "--output_dir",
                   str(tmp_path / "o"), *SMALL]) == 2
    assert "vllm" in capsys.readouterr().err


def test_shell_wrapper(model_dir, prompts, tmp_path):
    env = dict(os.environ, MODEL_PATH=model_dir, DATA_FILES=f"{prompts} {tmp_path / 'missing.jsonl'}", K="2",
               MAX_NEW_TOKENS="4", BATCH_SIZE="4", OUTPUT_DIR=str(tmp_path / "sh"), LIMIT="2",
               PYTHON_BIN=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "run_scripts", "eval_math.sh"), "--no_progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "+ " in proc.stdout and "--max_new_tokens 4" in proc.stdout and "skipped" in proc.stderr
    assert read(str(tmp_path / "sh" / "eval_summary.json"))["benchmarks"]["arith"]["n_problems"] == 2
    env["DATA_FILES"] = str(tmp_path / "missing.jsonl")
    proc = subprocess.run(["bash", os.path.join(ROOT, "run_scripts", "eval_math.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "none of DATA_FILES" in proc.stderr


def test_collapse_signals_and_teacher_nll(model_dir, prompts, tmp_path, capsys):
    """eot_rate / clipped_ratio / distinct-n are reported for every benchmark; with --teacher the teacher's greedy
    text is cached next to the results and the model's NLL of it equals a float64 recomputation."""
    import torch

    from opsd.collapse import distinct_n

    teacher_dir = str(tmp_path / "teacher")
    tok = make_tokenizer()
    make_model(len(tok), seed=7, head_scale=6.0).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    out = str(tmp_path / "ev")
    args = ["--model", model_dir, "--data", prompts, "--output_dir", out, "--teacher", teacher_dir, *SMALL]
    assert E.main(args) == 0
    m = read(os.path.join(out, "eval_summary.json"))["benchmarks"]["arith"]
    assert m["eot_rate"] == pytest.approx(1 - m["truncated_fraction"])
    assert m["clipped_ratio"] == pytest.approx(m["truncated_fraction"])
    for n in (1, 2, 3):
        assert 0.0 < m[f"distinct_{n}"] <= 1.0
    cache = os.path.join(out, "teacher_text_arith.json")
    cached = read(cache)
    assert len(cached["teacher_ids"]) == 3 and cached["max_new_tokens"] == 6
    model, _ = E.load_model_and_tokenizer(model_dir)
    total, count = 0.0, 0
    for p, c in zip(cached["prompt_ids"], cached["teacher_ids"]):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        total -= sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c))
        count += len(c)
    assert m["teacher_nll"] == pytest.approx(total / count, rel=1e-5)
    # the cache is reused (same prompts and length), and the table shows the new columns
    stamp = os.path.getmtime(cache)
    assert E.main(args) == 0 and os.path.getmtime(cache) == stamp
    assert "end-of-turn" in read(os.path.join(out, "eval_summary.json"))["table_markdown"]
    detail = read(os.path.join(out, "eval_arith.json"))
    assert all(len(r["lengths"]) == 4 for r in detail["records"])
    assert distinct_n([[1, 2, 3]], 1) == 1.0
    # a teacher that is not a directory is an error before anything loads
    capsys.readouterr()
    assert E.main(["--model", model_dir, "--data", prompts, "--teacher", str(tmp_path / "nope"), *SMALL]) == 2
    assert "--teacher" in capsys.readouterr().err
