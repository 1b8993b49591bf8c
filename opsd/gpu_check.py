"""One prepared GPU check: step time and peak memory of full-token and selective OPD loss steps, planner vs measured.

    python -m opsd.gpu_check                      # GPU: Qwen3-1.7B student, Qwen3-4B and Qwen3-8B teachers
    python -m opsd.gpu_check --tiny               # CPU, tiny configs of the same families, seconds (used by tests)
    python -m opsd.gpu_check --dry-run            # list the variants and the planner's estimates, build nothing

Models are random-initialised from the architecture table of opsd.plan (no weights are read or downloaded). Each
variant runs `--steps` training steps on random token ids: teacher forward (no grad), student forward with grad,
the trainer's loss step on the completion rows (`opsd.core.losses.weighted_divergence_loss`, `--divergence_backend`,
auto = TRL's kernel on CUDA, fused on CPU), backward, AdamW step. Selective
steps first run a no-grad statistics pass over all completion rows (divergence and entropy, chunked) and keep the top
`--keep` fraction by divergence for the gradient pass, as opsd's trainer does with a selector. Variants: full
fine-tuning (float32 master weights under bf16 autocast) and LoRA (bf16 base, float32 adapters), teacher in bf16 and
in 4-bit NF4 (bitsandbytes; skipped when it is not installed), full-token and selective. Generation is not run (the
planner's KV-cache term is checked exactly on CPU by tests/test_plan.py).

Measured: median step time after one warm-up step, peak memory (CUDA: torch.cuda.max_memory_allocated from just
before the step; CPU: the peak of live tensor bytes created during the steps, tracked exactly with a dispatch mode),
and the planner's estimate of the same quantity (opsd.plan.estimate, the larger of its teacher and student phases,
without the fragmentation margin and CUDA context, minus what existed before the steps on CPU). Results go to
`--out` as JSON (rewritten after every variant, so a timeout keeps what was measured) and a table to stdout. In
`--tiny` mode step times include the allocation tracker's per-op overhead: they only show that the code runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from .core.losses import resolve_backend
from .core.memory import LiveTensorBytes
from .plan import GiB, Architecture, PlanInputs, architecture, estimate

TINY_FAMILY = {"qwen3": dict(num_layers=4, hidden_size=128, intermediate_size=384, num_heads=4, num_kv_heads=2,
                             head_dim=32, vocab_size=512)}


def tiny_architecture(arch: Architecture) -> Architecture:
    """A small model of the same family and layout (tied embeddings, biases, q/k norm kept)."""
    dims = TINY_FAMILY["qwen3"]
    scale = 2 if arch.num_params() > 3e9 else 1  # keep teachers wider than students
    return Architecture(name=f"tiny-{arch.name}", family=arch.family, num_layers=dims["num_layers"],
                        hidden_size=dims["hidden_size"] * scale, intermediate_size=dims["intermediate_size"] * scale,
                        num_heads=dims["num_heads"] * scale, num_kv_heads=dims["num_kv_heads"],
                        head_dim=dims["head_dim"],  # = hidden / heads, as Qwen2 requires
                        vocab_size=dims["vocab_size"], tie_word_embeddings=arch.tie_word_embeddings,
                        attention_bias=arch.attention_bias, qk_norm=arch.qk_norm)


@dataclass
class Variant:
    teacher: str
    lora: bool
    teacher_4bit: bool
    keep: float | None  # None: full token

    @property
    def name(self) -> str:
        return (f"{'lora' if self.lora else 'full'}-{self.teacher}-{'t4bit' if self.teacher_4bit else 'tbf16'}-"
                f"{'all' if self.keep is None else f'keep{self.keep:g}'}")


def build_model(arch: Architecture, dtype: torch.dtype, device: torch.device, quant_4bit: bool = False,
                seed: int = 0):
    """Random-initialised causal LM from `arch` (sdpa attention) on `device`, optionally with its decoder linears
    replaced by 4-bit NF4 ones."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(arch.hf_config(attn_implementation="sdpa"), dtype=dtype)
    return quantize_4bit_(model, dtype, device) if quant_4bit else model


