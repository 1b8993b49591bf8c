"""Shared test support: tiny real-model-shaped tokenizers, models and prompt files built in-process (nothing is
downloaded), and the trainer helpers several test modules use. Fixtures live in conftest.py.

Shapes follow real models: vocabulary rows, hidden and intermediate sizes and every projection's output rows are
multiples of 64, so optional kernels with block-size requirements (bitsandbytes' CPU 4-bit path needs rows % 32 == 0
on CPUs with avx512_bf16) are exercised, not dodged.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

from opsd.core.config import OPDConfig
from opsd.core.losses import divergence_reference
from opsd.core.models import load_causal_lm, load_tokenizer
from opsd.core.trainer import OPDTrainer

CHARS = list("0123456789+=abcdefghij ")
SPECIALS = ["<pad>", "<eos>", "<unk>"]


ROW_MULTIPLE = 64  # vocabulary rows, hidden and intermediate sizes are multiples of this, as in real models
P, C = 3, 6  # prompt and completion length of the fixed batches
LENGTHS = [6, 3, 1, 5]  # completion lengths of the 4 sequences of `fixed_batch`


def make_tokenizer(extra_tokens: int | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer; by default padded with `<xN>` tokens to ROW_MULTIPLE entries."""
    if extra_tokens is None:
        extra_tokens = -(len(SPECIALS) + len(CHARS)) % ROW_MULTIPLE
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS + [f"<x{i}>" for i in range(extra_tokens)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  padding_side="left")
    return tok


def make_model(vocab_size: int, hidden: int = 64, layers: int = 1, seed: int = 0, eos_id: int = 1, pad_id: int = 0,
               head_scale: float = 1.0):
    """A random Qwen2 model; with hidden a multiple of 64 every projection has a multiple of 64 output rows.

    `head_scale` multiplies the lm_head weights: at 1 a random model is nearly uniform (logit std ~0.2), a scale
    of ~10 gives a peaked, opinionated distribution (a teacher worth distilling from)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=eos_id,
                         pad_token_id=pad_id)
    model = Qwen2ForCausalLM(config)
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model


def save_pair(root: str, student_vocab: int | None = None, teacher_vocab: int | None = None, teacher_hidden=128,
              teacher_head_scale: float = 3.0):
    """Save a tiny student/teacher pair with the shared tokenizer; returns (student_dir, teacher_dir).

    The teacher's head is scaled so that its distribution is peaked and the student has something to learn."""
    tok = make_tokenizer()
    n = len(tok)
    paths = []
    for name, vocab, hidden, seed, scale in (("student", student_vocab or n, 64, 0, 1.0),
                                             ("teacher", teacher_vocab or n, teacher_hidden, 1, teacher_head_scale)):
        path = os.path.join(root, name)
        make_model(vocab, hidden=hidden, seed=seed, head_scale=scale).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return tuple(paths)


def write_prompts(path: str, n: int = 8, conversational: bool = False) -> str:
    with open(path, "w") as f:
        for i in range(n):
            text = f"{i}+{i + 1}="
            prompt = [{"role": "user", "content": text}] if conversational else text
            f.write(json.dumps({"prompt": prompt, "answer": str(2 * i + 1)}) + "\n")
    return path


# ----- trainer helpers -----------------------------------------------------------------------------------------

def make_trainer(pair, tmp_path, ga=1, bs=4, selector=None, **cfg):
    student_dir, teacher_dir = pair
    args = OPDConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                     report_to=[], bf16=False, gradient_checkpointing=False, use_cpu=True, max_completion_length=C,
                     save_strategy="no", **cfg)
    data = Dataset.from_list([{"prompt": "1+1="}] * 8)
    return OPDTrainer(load_causal_lm(student_dir), teacher_dir, args=args, train_dataset=data,
                      processing_class=load_tokenizer(student_dir), token_selector=selector)


