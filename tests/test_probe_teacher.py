"""python -m opsd.probe_teacher: the visited-state pipeline against direct full-logit diagnostics, the verdict's
criterion, and an end-to-end run on a tiny local pair."""

from __future__ import annotations

import json

import pytest
import torch

from opsd.core.diagnostics import overlap_chunk, position_buckets
from opsd.core.heads import head_of
from opsd.core.models import load_causal_lm, load_tokenizer
from opsd.evaluate import _generate_hf, tokenize_prompts
from opsd.probe_teacher import STAT_KEYS, _final_hidden, aggregate, main, verdict, visited_state_diagnostics
from support import write_prompts


def test_final_hidden_reproduces_the_model_logits(pair):
    model = load_causal_lm(pair[1])
    ids = torch.tensor([3, 5, 7, 11, 2])
    with torch.no_grad():
        direct = model(input_ids=ids[None]).logits[0]
        via_head = head_of(model).logits(_final_hidden(model, ids))
    torch.testing.assert_close(via_head, direct, rtol=1e-5, atol=1e-5)


def test_visited_states_match_direct_full_logits(pair):
    student, teacher = load_causal_lm(pair[0]).eval(), load_causal_lm(pair[1]).eval()
    tok = load_tokenizer(pair[0])
    prompts = ["1+2=", "3+4=", "5+6="]
    got = visited_state_diagnostics(student, teacher, tok, prompts, rollouts=2, max_new_tokens=5, overlap_k=4,
                                    chunk_size=3, seed=7, progress=False)
    # the same rollouts (same seed and batching), then the diagnostics of the models' own full logits
    ids = tokenize_prompts(tok, prompts)
    samples = _generate_hf(student, tok, ids, 2, 1.0, 1.0, 0, 5, 8, 7, False, "")
    for prompt_ids, outs, stats in zip(ids, samples, got):
        parts, seq, pos = [], [], []
        for r, (completion, _) in enumerate(outs):
            full = torch.tensor(prompt_ids + completion)[None]
            with torch.no_grad():
                zs = student(input_ids=full).logits[0, len(prompt_ids) - 1:-1]
                zt = teacher(input_ids=full).logits[0, len(prompt_ids) - 1:-1]
            parts.append(overlap_chunk(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), 4))
            seq.append(torch.full((len(completion),), r))
            pos.append(torch.arange(len(completion)))
        assert stats["bucket"].tolist() == position_buckets(torch.cat(seq), torch.cat(pos)).tolist()
        for key in STAT_KEYS:
            torch.testing.assert_close(stats[key], torch.cat([p[key] for p in parts]), rtol=1e-4, atol=1e-5)


