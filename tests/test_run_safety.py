"""Runs that must not go wrong silently, through the real `trainer.train()`: non-finite losses skip whole optimizer
steps (no weight decay, no optimizer state) and stop after a limit; the logged entropy is a kept-token mean;
padded student heads never sample ids the teacher cannot embed; bad settings fail at start; gradient accumulation
splits give the same step."""

import math
import os

import pytest
import torch
from datasets import Dataset

from opsd.core.config import OPDConfig
from opsd.core.models import load_causal_lm, load_tokenizer
from opsd.core.selection import TokenChoice, TokenSelector
from opsd.core.trainer import OPDTrainer
from opsd.train import main
from support import (COMPLETION, SEQUENCES, FixedCompletions, SaveGradients, base_args, make_model, make_tokenizer,
                     write_prompts)
from tip_ext.trainer import SelectorConfig, TipSelector


def fixed_global_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_ids": torch.randint(3, 64, (SEQUENCES, 3), generator=g),
        "prompt_mask": torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]]),
        "completion_ids": torch.randint(3, 64, (SEQUENCES, COMPLETION), generator=g),
        "completion_mask": torch.tensor([[1] * n + [0] * (COMPLETION - n) for n in (6, 3, 1, 5)]),
    }


def fixed_trainer(pair, tmp_path, batch=None, selector=None, callbacks=None, **cfg):
    student, teacher = pair
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=SEQUENCES,
                    gradient_accumulation_steps=1, max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True,
                    save_strategy="no", max_completion_length=COMPLETION, logging_steps=1, seed=0)
    settings.update(cfg)
    return FixedCompletions(fixed_global_batch() if batch is None else batch, load_causal_lm(student), teacher,
                            args=OPDConfig(**settings), train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8),
                            processing_class=load_tokenizer(student), token_selector=selector, callbacks=callbacks)


class KeepFirstSequence(TokenSelector):
    """Keeps the tokens of the sequence whose first completion id is the marker; no statistics pass."""

    needs_model_pass = False

    def __init__(self, marker):
        self.marker = marker

    def statistics(self, view):
        first = torch.zeros_like(view.token_ids, dtype=torch.bool)
        for seq in view.sequence_ids.unique():
            idx = (view.sequence_ids == seq).nonzero(as_tuple=True)[0]
            first[idx] = view.token_ids[idx[0]] == self.marker
        return {"keep": first.float()}

    def choose(self, stats, sequence_ids, positions, generator):
        return TokenChoice(stats["keep"] > 0)


# ----- non-finite losses -------------------------------------------------------------------------------------


def _poison_teacher(trainer):
    with torch.no_grad():
        trainer.teacher_model.lm_head.weight.fill_(float("nan"))


def test_nonfinite_teacher_skips_steps_without_moving_weights_or_optimizer_state(pair, tmp_path):
    trainer = fixed_trainer(pair, tmp_path, max_steps=2, weight_decay=0.1, max_consecutive_skipped_steps=0)
    _poison_teacher(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.warns(UserWarning, match="Non-finite"):
        trainer.train()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name  # not even weight decay moved it
    assert all(not state for state in trainer.optimizer.optimizer.state.values())  # no Adam moments, no step count
    assert sum(h.get("skipped_steps", 0) for h in trainer.state.log_history) == 2


def test_nonfinite_teacher_on_every_step_stops_with_a_clear_error(pair, tmp_path):
    trainer = fixed_trainer(pair, tmp_path, max_steps=10, max_consecutive_skipped_steps=3)
    _poison_teacher(trainer)
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match="3 optimizer steps in a row"):
        trainer.train()
    assert trainer.state.global_step == 2  # the third skipped step raised


def test_skip_nonfinite_false_stops_at_once(pair, tmp_path):
    trainer = fixed_trainer(pair, tmp_path, skip_nonfinite_loss=False)
    _poison_teacher(trainer)
    with pytest.raises(FloatingPointError, match="Non-finite OPD loss"):
        trainer.train()


# ----- logged entropy -----------------------------------------------------------------------------------------


def test_logged_entropy_is_the_mean_over_kept_tokens(pair, tmp_path):
    batch = fixed_global_batch(seed=3)
    batch["completion_ids"][:, 0] = torch.tensor([5, 9, 9, 9])  # only the first sequence starts with the marker
    trainer = fixed_trainer(pair, tmp_path, batch=batch, selector=KeepFirstSequence(5), per_device_train_batch_size=2,
                            gradient_accumulation_steps=2)  # the other micro-batch keeps nothing
    student = load_causal_lm(pair[0])
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        z = student(input_ids=ids[:1], attention_mask=att[:1]).logits[0, 2:-1].double()
    logp = z.log_softmax(-1)
    expected = -(logp.exp() * logp).sum(-1)[batch["completion_mask"][0].bool()].mean().item()
    trainer.train()
    logged = [h["entropy"] for h in trainer.state.log_history if "entropy" in h]
    assert logged and logged[0] == pytest.approx(expected, rel=1e-4)


