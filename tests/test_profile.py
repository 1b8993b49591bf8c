"""lab.profile: phases are timed exclusively and the tiny whole-step profile runs through OPDTrainer."""

import json

import pytest

from lab import profile


def test_phase_clock_counts_nested_time_once():
    clock = profile.PhaseClock(cuda=False)

    def inner():
        return sum(range(20000))

    outer = clock.wrap(lambda: clock.wrap(inner, "teacher pass")() + 1, "loss")
    untimed = clock.wrap(inner, lambda parent: None)
    clock.enter("other")
    outer()
    untimed()
    clock.exit()
    assert set(clock.current) == {"other", "loss", "teacher pass"}
    assert all(v >= 0 for v in clock.current.values())
    assert not clock.stack


def test_tiny_profile_runs_each_config_and_writes_json_and_png(tmp_path):
    out = tmp_path / "p.json"
    results = profile.main(["--tiny", "--steps", "1", "--batch", "2", "--prompt_length", "8",
                            "--completion_length", "8", "--configs", "none", "teachability@0.5",
                            "--out", str(out)])
    assert [r["config"] for r in results] == ["none", "teachability@0.5"]
    assert all("error" not in r for r in results), results
    none, selective = results
    for r in results:
        phases = r["phases_s"]
        assert phases["total"] == pytest.approx(sum(phases[p] for p in profile.PHASES), rel=1e-9)
        assert phases["generation"] > 0 and phases["student backward"] > 0 and phases["optimizer"] > 0
    assert none["phases_s"]["statistics pass"] == 0 and selective["phases_s"]["statistics pass"] > 0
    assert none["kept_fraction"] == 1.0 and 0 < selective["kept_fraction"] <= 0.75
    assert json.loads(out.read_text())["meta"]["tiny"] is True
    assert (tmp_path / "p.png").stat().st_size > 0


def test_bad_config_is_refused():
    with pytest.raises(SystemExit):
        profile.main(["--tiny", "--configs", "teachability"])


def test_config_syntax():
    assert profile.parse_config("none/padded") == {"rule": None, "ratio": 1.0, "padding_free": False,
                                                   "statistics_source": "generation"}
    assert profile.parse_config("teachability@0.1/padded/separate") == {
        "rule": "teachability", "ratio": 0.1, "padding_free": False, "statistics_source": "separate_pass"}
    assert profile.parse_config("soft_or@0.2")["padding_free"] is True
    for bad in ("teachability", "none@0.1", "soft_or@0.2/fast"):
        with pytest.raises(ValueError):
            profile.parse_config(bad)


def test_forced_length_spread_and_trainer_phase_metrics(tmp_path):
    out = tmp_path / "p.json"
    results = profile.main(["--tiny", "--steps", "1", "--batch", "4", "--accumulation", "2", "--prompt_length", "8",
                            "--completion_length", "20", "--length_spread", "0.2", "--configs", "none/padded",
                            "none", "--out", str(out)])
    assert all("error" not in r for r in results), results
    padded, free = results
    assert padded["completion_lengths"] == free["completion_lengths"]  # the same draws in every configuration
    lengths = [n for call in padded["completion_lengths"] for n in call]
    assert len(lengths) == 8 and min(lengths) >= 4 and max(lengths) <= 20 and len(set(lengths)) > 2
    logged = padded["trainer_metrics"][-1]
    assert logged["completions/mean_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert logged["time/generation"] > 0 and logged["time/forward_backward"] > 0 and logged["time/statistics"] == 0
    meta = json.loads(out.read_text())["meta"]
    assert any("padding-free training part" in line for line in meta["targets"])


def test_local_model_directory_is_accepted_and_missing_one_refused(pair, tmp_path):
    student, teacher = pair
    results = profile.main(["--student_dir", student, "--teacher_dir", teacher, "--steps", "1", "--batch", "2",
                            "--prompt_length", "8", "--completion_length", "6", "--configs", "soft_or@0.5",
                            "--out", str(tmp_path / "p.json")])
    assert "error" not in results[0], results
    assert results[0]["phases_s"]["statistics pass"] > 0
    with pytest.raises(SystemExit):
        profile.main(["--student_dir", str(tmp_path / "nowhere"), "--configs", "none"])
