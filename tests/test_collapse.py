"""Collapse signals (opsd.collapse) against direct references, the rule on constructed curves, and the rule inside
validation on tiny models: it fires on a constructed drift away from the teacher and stays silent on a healthy one."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from opsd.collapse import (CollapseRule, clipped_ratio, completion_metrics, distinct_n, end_of_turn_rate,
                           load_or_make_teacher_text, sequence_nll, stop_token_ids, teacher_text_nll)
from opsd.core.models import load_causal_lm, load_tokenizer
from support import make_model, make_tokenizer, save_pair, write_prompts

STOP = {1}


def test_end_of_turn_and_clipped_against_counts():
    comps = [[5, 6, 1], [5, 5, 5, 5], [1], [7, 8, 9, 1], [], [4, 4, 4, 9]]
    # by hand: ends on 1 -> rows 0, 2, 3; at the limit (4) without a stop -> rows 1, 5
    assert end_of_turn_rate(comps, STOP) == pytest.approx(3 / 6)
    assert clipped_ratio(comps, STOP, max_new_tokens=4) == pytest.approx(2 / 6)
    # a completion exactly at the limit that ends on the stop token is not clipped
    assert clipped_ratio([[3, 3, 3, 1]], STOP, 4) == 0.0
    with pytest.raises(ValueError):
        end_of_turn_rate([], STOP)


def _distinct_reference(comps, n, stop):
    grams = []
    for c in comps:
        c = list(c)
        while c and c[-1] in stop:
            c = c[:-1]
        grams += [tuple(c[i:i + n]) for i in range(len(c) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


@pytest.mark.parametrize("n", [1, 2, 3])
def test_distinct_n_against_reference(n):
    g = torch.Generator().manual_seed(n)
    comps = [torch.randint(3, 9, (int(length),), generator=g).tolist() + [1]
             for length in torch.randint(0, 12, (20,), generator=g)]
    assert distinct_n(comps, n, STOP) == pytest.approx(_distinct_reference(comps, n, STOP))
    # a repeated list has few distinct n-grams; n-grams never cross completions
    assert distinct_n([[4, 4, 4, 4]], n, STOP) == pytest.approx(1 / (4 - n + 1))
    assert distinct_n([[4, 5], [6, 7]], 3, STOP) is None
    with pytest.raises(ValueError):
        distinct_n(comps, 0)


def test_completion_metrics_and_stop_ids():
    tok = make_tokenizer()
    assert stop_token_ids(tok) == {tok.eos_token_id}
    assert stop_token_ids(tok, [7]) == {tok.eos_token_id, 7}
    m = completion_metrics([[5, 6, 1], [5, 5, 5, 5]], STOP, 4)
    assert m["eot_rate"] == 0.5 and m["clipped_ratio"] == 0.5
    assert m["distinct_1"] == pytest.approx(2 / 6) and m["distinct_3"] == pytest.approx(1 / 2)


def _nll_reference(model, prompt, completion):
    """float64 NLL of one completion from one unpadded forward."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return -sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion))


def test_sequence_nll_against_separate_forwards():
    model = make_model(64, hidden=64, layers=2, seed=3, head_scale=4.0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 64, (int(n),), generator=g).tolist() for n in (3, 7, 1, 5, 2)]
    comps = [torch.randint(3, 64, (int(n),), generator=g).tolist() for n in (4, 1, 6, 0, 3)]
    total, count = sequence_nll(model, prompts, comps, batch_size=2, pad_id=0)
    ref = sum(_nll_reference(model, p, c) for p, c in zip(prompts, comps) if c)
    assert count == 4 + 1 + 6 + 3
    assert total == pytest.approx(ref, rel=1e-5)
    assert teacher_text_nll(model, prompts, comps, batch_size=3) == pytest.approx(ref / count, rel=1e-5)
    assert teacher_text_nll(model, prompts[:1], [[]]) is None


