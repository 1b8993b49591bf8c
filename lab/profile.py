"""Whole-step profile of OPD at real shapes: `python -m lab.profile [--tiny] [--steps 2] ...`.

How much of a real optimizer step can token selection and padding-free passes save? Random-weight models are built
from real architectures written as configs below (Qwen3-0.6B student, Qwen3-1.7B teacher, vocabulary 151936; no
weights are read), or real checkpoints are read from local directories (`--student_dir`, `--teacher_dir`: a
`save_pretrained` folder, e.g. the SmolLM2-135M-Instruct checkpoint `python -m lab.real_assets` materializes; never
a hub name). A few full OPD steps run through the real `OPDTrainer` for each configuration, each in its own
subprocess so its peak memory is its own.

A configuration is `none` (full-token OPD) or `<rule>@<ratio>`, optionally followed by `/padded` (padding_free=false:
the padded rectangle, one micro-batch split as shuffled) and/or `/separate` (statistics_source=separate_pass: a
no-grad student forward per micro-batch for the statistics). Without them: the defaults (padding-free passes, the
statistics from the hidden states recorded during generation). `none/padded` is the trainer before issue 18.

Completion lengths: each rollout's length is drawn uniformly between `--length_spread` x and 1 x the limit (default
0.2; 1 = every rollout runs to the limit), the same draws for every configuration, by forcing the end-of-sequence
token at the drawn length (and masking it before) in the student's sampling; so a real model and a random one have
the same realistic spread of lengths, and padding costs what it costs in real runs.

Phases are timed from outside the trainer, by wrapping bound methods of the trainer instance (its behaviour is
unchanged; nested phases are counted once, in the innermost one):

| phase              | what is timed                                                                         |
|--------------------|---------------------------------------------------------------------------------------|
| generation         | `_generate_and_score_completions` (the student samples the rollouts)                  |
| teacher pass       | `_teacher_hidden` (teacher backbone, no grad)                                         |
| statistics pass    | `_run_selector` (the statistics' head projections, the separate student forward with  |
|                    | `/separate`, the rule)                                                                |
| student forward    | `_completion_hidden` inside `_compute_loss` (backbone with grad)                      |
| loss               | the rest of `_compute_loss` (head projections + `weighted_divergence_loss`)           |
| student backward   | `accelerator.backward`                                                                |
| optimizer          | `torch.optim.Optimizer.step` (global step hooks)                                      |
| other              | the rest of the step (callbacks, logging, data, selection bookkeeping)                |

Times are CPU time of the profiled process on CPU (stable on a shared machine; use `--threads 1` so that it is the
work done) and elapsed time on CUDA. The first step is a warm-up; the table reports the mean over the remaining
steps (or the only one). Peak memory:
opsd.core.memory (CUDA max allocated; CPU process peak RSS, which includes the models). The trainer's own per-phase
metrics (`time/generation`, `time/teacher`, `time/statistics`, `time/forward_backward`, `time/optimizer`: process
CPU seconds) are kept in the JSON too. "training part" = teacher pass + student forward + loss + student backward.
Writes JSON (`--out`) and a stacked-bar PNG (`--png`), prints a markdown table and the issue-18 target checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from collections import defaultdict

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .bench import _cpu_name, run_child

PHASES = ("generation", "teacher pass", "statistics pass", "student forward", "loss", "student backward",
          "optimizer", "other")
CONFIGS = ("none/padded", "none", "teachability@0.1", "soft_or@0.2", "entropy_sample@0.2")
TRAINING_PART = ("teacher pass", "student forward", "loss", "student backward")

# Published Qwen3 shapes (config.json of Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B): both tie their embeddings.
ARCHITECTURES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
}
# --tiny: the same layout, small (every size a multiple of 64, as real models have)
TINY = {
    "qwen3-0.6b": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32, vocab_size=512, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=True),
}


def build_model(name: str, tiny: bool, dtype: torch.dtype, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = (TINY if tiny else ARCHITECTURES)[name]
    config = Qwen3Config(**shape, max_position_embeddings=4096, rms_norm_eps=1e-6, eos_token_id=1, pad_token_id=0,
                         bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    return model


def build_tokenizer(vocab_size: int):
    """A character-level tokenizer padded with filler tokens to the model's vocabulary (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<eos>", "<unk>"] + list("0123456789+= ")
    vocab = {tok: i for i, tok in enumerate(base + [f"<x{i}>" for i in range(vocab_size - len(base))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


class PhaseClock:
    """Exclusive time per phase: a phase's nested phases are subtracted from it."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        # CPU: the process's CPU time, which a shared machine's load does not stretch (with 1 thread it is the work
        # done); CUDA: elapsed time between synchronizations
        self.now = time.perf_counter if cuda else time.process_time
        self.stack: list[list] = []  # [phase, start, time spent in children]
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def enter(self, phase: str) -> None:
        self._sync()
        self.stack.append([phase, self.now(), 0.0])

    def exit(self) -> None:
        self._sync()
        phase, start, children = self.stack.pop()
        spent = self.now() - start
        self.current[phase] += spent - children
        if self.stack:
            self.stack[-1][2] += spent

    def wrap(self, fn, phase):
        """`fn` timed as `phase`; a callable phase is chosen from the enclosing phase (None: not timed)."""
        def timed(*args, **kwargs):
            name = phase(self.stack[-1][0] if self.stack else None) if callable(phase) else phase
            if name is None:
                return fn(*args, **kwargs)
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()
        return timed


def instrument(trainer, clock: PhaseClock):
    """Time the trainer's phases by wrapping its bound methods (see the module table). Returns the hook handles."""
    from transformers import TrainerCallback

    trainer._generate_and_score_completions = clock.wrap(trainer._generate_and_score_completions, "generation")
    trainer._teacher_hidden = clock.wrap(trainer._teacher_hidden, "teacher pass")
    trainer._run_selector = clock.wrap(trainer._run_selector, "statistics pass")
    trainer._compute_loss = clock.wrap(trainer._compute_loss, "loss")
    # the student backbone with grad is the one called from _compute_loss; elsewhere it belongs to its caller
    trainer._completion_hidden = clock.wrap(trainer._completion_hidden,
                                            lambda parent: "student forward" if parent == "loss" else None)
    trainer.accelerator.backward = clock.wrap(trainer.accelerator.backward, "student backward")
    hooks = [register_optimizer_step_pre_hook(lambda *a: clock.enter("optimizer")),
             register_optimizer_step_post_hook(lambda *a: clock.exit())]

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.current = defaultdict(float)
            clock.enter("other")

        def on_step_end(self, args, state, control, **kwargs):
            clock.exit()
            step = dict(clock.current)
            step["total"] = sum(step.values())
            clock.steps.append(step)

    trainer.add_callback(StepTimer())
    return hooks


def parse_config(config: str) -> dict:
    """`<rule>@<ratio>[/padded][/separate]` or `none[/padded]` -> rule, ratio, padding_free, statistics_source."""
    head, *flags = config.split("/")
    rule, _, ratio = head.partition("@")
    unknown = sorted(set(flags) - {"padded", "separate"})
    if unknown or (rule != "none" and not ratio) or (rule == "none" and ratio):
        raise ValueError(f"{config!r}: must be none or <rule>@<ratio>, optionally with /padded and /separate "
                         "(e.g. teachability@0.1, none/padded)")
    return {"rule": None if rule == "none" else rule, "ratio": float(ratio or 1.0),
            "padding_free": "padded" not in flags,
            "statistics_source": "separate_pass" if "separate" in flags else "generation"}


def force_lengths(trainer, limit: int, spread: float, seed: int = 0) -> list[list[int]]:
    """Each rollout of each generate call ends at a length drawn uniformly from [ceil(spread * limit), limit]: the
    end-of-sequence logit is masked before it and forced at it (a forward hook on the student's output layer, which
    only sampling calls). The draws depend on the call's index only, so every configuration gets the same lengths.
    Returns the list the drawn lengths are appended to."""
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
    eos = list(trainer.eos_token_ids)
    low = max(1, min(limit, -(-int(spread * limit * 1000) // 1000)))
    state = {"call": 0, "step": 0, "targets": None}
    drawn: list[list[int]] = []
    original = trainer._generate_single_turn

    def generate(prompt_ids, *args, **kwargs):
        g = torch.Generator().manual_seed(seed * 7919 + state["call"])
        state["call"] += 1
        state["step"] = 0
        state["targets"] = torch.randint(low, limit + 1, (len(prompt_ids),), generator=g)
        drawn.append(state["targets"].tolist())
        return original(prompt_ids, *args, **kwargs)

    def hook(module, inputs, logits):
        targets = state["targets"]
        if targets is None or logits.shape[0] != targets.numel():
            return logits
        step = state["step"]
        state["step"] += 1
        logits = logits.clone()
        last = logits[:, -1]
        last[:, eos] = torch.finfo(logits.dtype).min  # not before the drawn length
        ending = (targets.to(logits.device) == step + 1)
        last[ending] = torch.finfo(logits.dtype).min
        last[ending, eos[0]] = 0.0
        return logits

    trainer._generate_single_turn = generate
    head.register_forward_hook(hook)
    return drawn


def _child(args) -> dict:
    from datasets import Dataset

    from opsd.core.config import OPDConfig
    from opsd.core.memory import peak_memory_gb
    from opsd.core.models import load_causal_lm, load_tokenizer
    from opsd.core.trainer import OPDTrainer
    from tip_ext.trainer import SelectorConfig, make_selector

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    student_dtype = torch.float32  # master weights; bf16 autocast on CUDA
    teacher_dtype = getattr(torch, args.teacher_dtype)
    setting = parse_config(args.child)
    t0 = time.perf_counter()
    if args.student_dir:
        student = load_causal_lm(args.student_dir, dtype="float32")
        teacher = load_causal_lm(args.teacher_dir or args.student_dir, dtype=args.teacher_dtype)
        tokenizer = load_tokenizer(args.student_dir)
        if args.attn_implementation:
            for model in (student, teacher):
                model.set_attn_implementation(args.attn_implementation)
    else:
        student = build_model(args.student, args.tiny, student_dtype, seed=0)
        teacher = build_model(args.teacher, args.tiny, teacher_dtype, seed=1)
        tokenizer = build_tokenizer(student.config.vocab_size)
        if args.attn_implementation:
            for model in (student, teacher):
                model.set_attn_implementation(args.attn_implementation)
    build_s = time.perf_counter() - t0
    saved = tempfile.TemporaryDirectory()
    if args.vllm and not args.student_dir:  # vLLM loads the student from a directory (its name_or_path)
        student.save_pretrained(saved.name)
        tokenizer.save_pretrained(saved.name)
        student = load_causal_lm(saved.name, dtype="float32", attn_implementation=args.attn_implementation)
    rows = args.batch * args.accumulation * (args.steps + 1)
    if args.student_dir:  # real prompts of several lengths (left padding, as in real runs)
        texts = [f"What is {17 * i + 3} + {29 * i % 97}? Explain briefly." + " Think step by step." * (i % 3)
                 for i in range(rows)]
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} if tokenizer.chat_template
                                  else {"prompt": t} for t in texts])
    else:
        prompt = ("12+34=" * (args.prompt_length // 6 + 1))[: args.prompt_length]
        data = Dataset.from_list([{"prompt": prompt}] * rows)
    with tempfile.TemporaryDirectory() as out:
        cfg = OPDConfig(output_dir=out, per_device_train_batch_size=args.batch,
                        gradient_accumulation_steps=args.accumulation, max_steps=args.steps,
                        max_prompt_length=args.prompt_length, max_completion_length=args.completion_length,
                        learning_rate=1e-6, report_to=[], save_strategy="no", logging_steps=1, bf16=cuda,
                        use_cpu=not cuda, gradient_checkpointing=args.gradient_checkpointing,
                        chunk_size=args.chunk_size, divergence_backend=args.divergence_backend, disable_tqdm=True,
                        padding_free=setting["padding_free"], statistics_source=setting["statistics_source"],
                        use_vllm=args.vllm, vllm_mode="colocate", seed=0)
        selector = make_selector(SelectorConfig(selector=setting["rule"], ratio=setting["ratio"], census=False), cfg)
        trainer = OPDTrainer(student, teacher, args=cfg, train_dataset=data, processing_class=tokenizer,
                             token_selector=selector)
        # vLLM samples in its own engine: lengths cannot be forced there (they are what the model samples)
        spread = args.length_spread < 1 and not args.vllm
        drawn = force_lengths(trainer, args.completion_length, args.length_spread) if spread else []
        clock = PhaseClock(cuda)
        hooks = instrument(trainer, clock)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
        for hook in hooks:
            hook.remove()
        history = trainer.state.log_history
        kept = [x for x in history if "kept_fraction" in x]
        logged = [{k: v for k, v in x.items() if k.startswith("time/") or k.startswith("completions/")}
                  for x in history if "time/generation" in x]
    timed = clock.steps[1:] or clock.steps
    mean = {p: sum(s.get(p, 0.0) for s in timed) / len(timed) for p in (*PHASES, "total")}
    mean["training part"] = sum(mean[p] for p in TRAINING_PART)
    mean["without generation"] = mean["total"] - mean["generation"]
    return {"config": args.child, "setting": setting, "phases_s": mean, "steps": clock.steps,
            "peak_memory_gb": peak_memory_gb(device), "build_s": build_s,
            "kept_fraction": kept[-1]["kept_fraction"] if kept else None, "trainer_metrics": logged,
            "completion_lengths": drawn, "completion_limit_tokens": args.batch * args.accumulation * args.completion_length}


def _ratio(results, config, base, key):
    a = next((r for r in results if r.get("config") == config and "error" not in r), None)
    b = next((r for r in results if r.get("config") == base and "error" not in r), None)
    if a is None or b is None or not b["phases_s"][key]:
        return None
    return a["phases_s"][key] / b["phases_s"][key]


def target_checks(results) -> list[str]:
    """Issue 18's targets, from the ratios of this run (None where a configuration is missing)."""
    lines = []
    full = "none" if any(r.get("config") == "none" for r in results) else "none/padded"
    for r in results:
        if "error" in r or r["setting"]["rule"] is None:
            continue
        ratio = _ratio(results, r["config"], full, "total")
        rest = _ratio(results, r["config"], full, "without generation")
        rho = r["setting"]["ratio"]
        limit = 0.95 if rho <= 0.1 else (1.0 if rho <= 0.5 else None)
        if ratio is None or limit is None:
            continue
        lines.append(f"- {r['config']}: whole step {ratio:.2f}x of full-token `{full}` (target <= {limit:.2f}x): "
                     f"{'met' if ratio <= limit else 'MISSED'}; without generation (the same work in every "
                     f"configuration) {rest:.2f}x" + ("" if ratio <= limit else
                                                      " - " + _held_by(results, r['config'], full)))
    part = _ratio(results, "none", "none/padded", "training part")
    if part is not None:
        lines.append(f"- padding-free training part (teacher + student forward + loss + backward): {part:.2f}x of "
                     f"padded (target <= 0.80x): {'met' if part <= 0.8 else 'MISSED'}")
        memory = [r["peak_memory_gb"] for c in ("none", "none/padded") for r in results
                  if r.get("config") == c and "error" not in r]
        lines.append(f"- peak memory padding-free {memory[0]:.2f} GB vs padded {memory[1]:.2f} GB: "
                     f"{'not higher' if memory[0] <= memory[1] * 1.02 else 'HIGHER'}")
    return lines


def _held_by(results, config, base) -> str:
    a = next(r for r in results if r.get("config") == config)["phases_s"]
    b = next(r for r in results if r.get("config") == base)["phases_s"]
    worst = max(PHASES, key=lambda p: a[p] - b[p])
    return f"the largest excess is {worst} (+{a[worst] - b[worst]:.2f} s)"


def format_table(meta, results) -> str:
    source = (f"{meta['student_dir']} student, {meta['teacher_dir'] or meta['student_dir']} teacher"
              if meta.get("student_dir") else
              f"{meta['student']} student, {meta['teacher']} teacher{' (tiny)' if meta['tiny'] else ''}")
    lines = [f"{source}, {meta['accumulation']} micro-batch(es) of {meta['batch']} x (prompt <= "
             f"{meta['prompt_length']} + completion {meta['length_spread']:g}-1 x {meta['completion_length']}), "
             f"{meta['device']} ({meta['device_name']}), {meta['threads']} thread(s); "
             f"{'elapsed' if meta['device'] == 'cuda' else 'CPU'} seconds per step",
             "| config | " + " | ".join(PHASES) + " | total | without generation | training part | vs none/padded "
             "| peak GB |",
             "|---" * (len(PHASES) + 7) + "|"]
    ok = {r["config"]: r for r in results if "error" not in r}
    base = ok.get("none/padded", ok.get("none", {})).get("phases_s", {}).get("total")
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error'].strip()[-80:]} |")
            continue
        p = r["phases_s"]
        ratio = f"{p['total'] / base:.2f}" if base else ""
        lines.append(f"| {r['config']} | " + " | ".join(f"{p[x]:.2f}" for x in PHASES)
                     + f" | {p['total']:.2f} | {p['without generation']:.2f} | {p['training part']:.2f} | {ratio} "
                     f"| {r['peak_memory_gb']:.2f} |")
    return "\n".join(lines)


def plot(results, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(ok)
    for phase in PHASES:
        values = [r["phases_s"][phase] for r in ok]
        ax.bar([r["config"] for r in ok], values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds per step")
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--tiny", action="store_true", help="tiny models of the same layout (seconds; the tests)")
    parser.add_argument("--student", default="qwen3-0.6b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--teacher", default="qwen3-1.7b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--student_dir", default=None, help="a local model directory (save_pretrained layout) as "
                        "the student instead of --student's random weights, e.g. the folder `python -m "
                        "lab.real_assets` prints")
    parser.add_argument("--teacher_dir", default=None, help="a local model directory as the teacher (default: "
                        "--student_dir)")
    parser.add_argument("--attn_implementation", default=None, help="attention kernel of both models, e.g. "
                        "flash_attention_2 (CUDA: padding-free passes then run packed varlen rows)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS),
                        help="none or <rule>@<ratio>, each optionally with /padded and /separate (module help)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step (gradient "
                        "accumulation; length grouping needs more than one)")
    parser.add_argument("--length_spread", type=float, default=0.2, help="completion lengths uniform between this "
                        "fraction of --completion_length and all of it (1: all at the limit)")
    parser.add_argument("--vllm", action="store_true", help="generate with vLLM (colocated; CUDA, when installed); "
                        "the statistics then come from the separate pass and lengths are not forced")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per config (the first is a warm-up "
                        "when there are more than one)")
    parser.add_argument("--batch", type=int, default=8 if cuda else 2, help="rollouts per step")
    parser.add_argument("--prompt_length", type=int, default=256 if cuda else 16)
    parser.add_argument("--completion_length", type=int, default=1024 if cuda else 32)
    parser.add_argument("--chunk_size", type=int, default=512)
    parser.add_argument("--divergence_backend", default="auto", choices=("auto", "trl", "chunked", "fused"))
    parser.add_argument("--teacher_dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the frozen teacher's weights (the student trains float32 master weights)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--threads", type=int, default=0 if cuda else 1, help="CPU threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per config")
    parser.add_argument("--out", default="profile.json")
    parser.add_argument("--png", default=None, help="stacked-bar chart (default: --out with .png)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args)))
        return None
    for c in args.configs:
        try:
            parse_config(c)
        except ValueError as err:
            parser.error(f"--configs: {err}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if not 0 < args.length_spread <= 1:
        parser.error("--length_spread must be in (0, 1]")
    for name in ("student_dir", "teacher_dir"):
        path = getattr(args, name)
        if path is not None and not os.path.isdir(path):
            parser.error(f"--{name} {path!r} is not a local directory (a save_pretrained folder; no hub names)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = []
    passthrough = []  # the child gets every setting but the list of configs
    for key, value in vars(args).items():
        if key in ("configs", "child", "out", "png", "timeout") or value is None or value is False:
            continue
        passthrough += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    for i, config in enumerate(args.configs, 1):
        print(f"[{i}/{len(args.configs)}] {config} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "lab.profile", *passthrough, "--child", config]
        result, error = run_child(cmd, args.timeout)
        if error:
            print(error, file=sys.stderr)
            results.append({"config": config, "error": error})
        else:
            results.append(result)
        with open(args.out, "w") as f:  # after every config: a run stopped by a timeout keeps what it measured
            json.dump({"meta": {"partial": True}, "results": results}, f, indent=2)
    meta = {k: getattr(args, k) for k in ("student", "teacher", "student_dir", "teacher_dir", "tiny", "batch",
                                           "accumulation", "prompt_length", "completion_length", "length_spread",
                                           "steps", "device", "divergence_backend", "vllm")}
    meta.update(threads=args.threads or torch.get_num_threads(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average=os.getloadavg(),
                device_name=torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name())
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    table = format_table(meta, results)
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    if any("error" not in r for r in results):
        plot(results, png, table.splitlines()[0])
    checks = target_checks(results)
    meta["targets"] = checks
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(table)
    if checks:
        print("\nTargets (issue 18, ratios within this run):\n" + "\n".join(checks))
    print(f"\nwrote {args.out} and {png}")
    return results


if __name__ == "__main__":
    main()