def test_same_model_is_fully_overlapping_and_indistinguishable(pair):
    model, tok = load_causal_lm(pair[0]).eval(), load_tokenizer(pair[0])
    d = aggregate(visited_state_diagnostics(model, model, tok, ["1+1="], rollouts=2, max_new_tokens=4, progress=False))
    assert d["overlap_ratio"] == pytest.approx(1.0)
    assert d["shared_mass_student"] == pytest.approx(d["shared_mass_teacher"], abs=1e-6)
    assert d["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    v = verdict(d, teacher_reward=0.5, student_reward=0.5)
    assert v["distinguishable"] is False and v["new_capability"] is False


@pytest.mark.parametrize("mass,kl,t,s,compatible,capability,words", [
    (0.95, 0.2, 0.6, 0.3, True, True, "likely to work"),
    (0.50, 0.2, 0.6, 0.3, False, True, "stall"),
    (0.95, 0.2, 0.32, 0.3, True, False, "unlikely to gain"),
    (0.95, 0.001, 0.9, 0.3, True, False, "unlikely to gain"),  # higher score, but indistinguishable
    (0.95, 0.2, None, None, True, None, "unknown"),
])
def test_verdict_criterion(mass, kl, t, s, compatible, capability, words):
    d = {"shared_mass_student": mass + 0.01, "shared_mass_teacher": mass, "reverse_kl": kl}
    v = verdict(d, t, s)
    assert v["compatible"] is compatible and v["new_capability"] is capability
    assert words in v["summary"]
    assert v["shared_mass"] == pytest.approx(mass)


def test_cli_end_to_end(pair, tmp_path, capsys):
    prompts = write_prompts(str(tmp_path / "p.jsonl"), n=3)
    out = tmp_path / "probe.json"
    assert main(["--student", pair[0], "--teacher", pair[1], "--prompts", prompts, "--rollouts", "2",
                 "--max_new_tokens", "5", "--eval_k", "2", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_prompts"] == 3 and report["diagnostics"]["tokens"] > 0
    assert set(report["diagnostics"]["reverse_kl_by_third"]) == {"first", "middle", "last"}
    assert report["teacher_reward"] is not None and report["student_reward"] is not None
    printed = capsys.readouterr().out
    assert "verdict:" in printed and "| shared_mass_teacher |" in printed
    with pytest.raises(SystemExit):
        main(["--student", pair[0], "--teacher", pair[1], "--prompts", prompts, "--rollouts", "0"])


def test_advice_after_a_cold_start(pair, tmp_path, capsys):
    """A student directory written by opsd.cold_start (its cold_start_summary.json) gets next steps, not another
    cold start; a raw student still gets the cold start."""
    import shutil

    from opsd.cold_start import SUMMARY_FILE, read_summary

    d = {"shared_mass_student": 0.3, "shared_mass_teacher": 0.25, "reverse_kl": 2.0}
    raw = verdict(d, 0.6, 0.1)
    assert "Try an off-policy cold start" in raw["summary"] and raw["cold_start"] is False
    meta = {"kind": "opsd.cold_start", "teacher": pair[1], "kept": 120, "sft_steps": 45}
    after = verdict(d, 0.6, 0.1, cold_start=meta, teacher=pair[1])
    assert after["cold_start"] is True and after["compatible"] is False
    assert "Try an off-policy cold start" not in after["summary"]
    assert "already had an off-policy cold start" in after["summary"] and "120 teacher responses" in after["summary"]
    assert "shares the student's base model" in after["summary"] and "collapse rule" in after["summary"]
    assert "longer cold start only if it was short" in after["summary"]  # 120 < SMALL_COLD_START responses
    assert "another teacher" not in after["summary"]
    big_other = verdict(d, 0.6, 0.1, cold_start={**meta, "kept": 5000, "teacher": str(tmp_path)}, teacher=pair[1])
    assert "longer cold start" not in big_other["summary"] and "another teacher" in big_other["summary"]
    # compatible after the cold start: the usual verdict, with the cold start noted
    ok = verdict({"shared_mass_student": 0.95, "shared_mass_teacher": 0.94, "reverse_kl": 0.3}, 0.6, 0.1,
                 cold_start=meta)
    assert "likely to work" in ok["summary"] and any("cold-started" in line for line in ok["lines"])

    # through the CLI: the metadata in the student directory is what the probe reads
    student = tmp_path / "cold"
    shutil.copytree(pair[0], student)
    assert read_summary(str(student)) is None
    (student / SUMMARY_FILE).write_text(json.dumps(meta))
    assert read_summary(str(student))["kept"] == 120
    prompts = write_prompts(str(tmp_path / "p.jsonl"), n=2)
    out = tmp_path / "probe.json"
    assert main(["--student", str(student), "--teacher", pair[1], "--prompts", prompts, "--max_new_tokens", "4",
                 "--eval_k", "0", "--output", str(out), "--compatible_mass", "1.01"]) == 0
    report = json.loads(out.read_text())
    assert report["verdict"]["cold_start"] is True
    assert "already had an off-policy cold start" in report["verdict"]["summary"]
    # metadata of another kind is not a cold start
    (student / SUMMARY_FILE).write_text(json.dumps({"kind": "something-else"}))
    assert read_summary(str(student)) is None
