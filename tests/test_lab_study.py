"""A seconds-long version of the lab's study on both built-in tasks: every step runs (lab models in worker processes,
selector probe, OPD runs through the real trainer in worker processes, equal-compute checkpoints, paired bootstrap
comparisons, per-task and cross-task reports)."""

import json
import os

import numpy as np
import pytest

from lab.models import LabConfig, ModelSize
from lab.study import CONFIGS, StudySettings, compute_ratio, equal_compute_flags, main, paired_interval, run_study
from lab.tasks import ReverseSumConfig


def tiny_labs():
    common = dict(teacher=ModelSize(1, 64, 2, 128), student=ModelSize(1, 64, 2, 128), teacher_steps=40,
                  student_steps=2, student_target_em=None, batch_size=16, n_eval=8, n_train_prompts=32, num_threads=1,
                  teacher_min_em=None)
    return {"addition": LabConfig(task_name="addition", **common),
            "reverse_sum": LabConfig(task=ReverseSumConfig(digits=3), task_name="reverse_sum", **common)}


CONFIG_NAMES = ("all_tokens", "raw_kl@0.1", "teachability_minmax@0.1", "random@0.2")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    settings = StudySettings(seeds=(0, 1), steps=10, batch_size=8, learning_rate=3e-3, n_eval=8, n_probe=6,
                             workers=2, bootstrap=200)
    out = str(root / "out")
    result = run_study(out, settings, [CONFIGS[n] for n in CONFIG_NAMES], cache_dir=str(root / "cache"),
                       lab_configs=tiny_labs(), progress=False)
    return result, out, root


def test_study_writes_per_task_and_cross_task_reports(study):
    result, out, _ = study
    assert set(result["tasks"]) == {"addition", "reverse_sum"}
    for task in ("addition", "reverse_sum"):
        with open(os.path.join(out, task, "report.json")) as f:
            report = json.load(f)
        assert [row["config"] for row in report["summary"]] == list(CONFIG_NAMES)
        assert len(report["runs"]) == len(CONFIG_NAMES) * 2
        for run in report["runs"]:
            assert 0.0 <= run["exact_match"] <= 1.0 and run["heldout_kl"] >= 0.0
            assert run["kept_tokens"] <= run["generated_tokens"] + 1e-6
            assert len(run["correct"]) == 8
        by_name = {row["config"]: row for row in report["summary"]}
        assert by_name["all_tokens"]["kept_fraction"] == 1.0 and by_name["all_tokens"]["compute_ratio"] == 1.0
        assert by_name["raw_kl@0.1"]["kept_fraction"] < 0.5
        for name in CONFIG_NAMES[1:]:
            row = by_name[name]
            for key in ("vs_all_equal_steps", "vs_all_equal_compute", "vs_all_equal_time"):
                iv = row[key]
                assert iv["lo"] - 1e-12 <= iv["mean"] <= iv["hi"] + 1e-12, (name, key)
        probe = report["probe"]
        assert set(probe["selectors"]) == set(CONFIG_NAMES)
        assert abs(sum(probe["census_all"].values()) - 1.0) < 1e-6
        assert "K=4" in probe["spread"] and probe["spread"]["K=4"]["support_mass"]["min"] <= 1.0
        text = open(os.path.join(out, task, "report.md")).read()
        assert "| raw_kl@0.1 |" in text and "vs all, equal measured time" in text
        assert "vs all, equal lm_head compute" in text
        # measured compute: every run's CPU seconds per step, cumulative and increasing; the all-token run is
        # evaluated on the equal-time grid
        for run in report["runs"]:
            cum = run["cpu_at_step"]
            assert len(cum) == 10 and all(b >= a for a, b in zip(cum, cum[1:])) and cum[-1] == run["train_cpu_seconds"]
        base = next(r for r in report["runs"] if r["config"] == "all_tokens")
        assert {"1", "2", "9"} <= set(base["checkpoints"])
        assert by_name["raw_kl@0.1"]["time_ratio"] > 0
        plots = result["tasks"][task]["plots"]
        assert plots and all(os.path.getsize(p) > 1000 for p in plots)
    text = open(os.path.join(out, "report.md")).read()
    assert "Which conclusions hold" in text and "| addition | reverse_sum |" in text
    claims = json.load(open(os.path.join(out, "claims.json")))
    assert any(c["claim"].startswith("OPD (all tokens)") for c in claims["claims"])
    assert "Moonshot" in text and {m["config"] for m in claims["moonshot"]} == set(CONFIG_NAMES[1:])
    assert len(open(os.path.join(out, "runs.jsonl")).read().splitlines()) == len(CONFIG_NAMES) * 2 * 2


