# Forward + backward of SmolLM2-135M-Instruct (30 layers, float32, train mode, 1 thread): 4 sequences as one padded
# batch vs one unpadded pass per sequence; min CPU seconds of 3 after a warm-up. Run from the repository root after
# `python -m lab.real_assets`: `OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/per_sequence_passes.py`.
# Output of the run in BENCHMARKS.md (2026-12-03, load average 12-14): benchmarks/per_sequence_passes.txt.
import time, torch, sys
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from lab.real_assets import materialize_smollm2
m = AutoModelForCausalLM.from_pretrained(str(materialize_smollm2(quiet=True)), dtype=torch.float32)
m.train()
g = torch.Generator().manual_seed(0)
def run(P, lens, B=4, reps=3):
    C = max(lens)
    plen = [P - (i % 3) * 5 for i in range(B)]
    ids = torch.randint(10, 1000, (B, P + C), generator=g)
    mask = torch.zeros(B, P + C, dtype=torch.long)
    for b in range(B):
        mask[b, P - plen[b]: P + lens[b]] = 1
    def padded():
        h = m.model(input_ids=ids, attention_mask=mask).last_hidden_state
        (h * mask[..., None]).sum().backward()
    def per_row():
        tot = 0
        for b in range(B):
            r = ids[b, P - plen[b]: P + lens[b]][None]
            h = m.model(input_ids=r).last_hidden_state
            tot = tot + h.sum()
        tot.backward()
    out = {}
    for name, fn in (("padded", padded), ("per_row", per_row)):
        fn()
        ts = []
        for _ in range(reps):
            t = time.process_time(); fn(); ts.append(time.process_time() - t)
        out[name] = min(ts)
    real = sum(plen) + sum(lens); rect = B * (P + C)
    print(f"P={P} lens={lens} real_fraction={real/rect:.2f} padded={out['padded']:.3f}s per_row={out['per_row']:.3f}s ratio={out['per_row']/out['padded']:.2f}", flush=True)
run(50, [13, 30, 45, 64])
run(50, [64, 60, 55, 50])
run(32, [60, 110, 160, 256])

