"""The memory planner (opsd.plan) against things that can be counted exactly on CPU, and its search.

Exact: parameter counts of the architecture table vs the transformers models built from the same numbers (meta
device), weights / LoRA / gradients / AdamW states of tiny models after one step, bitsandbytes 8-bit and 4-bit weight
bytes, HF generate's KV cache, the bytes autograd saves per layer. Loose (allocation peaks, tracked exactly with a
dispatch mode instead of the noisy process RSS): activations + gradients of a training step, a no-grad forward, the
chunked divergence buffers, and the tiny CPU mode of opsd.gpu_check.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from opsd import plan as P
from opsd.gpu_check import LiveTensorBytes
from support import make_model

GiB = P.GiB
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None

# Published parameter counts (model cards), in billions: a check that the table's numbers are the real configs.
PUBLISHED_B = {"qwen3-1.7b": 1.7, "qwen3-4b": 4.0, "qwen3-8b": 8.2, "qwen3-14b": 14.8, "qwen2.5-1.5b": 1.54,
               "qwen2.5-14b": 14.7, "llama-3.1-8b": 8.03, "llama-3.3-70b": 70.6}


def tensor_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------------------------
# exact counts


@pytest.mark.parametrize("name", sorted(P.ARCHITECTURES))
def test_parameter_count_equals_transformers_model(name):
    arch = P.ARCHITECTURES[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch.hf_config())
    assert arch.num_params() == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    assert arch.linear_weight_params() == linear
    assert model.config.tie_word_embeddings == arch.tie_word_embeddings
    assert arch.num_params() / 1e9 == pytest.approx(PUBLISHED_B[name], rel=0.02)


def test_architecture_from_local_directory(tmp_path):
    model = make_model(50, hidden=64, layers=2)
    model.save_pretrained(tmp_path / "m")
    arch = P.architecture(str(tmp_path / "m"))
    assert arch.family == "qwen2" and arch.attention_bias and not arch.tie_word_embeddings
    assert arch.num_params() == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="config.json"):
        P.architecture(str(tmp_path / "missing"))


def _tiny_plan(arch, **kw):
    base = dict(student=arch, teacher=arch, prompt_length=8, response_length=8, micro_batch=1, rollout_batch=1,
                rollout_n=1, dtype="fp32", gradient_checkpointing=False)
    base.update(kw)
    return P.PlanInputs(**base)


def _adam_step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(2, 50, (2, 6))
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    grads = tensor_bytes([p.grad for p in params])
    opt.step()
    states = tensor_bytes([v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")])
    return grads, states


def test_full_finetune_weights_grads_adam_states_exact():
    model = make_model(50, hidden=64, layers=2)
    arch = P.Architecture.from_config(model.config)
    est = P.estimate(_tiny_plan(arch, lora=False)).components
    grads, states = _adam_step(model)
    assert est["student_weights"] == tensor_bytes(model.parameters())
    assert est["gradients"] == grads
    assert est["optimizer_states"] == states


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj")])
def test_lora_params_grads_adam_states_exact(targets):
    from peft import LoraConfig, get_peft_model

    model = make_model(50, hidden=64, layers=2)
    arch = P.Architecture.from_config(model.config)
    base_bytes = tensor_bytes(model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets if isinstance(targets, str)
                                                  else list(targets)))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == arch.lora_params(4, targets)
    est = P.estimate(_tiny_plan(arch, lora=True, lora_rank=4, lora_targets=targets)).components
    grads, states = _adam_step(peft_model)
    assert est["student_weights"] == base_bytes
    assert est["lora_params"] == tensor_bytes(trainable)
    assert est["gradients"] == grads
    assert est["optimizer_states"] == states


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install bitsandbytes)")
@pytest.mark.parametrize("kind,nested", [("8bit", False), ("4bit", False), ("4bit", True)])
def test_bitsandbytes_weight_bytes(tmp_path, kind, nested):
    import warnings

    from transformers import BitsAndBytesConfig

    model = make_model(128, hidden=64, layers=2)
    model.save_pretrained(tmp_path)
    arch = P.Architecture.from_config(model.config)
    config = (BitsAndBytesConfig(load_in_8bit=True) if kind == "8bit" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=nested,
                                 bnb_4bit_compute_dtype=torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32)
    tensors = []
    for p in q.parameters():
        tensors.append(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors.append(state.absmax)
            if state.state2 is not None:
                tensors.append(state.state2.absmax)
        if getattr(p, "SCB", None) is not None:
            tensors.append(p.SCB)
    measured = tensor_bytes(tensors)
    planned = P.weight_bytes(arch, kind, 4, nested=nested)
    assert planned == pytest.approx(measured, rel=0.002)
    assert planned < arch.num_params() * 4  # a saving over the fp32 weights


def test_kv_cache_of_hf_generate_exact():
    model = make_model(40, hidden=64, layers=2)
    arch = P.Architecture.from_config(model.config)
    ids = torch.randint(2, 40, (3, 5))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, min_new_tokens=7,
                         do_sample=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    cache = out.past_key_values
    measured = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in cache.layers)
    # the last sampled token is never fed back, so the cache holds prompt + new - 1 positions
    assert P.kv_cache_bytes(arch, 3, 5 + 7 - 1, 4, growth_layer=False) == measured
    assert P.kv_cache_bytes(arch, 3, 11, 4) == measured * 3 // 2  # + one layer while concatenating


# ------------------------------------------------------------------------------------------------------------------
# activations: exact saved bytes, loose step peaks

GEOMETRIES = {  # not the shapes the factors were fitted on
    "qwen3": P.Architecture("t3", "qwen3", 3, 96, 320, 3, 1, 32, 300, True, qk_norm=True),
    "llama": P.Architecture("tl", "llama", 3, 96, 320, 3, 1, 32, 300, False),
    "qwen2": P.Architecture("t2", "qwen2", 3, 96, 320, 3, 1, 32, 300, False, attention_bias=True),
}


def _saved_bytes(model, ids, autocast=False):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=autocast):
        model.model(input_ids=ids)
    return sum(seen.values())


@pytest.mark.parametrize("family", sorted(GEOMETRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activation_bytes_per_layer(family, dtype):
    arch = GEOMETRIES[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch.hf_config(attn_implementation="sdpa")).to(dtype)
    b = 4 if dtype == torch.float32 else 2
    tokens = 2 * 128
    measured = _saved_bytes(model, torch.randint(0, 300, (2, 128)))
    planned = P.activation_bytes(arch, tokens, b, b, checkpointing=False, stage="forward")
    assert planned == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("lora,dtype,checkpointing", [
    (False, torch.float32, False), (False, torch.float32, True), (True, torch.bfloat16, False),
    (True, torch.bfloat16, True), (True, torch.float32, True)])
def test_training_step_peak_activations_plus_gradients(lora, dtype, checkpointing):
    """Activations + gradients of forward/backward vs the exact peak of live tensor bytes. The planner adds all
    gradients to the backward peak (they really fill in layer by layer), so it may only err high: within 0.9-1.4x."""
    from peft import LoraConfig, get_peft_model

    arch = GEOMETRIES["qwen3"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch.hf_config(attn_implementation="sdpa")).to(dtype)
    rank = 8
    if lora:  # bf16 base + float32 adapters under bf16 autocast: what a GPU LoRA run does
        model = get_peft_model(model, LoraConfig(r=rank, target_modules="all-linear"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            model.enable_input_require_grads()
    model.train()
    backbone = model.get_base_model().model if lora else model.model
    ids = torch.randint(0, 300, (2, 128))
    tracker = LiveTensorBytes()
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            hidden = backbone(input_ids=ids).last_hidden_state
        hidden.float().pow(2).mean().backward()
    b = 4 if dtype == torch.float32 else 2
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    planned = P.activation_bytes(arch, 256, b, b, checkpointing, rank if lora else 0, "all-linear") + grads
    assert 0.9 <= planned / tracker.peak <= 1.4, (planned, tracker.peak)


def test_no_grad_forward_transient():
    arch = GEOMETRIES["llama"]
    model = AutoModelForCausalLM.from_config(arch.hf_config(attn_implementation="sdpa"))
    tracker = LiveTensorBytes()
    with tracker, torch.no_grad():
        model.model(input_ids=torch.randint(0, 300, (1, 512)))
    planned = P.forward_transient_bytes(arch, 512, 4) + 512 * arch.hidden_size * 4
    assert planned == pytest.approx(tracker.peak, rel=0.1)


def test_chunked_divergence_buffers_bounded_by_constant():
    from opsd.core.heads import LMHead
    from opsd.core.losses import per_token_divergence

    n, vocab, hidden, chunk = 512, 2048, 32, 64
    torch.manual_seed(0)
    hs = torch.randn(n, hidden, requires_grad=True)
    ws = torch.randn(vocab, hidden)
    tracker = LiveTensorBytes()
    with tracker:
        div, _ = per_token_divergence(hs, LMHead(ws), torch.randn(n, hidden), LMHead(torch.randn(vocab, hidden)),
                                      1.0, backend="chunked", chunk_size=chunk)
        div.sum().backward()
    tile = chunk * vocab * 4
    assert 6 * tile <= tracker.peak <= P.CHUNKED_LOSS_BUFFERS * tile + n * hidden * 8 + 64 * n


def test_tracker_counts_allocations_not_views():
    tracker = LiveTensorBytes()
    weight = torch.randn(100, 100)
    with tracker:
        a = torch.randn(1000, 100)
        view = weight.t()  # no allocation
        b = a @ view  # 400 kB
        del a
        c = torch.zeros(10)
    assert tracker.peak == 800_000
    assert tracker.current == 400_000 + 40
    del b, c, view


def test_gpu_check_tiny_cpu_mode_runs_and_agrees_loosely(tmp_path):
    from opsd import gpu_check

    out = tmp_path / "check.json"
    report = gpu_check.main(["--tiny", "--teachers", "qwen3-4b", "--only", "lora-qwen3-4b-tbf16-all", "--steps", "0",
                             "--out", str(out)])
    (result,) = report["results"]
    assert json.loads(out.read_text())["results"][0]["variant"] == "lora-qwen3-4b-tbf16-all"
    assert math.isfinite(result["last_loss"]) and result["step_time_s"] > 0
    assert 0.8 <= result["planned_over_measured"] <= 2.0, result


def test_gpu_check_dry_run_lists_variants_with_real_configs(tmp_path):
    from opsd import gpu_check

    report = gpu_check.main(["--dry-run", "--no_4bit", "--out", str(tmp_path / "d.json")])
    names = [r["variant"] for r in report["results"]]
    assert len(names) == 8 and "full-qwen3-8b-tbf16-keep0.1" in names
    full = next(r for r in report["results"] if r["variant"] == "full-qwen3-8b-tbf16-all")
    # 1.7B student, float32 master weights + grads + AdamW = 16 bytes/param, plus an 8B bf16 teacher
    assert full["planned_peak_gib"] > (1.72e9 * 16 + 8.19e9 * 2) / GiB


# ------------------------------------------------------------------------------------------------------------------
# the estimate's structure and the search


def test_phases_hold_the_right_components():
    plan = P.PlanInputs(student="qwen3-4b", teacher="qwen3-8b", teacher_placement="offload-4bit", selector_ratio=0.1)
    est = P.estimate(plan)
    assert set(est.phases) == {"generation", "teacher", "statistics", "student_forward", "student_backward"}
    assert "kv_cache" in est.phases["generation"] and "kv_cache" not in est.phases["student_backward"]
    assert list(k for k, v in est.phases.items() if "teacher_weights_during_pass" in v) == ["teacher"]
    assert est.host_memory == est.components["teacher_weights_during_pass"] > 0
    assert est.total == est.peak_allocated + est.components["fragmentation_margin"] + est.components["cuda_context"]
    assert est.peak_allocated == max(sum(c.values()) for c in est.phases.values())
    no_selector = P.estimate(plan.replace(selector_ratio=None, teacher_placement="4bit"))
    assert "statistics" not in no_selector.phases and "teacher" not in no_selector.phases


def test_estimate_moves_the_right_way():
    base = P.PlanInputs(student="qwen3-4b", teacher="qwen3-8b", micro_batch=2, rollout_batch=16)

    def total(**kw):
        return P.estimate(base.replace(**kw)).total

    def comp(name, **kw):
        return P.estimate(base.replace(**kw)).components[name]

    assert comp("teacher_weights", teacher_placement="4bit") < comp("teacher_weights", teacher_placement="8bit") \
        < comp("teacher_weights")
    assert comp("activations_backward", gradient_checkpointing=True) < comp("activations_backward",
                                                                             gradient_checkpointing=False)
    assert comp("activations_backward", micro_batch=1) < comp("activations_backward")
    assert comp("kv_cache", response_length=4096) < comp("kv_cache")
    assert total(lora=False) > total() > total(student_quant="4bit")
    assert comp("loss_buffers", selector_ratio=0.1, divergence_backend="chunked") < comp(
        "loss_buffers", selector_ratio=1.0, divergence_backend="chunked")
    sharded = base.replace(lora=False, num_gpus=8, rollout_batch=128, sharding="zero3")
    assert P.estimate(sharded).components["optimizer_states"] * 8 == pytest.approx(
        P.estimate(base.replace(lora=False)).components["optimizer_states"] * 12 / 8, rel=1e-6)


def test_invalid_inputs_fail_with_the_fix():
    with pytest.raises(ValueError, match="rollout_n"):
        P.PlanInputs(rollout_batch=8, rollout_n=16)
    with pytest.raises(ValueError, match="QLoRA"):
        P.PlanInputs(lora=False, student_quant="4bit")
    with pytest.raises(ValueError, match="offload"):
        P.PlanInputs(teacher_placement="offload", sharding="zero3", num_gpus=2, rollout_batch=32)
    with pytest.raises(ValueError, match="Unknown model"):
        P.estimate(P.PlanInputs(student="qwen9-1t"))


def test_recommend_finds_the_cheapest_change_that_fits():
    plan = P.PlanInputs(student="qwen3-4b", teacher="qwen3-8b", gpu_memory_gb=80, lora=False, micro_batch=4,
                        gradient_checkpointing=False)
    assert not P.estimate(plan).fits
    fits = P.recommend(plan)
    assert fits and all(P.estimate(v).fits for v in fits)
    best = fits[0]
    assert best.response_length == plan.response_length  # the task is only changed as a last resort
    assert "gradient_checkpointing: False -> True" in P.describe_changes(plan, best)
    # a plan that already fits is its own recommendation
    assert P.recommend(best)[0] == best


def test_recommend_says_when_nothing_fits(capsys):
    plan = P.PlanInputs(student="llama-3.1-8b", teacher="llama-3.3-70b", gpu_memory_gb=24)
    assert P.recommend(plan) is None
    low, low_est = P.smallest(plan)
    assert low_est.total > 24 * GiB and low.teacher_placement == "offload-4bit"
    P.main(["--student", "llama-3.1-8b", "--teacher", "llama-3.3-70b", "--gpu_memory_gb", "24"])
    assert "NOTHING FITS in 24 GiB" in capsys.readouterr().out


def test_cli_table_and_json(capsys):
    result = P.main(["--student", "qwen3-1.7b", "--teacher", "qwen3-4b", "--gpu_memory_gb", "48", "--json",
                     "--selector", "0.1", "--micro_batch", "2"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["estimate"]["fits"] is True and printed == json.loads(json.dumps(result))
    assert printed["plan"]["selector_ratio"] == 0.1
    P.main(["--student", "qwen3-4b", "--teacher", "qwen3-8b", "--gpu_memory_gb", "24", "--full"])
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "recommendation (cheapest change that fits)" in text
    assert "kv_cache" in text and "student_backward" in text


def test_defaults_match_the_run_scripts_rollout_n():
    """opsd.plan's rollout_n default is train_opd.sh's ROLLOUT_N default, so the README's kind of call (a rollout
    batch of prompts, one completion each) plans instead of failing on divisibility."""
    import re

    script = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_scripts",
                               "train_opd.sh")).read()
    default = int(re.search(r"ROLLOUT_N=\$\{ROLLOUT_N:-(\d+)\}", script).group(1))
    assert P.PlanInputs().rollout_n == default == 1
    result = P.main(["--student", "qwen3-1.7b", "--teacher", "qwen3-8b", "--rollout_batch", "8", "--json"])
    assert result["plan"]["rollout_n"] == 1 and result["plan"]["rollout_batch"] == 8


def test_plan_user_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        P.main(["--rollout_batch", "8", "--rollout_n", "16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rollout_n" in err and "Traceback" not in err
