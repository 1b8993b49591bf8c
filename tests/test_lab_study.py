"""A seconds-long version of the lab's default study: every step runs (lab models, selector probe, OPD runs through
the real trainer, evaluation, report files)."""

import json
import os

from lab.models import LabConfig, ModelSize
from lab.study import DEFAULT_CONFIGS, StudySettings, main, run_study


def tiny_lab():
    return LabConfig(teacher=ModelSize(1, 32, 2), student=ModelSize(1, 16, 2), teacher_steps=3, student_steps=2,
                     batch_size=8, n_eval=8, n_train_prompts=32)


def test_tiny_study_writes_a_complete_report(tmp_path):
    configs = [c for c in DEFAULT_CONFIGS if c.name in ("all_tokens", "q3@0.1", "teachability@0.05", "random@0.5")]
    settings = StudySettings(seeds=(0, 1), steps=2, batch_size=4, n_eval=6, n_probe=6)
    out = str(tmp_path / "study")
    result = run_study(out, settings, configs, cache_dir=str(tmp_path / "cache"), lab_config=tiny_lab(),
                       progress=False)
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert [row["config"] for row in report["summary"]] == [c.name for c in configs]
    assert len(report["runs"]) == len(configs) * 2
    for run in report["runs"]:
        assert 0.0 <= run["exact_match"] <= 1.0 and run["heldout_kl"] >= 0.0
        assert run["kept_tokens"] <= run["generated_tokens"] + 1e-6
    by_name = {row["config"]: row for row in report["summary"]}
    assert by_name["all_tokens"]["kept_fraction"] == 1.0
    assert by_name["q3@0.1"]["kept_fraction"] < 0.5
    probe = report["probe"]
    assert set(probe["selectors"]) == {c.name for c in configs}
    assert abs(sum(probe["census_all"].values()) - 1.0) < 1e-6
    assert probe["selectors"]["all_tokens"]["recall"] == 1.0 or probe["q3_positions"] == 0
    with open(os.path.join(out, "report.md")) as f:
        text = f.read()
    assert "| q3@0.1 |" in text and "precision" in text
    assert all(os.path.getsize(p) > 1000 for p in result["plots"])
    # the lab models were cached: a second study reuses them
    again = run_study(str(tmp_path / "again"), StudySettings(seeds=(0,), steps=1, batch_size=4, n_eval=4, n_probe=4),
                      configs[:1], cache_dir=str(tmp_path / "cache"), lab_config=tiny_lab(), progress=False)
    assert again["lab"]["cached"]


def test_cli_rejects_unknown_configs(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--configs", "magic@0.1"])
    assert "unknown configs" in capsys.readouterr().err
