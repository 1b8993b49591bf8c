"""opsd.compare on fake run directories: table, configuration differences, token counts, noise marks, plots and
errors."""

from __future__ import annotations

import json
import os

import pytest

from opsd import compare as C


def log_history(steps, loss0, kept_fraction, kept_tokens, step_time, memory, span=1):
    history = []
    for i in range(1, steps + 1):
        history.append({"step": i * span, "loss": loss0 / i, "kept_fraction": kept_fraction, "kept_tokens": kept_tokens,
                        "step_time": step_time, "peak_memory_gb": memory + 0.1 * i, "num_tokens": 100.0 * i * span,
                        "completions/mean_length": 20.0, "entropy": 0.5})
    history.append({"step": steps * span, "train_runtime": 12.0, "train_loss": 0.3})  # the trainer's final entry
    return history


def make_run(root, name, selector=None, ratio=0.5, lr=1e-6, steps=4, kept_fraction=1.0, kept_tokens=64.0,
             step_time=2.0, memory=10.0, evals=None, eval_in_subdir=True, span=1):
    path = os.path.join(root, name)
    os.makedirs(path)
    config = {
        "DataArguments": {"train_file": "data/train.jsonl", "dry_run": False},
        "OPDConfig": {"output_dir": path, "logging_dir": os.path.join(path, "logs"), "run_name": name,
                      "learning_rate": lr, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2},
        "SelectorConfig": {"selector": selector, "ratio": ratio, "token_dump_dir": os.path.join(path, "dump"),
                           "selector_options": None},
    }
    summary = {"config": config, "train_metrics": {"train_runtime": 12.0},
               "log_history": log_history(steps, 1.0, kept_fraction, kept_tokens, step_time, memory, span)}
    with open(os.path.join(path, "run_summary.json"), "w") as f:
        json.dump(summary, f)
    if evals is not None:
        eval_dir = os.path.join(path, "eval") if eval_in_subdir else path
        os.makedirs(eval_dir, exist_ok=True)
        benchmarks = {b: {"n_problems": n, "k": 16, "mean@16": p, "pass@1": p, "pass@16": min(1.0, p + 0.2),
                          "mean_length": 100.0, "truncated_fraction": 0.0, "std_err": 0.01}
                      for b, (p, n) in evals.items()}
        with open(os.path.join(eval_dir, "eval_summary.json"), "w") as f:
            json.dump({"settings": {"k": 16}, "benchmarks": benchmarks, "table_markdown": ""}, f)
    return path


@pytest.fixture()
def runs(tmp_path):
    root = str(tmp_path)
    base = make_run(root, "opd", evals={"math500": (0.767, 500), "aime24": (0.219, 30)})
    tip = make_run(root, "tip-soft_or-50", selector="soft_or", ratio=0.5, kept_fraction=0.5, kept_tokens=32.0,
                   step_time=2.1, memory=6.0, evals={"math500": (0.850, 500), "aime24": (0.257, 30)},
                   eval_in_subdir=False)
    q3 = make_run(root, "tip-q3-10", selector="q3", ratio=0.1, lr=2e-6, kept_fraction=0.1, kept_tokens=6.4,
                  step_time=1.0, memory=5.0)
    return base, tip, q3


def test_accuracy_noise():
    diff, se, within = C.accuracy_noise(0.5, 100, 0.6, 100)
    assert diff == pytest.approx(0.1) and se == pytest.approx((0.25 / 100 + 0.24 / 100) ** 0.5) and within
    assert not C.accuracy_noise(0.5, 100, 0.7, 100)[2]
    assert C.accuracy_noise(1.0, 10, 1.0, 10) == (0.0, 0.0, True)


def test_config_differences_ignore_run_paths(runs):
    configs = [C.load_run(r)["config"] for r in runs]
    diff = C.config_differences(configs)
    assert set(diff) == {"OPDConfig.learning_rate", "SelectorConfig.selector", "SelectorConfig.ratio"}
    assert C.config_differences(configs[:1]) == []
    assert C.config_differences([{"A": {"x": 1}}, {"A": {"x": 1, "y": 2}}]) == ["A.y"]


