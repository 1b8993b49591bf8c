"""Multi-process runs on CPU (gloo) with the library defaults users get: DDP with gradient checkpointing on and a
rank that keeps no token (it used to hang), matched against one process on the same completions; FSDP2-sharded
models in the statistics pass (the lm_head weights are DTensor shards there)."""

import os
import socket
import subprocess
import sys

import torch

from support import full_logit_divergence_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, nproc, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), WORKER, *args]
    else:
        cmd = [sys.executable, WORKER, *args]
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:  # the failure this test exists for: a rank waiting forever
        raise AssertionError(f"{nproc}-process run did not finish in {timeout} s (hang?)") from err
    assert result.returncode == 0, result.stderr[-4000:]


def test_ddp_rank_with_no_kept_token_finishes_and_matches_one_process(pair, tmp_path):
    student, teacher = pair
    _run(["ddp", str(tmp_path), student, teacher], nproc=2)
    _run(["ddp", str(tmp_path), student, teacher], nproc=1)
    one = torch.load(tmp_path / "grads_world1_rank0.pt")
    ranks = [torch.load(tmp_path / f"grads_world2_rank{r}.pt") for r in range(2)]
    assert set(one) == set(ranks[0]) == set(ranks[1]) and any("lm_head" in n for n in one)
    for name, grad in one.items():
        # DDP has averaged the ranks' gradients before the optimizer step: both ranks hold the same mean
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(ranks[0][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert max(g.abs().max().item() for g in one.values()) > 0  # tokens were kept: the step did learn


def test_ddp_padding_free_matches_padded_one_process(pair, tmp_path):
    """2 processes with unpadded per-sequence passes (DDP, gradient checkpointing) == 1 process, padded."""
    student, teacher = pair
    _run(["ddp", str(tmp_path), student, teacher], nproc=2)
    _run(["ddp_padded", str(tmp_path), student, teacher], nproc=1)
    padded = torch.load(tmp_path / "grads_world1_rank0.pt")
    for rank in range(2):
        got = torch.load(tmp_path / f"grads_world2_rank{rank}.pt")
        assert set(got) == set(padded)
        for name, grad in padded.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp2_statistics_pass_reads_whole_lm_head_weights(pair, tmp_path):
    student, teacher = pair
    _run(["fsdp2", str(tmp_path), student, teacher], nproc=2)
    for rank in range(2):
        saved = torch.load(tmp_path / f"fsdp_rank{rank}.pt")
        expected = full_logit_divergence_at(student, teacher, saved["batch"])
        torch.testing.assert_close(saved["stats"]["reverse_kl"].double(), expected, rtol=1e-4, atol=1e-5)