def fixed_batch(tool_mask=True):
    g = torch.Generator().manual_seed(0)
    batch = {
        "prompt_ids": torch.randint(2, 20, (4, P), generator=g),
        "prompt_mask": torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]]),
        "completion_ids": torch.randint(2, 20, (4, C), generator=g),
        "completion_mask": torch.tensor([[1] * n + [0] * (C - n) for n in LENGTHS]),
    }
    if tool_mask:
        batch["tool_mask"] = torch.ones(4, C, dtype=torch.long)
        batch["tool_mask"][0, 2:4] = 0  # tool output inside the first completion
    return batch


def split(batch, parts):
    size = 4 // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def trainer_loss_and_grads(trainer, micro_batches):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer._select_tokens(micro_batches)
    total = 0.0
    for mb in micro_batches:
        loss, _, _ = trainer._compute_loss(trainer.model, mb)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def full_logits(trainer, batch):
    """Both models' full logits at the completion positions (student with grad), after zeroing the gradients."""
    model, teacher = trainer.model, trainer.teacher_model
    model.zero_grad()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    z_s = model(input_ids=ids, attention_mask=att).logits[:, P - 1:-1]
    with torch.no_grad():
        z_t = teacher(input_ids=ids, attention_mask=att).logits[:, P - 1:-1]
    return z_s, z_t


def reference_loss_and_grads(trainer, batch, keep_fn=None, weight_fn=None, normalization="kept_tokens"):
    """Materialize the full logits of both models and apply the definition of each normalization."""
    model = trainer.model
    z_s, z_t = full_logits(trainer, batch)
    div, _ = divergence_reference(z_s, z_t, trainer.beta)
    valid = batch["completion_mask"].bool() & batch.get("tool_mask", torch.ones_like(batch["completion_mask"])).bool()
    positions = valid.long().cumsum(1) - 1
    keep = valid if keep_fn is None else valid & keep_fn(positions)
    w = keep.float() * (1.0 if weight_fn is None else weight_fn(positions))
    if normalization == "kept_tokens":
        loss = (div * w).sum() / keep.sum()
    elif normalization == "all_tokens":
        loss = (div * w).sum() / valid.sum()
    else:
        per_seq = (div * w).sum(1) / keep.sum(1).clamp_min(1)
        loss = per_seq[keep.sum(1) > 0].mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, ref):
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert set(got[1]) == set(ref[1])
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-4, atol=1e-6, msg=name)


def base_args(student, teacher, data, out, steps=4, **extra):
    args = ["--model_name_or_path", student, "--teacher_model_name_or_path", teacher, "--train_file", data,
            "--output_dir", out, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
            "--max_steps", str(steps), "--max_completion_length", "6", "--learning_rate", "1e-2",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--report_to", "none",
            "--gradient_checkpointing", "false", "--use_cpu", "true", "--save_strategy", "no", "--seed", "0"]
    for k, v in extra.items():
        args += [f"--{k}", str(v)]
    return args


