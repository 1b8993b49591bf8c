"""OPDTrainer's loss vs a direct full-logit reference: loss types, normalizations, tool masks, the selection seam,
teacher caching (split invariance through trainer.train() is in test_run_safety.py)."""

import pytest
import torch

from opsd.core.config import OPDConfig
from opsd.core.selection import TokenChoice, TokenSelector
from support import (assert_same, fixed_batch, make_trainer, reference_loss_and_grads, split,
                     trainer_loss_and_grads)



class EvenPositions(TokenSelector):
    """Keeps tokens at even positions, with weight 1 + position; exercises the statistics pass and teacher cache."""

    def __init__(self, scope="rollout_batch", weighted=False):
        self.scope, self.weighted, self.calls = scope, weighted, 0

    def statistics(self, view):
        assert view.student_hidden.shape[0] == view.teacher_hidden.shape[0] == view.positions.numel()
        self.calls += 1
        return {"position": view.positions.float()}

    def choose(self, stats, sequence_ids, positions, generator):
        keep = positions % 2 == 0
        return TokenChoice(keep, (1.0 + positions.float()) if self.weighted else None, {"test/kept": keep.float().sum().item()})


@pytest.mark.parametrize("loss_type", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("normalization", ["kept_tokens", "all_tokens", "sequence"])
def test_full_token_loss_matches_reference(pair, tmp_path, loss_type, normalization):
    trainer = make_trainer(pair, tmp_path, loss_type=loss_type, loss_normalization=normalization)
    batch = fixed_batch()
    assert_same(trainer_loss_and_grads(trainer, [dict(batch)]),
                reference_loss_and_grads(trainer, batch, normalization=normalization))


@pytest.mark.parametrize("normalization", ["kept_tokens", "all_tokens", "sequence"])
@pytest.mark.parametrize("backend", ["chunked", "trl"])
def test_selected_loss_matches_masked_reference(pair, tmp_path, normalization, backend):
    selector = EvenPositions(weighted=True)
    trainer = make_trainer(pair, tmp_path, selector=selector, loss_normalization=normalization,
                           divergence_backend=backend)
    batch = fixed_batch()
    got = trainer_loss_and_grads(trainer, [dict(batch)])
    ref = reference_loss_and_grads(trainer, batch, keep_fn=lambda p: p % 2 == 0, weight_fn=lambda p: 1.0 + p,
                                   normalization=normalization)
    assert_same(got, ref)
    assert selector.calls == 1
    assert trainer._metrics["train"]["kept_fraction"][-1] == pytest.approx(8 / 13)  # even positions: 2 + 2 + 1 + 3 of 13


def test_tool_tokens_never_enter_the_loss(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path)
    batch = fixed_batch()
    trainer._select_tokens([batch])
    assert batch["loss_weights"][0, 2:4].abs().sum() == 0
    assert (batch["loss_weights"] > 0).sum() == 13  # 15 completion tokens - 2 tool tokens
    # changing a tool-output token's teacher view must not change the loss
    other = dict(fixed_batch())
    other["completion_ids"] = other["completion_ids"].clone()
    other["completion_ids"][0, 3] = 7  # last tool token: its prediction is masked; later tokens see it in context
    trainer._select_tokens([other])
    assert (other["loss_weights"] > 0).sum() == 13


def test_rollout_scope_runs_teacher_once_per_micro_batch(pair, tmp_path):
    selector = EvenPositions(scope="rollout_batch")
    trainer = make_trainer(pair, tmp_path, ga=2, bs=2, selector=selector)
    mbs = split(fixed_batch(), 2)
    calls = []
    original = trainer._teacher_hidden
    trainer._teacher_hidden = lambda b: calls.append(1) or original(b)
    trainer_loss_and_grads(trainer, mbs)
    assert len(calls) == 2  # the statistics pass; the gradient pass reused the cached hidden states
    assert all("teacher_hidden" in mb for mb in mbs)


def test_nonfinite_loss_is_skipped_with_zero_gradient(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path)
    batch = fixed_batch()
    trainer._select_tokens([batch])
    batch["loss_weights"] = batch["loss_weights"] * float("nan")
    trainer.model.zero_grad()
    with pytest.warns(UserWarning, match="Non-finite"):
        loss, _, _ = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() == 0
               for p in trainer.model.parameters() if p.grad is not None)


def test_bad_config_values_fail_early(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        OPDConfig(output_dir=str(tmp_path), loss_type="kl")
    with pytest.raises(ValueError, match="loss_normalization"):
        OPDConfig(output_dir=str(tmp_path), loss_normalization="tokens")
    with pytest.raises(ValueError, match="jsd_beta"):
        OPDConfig(output_dir=str(tmp_path), loss_type="jsd", jsd_beta=1.0)
    assert OPDConfig(output_dir=str(tmp_path), loss_type="forward_kl").beta == 0.0
    assert OPDConfig(output_dir=str(tmp_path), enable_thinking=False).chat_template_kwargs == {"enable_thinking": False}


def test_reward_weighting_multiplies_per_sample_weights(pair, tmp_path):
    """w_i = n softmax(r_i / beta) over the generation batch scales each sequence's tokens; normalization unchanged."""
    rewards = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
    trainer = make_trainer(pair, tmp_path, reward_beta=0.5, reward_function="math")
    trainer.reward_fn = lambda completion, answer: rewards[answer]
    trainer.processing_class.batch_decode = lambda ids, skip_special_tokens=True: ["x"] * len(ids)
    batch = fixed_batch()
    inputs = [{"prompt": "p", "answer": k} for k in "abcd"]
    weights = trainer._reward_weights(inputs, batch)
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(weights, 4 * torch.softmax(r / 0.5, 0))
    batch["sample_weights"] = weights
    trainer._select_tokens([batch])
    valid = batch["completion_mask"].bool() & batch["tool_mask"].bool()
    expected = valid.float() * weights[:, None] / valid.sum()
    torch.testing.assert_close(batch["loss_weights"], expected)
    assert trainer._metrics["train"]["reward"][-1] == pytest.approx(0.5)


def test_reward_weighting_needs_answers(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path, reward_beta=0.5, reward_function="math")
    with pytest.raises(ValueError, match="answer"):
        trainer._reward_weights([{"prompt": "p"}], fixed_batch())
