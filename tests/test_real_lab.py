"""The real-model lab (lab.real_task, lab.real_lab): its measurements against direct float64 references, and one
short run of the whole real path (shipped adapter merged, probe, census, OPD through the real trainer)."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lab import real_lab, real_task
from opsd.preflight import UserError


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


def test_resume_keeps_finished_runs_and_refuses_other_settings(tmp_path):
    out = str(tmp_path / "lab")
    (tmp_path / "lab").mkdir()
    settings = real_lab.RealSettings(steps=3, seeds=(0,))
    assert real_lab._previous_runs(out, settings, "r8-all", resume=False) == []
    (tmp_path / "lab" / "runs.jsonl").write_text('{"config": "all_tokens", "seed": 0}\n')
    more_seeds = real_lab.RealSettings(steps=3, seeds=(0, 1, 2), workers=2)  # seeds and workers may change
    assert real_lab._previous_runs(out, more_seeds, "r8-all", resume=True) == [{"config": "all_tokens", "seed": 0}]
    with pytest.raises(UserError) as err:
        real_lab._previous_runs(out, real_lab.RealSettings(steps=4), "r8-all", resume=True)
    assert "steps 3 there, 4 now" in str(err.value)
    assert real_lab._previous_runs(out, settings, "r8-all", resume=False) == []  # a fresh lab starts the file again
    assert not (tmp_path / "lab" / "runs.jsonl").exists()


def test_collapse_check_flags_a_drifting_run_and_not_a_healthy_one():
    before = {"teacher_nll": 0.8, "eot": 1.0, "distinct_2": 0.7}
    falling = [3.0, 2.8, 2.5, 2.0, 1.5, 1.2]
    drifted = {"after": {"teacher_nll": 1.2, "eot": 0.3, "distinct_2": 0.1}, "losses": falling}
    report = real_lab.collapse_check(before, drifted)
    assert report is not None and {"teacher_nll", "eot_rate"} <= set(report["signals"])
    assert math.isclose(report["signals"]["teacher_nll"]["relative_change"], 0.5)
    healthy = {"after": {"teacher_nll": 0.2, "eot": 1.0, "distinct_2": 0.2}, "losses": falling}  # format learnt
    assert real_lab.collapse_check(before, healthy) is None
    flat = {"after": drifted["after"], "losses": [2.0, 2.0, 2.0, 2.0]}  # the loss did not fall: not this failure
    assert real_lab.collapse_check(before, flat) is None


def test_probe_check_says_when_the_outcome_contradicts_the_verdict():
    def report(compatible, lo, hi):
        return {"probe": {"verdict": {"compatible": compatible, "new_capability": True, "shared_mass": 0.8},
                          "compatible_mass": 0.9},
                "table": [{"config": "all_tokens", "vs_start": {"mean": (lo + hi) / 2, "lo": lo, "hi": hi}}]}

    assert "contradicted" in real_lab.probe_check(report(False, 0.1, 0.4))[0]
    assert "predicted OPD stalls" in real_lab.probe_check(report(False, 0.1, 0.4))[0]
    assert "agrees" in real_lab.probe_check(report(False, -0.1, 0.2))[0]
    assert "agrees" in real_lab.probe_check(report(True, 0.1, 0.4))[0]
    assert real_lab.probe_check({"probe": {"verdict": {}}, "table": []}) == []


def test_cross_task_adds_the_real_task_to_the_studys_claims_and_moonshot(capsys):
    """The shipped study claims (addition, reverse_sum) and the shipped real demo report merge into one table; the
    moonshot verdict is recomputed over the three tasks."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    study = json.loads((root / "lab/results/study/controls40_claims.json").read_text())
    real = json.loads((root / "lab/results/real/demo.json").read_text())
    x = real_lab.cross_task(study, real)
    assert x["tasks"] == sorted(["addition", "reverse_sum", real_lab.TASK_NAME])
    soft_or = next(m for m in x["moonshot"] if m["config"] == "soft_or@0.2")
    assert set(soft_or["tasks"]) == set(x["tasks"]) and soft_or["complete"] and not soft_or["met"]
    real_row = next(r for r in real["table"] if r["config"] == "soft_or@0.2")
    assert soft_or["tasks"][real_lab.TASK_NAME]["lo"] == real_row["vs_all_equal_steps"]["lo"]
    only_synthetic = next(m for m in x["moonshot"] if m["config"] == "position_first@0.3")
    assert not only_synthetic["complete"]  # not run on the real task: cannot meet the bar
    claim = next(c for c in x["claims"] if c["claim"].startswith("soft-OR 20% matches all tokens"))
    assert claim[real_lab.TASK_NAME] != "not run" and claim["addition"].startswith("holds")
    assert real_lab.main(["--cross_task", str(root / "lab/results/study/controls40_claims.json"),
                          str(root / "lab/results/real/demo.json")]) == 0
    assert "| claim | addition | real_chain_sum | reverse_sum |" in capsys.readouterr().out
    assert real_lab.main(["--cross_task", "missing.json", "missing.json"]) == 2
