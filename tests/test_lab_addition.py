"""Tests of the CPU distillation lab's addition task (lab/addition.py) and model helpers (lab/models.py). Seconds-long."""

import json
import math
import os
import random

import pytest
import torch

from lab import addition as T
from lab.tasks import get_task
from lab.models import (
    LabConfig,
    ModelSize,
    evaluate_exact_match,
    heldout_kl,
    load_lab_models,
    prepare_lab_models,
    recovery_rate,
)


ADD = get_task("addition")


@pytest.fixture(scope="module")
def tok():
    return T.build_tokenizer()


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_one_token_per_character_and_round_trip(tok):
    for text in ["473+859=", "21,31<31:1332", "0+0=", "9<<<:"]:
        ids = tok(text)["input_ids"]
        assert ids == T.encode_chars(text)
        assert len(ids) == len(text)
        assert tok.convert_ids_to_tokens(ids) == list(text)
        assert tok.decode(ids) == text
    assert tok.eos_token_id == T.EOS_ID and tok.pad_token_id == T.PAD_ID
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.padding_side == "left"
    assert len(tok) == len(T.VOCAB)
    # special tokens are skipped on request and never added by the default call
    assert tok.decode(T.encode_chars("12") + [T.EOS_ID, T.PAD_ID], skip_special_tokens=True) == "12"
    assert T.EOS_ID not in tok("1+2=")["input_ids"]


def test_tokenizer_left_pads_batches(tok):
    enc = tok(["1+2=", "473+859="], padding=True)
    assert enc["input_ids"][0][:4] == [T.PAD_ID] * 4
    assert enc["attention_mask"][0] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert enc["input_ids"][0][4:] == T.encode_chars("1+2=")