def test_teacher_text_is_cached_and_regenerated_for_other_prompts(tmp_path):
    tok = make_tokenizer()
    teacher = make_model(len(tok), seed=1, head_scale=5.0).eval()
    prompts = [tok("1+2=")["input_ids"], tok("3+4=")["input_ids"]]
    path = str(tmp_path / "t.json")
    ids = load_or_make_teacher_text(path, teacher, tok, prompts, 5, batch_size=2)
    assert len(ids) == 2 and all(0 < len(x) <= 5 for x in ids)
    # greedy: the same as a direct argmax continuation of each prompt alone
    for p, got in zip(prompts, ids):
        seq = list(p)
        for _ in range(len(got)):
            with torch.no_grad():
                seq.append(int(teacher(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            if seq[-1] == 1:
                break
        assert seq[len(p):] == got
    assert load_or_make_teacher_text(path, None, tok, prompts, 5) == ids  # from the cache, no model needed
    with pytest.raises(ValueError, match="cached"):
        load_or_make_teacher_text(path, None, tok, prompts[:1], 5)


# ----- the rule on constructed curves ----------------------------------------------------------------------------

BASE = {"teacher_nll": 1.0, "eot_rate": 0.8, "distinct_2": 0.6}
FALLING = [2.0, 1.9, 1.6, 1.3, 1.1, 1.0]


def test_rule_fires_on_each_signal_only_while_the_loss_falls():
    rule = CollapseRule()
    drift = {"teacher_nll": 1.2, "eot_rate": 0.0, "distinct_2": 0.2}
    report = rule.check(BASE, drift, FALLING)
    assert set(report["signals"]) == {"teacher_nll", "eot_rate", "distinct_2"}
    assert report["signals"]["teacher_nll"]["relative_change"] == pytest.approx(0.2)
    assert report["loss0"] == pytest.approx(sum(FALLING[:3]) / 3) and report["loss"] == pytest.approx(1.133333, 1e-5)
    for key, bad in (("teacher_nll", 1.11), ("eot_rate", 0.59)):
        assert set(rule.check(BASE, {**BASE, key: bad}, FALLING)["signals"]) == {key}
    # distinct-2 supports a collapse but never makes one alone (format learning lowers it too)
    assert rule.signals(BASE, {**BASE, "distinct_2": 0.29}) == {
        "distinct_2": {"baseline": 0.6, "value": 0.29, "relative_change": pytest.approx((0.29 - 0.6) / 0.6)}}
    assert rule.check(BASE, {**BASE, "distinct_2": 0.29}, FALLING) is None
    assert set(rule.check(BASE, {**BASE, "distinct_2": 0.29, "teacher_nll": 1.2}, FALLING)["signals"]) == {
        "distinct_2", "teacher_nll"}
    # just inside each threshold: silent
    for key, ok in (("teacher_nll", 1.09), ("eot_rate", 0.61), ("distinct_2", 0.31)):
        assert rule.check(BASE, {**BASE, key: ok}, FALLING) is None
    # the same drift while the loss rises or stays flat: not this failure mode
    assert rule.check(BASE, drift, list(reversed(FALLING))) is None
    assert rule.check(BASE, drift, [1.0, 1.0, 0.99, 1.0]) is None
    assert rule.check(BASE, drift, [1.0]) is None  # too few losses to tell
    # once confirmed, a collapse is reported again while its signals fire, whatever the loss does
    again = rule.check(BASE, drift, list(reversed(FALLING)), confirmed=True)
    assert again["persisting"] is True and "teacher_nll" in again["signals"]
    assert rule.check(BASE, BASE, FALLING, confirmed=True) is None


def test_rule_is_silent_on_a_healthy_curve_and_missing_signals():
    rule = CollapseRule()
    healthy = {"teacher_nll": 0.3, "eot_rate": 1.0, "distinct_2": 0.5}
    assert rule.check(BASE, healthy, FALLING) is None
    # a baseline without teacher NLL (validation without a teacher) cannot fire on it
    assert rule.check({"eot_rate": 0.8}, {"teacher_nll": 9.0, "eot_rate": 0.8}, FALLING) is None
    # a student that never ended its turn cannot lose the end-of-turn rate (min_eot)
    assert rule.check({"eot_rate": 0.02}, {"eot_rate": 0.0}, FALLING) is None
    # distinct_drop 0 turns that signal off; min_signals 2 needs both primary signals
    assert CollapseRule(distinct_drop=0).signals(BASE, {**BASE, "distinct_2": 0.0}) == {}
    assert CollapseRule(min_signals=2).check(BASE, {**BASE, "teacher_nll": 2.0, "distinct_2": 0.0}, FALLING) is None
    assert CollapseRule(min_signals=2).check(BASE, {**BASE, "teacher_nll": 2.0, "eot_rate": 0.0}, FALLING)
    # the real pair's format learning (lab.real_collapse, lr 1e-4, batch 4 x 32): reward up, teacher NLL down,
    # end-of-turn up, distinct-2 down 79%: not a collapse
    assert rule.check({"teacher_nll": 0.820, "eot_rate": 0.583, "distinct_2": 0.746},
                      {"teacher_nll": 0.294, "eot_rate": 1.0, "distinct_2": 0.158}, [3.39, 1.37, 0.07, 0.3, 0.24]) is None


def test_rule_rejects_bad_thresholds():
    for bad in ({"nll_rise": -0.1}, {"eot_drop": float("nan")}, {"loss_window": 0}, {"min_signals": 0}):
        with pytest.raises(ValueError):
            CollapseRule(**bad)


# ----- inside validation, on tiny models -----------------------------------------------------------------------


def _biased_head(model, bias):
    """Swap the bias-free lm_head for one with `bias` (a real-model-like preference, e.g. for ending the turn)."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.copy_(bias)
    model.lm_head = head
    return model


def _validation(tmp_path, **val):
    """A trainer on a tiny pair of equal shapes whose teacher ends its turn (its head favours EOS), and a validation
    callback on 6 prompts x 4 samples of <= 6 tokens."""
    from datasets import Dataset

    from opsd.core.config import OPDConfig
    from opsd.core.trainer import OPDTrainer
    from opsd.validation import ValidationArguments, ValidationCallback

    student_dir, teacher_dir = save_pair(str(tmp_path / "pair"), teacher_hidden=64, teacher_head_scale=6.0)
    vocab = load_tokenizer(student_dir)
    n = len(vocab)
    teacher_bias = torch.zeros(n)
    teacher_bias[1] = 3.0  # the teacher stops within a few tokens
    student = _biased_head(load_causal_lm(student_dir), torch.zeros(n))
    teacher = _biased_head(load_causal_lm(teacher_dir), teacher_bias)
    reference_teacher = _biased_head(load_causal_lm(teacher_dir), teacher_bias)
    args = OPDConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[], bf16=False,
                     gradient_checkpointing=False, use_cpu=True, max_completion_length=6, save_strategy="no")
    trainer = OPDTrainer(student, teacher, args=args, train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8),
                         processing_class=vocab)
    data = write_prompts(str(tmp_path / "val.jsonl"), n=6)
    vargs = ValidationArguments(val_files=[f"arith={data}"], test_freq=1, val_n=4, val_max_new_tokens=6,
                                val_batch_size=8, **val)
    return trainer, ValidationCallback(trainer, vargs), reference_teacher


def _log_losses(trainer, losses):
    for i, loss in enumerate(losses):
        trainer.state.log_history.append({"loss": loss, "step": len(trainer.state.log_history) + 1})


def _drift(model, eos_id=1, mode_id=5):
    """The constructed collapse: the head's bias forbids the end-of-turn token and favours one token."""
    with torch.no_grad():
        model.lm_head.bias[eos_id] = -1e4
        model.lm_head.bias[mode_id] = 8.0


def _blend_towards(student, teacher, alpha):
    with torch.no_grad():
        t = dict(teacher.named_parameters())
        for name, p in student.named_parameters():
            p.mul_(1 - alpha).add_(alpha * t[name])


def test_validation_flags_a_constructed_drift(tmp_path, capsys):
    """The student stops ending its turn and drifts from the teacher's text (its end-of-turn logit pushed down,
    one token pushed up) while the logged loss falls: the warning names the signals, the record carries them."""
    trainer, cb, _ = _validation(tmp_path)
    metrics, collapse = cb.validate(0)
    assert not collapse and "val/arith/collapse" not in metrics
    for key in ("teacher_nll", "eot_rate", "clipped_ratio", "distinct_1", "distinct_2", "distinct_3"):
        assert math.isfinite(metrics[f"val/arith/{key}"]), key
    assert os.path.isfile(tmp_path / "out" / "teacher_text_arith.json")
    base = dict(cb.baseline["arith"])
    _drift(trainer.model)
    _log_losses(trainer, [2.0, 1.8, 1.5, 1.2])
    metrics, collapse = cb.validate(2)
    assert metrics["val/arith/collapse"] == 1.0
    assert metrics["val/arith/eot_rate"] == 0.0 and metrics["val/arith/clipped_ratio"] == 1.0
    assert metrics["val/arith/teacher_nll"] > base["teacher_nll"]
    assert metrics["val/arith/distinct_2"] < base["distinct_2"]
    expected = {"teacher_nll"} | ({"eot_rate"} if base["eot_rate"] >= 0.05 else set())
    assert expected <= set(collapse["arith"]["signals"])
    err = capsys.readouterr().err
    assert "WARNING: possible collapse at step 2 on arith" in err and "teacher_nll" in err
    records = [json.loads(x) for x in open(tmp_path / "out" / "validation.jsonl")]
    assert [r["step"] for r in records] == [0, 2] and "collapse" in records[1]


def test_validation_is_silent_on_a_healthy_run(tmp_path, capsys):
    """The student moves towards the teacher (weights blended in) while the loss falls: no warning."""
    trainer, cb, teacher = _validation(tmp_path)
    cb.validate(0)
    nll = []
    for step, alpha in ((1, 0.5), (2, 1.0)):
        _blend_towards(trainer.model, teacher, alpha)
        _log_losses(trainer, [2.0 - 0.3 * step, 1.9 - 0.3 * step])
        metrics, collapse = cb.validate(step)
        assert not collapse and metrics["val/arith/collapse"] == 0.0
        nll.append(metrics["val/arith/teacher_nll"])
    assert nll[1] < nll[0] < cb.baseline["arith"]["teacher_nll"]
    assert metrics["val/arith/eot_rate"] > cb.baseline["arith"]["eot_rate"]
    assert "WARNING" not in capsys.readouterr().err


def test_stop_on_collapse_stops_training(tmp_path):
    from transformers import TrainerControl

    trainer, cb, _ = _validation(tmp_path, stop_on_collapse=True)
    cb.validate(0)
    _drift(trainer.model)
    _log_losses(trainer, [2.0, 1.5, 1.0])
    trainer.state.global_step, trainer.state.max_steps = 3, 10
    control = cb.on_step_end(trainer.args, trainer.state, TrainerControl())
    assert control.should_training_stop
    assert cb.collapses and cb.collapses[0]["step"] == 3


def test_validation_without_teacher_nll(tmp_path):
    trainer, cb, _ = _validation(tmp_path, val_teacher_nll=False)
    metrics, _ = cb.validate(0)
    assert "val/arith/teacher_nll" not in metrics and "val/arith/eot_rate" in metrics
    assert not os.path.exists(tmp_path / "out" / "teacher_text_arith.json")


def test_collapse_flags_are_checked():
    from opsd.validation import ValidationArguments

    with pytest.raises(ValueError, match="--collapse_nll_rise"):
        ValidationArguments(collapse_nll_rise=-1.0)


# ----- a real mode-seeking collapse, reproduced by training a tiny pair ------------------------------------------


@pytest.fixture(scope="module")
def lab_pair(tmp_path_factory):
    """The lab's shipped addition pair (trained tiny Qwen2 models: the teacher writes the digit-pair solution and
    ends with EOS; the student is warm-started), and 32 held-out prompts with their answers."""
    from lab.models import default_lab_config, prepare_lab_models

    lab = prepare_lab_models(str(tmp_path_factory.mktemp("lab")), default_lab_config("addition"), progress=False)
    rows = [json.loads(line) for line in open(os.path.join(lab["paths"]["dir"], "eval_prompts.jsonl"))][:32]
    val = tmp_path_factory.mktemp("lab_val") / "val.jsonl"
    with open(val, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n")
    return lab["paths"], str(val)


def _train_lab(paths, val, out, lr, steps, *extra):
    from opsd.train import main

    return main(["--model_name_or_path", paths["student"], "--teacher_model_name_or_path", paths["teacher"],
                 "--train_file", os.path.join(paths["dir"], "train_prompts.jsonl"), "--output_dir", str(out),
                 "--per_device_train_batch_size", "16", "--max_steps", str(steps), "--max_completion_length", "20",
                 "--learning_rate", str(lr), "--lr_scheduler_type", "constant", "--logging_steps", "1",
                 "--report_to", "none", "--gradient_checkpointing", "false", "--use_cpu", "true",
                 "--save_strategy", "no", "--seed", "0", "--val_files", f"add={val}", "--test_freq", "5",
                 "--val_before_train", "true", "--val_n", "2", "--val_temperature", "1.0", "--val_top_p", "1.0",
                 "--val_top_k", "0", "--val_max_new_tokens", "20", *extra])


def test_training_collapse_on_a_tiny_pair_is_flagged_and_stopped(lab_pair, tmp_path, capsys):
    """OPD at lr 5e-2 on the lab pair collapses the way the real pair does at lr 1e-4 (REAL_ASSETS.md): after a
    first jump, reverse KL on the student's own rollouts falls (about 18 -> 6 nats/token) while the student turns
    into a repeated-token generator that never ends its turn (end-of-turn rate 1.0 -> 0, distinct-2 0.12 -> < 0.01)
    and the NLL of the teacher's text climbs from 0.2 to > 10. The rule fires at the step-10 validation (measured
    here), and --stop_on_collapse ends the run there (of 30 steps)."""
    paths, val = lab_pair
    summary = _train_lab(paths, val, tmp_path / "run", 5e-2, 30, "--stop_on_collapse", "true")
    records = summary["validation"]
    flagged = [r["step"] for r in records if "collapse" in r]
    # measured here: fires at step 10 (the step-5 validation sees the first jump, while the loss still rises)
    assert flagged and flagged[0] in (10, 15, 20) and summary["global_step"] == flagged[0] == records[-1]["step"]
    assert all(r["metrics"].get("val/add/collapse", 0.0) == 0.0 for r in records[:-1])
    first, last = records[0]["metrics"], records[-1]["metrics"]
    assert last["val/add/collapse"] == 1.0
    assert {"teacher_nll", "eot_rate"} <= set(records[-1]["collapse"]["add"]["signals"])
    assert last["val/add/teacher_nll"] > 10 * first["val/add/teacher_nll"]
    assert first["val/add/eot_rate"] >= 0.9 and last["val/add/eot_rate"] <= 0.1
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert min(losses[-3:]) < 0.6 * max(losses[:5])  # the loss fell while all this happened
    err = capsys.readouterr().err
    step = flagged[0]
    assert f"WARNING: possible collapse at step {step} on add" in err and f"stopping at step {step}" in err
    # the run is still saved and compare shows the collapse
    from opsd.compare import compare

    row = compare([str(tmp_path / "run")])["comparison"]["runs"][0]
    assert row["collapse"]["step"] == step


def test_healthy_training_on_a_tiny_pair_raises_no_warning(lab_pair, tmp_path, capsys):
    """The same pair at lr 3e-4: the teacher-text NLL falls, the student keeps ending its turns, no warning."""
    paths, val = lab_pair
    summary = _train_lab(paths, val, tmp_path / "run", 3e-4, 10)
    records = summary["validation"]
    assert [r["step"] for r in records] == [0, 5, 10] and not any("collapse" in r for r in records)
    nll = [r["metrics"]["val/add/teacher_nll"] for r in records]
    assert nll[-1] < nll[0]
    assert all(r["metrics"]["val/add/eot_rate"] >= 0.9 for r in records)
    assert "possible collapse" not in capsys.readouterr().err


def test_real_collapse_command_rejects_bad_flags_before_loading(tmp_path, capsys):
    from lab.real_collapse import main

    assert main(["--steps", "0", "--output_dir", str(tmp_path)]) == 2
    assert "error: --steps" in capsys.readouterr().err
    assert main(["--teacher", str(tmp_path / "none"), "--output_dir", str(tmp_path)]) == 2
    assert "error: --teacher" in capsys.readouterr().err
