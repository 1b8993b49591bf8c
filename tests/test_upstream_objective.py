"""Upstream's objective (reward_weighting=upstream), its math_dapo reward, rollout accuracy, upstream's data split and
in-training validation (opsd.validation), each against a direct computation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from opsd.core.losses import divergence_reference
from opsd.core.weighting import binarize, reward_weights, upstream_loss_factors
from opsd.reward import get_reward_fn, math_dapo_reward, normalize_dapo_answer
from support import (assert_same, base_args, fixed_batch, full_logits, make_trainer, split, trainer_loss_and_grads,
                     write_prompts)


def upstream_reference(trainer, micro_batches, sample_weights=None):
    """The upstream worker's loss written from its definition in float64: per micro-batch, the token mean of the
    divergence (or sum_i w_i mean_t l_it / sum_i w_i), then the mean over micro-batches that have tokens."""
    losses = []
    trainer.model.zero_grad()
    for i, mb in enumerate(micro_batches):
        z_s, z_t = full_logits(trainer, mb)
        div, _ = divergence_reference(z_s.double(), z_t.double(), trainer.beta)
        valid = (mb["completion_mask"].bool() & mb["tool_mask"].bool()).double()
        if valid.sum() == 0:
            continue
        if sample_weights is None:
            losses.append((div * valid).sum() / valid.sum())
        else:
            w = sample_weights[i].double()
            per_sample = (div * valid).sum(1) / valid.sum(1).clamp_min(1.0)
            losses.append((w * per_sample).sum() / w.sum())
    loss = torch.stack(losses).mean()
    loss.backward()
    grads = {n: p.grad.clone().float() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_upstream_objective_without_weights_is_the_mean_of_micro_batch_token_means(pair, tmp_path, parts):
    trainer = make_trainer(pair, tmp_path, ga=parts, bs=4 // parts, reward_weighting="upstream")
    mbs = split(fixed_batch(), parts)
    assert_same(trainer_loss_and_grads(trainer, [dict(mb) for mb in mbs]), upstream_reference(trainer, mbs))


def test_upstream_objective_with_reward_weights(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path, ga=2, bs=2, reward_weighting="upstream", reward_beta=0.5)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    w = reward_weights(rewards, 0.5)
    mbs = split(fixed_batch(), 2)
    weights = [w[:2], w[2:]]
    for mb, wi in zip(mbs, weights):
        mb["sample_weights"] = wi
    assert_same(trainer_loss_and_grads(trainer, [dict(mb) for mb in mbs]), upstream_reference(trainer, mbs, weights))
    # the global objective is a different number on the same batch (the patches/README difference)
    glob = make_trainer(pair, tmp_path, ga=2, bs=2, reward_beta=0.5)
    assert abs(trainer_loss_and_grads(glob, [dict(mb) for mb in mbs])[0]
               - upstream_reference(trainer, mbs, weights)[0]) > 1e-4


def test_upstream_factors_edge_cases():
    keep = [torch.tensor([[True, True, False], [False, False, False]]), torch.zeros(2, 3, dtype=torch.bool)]
    f = upstream_loss_factors(keep)
    assert torch.equal(f[1], torch.zeros(2, 3))  # a micro-batch without tokens neither counts nor divides
    torch.testing.assert_close(f[0], torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    # an empty sequence keeps its weight in the denominator (as upstream's per-sample loss 0 does)
    fw = upstream_loss_factors(keep, [torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])])
    torch.testing.assert_close(fw[0], torch.tensor([[0.125, 0.125, 0.0], [0.0, 0.0, 0.0]]))
    # one token, zero total weight: no division by zero
    assert torch.isfinite(upstream_loss_factors([torch.tensor([[True]])], [torch.tensor([0.0])])[0]).all()
    torch.testing.assert_close(binarize(torch.tensor([-1.0, 0.0, 0.3, 1.0])), torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_upstream_weighting_binarizes_rewards(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path, reward_beta=0.5, reward_function="math", reward_weighting="upstream")
    scores = {"a": 1.0, "b": -1.0, "c": 0.25, "d": 0.0}  # e.g. math_dapo's +1/-1 scores
    trainer.reward_fn = lambda completion, answer: scores[answer]
    trainer.processing_class.batch_decode = lambda ids, skip_special_tokens=True: ["x"] * len(ids)
    w = trainer._reward_weights([{"prompt": "p", "answer": k} for k in "abcd"], fixed_batch())
    expected = 4 * torch.softmax(torch.tensor([1.0, 0.0, 1.0, 0.0]) / 0.5, 0)
    torch.testing.assert_close(w, expected)


def test_rollout_metrics_count_prompts_and_accuracy(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path)
    trainer.reward_fn = lambda completion, answer: float(answer == "y")
    trainer.processing_class.batch_decode = lambda ids, skip_special_tokens=True: ["x"] * len(ids)
    inputs = [{"prompt": "p1", "answer": "y"}, {"prompt": "p1", "answer": "y"}, {"prompt": "p2", "answer": "n"},
              {"prompt": "p2", "answer": "n"}]
    rewards = trainer._rollout_metrics(inputs, fixed_batch())
    assert rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    m = trainer._metrics["train"]
    assert (m["rollout_prompts"][-1], m["rollout_completions"][-1], m["rollout_accuracy"][-1]) == (2, 4, 0.5)
    assert trainer._rollout_metrics([{"prompt": "p"}] * 4, fixed_batch()) is None  # no answers: counts only


@pytest.mark.parametrize("completion, truth, expected", [
    ("work\nAnswer: 42", "42", 1.0),
    ("Answer: 41\nmore\nAnswer: 42", "42", 1.0),          # the last Answer line counts
    ("Answer: 42\nAnswer: 41", "42", 0.0),
    ("answer : $1,000$ dollars", "1000", 1.0),            # case, dollars, units, thousands separator
    ("Answer: x = 5", "5", 1.0),                          # the part after the last '='
    ("Answer: \\frac12", "\\frac{1}{2}", 1.0),            # shorthand \\frac
    ("Answer: 0.5", "\\frac{1}{2}", 0.0),                 # no symbolic equivalence
    ("\\boxed{42}", "42", 0.0),                           # a box is not an Answer line
    ("Answer: 42" + " filler" * 60, "42", 0.0),           # outside the last 300 characters
    ("Answer: 10^\\circ", "10", 1.0),
])
def test_math_dapo_reward(completion, truth, expected):
    assert math_dapo_reward(completion, truth) == expected
    assert get_reward_fn("math_dapo") is math_dapo_reward and get_reward_fn("math_reward") is get_reward_fn("math")
    assert normalize_dapo_answer("\\text{(B)}") == "(B)"


def test_upstream_split_and_empty_input(tmp_path, capsys):
    from opsd import data as D

    raw = tmp_path / "t.jsonl"
    raw.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(10)))
    summary = D.prepare(raw, tmp_path / "o", train_ratio=0.8, seed=42, instruction="upstream", verbose=False)
    order = np.random.default_rng(42).permutation(10).tolist()
    train = [json.loads(x) for x in open(summary["files"]["train"])]
    val = [json.loads(x) for x in open(summary["files"]["validation"])]
    assert [r["answer"] for r in train] == [str(i) for i in order[:8]]
    assert [r["answer"] for r in val] == [str(i) for i in order[8:]]
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps({"question": "", "answer": "1"}) + "\n" + json.dumps({"question": "q", "answer": ""}))
    assert D.main(["--input", str(empty), "--output_dir", str(tmp_path / "e"), "--layout", "generic"]) == 2
    assert "no rows left" in capsys.readouterr().err
    with pytest.raises(ValueError, match="either"):
        D.prepare(raw, tmp_path / "x", train_ratio=0.8, val_fraction=0.1)


def test_validation_with_selector_and_lora_logs_mean_and_pass_at_k(pair, tmp_path, monkeypatch):
    """tip_ext.train with a selector and a LoRA student: validation before training and every step; a reward that
    accepts every completion gives mean@k = pass@k = 1 (the reward is the one validation scores with)."""
    import opsd.reward as R
    from tip_ext.train import main

    monkeypatch.setitem(R.REWARD_FUNCTIONS, "always", lambda completion, answer: 1.0)
    student, teacher = pair
    data = write_prompts(str(tmp_path / "p.jsonl"), n=8)
    out = str(tmp_path / "run")
    args = base_args(student, teacher, data, out, steps=2) + [
        "--selector", "soft_or", "--ratio", "0.5", "--use_peft", "true", "--lora_r", "4",
        "--lora_target_modules", "all-linear", "--val_files", f"arith={data}", "--test_freq", "1",
        "--val_before_train", "true", "--val_n", "3", "--val_limit", "2", "--val_max_new_tokens", "3",
        "--reward_function", "always"]
    summary = main(args)
    logged = {h["step"]: h for h in summary["log_history"] if "val/arith/mean@3" in h}
    assert sorted(logged) == [0, 1, 2]
    assert all(h["val/arith/mean@3"] == 1.0 and h["val/arith/pass@3"] == 1.0 for h in logged.values())
    assert all(h["rollout_accuracy"] == 1.0 for h in summary["log_history"] if "loss" in h)
    lines = [json.loads(x) for x in open(os.path.join(out, "validation.jsonl"))]
    assert [x["step"] for x in lines] == [0, 1, 2] and lines[0]["settings"]["n"] == 3
    card = open(os.path.join(out, "README.md")).read()
    assert "TIP" in card and "soft_or" in card and "2604.14084" in card


def test_validation_off_builds_nothing(pair, tmp_path, monkeypatch):
    import opsd.validation as V
    from opsd.train import main

    def boom(*a, **k):
        raise AssertionError("ValidationCallback built with validation off")

    monkeypatch.setattr(V, "ValidationCallback", boom)
    student, teacher = pair
    data = write_prompts(str(tmp_path / "p.jsonl"))
    summary = main(base_args(student, teacher, data, str(tmp_path / "run"), steps=1))
    assert not any(k.startswith("val/") for h in summary["log_history"] for k in h)
    assert not os.path.exists(tmp_path / "run" / "validation.jsonl")
    with pytest.raises(ValueError, match="val_files"):
        V.ValidationArguments(test_freq=2)


def test_push_to_hub_pushes_the_final_model_with_its_card(pair, tmp_path, monkeypatch):
    """No network here: the hub calls are recorded instead of made."""
    from opsd.core.trainer import OPDTrainer
    from opsd.train import main

    calls = []
    monkeypatch.setattr(OPDTrainer, "init_hf_repo", lambda self, *a, **k: calls.append("init"))
    def push(self, *args, **kwargs):
        self.create_model_card()  # what transformers' push_to_hub does before uploading
        with open(os.path.join(self.args.output_dir, "README.md")) as f:
            calls.append(("push", "Training method (opsd-tip)" in f.read()))

    monkeypatch.setattr(OPDTrainer, "push_to_hub", push)
    student, teacher = pair
    data = write_prompts(str(tmp_path / "p.jsonl"))
    main(base_args(student, teacher, data, str(tmp_path / "run"), steps=1, push_to_hub="true",
                   hub_model_id="me/opsd-test"))
    assert calls == ["init", ("push", True)]