def fixed_batch_kl(student_dir, teacher_dir):
    """Full-token reverse KL on fixed random completions (not sampled: independent of training randomness)."""
    student, teacher = load_causal_lm(student_dir), load_causal_lm(teacher_dir)
    vocab = student.get_output_embeddings().weight.shape[0]
    ids = torch.randint(2, vocab, (8, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        div, _ = divergence_reference(student(input_ids=ids).logits[:, 3:], teacher(input_ids=ids).logits[:, 3:], 1.0)
    return div.mean().item()


def full_logit_divergence_at(student_dir, teacher_dir, batch):
    """float64 reverse KL(P_S || P_T) from both saved models' full logits at the valid completion positions of a
    batch (prompt_ids/prompt_mask/completion_ids/completion_mask), flattened row-major."""
    student, teacher = load_causal_lm(student_dir), load_causal_lm(teacher_dir)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    p = batch["prompt_ids"].shape[1]
    with torch.no_grad():
        z_s = student(input_ids=ids, attention_mask=att).logits[:, p - 1:-1].double()
        z_t = teacher(input_ids=ids, attention_mask=att).logits[:, p - 1:-1].double()
    ls, lt = z_s.log_softmax(-1), z_t.log_softmax(-1)
    kl = (ls.exp() * (ls - lt)).sum(-1)
    return kl[batch["completion_mask"].bool()]


SEQUENCES, COMPLETION = 4, 6  # the fixed generation batch of FixedCompletions


class FixedCompletions(OPDTrainer):
    """OPDTrainer whose generation returns this process's share of a fixed global batch (rows split evenly over
    the processes), so that runs with different splits (processes, accumulation) see the same completions."""

    def __init__(self, global_batch, *args, **kwargs):
        self.global_batch = global_batch
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_rank = next(iter(self.global_batch.values())).shape[0] // world
        return {k: v[rank * per_rank:(rank + 1) * per_rank].clone() for k, v in self.global_batch.items()}


class SaveGradients(TrainerCallback):
    """Saves (or keeps, with path=None) every parameter's gradient just before each optimizer step."""

    def __init__(self, path=None):
        self.path, self.grads = path, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        self.grads.append(grads)
        if self.path:
            torch.save(grads, self.path)


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")


def add_chat_template(*model_dirs: str) -> None:
    """Give saved tiny models' tokenizers a minimal chat template (conversational prompt files need one)."""
    for path in model_dirs:
        tok = load_tokenizer(path)
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(path)


def write_upstream_raw(root: str, n_dapo: int = 20, n_val: int = 3) -> str:
    """Upstream's raw data root in miniature: DAPO-Math-17k-dedup parquet (DAPO-worded prompt messages and
    reward_model.ground_truth), MATH-500/test.jsonl, AIME_2024 parquet (problem + worked solution), AIME_2025
    jsonl. Questions use the tiny tokenizer's characters."""
    import pandas as pd

    from opsd.data import DAPO_PREFIX, DAPO_SUFFIX

    os.makedirs(os.path.join(root, "DAPO-Math-17k-dedup"))
    rows = [{"prompt": [{"role": "user", "content": DAPO_PREFIX + f"{i}+{i}=" + DAPO_SUFFIX}],
             "reward_model": {"style": "rule", "ground_truth": str(2 * i)}, "data_source": "math_dapo",
             "extra_info": {"index": i}} for i in range(n_dapo)]
    pd.DataFrame(rows).to_parquet(os.path.join(root, "DAPO-Math-17k-dedup", "distinct-prompts-with-rewards.parquet"))
    for folder, name in (("MATH-500", "test.jsonl"), ("AIME_2025", "train.jsonl")):
        os.makedirs(os.path.join(root, folder))
        with open(os.path.join(root, folder, name), "w") as f:
            for i in range(n_val):
                row = {"problem": f"{i}+1=", "answer": str(i + 1)}
                if folder == "MATH-500":
                    row["unique_id"] = f"m{i}"
                f.write(json.dumps(row) + "\n")
    os.makedirs(os.path.join(root, "AIME_2024"))
    pd.DataFrame([{"problem": f"{i}+2=", "solution": f"so it is \\boxed{{{i + 2}}}"} for i in range(n_val)]).to_parquet(
        os.path.join(root, "AIME_2024", "aime_2024_problems.parquet"))
    return root


class EveryOther:
    """A minimal selector: keeps even positions, weighted by 1 + position (loss supports and controls run on a
    selector's kept rows and weights through the trainer's factors)."""

    scope, across_processes, needs_model_pass = "rollout_batch", True, False

    def statistics(self, view):
        return {}

    def choose(self, stats, sequence_ids, positions, generator):
        from opsd.core.selection import TokenChoice

        return TokenChoice(positions % 2 == 0, 1.0 + positions.float())

    def record(self, *args):
        pass
