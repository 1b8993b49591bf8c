"""The lab's task interface (lab/tasks.py): both built-in tasks, the known positions, the generic model helpers."""

import random

import pytest
import torch

from lab import addition
from lab.models import LabConfig, build_model, completion_token_stats, default_lab_config, recovery_rate
from lab.tasks import (
    EOS_TOKEN,
    TASKS,
    AdditionTask,
    ReverseSumConfig,
    ReverseSumTask,
    first_mistake_positions,
    get_task,
)


def test_registry_and_errors():
    assert set(TASKS) == {"addition", "reverse_sum"}
    assert isinstance(get_task("reverse_sum"), ReverseSumTask)
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        get_task("chess")
    assert get_task("reverse_sum", {"digits": 4}).config.digits == 4
    with pytest.raises(ValueError, match="digits must be in 2..10"):
        ReverseSumConfig(digits=1)


def test_reverse_sum_solution_from_its_definition():
    task = ReverseSumTask()
    assert task.solution("382719=") == "917283|907970"
    rng = random.Random(0)
    for _ in range(200):
        p = task.sample_prompt(rng, None)
        digits = p[:-1]
        rev, sums = task.solution(p).split("|")
        assert rev == "".join(reversed(digits))
        assert all(int(sums[k]) == sum(int(ch) for ch in rev[: k + 1]) % 10 for k in range(len(rev)))
    with pytest.raises(ValueError, match="6-digit"):
        task.solution("12=")
    assert task.is_correct("382719=", "917283|907970")
    assert not task.is_correct("382719=", "917283|907971") and not task.is_correct("382719=", "917283|90797")


def test_prompts_are_deterministic_and_split():
    task = ReverseSumTask()
    a, b = task.make_prompts(50, seed=1), task.make_prompts(50, seed=1)
    assert a == b and len(set(a)) == 50 and a != task.make_prompts(50, seed=2)
    ev = task.make_prompts(30, split="eval")
    assert not set(ev) & set(task.make_prompts(500, split="train"))
    with pytest.raises(ValueError, match="split"):
        task.make_prompts(3, split="test")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tokenizer_and_special_ids(name):
    task = get_task(name)
    tok = task.build_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id) == (task.pad_id, task.eos_id) and tok.padding_side == "left"
    prompt = task.make_prompts(1)[0]
    text = prompt + task.solution(prompt)
    assert tok(text)["input_ids"] == task.encode(text) and tok.decode(task.encode(text)) == text
    tokens, train = task.teacher_example(prompt, random.Random(0))
    assert tokens[-1] == EOS_TOKEN and len(tokens) == len(train)
    model = build_model(default_lab_config(name).student, len(tok), task=task)
    assert model.config.vocab_size == len(task.vocab) and model.generation_config.eos_token_id == task.eos_id
    assert model.config.pad_token_id == task.pad_id


def test_first_mistake_positions_without_correction_mark_the_mistake():
    target = list("12|13") + [EOS_TOKEN]
    assert first_mistake_positions(target, list("12|13") + [EOS_TOKEN], None) == [False] * 6
    assert first_mistake_positions(target, list("12|14") + [EOS_TOKEN], None) == [False] * 4 + [True, False]
    # only the first mistake; pads (None) are skipped; nothing after EOS
    assert first_mistake_positions(target, list("22|14"), None) == [True, False, False, False, False]
    assert first_mistake_positions(target, ["1", None, "3"], None) == [False, False, True]
    assert first_mistake_positions(target, [EOS_TOKEN, "9"], None) == [True, False]


def test_first_mistake_positions_with_correction_mark_the_repair_spot():
    target = list("12:3") + [EOS_TOKEN]
    assert first_mistake_positions(target, list("19<2:3") + [EOS_TOKEN], "<") == [
        False, False, True, False, False, False, False]


def test_addition_task_is_lab_task():
    task = AdditionTask()
    tok = task.build_tokenizer()
    rng = random.Random(3)
    for _ in range(50):
        p = task.sample_prompt(rng)
        wrong = list(task.solution(p))
        wrong[1] = str((int(wrong[1]) + 1) % 10)
        ids = task.encode("".join(wrong)) + [task.eos_id]
        assert task.positions_of_interest(p, ids, tok) == addition.error_positions(p, ids, tok)
        assert task.is_correct(p, addition.solution(p)) == addition.is_correct(p, addition.solution(p))
    assert task.make_prompts(5, seed=4) == addition.make_prompts(5, addition.TaskConfig(), 4)


def test_lab_config_round_trip_per_task():
    cfg = default_lab_config("reverse_sum")
    again = LabConfig.from_dict(cfg.to_dict())
    assert again.task_name == "reverse_sum" and isinstance(again.task, ReverseSumConfig)
    assert again.cache_key() == cfg.cache_key() != default_lab_config("addition").cache_key()
    assert isinstance(LabConfig.from_dict(LabConfig(task_name="addition").to_dict()).task, addition.TaskConfig)
    with pytest.raises(ValueError, match="task_name"):
        LabConfig()  # no silent default task
    with pytest.raises(ValueError, match="no task_name"):
        LabConfig.from_dict({"teacher_steps": 3})


