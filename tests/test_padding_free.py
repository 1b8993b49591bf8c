"""padding_free: trimmed micro-batches, length-grouped splits and unpadded per-sequence passes give the padded
computation's teacher states, statistics, keep decisions, losses and gradients within float tolerance (odd lengths,
a length-1 completion, EOS-ended and clipped sequences, tool masks, several micro-batches, trainer.train())."""


import pytest
import torch
from datasets import Dataset

from opsd.core.config import OPDConfig
from opsd.core.models import load_causal_lm, load_tokenizer
from opsd.core.trainer import _sorted_by_length, _trimmed
from support import FixedCompletions, SaveGradients, make_trainer, trainer_loss_and_grads
from tip_ext.trainer import SelectorConfig, TipSelector

EOS = 1


def ragged_batch(seed=0, rows=8, prompt=7, completion=9):
    """Left-padded prompts and right-padded completions of odd lengths (one of length 1), EOS-ended and clipped
    sequences, a tool-output span; the rectangle has columns no row uses on both sides."""
    g = torch.Generator().manual_seed(seed)
    prompt_lengths = [5, 3, 1, 4, 2, 5, 3, 1][:rows]  # every row leaves column 0..1 padding: trimmable
    lengths = [7, 1, 3, 7, 5, 2, 6, 4][:rows]  # < completion: the last two columns are padding in every row
    prompt_ids = torch.randint(3, 64, (rows, prompt), generator=g)
    prompt_mask = torch.tensor([[0] * (prompt - p) + [1] * p for p in prompt_lengths])
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(3, 64, (rows, completion), generator=g)
    completion_mask = torch.tensor([[1] * n + [0] * (completion - n) for n in lengths])
    for r, n in enumerate(lengths):
        if r % 2 == 0:
            completion_ids[r, n - 1] = EOS  # EOS-ended; odd rows are clipped (no EOS)
    completion_ids[completion_mask == 0] = 0
    tool_mask = torch.ones(rows, completion, dtype=torch.long)
    tool_mask[0, 2:4] = 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "tool_mask": tool_mask}


def split(batch, parts):
    size = next(iter(batch.values())).shape[0] // parts
    return [{k: v[i * size:(i + 1) * size].clone() for k, v in batch.items()} for i in range(parts)]


def test_trim_drops_only_columns_no_row_uses():
    batch = ragged_batch()
    batch["student_hidden"] = torch.randn(8, 9, 64)
    mb = split(batch, 2)[1]  # prompt lengths 2, 5, 3, 1; completions 5, 2, 6, 4
    out = _trimmed(mb)
    assert out["prompt_ids"].shape[1] == 5 and out["completion_ids"].shape[1] == 6
    assert out["student_hidden"].shape[:2] == (4, 6) and out["tool_mask"].shape == (4, 6)
    assert out["prompt_mask"].sum() == mb["prompt_mask"].sum()
    assert out["completion_mask"].sum() == mb["completion_mask"].sum()
    torch.testing.assert_close(out["student_hidden"], mb["student_hidden"][:, :6])
    # keys the trim does not know (images, token types): the batch is left as it is
    odd = dict(mb, token_type_ids=torch.zeros(4, 16))
    assert _trimmed(odd) is odd


def test_length_sort_is_a_permutation_of_whole_rows():
    batch = ragged_batch()
    batch["sample_weights"] = torch.arange(8.0)
    out = _sorted_by_length(batch)
    total = out["prompt_mask"].sum(1) + out["completion_mask"].sum(1)
    assert torch.all(total[:-1] >= total[1:])
    order = out["sample_weights"].long()
    for key in ("prompt_ids", "completion_ids", "tool_mask"):
        assert torch.equal(out[key], batch[key][order])


@pytest.mark.parametrize("threshold", [1.0, 0.0])  # 1: every sequence unpadded; 0: the trimmed rectangle
@pytest.mark.parametrize("normalization", ["kept_tokens", "sequence"])
@pytest.mark.parametrize("rule", [None, "teachability", "soft_or"])
def test_unpadded_passes_equal_the_padded_rectangle(pair, tmp_path, rule, normalization, threshold):
    def run(padding_free):
        sel = None if rule is None else TipSelector(SelectorConfig(selector=rule, ratio=0.4, support_top_k=4))
        trainer = make_trainer(pair, tmp_path, ga=2, bs=4, selector=sel, padding_free=padding_free,
                               loss_normalization=normalization, max_prompt_length=None,
                               unpadded_fill_threshold=threshold)
        mbs = split(ragged_batch(), 2)
        if padding_free:
            mbs = [_trimmed(mb) for mb in mbs]
        loss, grads = trainer_loss_and_grads(trainer, mbs)
        for mb in mbs:
            mb["teacher_states"] = trainer._teacher_hidden(mb)
        return loss, grads, mbs

    loss, grads, mbs = run(True)
    ref_loss, ref_grads, ref_mbs = run(False)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for mb, ref in zip(mbs, ref_mbs):
        width = mb["completion_ids"].shape[1]
        assert width < ref["completion_ids"].shape[1]  # trimmed
        assert torch.equal(mb["loss_keep"], ref["loss_keep"][:, :width])  # the same keep decisions
        assert not ref["loss_keep"][:, width:].any()
        torch.testing.assert_close(mb["loss_weights"], ref["loss_weights"][:, :width])
        valid = mb["completion_mask"].bool()
        torch.testing.assert_close(mb["teacher_states"][valid], ref["teacher_states"][:, :width][valid],
                                   rtol=1e-4, atol=1e-5)