def quantize_4bit_(model, compute_dtype: torch.dtype, device: torch.device):
    """Replace every decoder-layer nn.Linear by a bitsandbytes NF4 Linear4bit, one at a time, on `device`."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                q.weight = weight._quantize(device.type if device.type == "cpu" else device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, child_name, q)
                del child, weight
    return model


def plan_for(variant: Variant, student: Architecture, teacher: Architecture, args, device: torch.device) -> PlanInputs:
    """What the variant runs, as planner inputs: bf16 and TRL's kernel on a GPU; float32 and the token-chunked
    divergence on CPU (--tiny). A dry run plans for the GPU."""
    cpu = device.type == "cpu" and args.tiny
    return PlanInputs(student=student, teacher=teacher, gpu_memory_gb=1e6, num_gpus=1,
                      prompt_length=args.prompt_length, response_length=args.response_length,
                      micro_batch=args.micro_batch, rollout_batch=args.micro_batch, rollout_n=1, lora=variant.lora,
                      lora_rank=args.lora_rank, lora_targets="all-linear",
                      teacher_placement="4bit" if variant.teacher_4bit else "gpu",
                      gradient_checkpointing=args.gradient_checkpointing, dtype="fp32" if cpu else "bf16",
                      master_weights="fp32", selector_ratio=variant.keep, chunk_size=args.chunk_size,
                      # the planner models trl and chunked buffers; fused holds the same [V, H] + [N, H] gradient
                      # buffers and chunk tiles as chunked
                      divergence_backend="trl" if resolve_backend(args.divergence_backend, torch.device(
                          "cpu" if cpu else "cuda")) == "trl" else "chunked", overhead_gb=0.0, fragmentation=0.0)


def planned_peak(plan: PlanInputs, exclude_resident: bool) -> int:
    """The planner's peak over the phases this check runs (all but generation). With
    `exclude_resident`, minus the weights that exist before the measured steps (CPU tracker)."""
    est = estimate(plan)
    best = 0
    for phase, comps in est.phases.items():
        if phase == "generation":
            continue
        comps = dict(comps)
        if exclude_resident:
            for key in ("student_weights", "lora_params", "teacher_weights"):
                comps.pop(key, None)
        best = max(best, sum(comps.values()))
    return best


def run_variant(variant: Variant, student_arch: Architecture, teacher_arch: Architecture, args,
                device: torch.device) -> dict:
    from opsd.core.heads import head_of
    from opsd.core.losses import per_token_divergence, weighted_divergence_loss

    cpu = device.type == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    result = {"variant": variant.name, "student": student_arch.name, "teacher": teacher_arch.name}
    # full fine-tuning keeps float32 master weights and computes under bf16 autocast (the planner's default)
    student = build_model(student_arch, torch.float32 if not variant.lora else dtype, device, seed=0)
    if variant.lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                     target_modules="all-linear", lora_dropout=0.0))
    teacher = build_model(teacher_arch, dtype, device, quant_4bit=variant.teacher_4bit, seed=1)
    teacher.eval().requires_grad_(False)
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if variant.lora:
            student.enable_input_require_grads()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    backbone_s = student.get_base_model().model if variant.lora else student.model
    base_s = student.get_base_model() if variant.lora else student
    vocab = min(student_arch.vocab_size, teacher_arch.vocab_size)
    seq = args.prompt_length + args.response_length
    beta = 1.0  # reverse KL
    backend = resolve_backend(args.divergence_backend, device)
    generator = torch.Generator().manual_seed(0)
    resident = (torch.cuda.memory_allocated(device) if not cpu else 0)
    result["resident_after_build_gib"] = resident / GiB
    times, peaks = [], []

    def completion(hidden):
        return hidden[:, args.prompt_length - 1:-1].reshape(-1, hidden.shape[-1])

    def one_step():
        # the order of opsd's trainer: with a selector, a teacher phase (teacher hidden states cached, no-grad
        # statistics pass, selection) before the student phase; without, the teacher runs after the student forward
        ids = torch.randint(0, vocab, (args.micro_batch, seq), generator=generator).to(device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not cpu)
        t_head, s_head = head_of(teacher, vocab), head_of(base_s, vocab)
        rows = h_t = None
        if variant.keep is not None:
            with torch.no_grad(), autocast:
                h_t = teacher.model(input_ids=ids).last_hidden_state
                h_s = backbone_s(input_ids=ids).last_hidden_state
                div, _ = per_token_divergence(completion(h_s), s_head, completion(h_t), t_head, beta,
                                              backend=backend, chunk_size=args.chunk_size)
            rows = div.topk(max(1, math.ceil(variant.keep * div.numel()))).indices
            del h_s, div
        with autocast:
            h_s = completion(backbone_s(input_ids=ids).last_hidden_state)
        if h_t is None:
            with torch.no_grad(), autocast:
                h_t = teacher.model(input_ids=ids).last_hidden_state
        h_t = completion(h_t)
        if rows is not None:
            h_s, h_t = h_s[rows], h_t[rows]
        # the trainer's loss step: sum_t f_t * l_t over the kept rows, here with f_t = 1 / kept
        factors = torch.full((h_s.shape[0],), 1.0 / h_s.shape[0], device=h_s.device)
        loss, _, _ = weighted_divergence_loss(h_s, s_head, h_t, t_head, factors, beta, 1.0, backend, args.chunk_size)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    tracker = LiveTensorBytes() if cpu else None
    for step in range(args.steps + 1):
        if not cpu:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        if tracker is not None:
            with tracker:
                loss = one_step()
        else:
            loss = one_step()
        if not cpu:
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device))
        if step > 0 or args.steps == 0:
            times.append(time.perf_counter() - start)
        if not math.isfinite(loss):
            result["nonfinite_loss"] = True
    measured = tracker.peak if cpu else max(peaks)
    plan = plan_for(variant, student_arch, teacher_arch, args, device)
    planned = planned_peak(plan, exclude_resident=cpu)
    result.update(step_time_s=statistics.median(times), measured_peak_gib=measured / GiB,
                  planned_peak_gib=planned / GiB, planned_over_measured=planned / max(measured, 1),
                  measured_what="live tensor bytes created during the steps" if cpu
                  else "torch.cuda.max_memory_allocated during a step",
                  last_loss=loss, divergence_backend=backend, plan=plan.to_dict())
    return result  # the models and optimizer go with this frame; main() collects and empties the cache


def variants(args, have_bnb: bool) -> list[Variant]:
    out = []
    for teacher in args.teachers:
        for lora in (False, True):
            for t4 in ((False, True) if have_bnb and not args.no_4bit else (False,)):
                for keep in (None, args.keep):
                    out.append(Variant(teacher, lora, t4, keep))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m opsd.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="qwen3-1.7b")
    p.add_argument("--teachers", default="qwen3-4b,qwen3-8b", help="comma-separated architecture names")
    p.add_argument("--prompt_length", type=int, default=512)
    p.add_argument("--response_length", type=int, default=2048)
    p.add_argument("--micro_batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--keep", type=float, default=0.1, help="kept fraction of the selective variants")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--chunk_size", type=int, default=512)
    p.add_argument("--divergence_backend", default="auto", choices=("auto", "trl", "chunked", "fused"),
                   help="gradient pass of the loss step (auto: trl on CUDA, fused on CPU, as in the trainer)")
    p.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--no_4bit", action="store_true", help="skip the 4-bit teacher variants")
    p.add_argument("--only", default=None, help="run only variants whose name contains this string")
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU (seconds; what the tests run)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print variants and planner estimates only")
    p.add_argument("--out", default="gpu_check.json")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.teachers = [t for t in args.teachers.split(",") if t]
    import importlib.util

    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if args.tiny:
        device = torch.device("cpu")
        if args.prompt_length == 512 and args.response_length == 2048:
            args.prompt_length, args.response_length = 32, 224
        args.chunk_size = min(args.chunk_size, 32)
        args.lora_rank = min(args.lora_rank, 8)
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type != "cuda" and not args.dry_run:
            raise SystemExit("No CUDA device: use --tiny (CPU, tiny configs) or --dry-run.")
    student = architecture(args.student)
    teachers = {t: architecture(t) for t in args.teachers}
    if args.tiny:
        student = tiny_architecture(student)
        teachers = {t: tiny_architecture(a) for t, a in teachers.items()}
    todo = [v for v in variants(args, have_bnb) if args.only is None or args.only in v.name]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "bitsandbytes": have_bnb, "tiny": args.tiny,
              "args": {k: v for k, v in vars(args).items()}, "results": []}
    if not have_bnb and not args.no_4bit:
        report["skipped"] = "4-bit teacher variants: bitsandbytes is not installed"
    for v in todo:
        if args.dry_run:
            plan = plan_for(v, student, teachers[v.teacher], args, device)
            report["results"].append({"variant": v.name, "planned_peak_gib": planned_peak(plan, False) / GiB,
                                      "plan": plan.to_dict()})
            continue
        try:
            report["results"].append(run_variant(v, student, teachers[v.teacher], args, device))
        except torch.OutOfMemoryError as err:  # keep going: an OOM is a result too
            report["results"].append({"variant": v.name, "error": f"OOM: {err}"[:500]})
        gc.collect()  # outside the except block: the traceback no longer holds the variant's models
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(_row(report["results"][-1]), flush=True)
        _save(report, args.out)  # after every variant: a run stopped by a timeout keeps what it measured
    if args.dry_run:
        for r in report["results"]:
            print(f"{r['variant']:<40} planned {r['planned_peak_gib']:8.2f} GiB")
    _save(report, args.out)
    return report


def _save(report: dict, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2, default=str)


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['variant']:<40} {r['error'][:80]}"
    return (f"{r['variant']:<40} step {r['step_time_s']:7.3f} s  measured {r['measured_peak_gib']:8.3f} GiB  "
            f"planned {r['planned_peak_gib']:8.3f} GiB  planned/measured {r['planned_over_measured']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
