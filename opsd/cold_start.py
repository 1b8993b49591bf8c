"""Off-policy cold start (the Rethinking-OPD paper's first recovery strategy): teacher rollouts, then SFT.

    python -m opsd.cold_start --teacher TEACHER_DIR --student STUDENT_DIR --prompts data/train.jsonl \
        --output_dir runs/cold-start [--rollouts 1 --max_new_tokens 1024 --filter_reward --lora]

1. The teacher samples `--rollouts` responses per prompt (transformers `generate`, or vLLM with `--backend vllm`).
   Responses cut off at `--max_new_tokens` are dropped (`--keep_truncated` keeps them); with `--filter_reward`
   only responses whose verifiable reward (opsd.reward, `--reward_function`) is above 0.5 are kept (needs answers).
2. The student is fine-tuned on them with TRL's SFTTrainer (prompt-completion data, loss on the completion only;
   full fine-tuning, or LoRA with `--lora` merged into the weights at the end).
3. `--output_dir` receives a plain checkpoint (weights + tokenizer) that run_scripts/train_opd.sh and train_tip.sh
   start from (MODEL_PATH=OUTPUT_DIR), the SFT data (`cold_start_data.jsonl`) and `cold_start_summary.json`
   (`"kind": "opsd.cold_start"`, the teacher, the prompts, the counts and the SFT settings): python -m
   opsd.probe_teacher reads it from the student directory and, instead of advising another cold start, says what
   to do next.

Why: OPD's dense token reward is informative only where the student already visits states the teacher would visit
(a shared top-K set holding most of both distributions' mass); a short SFT phase on teacher trajectories raises that
initial overlap when the two models' thinking patterns differ (python -m opsd.probe_teacher measures it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence


SUMMARY_FILE = "cold_start_summary.json"
KIND = "opsd.cold_start"


def read_summary(model_dir: str) -> dict | None:
    """The cold-start metadata of a model directory written by this module, or None (not a cold-started model)."""
    path = os.path.join(model_dir, SUMMARY_FILE)
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("kind", KIND) != KIND:
        return None
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m opsd.cold_start", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="Local teacher model directory.")
    p.add_argument("--student", required=True, help="Local student model directory (the model to fine-tune).")
    p.add_argument("--prompts", required=True, help="Prompt file (.jsonl/.json/.parquet or a data directory).")
    p.add_argument("--output_dir", required=True, help="Where the cold-started student checkpoint is written.")
    p.add_argument("--limit", type=int, default=None, help="Use the first N prompts.")
    p.add_argument("--rollouts", type=int, default=1, help="Teacher responses per prompt.")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="Longest teacher response.")
    p.add_argument("--temperature", type=float, default=0.7, help="Teacher sampling temperature (0 = greedy).")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="Teacher generation backend.")
    p.add_argument("--gen_batch_size", type=int, default=8, help="Generation batch size (hf backend).")
    p.add_argument("--filter_reward", action="store_true", help="Keep only responses with reward > 0.5.")
    p.add_argument("--reward_function", default="math", help="Reward function name (opsd.reward).")
    p.add_argument("--keep_truncated", action="store_true", help="Also train on responses cut at max_new_tokens.")
    p.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning (merged at the end).")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--num_train_epochs", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=-1, help="SFT steps (-1 = num_train_epochs).")
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_length", type=int, default=4096, help="SFT sequence length limit (prompt + response).")
    p.add_argument("--dtype", default=None, help="Model dtype (default bfloat16 on GPU, float32 on CPU).")
    p.add_argument("--enable_thinking", default=None, choices=["true", "false"],
                   help="Passed to the chat template (Qwen3-style).")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def teacher_rollouts(args, dataset, kwargs) -> tuple[list[dict], dict]:
    """(SFT rows, counts) from the teacher's sampled responses."""
    import torch

    from .evaluate import evaluate, load_model_and_tokenizer
    from .reward import get_reward_fn

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    if args.backend == "vllm":
        try:
            from vllm import LLM
        except ImportError as err:
            raise SystemExit("--backend vllm needs vLLM (pip install -r requirements-gpu.txt); or use --backend hf.") \
                from err
        from .core.models import load_tokenizer

        teacher, tokenizer = LLM(model=args.teacher, dtype=dtype, seed=args.seed), load_tokenizer(args.teacher)
    else:
        teacher, tokenizer = load_model_and_tokenizer(args.teacher, dtype=dtype)
    reward_fn = get_reward_fn(args.reward_function)
    result = evaluate(teacher, tokenizer, dataset, k=args.rollouts, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size, seed=args.seed,
                      reward_fn=reward_fn, chat_template_kwargs=kwargs, desc="teacher rollouts")
    del teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rows, counts = [], {"generated": 0, "truncated_dropped": 0, "reward_dropped": 0, "empty_dropped": 0}
    for record in result["records"]:
        for text, reward, truncated in zip(record["completions"], record["rewards"], record["truncated"]):
            counts["generated"] += 1
            if truncated and not args.keep_truncated:
                counts["truncated_dropped"] += 1
            elif args.filter_reward and reward <= 0.5:
                counts["reward_dropped"] += 1
            elif not text.strip():
                counts["empty_dropped"] += 1
            else:
                prompt = record["prompt"]
                completion = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
                rows.append({"prompt": prompt, "completion": completion, "reward": reward})
    counts["kept"] = len(rows)
    counts["teacher_mean_reward"] = result["metrics"][f"mean@{args.rollouts}"]
    return rows, counts