def test_unpadded_statistics_pass_equals_the_padded_one(pair, tmp_path):
    stats = {}
    for padding_free in (True, False):
        sel = TipSelector(SelectorConfig(selector="teachability", ratio=0.4, support_top_k=4))
        seen = []
        original = sel.statistics
        sel.statistics = lambda view: seen.append(original(view)) or seen[-1]
        trainer = make_trainer(pair, tmp_path, ga=2, bs=4, selector=sel, padding_free=padding_free,
                               statistics_source="separate_pass", unpadded_fill_threshold=1.0)
        trainer.model.train()
        trainer._select_tokens(split(ragged_batch(), 2))
        stats[padding_free] = seen
    for got, ref in zip(stats[True], stats[False]):
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def _train_gradients(pair, tmp_path, padding_free, selector=None, **cfg):
    student, teacher = pair
    grads = SaveGradients()
    settings = dict(output_dir=str(tmp_path / f"out{padding_free}"), per_device_train_batch_size=2,
                    gradient_accumulation_steps=4, max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True,
                    save_strategy="no", max_completion_length=9, logging_steps=1, seed=0, padding_free=padding_free,
                    unpadded_fill_threshold=1.0)
    settings.update(cfg)
    trainer = FixedCompletions(ragged_batch(), load_causal_lm(student), teacher, args=OPDConfig(**settings),
                               train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8),
                               processing_class=load_tokenizer(student), token_selector=selector, callbacks=[grads])
    widths = []
    original = trainer._select_tokens
    trainer._select_tokens = lambda mbs: widths.append([mb["completion_ids"].shape[1] for mb in mbs]) or original(mbs)
    trainer.train()
    return grads.grads[0], widths[0], trainer


@pytest.mark.parametrize("case", ["full", "teachability", "upstream"])
def test_train_step_gradient_equals_padded(pair, tmp_path, case):
    """Through trainer.train() with 4 micro-batches: length grouping + trim + unpadded passes == padded."""
    selector = (lambda: TipSelector(SelectorConfig(selector="teachability", ratio=0.4, support_top_k=4))) \
        if case == "teachability" else (lambda: None)
    cfg = {"reward_weighting": "upstream"} if case == "upstream" else {}
    got, widths, trainer = _train_gradients(pair, tmp_path, True, selector(), **cfg)
    ref, ref_widths, _ = _train_gradients(pair, tmp_path, False, selector(), **cfg)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert ref_widths == [9] * 4
    assert sum(widths) < sum(ref_widths)
    grouped = trainer._groups_by_length({"prompt_ids": 0})
    assert grouped == (case != "upstream")  # the per-micro-batch objective keeps its split
    log = next(h for h in trainer.state.log_history if "time/generation" in h)
    for name in ("generation", "teacher", "statistics", "forward_backward", "optimizer"):
        assert log[f"time/{name}"] >= 0.0
    assert log["time/forward_backward"] > 0.0 and log["time/teacher"] > 0.0
    assert (log["time/statistics"] > 0.0) == (case == "teachability")


def test_micro_batch_scope_keeps_the_random_split(pair, tmp_path):
    sel = TipSelector(SelectorConfig(selector="soft_or", ratio=0.4, scope="micro_batch"))
    trainer = make_trainer(pair, tmp_path, ga=2, bs=4, selector=sel)
    assert not trainer._groups_by_length({"prompt_ids": 0})
    trainer.token_selector.scope = "rollout_batch"
    assert trainer._groups_by_length({"prompt_ids": 0})
    trainer.args.padding_free = False
    assert not trainer._groups_by_length({"prompt_ids": 0})


@pytest.mark.parametrize("threshold,per_sequence", [(1.0, True), (0.0, False), (0.6, False), (0.7, True), (0.9, True)])
def test_fill_threshold_picks_the_pass(pair, tmp_path, threshold, per_sequence):
    """The first micro-batch of ragged_batch fills 31 of 4 x 12 trimmed cells (0.65: < 0.7, >= 0.6)."""
    trainer = make_trainer(pair, tmp_path, unpadded_fill_threshold=threshold)
    mb = _trimmed(split(ragged_batch(), 2)[0])
    assert mb["prompt_ids"].shape[1] + mb["completion_ids"].shape[1] == 12
    calls = []
    original = trainer._get_last_hidden_state
    trainer._get_last_hidden_state = lambda model, ids, *a: calls.append(ids.shape[0]) or original(model, ids, *a)
    with torch.no_grad():
        trainer._completion_hidden(trainer.model, mb)
    assert calls == ([1] * 4 if per_sequence else [4])