def test_training_moves_the_student_towards_the_teacher(study):
    """Fails when training does nothing: all-token OPD must lower the held-out KL(student || teacher) from the warm
    start on every seed, the per-step logs must show weight updates changing the loss, and the all-token run's
    equal-compute checkpoints must exist. (Measured: 0.96 -> 0.46 on the tiny addition lab.)"""
    result, _, _ = study
    for task, res in result["tasks"].items():
        start_kl = res["start"]["heldout_kl"]
        runs = [r for r in res["runs"] if r["config"] == "all_tokens"]
        assert sum(r["heldout_kl"] for r in runs) / len(runs) < 0.9 * start_kl, task
        for r in runs:
            assert r["heldout_kl"] < start_kl, (task, r["seed"], r["heldout_kl"], start_kl)
            assert "0" in r["checkpoints"] and str(res["settings"]["steps"]) in r["checkpoints"]
            kls = [r["checkpoints"][s]["heldout_kl"] for s in sorted(r["checkpoints"], key=int)]
            assert kls[-1] < kls[0], (task, kls)
        assert res["equal_compute_steps"], task  # selective runs cost less than a full step


def test_lab_models_are_cached_per_task(study, tmp_path):
    _, _, root = study
    again = run_study(str(tmp_path / "again"), StudySettings(seeds=(0,), steps=1, batch_size=4, n_eval=4, n_probe=4,
                                                             workers=1, bootstrap=10),
                      [CONFIGS["all_tokens"]], cache_dir=str(root / "cache"), tasks=["reverse_sum"],
                      lab_configs=tiny_labs(), progress=False)
    assert again["tasks"]["reverse_sum"]["lab"]["cached"]
    assert sorted(d.split("-")[1] for d in os.listdir(root / "cache") if d.startswith("lab-")) == [
        "addition", "reverse_sum"]


def test_compute_ratio_and_equal_compute_interpolation():
    assert compute_ratio(CONFIGS["all_tokens"], 1.0) == 1.0
    assert compute_ratio(CONFIGS["raw_kl@0.1"], 0.1) == pytest.approx((2 + 0.6) / 6)
    assert compute_ratio(CONFIGS["random@0.2"], 0.2) == pytest.approx(0.2)  # no statistics pass needed
    runs = {0: {"checkpoints": {"0": {"correct": [0, 0, 1]}, "10": {"correct": [1, 0, 1]},
                                "20": {"correct": [1, 1, 1]}}}}
    np.testing.assert_allclose(equal_compute_flags(runs, 0, 20, 0.25), [0.5, 0, 1])
    np.testing.assert_allclose(equal_compute_flags(runs, 0, 20, 0.5), [1, 0, 1])
    np.testing.assert_allclose(equal_compute_flags(runs, 0, 20, 0.75), [1, 0.5, 1])


def test_paired_interval_is_a_bootstrap_of_the_paired_mean():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, (3, 200)).astype(float)
    iv = paired_interval(a, a, 100)
    assert iv == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    b = np.zeros((3, 200))
    iv = paired_interval(a, b, 500)
    assert iv["mean"] == pytest.approx(a.mean())
    assert iv["lo"] < a.mean() < iv["hi"] and iv["hi"] - iv["lo"] < 0.3
    assert paired_interval(np.ones((2, 50)), b[:2, :50], 50)["lo"] == 1.0