def supervised_fine_tune(args, rows: list[dict], kwargs) -> dict:
    """SFT of the student on the rows with TRL's SFTTrainer; writes a merged plain checkpoint to output_dir."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from .core.models import load_causal_lm, load_tokenizer

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    model = load_causal_lm(args.student, dtype=dtype, what="Student model")
    tokenizer = load_tokenizer(args.student)
    config = SFTConfig(
        output_dir=os.path.join(args.output_dir, "sft_run"), learning_rate=args.learning_rate,
        num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_length=args.max_length,
        completion_only_loss=True, bf16=dtype == "bfloat16", use_cpu=not torch.cuda.is_available(),
        save_strategy="no", report_to=[], logging_steps=1, seed=args.seed,
        **({"gradient_checkpointing": True} if args.gradient_checkpointing else {}),
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    extra = {"chat_template_kwargs": kwargs} if kwargs and isinstance(rows[0]["prompt"], list) else {}
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"], **extra} for r in rows])
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    output = trainer.train()
    model = trainer.model
    if args.lora:
        model = model.merge_and_unload()  # a plain checkpoint the OPD scripts load like any other model
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"sft_steps": trainer.state.global_step, "sft_train_loss": output.training_loss,
            "sft_first_loss": losses[0] if losses else None, "sft_last_loss": losses[-1] if losses else None}


def main(argv: Sequence[str] | None = None) -> int:
    from .data import load_prompt_dataset

    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("rollouts", "max_new_tokens", "gen_batch_size", "per_device_train_batch_size", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    dataset = load_prompt_dataset(args.prompts, limit=args.limit)
    if args.filter_reward and "answer" not in dataset.column_names:
        parser.error("--filter_reward needs an answer column in the prompt file (or drop --filter_reward).")
    kwargs = None if args.enable_thinking is None else {"enable_thinking": args.enable_thinking == "true"}
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"[cold_start] phase 1: teacher rollouts ({len(dataset)} prompts x {args.rollouts})", file=sys.stderr)
    rows, counts = teacher_rollouts(args, dataset, kwargs)
    with open(os.path.join(args.output_dir, "cold_start_data.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"[cold_start] kept {counts['kept']}/{counts['generated']} responses "
          f"(truncated dropped {counts['truncated_dropped']}, reward dropped {counts['reward_dropped']})",
          file=sys.stderr)
    if not rows:
        raise SystemExit("No teacher response survived the filters: raise --max_new_tokens, pass --keep_truncated, "
                         "or drop --filter_reward.")
    print(f"[cold_start] phase 2: SFT of the student on {len(rows)} responses", file=sys.stderr)
    settings = {k: getattr(args, k, None) for k in ("rollouts", "max_new_tokens", "limit", "num_train_epochs",
                                                   "learning_rate", "lora", "filter_reward")}
    summary = {"kind": KIND, "teacher": os.path.abspath(args.teacher), "student": args.student,
               "prompts": args.prompts, "settings": settings, **counts,
               **supervised_fine_tune(args, rows, kwargs), "checkpoint": os.path.abspath(args.output_dir)}
    with open(os.path.join(args.output_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[cold_start] checkpoint: {summary['checkpoint']} (use it as MODEL_PATH for train_opd.sh / train_tip.sh)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
