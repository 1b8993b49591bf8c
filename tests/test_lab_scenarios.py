"""A seconds-long run of lab.scenarios on tiny lab models: the swapped-scratchpad task, every scenario through the
real trainer (OPD with overlap diagnostics, opsd.cold_start's rollouts + SFT, the top-K estimators) and the report's
fields."""

import json
import os
import random

import pytest

from lab import addition
from lab.models import LabConfig, ModelSize
from lab.scenarios import CURVE_KEYS, SCENARIOS, run_scenarios, t_interval
from lab.study import StudySettings
from lab.tasks import EOS_TOKEN, get_task

STEPS = 6


def tiny_labs():
    common = dict(teacher=ModelSize(1, 64, 2, 128), student=ModelSize(1, 64, 2, 128), teacher_steps=40,
                  student_steps=2, student_target_em=None, batch_size=16, n_eval=8, n_train_prompts=32, num_threads=1,
                  teacher_min_em=None)
    return {"addition": LabConfig(task_name="addition", **common), "addition_swapped": LabConfig(task_name="addition_swapped", **common)}


@pytest.fixture(scope="module")
def scen(tmp_path_factory):
    root = tmp_path_factory.mktemp("scen")
    settings = StudySettings(seeds=(0,), steps=STEPS, batch_size=8, learning_rate=3e-3, n_eval=8, bootstrap=100)
    out = str(root / "out")
    result = run_scenarios(out, SCENARIOS, settings, cache_dir=str(root / "cache"), lab_configs=tiny_labs(),
                           cold_starts={"cold_start_short": dict(n_prompts=8, sft_steps=3, sft_lr=1e-3, batch_size=4)}, progress=False)
    return result, out


def test_swapped_task_writes_the_other_column_order():
    t = get_task("addition_swapped")
    assert t.teacher_solution("473+859=") == "12,13,13:1332" and t.solution("473+859=") == "21,31,31:1332"
    rng = random.Random(0)
    for p in t.make_prompts(30, seed=1):
        tokens, train = t.teacher_example(p, rng)
        assert tokens[-1] == EOS_TOKEN and len(tokens) == len(train)
        assert addition.apply_corrections("".join(tokens[:-1])) == t.teacher_solution(p)
        # no loss exactly on the injected wrong tokens (each followed by the repair)
        assert train == [i + 1 == len(tokens) or tokens[i + 1] != addition.CORRECTION for i in range(len(tokens))]
        student, _ = t.student_example(p, rng)
        assert "".join(student[:-1]) == t.solution(p)
        assert t.is_correct(p, t.teacher_solution(p), strict=True) and t.is_correct(p, t.solution(p), strict=True)
    assert not t.is_correct("473+859=", "12,13,13:1331") and t.positions_of_interest("473+859=", [4, 5]) is None


def test_report_has_every_scenario_and_field(scen):
    result, out = scen
    saved = json.load(open(os.path.join(out, "scenarios.json")))
    md = open(os.path.join(out, "scenarios.md")).read()
    assert set(saved["scenarios"]) == set(SCENARIOS) and saved["overlap_k"] == 4
    configs = {name: [r["config"] for r in sc["summary"]] for name, sc in saved["scenarios"].items()}
    assert configs == {"incompatible": ["opd_warm_start", "cold_start_short+opd"],
                       "no_new_capability": ["opd_self_teacher"], "estimators": ["full", "union", "student_topk"]}
    for name, sc in saved["scenarios"].items():
        assert f"## {name}" in md
        for row in sc["summary"]:
            for key in ("exact_match", "heldout_kl", "vs_start", *(f"{k}/last5" for k in CURVE_KEYS)):
                assert {"mean", "lo", "hi"} <= set(row[key]), (name, row["config"], key)
    assert "vs_full" in saved["scenarios"]["estimators"]["summary"][1]
    assert saved["scenarios"]["estimators"]["reference"] == "full" and "paired against `full`" in md
    assert "vs_opd_warm_start" in saved["scenarios"]["incompatible"]["summary"][1]
    assert "vs_cold_start_alone" in saved["scenarios"]["incompatible"]["summary"][1]
    assert set(saved["scenarios"]["incompatible"]["cold_starts"]) == {"cold_start_short"}
    assert len(saved["curves"]) == 4 and "Overlap curves" in md


def test_runs_train_and_log_overlap_every_step(scen):
    """Fails when nothing is trained: every run logs STEPS optimizer steps with overlap statistics in [0, 1], full
    OPD lowers the held-out KL to the teacher, and the cold start ran its SFT steps on teacher rollouts."""
    result, _ = scen
    for name, sc in result["scenarios"].items():
        for run in sc["runs"]:
            assert [p["step"] for p in run["curve"]] == list(range(1, STEPS + 1)), (name, run["config"])
            for p in run["curve"]:
                for k in ("overlap/teacher_mass", "overlap/student_mass", "overlap/ratio"):
                    assert 0.0 <= p[k] <= 1.0 + 1e-6, (name, k, p[k])
    est = result["scenarios"]["estimators"]
    full = [r for r in est["runs"] if r["config"] == "full"]
    assert all(r["heldout_kl"] < est["start"]["heldout_kl"] for r in full)
    cold = result["scenarios"]["incompatible"]["cold_starts"]["cold_start_short"]["per_seed"]
    assert all(c["sft_steps"] == 3 and c["kept"] > 0 for c in cold)


def test_self_teacher_agrees_with_the_student_at_the_start(scen):
    """The no-new-capability teacher is the student's own checkpoint: at step 1 (before any update reaches the
    logged batch) both top-K sets coincide and both put the same mass on them."""
    sc = scen[0]["scenarios"]["no_new_capability"]
    first = sc["runs"][0]["curve"][0]
    assert first["overlap/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["overlap/teacher_mass"] == pytest.approx(first["overlap/student_mass"], abs=1e-5)
    assert sc["start"]["heldout_kl"] == pytest.approx(0.0, abs=1e-6)


def test_t_interval():
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2) = 4.303
    assert iv["mean"] == pytest.approx(2.0) and iv["hi"] - 2.0 == pytest.approx(4.303 / 3 ** 0.5, rel=1e-4)
    assert t_interval([0.5]) == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 1}