def test_correction_columns_only_for_a_correction_task():
    task = ReverseSumTask(ReverseSumConfig(digits=2))
    tok = task.build_tokenizer()
    model = build_model(default_lab_config("reverse_sum").student, len(tok), task=task).eval()
    prompts = task.make_prompts(3)
    comps = [torch.tensor(task.encode(task.solution(p)) + [task.eos_id]) for p in prompts]
    stats = completion_token_stats(model, model, tok, prompts, comps, correction_id=task.correction_id)
    assert set(stats[0]) == {"kl", "entropy"}
    torch.testing.assert_close(torch.cat([s["kl"] for s in stats]), torch.zeros(sum(len(c) for c in comps)),
                               atol=1e-5, rtol=0)
    assert recovery_rate(model, prompts, task=task) == {}


def test_register_task_is_the_one_registry():
    from lab.tasks import KNOWN_TASKS, REGISTRY, register_task

    class Other(ReverseSumTask):
        name = "reverse_sum_other"

    try:
        register_task(Other, lab_settings={"teacher_steps": 7}, study=False)
        # the views see it at once (no copy made at import), the study's default list does not
        assert "reverse_sum_other" in KNOWN_TASKS and "reverse_sum_other" not in TASKS
        assert isinstance(get_task("reverse_sum_other"), Other)
        cfg = default_lab_config("reverse_sum_other")
        assert cfg.teacher_steps == 7 and isinstance(cfg.task, ReverseSumConfig)
        with pytest.raises(ValueError, match="already registered"):
            class Clash(ReverseSumTask):
                name = "reverse_sum_other"

            register_task(Clash)
        with pytest.raises(ValueError, match="may not set"):
            register_task(Other, lab_settings={"task_name": "x"}, replace=True)
    finally:
        REGISTRY.pop("reverse_sum_other", None)
    with pytest.raises(ValueError, match="unknown task 'reverse_sum_other'"):
        default_lab_config("reverse_sum_other")


def test_teacher_and_student_have_separate_cache_keys():
    cfg = default_lab_config("addition")
    retuned = LabConfig.from_dict({**cfg.to_dict(), "student_target_em": 0.2, "student_steps": 500})
    assert retuned.role_key("teacher") == cfg.role_key("teacher")
    assert retuned.role_key("student") != cfg.role_key("student")
    bigger = LabConfig.from_dict({**cfg.to_dict(), "teacher_steps": 900})
    assert bigger.role_key("student") == cfg.role_key("student") and bigger.role_key("teacher") != cfg.role_key(
        "teacher")
    # the calibration thresholds decide acceptance, not the weights: no key changes
    loose = LabConfig.from_dict({**cfg.to_dict(), "teacher_min_em": 0.5, "student_em_tolerance": 0.3})
    assert (loose.cache_key(), loose.role_key("teacher"), loose.role_key("student")) == (
        cfg.cache_key(), cfg.role_key("teacher"), cfg.role_key("student"))


def test_calibration_misses_are_errors_with_the_numbers():
    from lab.models import CalibrationError, check_calibration

    cfg = default_lab_config("reverse_sum")  # target 0.15, tolerance 0.1, teacher >= 0.9
    with pytest.raises(CalibrationError, match=r"exact match 0.8 < teacher_min_em 0.9"):
        check_calibration("teacher", {"exact_match": 0.8, "steps": 600, "final_loss": 0.1}, cfg)
    check_calibration("teacher", {"exact_match": 0.95, "steps": 600, "final_loss": 0.1}, cfg)
    with pytest.raises(CalibrationError, match="never reached student_target_em 0.15 in 800 steps"):
        check_calibration("student", {"stopped_early": False, "last_check": 0.05, "max_steps": 800,
                                      "check_history": [[798, 0.04], [800, 0.05]]}, cfg)
    with pytest.raises(CalibrationError, match="dev exact match 0.400, more than student_em_tolerance 0.1"):
        check_calibration("student", {"stopped_early": True, "last_check": 0.4, "steps": 200,
                                      "check_history": [[198, 0.0], [200, 0.4]]}, cfg)
    check_calibration("student", {"stopped_early": True, "last_check": 0.125, "steps": 194}, cfg)


def test_a_teacher_that_misses_calibration_is_not_cached(tmp_path):
    import os

    from lab.models import CalibrationError, ModelSize, prepare_lab_models

    cfg = LabConfig(task=ReverseSumConfig(digits=3), task_name="reverse_sum", teacher=ModelSize(1, 64, 2, 128),
                    student=ModelSize(1, 64, 2, 128), teacher_steps=2, student_steps=2, student_target_em=None,
                    batch_size=8, n_eval=8, n_train_prompts=16, num_threads=1, teacher_min_em=0.99)
    with pytest.raises(CalibrationError, match="teacher of task 'reverse_sum' missed its calibration target"):
        prepare_lab_models(str(tmp_path), cfg, progress=False)
    assert [d for d in os.listdir(tmp_path) if not d.startswith(".")] == []
    assert [d for d in os.listdir(tmp_path) if d.startswith(".")] == []  # no half-written work dirs either
