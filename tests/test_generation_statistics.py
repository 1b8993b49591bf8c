"""statistics_source=generation: the student's hidden states recorded while it samples equal the separate no-grad
pass at every valid completion position (left-padded prompts of different lengths, EOS-ended and clipped sequences,
several micro-batches, LoRA students, gradient checkpointing), and so do the statistics, keep decisions and losses."""

import copy

import pytest
import torch
from datasets import Dataset

from opsd.core.config import OPDConfig
from opsd.core.models import load_causal_lm, load_tokenizer
from opsd.core.selection import valid_token_index
from opsd.core.trainer import OPDTrainer
from support import C
from tip_ext.stats import token_stats_from_hidden
from tip_ext.trainer import SelectorConfig, TipSelector

PROMPTS = ["1+1=", "12+345=", "9=", "123+4567=", "5+5=", "77+8=", "0=", "2+22+222="]  # lengths 2..9: left padding


def make(pair, tmp_path, ga=2, selector=None, peft=False, **cfg):
    student_dir, teacher_dir = pair
    defaults = dict(per_device_train_batch_size=4, gradient_accumulation_steps=ga, report_to=[], bf16=False,
                    gradient_checkpointing=False, use_cpu=True, max_completion_length=C, save_strategy="no", seed=3)
    args = OPDConfig(output_dir=str(tmp_path / "out"), **{**defaults, **cfg})
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 task_type="CAUSAL_LM")
    trainer = OPDTrainer(load_causal_lm(student_dir), teacher_dir, args=args,
                         train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                         processing_class=load_tokenizer(student_dir), token_selector=selector,
                         peft_config=peft_config)
    # make EOS likely when sampling (generation only: the statistics read the head's weights, not this module), so
    # the batch has EOS-ended sequences of several lengths, including length 1, next to clipped ones
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
    eos = trainer._tokenizer.eos_token_id
    head.register_forward_hook(lambda m, i, out: out.index_add(-1, torch.tensor([eos]),
                                                               torch.full((*out.shape[:-1], 1), 2.5)))
    return trainer


def selector(rule="teachability", ratio=0.5, census=True):
    return TipSelector(SelectorConfig(selector=rule, ratio=ratio, support_top_k=4, census=census), chunk_size=5)


def prepare(trainer, seed=0, prompts=PROMPTS):
    """One step's micro-batches through _prepare_inputs (generation, statistics, selection); records the views."""
    views = []
    original = trainer.token_selector.statistics

    def spy(view):
        stats = original(view)
        views.append((view.student_hidden.clone(), {k: v.clone() for k, v in stats.items()}))
        return stats

    trainer.token_selector.statistics = spy
    trainer.model.train()
    torch.manual_seed(seed)
    trainer._step, trainer._buffered_inputs = 0, None
    trainer._prepare_inputs([{"prompt": p} for p in prompts])
    trainer.token_selector.statistics = original
    return trainer._buffered_inputs, views


def separate_pass_hidden(trainer, mb):
    student = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        hidden = trainer._get_last_hidden_state(student, *trainer._model_inputs(mb))  # the padded reference
    flat, _, _ = valid_token_index(trainer._loss_mask(mb))
    return hidden.reshape(-1, hidden.shape[-1])[flat]