def test_cli_rejects_unknown_configs_and_tasks(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--configs", "magic@0.1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --configs: unknown ['magic@0.1']") and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["--task", "chess"])
    assert "invalid choice" in capsys.readouterr().err


def test_equal_time_step_against_direct_interpolation():
    from lab.study import equal_time_step

    cum = [2.0, 4.0, 7.0, 8.0]  # cumulative measured seconds after steps 1..4
    assert equal_time_step(cum, 0.0) == (0.0, False)
    assert equal_time_step(cum, 1.0) == (pytest.approx(0.5), False)
    assert equal_time_step(cum, 4.0) == (pytest.approx(2.0), False)
    assert equal_time_step(cum, 5.5) == (pytest.approx(2.5), False)  # 4 s at step 2, 7 s at step 3
    assert equal_time_step(cum, 7.5) == (pytest.approx(3.5), False)
    assert equal_time_step(cum, 9.0) == (4.0, True)  # the all-token run finished sooner: capped at its last step
    runs = {0: {"cpu_at_step": cum, "checkpoints": {"0": {"correct": [0, 0]}, "2": {"correct": [1, 0]},
                                                    "4": {"correct": [1, 1]}}}}
    from lab.study import equal_time_flags

    flags, step, capped = equal_time_flags(runs, 0, 7.5)
    assert step == pytest.approx(3.5) and not capped
    np.testing.assert_allclose(flags, [1.0, 0.75])


TASK_MODULE = '''
from dataclasses import dataclass

from lab.models import ModelSize
from lab.tasks import Task, register_task


@dataclass
class CopyConfig:
    digits: int = 3
    seed: int = 0


class CopyTask(Task):
    name = "copy_tmp"
    regime = "copy a digit string (a task kept outside the repository)"
    characters = "0123456789="
    correction = None
    config_class = CopyConfig

    def sample_prompt(self, rng, split="train"):
        while True:
            p = "".join(rng.choice("0123456789") for _ in range(self.config.digits)) + "="
            if split is None or (sum(map(ord, p)) % 5 == 0) == (split == "eval"):
                return p

    def solution(self, prompt):
        return prompt[:-1]

    def is_correct(self, prompt, text, strict=False):
        return text.strip() == self.solution(prompt)

    def teacher_example(self, prompt, rng):
        return self.student_example(prompt, rng)

    @property
    def max_new_tokens(self):
        return self.config.digits + 2


register_task(CopyTask, lab_settings=dict(
    teacher=ModelSize(1, 64, 2, 128), student=ModelSize(1, 64, 2, 128), teacher_steps=30, student_steps=2,
    student_target_em=None, batch_size=16, n_eval=8, n_train_prompts=32, num_threads=1, teacher_min_em=None))
'''


def test_a_task_registered_by_a_user_module_runs_a_study_and_resumes(tmp_path, monkeypatch, capsys):
    import sys

    from lab.tasks import REGISTRY

    name = "user_tasks_for_test"
    (tmp_path / f"{name}.py").write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--task_module", name, "--task", "copy_tmp", "--configs", "random@0.2", "--seeds", "0", "--steps", "2",
            "--batch_size", "4", "--n_eval", "6", "--workers", "2", "--output_dir", str(out), "--cache_dir",
            str(cache), "--no_progress"]
    try:
        result = main(argv)
        res = result["tasks"]["copy_tmp"]
        assert {r["config"] for r in res["runs"]} == {"all_tokens", "random@0.2"}
        assert res["lab"]["config"]["task_name"] == "copy_tmp" and res["lab"]["config"]["teacher_steps"] == 30
        assert all(r["train_cpu_seconds"] > 0 and len(r["cpu_at_step"]) == 2 for r in res["runs"])
        row = {r["config"]: r for r in res["summary"]}["random@0.2"]
        assert row["time_ratio"] > 0 and "vs_all_equal_time" in row
        # every run was appended to runs.jsonl as it ended; the teacher and the student have their own cache entries
        lines = (out / "runs.jsonl").read_text().splitlines()
        assert len(lines) == 2
        assert sorted(d.split("-")[0] for d in os.listdir(cache) if not d.startswith(".")) == ["lab", "student",
                                                                                                "teacher"]
        # --resume runs nothing again: both runs come from runs.jsonl
        again = main(argv + ["--resume"])
        assert again["tasks"]["copy_tmp"]["reused_runs"] == 2
        assert (out / "runs.jsonl").read_text().splitlines() == lines
        assert "2 more reused from runs.jsonl" in again["report"]
    finally:
        REGISTRY.pop("copy_tmp", None)
        sys.modules.pop(name, None)


def test_cli_errors_for_a_missing_task_module(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--task_module", "no_such_module_xyz"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --task_module 'no_such_module_xyz'") and "Traceback" not in err
