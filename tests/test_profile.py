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