@pytest.mark.parametrize("variant", ["plain", "lora", "checkpointing"])
def test_captured_hidden_equals_separate_pass(pair, tmp_path, variant):
    kwargs = {"peft": variant == "lora", "gradient_checkpointing": variant == "checkpointing"}
    trainer = make(pair, tmp_path, selector=selector(), **kwargs)
    micro_batches, views = prepare(trainer)
    assert len(views) == len(micro_batches) == 2
    lengths = torch.cat([mb["completion_mask"].sum(1) for mb in micro_batches])
    assert (lengths < C).any() and (lengths == C).any(), lengths  # EOS-ended and clipped sequences
    prompt_lengths = torch.cat([mb["prompt_mask"].sum(1) for mb in micro_batches])
    assert prompt_lengths.unique().numel() > 2  # left-padded prompts of several lengths
    s_head = trainer._heads(trainer.accelerator.unwrap_model(trainer.model),
                            trainer.accelerator.unwrap_model(trainer.teacher_model))
    for mb, (captured, stats) in zip(micro_batches, views):
        assert "student_hidden" not in mb  # dropped after selection (memory)
        reference = separate_pass_hidden(trainer, mb)
        torch.testing.assert_close(captured, reference, rtol=1e-4, atol=1e-5)
        # statistics from the reference hidden states, the same function: equal within float tolerance
        flat, _, _ = valid_token_index(trainer._loss_mask(mb))
        h_t = mb["teacher_hidden"].reshape(-1, mb["teacher_hidden"].shape[-1])[flat]
        ref = token_stats_from_hidden(reference, s_head[0], h_t, s_head[1], top_k=4, chunk_size=5,
                                      names=tuple(stats))
        for name in stats:
            torch.testing.assert_close(stats[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("rule,scope", [("teachability", "rollout_batch"), ("soft_or", "micro_batch"),
                                        ("entropy_topk", "sequence")])
def test_keep_decisions_and_loss_equal_the_separate_pass(pair, tmp_path, rule, scope):
    sel = TipSelector(SelectorConfig(selector=rule, ratio=0.3, scope=scope, support_top_k=4, census=False))
    trainer = make(pair, tmp_path, selector=sel)
    micro_batches, _ = prepare(trainer)
    # the same micro-batches through the separate pass
    reference = [{k: v for k, v in copy.deepcopy(mb).items() if k not in ("loss_keep", "loss_weights")}
                 for mb in micro_batches]
    trainer.args.statistics_source = "separate_pass"
    calls = []
    original = trainer._completion_hidden
    trainer._completion_hidden = lambda *a: calls.append(1) or original(*a)
    trainer._select_tokens(reference)
    assert len(calls) == 2  # the separate pass ran (the teacher's hidden states were cached already)
    for got, ref in zip(micro_batches, reference):
        assert torch.equal(got["loss_keep"], ref["loss_keep"])
        torch.testing.assert_close(got["loss_weights"], ref["loss_weights"])
        trainer.model.zero_grad()
        loss_got = trainer._compute_loss(trainer.model, got)[0]
        loss_ref = trainer._compute_loss(trainer.model, ref)[0]
        torch.testing.assert_close(loss_got, loss_ref)


def test_generation_path_runs_no_student_statistics_forward(pair, tmp_path):
    trainer = make(pair, tmp_path, selector=selector(census=False))
    calls = []
    original = trainer._completion_hidden
    trainer._completion_hidden = lambda model, batch: calls.append(model) or original(model, batch)
    prepare(trainer)
    student = trainer.accelerator.unwrap_model(trainer.model)
    assert calls and all(m is not student for m in calls)  # teacher passes only
    trainer.args.statistics_source = "separate_pass"
    calls.clear()
    prepare(trainer)
    assert sum(m is student for m in calls) == 2


def test_overlap_diagnostics_use_the_captured_states(pair, tmp_path):
    trainer = make(pair, tmp_path, selector=None, overlap_diagnostics=True)
    trainer.model.train()
    assert trainer._wants_generation_capture()
    seen = []
    original = trainer._student_statistics_hidden
    trainer._student_statistics_hidden = lambda s, mb: seen.append("student_hidden" in mb) or original(s, mb)
    trainer._step, trainer._buffered_inputs = 0, None
    trainer._prepare_inputs([{"prompt": p} for p in PROMPTS])
    assert seen == [True, True]
    assert "overlap/ratio" in trainer._metrics["train"]


def test_capture_is_off_where_it_cannot_work(pair, tmp_path):
    trainer = make(pair, tmp_path, selector=selector())
    trainer.model.train()
    assert trainer._wants_generation_capture()
    trainer.args.statistics_source = "separate_pass"
    assert not trainer._wants_generation_capture()
    trainer.args.statistics_source = "generation"
    trainer.model.eval()
    assert not trainer._wants_generation_capture()  # evaluation: no statistics
    plain = make(pair, tmp_path, selector=None)
    plain.model.train()
    assert not plain._wants_generation_capture()  # full-token OPD: nothing to record


def test_bad_statistics_source_fails_early(tmp_path):
    with pytest.raises(ValueError, match="statistics_source"):
        OPDConfig(output_dir=str(tmp_path), statistics_source="logits")


def test_real_smollm2_recorded_statistics_equal_the_separate_pass(real_model_dir, tmp_path):
    """The real SmolLM2-135M-Instruct (30 layers, chat template, its own tokenizer) as student and teacher."""
    path = str(real_model_dir)
    prompts = [[{"role": "user", "content": text}] for text in ("What is 2 + 3?", "Name a colour.",
                                                                 "Write the number seven in digits, then stop.",
                                                                 "Hi")]
    args = OPDConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     report_to=[], bf16=False, use_cpu=True, max_completion_length=6, save_strategy="no", seed=0)
    sel = selector("soft_or", 0.5, census=False)
    trainer = OPDTrainer(load_causal_lm(path), path, args=args,
                         train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                         processing_class=load_tokenizer(path), token_selector=sel)
    micro_batches, views = prepare(trainer, prompts=prompts)
    assert torch.cat([mb["prompt_mask"].sum(1) for mb in micro_batches]).unique().numel() > 1  # left padding
    heads = trainer._heads(trainer.accelerator.unwrap_model(trainer.model),
                           trainer.accelerator.unwrap_model(trainer.teacher_model))
    for mb, (captured, stats) in zip(micro_batches, views):
        reference = separate_pass_hidden(trainer, mb)
        torch.testing.assert_close(captured, reference, rtol=1e-4, atol=1e-4)
        flat, _, _ = valid_token_index(trainer._loss_mask(mb))
        h_t = mb["teacher_hidden"].reshape(-1, mb["teacher_hidden"].shape[-1])[flat]
        ref = token_stats_from_hidden(reference, heads[0], h_t, heads[1], top_k=4, chunk_size=5, names=tuple(stats))
        for name in stats:
            torch.testing.assert_close(stats[name], ref[name], rtol=1e-3, atol=1e-4, msg=name)


def test_unexpected_backbone_calls_fall_back_to_the_separate_pass(pair, tmp_path):
    trainer = make(pair, tmp_path, selector=selector(census=False))
    backbone = trainer._capture_module()
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
    # one more backbone call per sampled token (as beam search or assisted decoding would make): counts mismatch
    extra = head.register_forward_hook(lambda m, i, out: [backbone(input_ids=torch.zeros(out.shape[0], 1).long())] and None)
    with pytest.warns(UserWarning, match="separate statistics pass"):
        micro_batches, views = prepare(trainer)
    extra.remove()
    for mb, (captured, _) in zip(micro_batches, views):
        torch.testing.assert_close(captured, separate_pass_hidden(trainer, mb), rtol=1e-4, atol=1e-5)
