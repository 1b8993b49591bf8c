"""Overlap diagnostics (opsd.core.diagnostics, tip_ext's statistics pass and the baseline's trainer pass) against
float64 references written from the definitions (docs/METHODS.md section 6)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd
import pytest
import torch

from opsd.core.diagnostics import OVERLAP_NAMES, overlap_chunk, overlap_from_hidden, position_buckets, summarize
from opsd.core.heads import LMHead
from support import fixed_batch, full_logits, make_trainer, split
from tip_ext.census import quadrant_means
from tip_ext.stats import token_stats
from tip_ext.trainer import SelectorConfig, TipSelector


def reference_row(zs, zt, k):
    """One row from the definitions, in float64 numpy; top-K sets by a stable sort (inputs have no ties)."""
    zs, zt = np.asarray(zs, dtype=np.float64), np.asarray(zt, dtype=np.float64)
    ps, pt = np.exp(zs - zs.max()), np.exp(zt - zt.max())
    ps, pt = ps / ps.sum(), pt / pt.sum()
    k = min(k, zs.size)
    shared = sorted(set(np.argsort(-zs, kind="stable")[:k]) & set(np.argsort(-zt, kind="stable")[:k]))
    h = lambda p: -float(sum(x * np.log(x) for x in p if x > 0))  # noqa: E731
    with np.errstate(divide="ignore"):  # log 0 of a teacher token the student can reach: KL = inf
        kl = float(sum(a * (np.log(a) - np.log(b)) for a, b in zip(ps, pt) if a > 0))
    return {"overlap_ratio": len(shared) / k, "shared_mass_student": float(ps[shared].sum()),
            "shared_mass_teacher": float(pt[shared].sum()), "entropy_gap": h(ps) - h(pt), "reverse_kl": kl}


def reference(zs, zt, k):
    rows = [reference_row(a, b, k) for a, b in zip(zs.double().numpy(), zt.double().numpy())]
    return {name: torch.tensor([r[name] for r in rows], dtype=torch.float64) for name in rows[0]}


def assert_close_stats(got, ref, names=None):
    for name in names or ref:
        torch.testing.assert_close(got[name].double(), ref[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("n,v,k", [(7, 40, 16), (1, 20, 4), (5, 9, 16), (6, 64, 1)])
def test_overlap_chunk_matches_reference(n, v, k):
    g = torch.Generator().manual_seed(n * 100 + v)
    zs, zt = torch.randn(n, v, generator=g) * 3, torch.randn(n, v, generator=g) * 3
    got = overlap_chunk(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), k)
    assert_close_stats(got, reference(zs, zt, k))


def test_identical_distributions_and_saturated_rows():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 30, generator=g)
    same = overlap_chunk(torch.log_softmax(z, -1), torch.log_softmax(z, -1), 5)
    torch.testing.assert_close(same["overlap_ratio"], torch.ones(4))
    torch.testing.assert_close(same["entropy_gap"], torch.zeros(4), atol=1e-6, rtol=0)
    # saturated teacher: -inf logits off a few tokens (probability exactly 0); K larger than the finite support
    zt = torch.full((2, 30), -float("inf"))
    zt[:, :3] = torch.tensor([5.0, 1.0, 0.0])
    zs = torch.randn(2, 30, generator=g)
    zs[1, 0] = 80.0  # a student that rounds every other probability to 0
    got = overlap_chunk(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), 4)
    for name in ("overlap_ratio", "shared_mass_student", "shared_mass_teacher", "entropy_gap"):
        assert torch.isfinite(got[name]).all(), name
    ref = reference(zs[:, :].clone(), zt, 4)
    # the teacher's top-4 holds its 3 finite tokens plus one -inf token chosen by torch; only the finite ones matter
    assert got["shared_mass_teacher"][1] == pytest.approx(float(torch.softmax(zt[1], -1)[0]), rel=1e-5)
    torch.testing.assert_close(got["entropy_gap"].double(), ref["entropy_gap"], rtol=1e-5, atol=1e-5)


def test_overlap_from_hidden_is_chunk_invariant_and_matches_logits():
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(11, 8, generator=g), torch.randn(11, 16, generator=g)
    ws, wt = torch.randn(72, 8, generator=g), torch.randn(72, 16, generator=g)
    s_head, t_head = LMHead(ws, vocab_size=64), LMHead(wt, scale=0.5, softcap=3.0, vocab_size=64)
    ref = reference(s_head.logits(hs, 0.8), t_head.logits(ht, 0.8), 16)
    for chunk in (1, 4, 1000):
        got = overlap_from_hidden(hs, s_head, ht, t_head, 16, chunk, 0.8)
        assert_close_stats(got, ref)
    with pytest.raises(ValueError, match="vocabularies"):
        overlap_from_hidden(hs, s_head, ht, LMHead(wt), 16)


def test_position_buckets():
    lengths = [1, 2, 3, 5, 6]
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    pos = torch.cat([torch.arange(n) for n in lengths])
    expected = [[0], [0, 1], [0, 1, 2], [0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]]  # floor(3 t / L)
    assert position_buckets(seq, pos).tolist() == sum(expected, [])
    order = torch.randperm(seq.numel(), generator=torch.Generator().manual_seed(0))
    assert position_buckets(seq[order], pos[order]).tolist() == [sum(expected, [])[i] for i in order.tolist()]
    assert position_buckets(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)).numel() == 0


def test_summarize_means_and_empty_buckets():
    stats = {"overlap_ratio": torch.tensor([0.5, 1.0, 0.25, 0.75]), "entropy_gap": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    buckets = torch.tensor([0, 0, 1, 1])
    got = summarize(stats, buckets, torch.tensor([True, False, True, True]))
    assert got == pytest.approx({"overlap/ratio": 0.5, "overlap/ratio/first": 0.5, "overlap/ratio/middle": 0.5,
                                 "overlap/entropy_gap": 8 / 3, "overlap/entropy_gap/first": 1.0,
                                 "overlap/entropy_gap/middle": 3.5})
    assert summarize(stats, buckets, torch.zeros(4, dtype=torch.bool)) == {}


def test_tip_stats_pass_computes_the_same_diagnostics():
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(9, 50, generator=g) * 2, torch.randn(9, 50, generator=g) * 2
    got = token_stats(zs, zt, top_k=4, chunk_size=2, names=OVERLAP_NAMES + ("reverse_kl",), overlap_k=8)
    assert set(got) == set(OVERLAP_NAMES) | {"reverse_kl"}
    assert_close_stats(got, reference(zs, zt, 8))
    assert "overlap_ratio" not in token_stats(zs, zt)  # not part of the default statistics


def test_quadrant_means():
    h = torch.tensor([0.9, 0.8, 0.1, 0.2])
    d = torch.tensor([1.0, 0.0, 2.0, 0.1])
    value = torch.tensor([10.0, 20.0, 30.0, 40.0])
    # medians 0.5 and 0.55: token 0 Q1, token 1 Q2, token 2 Q3, token 3 Q4
    assert quadrant_means(h, d, {"x": value}) == {"x/Q1": 10.0, "x/Q2": 20.0, "x/Q3": 30.0, "x/Q4": 40.0}


def _reference_metrics(trainer, batch, keep=None):
    z_s, z_t = full_logits(trainer, batch)
    valid = batch["completion_mask"].bool() & batch["tool_mask"].bool()
    positions = (valid.long().cumsum(1) - 1)
    lengths = valid.sum(1, keepdim=True).expand_as(valid)
    ref = reference(z_s[valid].detach() / trainer.temperature, z_t[valid] / trainer.temperature, trainer.args.overlap_k)
    bucket = (3 * positions[valid]) // lengths[valid]
    mask = torch.ones(bucket.numel(), dtype=torch.bool) if keep is None else keep
    out = {}
    for name, short in (("overlap_ratio", "ratio"), ("shared_mass_student", "student_mass"),
                        ("shared_mass_teacher", "teacher_mass"), ("entropy_gap", "entropy_gap"),
                        ("reverse_kl", "reverse_kl")):
        out[f"overlap/{short}"] = float(ref[name][mask].mean())
        for b, label in enumerate(("first", "middle", "last")):
            if (mask & (bucket == b)).any():
                out[f"overlap/{short}/{label}"] = float(ref[name][mask & (bucket == b)].mean())
    return out


def test_baseline_trainer_logs_overlap_over_tokens_in_the_loss(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path, ga=2, overlap_diagnostics=True, overlap_k=4)
    batch = fixed_batch()
    trainer._select_tokens(split(batch, 2))
    ref = _reference_metrics(trainer, batch)
    got = {name: values[-1] for name, values in trainer._metrics["train"].items() if name.startswith("overlap/")}
    assert set(got) == set(ref)
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    off = make_trainer(pair, tmp_path)
    off._select_tokens(split(batch, 2))
    assert not any(name.startswith("overlap/") for name in off._metrics["train"])


def test_selector_logs_overlap_over_kept_tokens_and_dumps_it(pair, tmp_path):
    dump = tmp_path / "dump"
    selector = TipSelector(SelectorConfig(selector="position_last", ratio=0.5, support_top_k=4,
                                          token_dump_dir=str(dump)), overlap_k=4)
    trainer = make_trainer(pair, tmp_path, ga=1, selector=selector, overlap_diagnostics=True, overlap_k=4)
    batch = fixed_batch()
    trainer._select_tokens([batch])
    table = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(str(dump / "*.parquet")))])
    assert {"overlap_ratio", "shared_mass_student", "shared_mass_teacher", "entropy_gap",
            "position_bucket"} <= set(table.columns)
    keep = torch.tensor(table["kept"].to_numpy())
    ref = _reference_metrics(trainer, batch, keep)
    metrics = trainer._metrics["train"]
    for name, value in ref.items():
        assert len(metrics[name]) == 1, name  # one value per step: the trainer's own pass did not run as well
        assert metrics[name][0] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert any(name.startswith("census/overlap_ratio/") for name in metrics)


def test_training_runs_log_the_diagnostics(tmp_path):
    """Both entry points, end to end: the baseline with --overlap_diagnostics and a tip_ext selector's census."""
    from opsd.train import main as train_opd
    from support import base_args, save_pair, write_prompts
    from tip_ext.plot import main as plot_main
    from tip_ext.train import main as train_tip

    student, teacher = save_pair(str(tmp_path))
    data = write_prompts(str(tmp_path / "p.jsonl"), n=8)
    runs = {"opd": train_opd(base_args(student, teacher, data, str(tmp_path / "opd"), steps=2,
                                       overlap_diagnostics="true", overlap_k=8, loss_support="union")),
            "tip": train_tip(base_args(student, teacher, data, str(tmp_path / "tip"), steps=2, selector="q3",
                                       ratio=0.5, overlap_k=8))}
    for name in runs:  # the overlap curves plot (tip_ext.plot --overlap) reads either run
        assert os.path.getsize(plot_main(["--overlap", str(tmp_path / name)])) > 0
    train_opd(base_args(student, teacher, data, str(tmp_path / "plain"), steps=1))  # no diagnostics asked for
    with pytest.raises(ValueError, match="overlap_diagnostics"):
        plot_main(["--overlap", str(tmp_path / "plain")])
    for name, summary in runs.items():
        logged = [h for h in summary["log_history"] if "loss" in h]
        assert len(logged) == 2, name
        for h in logged:
            assert 0.0 <= h["overlap/ratio"] <= 1.0 and 0.0 <= h["overlap/teacher_mass"] <= 1.0, name
            assert "overlap/entropy_gap/first" in h, name



class _EvenPositions:
    """A selector that logs no diagnostics itself: the trainer's pass must cover only the tokens it keeps."""

    scope, across_processes, needs_model_pass = "rollout_batch", True, False

    def statistics(self, view):
        return {}

    def choose(self, stats, sequence_ids, positions, generator):
        from opsd.core.selection import TokenChoice

        return TokenChoice(positions % 2 == 0)

    def record(self, *args):
        pass


def test_trainer_pass_covers_only_the_tokens_a_selector_keeps(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path, ga=2, selector=_EvenPositions(), overlap_diagnostics=True, overlap_k=4)
    batch = fixed_batch()
    trainer._select_tokens(split(batch, 2))
    valid = batch["completion_mask"].bool() & batch["tool_mask"].bool()
    keep = ((valid.long().cumsum(1) - 1) % 2 == 0)[valid]
    for name, value in _reference_metrics(trainer, batch, keep).items():
        assert trainer._metrics["train"][name][-1] == pytest.approx(value, rel=1e-4, abs=1e-6), name
