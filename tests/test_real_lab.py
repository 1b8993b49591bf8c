"""The real-model lab (lab.real_task, lab.real_lab): its measurements against direct float64 references, and one
short run of the whole real path (shipped adapter merged, probe, census, OPD through the real trainer)."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lab import real_lab, real_task


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return AutoTokenizer.from_pretrained(real_model_dir)


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    """Random weights, the real vocabulary (49152), width 64."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_rows_use_the_chat_template_and_sft_targets_end_the_turn(tokenizer):
    rows = real_task.task_rows("train", 3)
    train_questions = {r["prompt"][0]["content"] for r in real_task.task_rows("train", 4000)}
    held_out = real_task.task_rows("eval", 20)
    assert len(held_out) == 20 and not {r["prompt"][0]["content"] for r in held_out} & train_questions
    ids, labels = real_task.sft_example(tokenizer, rows[0])
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n" in text
    target = tokenizer.decode([t for t in labels if t != -100])
    assert target == real_task.teacher_answer(rows[0]["expression"], rows[0]["answer"]) + "<|im_end|>"
    assert labels[-1] == real_task.end_of_turn_id(tokenizer) and len(ids) == len(labels)
    # the prompt part is exactly what generation starts from
    assert ids[: len(real_task.prompt_ids(tokenizer, rows[:1])[0])] == real_task.prompt_ids(tokenizer, rows[:1])[0]


def _reference_logprobs(model, prompt, completion):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(completion) - 1], dim=-1)


def test_kl_and_nll_match_a_float64_reference_per_sequence(tokenizer):
    student, teacher = _tiny_llama(0), _tiny_llama(1)
    rows = real_task.task_rows("eval", 3)
    prompts = real_task.prompt_ids(tokenizer, rows)
    completions = [[17, 18, 19, 2], [21], [30, 31, 32, 33, 34, 35, 36]]  # ragged: right padding must not leak
    kl = real_task.reverse_kl_per_row(student, teacher, tokenizer, prompts, completions, batch_size=2)
    nll = real_task.nll_per_row(student, tokenizer, prompts, completions, batch_size=3)
    for p, c, k, n in zip(prompts, completions, kl, nll):
        ls, lt = _reference_logprobs(student, p, c), _reference_logprobs(teacher, p, c)
        expected_kl = (ls.exp() * (ls - lt)).sum(-1)
        expected_nll = -ls[torch.arange(len(c)), torch.tensor(c)]
        assert len(k) == len(n) == len(c)
        np.testing.assert_allclose(k, expected_kl.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(n, expected_nll.numpy(), rtol=1e-4, atol=1e-4)
    assert all(x > 0 for row in kl for x in row)  # different models: every position has a positive KL


def test_first_departures_find_the_first_token_off_the_teachers_answer(tokenizer):
    row = real_task.task_rows("eval", 1)[0]
    target = tokenizer(real_task.teacher_answer(row["expression"], row["answer"]), add_special_tokens=False)["input_ids"]
    target = list(target) + [real_task.end_of_turn_id(tokenizer)]
    wrong = list(target)
    wrong[3] = (wrong[3] + 1) % 49152
    cases = [target, wrong, target[:2], target[:-1] + [5, 6], []]
    got = real_lab.first_departures(tokenizer, [row] * len(cases), cases)
    assert got == [None, 3, None, len(target) - 1, None]


def test_bad_flags_are_one_line_errors(capsys):
    for argv, flag in ((["--configs", "nope"], "--configs"), (["--steps", "0"], "--steps"),
                       (["--configs", "soft_or@0.2"], "--configs"), (["--adapter", "r99"], "--adapter")):
        assert real_lab.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and flag in err and "Traceback" not in err


def test_real_lab_smoke_run_through_the_real_trainer(tmp_path, real_model_dir):
    """Two OPD steps of all tokens and soft_or on the shipped pair, tiny lengths: every stage runs and reports."""
    settings = real_lab.RealSettings(steps=1, batch_size=2, max_new_tokens=6, n_train=4, n_eval=2, n_probe=1,
                                     workers=1, bootstrap=50)
    result = real_lab.run_real_lab(str(tmp_path / "out"), settings, ("all_tokens", "soft_or@0.2"),
                                   cache_dir=real_model_dir.parent, log=lambda m: None)
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "report.json").is_file()
    assert {r["config"] for r in result["runs"]} == {"all_tokens", "soft_or@0.2"}
    for r in result["runs"]:
        assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 1
        assert math.isfinite(r["after"]["kl"]) and math.isfinite(r["after"]["teacher_nll"])
    assert 0 < result["runs"][1]["kept_fraction"] < 1  # soft_or kept a part of the tokens
    assert result["before"]["kl"] > 0  # the merged teacher differs from the student
    assert set(result["census"]["all"]) == {"Q1", "Q2", "Q3", "Q4"}
    assert math.isclose(sum(result["census"]["all"].values()), 1.0, abs_tol=1e-9)
    assert result["probe"]["verdict"]["summary"]
    # lab.study's summary, claims and recommendation check read the real runs
    rows = {row["config"]: row for row in result["table"]}
    assert rows["all_tokens"]["time_ratio"] == 1.0 and rows["soft_or@0.2"]["time_ratio"] > 0
    assert {"vs_start", "vs_all_equal_steps", "vs_all_equal_time"} <= set(rows["soft_or@0.2"])
    assert result["census"]["recommendation"]["config"] in real_lab.CONFIGS
    assert result["recommendation_check"]["verdict"] in ("best", "tied", "worse", "not run")
    assert any(row[real_lab.TASK_NAME] != "not run" for row in result["claims"])


def test_fixed_context_diagnostic_runs_on_chat_prompts_and_summarizes(tokenizer, tmp_path):
    student, teacher = _tiny_llama(0), _tiny_llama(1)
    settings = real_lab.RealSettings(max_new_tokens=4, diagnostic_contexts=4, diagnostic_steps=1)
    report = real_lab.fixed_context_diagnostic(student, teacher, tokenizer, real_task.task_rows("train", 4), settings,
                                               str(tmp_path))
    assert report["bank"]["contexts"] == 4 and (tmp_path / "diagnostic").is_dir()
    assert {r["selector"] for r in report["runs"]} >= {"random", "divergence_topk", "soft_or", "teachability"}
    lines = real_lab.diagnostic_summary(report)
    assert any("teachability" in line.lower() for line in lines) and len(lines) > 6
