"""python -m opsd.select_prompts: the documented criterion (score, reward filters, ranking, keep size) and an
end-to-end run on a tiny local pair that keeps the original columns."""

from __future__ import annotations

import json

import pytest

from opsd.select_prompts import alignment_score, choose, distribution, main
from support import save_pair


def _entry(i, score, t=None, s=None):
    return {"index": i, "score": score, "teacher_reward": t, "student_reward": s}


def test_alignment_scores():
    scores = {"shared_mass_student": 0.6, "shared_mass_teacher": 0.8, "overlap_ratio": 0.25}
    assert alignment_score(scores) == pytest.approx(0.7)
    assert alignment_score(scores, "teacher_mass") == 0.8
    assert alignment_score(scores, "student_mass") == 0.6
    assert alignment_score(scores, "overlap_ratio") == 0.25
    assert alignment_score({"shared_mass_student": None, "shared_mass_teacher": None, "overlap_ratio": None}) is None


def test_choose_ranks_filters_and_breaks_ties_by_file_order():
    entries = [_entry(0, 0.2), _entry(1, 0.9), _entry(2, 0.5), _entry(3, 0.5), _entry(4, None)]
    assert choose(entries, 0.4, None, 0.0, 1.0) == [1, 2]  # round(0.4 * 5) = 2; tie 2/3 -> file order
    assert choose(entries, None, 3, 0.0, 1.0) == [1, 2, 3]
    assert choose(entries, None, 10, 0.0, 1.0) == [0, 1, 2, 3]  # a prompt without tokens is never kept
    rewarded = [_entry(0, 0.9, t=0.0, s=0.0), _entry(1, 0.8, t=1.0, s=1.0), _entry(2, 0.1, t=0.5, s=0.0)]
    # teacher must solve (>= 0.5) and the student must not already (<= 0.5): only prompt 2 survives
    assert choose(rewarded, None, 2, 0.5, 0.5) == [2]


def test_distribution():
    d = distribution([0.0, 1.0, 2.0, 3.0, 4.0])
    assert d["median"] == 2.0 and d["p25"] == 1.0 and d["p90"] == pytest.approx(3.6) and d["mean"] == 2.0
    assert distribution([]) == {"n": 0}


def test_cli_end_to_end_keeps_the_best_prompts_with_their_columns(tmp_path):
    student, teacher = save_pair(str(tmp_path))
    prompts = tmp_path / "cand.jsonl"
    with open(prompts, "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i), "source": f"s{i}"}) + "\n")
    out = tmp_path / "sel" / "aligned.jsonl"
    assert main(["--student", student, "--teacher", teacher, "--prompts", str(prompts), "--output", str(out),
                 "--keep_fraction", "0.5", "--max_new_tokens", "5", "--rollouts", "2", "--overlap_k", "8",
                 "--eval_k", "1"]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads((tmp_path / "sel" / "aligned.report.json").read_text())
    assert len(kept) == 3 and report["n_kept"] == 3 and report["n_candidates"] == 6
    assert all(set(row) == {"prompt", "answer", "source"} for row in kept)
    entries = report["prompts"]
    best = sorted(entries, key=lambda e: (-e["score"], e["index"]))[:3]
    assert [row["source"] for row in kept] == [f"s{e['index']}" for e in sorted(best, key=lambda e: e["index"])]
    for e in entries:
        assert e["score"] == pytest.approx((e["shared_mass_student"] + e["shared_mass_teacher"]) / 2)
        assert e["teacher_reward"] is not None
    assert report["threshold"] == pytest.approx(min(e["score"] for e in best))
    assert report["score_all"]["n"] == 6


def test_reward_filters_need_answers(tmp_path):
    student, teacher = save_pair(str(tmp_path))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1="}) + "\n")
    with pytest.raises(SystemExit):
        main(["--student", student, "--teacher", teacher, "--prompts", str(prompts), "--output",
              str(tmp_path / "o.jsonl"), "--min_teacher_reward", "0.5", "--eval_k", "2"])