def test_log_history_summary():
    history = log_history(4, 1.0, 0.5, 10.0, 2.0, 3.0, span=2)  # each entry averages two steps
    s = C.summarize_log_history(history, {})
    assert s["steps"] == 8 and s["logged_steps"] == 8
    assert s["kept_tokens"] == pytest.approx(80.0) and s["kept_fraction"] == pytest.approx(0.5)
    assert s["generated_tokens"] == pytest.approx(160.0) == s["teacher_scored_tokens"]
    assert s["generated_tokens_source"] == "kept_tokens/kept_fraction"
    assert s["peak_memory_gb"] == pytest.approx(3.4) and s["final_loss"] == pytest.approx(0.25)
    assert s["step_time"] == pytest.approx(2.0)
    # without kept counts: mean completion length x completions per step
    plain = [{k: v for k, v in e.items() if not k.startswith("kept")} for e in history]
    config = {"OPDConfig": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}}
    s = C.summarize_log_history(plain, config)
    assert s["generated_tokens"] == pytest.approx(20.0 * 8 * 8) and s["kept_tokens"] is None
    s = C.summarize_log_history(plain, {})
    assert s["generated_tokens"] == pytest.approx(800.0) and s["generated_tokens_source"].startswith("num_tokens")
    assert C.summarize_log_history([], {})["final_loss"] is None


def test_compare_table_noise_and_plots(runs, tmp_path, capsys):
    base, tip, q3 = runs
    out = str(tmp_path / "report")
    assert C.main([base, tip, q3, "--out", out]) == 0
    printed = capsys.readouterr().out
    md = open(os.path.join(out, "comparison.md")).read()
    assert md.strip() in printed
    lines = md.splitlines()
    header = lines[0]
    for col in ("math500 mean@16", "aime24 pass@16", "kept tokens", "generated tokens", "teacher-scored tokens",
                "step time (s)", "peak mem (GB)", "final loss"):
        assert col in header
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:5]}
    assert set(rows) == {"opd (baseline)", "tip-soft_or-50", "tip-q3-10"}
    # math500: +8.3 points on 500 problems is beyond noise; aime24: +3.8 on 30 problems is within noise
    assert "85.0 (+8.3)" in rows["tip-soft_or-50"] and "25.7 (+3.8 ~)" in rows["tip-soft_or-50"]
    assert "(+5% ~)" in rows["tip-soft_or-50"] and "(-50%)" in rows["tip-q3-10"]
    assert "selector=soft_or" in rows["tip-soft_or-50"] and "learning_rate=2e-06" in rows["tip-q3-10"]
    assert "output_dir" not in md and "run_name" not in md and "token_dump_dir" not in md
    assert "| all |" in rows["opd (baseline)"] and "| q3 | 0.1 |" in rows["tip-q3-10"]

    data = json.load(open(os.path.join(out, "comparison.json")))
    assert data["baseline"] == "opd" and data["benchmarks"] == ["math500", "aime24"]
    by_name = {r["name"]: r for r in data["runs"]}
    tip_row = by_name["tip-soft_or-50"]
    assert tip_row["noise"]["math500/mean"]["within_noise"] is False
    assert tip_row["noise"]["aime24/mean"]["within_noise"] is True
    assert tip_row["train"]["kept_tokens"] == pytest.approx(128.0)
    assert tip_row["train"]["generated_tokens"] == pytest.approx(256.0)
    assert by_name["opd"]["train"]["peak_memory_gb"] == pytest.approx(10.4)
    assert by_name["tip-q3-10"]["eval"] == {} and by_name["opd"]["noise"] == {}
    for name in ("loss.png", "kept_fraction.png", "accuracy.png"):
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 1000
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_baseline_option(runs, tmp_path):
    base, tip, q3 = runs
    result = C.compare([base, tip], baseline=tip)
    assert result["comparison"]["baseline"] == "tip-soft_or-50" and result["plots"] == []
    opd = result["comparison"]["runs"][0]
    assert opd["noise"]["math500/mean"]["diff"] == pytest.approx(0.767 - 0.850)
    # a baseline outside the list is added in front
    result = C.compare([tip, q3], baseline=base)
    assert [r["name"] for r in result["comparison"]["runs"]] == ["opd", "tip-soft_or-50", "tip-q3-10"]


