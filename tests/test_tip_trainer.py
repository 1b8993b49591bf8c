"""tip_ext plugged into the opsd seam: selective loss == masked full-logit reference, scope equivalences, the
cross-process gather (2 gloo processes == 1 process), and tiny end-to-end train_tip.sh runs."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from opsd.core.losses import divergence_reference
from opsd.core.selection import TokenView, loss_weights
from support import fixed_batch, full_logits, make_trainer, split, trainer_loss_and_grads
from tip_ext import select, token_stats
from tip_ext.trainer import SelectorConfig, TipSelector, make_selector
from support import save_pair, write_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = [("soft_or", {}), ("q3", {}), ("teachability", {}), ("teachability_entropy", {}), ("entropy_topk", {}),
         ("divergence_topk", {}), ("position_last", {}), ("entropy_sample", {"importance_weights": True})]


def tip(rule, ratio=0.4, scope="rollout_batch", **options):
    return TipSelector(SelectorConfig(selector=rule, ratio=ratio, scope=scope, support_top_k=4, selector_options=options))


def reference(trainer, batch, rule, ratio, options, seed):
    """Full logits of both models -> token_stats -> select -> masked mean of the reverse KL."""
    model = trainer.model
    z_s, z_t = full_logits(trainer, batch)
    valid = batch["completion_mask"].bool() & batch["tool_mask"].bool()
    stats = token_stats(z_s[valid].detach(), z_t[valid], top_k=4)
    seq = torch.arange(4)[:, None].expand(4, z_s.shape[1])[valid]
    sel = select(rule, stats, ratio, sequence_ids=seq, generator=torch.Generator().manual_seed(seed), **options)
    div, _ = divergence_reference(z_s[valid], z_t[valid], 1.0)
    w = sel.keep.float() * (1.0 if sel.weights is None else sel.weights)
    loss = (div * w).sum() / sel.keep.sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sel.keep


@pytest.mark.parametrize("rule,options", RULES)
def test_selective_gradient_equals_masked_reference(pair, tmp_path, rule, options):
    selector = tip(rule, **options)
    trainer = make_trainer(pair, tmp_path, selector=selector)
    batch = fixed_batch()
    got_loss, got_grads = trainer_loss_and_grads(trainer, [batch])
    seed = trainer.args.seed * 1_000_003 + trainer.state.global_step
    ref_loss, ref_grads, keep = reference(trainer, batch, rule, 0.4, options, seed)
    valid = batch["completion_mask"].bool() & batch["tool_mask"].bool()
    assert torch.equal(batch["loss_weights"][valid] > 0, keep)
    assert got_loss == pytest.approx(ref_loss, rel=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)
    metrics = trainer._metrics["train"]
    assert metrics["kept_fraction"][-1] == pytest.approx(keep.float().mean().item())
    assert sum(metrics[f"census/all/Q{i}"][-1] for i in range(1, 5)) == pytest.approx(1.0)


def test_micro_batch_and_sequence_scopes_select_within_their_group(pair, tmp_path):
    batch = fixed_batch()
    trainer = make_trainer(pair, tmp_path, ga=2, bs=2, selector=tip("divergence_topk", 0.5, scope="micro_batch"))
    mbs = split(batch, 2)
    trainer._select_tokens(mbs)
    for mb in mbs:  # each micro-batch keeps floor(0.5 * its own valid tokens)
        valid = (mb["completion_mask"].bool() & mb["tool_mask"].bool()).sum().item()
        assert (mb["loss_weights"] > 0).sum().item() == max(1, valid // 2)
    trainer = make_trainer(pair, tmp_path, selector=tip("divergence_topk", 0.5, scope="sequence"))
    one = fixed_batch()
    trainer._select_tokens([one])
    valid = one["completion_mask"].bool() & one["tool_mask"].bool()
    assert ((one["loss_weights"] > 0).sum(1) == (valid.sum(1) // 2).clamp_min(1)).all()


def test_selector_config_errors():
    with pytest.raises(ValueError, match="Unknown --selector"):
        SelectorConfig(selector="magic")
    with pytest.raises(ValueError, match="ratio"):
        SelectorConfig(selector="soft_or", ratio=0.0)
    with pytest.raises(ValueError, match="scope"):
        SelectorConfig(selector="soft_or", scope="global")
    with pytest.raises(ValueError, match="option"):
        SelectorConfig(selector="soft_or", selector_options='{"alpha": 2}')
    assert make_selector(SelectorConfig(selector="none")) is None


def _distributed_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from accelerate import Accelerator

    from opsd.core.trainer import OPDTrainer

    from collections import defaultdict
    from types import SimpleNamespace

    class Stub:  # the trainer's gather/selection machinery without models
        _gather_rows = OPDTrainer._gather_rows
        _all_reduce_sum = OPDTrainer._all_reduce_sum
        _choose_in_groups = OPDTrainer._choose_in_groups

        def __init__(self):
            self.accelerator = Accelerator(cpu=True)
            self.args, self.state = SimpleNamespace(seed=0), SimpleNamespace(global_step=0)
            self._metrics = {"train": defaultdict(list)}

    stub = Stub()
    stats, seq = _global_stats()
    mine = seq % world == rank  # every second sequence on each process, different token counts per rank
    local_seq = seq[mine]
    view = TokenView(token_ids=local_seq, sequence_ids=local_seq, positions=torch.zeros_like(local_seq))
    selector = tip("teachability", 0.3)
    (choice,) = stub._choose_in_groups(selector, [view], [{k: v[mine] for k, v in stats.items()}])
    keep = torch.zeros(seq.numel(), dtype=torch.bool)
    keep[mine] = choice.keep
    factors = loss_weights([keep[mine][None]], [None], [torch.ones_like(keep[mine])[None]], "kept_tokens", world,
                           stub._all_reduce_sum)
    torch.save({"keep": keep, "factor_sum": factors[0].sum().item()}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _global_stats():
    g = torch.Generator().manual_seed(11)
    seq = torch.repeat_interleave(torch.arange(6), torch.tensor([5, 9, 3, 7, 4, 8]))
    stats = {"local_forward_kl": torch.rand(seq.numel(), generator=g),
             "support_mass": torch.rand(seq.numel(), generator=g),
             "entropy_norm": torch.rand(seq.numel(), generator=g), "reverse_kl": torch.rand(seq.numel(), generator=g)}
    return stats, seq


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_select_like_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    stats, seq = _global_stats()
    expected = select("teachability", stats, 0.3, sequence_ids=seq).keep
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(results[0]["keep"] | results[1]["keep"], expected)
    # the per-process factors add up to num_processes (DDP averages the two ranks' gradients back to a mean)
    assert results[0]["factor_sum"] + results[1]["factor_sum"] == pytest.approx(2.0)


@pytest.mark.parametrize("rule", ["soft_or", "q3", "teachability"])
def test_train_tip_script_end_to_end(tmp_path, rule):
    student, teacher = save_pair(str(tmp_path))
    data = write_prompts(str(tmp_path / "prompts.jsonl"), n=8)
    out, dump = str(tmp_path / "run"), str(tmp_path / "dump")
    env = dict(os.environ, MODEL_PATH=student, TEACHER_MODEL_PATH=teacher, TRAIN_FILE=data, OUTPUT_DIR=out,
               SELECTOR=rule, RATIO="0.3", TRAIN_BATCH_SIZE="4", PPO_MICRO_BATCH_SIZE_PER_GPU="2", MAX_STEPS="2",
               MAX_RESPONSE_LENGTH="6", MAX_PROMPT_LENGTH="8", TOKEN_DUMP_DIR=dump, PYTHON_BIN=sys.executable,
               EXTRA_ARGS="--gradient_checkpointing false --use_cpu true --save_strategy no")
    result = subprocess.run(["bash", "run_scripts/train_tip.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "run_summary.json")) as f:
        summary = json.load(f)
    assert summary["config"]["SelectorConfig"]["selector"] == rule
    logs = [h for h in summary["log_history"] if "loss" in h]
    assert len(logs) == 2 and all(0 < h["kept_fraction"] < 1 for h in logs)
    assert glob.glob(os.path.join(dump, "tokens_step*.parquet"))
    from tip_ext.plot import load_dump, main as plot_main

    frame = load_dump(dump)
    assert {"entropy_norm", "reverse_kl", "kept", "token_id", "position"} <= set(frame.columns)
    assert os.path.getsize(plot_main([dump])) > 1000


def test_two_process_cpu_run_completes(tmp_path):
    """Two CPU processes (torchrun + gloo; accelerate detects MULTI_CPU) of tip_ext.train: selection is gathered
    across ranks. (`accelerate launch --cpu --num_processes 2` starts a single process with accelerate 1.15.)"""
    student, teacher = save_pair(str(tmp_path))
    data = write_prompts(str(tmp_path / "prompts.jsonl"), n=8)
    out = str(tmp_path / "run")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "tip_ext.train",
           "--model_name_or_path", student,
           "--teacher_model_name_or_path", teacher, "--train_file", data, "--output_dir", out,
           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_steps", "2",
           "--max_completion_length", "6", "--gradient_checkpointing", "false", "--use_cpu", "true",
           "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1", "--selector", "teachability",
           "--ratio", "0.2", "--support_top_k", "4", "--token_dump_dir", str(tmp_path / "dump")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "run_summary.json")) as f:
        logs = [h for h in json.load(f)["log_history"] if "loss" in h]
    assert len(logs) == 2
    for h in logs:  # ceil(0.2 N) over both ranks' tokens, plus at least one per sequence (4 sequences)
        assert 0 < h["kept_fraction"] < 1 and h["kept_tokens"] >= 4
    from tip_ext.plot import load_dump

    dump = load_dump(str(tmp_path / "dump"))
    for step, part in dump.groupby("step"):  # both ranks' tokens, globally unique sequence ids, one kept at least
        assert part["sequence"].nunique() == 4 and part.groupby("sequence")["kept"].any().all()
        n = len(part)
        assert part["kept"].sum() >= -(-n // 5)


def test_every_rule_option_is_a_typed_flag_in_help():
    from opsd.train import build_parser
    from tip_ext.selectors import RULES as REGISTERED, rule_options
    from tip_ext.trainer import RULE_OPTION_FIELDS

    declared = {name for rule in REGISTERED for name in rule_options(rule)}
    assert declared <= set(RULE_OPTION_FIELDS), declared - set(RULE_OPTION_FIELDS)
    text = build_parser((SelectorConfig,)).format_help()
    for name in RULE_OPTION_FIELDS:
        assert f"--{name}" in text, name
    config = SelectorConfig(selector="teachability", q_low=0.1, incompatible=True)
    assert config.selector_options == {"q_low": 0.1, "incompatible": True}
    with pytest.raises(ValueError, match="has no option"):
        SelectorConfig(selector="soft_or", q_low=0.1)
    with pytest.raises(ValueError, match="--selector is none"):
        SelectorConfig(selector="none", alpha=2.0)
    with pytest.raises(ValueError, match="both as flags"):
        SelectorConfig(selector="entropy_sample", alpha=2.0, selector_options='{"alpha": 1.0}')
