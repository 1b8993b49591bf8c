"""TEMPERATURE from the run scripts shapes the sampling only (upstream's objective: the loss on raw logits);
`temperature_in_loss true` keeps TRL's temperature-scaled objective for Python/CLI users. Checked against a float64
reference of the reverse KL written from its definition, values and gradients."""

from __future__ import annotations

import os
import sys
import subprocess
import json

import pytest
import torch

from support import fixed_batch, full_logits, trainer_loss_and_grads, make_trainer, write_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reverse_kl_reference(trainer, batch, temperature):
    """sum_v p_S(v) (log p_S(v) - log p_T(v)) per valid token at logits / temperature, in float64; the mean over
    the valid (completion and tool-mask) tokens, and its gradient in the student's parameters."""
    z_s, z_t = full_logits(trainer, batch)
    log_ps = torch.log_softmax(z_s.double() / temperature, -1)
    log_pt = torch.log_softmax(z_t.double() / temperature, -1)
    per_token = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    valid = (batch["completion_mask"] * batch["tool_mask"]).bool()
    loss = per_token[valid].sum() / valid.sum()
    loss.backward()
    return loss.item(), {n: p.grad.double().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _close(got, ref):
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert set(got[1]) == set(ref[1])
    for name, grad in ref[1].items():
        torch.testing.assert_close(got[1][name].double(), grad, rtol=1e-4, atol=1e-6, msg=name)


def test_script_objective_uses_raw_logits_and_samples_at_temperature(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path, temperature=0.7, temperature_in_loss=False)
    assert trainer.loss_temperature == 1.0
    # generation still samples at TEMPERATURE
    assert trainer.generation_config.temperature == 0.7 and trainer.generation_config.do_sample
    batch = fixed_batch()
    got = trainer_loss_and_grads(trainer, [batch])
    raw = reverse_kl_reference(trainer, batch, 1.0)
    _close(got, raw)
    scaled = reverse_kl_reference(trainer, batch, 0.7)
    assert abs(scaled[0] - raw[0]) > 1e-3 * abs(raw[0])  # the two objectives differ on this batch


def test_python_default_keeps_the_scaled_objective(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path, temperature=0.7)
    assert trainer.args.temperature_in_loss is True and trainer.loss_temperature == 0.7
    batch = fixed_batch()
    _close(trainer_loss_and_grads(trainer, [batch]), reverse_kl_reference(trainer, batch, 0.7))


def test_temperature_zero_is_greedy_and_needs_the_raw_objective(pair, tmp_path):
    trainer = make_trainer(pair, tmp_path, temperature=0.0, temperature_in_loss=False)
    assert trainer.generation_config.do_sample is False and trainer.loss_temperature == 1.0
    with pytest.raises(ValueError, match="temperature_in_loss"):
        make_trainer(pair, tmp_path, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        make_trainer(pair, tmp_path, temperature=-0.5, temperature_in_loss=False)


def _dry(env):
    full = dict(os.environ, PYTHON_BIN=sys.executable, OMP_NUM_THREADS="1", DRY_RUN="1", **env)
    result = subprocess.run(["bash", "run_scripts/train_opd.sh"], cwd=ROOT, env=full, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("\n{") + 1:])["OPDConfig"]


def test_run_script_passes_the_raw_objective_and_greedy_temperature_zero(pair, tmp_path):
    student, teacher = pair
    base = dict(MODEL_PATH=student, TEACHER_MODEL_PATH=teacher, TRAIN_FILE=write_prompts(str(tmp_path / "p.jsonl")),
                OUTPUT_DIR=str(tmp_path / "run"), TRAIN_BATCH_SIZE="4", PPO_MICRO_BATCH_SIZE_PER_GPU="2")
    opd = _dry(dict(base, TEMPERATURE="0.7"))
    assert opd["temperature"] == 0.7 and opd["temperature_in_loss"] is False
    greedy = _dry(dict(base, TEMPERATURE="0"))
    assert greedy["temperature"] == 0.0 and greedy["generation_kwargs"] == {"do_sample": False}