def test_clear_errors(runs, tmp_path, capsys):
    base = runs[0]
    assert C.main([base, str(tmp_path / "missing")]) == 2
    assert "Run directory not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert C.main([base, str(empty)]) == 2
    assert "run_summary.json" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        C.load_run(str(tmp_path / "missing"))


def test_collapse_columns(tmp_path):
    """Collapse signals from eval_summary.json and the first flagged validation step from run_summary.json."""
    root = str(tmp_path)
    healthy = make_run(root, "lr5e-5", evals={"gsm": (0.5, 100)})
    collapsed = make_run(root, "lr1e-4", evals={"gsm": (0.0, 100)}, lr=1e-4)
    plain = make_run(root, "noval", evals={"gsm": (0.4, 100)}, lr=2e-4)
    for path, eot, d2, nll, validation in (
            (healthy, 1.0, 0.41, 0.2, [{"step": 0, "metrics": {}}, {"step": 10, "metrics": {}}]),
            (collapsed, 0.0, 0.05, 1.25, [{"step": 0, "metrics": {}}, {"step": 5, "metrics": {}},
                                          {"step": 10, "metrics": {}, "collapse": {"gsm": {"signals": {
                                              "teacher_nll": {}, "eot_rate": {}}}}},
                                          {"step": 15, "metrics": {}, "collapse": {"gsm": {"signals": {
                                              "distinct_2": {}}}}}]),
            (plain, None, None, None, None)):
        summary_path = os.path.join(path, "run_summary.json")
        summary = json.load(open(summary_path))
        if validation is not None:
            summary["validation"] = validation
        json.dump(summary, open(summary_path, "w"))
        eval_path = os.path.join(path, "eval", "eval_summary.json")
        ev = json.load(open(eval_path))
        if eot is not None:
            ev["benchmarks"]["gsm"].update(eot_rate=eot, distinct_2=d2, teacher_nll=nll, clipped_ratio=1 - eot)
        json.dump(ev, open(eval_path, "w"))
    result = C.compare([healthy, collapsed, plain])
    header, *rest = result["markdown"].splitlines()
    for col in ("gsm end-of-turn", "gsm distinct-2", "gsm teacher NLL", "collapse"):
        assert col in header
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in rest[1:4]}
    cols = [c.strip(" |") for c in header.split(" | ")]
    at = {name: cols.index(name) for name in ("gsm end-of-turn", "gsm distinct-2", "gsm teacher NLL", "collapse")}
    healthy_row, collapsed_row, plain_row = rows["lr5e-5 (baseline)"], rows["lr1e-4"], rows["noval"]
    assert [healthy_row[at[c]] for c in at] == ["100.0", "0.410", "0.200", "no"]
    assert [collapsed_row[at[c]] for c in at] == ["0.0", "0.050", "1.250", "step 10: eot_rate, teacher_nll"]
    assert [plain_row[at[c]] for c in at] == ["—", "—", "—", "—"]
    by_name = {r["name"]: r for r in result["comparison"]["runs"]}
    assert by_name["lr1e-4"]["collapse"] == {"step": 10, "sets": {"gsm": ["eot_rate", "teacher_nll"]}}
    assert by_name["lr1e-4"]["eval"]["gsm"]["teacher_nll"] == pytest.approx(1.25)
