"""DeepSpeed ZeRO-3 and FSDP2 through run_scripts/train_tip.sh, matched against one process.

Each engine run is what a user types on a machine without GPUs: `NPROC=2 ACCELERATE_CONFIG=run_scripts/accelerate/
<engine>.yaml bash run_scripts/train_tip.sh`, i.e. `accelerate launch` of the repository's config on two CPU processes
(gloo), with the library defaults (gradient checkpointing on) and soft_or, whose statistics pass projects hidden states
through both models' lm_heads (partitioned by ZeRO-3, DTensor shards under FSDP2). The reference is the same script in
one process with the same global batch (4 prompts per step: 2 per process x 1 accumulation vs 2 x 2).

Rollouts: TOP_K=1 (upstream's variable) makes every completion its prompt's greedy continuation, whatever the split
over processes; sampled rollouts draw from each process's own generator and cannot match a one-process run by
construction. Equal rollouts are checked through the logged token counts and lengths, then losses and final weights
are compared within float tolerance (the ranks' reductions sum in another order than one process does).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from support import write_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
SAME_ROLLOUTS = ("num_tokens", "completions/mean_length", "completions/max_length", "kept_fraction", "kept_tokens")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tip(pair, prompts, out, timeout=300, **env):
    student, teacher = pair
    full = dict(os.environ, PYTHON_BIN=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                MODEL_PATH=student, TEACHER_MODEL_PATH=teacher, TRAIN_FILE=prompts, OUTPUT_DIR=str(out),
                TRAIN_BATCH_SIZE="4", PPO_MICRO_BATCH_SIZE_PER_GPU="2", MAX_STEPS=str(STEPS), MAX_RESPONSE_LENGTH="6",
                TOP_K="1", LEARNING_RATE="1e-3", SELECTOR="soft_or", RATIO="0.5", MASTER_PORT=str(_free_port()),
                **env)
    try:
        return subprocess.run(["bash", "run_scripts/train_tip.sh"], cwd=ROOT, env=full, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"train_tip.sh with {env} did not finish in {timeout} s (a rank waiting?)") from err


def steps_of(out) -> tuple[list[dict], dict]:
    summary = json.loads((out / "run_summary.json").read_text())
    return [h for h in summary["log_history"] if "loss" in h], summary["config"]["OPDConfig"]


@pytest.fixture(scope="module")
def one_process(pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    prompts = write_prompts(str(root / "prompts.jsonl"))
    result = train_tip(pair, prompts, root / "one")
    assert result.returncode == 0, result.stderr[-4000:]
    return prompts, root / "one"


def check_matches_one_process(pair, one_process, out):
    _, reference = one_process
    ref_steps, ref_config = steps_of(reference)
    run_steps, run_config = steps_of(out)
    assert ref_config["gradient_checkpointing"] and run_config["gradient_checkpointing"]  # the library default
    assert ref_config["gradient_accumulation_steps"] == 2 and run_config["gradient_accumulation_steps"] == 1
    assert [h["step"] for h in run_steps] == [h["step"] for h in ref_steps] == list(range(1, STEPS + 1))
    for ref, run in zip(ref_steps, run_steps):
        for key in SAME_ROLLOUTS:  # the same rollouts and the same kept tokens
            assert run[key] == pytest.approx(ref[key], rel=1e-6), (run["step"], key)
        assert 0 < run["kept_fraction"] < 1  # soft_or's statistics pass decided; it did not keep everything
        assert run["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), run["step"]
        # the kept tokens' reverse KL, computed in the statistics pass from the (gathered) lm_heads
        assert run["tokens/kept/reverse_kl"] == pytest.approx(ref["tokens/kept/reverse_kl"], rel=1e-5, abs=1e-7)
    initial = load_file(os.path.join(pair[0], "model.safetensors"))
    ref_weights, run_weights = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(run_weights) == set(ref_weights) == set(initial)
    moved = max((ref_weights[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3  # the steps did train: the tolerance below is far below the change
    for name, weight in ref_weights.items():
        torch.testing.assert_close(run_weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_zero3_two_processes_through_train_tip_match_one_process(pair, one_process, tmp_path):
    # no importorskip: CI installs deepspeed (requirements-test.txt), and a missing one must fail, not hide
    prompts, _ = one_process
    result = train_tip(pair, prompts, tmp_path / "zero3", NPROC="2",
                       ACCELERATE_CONFIG="run_scripts/accelerate/zero3.yaml")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"accelerate.commands.launch --config_file {ROOT}/run_scripts/accelerate/zero3.yaml --num_processes 2" in \
        result.stdout and "--ddp_backend gloo" in result.stdout
    # DeepSpeed wrote the checkpoint: one ZeRO partition of the model and optimizer states per rank
    ds = tmp_path / "zero3" / f"checkpoint-{STEPS}" / f"global_step{STEPS}"
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)} <= set(os.listdir(ds))
    check_matches_one_process(pair, one_process, tmp_path / "zero3")


def test_fsdp2_two_processes_through_train_tip_match_one_process(pair, one_process, tmp_path):
    prompts, _ = one_process
    # an earlier run's checkpoints, which OVERWRITE=1 deletes: every process deletes them, none may trip on another
    for step in range(1, 40):
        old = tmp_path / "fsdp2" / f"checkpoint-{step}"
        old.mkdir(parents=True)
        for name in ("trainer_state.json", "training_args.bin", "model.safetensors", "optimizer.bin"):
            (old / name).write_text("{}")
    result = train_tip(pair, prompts, tmp_path / "fsdp2", NPROC="2", OVERWRITE="1",
                       ACCELERATE_CONFIG="run_scripts/accelerate/fsdp2.yaml")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"accelerate.commands.launch --config_file {ROOT}/run_scripts/accelerate/fsdp2.yaml --num_processes 2" in \
        result.stdout
    # accelerate's FSDP checkpoint files (a DDP run writes neither)
    saved = set(os.listdir(tmp_path / "fsdp2" / f"checkpoint-{STEPS}"))
    assert {"pytorch_model_fsdp.bin", "optimizer.bin"} <= saved
    assert sorted(p.name for p in (tmp_path / "fsdp2").glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]
    check_matches_one_process(pair, one_process, tmp_path / "fsdp2")


def test_accelerate_config_on_cpu_errors_name_the_variable(pair, tmp_path):
    prompts = write_prompts(str(tmp_path / "p.jsonl"))
    missing = train_tip(pair, prompts, tmp_path / "x", NPROC="2", ACCELERATE_CONFIG=str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "error: ACCELERATE_CONFIG=" in missing.stderr
    assert "Traceback" not in missing.stderr
    odd = tmp_path / "tpu.yaml"
    odd.write_text("distributed_type: XLA\nnum_processes: 2\n")
    refused = train_tip(pair, prompts, tmp_path / "y", NPROC="2", ACCELERATE_CONFIG=str(odd))
    assert refused.returncode == 2 and "distributed_type 'XLA' cannot run on CPU processes" in refused.stderr
    # DeepSpeed on CPU compiles an op at start (measured: without a compiler it dies there with a CalledProcessError)
    no_compiler = train_tip(pair, prompts, tmp_path / "z", NPROC="2", CXX=str(tmp_path / "no-c++"),
                            ACCELERATE_CONFIG="run_scripts/accelerate/zero3.yaml")
    assert no_compiler.returncode == 2 and "needs a C++ compiler" in no_compiler.stderr


def test_zero3_refuses_backward_recompute_before_models_load(pair, tmp_path):
    """The chunked backend recomputes logits in backward, when ZeRO-3 has partitioned the heads (measured: a size
    mismatch there); the launched processes say so before loading a model."""
    prompts = write_prompts(str(tmp_path / "p.jsonl"))
    result = train_tip(pair, prompts, tmp_path / "z", NPROC="2", EXTRA_ARGS="--divergence_backend chunked",
                       ACCELERATE_CONFIG="run_scripts/accelerate/zero3.yaml")
    assert result.returncode != 0 and "error: --divergence_backend chunked does not run under DeepSpeed ZeRO-3" in \
        result.stderr
    assert "size mismatch" not in result.stderr and not (tmp_path / "z" / "run_summary.json").exists()


@pytest.mark.parametrize("setting, message", [(dict(divergence_backend="trl"), "--divergence_backend trl"),
                                              (dict(loss_support="sampled"), "--loss_support sampled")])
def test_zero3_check_reads_the_launcher_environment(monkeypatch, tmp_path, setting, message):
    from opsd.core.config import OPDConfig
    from opsd.train import _check_zero3

    args = OPDConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **setting)
    _check_zero3(args)  # not launched with a ZeRO-3 config: nothing to refuse
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    _check_zero3(args)  # ZeRO-2 keeps whole parameters
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    from opsd.preflight import UserError

    with pytest.raises(UserError, match=f"^{message} does not run under DeepSpeed ZeRO-3"):
        _check_zero3(args)
    _check_zero3(OPDConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True))  # the defaults run


def test_weight_rows_of_a_zero3_placeholder_is_its_real_row_count():
    """Models loaded under ZeRO-3's zero.Init hold empty placeholders; their real shape is `ds_shape`. Reading
    `.shape` there made the distilled vocabulary 0 rows (the loss then refused the heads)."""
    from opsd.core.heads import head_of, weight_rows
    from support import make_model

    model = make_model(128)
    assert weight_rows(model.lm_head.weight) == 128
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_shape = torch.Size([128, 64])
    assert weight_rows(placeholder) == 128
    model.lm_head.weight = placeholder
    assert head_of(model, 128).vocab_size is None and head_of(model, 100).vocab_size == 100