def test_tokenizer_save_and_autoload(tmp_path):
    from transformers import AutoTokenizer

    T.build_tokenizer(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded("47+8=")["input_ids"] == T.encode_chars("47+8=")
    assert loaded.decode(loaded("21,3<1")["input_ids"]) == "21,3<1"
    assert loaded.padding_side == "left"
    assert (loaded.pad_token_id, loaded.eos_token_id) == (T.PAD_ID, T.EOS_ID)


# ------------------------------------------------------------------------------------------------- solution
def test_solution_examples():
    assert T.solution("473+859=") == "21,31,31:1332"
    assert T.solution("89+11=") == "01,01:100"
    assert T.solution("47+8=") == "51,50:055"
    assert T.solution("5+4=") == "90:09"
    assert T.solution("047+009=") == "61,50,00:0056"
    assert T.answer("473+859=") == "1332" and T.answer("047+009=") == "0056"


@pytest.mark.parametrize("pad", [True, False])
def test_solution_matches_integer_arithmetic(pad):
    rng = random.Random(1)
    cfg = T.TaskConfig(min_digits=1, max_digits=5, pad_operands=pad)
    for _ in range(500):
        p = T.sample_prompt(rng, cfg, split=None)
        a, b = T.parse_prompt(p)
        scratch, answer = T.solution(p).split(":")
        n = 5 if pad else max(len(str(a)), len(str(b)))
        assert len(p) == (2 * n + 2 if pad else len(str(a)) + len(str(b)) + 2)
        assert int(answer) == a + b and len(answer) == n + 1
        cols = scratch.split(",")
        assert len(cols) == n
        digits = "".join(c[0] for c in cols)[::-1]
        assert int(cols[-1][1] + digits) == a + b  # final carry then digits, most significant first
        carry = 0
        for k, col in enumerate(cols):  # every column obeys the column rule with the previous carry
            x, y = (a // 10**k) % 10, (b // 10**k) % 10
            assert col == f"{(x + y + carry) % 10}{(x + y + carry) // 10}"
            carry = int(col[1])
        assert T.is_correct(p, T.solution(p), strict=True)


def test_make_prompts_deterministic_split_and_distinct():
    cfg = T.TaskConfig()
    a = T.make_prompts(200, cfg, seed=3)
    assert a == T.make_prompts(200, cfg, seed=3)
    assert a != T.make_prompts(200, cfg, seed=4)
    assert len(set(a)) == 200
    ev = T.make_prompts(100, cfg, seed=3, split="eval")
    assert all(T.prompt_split(p) == "train" for p in a)
    assert all(T.prompt_split(p) == "eval" for p in ev)
    for p in a + ev:
        x, y = T.parse_prompt(p)
        assert 10 <= x <= 999 and 10 <= y <= 999
        assert len(p) == 8  # operands zero-padded to max_digits by default
    assert any(len(p) < 8 for p in T.make_prompts(50, T.TaskConfig(pad_operands=False), seed=0))
    # a tiny prompt space still yields n prompts (with repeats)
    assert len(T.make_prompts(50, T.TaskConfig(1, 1, eval_fraction=0.5), seed=0, split="eval")) == 50


def test_bad_config_rejected():
    with pytest.raises(ValueError):
        T.TaskConfig(min_digits=3, max_digits=2)
    with pytest.raises(ValueError):
        T.TaskConfig(error_rate=1.5)
    with pytest.raises(ValueError):
        T.parse_prompt("12-3=")


# ---------------------------------------------------------------------------------------- corrections, is_correct
def test_apply_corrections():
    assert T.apply_corrections("21,4<31") == "21,31"
    assert T.apply_corrections("<12") == "12"
    assert T.apply_corrections("123<<4") == "14"
    assert T.apply_corrections("12<<<3") == "3"
    assert T.apply_corrections("") == ""


def test_is_correct_cases():
    p = "473+859="
    assert T.is_correct(p, "21,31,31:1332")
    assert T.is_correct(p, "21,31,31:1332[EOS]")
    assert T.is_correct(p, "21,31,31:1332[EOS]999")  # text after EOS is ignored
    assert not T.is_correct(p, "21,31,31:1331")
    assert not T.is_correct(p, "21,31,31:13320")
    assert not T.is_correct(p, "21,31,31:01332")
    assert not T.is_correct(p, "21,31,31")  # no answer
    assert not T.is_correct(p, "")
    assert T.is_correct(p, "21,31,31:1331<2")  # corrected to correct
    assert T.is_correct(p, "21,4<31,31:1332")
    assert not T.is_correct(p, "21,31,31:1332<")  # the correction deletes the last answer digit
    assert T.is_correct("047+009=", "61,50,00:0056")
    assert not T.is_correct("047+009=", "61,50,00:56")  # the answer has one digit per column + final carry
    # the scratchpad only matters when strict
    assert T.is_correct(p, "00,00,00:1332")
    assert not T.is_correct(p, "00,00,00:1332", strict=True)
    assert T.is_correct(p, "21,4<31,31:1332", strict=True)


def test_teacher_training_text_and_mask():
    cfg = T.TaskConfig(error_rate=0.3)
    rng = random.Random(0)
    saw_correction = False
    for p in T.make_prompts(200, cfg, seed=0):
        text = T.teacher_training_text(p, rng, cfg)
        assert T.apply_corrections(text) == T.solution(p)
        saw_correction |= "<" in text
        tokens, train = T.teacher_training_example(p, rng, cfg)
        assert tokens[-1] == T.EOS_TOKEN and train[-1]
        for i, (t, keep) in enumerate(zip(tokens, train)):
            if not keep:  # an injected wrong token: untrained, followed by "<" which is trained
                assert tokens[i + 1] == "<" and train[i + 1]
            if t == "<":
                assert not train[i - 1]
        assert T.error_positions(p, "".join(tokens)) == [
            i > 0 and not train[i - 1] for i in range(len(tokens))
        ]
    assert saw_correction
    off = T.TaskConfig(corrections=False, error_rate=0.3)
    assert all("<" not in T.teacher_training_text(p, rng, off) for p in T.make_prompts(50, off, seed=0))
    assert T.teacher_training_text("473+859=", random.Random(0), T.TaskConfig(error_rate=0.0)) == "21,31,31:1332"


# ------------------------------------------------------------------------------------------------ error_positions
def test_error_positions_hand_built(tok):
    p = "473+859="  # solution "21,31,31:1332"
    F, X = False, True
    assert T.error_positions(p, "21,31,31:1332[EOS]") == [F] * 14
    # mistake at index 3 ("4" instead of "3"): position 4 is where "<" belongs; the rest is not marked
    assert T.error_positions(p, "21,41,31:1432") == [F, F, F, F, X] + [F] * 8
    # repaired at once: the "<" itself sits at the marked position
    assert T.error_positions(p, "21,4<31,31:1332") == [F, F, F, F, X] + [F] * 10
    # repaired, then a fresh mistake in the answer: two marks
    assert T.error_positions(p, "21,4<31,31:1432") == [F] * 4 + [X] + [F] * 8 + [X, F]
    # deleting a right token keeps the prefix consistent
    assert T.error_positions(p, "2<21,31,31:1332") == [F] * 15
    # a wrong token right before EOS marks the EOS position; nothing is marked after EOS or on pads
    assert T.error_positions(p, "21,31,31:1333[EOS]") == [F] * 13 + [X]
    assert T.error_positions(p, "21,31,31:1332[EOS]5[PAD][PAD]") == [F] * 17
    # a premature EOS is a mistake, but nothing follows it
    assert T.error_positions(p, "21,31[EOS]") == [F] * 6
    # token ids give the same answer as text, with or without a tokenizer
    text = "21,41,31:1432[EOS][PAD]"
    ids = T.encode_chars("21,41,31:1432") + [T.EOS_ID, T.PAD_ID]
    assert T.error_positions(p, ids) == T.error_positions(p, text)
    assert T.error_positions(p, torch.tensor(ids), tokenizer=tok) == T.error_positions(p, text)
    assert len(T.error_positions(p, ids)) == len(ids)


def test_write_prompt_file(tmp_path):
    prompts = ["473+859=", "012+034="]
    path = T.write_prompt_file(tmp_path / "sub" / "p.jsonl", prompts)
    rows = [json.loads(line) for line in open(path)]
    assert rows == [
        {"prompt": "473+859=", "answer": "1332", "sum": 1332},
        {"prompt": "012+034=", "answer": "0046", "sum": 46},
    ]
    assert T.read_prompt_file(path) == rows


# ------------------------------------------------------------------------------------------------- models
class _OracleModel(torch.nn.Module):
    """Generates the canonical solution (or a broken one) after left-padded prompts: checks the eval plumbing."""

    def __init__(self, broken=False):
        super().__init__()
        self.broken = broken

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = T.decode_ids(ids[mask.bool()].tolist())
            sol = T.solution(prompt)
            if self.broken:
                sol = sol[:-1] + str((int(sol[-1]) + 1) % 10)
            comp = (T.encode_chars(sol) + [T.EOS_ID])[:max_new_tokens]
            rows.append(comp + [T.PAD_ID] * (max_new_tokens - len(comp)))
        return torch.cat([input_ids, torch.tensor(rows)], 1)


def test_evaluate_exact_match_plumbing(tok):
    prompts = T.make_prompts(20, T.TaskConfig(min_digits=1), seed=0, split="eval")
    assert evaluate_exact_match(_OracleModel(), tok, prompts, max_new_tokens=20, batch_size=7, task=ADD) == 1.0
    assert evaluate_exact_match(_OracleModel(broken=True), tok, prompts, max_new_tokens=20, task=ADD) == 0.0
    assert evaluate_exact_match(_OracleModel(), tok, prompts, max_new_tokens=3, task=ADD) == 0.0  # truncated


def _tiny_lab_config():
    return LabConfig(
        task=T.TaskConfig(min_digits=1, max_digits=2),
        task_name="addition",
        teacher_min_em=None,  # a 3-step teacher: the calibration check would (rightly) reject it
        student_em_tolerance=None,
        teacher=ModelSize(1, 32, 2),
        student=ModelSize(1, 16, 2),
        teacher_steps=3,
        student_steps=5,
        student_target_em=0.0,  # any score reaches it: the early stop fires at the first check
        student_check_every=2,
        student_min_steps=2,
        batch_size=8,
        n_eval=12,
        n_dev=6,
        n_train_prompts=16,
        num_threads=1,
    )


def test_prepare_lab_models_tiny(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _tiny_lab_config()
    out = prepare_lab_models(tmp_path, cfg, progress=False)
    assert not out["cached"]
    paths, metrics = out["paths"], out["metrics"]
    for key in ("teacher", "student", "tokenizer"):
        assert os.path.isfile(os.path.join(paths[key], "tokenizer.json")) or key != "tokenizer"
        assert os.path.isdir(paths[key])
    assert [r["prompt"] for r in T.read_prompt_file(paths["eval_prompts"])] == T.make_prompts(
        12, cfg.task, cfg.seed, split="eval"
    )
    assert len(T.read_prompt_file(paths["train_prompts"])) == 16
    for role in ("teacher", "student"):
        m = metrics[role]
        assert 0.0 <= m["exact_match"] <= 1.0 and math.isfinite(m["final_loss"]) and m["steps"] > 0
    assert metrics["teacher"]["steps"] == 3 and not metrics["teacher"]["stopped_early"]
    assert metrics["student"]["steps"] == 2 and metrics["student"]["stopped_early"]
    q3 = metrics["student_error_positions"]
    assert 0.0 <= q3["error_share"] <= 1.0 and q3["kl_all"] == pytest.approx(metrics["student_heldout_kl"])
    assert 0.0 <= metrics["teacher"]["recover_top1"] <= 1.0
    assert metrics["student_heldout_kl"] >= 0.0

    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"])
    assert AutoTokenizer.from_pretrained(paths["teacher"])("12+3=")["input_ids"] == T.encode_chars("12+3=")
    for model, size in ((teacher, cfg.teacher), (student, cfg.student)):
        assert model.config.model_type == "qwen2"
        assert model.config.vocab_size == len(tokenizer)
        assert model.config.hidden_size == size.hidden_size
        assert not model.config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    prompts = [r["prompt"] for r in T.read_prompt_file(paths["eval_prompts"])]
    em = evaluate_exact_match(student, tokenizer, prompts, max_new_tokens=12, batch_size=5, task=ADD)
    assert 0.0 <= em <= 1.0
    kl = heldout_kl(student, teacher, tokenizer, prompts, max_new_tokens=12, batch_size=5)
    assert math.isfinite(kl) and kl > 0.0
    kl_sampled = heldout_kl(student, teacher, tokenizer, prompts, max_new_tokens=12, greedy=False, seed=1)
    assert math.isfinite(kl_sampled) and kl_sampled > 0.0
    assert heldout_kl(student, student, tokenizer, prompts, max_new_tokens=12) == pytest.approx(0.0, abs=1e-5)
    rates = recovery_rate(teacher, prompts, task=ADD)
    assert all(0.0 <= v <= 1.0 for v in rates.values())

    loaded_teacher, _, loaded_tok = load_lab_models(out)
    assert loaded_tok("1+2=")["input_ids"] == T.encode_chars("1+2=")
    assert torch.equal(loaded_teacher.lm_head.weight, teacher.lm_head.weight)

    again = prepare_lab_models(tmp_path, cfg, progress=False)
    assert again["cached"] and again["paths"] == paths and again["metrics"] == metrics
    other = LabConfig.from_dict({**cfg.to_dict(), "student_steps": 1})
    assert other.cache_key() != cfg.cache_key()
    assert LabConfig.from_dict({**cfg.to_dict(), "num_threads": 2}).cache_key() == cfg.cache_key()
    assert [d for d in os.listdir(tmp_path) if d.startswith(".lab-")] == []  # no leftover work dirs


def test_thread_tuner_picks_the_faster_setting():
    from lab.models import _ThreadTuner

    before = torch.get_num_threads()
    try:
        for slow, expect in ((2, 1), (1, 2)):
            tuner = _ThreadTuner(2, period=10, probe=2)
            chosen = []
            for step in range(20):
                n = tuner.threads_for(step)
                chosen.append(n)
                tuner.record(n, 1.0 if n == slow else 0.1)
            assert chosen[1:3] == [1, 1]  # the probe starts at 1 thread
            assert chosen[6:10] == [expect] * 4 and chosen[16:] == [expect] * 4
            if slow == 2:  # a slow multi-thread probe step ends the probe at once
                assert chosen[3:5] == [2, 1]
        assert _ThreadTuner(1).threads_for(5) == 1
    finally:
        torch.set_num_threads(before)
