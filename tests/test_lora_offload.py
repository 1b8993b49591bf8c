"""Limited-GPU paths on CPU: LoRA students train, save, resume, reload and merge; an offloaded teacher gives the
resident teacher's loss and gradients; quantized teachers load and distil where bitsandbytes runs."""

import importlib.util
import os

import pytest
import torch

from opsd.core.models import load_causal_lm
from opsd.train import main
from support import base_args, fixed_batch_kl
from support import fixed_batch, make_trainer, trainer_loss_and_grads
from support import save_pair, write_prompts

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture()
def setup(tmp_path):
    student, teacher = save_pair(str(tmp_path))
    return student, teacher, write_prompts(str(tmp_path / "p.jsonl"), n=16), str(tmp_path / "run")


LORA = {"use_peft": "true", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def lora_args(student, teacher, data, out, steps, **extra):
    return base_args(student, teacher, data, out, steps=steps, **LORA, **extra) + [
        "--lora_target_modules", "q_proj", "v_proj", "up_proj"]


def test_lora_student_trains_saves_resumes_and_merges(setup):
    from peft import PeftModel

    student, teacher, data, out = setup
    before = fixed_batch_kl(student, teacher)
    main(lora_args(student, teacher, data, out, steps=2, save_strategy="steps", save_steps=2))
    summary = main(lora_args(student, teacher, data, out, steps=6, save_strategy="steps", save_steps=2,
                             resume_from_checkpoint="true", learning_rate=3e-2))
    assert [h["step"] for h in summary["log_history"] if "loss" in h] == list(range(1, 7))
    assert os.path.exists(os.path.join(out, "adapter_config.json"))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # only the adapter is saved
    base = load_causal_lm(student)
    original = {n: p.clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, original[n])]
    assert changed and all(any(t in n for t in ("q_proj", "v_proj", "up_proj")) for n in changed)
    assert "lm_head.weight" not in changed
    merged_dir = os.path.join(out, "merged")
    merged.save_pretrained(merged_dir)
    after = fixed_batch_kl(merged_dir, teacher)
    assert after < before, (before, after)


def test_offloaded_teacher_matches_resident_teacher(tmp_path):
    pair = save_pair(str(tmp_path))
    batch = fixed_batch()
    resident = trainer_loss_and_grads(make_trainer(pair, tmp_path), [dict(batch)])
    trainer = make_trainer(pair, tmp_path, teacher_offload=True)
    moves = []
    original = trainer._place_teacher
    trainer._place_teacher = lambda device: moves.append(device.type) or original(device)
    offloaded = trainer_loss_and_grads(trainer, [dict(batch)])
    assert moves == [trainer.accelerator.device.type, "cpu"]  # on the device once per step, for its pass only
    assert offloaded[0] == pytest.approx(resident[0], rel=1e-6)
    for name, grad in resident[1].items():
        torch.testing.assert_close(offloaded[1][name], grad)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install -r requirements-test.txt)")
@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_teacher_distils(setup, kind):
    student, teacher, data, out = setup
    summary = main(base_args(student, teacher, data, out, steps=2, teacher_quantization=kind))
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install -r requirements-test.txt)")
def test_qlora_student_trains(setup):
    student, teacher, data, out = setup
    summary = main(lora_args(student, teacher, data, out, steps=2, load_in_4bit="true"))
    assert os.path.exists(os.path.join(out, "adapter_config.json"))
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in summary["log_history"] if "loss" in h])))


def test_quantization_needs_bitsandbytes_message(monkeypatch):
    from opsd.core import trainer as trainer_module

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ImportError, match="requirements-gpu"):
        trainer_module.quantization_config_for("4bit", "float32")