# ----- padded vocabularies -----------------------------------------------------------------------------------


def _padded_pair(root, teacher_tokenizer=True):
    """A student head padded to 128 rows next to a 64-row teacher with the same 64-token tokenizer: a random
    student samples a padding id about every second token unless generation suppresses them."""
    tok = make_tokenizer()
    paths = []
    for name, rows, hidden, seed in (("student", 128, 64, 0), ("teacher", len(tok), 128, 1)):
        path = os.path.join(root, name)
        make_model(rows, hidden=hidden, seed=seed).save_pretrained(path)
        if name == "student" or teacher_tokenizer:
            tok.save_pretrained(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("teacher_tokenizer", [True, False])
def test_padded_student_head_never_samples_ids_the_teacher_lacks(tmp_path, teacher_tokenizer):
    student, teacher = _padded_pair(str(tmp_path), teacher_tokenizer)
    data = write_prompts(str(tmp_path / "prompts.jsonl"), n=8)
    summary = main(base_args(student, teacher, data, str(tmp_path / "run"), steps=3, max_completion_length=12))
    assert len([h for h in summary["log_history"] if "loss" in h]) == 3
    trainer = OPDTrainer(load_causal_lm(student), teacher, args=OPDConfig(
        output_dir=str(tmp_path / "gen"), per_device_train_batch_size=8, max_completion_length=12, report_to=[],
        use_cpu=True), train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8),
        processing_class=load_tokenizer(student))
    completions = trainer._generate_and_score_completions([{"prompt": f"{i}+{i}="} for i in range(8)])
    ids = completions["completion_ids"][completions["completion_mask"].bool()]
    assert ids.numel() > 20 and int(ids.max()) < 64


# ----- early validation -----------------------------------------------------------------------------------------


def test_chat_prompts_without_a_chat_template_fail_at_start(pair, tmp_path):
    student, teacher = pair
    tokenizer = load_tokenizer(student)
    assert tokenizer.chat_template is None
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "1+1="}]}] * 4)
    with pytest.raises(ValueError, match="chat template"):
        OPDTrainer(load_causal_lm(student), teacher, args=OPDConfig(output_dir=str(tmp_path), report_to=[],
                   use_cpu=True, per_device_train_batch_size=4), train_dataset=data, processing_class=tokenizer)


@pytest.mark.parametrize("settings, flag", [
    (dict(selector="teachability", support_top_k=0), "support_top_k"),
    (dict(selector="none", ratio=1.5), "ratio"),
    (dict(selector=None, scope="global"), "scope"),
    (dict(selector="none", selector_options='{"alpha": 2}'), "alpha"),
    (dict(selector="soft_or", census_quantile=1.0), "census_quantile"),
])
def test_selector_settings_fail_at_start_naming_the_flag(settings, flag):
    with pytest.raises(ValueError, match=flag):
        SelectorConfig(**settings)


def test_max_consecutive_skipped_steps_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="max_consecutive_skipped_steps"):
        OPDConfig(output_dir=str(tmp_path), max_consecutive_skipped_steps=-1)


# ----- gradient accumulation through trainer.train() -------------------------------------------------------------


@pytest.mark.parametrize("rule, normalization", [(None, "kept_tokens"), (None, "all_tokens"), (None, "sequence"),
                                                 ("soft_or", "kept_tokens"), ("q3", "sequence"),
                                                 ("teachability", "all_tokens")])
def test_accumulation_splits_give_the_same_step_through_train(pair, tmp_path, rule, normalization):
    """One micro-batch of 4, two of 2 and four of 1 (shuffled differently by TRL) give the same optimizer step;
    with a rule at rollout_batch scope the selection spans the micro-batches."""
    grads = []
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        saver = SaveGradients()
        selector = None if rule is None else TipSelector(SelectorConfig(selector=rule, ratio=0.4, support_top_k=4))
        trainer = fixed_trainer(pair, tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, selector=selector,
                                gradient_accumulation_steps=ga, loss_normalization=normalization,
                                max_grad_norm=0.0, callbacks=[saver])
        trainer.train()
        grads.append(saver.grads[0])
    for other in grads[1:]:
        assert set(other) == set(grads[0])
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-4, atol=1e-7, msg=name)
    assert math.isfinite(sum(g.abs().sum().item() for g in grads[0].values()))
