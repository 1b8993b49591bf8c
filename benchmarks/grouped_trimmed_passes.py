# Forward + backward of SmolLM2-135M-Instruct (30 layers, float32, train mode, 1 thread) over the timed step of
# benchmarks/profile_cpu_smollm2_issue18 (8 rollouts, completions 31-102 tokens, prompts 41-54 tokens), as
# 2 micro-batches: padded to the step's rectangle in the shuffled split (padding_free=false) vs length-grouped and
# trimmed (padding_free=true at fill >= 0.7). Min CPU seconds of 3 rounds, the variants interleaved in each round.
# `OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/grouped_trimmed_passes.py`
import time

import torch
from transformers import AutoModelForCausalLM

from lab.real_assets import materialize_smollm2

torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(str(materialize_smollm2(quiet=True)), dtype=torch.float32)
model.train()
g = torch.Generator().manual_seed(0)
completions = [31, 102, 41, 74, 82, 67, 83, 61]
prompts = [41, 54, 48, 43, 49, 44, 53, 41]
P, C = max(prompts), 128  # TRL pads prompts to the step's longest, completions to the step's longest (102)
C = max(completions)


def micro_batch(rows, trim):
    p_w = max(prompts[r] for r in rows) if trim else P
    c_w = max(completions[r] for r in rows) if trim else C
    ids = torch.randint(10, 1000, (len(rows), p_w + c_w), generator=g)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        mask[i, p_w - prompts[r]: p_w + completions[r]] = 1
    return ids, mask


padded = [micro_batch([0, 1, 2, 3], False), micro_batch([4, 5, 6, 7], False)]
order = sorted(range(8), key=lambda r: -(prompts[r] + completions[r]))
grouped = [micro_batch(order[:4], True), micro_batch(order[4:], True)]


def step(mbs):
    for ids, mask in mbs:
        h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        (h * mask[..., None]).sum().backward()


times = {"padded": [], "grouped_trimmed": []}
for _ in range(3):
    for name, mbs in (("padded", padded), ("grouped_trimmed", grouped)):
        t = time.process_time()
        step(mbs)
        times[name].append(time.process_time() - t)
cells = {name: sum(ids.numel() for ids, _ in mbs) for name, mbs in (("padded", padded), ("grouped_trimmed", grouped))}
real = sum(prompts) + sum(completions)
for name, ts in times.items():
    print(f"{name}: cells {cells[name]} (real {real}, fill {real / cells[name]:.2f}), CPU s {min(ts):.2f} "
          f"(rounds {', '.join(f'{t:.2f}' for t in ts)})")
print(f"ratio grouped_trimmed / padded: {min(times['grouped_trimmed']) / min(times['padded']):.2f}")
