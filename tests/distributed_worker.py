"""A worker script for the multi-process tests (run with torchrun; not a test module).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py ddp OUT STUDENT TEACHER
    python tests/distributed_worker.py ddp OUT STUDENT TEACHER            # the same global batch in one process

`ddp`: one optimizer step of the real OPDTrainer.train() with the library defaults (gradient checkpointing on,
DDP built by accelerate) on fixed completions split over the ranks; a selector keeps only tokens with id <= 20,
which the last rank's completions never contain, so that rank keeps no token. Each rank saves its gradients just
before the optimizer step (DDP has averaged them by then).
`ddp_padded`: the same with padding_free=false (the padded rectangle: the reference of the padding-free passes).
`fsdp2`: student and teacher sharded with FSDP2 (fully_shard); the statistics pass of `_select_tokens` must read
whole lm_head weights; each rank saves the statistics and keep masks.
"""

from __future__ import annotations

import os
import sys

import torch
from datasets import Dataset

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from opsd.core.config import OPDConfig  # noqa: E402
from opsd.core.models import load_causal_lm, load_tokenizer  # noqa: E402
from opsd.core.selection import TokenChoice, TokenSelector  # noqa: E402
from support import COMPLETION, SEQUENCES, FixedCompletions, SaveGradients  # noqa: E402

def global_batch():
    """4 sequences; the last two (the second rank's) only hold ids > 20."""
    g = torch.Generator().manual_seed(0)
    completion = torch.randint(3, 64, (SEQUENCES, COMPLETION), generator=g)
    completion[SEQUENCES // 2:] = torch.randint(21, 64, (SEQUENCES // 2, COMPLETION), generator=g)
    completion[0, 0] = completion[1, 2] = 7  # at least two kept tokens on the first rank
    return {
        "prompt_ids": torch.randint(3, 64, (SEQUENCES, 3), generator=g),
        "prompt_mask": torch.ones(SEQUENCES, 3, dtype=torch.long),
        "completion_ids": completion,
        "completion_mask": torch.tensor([[1] * n + [0] * (COMPLETION - n) for n in (6, 4, 5, 6)]),
    }


class KeepSmallIds(TokenSelector):
    """Keeps tokens whose id is <= 20 (decided from content, so shuffling and rank splits do not matter)."""

    needs_model_pass = False

    def statistics(self, view):
        return {"token_id": view.token_ids.float()}

    def choose(self, stats, sequence_ids, positions, generator):
        return TokenChoice(stats["token_id"] <= 20)


class StatsOfEveryToken(TokenSelector):
    """Keeps every token; records reverse KL and entropy computed from the heads the statistics pass receives."""

    def statistics(self, view):
        zs = view.student_head.logits(view.student_hidden)
        zt = view.teacher_head.logits(view.teacher_hidden)
        ls, lt = zs.log_softmax(-1), zt.log_softmax(-1)
        return {"reverse_kl": (ls.exp() * (ls - lt)).sum(-1), "position": view.positions.float()}

    def __init__(self):
        self.recorded = []

    def choose(self, stats, sequence_ids, positions, generator):
        return TokenChoice(torch.ones_like(positions, dtype=torch.bool))

    def record(self, step, view, stats, choice):
        self.recorded.append({k: v.detach().clone() for k, v in stats.items()})


def main(mode, out, student_dir, teacher_dir):
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    args = OPDConfig(output_dir=os.path.join(out, f"run{world}"), per_device_train_batch_size=SEQUENCES // world,
                     gradient_accumulation_steps=1, max_steps=1, learning_rate=1e-3, max_grad_norm=0.0,
                     max_completion_length=COMPLETION, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                     logging_steps=1, padding_free=mode != "ddp_padded",
                     unpadded_fill_threshold=1.0)
    data = Dataset.from_list([{"prompt": "1+1="}] * 8)
    ddp = mode in ("ddp", "ddp_padded")  # ddp_padded: the same with padding_free=false (the padded reference)
    selector = KeepSmallIds() if ddp else StatsOfEveryToken()
    trainer = FixedCompletions(global_batch(), load_causal_lm(student_dir), teacher_dir, args=args, train_dataset=data,
                               processing_class=load_tokenizer(student_dir), token_selector=selector)
    if ddp:
        trainer.add_callback(SaveGradients(os.path.join(out, f"grads_world{world}_rank{rank}.pt")))
        trainer.train()
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for model in (trainer.model, trainer.teacher_model):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    assert type(trainer.model.lm_head.weight).__name__ == "DTensor"
    batch = trainer._generate_and_score_completions(None)
    trainer._select_tokens([dict(batch)])
    torch.save({"stats": selector.recorded[0], "batch": batch}, os.path.join(out, f"fsdp_rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:5])
    if torch.distributed.is_initialized():
        # an orderly teardown: a rank that exits while gloo still talks to another can abort there ("terminate called
        # without an active exception", seen once in a fresh-clone run); not in a `finally`, where a failed rank would
        # leave the other waiting in the barrier
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
